"""Reconstruction at the data's own size against the resize path, side by side.

:func:`compare_resolutions` measures one set of native-size images three ways, always scored
at the native size against the native truth:

* ``baseline`` — the operator's ``A_dagger`` (FBP, zero-filled IFFT) on the native measurement;
* ``resize`` — the fixed-size path of v1: the image resized (antialiased) to the small prior's
  size, measured there with the same task and noise level, reconstructed there, and the
  reconstruction resized back up (this is what ``invdiff reconstruct --resize`` does);
* ``native`` — the patch prior on the native measurement, at the native size.

Used by ``invdiff demo --native`` and ``benchmarks/resolution.py`` (one implementation).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import Tensor

__all__ = ["compare_resolutions", "NATIVE_DEMO"]

#: ``invdiff demo --native``: (task, native size, patch prior, fixed-size prior, held-out set)
NATIVE_DEMO = (("ct-sparse-60", 256, "ct-phantom-patch-64", "ct-phantom-64", "ct-phantom"),
               ("mri-4x", 256, "mri-brain-patch-64", "mri-brain-64", "mri-brain"))


def compare_resolutions(
    truth: Tensor,
    task: str,
    native_prior,
    small_prior=None,
    sampler: str = "dds",
    *,
    steps: int | None = None,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    noise_sigma: float | None = None,
    device: str | torch.device = "cpu",
    methods: tuple[str, ...] = ("baseline", "resize", "native"),
) -> tuple[list[dict], dict[str, Tensor]]:
    """Score the three paths of the module doc on ``truth`` ``(N, C, H, W)`` in ``[0, 1]``.

    :param native_prior: a prior that works at ``H x W`` (a patch prior).
    :param small_prior: a fixed-size prior for the resize path (skipped when ``None``).
    :param sampler: the sampler of both prior paths (its name, with ``steps`` / ``options``).
    :param seed: operator seed (mask), noise seed ``seed + 1``, sampler seed ``seed + 2``.
    :returns: one row per method (PSNR, SSIM at native size; seconds and NFE per image) and the
        reconstructions by method.
    """
    from .. import operators, samplers
    from ..bench.metrics import mean_psnr_ssim
    from .workflows import resample

    dev = torch.device(device)
    n, c, h, w = truth.shape
    kwargs = dict(options or {})
    if steps is not None:
        kwargs["steps"] = int(steps)
    noise = {} if noise_sigma is None else {"noise_sigma": float(noise_sigma)}
    rows, images = [], {}

    def score(name: str, x_hat: Tensor, seconds: float, nfe: int, prior: str | None, shape) -> None:
        psnr, ssim = mean_psnr_ssim(x_hat.clamp(0, 1).cpu(), truth)
        rows.append(dict(method=name, task=task, size=f"{h}x{w}", prior=prior, sampler=None if name == "baseline"
                         else sampler, reconstructed_at=f"{shape[0]}x{shape[1]}", psnr=psnr, ssim=ssim,
                         seconds_per_image=seconds / n, nfe=nfe))
        images[name] = x_hat.clamp(0, 1).cpu()

    physics = operators.make(task, img_size=(c, h, w), seed=seed, device=dev, **noise)
    y = physics(truth.to(dev), seed=seed + 1)
    if "baseline" in methods:
        start = time.perf_counter()
        with torch.no_grad():
            base = physics.A_dagger(y)
        score("baseline", base, time.perf_counter() - start, 0, None, (h, w))
    if "native" in methods:
        method = samplers.make(sampler, native_prior.to(dev), **kwargs)
        x_hat = method(y, physics, generator=torch.Generator(dev).manual_seed(seed + 2))
        score("native", x_hat, method.last_run.wall_time, method.last_run.nfe, _name(native_prior), (h, w))
    if "resize" in methods and small_prior is not None:
        sh, sw = small_prior.image_shape[1:]
        small_truth = resample(truth, (sh, sw)).clamp(0, 1)
        small_physics = operators.make(task, img_size=(c, sh, sw), seed=seed, device=dev, **noise)
        y_small = small_physics(small_truth.to(dev), seed=seed + 1)
        method = samplers.make(sampler, small_prior.to(dev), **kwargs)
        start = time.perf_counter()
        x_small = method(y_small, small_physics, generator=torch.Generator(dev).manual_seed(seed + 2))
        x_up = resample(x_small.clamp(0, 1).cpu(), (h, w))
        score("resize", x_up, time.perf_counter() - start, method.last_run.nfe, _name(small_prior), (sh, sw))
    return rows, images


def _name(prior) -> str:
    return getattr(prior, "name", None) or type(prior).__name__


def run_native_demo(out, steps: int = 25, sampler: str = "dds", images: int = 1, device: str = "cpu",
                    seed: int = 0, dtype: str | None = None, compile: bool = False) -> list[dict]:
    """``invdiff demo --native``: :data:`NATIVE_DEMO` through :func:`compare_resolutions`; prints
    and writes ``native.md`` and ``native.png`` in ``out`` (``dtype``, ``compile``: how the
    priors' networks run, :func:`invdiff.priors.runtime.accelerate`)."""
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import data, priors
    from ..files import atomic_file, atomic_write

    needed = sorted({name for row in NATIVE_DEMO for name in row[2:4]})
    missing = [p for p in needed if p not in priors.available()]
    if missing:
        raise FileNotFoundError(f"invdiff demo --native needs the shipped priors {', '.join(missing)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"invdiff demo --native: {images} held-out image(s) per task at native size, {sampler} with {steps} steps, "
          f"patch priors at native size against the 64x64 priors with resize, device {device}")
    rows, panels = [], []
    for task, size, patch_name, small_name, dataset in NATIVE_DEMO:
        patch, small = priors.load(patch_name, device=device), priors.load(small_name, device=device)
        if dtype is not None or compile:
            patch.accelerate(dtype=dtype, compile=compile), small.accelerate(dtype=dtype, compile=compile)
        patch.name, small.name = patch_name, small_name
        truth = data.heldout(dataset, images, size=size)
        r, imgs = compare_resolutions(truth, task, patch, small, sampler, steps=steps, seed=seed, device=device)
        rows += r
        panels.append((task, size, truth, imgs))
        for row in r:
            print(f"  {task} {size}x{size} {row['method']:>8}: {row['psnr']:.2f} dB, SSIM {row['ssim']:.3f} "
                  f"({row['seconds_per_image']:.1f} s/image, reconstructed at {row['reconstructed_at']})", flush=True)
    lines = ["| task | size | baseline (A_dagger) | 64x64 prior, resize down and up | patch prior, native |",
             "|---|---|---|---|---|"]
    for task, size, *_ in NATIVE_DEMO:
        cells = {r["method"]: r for r in rows if r["task"] == task}
        lines.append(f"| {task} | {size}x{size} | " + " | ".join(
            f"{cells[m]['psnr']:.2f} / {cells[m]['ssim']:.3f} ({cells[m]['seconds_per_image']:.1f} s)"
            for m in ("baseline", "resize", "native")) + " |")
    lines += ["", f"PSNR (dB) / SSIM at the native size (seconds per image); {sampler}, {steps} steps, "
                  f"{images} held-out image(s) per task."]
    table = "\n".join(lines)
    print(table)
    fig, axes = plt.subplots(len(panels), 4, figsize=(10, 2.6 * len(panels)), squeeze=False)
    for r, (task, size, truth, imgs) in enumerate(panels):
        for ax, (label, img) in zip(axes[r], [("truth", truth)] + [(m, imgs[m]) for m in ("baseline", "resize",
                                                                                            "native")]):
            ax.imshow(img[0, 0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([]), ax.set_yticks([])
            ax.set_title(f"{task} {label}" if label == "truth" else label, fontsize=8)
    fig.tight_layout()
    with atomic_file(out / "native.png", overwrite=True) as tmp:
        fig.savefig(tmp, dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write(out / "native.md", table + "\n", fsync=False)
    print(f"wrote {out / 'native.png'} and {out / 'native.md'}")
    return rows
