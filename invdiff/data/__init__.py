"""Built-in images that need no download: CT phantoms and MNI152 brain slices.

* :func:`invdiff.data.phantoms.ct` — procedural anatomical CT slices (HU window
  ``[-1000, 1000]`` mapped to ``[0, 1]``);
* :func:`invdiff.data.mni.slices` — slices of the MNI152 T1 template shipped by nilearn
  (optional extra ``invdiff[train]``), and :func:`invdiff.data.mni.randomised`, domain-
  randomised slices of it (random planes, tissue contrasts, deformations, bias, noise);
* :func:`invdiff.operators.kernels.kernels` — seeded motion, diffraction and Gaussian blur
  kernels (deepinv's generators), the pool of the kernel prior ``blur-kernel-16``;
* :func:`training` and :func:`heldout` — the exact training pools and held-out evaluation
  images of the shipped priors ``ct-phantom-64``, ``mri-brain-64`` and ``blur-kernel-16``.
"""

from __future__ import annotations

import torch

from ..operators import kernels
from . import mni, phantoms

__all__ = ["phantoms", "mni", "heldout", "training", "DATASETS", "HELDOUT_SEED", "TRAIN_SEED"]

#: Names accepted by :func:`heldout` and :func:`training`.
DATASETS = ("ct-phantom", "mri-brain", "mri-brain-synth", "mri-brain-coronal-synth", "blur-kernels")
#: Seed of the phantom streams; training uses stream 0, evaluation stream 1.
TRAIN_SEED = 0
HELDOUT_SEED = 0
_HELDOUT_STREAM = 1


def heldout(name: str, n: int | None = None, size: int = 64) -> torch.Tensor:
    """Held-out evaluation images, never trained on: ``(n, 1, size, size)`` in ``[0, 1]``.

    :param name: ``"ct-phantom"`` (phantom stream 1; training uses stream 0) or
        ``"mri-brain"`` (the 16 held-out MNI slices of :data:`invdiff.data.mni.HELDOUT`).
    :param n: how many (default: 16; every one for ``mri-brain-coronal-synth``, the 5
        coronal held-out slices). ``mri-brain`` has 16 held-out slices; more is an error.
    :param size: image side.

    >>> heldout("ct-phantom", 2, size=32).shape
    torch.Size([2, 1, 32, 32])
    """
    if name == "mri-brain-coronal-synth":
        x = mni.slices("heldout", size, orientations=("coronal",))
        if n is not None and n > len(x):
            raise ValueError(f"{name} has {len(x)} held-out coronal slices; asked for {n}")
        return x if n is None else x[: int(n)]
    n = 16 if n is None else int(n)
    if name == "blur-kernels":  # kernels as images k / max(k), stream 1
        return kernels.to_image(kernels.kernels(n, size, HELDOUT_SEED, stream=_HELDOUT_STREAM))
    if name == "ct-phantom":
        return phantoms.ct(n, size, HELDOUT_SEED, stream=_HELDOUT_STREAM)
    if name in ("mri-brain", "mri-brain-synth"):
        x = mni.slices("heldout", size)
        if n > len(x):
            raise ValueError(f"mri-brain has {len(x)} held-out slices; asked for {n}")
        # interleave orientations so that the first n cover all of them
        order = torch.tensor([0, 6, 11, 1, 7, 12, 2, 8, 13, 3, 9, 14, 4, 10, 15, 5])
        return x[order[:n]]
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def training(name: str, n: int | None = None, size: int = 64) -> torch.Tensor:
    """Training images of the shipped priors: ``n`` phantoms (stream 0, default 4096),
    every training MNI slice (``mri-brain``; ``n`` must be ``None`` or at most their number),
    or those slices and ``n`` domain-randomised ones (``mri-brain-synth``, default 1024;
    :func:`invdiff.data.mni.randomised`, seed 0, stream 0). ``mri-brain-synth`` is held out
    on the same 16 template slices as ``mri-brain``; ``mri-brain-coronal-synth`` is the same
    with coronal planes only (the perpendicular prior of a volume), held out on the coronal
    ones. ``blur-kernels`` are ``n`` kernels (default 4096) of :func:`invdiff.operators.kernels.kernels`
    as images ``k / max(k)``."""
    if name == "ct-phantom":
        return phantoms.ct(4096 if n is None else int(n), size, TRAIN_SEED, stream=0)
    if name == "blur-kernels":  # kernels as images k / max(k) in [0, 1]
        return kernels.to_image(kernels.kernels(4096 if n is None else int(n), size, TRAIN_SEED, stream=0))
    if name == "mri-brain":
        x = mni.slices("train", size)
        return x if n is None else x[: int(n)]
    if name == "mri-brain-synth":
        return torch.cat([mni.slices("train", size), mni.randomised(1024 if n is None else int(n), size, TRAIN_SEED)])
    if name == "mri-brain-coronal-synth":  # the perpendicular prior of TPDM: coronal planes only
        coronal = ("coronal",)
        return torch.cat([mni.slices("train", size, orientations=coronal),
                          mni.randomised(1024 if n is None else int(n), size, TRAIN_SEED, orientations=coronal)])
    raise ValueError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
