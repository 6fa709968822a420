"""Sampler design choices, re-measured: the numbers behind the choices the sampler docstrings state.

Each sampler's docstring says *what* invdiff chose and why (a departure from the paper, a
default); this script measures it on the problems the docstring names and, with ``--docs``,
writes one page per sampler, ``docs/samplers/<name>.md``. The problems are the repository's
own, reused:

* the **analytic demo** (``invdiff demo --analytic``, :func:`invdiff.apps.demo.run_analytic_demo`):
  a smooth 32x32 (or 16x16) Gaussian prior whose exact posterior is known, one held-out draw
  (seed ``10000 + seed``), the tasks ``ct-sparse-30``, ``mri-4x``, ``inpaint-random-70`` and
  ``deblur-gauss`` built by ``operators.make(task, seed=seed)``, scored by the PSNR of the mean
  of the samples next to the exact posterior mean and the classical baseline (``A_dagger``);
* the **exactness problems** of ``benchmarks/exactness.py`` (16x16 Gaussian and Gaussian-mixture
  priors, 50 % inpainting and blur, noise 0.05; 4x4 for SMC; the analytic latent problem for
  ReSample), scored by the mean error and std ratio against the closed-form posterior;
* the **shipped priors** (``ct-phantom-64``, ``ct-phantom-latent-64``) on held-out phantoms,
  where a docstring quotes them.

Run: ``python benchmarks/sampler_choices.py [--sampler daps,enkg] [--docs]``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import time
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `import invdiff`

from _docs import SAMPLER_DOCS, page

import exactness
from invdiff import data, operators, priors, samplers
from invdiff.apps.demo import ANALYTIC_TASKS, _metrics, prior_for_task
from invdiff.priors import GaussianPrior, LatentDiffusionPrior

COMMAND = "python benchmarks/sampler_choices.py --sampler {name} --docs"


# --- the problems (reused from invdiff demo --analytic, benchmarks/exactness.py) -------------
@functools.cache
def demo_problem(task: str, size: int = 32, seed: int = 0):
    """The problem of ``invdiff demo --analytic --size SIZE --seed SEED`` for ``task``, set up as
    :func:`~invdiff.apps.demo.run_analytic_demo` does: ``(prior, truth, physics, y, baseline dB, exact dB, post)``."""
    shape = (1, size, size)
    prior = GaussianPrior.stationary(shape, length_scale=size / 12, variance=0.02, mean=0.5)
    truth = prior.sample(1, torch.Generator().manual_seed(10_000 + seed)).float()
    physics = operators.make(task, img_size=shape, seed=seed)
    y = physics(truth, seed=seed + 1)
    post = prior.posterior(y, physics, float(physics.noise_model.sigma))
    return (prior, truth, physics, y, _metrics(physics.A_dagger(y), truth)[0], _metrics(post.mean, truth)[0], post)


def demo_run(name: str, task: str, n: int = 8, size: int = 32, seed: int = 0, prior=None, **kwargs) -> dict:
    """Sampler ``name`` (``kwargs`` over its defaults) on the demo problem, ``n`` samples, generator
    seed ``seed`` as in the demo: PSNR of the mean and of the first sample, std ratio, seconds."""
    base_prior, truth, physics, y, _, _, post = demo_problem(task, size, seed)
    sampler = samplers.make(name, prior if prior is not None else base_prior, **kwargs)
    out = sampler.sample(y, physics, n=n, generator=torch.Generator().manual_seed(seed))
    ratio = (out.samples.std(0).mean() / post.std.float().mean()).item() if n > 1 else float("nan")
    return dict(mean=_metrics(out.mean, truth)[0], one=_metrics(out.samples[0], truth)[0], ratio=ratio,
                seconds=sampler.last_run.wall_time)


def demo_point(name: str, task: str, size: int = 32, seed: int = 0, **kwargs) -> tuple[float, float]:
    """``(PSNR, seconds)`` of the sampler's point estimate ``sampler(y, physics)`` (EnKG: the ensemble mean)."""
    prior, truth, physics, y, *_ = demo_problem(task, size, seed)
    sampler = samplers.make(name, prior, **kwargs)
    x = sampler(y, physics, generator=torch.Generator().manual_seed(seed))
    return _metrics(x, truth)[0], sampler.last_run.wall_time


def exact_problem(label: str):
    """``(prior, physics, y)`` of the ``benchmarks/exactness.py`` problem ``label`` (e.g. ``"gaussian / blur-1"``)."""
    for name, prior, physics, y in exactness.problems():
        if name == label:
            return prior, physics, y
    raise KeyError(label)


EXACT_LABELS = ("gaussian / inpaint-50", "gaussian / blur-1", "mixture / inpaint-50", "mixture / blur-1")


def exact_run(name: str, label: str, n: int = 32, **kwargs) -> tuple[float, float]:
    """``(mean err, std ratio)`` as ``exactness.sampler_scores`` (no clipping, seed 4), with ``kwargs``."""
    prior, physics, y = exact_problem(label)
    sampler = samplers.make(name, prior, clip=None, **kwargs)
    out = sampler.sample(y, physics, n=n, generator=torch.Generator().manual_seed(4))
    return exactness.scores(out.samples, prior.posterior(y, physics, exactness.NOISE),
                            exactness.prior_mean_image(prior))


def quiet():
    """``benchmarks/exactness.py``'s progress lines to stderr, out of the page."""
    return contextlib.redirect_stdout(sys.stderr)


@contextlib.contextmanager
def exactness_sampler(cls_name: str, **kwargs):
    """Run ``exactness.smc_rows`` / ``latent_rows`` with ``samplers.<cls_name>`` given ``kwargs``."""
    original = exactness.samplers
    exactness.samplers = types.SimpleNamespace(**{cls_name: functools.partial(getattr(samplers, cls_name), **kwargs)})
    try:
        yield
    finally:
        exactness.samplers = original


@functools.cache
def shipped_problem(task: str, images: int = 2, size: int = 64, latent: bool = False):
    """Held-out images of the demo on the shipped priors (``invdiff demo``):
    ``(prior, truth, physics, y, baseline dB)``."""
    prior_name, dataset = prior_for_task(task, size)
    prior = priors.load("ct-phantom-latent-64" if latent else prior_name)
    truth = data.heldout(dataset, images, size=size)
    physics = operators.make(task, img_size=(1, size, size), seed=0)
    y = physics(truth, seed=1)
    return prior, truth, physics, y, _metrics(physics.A_dagger(y).clamp(0, 1), truth)[0]


def per_image_psnr(x: torch.Tensor, truth: torch.Tensor) -> list[float]:
    return [_metrics(x[i:i + 1], truth[i:i + 1])[0] for i in range(len(truth))]


def table(header: tuple[str, ...], rows: list[tuple]) -> None:
    def cell(v, column: str) -> str:
        if not isinstance(v, float):
            return str(v)
        if "seconds" in column:
            return f"{v:.1f}"
        text = f"{v:.4g}"
        return text if "." in text or "e" in text or "n" in text else text + ".0"

    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(cell(v, c) for v, c in zip(r, header)) + " |")
    print()


def section(title: str, text: str) -> None:
    print(f"\n## {title}\n\n{text}\n", flush=True)


def ref_row(task: str, size: int = 32, seed: int = 0) -> str:
    _, _, _, _, base, exact, _ = demo_problem(task, size, seed)
    return f"exact posterior mean {exact:.1f} dB, baseline (A_dagger) {base:.1f} dB"


# --- per sampler ------------------------------------------------------------------------------
def daps() -> None:
    section("Scale-aware Langevin step, no decay",
            "On CT the official step decay (to 1 % of the curvature bound) stops moving the Langevin chain in "
            "the weakly measured directions; invdiff's default keeps the full step (c0 = 1, no decay). "
            f"32x32 CT demo (ct-sparse-30), one sample, defaults otherwise; {ref_row('ct-sparse-30')}.")
    rows = []
    for c0, rho in ((0.5, 0.01), (1.0, 0.01), (1.0, 1.0)):
        for smin in (0.05, 0.01):
            r = demo_run("daps", "ct-sparse-30", n=1, step_scale=c0, lr_min_ratio=rho, sigma_min=smin)
            rows.append((c0, rho, smin, round(r["one"], 1), r["seconds"]))
    table(("step_scale c0", "lr_min_ratio", "sigma_min", "PSNR (dB)", "seconds"), rows)

    section("Final level 0.01, not 0.05",
            "The last level's r = sigma is left as noise where the measurement does not see: a final level of "
            "0.05 (the paper's 0.1 on [-1, 1]) costs a single sample most where the measurement sees least "
            "(inpainting); invdiff ends at 0.01. One sample per task, 32x32 demo, defaults otherwise.")
    rows = []
    for task in ANALYTIC_TASKS:
        a, b = (demo_run("daps", task, n=1, sigma_min=s)["one"] for s in (0.05, 0.01))
        rows.append((task, round(a, 1), round(b, 1), round(demo_problem(task)[5], 1)))
    table(("task", "sigma_min 0.05", "sigma_min 0.01 (default)", "exact posterior mean"), rows)

    section("Samples, not a point estimate",
            "DAPS draws samples: one sample is a few dB below the posterior mean (as an exact posterior sample "
            "is), so compare the mean of samples with the baselines. Where the prior does most of the work "
            "(inpainting, deblurring) the samples are over-dispersed (the isotropic N(x0_hat, sigma^2 I) "
            "approximation ignores how much the prior shrinks). 32x32 demo, defaults (250 NFE), 8 samples; "
            "std ratio = mean per-pixel std of the samples / that of the exact posterior.")
    rows = []
    for task in ANALYTIC_TASKS:
        r = demo_run("daps", task, n=8)
        _, _, _, _, base, exact, _ = demo_problem(task)
        rows.append((task, round(r["mean"], 1), round(r["one"], 1), round(exact, 1), round(base, 1),
                     round(r["ratio"], 2), r["seconds"]))
    table(("task", "mean of 8 (dB)", "one sample (dB)", "exact posterior mean", "baseline", "std ratio", "seconds"),
          rows)


def diffpir() -> None:
    section("zeta = 1 for inpainting",
            "The default (lambda 7, zeta 0.3) is the paper's Gaussian-deblurring setting; for inpainting the "
            "official scripts' zeta = 1 is closer to the posterior. 16x16 Gaussian problems of "
            "benchmarks/exactness.py, 32 samples, 100 steps; mean err = ||mean - exact mean|| / ||prior mean - "
            "exact mean|| (0 is exact), std ratio 1 is exact.")
    rows = []
    for label in ("gaussian / inpaint-50", "gaussian / blur-1"):
        for kw in ({}, dict(zeta=1.0)):
            err, ratio = exact_run("diffpir", label, **kw)
            rows.append((label, "defaults" if not kw else "zeta=1", round(err, 3), round(ratio, 2)))
    table(("problem", "setting", "mean err", "std ratio"), rows)


def dps() -> None:
    section("The likelihood step rule",
            "weighting='likelihood' (the Gaussian likelihood with the PiGDM error covariance, reverse-SDE step) "
            "is invariant to the scale of A and of y; the official rule (weighting='paper', the norm of the "
            "residual) is not. 32x32 demo, 200 steps, mean of 8 samples.")
    rows = []
    for task in ("ct-sparse-30", "deblur-gauss"):
        _, _, _, _, base, exact, _ = demo_problem(task)
        cells = [demo_run("dps", task, **kw)["mean"] for kw in
                 ({}, dict(weighting="paper"), dict(weighting="paper", zeta=0.3))]
        rows.append((task, *(round(c, 1) for c in cells), round(exact, 1), round(base, 1)))
    table(("task", "likelihood (default)", "paper, zeta 1", "paper, zeta 0.3", "exact posterior mean", "baseline"),
          rows)


def enkg() -> None:
    section("Ancestral steps (eta = 1), not the probability-flow ODE",
            "Along the deterministic ODE the span of the ensemble's anomalies only turns slowly, so an ensemble "
            "smaller than the image dimension collapses around a biased mean; ancestral steps draw fresh noise, "
            "a new span at every level. 40 steps, 1024 particles; PSNR of the ensemble mean "
            "(sampler(y, physics)) on the CT demo (ct-sparse-30) at 32x32 (d = 1024 = J) and 16x16.")
    rows = []
    for size in (32, 16):
        a, b = (demo_point("enkg", "ct-sparse-30", size=size, steps=40, eta=eta)[0] for eta in (1.0, 0.0))
        _, _, _, _, base, exact, _ = demo_problem("ct-sparse-30", size)
        rows.append((f"{size}x{size}", round(a, 1), round(b, 1), round(exact, 1), round(base, 1)))
    table(("size", "eta=1 (default)", "eta=0", "exact posterior mean", "FBP"), rows)

    print("Against the exact posterior (benchmarks/exactness.py problems, 16x16, 40 steps, 1024 particles, "
          "32 samples):\n")
    rows = []
    for label in EXACT_LABELS:
        (e1, r1), (e0, r0) = (exact_run("enkg", label, steps=40, eta=eta) for eta in (1.0, 0.0))
        rows.append((label, round(e1, 3), round(r1, 2), round(e0, 3), round(r0, 2)))
    table(("problem", "mean err, eta=1", "std ratio, eta=1", "mean err, eta=0", "std ratio, eta=0"), rows)

    prior, truth, physics, y, base = shipped_problem("ct-sparse-30")
    print("With the shipped ct-phantom-64 prior (64x64, two held-out phantoms, ct-sparse-30, 25 steps; PSNR "
          "of the ensemble mean, averaged over the phantoms):\n")
    rows = []
    for members, eta in ((32, 1.0), (32, 0.0), (64, 1.0)):
        sampler = samplers.EnKG(prior, steps=25, ensemble_size=members, eta=eta)
        x = sampler(y, physics, generator=torch.Generator().manual_seed(0))
        rows.append((members, eta, round(_metrics(x, truth)[0], 1), round(base, 1), sampler.last_run.wall_time))
    table(("particles", "eta", "PSNR (dB)", "FBP", "seconds"), rows)

    section("Cost, and the static probes for CPU-sized ensembles",
            "The run time is the network's: particles x steps evaluations (one per particle and level). With an "
            "ensemble far below the image dimension (64x64 = 4096) the Kalman update moves the particles within "
            "the J - 1 directions of their anomalies, and the PSNR grows with the evaluations spent, whatever their "
            "split between particles and steps. Static probes (probes = M, probe_weight w = 0.8) add M members "
            "drawn from a scalar-variance model of the denoiser, seen through A only (derivative-free; M operator "
            "calls per level, no network call), to the gain of the ensemble mean. Shipped ct-phantom-64, "
            "ct-sparse-30, two held-out phantoms, ensemble mean.")
    prior, truth, physics, y, base = shipped_problem("ct-sparse-30")
    rows = []
    for members, n_steps, probes in ((32, 50, 0), (64, 25, 0), (128, 12, 0), (64, 50, 0), (128, 25, 0),
                                     (32, 50, 512), (64, 25, 1024), (32, 100, 512)):
        sampler = samplers.EnKG(prior, steps=n_steps, ensemble_size=members, probes=probes)
        x = sampler(y, physics, generator=torch.Generator().manual_seed(0))
        rows.append((members, n_steps, probes, members * n_steps, round(_metrics(x, truth)[0], 2), round(base, 2),
                     sampler.last_run.wall_time))
    table(("particles", "steps", "probes", "network evaluations per image", "PSNR (dB)", "FBP", "seconds (2 images)"),
          rows)
    print("The probes model the denoiser's error as white, so they bias a posterior with correlated pixels: on "
          "the exact problems (benchmarks/exactness.py, 16x16, 40 steps, 1024 particles, 32 samples) they move "
          "the mean away from the exact one and widen the spread, which is why they are off by default:\n")
    rows = []
    for label in EXACT_LABELS:
        (e1, r1), (e0, r0) = (exact_run("enkg", label, steps=40, probes=m) for m in (0, 256))
        rows.append((label, round(e1, 3), round(r1, 2), round(e0, 3), round(r0, 2)))
    table(("problem", "mean err, no probes (default)", "std ratio", "mean err, 256 probes", "std ratio, 256 probes"),
          rows)

    section("Tempering shares",
            "The likelihood is split over the levels with shares that grow as the forecast resolves the signal "
            "(tempering_power p = 4); with eta = 1 the shares matter less than with eta = 0. 32x32 CT demo, 40 "
            "steps, 1024 particles, ensemble mean.")
    rows = [(p, eta, round(demo_point("enkg", "ct-sparse-30", steps=40, eta=eta, tempering_power=p)[0], 1))
            for eta, p in ((1.0, 0.0), (1.0, 1.0), (1.0, 4.0), (0.0, 1.0), (0.0, 4.0))]
    table(("tempering_power p", "eta", "PSNR (dB)"), rows)


def mcg() -> None:
    section("Tikhonov-relaxed projection for noisy measurements",
            "A hard projection onto a noisy y copies its noise into the image (and, for blur, amplifies it "
            "through A^+); the relaxed projection is hard while the diffusion noise dominates and vanishes as "
            "it falls. Both project away the samples' spread in the measured subspace (std ratio < 1). "
            "benchmarks/exactness.py problems (16x16, s = 0.05), defaults (200 steps), 32 samples.")
    rows = []
    for label in EXACT_LABELS:
        (e1, r1), (e0, r0) = (exact_run("mcg", label, relax=relax) for relax in (True, False))
        rows.append((label, round(e1, 3), round(r1, 2), round(e0, 3), round(r0, 2)))
    table(("problem", "mean err, relaxed (default)", "std ratio, relaxed", "mean err, hard", "std ratio, hard"),
          rows)

    section("10 CG iterations per projection",
            f"More CG iterations cost time without improving the result. 32x32 CT demo, 100 steps, mean of 8 "
            f"samples; {ref_row('ct-sparse-30')}.")
    rows = []
    for it in (5, 10, 50):
        r = demo_run("mcg", "ct-sparse-30", steps=100, projection_iterations=it)
        rows.append((it, round(r["mean"], 1), r["seconds"]))
    table(("projection_iterations", "PSNR (dB)", "seconds"), rows)


def reddiff() -> None:
    section("lambda = 0.05, not 0.25",
            "With the likelihood data term the paper's lambda = 0.25 over-regularises; 0.01 is better for "
            "deblurring only. 32x32 demo, one run per task (RED-Diff is an optimiser, not a sampler), 100 steps.")
    rows = []
    for task in ANALYTIC_TASKS:
        _, _, _, _, base, exact, _ = demo_problem(task)
        cells = [demo_run("reddiff", task, n=1, lam=lam)["one"] for lam in (0.25, 0.05, 0.01)]
        rows.append((task, *(round(c, 1) for c in cells), round(exact, 1), round(base, 1)))
    table(("task", "lam 0.25 (paper)", "lam 0.05 (default)", "lam 0.01", "exact posterior mean", "baseline"), rows)

    section("Learning rate 0.05 (the paper's 0.1 on [-1, 1])",
            "A point estimate, below the exact posterior mean; a smaller learning rate slows inpainting, whose "
            "unobserved pixels must travel from 0, and no longer helps CT (it did before the data term was "
            "divided by the operator's gain, when Adam's step was set by CT's large data gradient). "
            "Same problems, one run, 100 steps.")
    rows = []
    for task in ANALYTIC_TASKS:
        a, b = (demo_run("reddiff", task, n=1, lr=lr) for lr in (0.05, 0.02))
        rows.append((task, round(a["one"], 1), round(b["one"], 1), a["seconds"]))
    table(("task", "lr 0.05 (default)", "lr 0.02", "seconds (default)"), rows)


class _OpaqueIdentity(torch.nn.Module):
    """The identity autoencoder that ReSample does not recognise as one: its last third then runs
    the latent-space Adam (the behaviour before departure (e))."""

    def __init__(self, shape):
        super().__init__()
        self.image_shape = self.latent_shape = tuple(shape)

    def encode(self, x):
        return x

    def decode(self, z):
        return z


def resample(full: bool) -> None:
    steps = 100
    section("Early stopping at the discrepancy principle, tau = 1 + 3 sqrt(2/m)",
            "Stopping at the expected noise energy (tau = 1) fits the noise half of the time; the three-sigma "
            f"bound of the chi^2 noise energy does not. 32x32 Gaussian-prior demo (pixel prior, identity "
            f"autoencoder), {steps} steps, mean of 8 samples, the demo's images for seed 0 and seed 1.")
    rows = []
    for task in ANALYTIC_TASKS:
        cells = []
        for tau in (1.0, None, 1.5):
            cells.append(" / ".join(f"{demo_run('resample', task, seed=s, steps=steps, discrepancy=tau)['mean']:.1f}"
                                    for s in (0, 1)))
        base = " / ".join(f"{demo_problem(task, seed=s)[4]:.1f}" for s in (0, 1))
        rows.append((task, *cells, base))
    table(("task", "tau = 1", "default", "tau = 1.5", "baseline"), rows)

    latent_steps = 500 if full else 100
    print(f"With the shipped ct-phantom-latent-64 prior (two held-out phantoms, {latent_steps} steps"
          + ("" if full else "; the default is 500, cut for CPU time, --full runs it")
          + "; mean PSNR of one sample):\n")
    rows = []
    for task in ("deblur-gauss", "ct-sparse-30"):
        prior, truth, physics, y, base = shipped_problem(task, latent=True)
        cells = []
        for tau in (1.0, None):
            sampler = samplers.ReSample(prior, steps=latent_steps, discrepancy=tau)
            x = sampler(y, physics, generator=torch.Generator().manual_seed(0))
            cells.append(_metrics(x, truth)[0])
        rows.append((task, round(cells[0], 1), round(cells[1], 1), round(base, 1)))
    table(("task", "tau = 1", "default", "baseline (A_dagger)"), rows)

    print("The analytic latent problem of benchmarks/exactness.py (8x8 latents -> 16x16 images, defaults, 500 "
          "steps, 32 samples):\n")
    rows = []
    for tau in (None, 1.0):
        with exactness_sampler("ReSample", discrepancy=tau), quiet():
            found = [r for r in exactness.latent_rows(32) if r[1] == "ReSample (defaults, 500 steps)"]
        rows += [(op, "default" if tau is None else "tau = 1", round(err, 3), round(ratio, 2))
                 for op, _, err, ratio, _, _ in found]
    table(("problem", "tau", "mean err", "std ratio"), rows)

    section("A pixel prior: CGLS in both thirds",
            "With the identity autoencoder the latent problem is the pixel one, and invdiff solves it by CGLS in "
            "both thirds (the official code: Adam in the last third), a Krylov method that regularises by early "
            "stopping. With the discrepancy rule Adam stops early too and the two agree here; with tau = 1 both "
            "fit the noise of one of the two images. 32x32 deblurring demo "
            f"(deblur-gauss), {steps} steps, mean of 8 samples, the demo's images for seed 0 / seed 1 "
            "(baseline " + " / ".join(f"{demo_problem('deblur-gauss', seed=s)[4]:.1f}" for s in (0, 1)) + ", exact "
            "posterior mean " + " / ".join(f"{demo_problem('deblur-gauss', seed=s)[5]:.1f}" for s in (0, 1)) + ").")
    pixel = demo_problem("deblur-gauss")[0]
    opaque = LatentDiffusionPrior(_OpaqueIdentity(pixel.image_shape), pixel, pixel.image_shape)
    rows = []
    for label, prior in (("Adam in the last third", opaque), ("CGLS (default)", None)):
        cells = []
        for tau in (None, 1.0):
            runs = (demo_run("resample", "deblur-gauss", seed=s, steps=steps, prior=prior, discrepancy=tau)
                    for s in (0, 1))
            cells.append(" / ".join(f"{r['mean']:.1f}" for r in runs))
        rows.append((label, *cells))
    table(("last-third solver", "default tau", "tau = 1"), rows)


def smc() -> None:
    counts = (4, 16, 64, 256, 1024)
    section("Asymptotic exactness",
            "The error of a weighted-particle estimate falls as K^-1/2 down to a floor set by the number of "
            "steps (the chain's under-dispersion). benchmarks/exactness.py's SMC table: 4x4, 50 % inpainting, "
            "noise 0.05, 32 independent systems per row; in brackets the same statistic of K exact samples; "
            "trace = tr(particle covariance) / tr(exact).")
    with quiet():
        rows = exactness.smc_rows(32, counts, (50, 200, 800))
    table(("prior", "steps", "K", "mean err", "cov err", "W2 (moments)", "trace", "seconds"),
          [(label, n, k, f"{e:.3f} ({fe:.3f})", f"{c:.3f} ({fc:.3f})", f"{w:.3f} ({fw:.3f})", f"{t:.2f}", f"{s:.1f}")
           for label, n, k, e, c, w, fe, fc, fw, t, s in rows])
    default = {(r[0], r[2]): r[3] for r in rows if r[1] == 50}

    section("Twist variance and adaptive resampling",
            "The PiGDM twist variance (default) is bounded at high noise, where the diffusion variance "
            "(twist='tds', the official default) makes the twist flat; adaptive resampling (ESS < K/2) keeps more "
            "distinct paths than resampling at every step (ess_threshold=1, the official code). Mean err of the "
            "weighted mean, same problems, 50 steps, 32 systems.")
    out = []
    for label, kwargs in (("twist='tds'", dict(twist="tds")), ("ess_threshold=1", dict(ess_threshold=1.0))):
        with exactness_sampler("SMC", **kwargs), quiet():
            variant = exactness.smc_rows(32, (16, 64), (50,))
        for r in variant:
            out.append((r[0], r[2], f"{default[(r[0], r[2])]:.3f}", label, f"{r[3]:.3f}"))
    table(("prior", "K", "default", "variant", "variant mean err"), out)


def latent_inpainting_problem():
    """The analytic latent problem (``benchmarks/exactness.py``'s latent section, ``tests/test_psld.py``):
    ``(prior, physics, y)``, 8x8 Gaussian latents -> 16x16 images, 50 % inpainting, noise 0.05."""
    import deepinv as dinv

    prior = LatentDiffusionPrior.linear_gaussian((1, 8, 8), factor=2, length_scale=1.0, variance=0.05)
    mask = (torch.rand(prior.image_shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    physics = dinv.physics.Inpainting(prior.image_shape, mask=mask, noise_model=dinv.physics.GaussianNoise(
        exactness.NOISE, rng=torch.Generator().manual_seed(1)))
    return prior, physics, physics(prior.sample(1, torch.Generator().manual_seed(2)).float())


def psld() -> None:
    steps = 100
    official = dict(weighting="paper", gamma=0.1, eta=0.0)
    section("The step rule",
            "The official step (weighting='paper': omega ||r|| + gamma ||g||, norms, subtracted as they are, tuned "
            "to Stable Diffusion's 1000 steps and unit-scale latents; here with the official gamma 0.1 and eta 0) "
            "against the default likelihood rule (both terms as Gaussian log-densities with the DDIM step's score "
            f"weight). Exactness problems (pixel priors through the identity autoencoder), {steps} steps, 32 samples.")
    rows = []
    for label in EXACT_LABELS:
        (e0, r0), (e1, r1) = (exact_run("psld", label, steps=steps, **kw) for kw in ({}, official))
        rows.append((label, round(e0, 3), round(r0, 2), round(e1, 3), round(r1, 2)))
    table(("problem", "default mean err", "default std ratio", "official mean err", "official std ratio"), rows)
    print("The analytic demo's CT (16x16, 40 steps, mean of 2 samples, as tests/test_cli.py; "
          f"{ref_row('ct-sparse-30', 16)}; the test needs exact - 8 dB):\n")
    table(("rule", "PSNR"), [(label, round(demo_run("psld", "ct-sparse-30", n=2, size=16, steps=40, **kw)["mean"], 1))
                             for label, kw in (("default", {}), ("official", official))])

    section("The DDIM step: eta 1 (default; the paper: 0)",
            f"Same problems, {steps} steps, 32 samples, the default rule; eta 0 with the paper's gamma 0.1.")
    rows = []
    for label in EXACT_LABELS:
        (e0, r0), (e1, r1) = (exact_run("psld", label, steps=steps, **kw) for kw in ({}, dict(eta=0.0, gamma=0.1)))
        rows.append((label, round(e0, 3), round(r0, 2), round(e1, 3), round(r1, 2)))
    table(("problem", "default mean err", "default std ratio", "eta 0 mean err", "eta 0 std ratio"), rows)

    section("The gluing weight: gamma 1 (default; the paper: 0.1)",
            "With a learned autoencoder the gluing term matters. ct-sparse-30 and deblur-gauss with the shipped "
            f"ct-phantom-latent-64 prior, two held-out phantoms, {steps} steps, PSNR of one sample:")
    rows = []
    for task in ("ct-sparse-30", "deblur-gauss"):
        prior, truth, physics, y, base = shipped_problem(task, latent=True)
        cells = []
        for gamma in (0.0, 0.1, 1.0, 3.0):
            x = samplers.PSLD(prior, steps=steps, gamma=gamma)(y, physics, generator=torch.Generator().manual_seed(2))
            cells.append(round(_metrics(x, truth)[0], 2))
        rows.append((task, *cells, round(base, 1)))
    table(("task", "gamma 0", "gamma 0.1", "gamma 1", "gamma 3", "baseline (A_dagger)"), rows)
    print("The analytic latent problem of tests/test_psld.py (8x8 latents -> 16x16 images, 50 % inpainting, "
          f"{steps} steps, 16 samples):\n")
    prior, physics, y = latent_inpainting_problem()
    post = prior.posterior(y, physics, 0.05)
    mean0 = prior.decode(torch.zeros(1, *prior.latent_shape))
    rows = []
    for label, kw in (("gamma 0", dict(gamma=0.0)), ("gamma 0.1", dict(gamma=0.1)), ("gamma 1 (default)", {}),
                      ("official rule", official)):
        out = samplers.PSLD(prior, steps=steps, clip=None, **kw).sample(y, physics, n=16,
                                                                       generator=torch.Generator().manual_seed(4))
        rows.append((label, *(round(v, 3) for v in exactness.scores(out.samples, post, mean0))))
    table(("variant", "mean err", "std ratio"), rows)

    section("The number of steps: 200 (default; the paper: 1000)",
            "The likelihood rule does not depend on the number of steps. ct-sparse-30 with ct-phantom-latent-64, "
            "two held-out phantoms, PSNR of one sample and seconds per image:")
    prior, truth, physics, y, base = shipped_problem("ct-sparse-30", latent=True)
    rows = []
    for n_steps in (50, 100, 200):
        sampler = samplers.PSLD(prior, steps=n_steps)
        x = sampler(y, physics, generator=torch.Generator().manual_seed(2))
        rows.append((n_steps, round(_metrics(x, truth)[0], 2), sampler.last_run.wall_time / len(truth)))
    table(("steps", "PSNR", "seconds"), rows)


SAMPLERS = {
    "daps": ("DAPS", daps), "diffpir": ("DiffPIR", diffpir), "dps": ("DPS", dps), "enkg": ("EnKG", enkg),
    "mcg": ("MCG", mcg), "reddiff": ("RED-Diff", reddiff), "resample": ("ReSample", resample),
    "smc": ("SMC (TDS)", smc), "psld": ("PSLD", psld),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sampler", default=",".join(SAMPLERS), help="comma-separated samplers to measure")
    parser.add_argument("--full", action="store_true",
                        help="ReSample on the shipped latent prior at its default 500 steps (100 otherwise)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--docs", action="store_true", help="also write docs/samplers/<name>.md for each sampler")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = [s.strip() for s in args.sampler.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SAMPLERS))
    if unknown:
        parser.error(f"unknown samplers {unknown}; known: {', '.join(SAMPLERS)}")
    for name in names:
        title, run = SAMPLERS[name]
        command = COMMAND.format(name=name) + (" --full" if args.full and name == "resample" else "")
        start = time.perf_counter()
        with page(name, f"{title}: design choices, measured", args.docs, folder=SAMPLER_DOCS, command=command):
            print(f"The numbers behind the design choices stated in the docstring of `invdiff.samplers.{name}`. "
                  "PSNR in dB (peak 1); problems and metrics: `benchmarks/sampler_choices.py`.")
            run(args.full) if name == "resample" else run()
            print(f"Run time: {time.perf_counter() - start:.0f} s.")


if __name__ == "__main__":
    main()
