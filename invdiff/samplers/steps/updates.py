"""The prior's update from one noise level to the next, in VE form.

* :func:`ancestral_std` — the std of the DDPM posterior step, the one formula behind DDIM's
  ``eta``, DDS's re-noising, SMC's proposal and ReSample's resampling variance;
* :func:`ddim_step` — the DDIM / ancestral update (Song et al. 2021, eq. 12);
* :func:`ddim_score_weight` — the weight that update gives the score, i.e. the step of a
  likelihood score added to it (PSLD's guidance);
* :func:`langevin_data_step` — unadjusted Langevin on a Gaussian-anchored data term (DAPS's
  measurement step, PnP-DM's likelihood step for a nonlinear operator).
"""

from __future__ import annotations

import math

from torch import Tensor

from .randomness import randn_like

__all__ = ["ancestral_std", "ddim_step", "ddim_score_weight", "langevin_data_step"]


def ancestral_std(sigma: float, sigma_next: float) -> float:
    """Std of the ancestral (DDPM posterior) step :math:`q(x_{i+1} \\mid x_i, x_0)` from
    ``sigma`` to ``sigma_next`` in VE form:

    .. math:: c = \\sigma_{i+1} \\sqrt{1 - \\sigma_{i+1}^2 / \\sigma_i^2}.
    """
    return sigma_next * math.sqrt(max(0.0, 1 - sigma_next**2 / sigma**2))


def ddim_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float, eta: float, noise: Tensor | None,
              eps: Tensor | None = None) -> Tensor:
    """One DDIM step from noise level ``sigma`` to ``sigma_next`` in VE form (Song et al. 2021, eq. 12).

    .. math::

        c = \\eta\\, \\sigma_{i+1} \\sqrt{1 - \\sigma_{i+1}^2 / \\sigma_i^2}, \\qquad
        x_{i+1} = \\hat x_0 + \\sqrt{\\sigma_{i+1}^2 - c^2}\\, \\frac{x_i - \\hat x_0}{\\sigma_i} + c\\, z.

    ``eta = 1`` is the ancestral DDPM step (the posterior ``q(x_{i+1} | x_i, x0)``),
    ``eta = 0`` the deterministic DDIM / probability-flow step; ``sigma_next = 0`` returns ``x0``.
    ``eps`` replaces the noise direction :math:`(x_i - \\hat x_0) / \\sigma_i` when given.
    """
    if sigma_next <= 0:
        return x0
    c = eta * ancestral_std(sigma, sigma_next)
    if eps is None:
        out = x0 + _kept_std(sigma_next, c) / sigma * (x - x0)
    else:  # a noise estimate of its own (DDS keeps the network's eps beside a corrected x0)
        out = x0 + _kept_std(sigma_next, c) * eps
    if c > 0:
        if noise is None:
            raise ValueError("ddim_step needs noise when eta > 0")
        out = out + c * noise
    return out


def _kept_std(sigma_next: float, c: float) -> float:
    """The std of the deterministic part of :func:`ddim_step`, :math:`\\sqrt{\\sigma_{i+1}^2 - c^2}`."""
    return math.sqrt(max(0.0, sigma_next**2 - c**2))


def ddim_score_weight(sigma: float, sigma_next: float, eta: float) -> float:
    r"""The weight :math:`\kappa_i` that :func:`ddim_step` gives the score: with Tweedie's
    :math:`\hat x_0 = x_i + \sigma_i^2 \nabla \log p_{\sigma_i}(x_i)`,
    ``ddim_step(x, x0_hat) = x + kappa * score + c z`` with

    .. math:: \kappa_i = \sigma_i^2 - \sigma_i \sqrt{\sigma_{i+1}^2 - c^2},
              \qquad c = \eta\, \sigma_{i+1}\sqrt{1 - \sigma_{i+1}^2/\sigma_i^2},

    so a likelihood score added with this weight makes the step the same DDIM step of the
    posterior: :math:`\sigma_i^2 - \sigma_{i+1}^2` for ``eta = 1`` (the reverse SDE),
    :math:`\sigma_i(\sigma_i - \sigma_{i+1})` for ``eta = 0`` (the probability-flow ODE, about
    half the SDE's on a fine schedule); :math:`\sigma_i^2` at ``sigma_next = 0``.
    """
    return sigma**2 - sigma * _kept_std(sigma_next, eta * ancestral_std(sigma, sigma_next))


def langevin_data_step(physics, anchor: Tensor, y: Tensor, s2: float | Tensor, r2: float | Tensor,
                       eta: float | Tensor, steps: int, generator) -> Tensor:
    r"""``steps`` unadjusted Langevin steps from ``anchor`` on
    :math:`E(x) = \|A(x) - y\|^2 / (2 s^2) + \|x - \text{anchor}\|^2 / (2 r^2)`:

    .. math:: x \leftarrow x - \eta\Big(\frac{J_A(x)^\top (A(x) - y)}{s^2} + \frac{x - \text{anchor}}{r^2}\Big)
              + \sqrt{2\eta}\, \epsilon,

    with ``physics.A_vjp`` for :math:`J_A^\top` (no network call); ``s2`` may be per image
    (``(B, 1, ..., 1)``)."""
    x, noise_scale = anchor, (2 * eta) ** 0.5
    for _ in range(steps):
        grad = physics.A_vjp(x, physics.A(x) - y).real.to(x.dtype) / s2 + (x - anchor) / r2
        x = x - eta * grad + noise_scale * randn_like(x, generator)
    return x
