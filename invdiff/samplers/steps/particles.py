"""Weighted particle systems (SMC, FPS-SMC): effective sample size, systematic resampling and
the final draw of one particle per measurement.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .randomness import split_generators

__all__ = ["effective_sample_size", "systematic_resample", "draw_particle"]


def effective_sample_size(log_weights: Tensor, dim: int = 0) -> Tensor:
    """Effective sample size :math:`1 / \\sum_k \\bar w_k^2` of (unnormalised) log-weights along ``dim``.

    ``K`` for equal weights, 1 when one particle carries all the weight (Kong, Liu & Wong 1994).
    """
    w = torch.softmax(log_weights, dim=dim)
    return 1.0 / (w**2).sum(dim)


def systematic_resample(
    log_weights: Tensor, generator: torch.Generator | Sequence[torch.Generator] | None
) -> Tensor:
    """Systematic resampling of ``K`` particles for each of ``B`` problems; ``log_weights`` is ``(K, B)``.

    One uniform :math:`u_b \\sim U[0, 1/K)` per problem; particle ``k`` is copied once for
    every point :math:`u_b + j/K` that falls into its slice of the cumulative normalised
    weights. Unbiased (each particle is copied :math:`K \\bar w_k` times in expectation) with
    the lowest variance of the standard schemes (Douc, Cappé & Moulines 2005). Returns the
    ``(K, B)`` indices of the parents (sorted). A list of ``G`` generators gives one per
    image: with ``B = n * G`` problems (:meth:`~invdiff.samplers.Sampler.sample`'s layout,
    problem ``s * G + j`` is sample ``s`` of image ``j``) generator ``j`` draws its ``n``
    uniforms in one call, what it would draw alone.
    """
    k, b = log_weights.shape
    w = torch.softmax(log_weights.to(torch.float64), dim=0)
    cdf = torch.cumsum(w, 0).T.contiguous()  # (B, K)
    cdf[:, -1] = 1.0  # guard against round-off: the last slice ends at exactly 1
    if isinstance(generator, (list, tuple)):
        n = split_generators(generator, b)
        u = torch.stack([torch.rand(n, generator=g, device=log_weights.device, dtype=torch.float64)
                         for g in generator], 1).reshape(b)
    else:
        u = torch.rand(b, generator=generator, device=log_weights.device, dtype=torch.float64)
    points = (u[:, None] + torch.arange(k, device=log_weights.device, dtype=torch.float64)[None]) / k  # (B, K)
    idx = torch.searchsorted(cdf, points, right=True).clamp_max(k - 1)
    return idx.T.contiguous()


def draw_particle(log_weights: Tensor, generator) -> Tensor:
    """One index in ``[0, K)`` per column of ``log_weights`` ``(K, B)``, drawn with the
    normalised weights (float64); a list of ``G`` generators draws the columns of each image
    from its own (column ``s * G + j`` from generator ``j``, its ``n = B / G`` columns in one call)."""
    w = torch.softmax(log_weights.to(torch.float64), 0).T  # (B, K)
    if isinstance(generator, (list, tuple)):
        g_count = len(generator)
        split_generators(generator, w.shape[0])
        picks = [torch.multinomial(w[j::g_count], 1, generator=g)[:, 0] for j, g in enumerate(generator)]
        return torch.stack(picks, 1).reshape(-1)
    return torch.multinomial(w, 1, generator=generator)[:, 0]
