"""Exactness table: every sampler against the closed-form posterior of analytic priors.

Priors with exact answers (a smooth 16x16 Gaussian prior, and a two-component Gaussian
mixture built from it), linear operators with Gaussian noise (sigma 0.05 on [0, 1] images):
random inpainting (50 % missing) and Gaussian blur (std 1). For each sampler at its
defaults, ``n`` posterior samples for one measurement:

* ``mean err`` = ||mean of samples - exact posterior mean|| / ||prior mean - exact posterior mean||;
* ``std ratio`` = (mean per-pixel std of the samples) / (mean exact posterior std);

next to the Monte-Carlo floor (``n`` exact posterior samples) and deepinv's ``DPS`` and
``DiffPIR`` on the same prior (as a deepinv denoiser). ReSample, a latent sampler, runs here on
the pixel prior through the identity autoencoder.

Two more tables:

* **SMC vs particles** (``--sections smc``): the Twisted Diffusion Sampler's weighted particle
  system for ``K`` = 4 ... 1024 particles on 4x4 problems (d = 16; the Gaussian and the
  mixture prior, 50 % inpainting, noise 0.05, 50 steps), ``--runs`` independent systems per
  ``K``: RMS relative error of the weighted mean, mean relative Frobenius error of the
  weighted covariance, and the Wasserstein-2 distance between the Gaussians with the
  particles' and the exact posterior's first two moments (relative to the exact posterior's
  ``sqrt(tr C)``), each next to the same statistic of ``K`` exact posterior samples. The
  errors fall like ``K^-1/2`` (asymptotic exactness) down to the discretisation of the chain,
  shown by rows with more steps at the largest ``K`` (``--smc-steps``).
* **latent** (``--sections latent``): ReSample on the analytic latent problem (a linear 2x
  bilinear-upsampling decoder over an 8x8 Gaussian latent prior, 16x16 images; exact posterior
  in closed form), inpainting and blur, at its defaults (500 steps) and at 100 steps, with
  both DPS weightings, ``n`` samples each, the same columns as the first table.

Run: ``python benchmarks/exactness.py [--sections pixel,smc,latent]``.
"""

from __future__ import annotations

import argparse
import math
import time

import deepinv as dinv
import torch
from _docs import page

from invdiff import samplers
from invdiff.priors import GaussianMixturePrior, GaussianPrior, LatentDiffusionPrior

SHAPE = (1, 16, 16)
NOISE = 0.05


def problems():
    gauss = GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.05, mean=0.5)
    cov = gauss.covariances[0]
    means = torch.stack([torch.full(SHAPE, 0.35), torch.full(SHAPE, 0.65)]).double()
    mixture = GaussianMixturePrior(torch.tensor([0.5, 0.5]), means, torch.stack([0.5 * cov, 0.5 * cov]))
    mask = (torch.rand(SHAPE, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    kernel = dinv.physics.functional.blur.gaussian_blur(sigma=1.0)
    for prior_name, prior in (("gaussian", gauss), ("mixture", mixture)):
        for op_name in ("inpaint-50", "blur-1"):
            noise = dinv.physics.GaussianNoise(NOISE, rng=torch.Generator().manual_seed(1))
            physics = (dinv.physics.Inpainting(SHAPE, mask=mask, noise_model=noise) if op_name == "inpaint-50"
                       else dinv.physics.BlurFFT(SHAPE, filter=kernel, noise_model=noise))
            x = prior.sample(1, torch.Generator().manual_seed(2)).float()
            yield f"{prior_name} / {op_name}", prior, physics, physics(x)


def scores(samples: torch.Tensor, post, prior_mean: torch.Tensor) -> tuple[float, float]:
    exact = post.mean.float()
    err = ((samples.mean(0) - exact).norm() / (prior_mean - exact).norm()).item()
    ratio = (samples.std(0).mean() / post.std.float().mean()).item()
    return err, ratio


def prior_mean_image(prior) -> torch.Tensor:
    """The prior mean as a ``(1, C, H, W)`` image (of a Gaussian or a Gaussian mixture)."""
    return torch.einsum("k,kd->d", prior.weights, prior.means).reshape(1, *prior.image_shape).float()


def blind_view(physics) -> tuple:
    """A blur problem as a blind one with a known answer: ``deblur-blind``'s operator of the
    same kernel size, and a kernel prior that is a point mass at the true kernel (so the exact
    posterior is the non-blind one); ``(None, None)`` for an operator that is no blur."""
    from invdiff.operators.natural import BlindBlur

    if not isinstance(physics, dinv.physics.BlurFFT):
        return None, None
    row = physics.filter.detach().float()
    if row.ndim == 3:  # deepinv's 1-D Gaussian (1, 1, w): the middle row of a w x w kernel, the same blur
        kernel = torch.zeros(1, 1, row.shape[-1], row.shape[-1])
        kernel[0, 0, row.shape[-1] // 2] = row.flatten()
    else:
        kernel = row.reshape(1, 1, *row.shape[-2:])
    blind = BlindBlur(SHAPE, kernel_size=kernel.shape[-1])
    blind.noise_model = physics.noise_model
    return blind, GaussianPrior(kernel[0] / kernel.max(), 1e-8)


def sampler_scores(name: str, prior, physics, y: torch.Tensor, n: int) -> tuple[float, float, int, float]:
    """``(mean err, std ratio, NFE, seconds)`` of ``n`` samples of sampler ``name`` at its defaults
    (no clipping: the analytic priors are unbounded), seed 4; also used by ``tests/test_exactness.py``.
    A blind sampler (BlindDPS) runs on :func:`blind_view` of a blur problem (NaN scores on the others)."""
    options = {}
    run_physics = physics
    if samplers.get(name).handles_blind:
        run_physics, options["kernel_prior"] = blind_view(physics)
        if run_physics is None:
            return float("nan"), float("nan"), 0, 0.0
    sampler = samplers.make(name, prior, clip=None, **options)
    out = sampler.sample(y, run_physics, n=n, generator=torch.Generator().manual_seed(4))
    post = prior.posterior(y, physics, NOISE)
    return (*scores(out.samples, post, prior_mean_image(prior)), sampler.last_run.nfe, sampler.last_run.wall_time)


def gaussian_w2(mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor) -> float:
    """Wasserstein-2 distance between N(mean_a, cov_a) and N(mean_b, cov_b) (Bures formula)."""
    from scipy.linalg import sqrtm

    root_b = sqrtm(cov_b.numpy())
    cross = sqrtm(root_b @ cov_a.numpy() @ root_b).real
    w2 = ((mean_a - mean_b) ** 2).sum().item() + float(torch.trace(cov_a + cov_b).item() - 2 * cross.trace())
    return math.sqrt(max(w2, 0.0))


def smc_rows(runs: int, particle_counts: tuple[int, ...], steps: tuple[int, ...] = (50,)) -> list[tuple]:
    """SMC's weighted particles vs the exact posterior, for each particle count at ``steps[0]``
    levels, and for the largest count at each further number of levels (see the module doc)."""
    shape = (1, 4, 4)
    gauss = GaussianPrior.stationary(shape, length_scale=1.5, variance=0.05, mean=0.5)
    cov = gauss.covariances[0]
    means = torch.stack([torch.full(shape, 0.35), torch.full(shape, 0.65)]).double()
    mixture = GaussianMixturePrior(torch.tensor([0.5, 0.5]), means, torch.stack([0.5 * cov, 0.5 * cov]))
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    physics = dinv.physics.Inpainting(shape, mask=mask, noise_model=dinv.physics.GaussianNoise(
        NOISE, rng=torch.Generator().manual_seed(1)))
    rows = []
    for label, prior in (("gaussian", gauss), ("mixture", mixture)):
        y = physics(prior.sample(1, torch.Generator().manual_seed(2)).float())
        post = prior.posterior(y, physics, NOISE)
        m, c = post.mean.double().reshape(-1), post.covariance[0]
        prior_mean = torch.einsum("k,kd->d", prior.weights, prior.means)
        scale_m, scale_w = (prior_mean - m).norm(), torch.trace(c).sqrt()

        def stats(means: torch.Tensor, covs: torch.Tensor) -> tuple[float, float, float]:
            err = ((means - m).norm(dim=1) / scale_m).pow(2).mean().sqrt().item()
            cerr = ((covs - c).flatten(1).norm(dim=1) / c.norm()).mean().item()
            w2 = sum(gaussian_w2(mi, ci, m, c) for mi, ci in zip(means, covs)) / len(means) / scale_w.item()
            return err, cerr, w2

        cases = [(steps[0], k) for k in particle_counts] + [(n, max(particle_counts)) for n in steps[1:]]
        for n_steps, k in cases:
            sampler = samplers.SMC(prior, steps=n_steps, particles=k, clip=None)
            system = sampler.weighted(y.repeat(runs, 1, 1, 1), physics, generator=torch.Generator().manual_seed(5))
            ours = stats(system.mean.double().reshape(runs, -1), system.covariance)
            exact = post.sample(k * runs, torch.Generator().manual_seed(6)).double().reshape(runs, k, -1)
            dev = exact - exact.mean(1, keepdim=True)
            floor = stats(exact.mean(1), torch.einsum("rkd,rke->rde", dev, dev) / k)
            trace = (torch.diagonal(system.covariance, dim1=1, dim2=2).sum(1).mean() / torch.trace(c)).item()
            rows.append((label, n_steps, k, *ours, *floor, trace, sampler.last_run.wall_time))
        print(f"done: smc / {label}", flush=True)
    return rows


def latent_rows(n: int) -> list[tuple]:
    """ReSample vs the closed-form posterior of the analytic latent prior (see the module doc)."""
    prior = LatentDiffusionPrior.linear_gaussian((1, 8, 8), factor=2, length_scale=1.0, variance=0.05)
    shape = prior.image_shape
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    kernel = dinv.physics.functional.blur.gaussian_blur(sigma=1.0)
    prior_mean = prior.decode(torch.zeros(1, *prior.latent_shape))
    rows = []
    for op_name in ("inpaint-50", "blur-1"):
        noise = dinv.physics.GaussianNoise(NOISE, rng=torch.Generator().manual_seed(1))
        physics = (dinv.physics.Inpainting(shape, mask=mask, noise_model=noise) if op_name == "inpaint-50"
                   else dinv.physics.BlurFFT(shape, filter=kernel, noise_model=noise))
        y = physics(prior.sample(1, torch.Generator().manual_seed(2)).float())
        post = prior.posterior(y, physics, NOISE)
        exact = post.sample(n, torch.Generator().manual_seed(3)).float()[:, 0:1]
        rows.append((op_name, "exact samples (Monte-Carlo floor)", *scores(exact, post, prior_mean), 0, 0.0))
        for label, kwargs in (("ReSample (defaults, 500 steps)", {}), ("ReSample, 100 steps", dict(steps=100)),
                              ("ReSample, paper DPS rule, 500 steps", dict(weighting="paper")),
                              ("ReSample, 100 steps, no hard consistency",
                               dict(steps=100, consistency_every=10**6, final_consistency=False))):
            sampler = samplers.ReSample(prior, clip=None, **kwargs)
            out = sampler.sample(y, physics, n=n, generator=torch.Generator().manual_seed(4))
            rows.append((op_name, label, *scores(out.samples, post, prior_mean), sampler.last_run.nfe,
                         sampler.last_run.wall_time))
        print(f"done: latent / {op_name}", flush=True)
    return rows


def pixel_rows(n: int) -> list[tuple]:
    rows = []
    for label, prior, physics, y in problems():
        post = prior.posterior(y, physics, NOISE)
        prior_mean = prior_mean_image(prior)
        exact = post.sample(n, torch.Generator().manual_seed(3)).float()[:, 0:1]
        rows.append((label, "exact samples (Monte-Carlo floor)", *scores(exact, post, prior_mean), 0, 0.0))
        for name in samplers.available():
            row = sampler_scores(name, prior, physics, y, n)
            if not math.isnan(row[0]):  # a blind sampler on a problem that is no blur: no row
                rows.append((label, f"invdiff {name}", *row))
        y_rep = y.repeat(n, 1, 1, 1)
        for name, theirs in (
            ("deepinv DPS (defaults, 1000 steps)", dinv.sampling.DPS(prior, dtype=torch.float32)),
            ("deepinv DiffPIR (defaults)", dinv.sampling.DiffPIR(prior, dinv.optim.L2(), sigma=NOISE)),
        ):
            start = time.perf_counter()
            # deepinv seeds the global RNG itself; this is a benchmark script, not library code
            out = theirs(y_rep, physics, seed=5)
            rows.append((label, name, *scores(out[:, None], post, prior_mean), -1, time.perf_counter() - start))
        print(f"done: {label}", flush=True)
    return rows


def print_table(title: str, rows: list[tuple]) -> None:
    print(f"\n{title}")
    print("| problem | sampler | mean err | std ratio | NFE | seconds |\n|---|---|---|---|---|---|")
    for label, name, err, ratio, nfe, sec in rows:
        print(f"| {label} | {name} | {err:.3f} | {ratio:.2f} | {nfe if nfe >= 0 else '-'} | {sec:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="posterior samples per problem")
    parser.add_argument("--runs", type=int, default=32, help="independent SMC particle systems per particle count")
    parser.add_argument("--particles", default="4,16,64,256,1024", help="SMC particle counts")
    parser.add_argument("--smc-steps", default="50,200,800",
                        help="SMC noise levels: the first for every particle count, the others for the largest")
    parser.add_argument("--sections", default="pixel,smc,latent", help="tables to compute: pixel, smc, latent")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", action="store_true", help="also write the output to docs/benchmarks/exactness.md")
    args = parser.parse_args()
    with page("exactness", "Exactness: every sampler against the closed-form posterior", args.docs):
        torch.set_num_threads(args.threads)
        sections = {s.strip() for s in args.sections.split(",") if s.strip()}
        unknown = sections - {"pixel", "smc", "latent"}
        if unknown:
            parser.error(f"unknown sections {sorted(unknown)}")

        if "pixel" in sections:
            print_table(f"Exactness against the closed-form posterior ({args.n} samples, 16x16, noise {NOISE}); "
                        "mean err: 0 is exact; std ratio: 1 is exact", pixel_rows(args.n))
        if "latent" in sections:
            print_table(f"ReSample on the analytic latent problem ({args.n} samples, 8x8 latents -> 16x16 images, "
                        f"noise {NOISE})", latent_rows(args.n))
        if "smc" in sections:
            counts = tuple(int(k) for k in args.particles.split(","))
            rows = smc_rows(args.runs, counts, tuple(int(n) for n in args.smc_steps.split(",")))
            print(f"\nSMC (TDS) weighted particles vs the exact posterior, 4x4, 50 % inpainting, {args.runs} runs per "
                  "row; in brackets: the same statistic of K exact posterior samples; trace: tr(particle cov) / tr(C)")
            print("| prior | steps | K | mean err | cov err | W2 (moments) | trace | seconds |\n"
                  "|---|---|---|---|---|---|---|---|")
            for label, n_steps, k, err, cerr, w2, ferr, fcerr, fw2, trace, sec in rows:
                print(f"| {label} | {n_steps} | {k} | {err:.3f} ({ferr:.3f}) | {cerr:.3f} ({fcerr:.3f}) | "
                      f"{w2:.3f} ({fw2:.3f}) | {trace:.2f} | {sec:.1f} |")


if __name__ == "__main__":
    main()
