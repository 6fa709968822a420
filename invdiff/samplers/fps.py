r"""Filtering Posterior Sampling (FPS) and its particle filter (FPS-SMC).

Dou, Song, "Diffusion Posterior Sampling for Linear Inverse Problem Solving: A Filtering
Perspective", ICLR 2024 (OpenReview ``tplXNcHZs1``); official code
ZehaoDou-official/FPS-SMC-2023 (``guided_diffusion/gaussian_diffusion.py``: ``p_sample_loop``,
``DDIM.p_sample``); also InverseBench's ``algo/fps.py`` (devzhk/InverseBench).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from deepinv.physics import DecomposablePhysics
from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Integer, Real
from .steps import (
    conjugate_gradient,
    draw_particle,
    effective_sample_size,
    gaussian_noise_std,
    make_sigmas,
    randn_like,
    systematic_resample,
)

__all__ = ["FPS", "GaussianConditional"]


class FPS(Sampler):
    r"""Filtering Posterior Sampling (Dou & Song, ICLR 2024): the reverse diffusion as a
    linear-Gaussian state-space model observed through a sequence of noised measurements,
    sampled by an exact Kalman step per level (FPS, ``particles=1``) or by a particle filter
    (FPS-SMC, ``particles=K``).

    **The measurement sequence.** The forward noising :math:`x_i = x_0 + \sigma_i \epsilon`
    of the image, measured by the same operator, gives
    :math:`y_i = y + \sigma_i A\epsilon = A x_i + s n`: every level is observed with the
    measurement noise :math:`s` of ``y`` itself. FPS draws one path of this sequence from
    the noisiest level towards :math:`y_N = y` with the DDIM bridge of rate :math:`c`
    (the official "backward DDIM generation of the y-sequence"),

    .. math::
        :label: fps-bridge

        y_0 = y + \sigma_0 A \epsilon_0, \qquad
        y_{i+1} = y + \sqrt{1-c}\,\frac{\sigma_{i+1}}{\sigma_i}\,(y_i - y) + \sqrt{c}\,\sigma_{i+1} A \epsilon_{i+1}.

    **The reverse step** is the prior's DDIM step of the same rate, a Gaussian around the
    denoised estimate :math:`\hat x_0 = D(x_i, \sigma_i)`,

    .. math::
        :label: fps-prior

        p(x_{i+1} \mid x_i) = \mathcal N\big(m_i,\, v_i I\big), \qquad
        m_i = \hat x_0 + \sqrt{1-c}\,\frac{\sigma_{i+1}}{\sigma_i}\,(x_i - \hat x_0), \qquad
        v_i = c\, \sigma_{i+1}^2,

    and, :math:`y_{i+1} \mid x_{i+1} \sim \mathcal N(A x_{i+1}, s^2 I)` being linear and
    Gaussian, the filtering step samples its exact conditional (the Kalman update),

    .. math::
        :label: fps-conditional

        p(x_{i+1} \mid x_i, y_{i+1}) = \mathcal N\Big(m_i + v_i A^\top \Sigma_i^{-1}(y_{i+1} - A m_i),\;
            \big(I / v_i + A^\top A / s^2\big)^{-1}\Big), \qquad \Sigma_i = s^2 I + v_i A A^\top,

    drawn by perturbation (Matheron's rule, :class:`GaussianConditional`):
    :math:`x_{i+1} = x' + v_i A^\top \Sigma_i^{-1}(y_{i+1} - A x' - s n)` with
    :math:`x' = m_i + \sqrt{v_i} z`. :math:`\Sigma_i^{-1}` is exact and per coordinate in
    the singular basis when the operator is a deepinv ``DecomposablePhysics``
    (:math:`A = U \operatorname{diag}(\mu) V^\top`: inpainting, FFT blur, complex-image MRI;
    checked on a random probe), else by ``cg_iterations`` conjugate-gradient steps in
    measurement space. The first level is the same step from the prior
    :math:`x_0 \sim \mathcal N(x_\text{init}\text{ or } 0,\, \sigma_0^2 I)`; at the last
    (:math:`\sigma_N = 0`, :math:`v = 0`) the step returns :math:`\hat x_0`.

    **FPS-SMC.** ``K`` particles per measurement follow :eq:`fps-conditional`, the
    proposal of the fully adapted filter, weighted by the predictive likelihood
    of the next measurement,

    .. math::
        :label: fps-weight

        w_{i+1}^k \propto w_i^k\, \frac{p(x^k_{i+1} \mid x^k_i)\, p(y_{i+1} \mid x^k_{i+1})}
            {p(x^k_{i+1} \mid x^k_i, y_{i+1})}
          = w_i^k\, \mathcal N\big(y_{i+1};\, A m_i^k,\, \Sigma_i\big),

    (the official code's ``prob_x + prob_y - prob_prev``, which equals the right-hand side),
    and resampled (systematic) when the effective sample size falls below
    ``ess_threshold * K``. All ``K * B`` particles go through the network in one call per
    step. ``sampler(y, physics)`` returns one particle per measurement drawn with the final
    weights.

    **Conversions and departures from the paper, exactly.** The official code runs VP
    states on ``[-1, 1]`` images, :math:`x^{vp}_t = \sqrt{\bar\alpha_t}(2x_t - 1)` with
    :math:`\sigma_t = \tfrac12\sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`; its
    :math:`y^{vp}_t = \sqrt{\bar\alpha_t}(2 y_t - A\mathbf 1)` observed with noise std
    :math:`\sqrt{\bar\alpha_t}\,\sigma_y` becomes :math:`y_t` observed with :math:`s = \sigma_y/2`
    at every level; its DDIM rate ``c_rate`` (posterior variance :math:`c(1-\bar\alpha_{t-1})`,
    mean coefficient :math:`\sqrt{1-c}\sqrt{1-\bar\alpha_{t-1}}` on the noise estimate) is the
    same :math:`c` in :eq:`fps-bridge` and :eq:`fps-prior`. Defaults are the official ones:
    1000 steps of the linear DDPM schedule (``schedule="ddpm"``), ``c = 0.95``, 5
    particles, :math:`\hat x_0` clipped to the data range. Departures: the y-path is drawn
    level by level as the loop needs it (same law, no stored sequence) and starts at
    :math:`y + \sigma_0 A\epsilon` (the official start :math:`A\epsilon` drops
    :math:`\sqrt{\bar\alpha_T}\, y \approx 0`); the conditional of :math:`x_{i+1}` uses
    :math:`y_{i+1}` (the official loop uses the previous level's measurement and mixes
    :math:`\bar\alpha_t` and :math:`\bar\alpha_{t-1}` in the Kalman gain); the last step is
    weighted and resampled too; resampling is systematic rather than multinomial, adaptive
    via ``ess_threshold`` (``1.0``, the default, resamples whenever the weights are
    uneven, as the official code does at every step); operators without a closed-form
    SVD use CG instead of the official per-task SVD classes. The measurement noise
    :math:`s` is read from the physics (Poisson data: the mean Poisson variance), floored at
    ``min_noise``. Linear operators only (:math:`A^\top` is needed): a nonlinear one is
    refused before any work.

    :param prior: the diffusion prior.
    :param steps: number of steps (= network calls); the paper uses 1000.
    :param c: rate :math:`c` of the DDIM bridge and of the reverse step (paper: 0.95).
    :param particles: ``K``, particles per measurement (1 = plain FPS; official default 5).
    :param ess_threshold: resample when ESS < ``ess_threshold * K`` (0 = never).
    :param schedule: ``"ddpm"`` (the paper's linear-beta schedule) or ``"karras"``; or pass ``sigmas``.
    :param noise_sigma: measurement noise std :math:`s`; read from ``physics.noise_model`` when ``None``.
    :param min_noise: floor of :math:`s` (a noiseless measurement has no Gaussian conditional).
    :param cg_iterations: most CG steps of a solve with :math:`\Sigma_i` (operators without a closed-form SVD).
    :param cg_tol: relative residual at which CG stops.
    :param clip: range :math:`\hat x_0` is clamped to; ``None`` disables it (analytic priors).
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.fps import FPS
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = FPS(prior, steps=50, particles=4)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_run.nfe, sampler.last_run.nfe_backward
        (torch.Size([1, 1, 8, 8]), 50, 0)
    """

    name = "fps"
    supports_nonlinear = False
    parameter_constraints = {"c": Real(0, 1, closed="right"), "particles": Integer(1), "ess_threshold": Real(0, 1)}

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 1000,
        c: float = 0.95,
        particles: int = 5,
        ess_threshold: float = 1.0,
        schedule: str = "ddpm",
        sigmas: Tensor | None = None,
        noise_sigma: float | None = None,
        min_noise: float = 1e-3,
        cg_iterations: int = 20,
        cg_tol: float = 1e-5,
        clip: tuple[float, float] | None = (0.0, 1.0),
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        self.sigmas = make_sigmas(prior, steps, schedule, sigmas)
        self.c = float(c)
        self.particles = int(particles)
        self.ess_threshold = float(ess_threshold)
        self.noise_sigma, self.min_noise = noise_sigma, float(min_noise)
        self.cg_iterations, self.cg_tol = int(cg_iterations), float(cg_tol)
        self.clip = clip

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas, c, k, b = self.sigmas.tolist(), self.c, self.particles, y.shape[0]
        rows = self._expand_physics(physics, b, k)  # particle (k, b) is row k * B + b
        noise_std = gaussian_noise_std(physics, y, self.noise_sigma, floor=self.min_noise)
        if isinstance(noise_std, Tensor):
            noise_std = noise_std.repeat(k)
        kalman = GaussianConditional(rows, noise_std, self.cg_iterations, self.cg_tol)
        kalman.check_svd(y.repeat(k, *([1] * (y.ndim - 1))))

        # line 1: y_0 = y + sigma_0 A eps (eq. fps-bridge); x_0 ~ p(x_0 | y_0) from the prior N(x_init, sigma_0^2 I)
        y_level = y + sigmas[0] * physics.A(self.randn((b, *self.image_shape), generator, y))
        start = torch.zeros((k * b, *self.image_shape), dtype=y.real.dtype, device=y.device)
        if x_init is not None:
            start = start + x_init.to(start.dtype).repeat(k, 1, 1, 1)
        x, _ = self._filter(kalman, start, sigmas[0] ** 2, y_level, generator, weighted=False)
        log_w = torch.zeros(k, b, dtype=torch.float64, device=y.device)
        resampled = 0
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # line 3: the next measurement of the y-path (eq. fps-bridge); y itself at sigma = 0
            y_level = self._bridge(y, y_level, sigma, sigma_next, physics, generator)
            # line 4: the prior's reverse step N(m_i, v_i I) around the denoised estimate (eq. fps-prior)
            x0 = self.denoise(x, sigma)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
            mean = x0 + math.sqrt(1 - c) * (sigma_next / sigma) * (x - x0)
            # line 5: the exact conditional given y_{i+1} (eq. fps-conditional) and the weight (eq. fps-weight)
            x, log_lik = self._filter(kalman, mean, c * sigma_next**2, y_level, generator, weighted=k > 1)
            if k > 1:
                # line 6: reweight, and resample when the effective sample size is low
                log_w = log_w + log_lik.reshape(k, b)
                self.check_finite(log_w, i, sigma)
                x, log_w, done = self._resample(x, log_w, generator)
                resampled += done
            self.step_done(i, sigma, x, x0, callback)
        self._info.extra = dict(particles=k, resampled=resampled, solver="svd" if kalman.svd else "cg")
        pick = draw_particle(log_w, generator)  # one particle per measurement, drawn with the final weights
        return x.reshape(k, b, *self.image_shape)[pick, torch.arange(b, device=pick.device)]

    # --- the steps ----------------------------------------------------------------------
    def _bridge(self, y: Tensor, y_level: Tensor, sigma: float, sigma_next: float, physics, generator) -> Tensor:
        """``y_{i+1}`` from ``y_i`` on the DDIM bridge towards ``y`` (eq. fps-bridge)."""
        if sigma_next <= 0:
            return y
        eps = self.randn((y.shape[0], *self.image_shape), generator, y)
        return (y + math.sqrt(1 - self.c) * (sigma_next / sigma) * (y_level - y)
                + math.sqrt(self.c) * sigma_next * physics.A(eps))

    def _filter(self, kalman: "GaussianConditional", mean: Tensor, var: float, y_level: Tensor, generator,
                weighted: bool) -> tuple[Tensor, Tensor | None]:
        """A draw of the conditional of ``N(mean, var I)`` given ``y_level`` (the same for the
        ``K`` particles of a measurement), and the log predictive likelihood when ``weighted``."""
        k = mean.shape[0] // y_level.shape[0]
        y_rows = y_level.repeat(k, *([1] * (y_level.ndim - 1)))
        if var <= 0:  # the last level: the prior step is the point x0_hat
            return kalman.sample(mean, 0.0, y_rows, None, None, weighted)
        z = _particle_noise(mean, k, generator)
        n = _particle_noise(y_rows, k, generator)
        return kalman.sample(mean, var, y_rows, z, n, weighted)

    def _resample(self, x: Tensor, log_w: Tensor, generator) -> tuple[Tensor, Tensor, int]:
        """Systematic resampling of the measurements whose ESS is below ``ess_threshold * K``."""
        k, b = log_w.shape
        low = effective_sample_size(log_w) < self.ess_threshold * k
        # (the uniforms are drawn at every step, so that with one generator per measurement a
        # measurement's result does not depend on the others in the batch)
        idx = systematic_resample(log_w, generator)
        if not low.any():
            return x, log_w, 0
        idx = torch.where(low[None], idx, torch.arange(k, device=idx.device)[:, None])
        rows = (idx * b + torch.arange(b, device=idx.device)[None]).reshape(-1)
        log_w = torch.where(low[None], torch.zeros_like(log_w), log_w)
        return x[rows], log_w - torch.logsumexp(log_w, 0, keepdim=True), 1


class GaussianConditional:
    r"""The conditional of :math:`x \sim \mathcal N(m, v I)` given :math:`y = A x + s n`
    (:math:`n` standard normal), for a linear operator: the Kalman update

    .. math::

        x \mid y \sim \mathcal N\big(m + v A^\top \Sigma^{-1}(y - A m),\; (I/v + A^\top A/s^2)^{-1}\big),
        \qquad \Sigma = s^2 I + v A A^\top,

    drawn by perturbation: :math:`x = m + \sqrt v z + v A^\top \Sigma^{-1}(y - A(m + \sqrt v z) - s n)`
    is an exact draw for :math:`z, n` standard normal (Matheron's rule). :math:`\Sigma^{-1}` is
    applied per coordinate in the singular basis of a deepinv ``DecomposablePhysics``
    (:math:`A = U \operatorname{diag}(\mu) V^\top`, so
    :math:`\Sigma^{-1} = U \operatorname{diag}(1 / (s^2 + v|\mu|^2)) U^\top`) when
    :meth:`check_svd` confirms that form on a random probe, else by CG on
    :math:`\Sigma u = r`.

    :param physics: the linear operator (one row per particle).
    :param noise_std: :math:`s`, a number or one value per row ``(N,)``.
    :param cg_iterations: most CG steps per solve.
    :param cg_tol: relative residual at which CG stops.
    """

    def __init__(self, physics, noise_std: float | Tensor, cg_iterations: int = 20, cg_tol: float = 1e-5) -> None:
        self.physics, self.noise_std = physics, noise_std
        self.cg_iterations, self.cg_tol = int(cg_iterations), float(cg_tol)
        self.svd = False

    def _per_row(self, value: float | Tensor, like: Tensor) -> float | Tensor:
        if isinstance(value, Tensor):
            return value.to(like.real.dtype).reshape(-1, *([1] * (like.ndim - 1)))
        return value

    def check_svd(self, probe_like: Tensor) -> bool:
        """Use the per-coordinate solve if the operator is a ``DecomposablePhysics`` whose
        :math:`\\Sigma^{-1}` in its singular basis inverts :math:`s^2 I + A A^\\top` on a random
        probe (an operator that overrides ``A``, e.g. a real-image MRI, fails it)."""
        self.svd = False
        if not isinstance(self.physics, DecomposablePhysics):
            return False
        gen = torch.Generator(device=probe_like.device).manual_seed(0)
        r = torch.randn(probe_like.shape, generator=gen, device=probe_like.device, dtype=probe_like.real.dtype)
        try:
            self.svd = True
            u = self.solve(r, 1.0)
            back = self._per_row(self.noise_std, r) ** 2 * u + self.physics.A(self.physics.A_adjoint(u))
            self.svd = bool(torch.isfinite(back).all() and (back - r).norm() <= 1e-4 * r.norm())
        except (RuntimeError, TypeError, ValueError):
            self.svd = False
        return self.svd

    def solve(self, r: Tensor, v: float) -> Tensor:
        """:math:`\\Sigma^{-1} r` with :math:`\\Sigma = s^2 I + v A A^\\top`."""
        p = self.physics
        if v == 0:
            return r / self._per_row(self.noise_std, r) ** 2
        if self.svd:
            spectral = p.U_adjoint(r)
            gain = 1.0 / (self._per_row(self.noise_std, spectral) ** 2 + v * p.mask.abs() ** 2)
            return p.U(gain * spectral).to(r.dtype)
        nv = self._per_row(self.noise_std, r) ** 2

        def apply(u: Tensor) -> Tensor:
            return nv * u + v * p.A(p.A_adjoint(u))

        return conjugate_gradient(apply, r, iterations=self.cg_iterations, tol=self.cg_tol)

    def sample(self, m: Tensor, v: float, y: Tensor, z: Tensor | None, n: Tensor | None,
               weighted: bool = False) -> tuple[Tensor, Tensor | None]:
        """``(x, log_lik)``: the draw for standard normal ``z`` (image-shaped) and ``n``
        (measurement-shaped), ``x = m`` when ``v == 0``; and, when ``weighted``, the log
        predictive likelihood :math:`-\\tfrac12 (y - Am)^\\top \\Sigma^{-1}(y - Am)` per row (its
        log-determinant term, the same for every row of one measurement, is left out)."""
        p = self.physics
        r0 = y - p.A(m)
        if v == 0:
            x, u0 = m, (self.solve(r0, 0.0) if weighted else None)
        else:
            e = math.sqrt(v) * p.A(z) + self._per_row(self.noise_std, n) * n  # A x' - A m + s n
            if weighted:
                u0 = self.solve(r0, v)
                u = u0 - self.solve(e, v)
            else:
                u0, u = None, self.solve(r0 - e, v)
            x = m + math.sqrt(v) * z + v * p.A_adjoint(u).to(m.dtype)
        if u0 is None:
            return x, None
        log_lik = -0.5 * (r0.conj() * u0).real.reshape(r0.shape[0], -1).sum(1).to(torch.float64)
        return x, log_lik


def _particle_noise(like: Tensor, k: int, generator) -> Tensor:
    """Standard normal noise shaped like ``like`` (``K * B`` rows, particle (k, b) at row
    ``k * B + b``); a list of ``B`` generators gives each measurement its own stream."""
    b = like.shape[0] // k
    noise = randn_like(like.new_empty((b, k, *like.shape[1:])), generator)
    return noise.transpose(0, 1).reshape(like.shape)
