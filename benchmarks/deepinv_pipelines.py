"""invdiff inside deepinv pipelines, measured: ``dinv.test`` on the shipped priors.

Run: ``python benchmarks/deepinv_pipelines.py [--images 4] [--sampler dds]``.

Prints a markdown table of ``dinv.test`` results (PSNR of the sampler and of deepinv's
"no learning" column) on held-out images:

* invdiff's CT task ``ct-sparse-30`` with deepinv's default no-learning method (the adjoint,
  an unnormalised back-projection on invdiff's CT) and with ``no_learning_method="A_dagger"``
  (FBP), the call the README recommends;
* deepinv's own ``BlurFFT`` with RED-Diff, whose start was ``A_dagger(y)`` (deepinv's exact
  pseudo-inverse of noisy data) and is now :func:`~invdiff.samplers.steps.initial_estimate`;
* deepinv's ``Inpainting`` under a ``SigmaGenerator`` (a new noise level per image), which
  every sampler used to refuse.
"""

from __future__ import annotations

import argparse

import deepinv as dinv
import torch
from _docs import page

from invdiff import operators, priors, samplers
from invdiff.bench import SeededSampler
from invdiff.data import heldout


def run(images: int, sampler_name: str) -> list[tuple[str, str, float, float]]:
    torch.manual_seed(0)  # deepinv's dataloader-side draws; invdiff itself never touches the global RNG
    prior = priors.load("ct-phantom-64")
    x = heldout("ct-phantom", images)
    loader = torch.utils.data.DataLoader(list(x), batch_size=2)
    kw = dict(online_measurements=True, show_progress_bar=False, verbose=False)
    rows = []

    def make(name, **kw):  # the benchmark's seeded call: the same draws in every run
        return SeededSampler(samplers.make(name, prior, **kw), 0)

    ct = operators.make("ct-sparse-30", img_size=(1, 64, 64))
    for method in ("A_adjoint", "A_dagger"):
        out = dinv.test(make(sampler_name), loader, ct, no_learning_method=method, **kw)
        rows.append(("ct-sparse-30 (invdiff)", f"{sampler_name}, no_learning_method={method}", out["PSNR"],
                     out["PSNR no learning"]))
    blur = dinv.physics.BlurFFT((1, 64, 64), filter=dinv.physics.blur.gaussian_blur(2.0),
                                noise_model=dinv.physics.GaussianNoise(0.02, rng=torch.Generator().manual_seed(1)))
    for start in ("A_dagger", "auto"):
        out = dinv.test(make("reddiff", start=start), loader, blur, no_learning_method="A_dagger", **kw)
        rows.append(("BlurFFT (deepinv), std 2", f"reddiff, start={start}", out["PSNR"], out["PSNR no learning"]))
    inpaint = dinv.physics.Inpainting((1, 64, 64), mask=0.5, rng=torch.Generator().manual_seed(0),
                                      noise_model=dinv.physics.GaussianNoise(0.05))
    levels = dinv.physics.generator.SigmaGenerator(0.01, 0.1, rng=torch.Generator().manual_seed(2))
    out = dinv.test(make(sampler_name), loader, inpaint, physics_generator=levels,
                    no_learning_method="A_dagger", **kw)
    rows.append(("Inpainting (deepinv) + SigmaGenerator", sampler_name, out["PSNR"], out["PSNR no learning"]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--sampler", default="dds")
    parser.add_argument("--docs", action="store_true", help="also write the output to docs/benchmarks/deepinv_pipelines.md")
    args = parser.parse_args()
    with page("deepinv_pipelines", "invdiff inside deepinv pipelines", args.docs):
        torch.set_num_threads(2)
        print("| physics | method | PSNR (dB) | PSNR no learning (dB) |")
        print("|---|---|---|---|")
        for physics, method, psnr, base in run(args.images, args.sampler):
            print(f"| {physics} | {method} | {psnr:.2f} | {base:.2f} |")
        print(f"\nmean over {args.images} held-out ct-phantom images, ct-phantom-64 prior, sampler defaults")


if __name__ == "__main__":
    main()
