"""Randomness from an explicit generator only (a list: one per batch element).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

__all__ = ["randn_like"]


def randn_like(x: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None) -> Tensor:
    """Standard normal noise shaped like ``x`` from ``generator``.

    A list of generators gives one per batch element (as diffusers does), so sample ``b``
    of a batch is reproducible on its own.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != x.shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
        return torch.stack(
            [torch.randn(x.shape[1:], generator=g, device=x.device, dtype=x.dtype) for g in generator]
        )
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
