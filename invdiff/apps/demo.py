"""``invdiff demo``: reconstruct built-in test problems offline, print a table, write a figure.

:func:`run_demo` (the default ``invdiff demo``) uses the shipped priors: sparse-view CT
(``ct-sparse-30``) on held-out anatomical phantoms with ``ct-phantom-64`` and 4x MRI
(``mri-4x``) on held-out MNI152 slices with ``mri-brain-64``. Each image is measured with
the task's operator (seeded noise), reconstructed with the classical baseline
(``physics.A_dagger``: filtered back-projection, zero-filled inverse FFT) and with every
registered sampler (the mean of a few posterior samples, and their per-pixel std).

:func:`run_analytic_demo` (``invdiff demo --analytic``) runs the same samplers on an
analytic Gaussian prior whose exact posterior is known, next to the exact posterior mean,
the best any sampler can do on average.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..files import atomic_file, atomic_write

__all__ = ["run_demo", "run_analytic_demo", "DEMO_TASKS", "ANALYTIC_TASKS", "DEMO_OVERRIDES", "prior_for_task"]

DEMO_TASKS = ("ct-sparse-30", "mri-4x")
#: what the demo on the shipped priors changes from each sampler's defaults so that it runs in
#: minutes on a CPU (the defaults, 1024 EnKG particles and 16 SMC particles per image, are
#: GPU-sized); printed with the table
DEMO_OVERRIDES = {"enkg": {"ensemble_size": 64}, "smc": {"particles": 4}}
#: latent priors shipped beside a pixel prior, trained on the same data (used by latent samplers)
LATENT_PRIORS = {"ct-phantom-64": "ct-phantom-latent-64"}
ANALYTIC_TASKS = ("ct-sparse-30", "mri-4x", "inpaint-random-70", "deblur-gauss")


def _metrics(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    """Mean PSNR (dB, peak 1) and SSIM over the batch (the benchmark's metrics)."""
    from ..bench.metrics import mean_psnr_ssim

    return mean_psnr_ssim(x_hat, x)


def _save_png_atomic(fig, path: Path) -> None:
    with atomic_file(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")


def run_analytic_demo(
    out: Path = Path("invdiff-demo"),
    size: int = 32,
    steps: int | None = None,
    samples: int = 8,
    device: str = "cpu",
    seed: int = 0,
    verbose: bool = False,
    tasks: tuple[str, ...] = ANALYTIC_TASKS,
    sampler_names: tuple[str, ...] | None = None,
) -> list[dict]:
    """The demo on an analytic Gaussian prior, next to the exact posterior mean; one row
    per (task, sampler) with PSNR/SSIM, seconds and NFE.

    :param steps: overrides every sampler's ``steps`` (each sampler's own default otherwise).
    :param sampler_names: samplers to run (default: all of ``samplers.available()``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import operators, samplers
    from ..priors import GaussianPrior

    if size < 16:
        raise ValueError(f"--size must be at least 16, got {size}")
    names = tuple(sampler_names) if sampler_names else tuple(sorted(samplers.available(), key=lambda n: n != "dps"))
    for name in names:
        samplers.get(name)  # unknown names fail before any work
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    shape = (1, size, size)
    prior = GaussianPrior.stationary(shape, length_scale=size / 12, variance=0.02, mean=0.5).to(dev)
    truth = prior.sample(1, torch.Generator().manual_seed(10_000 + seed)).float()  # held-out seed
    overrides = {} if steps is None else {"steps": steps}
    runners = {name: samplers.make(name, prior, verbose=verbose, **overrides) for name in names}

    print(f"invdiff demo: Gaussian prior {size}x{size} (analytic; exact posterior known), "
          f"samplers {', '.join(names)}, mean of {samples} samples, device {device}")
    rows, panels = [], []
    for task in tasks:
        physics = operators.make(task, img_size=shape, seed=seed)
        y = physics(truth, seed=seed + 1)  # reproducible measurement noise
        start = time.perf_counter()
        baseline = physics.A_dagger(y)
        t_base = time.perf_counter() - start
        noise_sigma = float(getattr(physics.noise_model, "sigma", 0.0))
        exact = prior.posterior(y, physics, noise_sigma) if noise_sigma > 0 else None
        results = {}
        for name, sampler in runners.items():
            post = sampler.sample(y.to(dev), physics.to(dev), n=samples, generator=torch.Generator(dev).manual_seed(seed))
            info = sampler.last_run
            results[name] = post
            rows.append(dict(task=task, sampler=name, psnr_ssim=_metrics(post.mean.cpu(), truth),
                             seconds=info.wall_time, nfe=info.nfe))
        rows.append(dict(task=task, sampler="baseline", psnr_ssim=_metrics(baseline, truth), seconds=t_base, nfe=0))
        if exact is not None:
            rows.append(dict(task=task, sampler="exact", psnr_ssim=_metrics(exact.mean, truth), seconds=0.0, nfe=0))
        panels.append((task, baseline, results, exact))

    columns = ["baseline", *names, "exact"]
    cell = {(r["task"], r["sampler"]): r for r in rows}
    header = "| task | baseline (A_dagger) | " + " | ".join(names) + " | exact posterior mean |"
    lines = [header, "|" + "---|" * (len(columns) + 1)]
    for task in tasks:
        parts = []
        for c in columns:
            r = cell.get((task, c))
            parts.append("n/a" if r is None else f"{r['psnr_ssim'][0]:.2f} / {r['psnr_ssim'][1]:.3f}")
        lines.append(f"| {task} | " + " | ".join(parts) + " |")
    lines.append("")
    lines.append("PSNR (dB) / SSIM of the mean of the samples. Seconds (NFE) per task for all samples: "
                 + "; ".join(f"{n} {sum(r['seconds'] for r in rows if r['sampler'] == n) / len(tasks):.1f} s "
                             f"({cell[(tasks[0], n)]['nfe']})" for n in names))
    table = "\n".join(lines)
    print(table)

    cols = ["ground truth", "baseline"] + [f"{n} mean" for n in names] + [f"{names[0]} std", "exact std"]
    fig, axes = plt.subplots(len(panels), len(cols), figsize=(1.9 * len(cols), 2.0 * len(panels)), squeeze=False)
    for r, (task, baseline, results, exact) in enumerate(panels):
        first = results[names[0]]
        std = first.std.cpu()
        exact_std = exact.std.float() if exact is not None else torch.zeros_like(std)
        imgs = [truth, baseline] + [results[n].mean.cpu() for n in names] + [std, exact_std]
        vmax_std = float(max(std.max(), exact_std.max(), 1e-6))
        for c, img in enumerate(imgs):
            ax = axes[r, c]
            is_std = c >= len(cols) - 2
            ax.imshow(img[0, 0].float().cpu().numpy(), cmap="magma" if is_std else "gray",
                      vmin=0, vmax=vmax_std if is_std else 1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
            label = ("baseline" if c == 1 else names[c - 2]) if 1 <= c < len(cols) - 2 else None
            if label is not None:
                ax.text(1, 1, f"{cell[(task, label)]['psnr_ssim'][0]:.1f} dB", color="yellow", fontsize=7, va="top")
        axes[r, 0].set_ylabel(task, fontsize=8)
    fig.tight_layout()
    _save_png_atomic(fig, out / "demo.png")
    plt.close(fig)
    atomic_write(out / "demo.md", table + "\n", fsync=False)
    print(f"wrote {out / 'demo.png'} and {out / 'demo.md'}")
    return rows


def prior_for_task(task: str, size: int = 64) -> tuple[str, str]:
    """``(shipped prior name, held-out dataset)`` used by the demo for ``task``."""
    from ..operators import task_info

    family = task_info(task).family
    return (f"mri-brain-{size}", "mri-brain") if family == "mri" else (f"ct-phantom-{size}", "ct-phantom")


def run_demo(
    out: Path = Path("invdiff-demo"),
    size: int = 64,
    steps: int | None = None,
    samples: int = 4,
    images: int = 4,
    device: str = "cpu",
    seed: int = 0,
    verbose: bool = False,
    tasks: tuple[str, ...] = DEMO_TASKS,
    sampler_names: tuple[str, ...] | None = None,
) -> list[dict]:
    """Reconstruct held-out images with the shipped priors; print and write a table and a figure.

    :param out: output folder (``demo.md``, ``demo.png``).
    :param size: image side; a shipped prior of that size must exist (64).
    :param steps: overrides every sampler's ``steps`` (default: each sampler's own).
    :param samples: posterior samples per image (their mean is scored; their std is shown).
    :param images: held-out images per task (PSNR/SSIM are averaged over them).
    :param sampler_names: samplers to run (default: all, DPS first).
    :returns: one row per (task, sampler) with mean PSNR, SSIM, seconds and NFE.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import data, operators, priors, samplers

    names = tuple(sampler_names) if sampler_names else tuple(sorted(samplers.available(), key=lambda n: n != "dps"))
    for name in names:
        samplers.get(name)  # unknown names fail before any work
    needed = sorted({prior_for_task(t, size)[0] for t in tasks})
    missing = [n for n in needed if n not in priors.available()]
    if missing:
        raise FileNotFoundError(
            f"no shipped prior {', '.join(missing)} (shipped: {', '.join(priors.available()) or 'none'}); "
            f"use --size 64, or --analytic"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(device)
    overrides = {} if steps is None else {"steps": steps}
    changed = {n: o for n, o in DEMO_OVERRIDES.items() if n in names}
    print(f"invdiff demo: {images} held-out images per task at {size}x{size}, samplers {', '.join(names)}, "
          f"mean of {samples} posterior samples, device {device}"
          + (f"; CPU-sized: {', '.join(f'{n} {o}' for n, o in changed.items())}" if changed else ""))
    rows, panels = [], []
    for task in tasks:
        prior_name, dataset = prior_for_task(task, size)
        prior = priors.load(prior_name, device=dev)
        truth = data.heldout(dataset, images, size=size)
        physics = operators.make(task, img_size=(1, size, size), seed=seed)
        y = physics(truth, seed=seed + 1)  # reproducible measurement noise
        start = time.perf_counter()
        baseline = physics.A_dagger(y).clamp(0, 1)
        rows.append(dict(task=task, sampler="baseline", prior=prior_name, psnr_ssim=_metrics(baseline, truth),
                         seconds=time.perf_counter() - start, nfe=0))
        results = {}
        physics = physics.to(dev)
        latent_name = LATENT_PRIORS.get(prior_name)
        wants_latent = any(samplers.get(n).prior_kind == "latent" for n in names)
        latent = priors.load(latent_name, device=dev) if wants_latent and latent_name in priors.available() else None
        for name in names:
            kind = samplers.get(name).prior_kind
            use = latent if (kind == "latent" and latent is not None) else prior
            sampler = samplers.make(name, use, verbose=verbose, **{**DEMO_OVERRIDES.get(name, {}), **overrides})
            post = sampler.sample(y.to(dev), physics, n=samples, generator=torch.Generator(dev).manual_seed(seed))
            results[name] = post
            rows.append(dict(task=task, sampler=name, prior=latent_name if use is latent else prior_name,
                             psnr_ssim=_metrics(post.mean.cpu(), truth),
                             seconds=sampler.last_run.wall_time, nfe=sampler.last_run.nfe))
            print(f"  {task} {name}: {rows[-1]['psnr_ssim'][0]:.2f} dB ({rows[-1]['seconds']:.1f} s)", flush=True)
        panels.append((task, truth, baseline, results))

    cell = {(r["task"], r["sampler"]): r for r in rows}
    columns = ["baseline", *names]
    lines = ["| task | prior | " + " | ".join(["baseline (A_dagger)", *names]) + " |",
             "|" + "---|" * (len(columns) + 2)]
    for task in tasks:
        parts = [f"{cell[(task, c)]['psnr_ssim'][0]:.2f} / {cell[(task, c)]['psnr_ssim'][1]:.3f}" for c in columns]
        lines.append(f"| {task} | {prior_for_task(task, size)[0]} | " + " | ".join(parts) + " |")
    lines.append("")
    lines.append(f"PSNR (dB) / SSIM of the mean of {samples} samples, averaged over {images} held-out images. "
                 "Seconds (NFE) per task for all images and samples: "
                 + "; ".join(f"{n} {sum(r['seconds'] for r in rows if r['sampler'] == n) / len(tasks):.1f} s "
                             f"({cell[(tasks[0], n)]['nfe']})" for n in names))
    if changed:
        lines.append("CPU-sized settings: " + "; ".join(f"{n} {o}" for n, o in changed.items()))
    latent_rows = sorted({f"{r['sampler']} on {r['prior']}" for r in rows if r["prior"] in LATENT_PRIORS.values()})
    if latent_rows:
        lines.append("Latent prior: " + ", ".join(latent_rows))
    table = "\n".join(lines)
    print(table)

    first = names[0]
    cols = ["ground truth", "baseline"] + [f"{n} mean" for n in names] + [f"|{first} - truth|", f"{first} std"]
    fig, axes = plt.subplots(len(panels), len(cols), figsize=(1.9 * len(cols), 2.0 * len(panels)), squeeze=False)
    for r, (task, truth, baseline, results) in enumerate(panels):
        mean = results[first].mean.cpu()
        err, std = (mean - truth).abs(), results[first].std.cpu()
        vmax_err = float(max(err[0].max(), std[0].max(), 1e-6))
        imgs = [truth, baseline] + [results[n].mean.cpu() for n in names] + [err, std]
        for c, img in enumerate(imgs):
            ax = axes[r, c]
            is_map = c >= len(cols) - 2
            ax.imshow(img[0, 0].float().numpy(), cmap="magma" if is_map else "gray", vmin=0,
                      vmax=vmax_err if is_map else 1)
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(cols[c], fontsize=8)
            if 1 <= c < len(cols) - 2:
                one = _metrics(imgs[c][:1], truth[:1])[0]
                ax.text(1, 1, f"{one:.1f} dB", color="yellow", fontsize=7, va="top")
        axes[r, 0].set_ylabel(task, fontsize=8)
    fig.tight_layout()
    _save_png_atomic(fig, out / "demo.png")
    plt.close(fig)
    md = atomic_write(out / "demo.md", table + "\n", fsync=False)
    print(f"wrote {out / 'demo.png'} and {md}")
    return rows
