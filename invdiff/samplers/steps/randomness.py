"""Randomness from an explicit generator only (a list: one per image of the batch).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["randn_like", "split_generators"]


def split_generators(generator: torch.Generator | Sequence[torch.Generator] | None, rows: int) -> int:
    """How many rows each generator of a list draws: ``rows / len(generator)`` (1 for a single
    generator or ``None``); ``ValueError`` in one line when the list does not divide the batch."""
    if not isinstance(generator, (list, tuple)):
        return rows
    if len(generator) == 0 or rows % len(generator):
        raise ValueError(f"got {len(generator)} generators for a batch of {rows}")
    return rows // len(generator)


def randn_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None,
               interleave: bool = False) -> Tensor:
    """Standard normal noise shaped like ``x`` from ``generator``.

    A list of ``G`` generators gives one per image (as diffusers does), so image ``b`` of a
    batch is reproducible on its own. When the batch holds ``n`` rows per image (``n * G``
    rows, :meth:`~invdiff.samplers.Sampler.sample`'s layout: row ``k * G + b`` is sample
    ``k`` of image ``b``), generator ``b`` draws its image's ``n`` rows as one block, exactly
    what it would draw alone for a batch of ``n``: a batch of images with their own generators
    equals the images run one by one (:func:`torch.randn` of shape ``(n, ...)`` from each).
    ``interleave=True`` is the image-major layout (row ``b * n + k``, EnKG's ensembles).
    """
    if isinstance(generator, (list, tuple)):
        n = split_generators(generator, x.shape[0])
        blocks = [torch.randn((n, *x.shape[1:]), generator=g, device=x.device, dtype=x.dtype) for g in generator]
        return torch.cat(blocks) if interleave else torch.stack(blocks, 1).reshape(x.shape)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
