"""``invdiff demo``: reconstruct built-in test problems offline, print a table, write a figure.

Until the shipped CT / MRI priors exist, the demo runs on an analytic prior whose exact
posterior is known: a smooth stationary Gaussian image prior. Ground-truth images are
drawn from it with held-out seeds, measured with each task's operator, and reconstructed
with the classical baseline (``physics.A_dagger``: FBP, zero-filled IFFT, Wiener, ...),
with every registered sampler (the mean of a few posterior samples, and their per-pixel
std), and with the
exact posterior mean, the best any sampler can do on average.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["run_demo", "DEMO_TASKS"]

DEMO_TASKS = ("ct-sparse-30", "mri-4x", "inpaint-random-70", "deblur-gauss")


def _metrics(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    from deepinv.loss.metric import PSNR, SSIM

    x_hat = x_hat.float().clamp(0, 1)
    return float(PSNR(max_pixel=1.0)(x_hat, x.float())), float(SSIM(max_pixel=1.0)(x_hat, x.float()))


def _save_png_atomic(fig, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def run_demo(
    out: Path = Path("invdiff-demo"),
    size: int = 32,
    steps: int | None = None,
    samples: int = 8,
    device: str = "cpu",
    seed: int = 0,
    verbose: bool = False,
    tasks: tuple[str, ...] = DEMO_TASKS,
    sampler_names: tuple[str, ...] | None = None,
) -> list[dict]:
    """Run the demo; return one row per (task, sampler) with PSNR/SSIM, seconds and NFE.

    :param steps: overrides every sampler's ``steps`` (each sampler's own default otherwise).
    :param sampler_names: samplers to run (default: all of ``samplers.available()``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from . import operators, samplers
    from .priors import GaussianPrior

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
    (out / "demo.md").write_text(table + "\n")
    print(f"wrote {out / 'demo.png'} and {out / 'demo.md'}")
    return rows
