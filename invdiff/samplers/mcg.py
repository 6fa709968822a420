"""Manifold Constrained Gradient (MCG).

Chung, Sim, Ryu, Ye, "Improving Diffusion Models for Inverse Problems using Manifold
Constraints", NeurIPS 2022 (arXiv:2206.00941); official code HJ-harry/MCG_diffusion.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from ._steps import conjugate_gradient, ddim_step, guidance_gradient, measurement_noise, randn_like
from .dps import DPS

__all__ = ["MCG"]


class MCG(DPS):
    """Manifold Constrained Gradient (Chung et al., NeurIPS 2022, Algorithm 1 / eq. 14).

    Each step is a DPS step (the ancestral step of the prior corrected by the gradient of the
    data misfit through the denoiser, the *manifold constrained gradient*, eq. 13) followed by
    the projection onto the measurement-consistent set at the current noise level (eq. 14):

    .. math::

        x'_{i+1} = \\mathrm{ancestral}(x_i, \\hat x_0) - \\gamma_i \\nabla_{x_i}\\mathcal L(y, A\\hat x_0),
        \\qquad y_{i+1} = y + \\sigma_{i+1} A z,

    .. math::

        x_{i+1} = x'_{i+1} + A^\\top \\big(A A^\\top + \\lambda_{i+1} I\\big)^{-1} (y_{i+1} - A x'_{i+1}),
        \\qquad \\lambda_{i+1} = s^2 / \\sigma_{i+1}^2 .

    For :math:`\\lambda = 0` (noiseless measurements, the paper's setting) this is the
    projection :math:`x + A^+(y_{i+1} - A x)`; for inpainting it is exactly the official
    code's replacement of the measured pixels by ``q_sample(y, t)`` (the measurement noised
    to the next level, :math:`y + \\sigma_{i+1} M z`), and :math:`A^\\top A` is the mask.
    The inverse is computed by at most ``projection_iterations`` conjugate-gradient steps in
    measurement space, warm-started from the previous step (one ``A A^T`` each; exact in one
    step where :math:`AA^\\top` is a multiple of the identity on its range: inpainting,
    complex single-coil MRI). ``physics.A_dagger`` is not used: invdiff's operators give FBP
    (CT), the real part of the zero-filled inverse (real-image MRI: not the pseudo-inverse,
    because :math:`AA^\\top \\ne I` for the real embedding) and Wiener filters there.

    Noise (a departure from the paper, which is noiseless): the hard projection forces
    :math:`A x = y` and reproduces the measurement noise in the reconstruction. invdiff
    relaxes it into the Gaussian conditioning of an iterate of prior variance
    :math:`\\sigma_{i+1}^2` on a measurement of noise variance :math:`s^2` (a Kalman / Tikhonov
    step, as later papers, e.g. DDNM+ and DiffPIR, scale the projection by the noise level):
    the projection is hard while :math:`\\sigma_{i+1}\\|A\\| \\gg s`, fades out as the noise
    level of the iterate reaches that of the data, and is skipped at the final step
    (:math:`\\sigma = 0`), where the likelihood gradient alone fits the data. Poisson noise
    (gain ``g``) uses the per-entry variance :math:`g|y|` in place of :math:`s^2`.
    ``relax=False`` gives the paper's hard projection (at every step, the last included).

    The gradient step :math:`\\gamma_i \\nabla \\mathcal L` is DPS's
    (:class:`~invdiff.samplers.DPS`; same parameters ``zeta``, ``weighting``, ``eta``, ``clip``,
    ``noise_sigma``, ``operator_norm``, ``cg_iterations``): by default the scale-aware
    ``"likelihood"`` rule, :math:`\\zeta(\\sigma_i^2 - \\sigma_{i+1}^2) J^\\top A^\\top(s^2 I +
    r_i^2 AA^\\top)^{-1}(A\\hat x_0 - y)`; ``weighting="paper"`` is the official codes' rule,
    the gradient of :math:`\\|y - A\\hat x_0\\|_2` (not squared; Poisson: weighted by
    ``1/|y|``) times ``zeta`` converted from ``[-1, 1]`` VP coordinates over 1000 DDPM steps
    exactly as in DPS (MCG's inpainting code uses the same norm gradient with ``alpha`` in
    the role of ``zeta``). The official inpainting code keeps only the unmeasured part of the
    gradient, ``g * (1 - M)``; with the hard projection the measured part is overwritten
    anyway, so the full gradient is used here for every operator.

    Not implemented: the paper's CT variant (VE predictor-corrector over 2000 steps with the
    step :math:`x \\mathrel{+}= \\lambda A^\\top(y - Ax)/(A^\\top A 1)`); the CG projection
    above replaces it (a few CG steps on the normal equations are a better-conditioned
    version of the same scaled back-projection).

    Measurement noise is on the ``[0, 1]`` image scale. Cost per step: one forward and one
    backward pass of the network (``nfe = nfe_backward = steps``), plus at most
    ``cg_iterations`` + ``projection_iterations`` applications of :math:`AA^\\top` and one
    of ``A``.

    :param prior: the diffusion prior.
    :param steps: number of steps (= network calls).
    :param zeta: multiplier of the gradient step (see :class:`~invdiff.samplers.DPS`).
    :param weighting: ``"likelihood"`` or ``"paper"`` (see :class:`~invdiff.samplers.DPS`).
    :param relax: relax the projection by the noise level (see above); ``False`` = hard projection.
    :param projection_iterations: most CG steps of the projection's solve.
    :param projection_tol: relative residual at which that CG stops.
    :param kwargs: the remaining parameters of :class:`~invdiff.samplers.DPS` (``schedule``,
        ``sigmas``, ``eta``, ``clip``, ``noise_sigma``, ``operator_norm``, ``cg_iterations``,
        ``cg_tol``, ``verbose``).

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.mcg import MCG
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> x_hat = MCG(prior, steps=50)(y, physics, generator=g)
        >>> x_hat.shape
        torch.Size([1, 1, 8, 8])
    """

    name = "mcg"

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 200,
        zeta: float = 1.0,
        weighting: str = "likelihood",
        relax: bool = True,
        projection_iterations: int = 10,
        projection_tol: float = 1e-4,
        **kwargs,
    ) -> None:
        super().__init__(prior, steps=steps, zeta=zeta, weighting=weighting, **kwargs)
        self.relax = bool(relax)
        self.projection_iterations = int(projection_iterations)
        self.projection_tol = float(projection_tol)

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas = self.sigmas.tolist()
        shape = (y.shape[0], *self.prior.image_shape)
        dtype = y.real.dtype
        kind, level = measurement_noise(physics) if self.noise_sigma is None else ("gaussian", self.noise_sigma)
        noise_var = level * y.abs().clamp_min(level) if kind == "poisson" else level**2
        if self.weighting == "paper":
            base_weight = 1.0 / y.abs().clamp_min(1e-3) if kind == "poisson" else None
            paper_scale = self._paper_scale()
        else:
            norm_a = self._likelihood_norm(physics, y)
            warm: list[Tensor | None] = [None]
        proj_warm: list[Tensor | None] = [None]
        x = sigmas[0] * randn_like(y.new_zeros(shape, dtype=dtype), generator)
        if x_init is not None:  # warm start: x_init noised to the first level
            x = x + x_init.to(dtype)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # eq. 13: x0_hat = D(x_i) and the manifold constrained gradient through the network
            if self.weighting == "paper":
                x0, grad, _ = guidance_gradient(self.denoise, x, sigma, y, physics, "norm", base_weight, self.clip)
                gamma = self.zeta * paper_scale[i]
            else:
                r2 = sigma**2 * self.prior.sigma_data**2 / (sigma**2 + self.prior.sigma_data**2)
                precision = self._precision(physics, noise_var, r2, norm_a, warm)
                x0, grad, _ = guidance_gradient(self.denoise, x, sigma, y, physics, "squared", precision, self.clip)
                gamma = self.zeta * (sigma**2 - sigma_next**2)
            # Alg. 1: ancestral step of the prior, minus the gradient
            noise = randn_like(x, generator) if (self.eta > 0 and sigma_next > 0) else None
            x = ddim_step(x, x0, sigma, sigma_next, self.eta, noise) - gamma * grad
            # eq. 14: projection onto {A x = y_{i+1}}, y_{i+1} = y noised to sigma_{i+1}
            x = self._project(x, y, physics, sigma_next, noise_var, generator, proj_warm)
            self.check_finite(x, i, sigma)
            self._info.steps += 1
            if callback is not None:
                callback(dict(i=i, sigma=sigma, x=x, x0=x0))
        return x

    def _likelihood_norm(self, physics, y: Tensor) -> float | None:
        """``||A||^2`` for DPS's scalar error model where it is used (nonlinear operators), else None."""
        from deepinv.physics import LinearPhysics

        from ._steps import operator_norm_squared

        if self.operator_norm is not None:
            return self.operator_norm
        if self.cg_iterations == 0 or not isinstance(physics, LinearPhysics):
            return operator_norm_squared(physics, self.prior.image_shape, device=y.device, dtype=y.real.dtype)
        return None

    def _project(self, x: Tensor, y: Tensor, physics, sigma_next: float, noise_var, generator, warm: list) -> Tensor:
        """``x + A^T (A A^T + lambda I)^{-1} (y + sigma_next A z - A x)``, ``lambda = noise_var / sigma_next^2``."""
        noisy = torch.as_tensor(noise_var).max() > 0 if self.relax else False
        if noisy and sigma_next <= 0:
            return x  # lambda = inf: the last step keeps the likelihood-guided estimate
        lam = noise_var / sigma_next**2 if noisy else 0.0
        y_t = y + sigma_next * physics.A(randn_like(x, generator)) if sigma_next > 0 else y
        r = y_t - physics.A(x)

        def apply(u: Tensor) -> Tensor:
            return physics.A(physics.A_adjoint(u)) + lam * u

        warm[0] = conjugate_gradient(apply, r, x0=warm[0], iterations=self.projection_iterations,
                                     tol=self.projection_tol)
        return x + physics.A_adjoint(warm[0])
