"""Denoising Diffusion Null-Space Model (DDNM, DDNM+).

Wang, Yu, Zhang, "Zero-Shot Image Restoration Using Denoising Diffusion Null-Space Model",
ICLR 2023 (arXiv:2212.00490); official code wyhuai/DDNM (``functions/svd_ddnm.py:
ddnm_diffusion``, ``ddnm_plus_diffusion``; ``functions/svd_operators.py: Lambda``,
``Lambda_noise``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Real
from .steps import gaussian_noise_std, make_sigmas, per_image, randn_like
from .steps.svd import renoise, spectral_view

__all__ = ["DDNM"]


class DDNM(Sampler):
    """Denoising Diffusion Null-Space Model (Wang, Yu & Zhang, ICLR 2023, Algorithm 1; DDNM+, Sec. 3.3).

    Each step denoises, replaces the range-space part of the estimate by the measurement's
    (eq. 13: :math:`A \\hat x_0 = y` for noiseless data) and re-noises with the DDIM step
    of the official code (:math:`\\eta` sets the fresh-noise std to :math:`\\eta\\sigma_{i+1}`):

    .. math::

        \\hat x_0 = D(x_i, \\sigma_i), \\qquad
        \\hat\\epsilon = (x_i - \\hat x_0)/\\sigma_i, \\qquad
        \\hat x_0' = \\hat x_0 - A^+ (A \\hat x_0 - y),

    .. math::

        x_{i+1} = \\hat x_0' + \\sigma_{i+1}\\big(\\sqrt{1-\\eta^2}\\, \\hat\\epsilon + \\eta\\, z\\big).

    **DDNM+ (noisy y, eqs. 17 and 19 in the SVD form of the official code).** With
    :math:`A = U \\Sigma V^\\top` and :math:`\\rho_j = \\sigma_y / s_j` the noise that the range
    correction brings into coordinate :math:`j`, the correction is scaled,
    :math:`\\hat x_0' = \\hat x_0 - V \\Lambda V^\\top A^+(A \\hat x_0 - y)`, and the re-noising
    becomes :math:`x_{i+1} = \\hat x_0' + V (D_1 V^\\top z + D_2 V^\\top \\hat\\epsilon)` with the
    diagonal :math:`\\Lambda, D_1, D_2` (:math:`\\sigma' = \\sigma_{i+1}`)

    .. math::

        (\\lambda_j, d_{1j}, d_{2j}) = \\begin{cases}
        (1,\\; \\sqrt{\\sigma'^2 - \\rho_j^2},\\; 0) & \\sigma' > \\rho_j \\\\
        (\\sqrt{1-\\eta^2}\\, \\sigma' / \\rho_j,\\; \\eta\\sigma',\\; 0) & \\sigma' < \\rho_j \\\\
        (1,\\; \\eta\\sigma',\\; \\sqrt{1-\\eta^2}\\,\\sigma') & s_j = 0 \\text{ or } \\sigma' = \\rho_j,
        \\end{cases}

    so that every coordinate of :math:`x_{i+1}` carries noise of std :math:`\\sigma'` in all.
    Noiseless data give :math:`\\Lambda = I` and the plain DDNM step above. The last step
    (:math:`\\sigma' = 0`) returns :math:`\\hat x_0'`: for noiseless data it satisfies
    :math:`A x = y` exactly (up to singular values below ``singular_floor``). One network call per
    step, no gradient.

    :math:`A^+` is the exact pseudo-inverse :math:`V \\Sigma^+ U^\\top` of the operator's singular
    basis (:func:`~invdiff.samplers.steps.svd.spectral_view`), not the operator's ``A_dagger``
    (a fast baseline: a Wiener filter for blur, FBP for CT).

    Conversions and departures from the paper, exactly: the official code works on ``[-1, 1]``
    VP states; divided by :math:`\\sqrt{\\bar\\alpha}` they are VE states of noise
    :math:`\\sqrt{1-\\bar\\alpha}/\\sqrt{\\bar\\alpha}`, which on ``[0, 1]`` images is
    :math:`\\sigma = \\tfrac12\\sqrt{1-\\bar\\alpha}/\\sqrt{\\bar\\alpha}`, with the measurement noise
    halved too (its ``sigma_y`` is doubled to the ``[-1, 1]`` scale in the code). Eq. 13 is
    affine-equivariant, and the official thresholds :math:`\\sigma_t < a_t \\sigma_y / s_j`
    (:math:`a_t = \\sqrt{\\bar\\alpha_{t-1}}`, :math:`\\sigma_t = \\sqrt{1 - \\bar\\alpha_{t-1}}`) are
    :math:`\\sigma' < \\rho_j` in VE form, so the same :math:`\\eta` carries over. Time travel
    (RePaint's jumps, Sec. 3.3; official default ``travel_length = travel_repeat = 1``, i.e.
    none) is not implemented. The schedule defaults to the EDM (Karras) one over the prior's
    sigma range; ``schedule="ddpm"`` gives the paper's 100 strided steps of the linear-beta DDPM
    schedule. Singular values below ``singular_floor`` count as 0 (as in DDRM's official
    deblurring / super-resolution SVDs, which DDNM's code reuses). The denoised estimate is not
    clipped (``clip=None``; the official code does not clip).

    :param prior: the diffusion prior.
    :param steps: number of steps (= network calls); the paper uses 100.
    :param eta: :math:`\\eta` (official default 0.85).
    :param singular_floor: singular values below it are treated as 0.
    :param noise_sigma: measurement noise std (``0`` = noiseless: plain DDNM); read from
        ``physics.noise_model`` when ``None``.
    :param schedule: ``"karras"`` or ``"ddpm"``; or pass ``sigmas`` (decreasing, ending at 0).
    :param clip: range the denoised estimate is clamped to, or ``None``.
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.ddnm import DDNM
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5, rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = DDNM(prior)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> bool((physics.A(x_hat) - y).abs().max() < 1e-5), sampler.last_run.nfe
        (True, 100)
    """

    name = "ddnm"
    supports_nonlinear = False
    needs_svd = True  # the operator's singular basis (steps.svd.spectral_view), checked by check_physics
    parameter_constraints = {"singular_floor": Real(0)}

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 100,
        eta: float = 0.85,
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
        self.singular_floor = float(singular_floor)
        self.noise_sigma = noise_sigma
        self.clip = clip

    def _weights(self, view, rho: Tensor | None, sigma_next: float):
        """Eq. 19 in SVD form: :math:`(\\Lambda, D_1, D_2)`, numbers for noiseless data."""
        eta, c = self.eta, math.sqrt(1 - self.eta**2)
        if rho is None:
            return 1.0, eta * sigma_next, c * sigma_next
        observed = view.s > 0
        before, after = observed & (sigma_next > rho), observed & (sigma_next < rho)
        one = torch.ones_like(rho)
        lam = torch.where(after, c * sigma_next / rho.clamp_min(1e-30), one)
        d1 = torch.where(before, (sigma_next**2 - rho.where(before, 0 * one) ** 2).clamp_min(0).sqrt(),
                         eta * sigma_next * one)
        d2 = torch.where(before | after, 0 * one, c * sigma_next * one)
        return lam, d1, d2

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        view = spectral_view(physics, self.image_shape, y, self.singular_floor, where=self.name)
        noise_sigma = gaussian_noise_std(physics, y, self.noise_sigma)
        noisy = bool(torch.as_tensor(noise_sigma > 0).any())
        rho = None  # sigma_y / s_j, the noise of the range correction (DDNM+)
        if noisy:
            sy = per_image(noise_sigma, view.s.ndim)
            rho = sy / view.s.where(view.s > 0, torch.full_like(view.s, math.inf))
        sigmas = self.sigmas.tolist()
        x = self.initial_noise((y.shape[0], *self.image_shape), sigmas[0], x_init, generator, y)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # Alg. 1 line 3 (eq. 12): the denoised estimate and the network's noise
            x0 = self.denoise(x, sigma)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
            eps = (x - x0) / sigma
            # line 4 (eq. 13 / 17): range-space correction, scaled for noisy y
            lam, d1, d2 = self._weights(view, rho, sigma_next)
            x0 = x0 - view.scale(view.pinv(physics.A(x0) - y), lam)
            # line 5 (official DDIM form; eq. 51 for DDNM+): re-noise to sigma_next
            z = randn_like(x, generator) if sigma_next > 0 else None
            if rho is None:
                x = renoise(x0, eps, sigma_next, self.eta, z)
            else:
                x = x0 + (0 if z is None else view.scale(z, d1)) + view.scale(eps, d2)
            self.step_done(i, sigma, x, x0, callback)
        return x
