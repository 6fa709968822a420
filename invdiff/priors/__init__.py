"""Diffusion priors: the denoiser contract, analytic priors, adapters and loaders."""

from .analytic import GaussianMixturePosterior, GaussianMixturePrior, GaussianPrior, operator_matrix
from .base import DiffusionPrior, as_sigma

__all__ = [
    "DiffusionPrior",
    "as_sigma",
    "GaussianPrior",
    "GaussianMixturePrior",
    "GaussianMixturePosterior",
    "operator_matrix",
]
