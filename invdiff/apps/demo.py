"""``invdiff demo``: reconstruct built-in test problems offline, print a table, write a figure.

:func:`run_demo` (the default ``invdiff demo``) uses the shipped priors: sparse-view CT
(``ct-sparse-30``) on held-out anatomical phantoms with ``ct-phantom-64`` and 4x MRI
(``mri-4x``) on held-out MNI152 slices with ``mri-brain-64``, as a benchmark grid
(:func:`invdiff.bench.run`, one per task, in ``OUT/bench``): each image is measured with the
task's operator (the cell's seeded noise), reconstructed with the classical baseline
(``physics.A_dagger``: filtered back-projection, zero-filled inverse FFT) and with every
registered sampler (the mean of a few posterior samples, and their per-pixel std), and the
table and figure are drawn from the grid's rows (:mod:`invdiff.bench.report`). Running it
again with the same ``out`` and settings reuses the finished cells.

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
#: minutes on a CPU (the defaults, 1024 EnKG particles, 32 SMC particles per image and PnP-DM's
#: 100-level prior step, are GPU-sized; EnKG's static probes are its lever for a CPU-sized
#: ensemble, see ``invdiff.samplers.EnKG``); printed with the table
DEMO_OVERRIDES = {"enkg": {"ensemble_size": 64, "probes": 512}, "smc": {"particles": 4},
                  "pnpdm": {"diffusion_steps": 20}}
#: latent priors shipped beside a pixel prior, trained on the same data (used by latent samplers)
LATENT_PRIORS = {"ct-phantom-64": "ct-phantom-latent-64"}
ANALYTIC_TASKS = ("ct-sparse-30", "mri-4x", "inpaint-random-70", "deblur-gauss")


def default_samplers() -> tuple[str, ...]:
    """The demos' samplers: every registered one, DPS first, except the blind ones (BlindDPS), which
    take only a blind task (``deblur-blind``, in ``benchmarks/blind_deblur.py``) and no demo task."""
    from .. import samplers

    names = [n for n in samplers.available() if not samplers.get(n).handles_blind]
    return tuple(sorted(names, key=lambda n: n != "dps"))


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
    names = tuple(sampler_names) if sampler_names else default_samplers()
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
            try:
                sampler.check_physics(physics)
            except samplers.IncompatibleError as err:  # e.g. DDRM on CT: no SVD; the table says n/a
                print(f"  {task}: {err}")
                continue
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
                             f"({next(r['nfe'] for r in rows if r['sampler'] == n)})" for n in names
                             if any(r["sampler"] == n for r in rows)))
    table = "\n".join(lines)
    print(table)

    cols = ["ground truth", "baseline"] + [f"{n} mean" for n in names] + [f"{names[0]} std", "exact std"]
    fig, axes = plt.subplots(len(panels), len(cols), figsize=(1.9 * len(cols), 2.0 * len(panels)), squeeze=False)
    for r, (task, baseline, results, exact) in enumerate(panels):
        first = results.get(names[0]) or next(iter(results.values()))
        std = first.std.cpu()
        exact_std = exact.std.float() if exact is not None else torch.zeros_like(std)
        blank = torch.full_like(truth, float("nan"))  # a sampler that cannot use this operator
        imgs = [truth, baseline] + [results[n].mean.cpu() if n in results else blank for n in names] + [std, exact_std]
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
            if label is not None and (task, label) in cell:
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


def _demo_samplers(names: tuple[str, ...], prior_name: str, available: list[str]) -> list[dict]:
    """The bench sampler specs of the demo on ``prior_name``: the baseline, then each sampler with
    its CPU-sized overrides, a latent sampler on the latent prior shipped beside the pixel prior."""
    from .. import samplers

    specs = [{"name": "baseline", "label": "baseline"}]
    for name in names:
        spec = {"name": name, "label": name, **DEMO_OVERRIDES.get(name, {})}
        latent = LATENT_PRIORS.get(prior_name)
        if samplers.get(name).prior_kind == "latent" and latent in available:
            spec["prior"] = latent
        specs.append(spec)
    return specs


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
    progress: bool = False,
    dtype: str | None = None,
    compile: bool = False,
) -> list[dict]:
    """Reconstruct held-out images with the shipped priors; print and write a table and a figure.

    A benchmark grid (:func:`invdiff.bench.run`) per task, on the task's shipped prior, in
    ``out/bench``: the baseline and every sampler, one cell per held-out image scoring the mean
    of ``samples`` posterior samples (PSNR / SSIM as the benchmark computes them; LPIPS off).
    Running again with the same ``out`` and settings reuses the finished cells.

    :param out: output folder (``demo.md``, ``demo.png``; the grid in ``bench/``).
    :param size: image side; a shipped prior of that size must exist (64).
    :param steps: overrides every sampler's ``steps`` (default: each sampler's own).
    :param samples: posterior samples per image (their mean is scored; their std is shown).
    :param images: held-out images per task (PSNR/SSIM are averaged over them).
    :param sampler_names: samplers to run (default: all, DPS first).
    :param progress: show the grid's progress bar.
    :param dtype: precision of the priors' networks (``"bf16"``, ``"fp16"``) and ``compile``:
        ``torch.compile`` them (:func:`invdiff.bench.run`'s; the samplers stay float32).
    :returns: :func:`invdiff.bench.summarize`'s statistics, one dict per (task, sampler),
        the baseline included (``psnr_mean``, ``ssim_mean``, ``wall_time_mean``, ``nfe_mean``...).
    """
    from .. import bench, priors, samplers
    from ..bench.report import summarize, task_table, write_comparison, write_report

    names = tuple(sampler_names) if sampler_names else default_samplers()
    for name in names:
        samplers.get(name)  # unknown names fail before any work
    needed = sorted({prior_for_task(t, size)[0] for t in tasks})
    available = priors.available()
    missing = [n for n in needed if n not in available]
    if missing:
        raise FileNotFoundError(
            f"no shipped prior {', '.join(missing)} (shipped: {', '.join(available) or 'none'}); "
            f"use --size 64, or --analytic"
        )
    out = Path(out)
    folder = out / "bench"
    changed = {n: o for n, o in DEMO_OVERRIDES.items() if n in names}
    print(f"invdiff demo: {images} held-out images per task at {size}x{size}, samplers {', '.join(names)}, "
          f"mean of {samples} posterior samples, device {device}"
          + (f"; CPU-sized: {', '.join(f'{n} {o}' for n, o in changed.items())}" if changed else ""))

    def finished(row: dict) -> None:
        score = f"{row['psnr']:.2f} dB ({row['wall_time']:.1f} s)" if row["status"] == "ok" else row["error"]
        print(f"  {row['task']} {row['sampler']} {row['image']}: {score}", flush=True)

    rows = []
    for task in tasks:  # one grid per task: each task has its own prior and images
        prior_name, dataset = prior_for_task(task, size)
        result = bench.run(
            tasks=[{"name": task, "label": task, "seed": seed}], samplers=_demo_samplers(names, prior_name, available),
            priors=prior_name, images=dataset, n_images=images, seeds=[seed], steps=steps, samples=samples,
            out=folder, device=device, save_recon="figure", figure_images=1, lpips=False, verbose=verbose,
            progress=progress, report=False, on_cell=finished, dtype=dtype, compile=compile,
        )
        if result.skipped:
            print(f"  {task}: {result.skipped} finished cells reused from {folder}")
        rows += result.rows
    write_report(rows, folder, figure_images=1)  # the grid's own summary.md, summary.csv, grid.png
    stats = summarize(rows)
    tables = [s for s in stats if s["sampler"] != "baseline"]
    by_sampler = {n: [s for s in tables if s["sampler"] == n and s["wall_time_mean"] is not None] for n in names}
    lines = [task_table(stats, ["baseline", *names], labels={"baseline": "baseline (A_dagger)"}), ""]
    lines.append(f"PSNR (dB) / SSIM of the mean of {samples} samples, averaged over {images} held-out images "
                 "(MRI over the ground truth's range, as the benchmark). "
                 "Seconds (NFE) per task for all images and samples: "
                 + "; ".join(f"{n} {sum(s['wall_time_mean'] * s['n'] for s in by_sampler[n]) / len(tasks):.1f} s "
                             f"({by_sampler[n][0]['nfe_mean']:.0f})" for n in names if by_sampler[n]))
    if changed:
        lines.append("CPU-sized settings: " + "; ".join(f"{n} {o}" for n, o in changed.items()))
    own = sorted({f"{r['sampler']} on {r['sampler_prior']}" for r in rows if r.get("sampler_prior")})
    if own:
        lines.append("Latent prior: " + ", ".join(own))
    lines.append(f"Cells, seeds and every sampler's parameters: {folder / 'results.jsonl'}")
    table = "\n".join(lines)
    print(table)
    png = write_comparison(rows, folder, out / "demo.png", maps=names[0] if names else None, samplers=["baseline", *names])
    md = atomic_write(out / "demo.md", table + "\n", fsync=False)
    print(f"wrote {png} and {md}")
    return stats
