"""Shared steps of the posterior samplers, written once and imported everywhere.

All samplers work in the variance-exploding (VE) parametrisation of the prior contract,
``x = x0 + sigma * n`` with ``x0`` in ``[0, 1]``. The pieces:

* schedules: :func:`karras_sigmas` (EDM, eq. 5 of Karras et al. 2022), :func:`ddpm_sigmas`
  (the linear-beta DDPM schedule of Ho et al. 2020 mapped to VE) and :func:`ddpm_timestep`;
* :func:`tweedie` — the denoised estimate and the score;
* :func:`ddim_step` — the DDIM / ancestral update (Song et al. 2021, eq. 12) in VE form;
* :func:`guidance_gradient` — the gradient of the data misfit through the denoiser,
  ``grad_x || y - A(D(x, sigma)) ||`` (DPS, Chung et al. 2023, Alg. 1);
* :func:`randn_like` — Gaussian noise from an explicit generator (or one per sample).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "karras_sigmas",
    "ddpm_sigmas",
    "ddpm_timestep",
    "tweedie",
    "ddim_step",
    "guidance_gradient",
    "operator_norm_squared",
    "randn_like",
    "batch_norm",
    "conjugate_gradient",
    "proximal_least_squares",
    "measurement_noise",
    "gaussian_noise_std",
    "per_image",
    "initial_estimate",
]


# --------------------------------------------------------------------------- schedules
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


# --------------------------------------------------------------------------- steps
def tweedie(denoise: Callable[[Tensor, Tensor], Tensor], x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor]:
    """Denoised estimate and score at ``x``: ``x0 = D(x, sigma)``, ``score = (x0 - x) / sigma^2``."""
    x0 = denoise(x, sigma)
    return x0, (x0 - x) / torch.as_tensor(sigma, dtype=x.dtype, device=x.device) ** 2


def ddim_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float, eta: float, noise: Tensor | None) -> Tensor:
    """One DDIM step from noise level ``sigma`` to ``sigma_next`` in VE form (Song et al. 2021, eq. 12).

    .. math::

        c = \\eta\\, \\sigma_{i+1} \\sqrt{1 - \\sigma_{i+1}^2 / \\sigma_i^2}, \\qquad
        x_{i+1} = \\hat x_0 + \\sqrt{\\sigma_{i+1}^2 - c^2}\\, \\frac{x_i - \\hat x_0}{\\sigma_i} + c\\, z.

    ``eta = 1`` is the ancestral DDPM step (the posterior ``q(x_{i+1} | x_i, x0)``),
    ``eta = 0`` the deterministic DDIM / probability-flow step; ``sigma_next = 0`` returns ``x0``.
    """
    if sigma_next <= 0:
        return x0
    c = eta * sigma_next * math.sqrt(max(0.0, 1 - sigma_next**2 / sigma**2))
    out = x0 + math.sqrt(max(0.0, sigma_next**2 - c**2)) / sigma * (x - x0)
    if c > 0:
        if noise is None:
            raise ValueError("ddim_step needs noise when eta > 0")
        out = out + c * noise
    return out


def batch_norm(r: Tensor) -> Tensor:
    """Euclidean norm of each batch element, shape ``(B, 1, ..., 1)``."""
    return r.reshape(r.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (r.ndim - 1)))


def guidance_gradient(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigma: float,
    y: Tensor,
    physics,
    misfit: str = "norm",
    weight: Tensor | float | Callable[[Tensor], Tensor] | None = None,
    clip: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Denoise ``x`` and differentiate the data misfit through the denoiser (DPS, Alg. 1).

    With ``x0 = D(x, sigma)``, ``r = y - A(x0)`` and ``W = weight`` (1 when ``None``;
    a number or a tensor broadcastable against ``r``), returns ``(x0, grad, ||r||)``:

    * ``misfit="norm"``:    ``grad = grad_x ||sqrt(W) r||_2`` (the official DPS code uses the
      norm, not its square; ``W = 1/|y|`` gives the norm of the Pearson residual, used for
      Poisson noise);
    * ``misfit="squared"``: ``grad = grad_x ||sqrt(W) r||_2^2 / 2`` (a Gaussian log-likelihood
      with precision ``W``); ``weight`` may also be a callable ``r -> W r`` applying a
      symmetric positive-definite precision (e.g. a CG solve), held fixed in the gradient.

    The vector-Jacobian product of the operator goes through ``physics.A_vjp`` (the adjoint
    for linear operators); only the denoiser is differentiated by autograd, so no graph is
    built through ``A``. Norms are per batch element. ``clip`` clamps ``x0`` before the
    misfit (the reference code clips ``x0`` to the data range); its gradient is zero
    outside the range. When the caller runs with autograd on (a differentiable sampler run),
    ``x0`` is returned attached to the network's graph (the gradient itself is a constant).
    """
    if misfit not in ("norm", "squared"):
        raise ValueError(f"unknown misfit {misfit!r}: use 'norm' or 'squared'")
    keep_graph = torch.is_grad_enabled()  # a differentiable run: x0 stays attached to the network
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = denoise(xg, sigma)
        x0c = x0.clamp(*clip) if clip is not None else x0
        x0d = x0c.detach()
        r = y - physics.A(x0d)
        if callable(weight):
            if misfit != "squared":
                raise ValueError("a callable weight needs misfit='squared'")
            wr = weight(r)
        else:
            wr = r if weight is None else r * weight
        norm = batch_norm(r)
        if misfit == "norm":
            wnorm = norm if weight is None else batch_norm(r * torch.sqrt(torch.as_tensor(weight)))
            v = wr / wnorm.clamp_min(torch.finfo(r.dtype).tiny)
        else:
            v = wr
        g0 = -physics.A_vjp(x0d, v)  # d misfit / d x0
        (grad,) = torch.autograd.grad(x0c, xg, grad_outputs=g0.to(x0c.dtype), retain_graph=keep_graph)
    return (x0c if keep_graph else x0c.detach()), grad.detach(), norm.detach()


def operator_norm_squared(physics, image_shape: Sequence[int], device=None, dtype=torch.float32,
                          iterations: int = 30, generator: torch.Generator | None = None) -> float:
    """Largest eigenvalue of ``A^T A`` by power iteration (with ``A_vjp`` / adjoint).

    For a nonlinear operator, the Jacobian at the origin is not meaningful, so 1 is
    returned (the scale of an orthonormal transform); pass your own value where it matters.
    """
    from deepinv.physics import LinearPhysics

    if not isinstance(physics, LinearPhysics):
        return 1.0
    gen = generator if generator is not None else torch.Generator(device=device or "cpu").manual_seed(0)
    x = torch.randn(1, *image_shape, generator=gen, device=device, dtype=dtype)
    x = x / x.norm()
    lam = 0.0
    for _ in range(iterations):
        z = physics.A_adjoint(physics.A(x))
        new = float((z * x).sum())
        x = z / z.norm().clamp_min(1e-30)
        if abs(new - lam) <= 1e-4 * abs(new):
            lam = new
            break
        lam = new
    return max(lam, 1e-12)


# --------------------------------------------------------------------------- randomness
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


# --------------------------------------------------------------------------- noise models
def measurement_noise(physics, batch: int | None = None) -> tuple[str, float | Tensor]:
    """``(kind, level)`` of a deepinv noise model: ``("gaussian", sigma)``, ``("poisson", gain)``
    or ``("none", 0.0)``. Other noise models raise ``ValueError`` (give the level explicitly).

    ``level`` is a number, or a ``(batch,)`` tensor when the noise model has one level per
    image (deepinv's ``SigmaGenerator`` / ``GaussianNoise(sigma=tensor)``). A model with ``b``
    levels and a run over ``batch = n * b`` images (``n`` samples or particles, row
    ``k * b + j`` = image ``j``) gives each row its image's level.
    """
    from deepinv.physics import GaussianNoise, PoissonNoise, ZeroNoise

    model = getattr(physics, "noise_model", None)
    if model is None or isinstance(model, ZeroNoise):
        return "none", 0.0
    if isinstance(model, GaussianNoise):
        kind, level = "gaussian", model.sigma
    elif isinstance(model, PoissonNoise):
        kind, level = "poisson", model.gain
    else:
        raise ValueError(f"unsupported noise model {type(model).__name__}; pass the noise level explicitly")
    level = torch.as_tensor(level).detach().reshape(-1)
    if level.numel() == 1 or bool((level == level[0]).all()):
        return kind, float(level[0])
    if batch is None or batch % level.numel():
        raise ValueError(f"the noise model has {level.numel()} per-image levels, for a batch of {batch} "
                         "measurements; pass noise_sigma explicitly")
    return kind, level.repeat(batch // level.numel())


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
    sigma, else for Poisson data (gain :math:`g`, :math:`\mathrm{Var}\,y = g\,Ax`) the
    homoscedastic equivalent :math:`s^2 = g\,\overline{|y|}`, the mean Poisson variance
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


def initial_estimate(physics, y: Tensor, shape: Sequence[int], prior_mean: Callable[[], Tensor],
                     data_range: tuple[float, float] = (0.0, 1.0), iterations: int = 10) -> tuple[Tensor, str]:
    """A starting image that is safe for every operator, and what it was:

    1. ``"A_dagger"``: ``physics.A_dagger(y)`` when it is in range, i.e. its energy outside
       ``data_range`` is below a quarter of its energy inside (invdiff's FBP, zero-filling,
       Wiener; deepinv's exact ``BlurFFT`` pseudo-inverse of noisy data, values of
       :math:`\pm 10^3`, is not);
    2. ``"cg"``: for a linear operator, ``iterations`` CG steps on the normal equations
       :math:`A^\top A x = A^\top y` from the prior mean (regularised by early stopping,
       :func:`proximal_least_squares`);
    3. ``"prior"``: the prior mean ``prior_mean()`` (a nonlinear operator whose ``A_dagger``
       fails or is out of range).

    The estimate is clamped to ``data_range``.
    """
    from deepinv.physics import LinearPhysics

    lo, hi = data_range

    def in_range(a: Tensor) -> bool:
        inside = a.clamp(lo, hi)
        excess = (a - inside).reshape(a.shape[0], -1).norm(dim=1)
        return bool(torch.isfinite(a).all() and (excess <= 0.25 * inside.reshape(a.shape[0], -1).norm(dim=1)).all())

    try:
        start = physics.A_dagger(y).real.reshape(shape)
    except Exception:  # a nonlinear deepinv physics without a pseudo-inverse of its own
        start = None
    if start is not None and in_range(start):
        return start.clamp(lo, hi), "A_dagger"
    mean = prior_mean().reshape(shape)
    if isinstance(physics, LinearPhysics):
        start = proximal_least_squares(physics, mean.to(y.real.dtype), y, None, iterations)
        if torch.isfinite(start).all():
            return start.clamp(lo, hi), "cg"
    return mean.clamp(lo, hi), "prior"


# --------------------------------------------------------------------------- linear algebra
def conjugate_gradient(
    apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, iterations: int = 10, tol: float = 1e-5
) -> Tensor:
    """Solve ``apply(x) = b`` for a symmetric positive-definite ``apply``, batch-wise.

    Inner products are per batch element and conjugate (``Re <a, b>`` over real views of
    complex data), so complex MRI data is handled. Stops when every element's relative
    residual is below ``tol``.
    """
    def dot(a, c):
        return (a.conj() * c).real.reshape(a.shape[0], -1).sum(1).reshape(-1, *([1] * (a.ndim - 1)))

    if not torch.isfinite(b).all():  # let the caller's divergence check see it
        return torch.full_like(b, float("nan"))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = dot(r, r)
    b2 = dot(b, b).clamp_min(torch.finfo(b.real.dtype).tiny)
    for _ in range(iterations):
        if (rs <= tol**2 * b2).all():
            break
        ap = apply(p)
        alpha = rs / dot(p, ap).clamp_min(torch.finfo(b.real.dtype).tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = dot(r, r)
        p = r + (rs_new / rs.clamp_min(torch.finfo(b.real.dtype).tiny)) * p
        rs = rs_new
    return x


def proximal_least_squares(
    physics, z: Tensor, y: Tensor, gamma: float | None, iterations: int, tol: float = 1e-6
) -> Tensor:
    """A few warm-started CG steps on the proximal least-squares problem around ``z``.

    .. math::

        \\gamma < \\infty:\\quad (I + \\gamma A^\\top A)\\, x = z + \\gamma A^\\top y, \\qquad
        \\gamma = \\infty \\;(\\text{``None``}):\\quad A^\\top A\\, x = A^\\top y,

    both started from :math:`x = z`, so that few iterations stay close to ``z`` (the
    Krylov subspace acts as the regulariser, DDS Sec. 3.2). Only ``A`` and ``A_adjoint``
    are called (one each per iteration); a non-finite right-hand side gives NaN (so the
    sampler's divergence check names the step); complex data are handled by
    :func:`conjugate_gradient`. Used by DDS and DiffPIR.
    """
    if gamma is None:
        def apply(v: Tensor) -> Tensor:
            return physics.A_adjoint(physics.A(v))

        rhs = physics.A_adjoint(y)
    else:
        def apply(v: Tensor) -> Tensor:
            return v + gamma * physics.A_adjoint(physics.A(v))

        rhs = z + gamma * physics.A_adjoint(y)
    return conjugate_gradient(apply, rhs.to(z.dtype), x0=z, iterations=iterations, tol=tol)


# --------------------------------------------------------------------------- likelihoods (MCG / EnKG / DPS)
__all__ += ["LIKELIHOODS", "likelihood_variance", "project_measurements"]

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


def project_measurements(
    physics, x: Tensor, y: Tensor, weight: float | Tensor | None, iterations: int, tol: float = 1e-4
) -> Tensor:
    """Move ``x`` onto (or towards) the measurement-consistent set ``{A x = y}`` with CG.

    .. math::

        \\text{weight } W = \\text{None}:\\quad x + A^{+}(y - A x), \\qquad
        W:\\quad x + (I + A^\\top W A)^{-1} A^\\top W (y - A x)
              = x + A^\\top (A A^\\top + W^{-1})^{-1} (y - A x).

    ``None`` is the orthogonal, minimum-norm projection for any linear ``A`` (onto the
    least-squares solutions when ``{Ax = y}`` is empty): CG on the normal equations
    :math:`A^\\top A\\,\\delta = A^\\top (y - Ax)` from :math:`\\delta = 0` stays in the range
    of :math:`A^\\top` and converges to :math:`A^{+}(y - Ax)`. A weight (a number or a
    tensor shaped like ``y``, e.g. ``sigma^2 / noise variance``) gives the Tikhonov /
    Kalman-relaxed projection. Only ``A`` and ``A_adjoint`` are called (one each per
    iteration); complex data are handled by :func:`conjugate_gradient`; the CG stops at
    relative residual ``tol`` or after ``iterations`` (fewer iterations = a projection
    restricted to a Krylov subspace, i.e. regularised).
    """
    r = y - physics.A(x)
    if weight is None:
        def apply(v: Tensor) -> Tensor:
            return physics.A_adjoint(physics.A(v))

        rhs = physics.A_adjoint(r)
    else:
        def apply(v: Tensor) -> Tensor:
            return v + physics.A_adjoint(weight * physics.A(v))

        rhs = physics.A_adjoint(weight * r)
    return x + conjugate_gradient(apply, rhs.to(x.dtype), iterations=iterations, tol=tol)


# --------------------------------------------------------------------------- particles and early-stopped least squares (SMC / ReSample)
__all__ += ["effective_sample_size", "systematic_resample", "cgls"]


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
    ``(K, B)`` indices of the parents (sorted). A list of generators gives one per problem.
    """
    k, b = log_weights.shape
    w = torch.softmax(log_weights.to(torch.float64), dim=0)
    cdf = torch.cumsum(w, 0).T.contiguous()  # (B, K)
    cdf[:, -1] = 1.0  # guard against round-off: the last slice ends at exactly 1
    if isinstance(generator, (list, tuple)):
        if len(generator) != b:
            raise ValueError(f"got {len(generator)} generators for {b} particle systems")
        u = torch.cat([torch.rand(1, generator=g, device=log_weights.device, dtype=torch.float64) for g in generator])
    else:
        u = torch.rand(b, generator=generator, device=log_weights.device, dtype=torch.float64)
    points = (u[:, None] + torch.arange(k, device=log_weights.device, dtype=torch.float64)[None]) / k  # (B, K)
    idx = torch.searchsorted(cdf, points, right=True).clamp_max(k - 1)
    return idx.T.contiguous()


def cgls(
    physics, y: Tensor, x0: Tensor, iterations: int, stop_residual: Tensor | float = 0.0, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Least squares :math:`\\min_x \\|y - A x\\|^2` by CGLS from ``x0``, stopped early per batch element.

    Conjugate gradients on the normal equations :math:`A^\\top A x = A^\\top y` written on the
    residual (CGLS, Björck 1996, Alg. 7.4.1), started at ``x0``: the iterates stay in
    :math:`x_0 + \\operatorname{range}(A^\\top)`, so run to convergence it returns the
    least-squares solution closest to ``x0`` (the limit of gradient descent from ``x0``).
    An element stops as soon as :math:`\\|y - A x\\|^2 \\le` ``stop_residual`` (a number or one
    value per batch element; the discrepancy principle when it is the expected noise energy,
    Morozov 1966), when its normal-equation residual fell by ``tol``, or after ``iterations``.
    One ``A`` and one ``A_adjoint`` per iteration; complex data are handled (conjugate inner
    products). Returns ``(x, ||y - A x||^2)`` (the latter per element, shape ``(B,)``).
    """
    def dot(a: Tensor, c: Tensor) -> Tensor:
        return (a.conj() * c).real.reshape(a.shape[0], -1).sum(1)

    def col(v: Tensor, like: Tensor) -> Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    x = x0.clone()
    r = y - physics.A(x)
    s = physics.A_adjoint(r).to(x.dtype)
    p = s.clone()
    gamma = dot(s, s)
    gamma0 = gamma.clamp_min(torch.finfo(gamma.dtype).tiny)
    res = dot(r, r)
    limit = torch.as_tensor(stop_residual, dtype=res.dtype, device=res.device).reshape(-1)
    tiny = torch.finfo(res.dtype).tiny
    for _ in range(iterations):
        active = (res > limit) & (gamma > tol**2 * gamma0)
        if not active.any():
            break
        q = physics.A(p)
        alpha = torch.where(active, gamma / dot(q, q).clamp_min(tiny), torch.zeros_like(gamma))
        x = x + col(alpha, x) * p
        r = r - col(alpha, r).to(r.dtype) * q
        s = physics.A_adjoint(r).to(x.dtype)
        gamma_new = dot(s, s)
        beta = torch.where(active, gamma_new / gamma.clamp_min(tiny), torch.zeros_like(gamma))
        p = torch.where(col(active, p), s + col(beta, p) * p, p)
        gamma = torch.where(active, gamma_new, gamma)
        res = dot(r, r)
    return x, res
