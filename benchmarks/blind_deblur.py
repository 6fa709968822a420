"""Blind deblurring: BlindDPS against DPS given the true kernel and DPS given a wrong one.

Held-out CT phantoms (64x64, never trained on), each blurred by its own held-out kernel
(``deblur-blind``: the measurement seed draws a motion, diffraction or Gaussian kernel of
:mod:`invdiff.operators.kernels`, stream 1, never trained on), noise std 0.01. Methods, all on
the shipped image prior ``ct-phantom-64``:

* ``Wiener, Gaussian guess`` — the task's ``A_dagger`` (a generic Gaussian kernel, std 1.5 px);
* ``Wiener, true kernel`` — the same filter with the kernel known;
* ``DPS, Gaussian kernel`` — non-blind DPS (its defaults) given the Gaussian guess as the kernel;
* ``DPS, true kernel`` — non-blind DPS given the true kernel (the oracle);
* ``BlindDPS`` — both unknown, with the shipped kernel prior ``blur-kernel-16``.

Reported: PSNR (dB, peak 1) / SSIM per method (mean ± std over images), the kernel error
``||k_hat - k|| / ||k||`` (BlindDPS's estimate, and the guess's), NFE and seconds per image,
and a figure (``docs/benchmarks/blind.png`` with ``--docs``): the kernels are shown inset.

    python benchmarks/blind_deblur.py [--images 8] [--steps 200] [--docs]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import deepinv as dinv
import torch
from _docs import DOCS, page

from invdiff import data, operators, priors, samplers
from invdiff.bench.metrics import kernel_error
from invdiff.files import atomic_file
from invdiff.operators.kernels import FAMILIES


def label(family: str) -> str:
    """A kernel family as the tables name it."""
    return "Gaussian" if family == "gaussian" else family


def scores(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[list[float], list[float]]:
    x_hat = x_hat.float().clamp(0, 1)
    psnr = dinv.loss.metric.PSNR(max_pixel=1.0)(x_hat, x)
    ssim = dinv.loss.metric.SSIM(max_pixel=1.0)(x_hat, x)
    return psnr.flatten().tolist(), ssim.flatten().tolist()


def figure(path: Path, x, y, shown: dict, kernels: torch.Tensor, estimates: torch.Tensor, guess: torch.Tensor,
           rows: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def inset(ax, k):
        a = ax.inset_axes([0.64, 0.64, 0.34, 0.34])
        k = k.reshape(k.shape[-2:]).float()
        a.imshow((k / k.max()).numpy(), cmap="magma", vmin=0, vmax=1)
        a.set_xticks([]), a.set_yticks([])

    columns = [("truth", x, kernels), ("measurement", y, None), *[(n, v, None) for n, v in shown.items()]]
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.7 * len(columns), 1.8 * rows), squeeze=False)
    for i in range(rows):
        for j, (name, images, ks) in enumerate(columns):
            ax = axes[i, j]
            ax.imshow(images[i, 0].clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
            if name == "truth":
                inset(ax, kernels[i])
            elif name.startswith("BlindDPS"):
                inset(ax, estimates[i])
            elif "Gaussian" in name:
                inset(ax, guess)
            if name not in ("truth", "measurement"):
                p = scores(images[i : i + 1], x[i : i + 1])[0][0]
                ax.text(1, 1, f"{p:.1f} dB", color="yellow", fontsize=7, va="top")
            ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(name, fontsize=7)
    fig.tight_layout()
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="steps of DPS and BlindDPS (default: theirs)")
    parser.add_argument("--kernel-prior", default="blur-kernel-16")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks/blind.md and blind.png")
    args = parser.parse_args()
    with page("blind", "Blind deblurring on the shipped priors", args.docs):
        torch.set_num_threads(args.threads)
        prior = priors.load("ct-phantom-64")
        kernel_prior = priors.load(args.kernel_prior)
        steps = {} if args.steps is None else {"steps": args.steps}
        x = data.heldout("ct-phantom", args.images, size=64)
        physics = operators.make("deblur-blind", (1, 64, 64), seed=0)
        sigma = float(physics.noise_model.sigma)
        seeds = [100 + i for i in range(len(x))]  # one held-out kernel per image (families in turn)
        kernels = torch.cat([physics.kernel(s) for s in seeds])
        y = torch.cat([physics(x[i : i + 1], seed=s) for i, s in enumerate(seeds)])
        guess = physics.guess()
        results: dict[str, dict] = {}

        def record(name, x_hat, nfe, seconds, kernel_err=None):
            psnr, ssim = scores(x_hat, x)
            results[name] = dict(psnr=psnr, ssim=ssim, nfe=nfe, seconds=seconds / len(x), kernel=kernel_err,
                                 x_hat=x_hat.detach().cpu())
            print(f"{name}: {statistics.mean(psnr):.2f} dB", flush=True)

        start = time.perf_counter()
        record("Wiener, Gaussian guess", physics.A_dagger(y), 0, time.perf_counter() - start,
               [kernel_error(guess, k[None]) for k in kernels])
        start = time.perf_counter()
        record("Wiener, true kernel", torch.cat([physics.A_dagger(y[i : i + 1], filter=kernels[i : i + 1])
                                                 for i in range(len(x))]), 0, time.perf_counter() - start)
        for name, kernel_of in (("DPS, Gaussian kernel", lambda i: guess), ("DPS, true kernel", lambda i: kernels[i : i + 1])):
            dps = samplers.make("dps", prior, **steps)
            outs, nfe, seconds = [], 0, 0.0
            for i in range(len(x)):
                outs.append(dps(y[i : i + 1], physics.known(kernel_of(i)), generator=torch.Generator().manual_seed(2 + i)))
                nfe, seconds = dps.last_run.nfe, seconds + dps.last_run.wall_time
            record(name, torch.cat(outs), nfe, seconds)
        blind = samplers.make("blind-dps", prior, kernel_prior=kernel_prior, **steps)
        out = blind(y, physics, generator=[torch.Generator().manual_seed(2 + i) for i in range(len(x))])
        errors = [kernel_error(blind.kernel[i : i + 1], kernels[i : i + 1]) for i in range(len(x))]
        record("BlindDPS", out, f"{blind.last_run.nfe} + {blind.last_run.extra['kernel_nfe']} (kernel)",
               blind.last_run.wall_time, errors)

        order = [label(physics.family(s)) for s in seeds[:3]]
        print(f"\n{len(x)} held-out phantoms, each blurred by its own held-out kernel (16x16, centred: "
              f"{', '.join(order)} in turn), noise std {sigma:.3g}; "
              f"prior ct-phantom-64, kernel prior {args.kernel_prior}; steps: {args.steps or 'defaults'}.\n")
        print("| method | PSNR (dB) | SSIM | kernel error | NFE | s / image |\n|---|---|---|---|---|---|")
        for name, r in results.items():
            ps, ss = r["psnr"], r["ssim"]
            k = f"{statistics.mean(r['kernel']):.3f}" if r["kernel"] else ""
            print(f"| {name} | {statistics.mean(ps):.2f} ± {statistics.stdev(ps):.2f} | "
                  f"{statistics.mean(ss):.3f} ± {statistics.stdev(ss):.3f} | {k} | {r['nfe']} | {r['seconds']:.2f} |")
        blind_p = statistics.mean(results["BlindDPS"]["psnr"])
        true_p = statistics.mean(results["DPS, true kernel"]["psnr"])
        wrong_p = statistics.mean(results["DPS, Gaussian kernel"]["psnr"])
        print(f"\nBlindDPS - DPS with a Gaussian kernel: {blind_p - wrong_p:+.2f} dB "
              f"({'beats it' if blind_p > wrong_p else 'does not beat it'}); "
              f"BlindDPS - DPS with the true kernel: {blind_p - true_p:+.2f} dB "
              f"({'within' if true_p - blind_p <= 2 else 'not within'} 2 dB).")
        per_family = {}
        for i, s in enumerate(seeds):
            per_family.setdefault(label(physics.family(s)), []).append(i)
        print("\nPer kernel family (PSNR dB, BlindDPS / DPS true kernel / DPS Gaussian kernel; BlindDPS kernel error):\n")
        print("| family | images | BlindDPS | DPS, true | DPS, Gaussian | kernel error |\n|---|---|---|---|---|---|")
        for fam, idx in per_family.items():
            cols = [statistics.mean(results[m]["psnr"][i] for i in idx)
                    for m in ("BlindDPS", "DPS, true kernel", "DPS, Gaussian kernel")]
            kerr = statistics.mean(results["BlindDPS"]["kernel"][i] for i in idx)
            print(f"| {fam} | {len(idx)} | {cols[0]:.2f} | {cols[1]:.2f} | {cols[2]:.2f} | {kerr:.3f} |")
        # the kernel chain alone: the image prior a point mass at the truth, by steps and step rule
        from invdiff.priors import GaussianPrior

        class KnownImages(GaussianPrior):
            def _denoise(self, xt, sigma):
                return x.to(xt.dtype).expand_as(xt)

        names = [label(f) for f in FAMILIES]
        print("\nThe kernel chain alone (the image prior a point mass at the true image, no translation gauge): "
              f"kernel error by steps and step rule, per family ({' / '.join(names)}):\n")
        print(f"| steps | weighting | {' | '.join(names)} |\n|---|---|" + "---|" * len(names))
        for n_steps in (100, 200, 500):
            for weighting, extra in (("likelihood", {}), ("paper", dict(zeta=0.3, zeta_kernel=0.3))):
                # no translation gauge: the known image fixes the translation (the gauge would roll
                # an image chain that the point-mass prior ignores)
                alone = samplers.make("blind-dps", KnownImages(0.5, 1e-8, image_shape=(1, 64, 64)),
                                      kernel_prior=kernel_prior, steps=n_steps, weighting=weighting,
                                      center_kernel=False, **extra)
                alone(y, physics, generator=[torch.Generator().manual_seed(2 + i) for i in range(len(x))])
                errs = [kernel_error(alone.kernel[i : i + 1], kernels[i : i + 1]) for i in range(len(x))]
                cols = [f"{statistics.mean(errs[i] for i in per_family[f]):.3f}" if f in per_family else ""
                        for f in names]
                print(f"| {n_steps} | {weighting} | " + " | ".join(cols) + " |", flush=True)
        if args.docs:
            shown = {n: results[n]["x_hat"] for n in ("Wiener, Gaussian guess", "DPS, Gaussian kernel",
                                                       "DPS, true kernel", "BlindDPS")}
            figure(DOCS / "blind.png", x, y, shown, kernels, blind.kernel.cpu(), guess, min(4, len(x)))
            print("\n![BlindDPS: truth with its kernel, measurement, reconstructions; kernels inset](blind.png)")


if __name__ == "__main__":
    main()
