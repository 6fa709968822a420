"""Measurement noise and likelihood models: what the data step assumes about ``y``.

* :func:`measurement_noise` — the kind and level of a deepinv noise model (one level, or
  one per image);
* :func:`gaussian_noise_std` — the Gaussian std a Gaussian-likelihood step uses (Poisson
  data: the mean Poisson variance);
* :func:`likelihood_variance` — the per-entry variance of DPS's Gaussian (approximate)
  likelihood, Poisson included;
* :func:`denoiser_error_variance` — ΠGDM's variance of the denoiser's error;
* :func:`proximal_weight` — DDS's scale-aware weight of the data term built on it;
* :func:`per_image` — per-image values shaped to broadcast against a batch;
* :func:`noise_batch_coupling` — why a noise model couples the images of a batch (Poisson).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...operators.noise import measurement_noise

__all__ = ["measurement_noise", "per_image", "gaussian_noise_std", "noise_batch_coupling", "LIKELIHOODS",
           "likelihood_variance", "denoiser_error_variance", "proximal_weight"]


def denoiser_error_variance(sigma: float, sigma_data: float) -> float:
    """Variance :math:`r_t^2` of the denoiser's error at noise level ``sigma`` for a prior of
    scale :math:`\\sigma_d` (ΠGDM, Song et al. ICLR 2023, eq. 8; exact for a Gaussian prior
    of variance :math:`\\sigma_d^2`):

    .. math:: r_t^2 = \\frac{\\sigma^2 \\sigma_d^2}{\\sigma^2 + \\sigma_d^2}.

    DPS, DDS, EnKG, ReSample and SMC's twist use it as the scale of
    :math:`p(y \\mid x_t) \\approx \\mathcal N(A \\hat x_0,\\, s^2 I + r_t^2 A A^\\top)`.
    """
    sd2 = sigma_data**2
    return sigma**2 * sd2 / (sigma**2 + sd2)


def per_image(value: float | Tensor, ndim: int = 4) -> float | Tensor:
    """A number as is; a ``(B,)`` tensor of per-image values reshaped to ``(B, 1, ..., 1)``
    with ``ndim`` dimensions, so that it broadcasts against an image (``ndim=4``) or a
    measurement batch (``ndim=y.ndim``)."""
    if isinstance(value, Tensor) and value.ndim == 1:
        return value.reshape(-1, *([1] * (ndim - 1)))
    return value


def gaussian_noise_std(physics, y: Tensor, noise_sigma: float | None = None,
                       floor: float = 0.0) -> float | Tensor:
    """The std :math:`s` of the Gaussian measurement noise that a Gaussian-likelihood step
    assumes, floored at ``floor``: ``noise_sigma`` when given, else the physics' Gaussian
    sigma, else for Poisson data (gain :math:`g`, :math:`\\mathrm{Var}\\,y = g\\,Ax`) the
    homoscedastic equivalent :math:`s^2 = g\\,\\overline{|y|}`, the mean Poisson variance
    (the rule DPS uses, :func:`likelihood_variance`), else 0. A number, or a ``(B,)``
    tensor for per-image noise levels (see :func:`per_image`)."""
    if noise_sigma is not None:
        level = float(noise_sigma)
    else:
        kind, level = measurement_noise(physics, y.shape[0])
        if kind == "poisson":
            level = (level * float(y.abs().mean())) ** 0.5
    if isinstance(level, Tensor):
        return level.clamp_min(floor)
    return max(level, floor)


def noise_batch_coupling(physics) -> str | None:
    """Why the images of one batch under ``physics``'s noise are not independent, or ``None``:
    for Poisson data the Gaussian-equivalent level of :func:`gaussian_noise_std` is the mean
    :math:`|y|` of the whole batch, so batched runs (``reconstruct(batch=...)``,
    ``bench.run(batch=...)``) take one image per call there."""
    from deepinv.physics import PoissonNoise

    if isinstance(getattr(physics, "noise_model", None), PoissonNoise):
        return "Poisson data: the Gaussian-equivalent noise level is the mean |y| of the whole batch " \
               "(steps.likelihood.gaussian_noise_std)"
    return None


#: Names accepted by the ``likelihood`` argument of DPS and MCG.
LIKELIHOODS = ("auto", "gaussian", "poisson")


def likelihood_variance(
    physics, y: Tensor, likelihood: str = "auto", noise_sigma: float | None = None,
    poisson_gain: float | None = None,
) -> tuple[str, float | Tensor]:
    """The measurement-noise variance of a Gaussian (approximate) likelihood of ``y``.

    Returns ``(kind, v)`` with ``kind`` in ``"gaussian"``, ``"poisson"``, ``"none"`` and
    ``v`` a number (``s^2``) or a tensor that broadcasts against ``y`` (shaped like ``y``
    for Poisson, ``(B, 1, ..., 1)`` for per-image Gaussian levels):

    * ``"gaussian"``: :math:`v = s^2`, ``s`` = ``noise_sigma``, else the physics'
      :class:`~deepinv.physics.GaussianNoise` sigma; on a Poisson physics the homoscedastic
      equivalent :math:`s^2 = g\\,\\overline{|y|}` (the mean Poisson variance); 0 when noiseless.
    * ``"poisson"``: deepinv's :class:`~deepinv.physics.PoissonNoise` with gain ``g`` gives
      :math:`y = g\\,\\mathcal P(Ax/g)`, so :math:`\\mathrm{Var}\\,y = g\\,Ax`. The Gaussian
      approximation of DPS (Chung et al. 2023, Sec. 3.2, a weighted least squares) uses the
      observed counts for the variance, :math:`v = g \\max(|y|, g)` (floored at one count):
      the negative log-likelihood :math:`\\tfrac12\\sum (y - u)^2 / v` has the same minimiser
      and the same Hessian at :math:`u = y` as the exact Poisson one,
      :math:`\\sum (u - y\\log u) / g`. ``g`` = ``poisson_gain``, else the physics' gain.
    * ``"auto"``: ``"gaussian"`` with ``noise_sigma`` when it is given, else whatever
      ``physics.noise_model`` is (:func:`measurement_noise`).

    A bad name, or ``"poisson"`` without a gain, raises ``ValueError``.
    """
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {', '.join(LIKELIHOODS)}, got {likelihood!r}")
    if likelihood == "auto" and noise_sigma is not None:
        likelihood = "gaussian"
    needs_physics = poisson_gain is None if likelihood == "poisson" else noise_sigma is None
    if needs_physics:
        kind, level = measurement_noise(physics, y.shape[0])
        level = per_image(level, y.ndim)
    else:
        kind, level = "given", 0.0
    if likelihood == "auto":
        likelihood = kind if kind in ("gaussian", "poisson") else "none"
    if likelihood == "poisson":
        gain = float(poisson_gain) if poisson_gain is not None else (level if kind == "poisson" else None)
        if gain is None or bool(torch.as_tensor(gain <= 0).any()):
            raise ValueError("likelihood='poisson' needs poisson_gain > 0 or a physics with deepinv PoissonNoise, "
                             f"got noise model {type(getattr(physics, 'noise_model', None)).__name__}")
        return "poisson", gain * y.abs().clamp_min(gain)
    if likelihood == "none":
        return "none", 0.0
    # a Gaussian likelihood (for Poisson data: the mean Poisson variance)
    return "gaussian", per_image(gaussian_noise_std(physics, y, noise_sigma), y.ndim) ** 2


def proximal_weight(sigma: float, noise_sigma: float | Tensor, sigma_data: float, gamma: float | None = None,
                    scale: float = 1.0, ndim: int = 4) -> float | Tensor | None:
    """DDS's weight :math:`\\gamma` of the data term at noise level ``sigma``: ``gamma`` when
    given, else :math:`\\kappa\\, r_\\sigma^2 / s^2` (``scale`` = :math:`\\kappa`, :math:`r_\\sigma^2`
    of :func:`denoiser_error_variance`, :math:`s` the measurement noise std); ``None`` for
    noiseless data (a hard constraint). Per-image levels (a ``(B,)`` tensor) give a weight
    shaped to broadcast against ``ndim``-dimensional images (5 for volumes)."""
    if gamma is not None:
        return float(gamma)
    if isinstance(noise_sigma, Tensor):  # per-image levels: a (B, 1, ..., 1) weight
        if not bool((noise_sigma > 0).any()):
            return None
        noise_sigma = per_image(noise_sigma.clamp_min(1e-6), ndim)
    elif noise_sigma <= 0:
        return None
    return scale * denoiser_error_variance(sigma, sigma_data) / noise_sigma**2
