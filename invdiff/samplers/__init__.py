"""Posterior samplers: each a :class:`deepinv.models.Reconstructor` over a diffusion prior."""

from .base import PosteriorSamples, RunInfo, Sampler, SamplerDivergedError
from .dps import DPS, make_sigmas

__all__ = ["Sampler", "RunInfo", "PosteriorSamples", "SamplerDivergedError", "DPS", "make_sigmas"]
