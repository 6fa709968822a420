"""Shared steps of the posterior samplers, each formula written once, named after what it is.

All samplers work in the variance-exploding (VE) parametrisation of the prior contract,
``x = x0 + sigma * n`` with ``x0`` in ``[0, 1]``. The modules:

* :mod:`.schedules` — noise schedules (EDM/Karras, DDPM) as explicit tensors ending at 0;
* :mod:`.updates` — the ancestral / DDIM update and its std;
* :mod:`.likelihood` — measurement-noise models, likelihood variances, ΠGDM's error variance;
* :mod:`.guidance` — the misfit gradient through the denoiser and the shared Gaussian guidance;
* :mod:`.linalg` — CG, CGLS, proximal least squares, projections, operator norms, safe starts;
* :mod:`.particles` — effective sample size, systematic resampling;
* :mod:`.randomness` — Gaussian noise from explicit generators.
"""

from .guidance import GaussianGuidance, batch_norm, guidance_gradient
from .likelihood import (
                         LIKELIHOODS,
                         denoiser_error_variance,
                         gaussian_noise_std,
                         likelihood_variance,
                         measurement_noise,
                         per_image,
                         proximal_weight,
)
from .linalg import (
                         cgls,
                         conjugate_gradient,
                         initial_estimate,
                         operator_norm_squared,
                         project_measurements,
                         proximal_least_squares,
)
from .particles import draw_particle, effective_sample_size, systematic_resample
from .randomness import randn_like, split_generators
from .schedules import ddpm_sigmas, ddpm_timestep, karras_sigmas, make_sigmas
from .updates import ancestral_std, ddim_step, langevin_data_step

__all__ = [
    "karras_sigmas", "ddpm_sigmas", "ddpm_timestep", "make_sigmas",
    "ancestral_std", "ddim_step", "langevin_data_step",
    "measurement_noise", "per_image", "gaussian_noise_std", "LIKELIHOODS", "likelihood_variance",
    "denoiser_error_variance", "proximal_weight",
    "batch_norm", "guidance_gradient", "GaussianGuidance",
    "conjugate_gradient", "cgls", "proximal_least_squares", "project_measurements", "operator_norm_squared",
    "initial_estimate",
    "effective_sample_size", "systematic_resample", "draw_particle",
    "randn_like", "split_generators",
]
