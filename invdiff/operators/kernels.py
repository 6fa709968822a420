"""Seeded blur kernels: the kernels of the ``deblur-blind`` task and the training pool of the
shipped kernel prior (``invdiff.data.training("blur-kernels")``).

Three families, in equal thirds, drawn from one seeded ``torch.Generator`` per stream:

* **motion** — deepinv's :class:`~deepinv.physics.generator.MotionBlurGenerator`
  (Gaussian-process camera trajectories, ``l = 0.3``, ``sigma = 0.25``), the kernels of
  BlindDPS (Chung et al., CVPR 2023) and of the blind-deblurring literature;
* **diffraction** — deepinv's :class:`~deepinv.physics.generator.DiffractionBlurGenerator`
  (Zernike aberrations of a circular pupil, cut-off frequency drawn in ``[0.15, 0.35]``);
* **gaussian** — deepinv's :class:`~deepinv.physics.generator.GaussianBlurGenerator`,
  anisotropic, standard deviations in ``[0.5, 3]`` pixels, any angle.

Every kernel is **centred**: its centroid sits at the centre ``((h - 1) / 2, (w - 1) / 2)``
(:func:`centre`, a bilinear sub-pixel shift). A blur kernel and its image are defined only up
to a translation (:math:`k(\\cdot - s) * x(\\cdot + s) = k * x`); fixing the kernel's centroid is
the usual gauge of blind deconvolution (the ``adjust_psf_center`` step of the classical
methods), and the one BlindDPS returns its estimates in.

A kernel ``k`` (non-negative, sum 1) is stored as an image ``k / max(k)`` in ``[0, 1]``;
:func:`to_kernel` maps such an image back (clamped at 0, normalised to sum 1).
Training uses stream 0 and evaluation stream 1, as the phantoms do.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kernels", "to_image", "to_kernel", "centroid", "centre", "FAMILIES", "KERNEL_SIZE"]

#: The kernel families, in the order they are interleaved.
FAMILIES = ("motion", "diffraction", "gaussian")
#: Side of the shipped kernel prior's kernels (a quarter of the 64x64 images, as BlindDPS's 64 of 256).
KERNEL_SIZE = 16


def to_image(k: Tensor) -> Tensor:
    """A kernel ``(..., h, w)`` as an image in ``[0, 1]``: ``k / max(k)`` per kernel."""
    return k / k.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)


def to_kernel(img: Tensor) -> Tensor:
    """An image of a kernel back to a kernel: ``max(img, 0)`` normalised to sum 1 per kernel
    (a uniform kernel where the image is all zero)."""
    k = img.clamp_min(0)
    s = k.sum(dim=(-2, -1), keepdim=True)
    uniform = torch.full_like(k, 1.0 / (k.shape[-1] * k.shape[-2]))
    return torch.where(s > 1e-12, k / s.clamp_min(1e-12), uniform)


def centroid(k: Tensor) -> Tensor:
    """Per kernel ``(B, C, h, w)``, the offset ``(dy, dx)`` ``(B, 2)`` of the centroid of
    ``max(k, 0)`` (summed over channels) from the centre ``((h - 1) / 2, (w - 1) / 2)``."""
    w = k.detach().clamp_min(0).sum(1)
    total = w.sum(dim=(-2, -1)).clamp_min(1e-12)
    h, wd = w.shape[-2:]
    cy = (w.sum(-1) * torch.arange(h, device=k.device, dtype=w.dtype)).sum(-1) / total
    cx = (w.sum(-2) * torch.arange(wd, device=k.device, dtype=w.dtype)).sum(-1) / total
    return torch.stack([cy - (h - 1) / 2, cx - (wd - 1) / 2], 1)


def centre(k: Tensor) -> Tensor:
    """Kernels ``(B, C, h, w)`` (non-negative, sum 1) moved so that each centroid sits at the
    centre: kornia's bilinear ``translate`` by minus :func:`centroid` (a linear interpolation
    moves the centroid by exactly the shift and keeps the kernel non-negative), renormalised;
    repeated (at most four passes) while mass moved off the border leaves the centroid off.

    >>> k = torch.zeros(1, 1, 4, 4); k[0, 0, 0, 1] = 1.0
    >>> centroid(centre(k)).abs().max() < 1e-5
    tensor(True)
    """
    from kornia.geometry.transform import translate

    moved = k
    for _ in range(4):  # further passes for the mass a pass moves off the border
        offset = centroid(moved)
        if float(offset.abs().max()) < 1e-4:
            break
        moved = translate(moved, -offset.flip(1).to(k.dtype), mode="bilinear", padding_mode="zeros",
                          align_corners=True).clamp_min(0)
        moved = moved / moved.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return moved


def kernels(n: int, size: int = KERNEL_SIZE, seed: int = 0, stream: int = 0,
            families: tuple[str, ...] = FAMILIES) -> Tensor:
    """``n`` centred kernels ``(n, 1, size, size)`` (non-negative, each summing to 1), the families
    interleaved (``i``-th kernel from ``families[i % len(families)]``), reproducible from
    ``(seed, stream)``.

    >>> k = kernels(3, 16)
    >>> k.shape, bool(torch.allclose(k.sum((-2, -1)), torch.ones(3, 1)))
    (torch.Size([3, 1, 16, 16]), True)
    """
    from deepinv.physics.generator import DiffractionBlurGenerator, GaussianBlurGenerator, MotionBlurGenerator

    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown kernel families {sorted(unknown)}; available: {', '.join(FAMILIES)}")
    n = int(n)
    rng = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(stream)) % (2**63 - 1))  # any int seed
    psf = (int(size), int(size))
    counts = {f: len(range(i, n, len(families))) for i, f in enumerate(families)}
    drawn: dict[str, Tensor] = {}
    for f, m in counts.items():
        if m == 0:
            continue
        if f == "motion":
            gen = MotionBlurGenerator(psf, rng=rng, l=0.3, sigma=0.25)
            drawn[f] = gen.step(m)["filter"]
        elif f == "diffraction":
            gen = DiffractionBlurGenerator(psf, rng=rng, fc=0.25)
            fc = 0.15 + 0.2 * torch.rand(m, generator=rng)
            drawn[f] = torch.cat([gen.step(1, fc=float(c))["filter"] for c in fc])
        else:
            gen = GaussianBlurGenerator(psf, sigma_min=0.5, sigma_max=3.0, isotropic=False, rng=rng)
            drawn[f] = gen.step(m)["filter"]
    out = torch.empty(n, 1, *psf)
    for i, f in enumerate(families):
        if f in drawn:
            out[i::len(families)] = drawn[f].reshape(-1, 1, *psf).float()
    out = out.clamp_min(0)
    return centre(out / out.sum(dim=(-2, -1), keepdim=True))
