"""Denoising Diffusion Restoration Models (DDRM).

Kawar, Elad, Ermon, Song, "Denoising Diffusion Restoration Models", NeurIPS 2022
(arXiv:2201.11793); official code bahjat-kawar/ddrm (``functions/denoising.py:
efficient_generalized_steps``, ``functions/svd_replacement.py``). deepinv ships it as
:class:`deepinv.sampling.DDRM` (for :class:`~deepinv.physics.DecomposablePhysics`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Real
from .steps import gaussian_noise_std, make_sigmas, per_image
from .steps.svd import renoise, spectral_view

__all__ = ["DDRM"]


class DDRM(Sampler):
    """Denoising Diffusion Restoration Models (Kawar et al., NeurIPS 2022, eqs. 7-8 and Appendix C).

    DDRM samples in the singular basis of the operator, :math:`A = U \\Sigma V^\\top`
    (:func:`~invdiff.samplers.steps.svd.spectral_view`): with
    :math:`\\bar x = V^\\top x`, :math:`\\bar y = \\Sigma^+ U^\\top y` (measurement noise
    :math:`\\sigma_y / s_j` in coordinate :math:`j`) and the denoised
    :math:`\\bar x_0 = V^\\top D(x_i, \\sigma_i)`, :math:`\\bar\\epsilon = (\\bar x_i - \\bar x_0)/\\sigma_i`,
    each coordinate is updated by one of three rules (eq. 8, VE form, :math:`\\sigma' = \\sigma_{i+1}`,
    :math:`\\rho_j = \\sigma_y / s_j` the noise of :math:`\\bar y_j`):

    .. math::

        \\bar x_{i+1, j} = \\begin{cases}
        \\bar x_{0,j} + \\sigma' \\big(\\sqrt{1-\\eta^2}\\, \\bar\\epsilon_j + \\eta\\, z_j\\big)
            & s_j = 0 \\\\
        \\bar x_{0,j} + \\sqrt{1-\\eta^2}\\, \\sigma' (\\bar y_j - \\bar x_{0,j}) / \\rho_j + \\eta\\, \\sigma' z_j
            & \\sigma' < \\rho_j \\\\
        (1 - \\eta_b)\\, \\bar x_{0,j} + \\eta_b\\, \\bar y_j + \\sqrt{\\sigma'^2 - \\eta_b^2 \\rho_j^2}\\; z_j
            & \\sigma' > \\rho_j
        \\end{cases}

    (at :math:`\\sigma' = \\rho_j` the first rule), then :math:`x_{i+1} = V \\bar x_{i+1}`.
    The start (eq. 7) is :math:`\\bar x_{\\text{start}, j} = \\bar y_j + \\sqrt{\\sigma_0^2 - \\rho_j^2}\\, z_j`
    where :math:`\\sigma_0 > \\rho_j`, and :math:`(V^\\top x_{\\text{init}})_j + \\sigma_0 z_j`
    elsewhere. The last step (:math:`\\sigma' = 0`) returns the denoised estimate. One network
    call per step, no gradient.

    Conversions and departures from the paper, exactly: the official code works on
    :math:`x_t / \\sqrt{\\bar\\alpha_t}` of ``[-1, 1]`` images, a VE state with noise
    :math:`\\sqrt{1-\\bar\\alpha_t}/\\sqrt{\\bar\\alpha_t}`; on ``[0, 1]`` images that is
    :math:`\\sigma = \\tfrac12\\sqrt{1-\\bar\\alpha_t}/\\sqrt{\\bar\\alpha_t}` and the
    measurement noise halves too (its :math:`\\sigma_0 = 0.05` is 0.025 here). The three rules
    are affine-equivariant and depend only on the ratios :math:`\\sigma' s_j / \\sigma_y`, so they
    carry over unchanged with the same :math:`\\eta, \\eta_b`. The official start puts the
    unmeasured coordinates at ``[-1, 1]``'s 0 (grey, 0.5 here); invdiff starts at ``x_init``
    (default 0), a difference of 0.5 against :math:`\\sigma_0 \\approx 80`. The schedule defaults
    to the EDM (Karras) one over the prior's sigma range; ``schedule="ddpm"`` gives the paper's
    20 strided steps of the linear-beta DDPM schedule (evenly spaced timesteps from 999 rather
    than the official ``range(0, 1000, 50)``). Singular values below ``singular_floor`` count as
    0 (official: ``ZERO = 3e-2`` for deblurring and super-resolution, 1e-3 for general H); the
    singular basis is the operator's own (the DFT for circular blur and MRI, a Householder
    reflection per alias group for circular-padding super-resolution) rather than the official
    separable-convolution SVDs with zero padding. The denoised estimate is not clipped
    (``clip=None``; the official code does not clip).

    :param prior: the diffusion prior.
    :param steps: number of steps (= network calls); the paper uses 20.
    :param eta: :math:`\\eta` (paper: 0.85).
    :param eta_b: :math:`\\eta_b` (paper: 1).
    :param singular_floor: singular values below it are treated as 0.
    :param noise_sigma: measurement noise std (``0`` = noiseless); read from
        ``physics.noise_model`` when ``None``.
    :param schedule: ``"karras"`` or ``"ddpm"``; or pass ``sigmas`` (decreasing, ending at 0).
    :param clip: range the denoised estimate is clamped to, or ``None``.
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.ddrm import DDRM
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = DDRM(prior)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_run.nfe, sampler.last_run.nfe_backward
        (torch.Size([1, 1, 8, 8]), 20, 0)
    """

    name = "ddrm"
    supports_nonlinear = False
    needs_svd = True  # the operator's singular basis (steps.svd.spectral_view), checked by check_physics
    parameter_constraints = {"eta_b": Real(0, 1), "singular_floor": Real(0)}

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 20,
        eta: float = 0.85,
        eta_b: float = 1.0,
        singular_floor: float = 3e-2,
        noise_sigma: float | None = None,
        schedule: str = "karras",
        sigmas: Tensor | None = None,
        clip: tuple[float, float] | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        self.sigmas = make_sigmas(prior, steps, schedule, sigmas)
        self.eta = float(eta)
        self.eta_b = float(eta_b)
        self.singular_floor = float(singular_floor)
        self.noise_sigma = noise_sigma
        self.clip = clip

    def _start(self, view, y_bar: Tensor, nsr: Tensor, sigma: float, x_init: Tensor | None, z: Tensor) -> Tensor:
        """Eq. 7: :math:`\\bar x_0` from :math:`q(x_T \\mid y)`."""
        measured = (view.s > 0) & (sigma > nsr)
        mean = view.V_adjoint(x_init) if x_init is not None else torch.zeros_like(z)
        noisy = y_bar + (sigma**2 - nsr.where(measured, torch.zeros_like(nsr)) ** 2).clamp_min(0).sqrt() * z
        return torch.where(measured, noisy, mean + sigma * z)

    def _update(self, view, x0: Tensor, eps: Tensor, y_bar: Tensor, nsr: Tensor, sigma_next: float,
                z: Tensor | None) -> Tensor:
        """Eq. 8: the three rules per coordinate (unmeasured, less noisy than y, noisier than y)."""
        eta, eta_b = self.eta, self.eta_b
        observed = view.s > 0
        unmeasured = renoise(x0, eps, sigma_next, eta, z)
        if sigma_next == 0:  # last step: every rule gives the denoised estimate (noiseless: rule 1)
            return unmeasured
        nsr_safe = torch.where(observed, nsr, torch.ones_like(nsr)).clamp_min(1e-30)
        after = x0 + math.sqrt(1 - eta**2) * sigma_next * (y_bar - x0) / nsr_safe + eta * sigma_next * z
        before = (1 - eta_b) * x0 + eta_b * y_bar \
            + (sigma_next**2 - (eta_b * nsr) ** 2).clamp_min(0).sqrt() * z
        out = torch.where(observed & (sigma_next < nsr), after, unmeasured)
        return torch.where(observed & (sigma_next > nsr), before, out)

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        view = spectral_view(physics, self.image_shape, y, self.singular_floor, where=self.name)
        noise_sigma = per_image(gaussian_noise_std(physics, y, self.noise_sigma), view.s.ndim)
        y_bar = view.y_bar(y)  # Sigma^+ U^T y
        nsr = noise_sigma / view.s.where(view.s > 0, torch.full_like(view.s, math.inf))  # sigma_y / s_j
        image = y.new_zeros((y.shape[0], *self.image_shape), dtype=y.real.dtype)
        sigmas = self.sigmas.tolist()
        x_bar = self._start(view, y_bar, nsr, sigmas[0], x_init, view.noise(image, generator))  # eq. 7
        x = view.V(x_bar)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # the denoised estimate and the noise estimate, in the singular basis
            x0 = self.denoise(x, sigma)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
            x0_bar = view.V_adjoint(x0)
            eps_bar = (x_bar - x0_bar) / sigma
            # eq. 8: the next state, coordinate by coordinate
            z = view.noise(image, generator) if sigma_next > 0 else None
            x_bar = self._update(view, x0_bar, eps_bar, y_bar, nsr, sigma_next, z)
            x = view.V(x_bar)
            self.step_done(i, sigma, x, x0, callback)
        return x
