"""Diffusion priors: the denoiser contract, analytic priors, checkpoint adapters and loaders.

>>> from invdiff import priors
>>> prior = priors.GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
>>> prior.image_shape
(1, 8, 8)
"""

from .adapters import DenoiserPrior
from .adm import ADMConfig, ADMPrior, GuidedDiffusionUNet, get_named_beta_schedule
from .analytic import GaussianMixturePosterior, GaussianMixturePrior, GaussianPrior, operator_matrix
from .base import DiffusionPrior, as_sigma
from .edm import EDMPrior, small_unet_config
from .latent import (ConvAutoencoder, IdentityAutoencoder, LatentDiffusionPrior, LatentGaussianPosterior,
                     LinearAutoencoder)
from .patch import PatchDiffusionPrior, PositionalEDMDenoiser, WholeImageDenoiser, patch_unet_config
from .conventions import DataRange
from .loading import (PriorFamily, available, convert, extract_state_dict, families, family_of, get_family, inspect, load,
                      model_card, parse_dtype, register_family, save)
from . import diffusers_family  # noqa: E402,F401  (registers the "diffusers" family; diffusers imported lazily)
from .score_sde import NCSNpp, ScoreSDEConfig, ScoreSDEPrior
from .edm_official import EDMOfficialPrior
from .deepinv_family import DeepinvPrior

__all__ = [
    "DiffusionPrior",
    "as_sigma",
    "GaussianPrior",
    "GaussianMixturePrior",
    "GaussianMixturePosterior",
    "operator_matrix",
    "DenoiserPrior",
    "ADMConfig",
    "ADMPrior",
    "GuidedDiffusionUNet",
    "get_named_beta_schedule",
    "EDMPrior",
    "small_unet_config",
    "PatchDiffusionPrior",
    "PositionalEDMDenoiser",
    "WholeImageDenoiser",
    "patch_unet_config",
    "LatentDiffusionPrior",
    "LatentGaussianPosterior",
    "LinearAutoencoder",
    "IdentityAutoencoder",
    "ConvAutoencoder",
    "load",
    "save",
    "available",
    "model_card",
    "families",
    "family_of",
    "get_family",
    "register_family",
    "PriorFamily",
    "extract_state_dict",
    "inspect",
    "convert",
    "parse_dtype",
    "DataRange",
    "NCSNpp",
    "ScoreSDEConfig",
    "ScoreSDEPrior",
    "EDMOfficialPrior",
    "DeepinvPrior",
]
