"""Noise schedules as explicit tensors in VE form, decreasing and ending at 0.

* :func:`karras_sigmas` — EDM (Karras et al. 2022, eq. 5);
* :func:`ddpm_sigmas` / :func:`ddpm_timestep` — the linear-beta DDPM schedule (Ho et al. 2020)
  mapped to VE noise levels on ``[0, 1]`` images, and back;
* :func:`make_sigmas` — a sampler's schedule from its ``steps`` / ``schedule`` / ``sigmas`` options.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from ...priors.base import DiffusionPrior


__all__ = ["karras_sigmas", "ddpm_sigmas", "ddpm_timestep", "make_sigmas"]


def karras_sigmas(
    steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, dtype=torch.float64
) -> Tensor:
    """EDM noise levels (Karras et al. 2022, eq. 5), ``steps`` values then a final 0.

    .. math:: \\sigma_i = \\big(\\sigma_{\\max}^{1/\\rho} + \\tfrac{i}{N-1}
              (\\sigma_{\\min}^{1/\\rho} - \\sigma_{\\max}^{1/\\rho})\\big)^{\\rho}, \\quad \\sigma_N = 0
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=dtype)
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sig, sig.new_zeros(1)]).to(dtype)


def _ddpm_alphas_cumprod(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    betas = torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def ddpm_sigmas(
    steps: int | None = None, num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
    dtype=torch.float64,
) -> Tensor:
    """The linear-beta DDPM schedule as VE noise levels on ``[0, 1]`` images, then a final 0.

    A VP state ``x_t = sqrt(abar_t) x0' + sqrt(1 - abar_t) eps`` on ``[-1, 1]`` images
    ``x0' = 2 x0 - 1`` is the VE state ``x = (x_t / sqrt(abar_t) + 1) / 2`` at

    .. math:: \\sigma_t = \\tfrac12 \\sqrt{(1 - \\bar\\alpha_t) / \\bar\\alpha_t}.

    ``steps`` (default all) picks evenly spaced timesteps from ``T-1`` down to 0, as DDIM does.
    """
    abar = _ddpm_alphas_cumprod(num_timesteps, beta_start, beta_end)
    sig = 0.5 * torch.sqrt((1 - abar) / abar)
    steps = num_timesteps if steps is None else steps
    idx = torch.linspace(num_timesteps - 1, 0, steps, dtype=torch.float64).round().long()
    return torch.cat([sig[idx], sig.new_zeros(1)]).to(dtype)


def ddpm_timestep(sigma: Tensor | float, num_timesteps: int = 1000, beta_start: float = 1e-4,
                  beta_end: float = 0.02) -> Tensor:
    """Continuous DDPM timestep ``t`` whose VE noise level (see :func:`ddpm_sigmas`) is ``sigma``.

    Linear interpolation in ``log sigma`` between the discrete timesteps; clamped to
    ``[0, T-1]``; ``sigma = 0`` maps to ``-1`` (one step below the first timestep), so
    ``ddpm_timestep(s_i) - ddpm_timestep(s_{i+1})`` counts the DDPM steps a step spans.
    """
    abar = _ddpm_alphas_cumprod(num_timesteps, beta_start, beta_end)
    log_sig = torch.log(0.5 * torch.sqrt((1 - abar) / abar))
    s = torch.as_tensor(sigma, dtype=torch.float64)
    ls = torch.log(s.clamp_min(1e-30))
    idx = torch.searchsorted(log_sig, ls.clamp(log_sig[0], log_sig[-1]).reshape(-1)).clamp(1, num_timesteps - 1)
    lo, hi = log_sig[idx - 1], log_sig[idx]
    t = (idx - 1) + (ls.reshape(-1) - lo) / (hi - lo)
    t = t.clamp(0, num_timesteps - 1)
    t = torch.where(s.reshape(-1) <= 0, torch.full_like(t, -1.0), t)
    return t.reshape(s.shape)


def make_sigmas(prior: DiffusionPrior, steps: int, schedule: str, sigmas: Tensor | None) -> Tensor:
    """An explicit noise schedule: ``sigmas`` checked, or ``"karras"`` / ``"ddpm"`` with ``steps``."""
    if sigmas is None:
        if schedule == "karras":
            sigmas = karras_sigmas(steps, prior.sigma_min, prior.sigma_max)
        elif schedule == "ddpm":
            sigmas = ddpm_sigmas(steps)
        else:
            raise ValueError(f"schedule must be 'karras' or 'ddpm', got {schedule!r}")
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2 or sigmas[-1] != 0 or (sigmas[1:] >= sigmas[:-1]).any():
        raise ValueError("sigmas must be a strictly decreasing 1-d tensor ending at 0")
    return sigmas
