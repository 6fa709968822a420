"""Denoising Diffusion Models for Plug-and-Play Image Restoration (DiffPIR).

Zhu, Zhang, Liang, Cao, Wen, Timofte, Van Gool, "Denoising Diffusion Models for
Plug-and-Play Image Restoration", CVPR Workshops (NTIRE) 2023 (arXiv:2305.08995);
official code yuanzhi-zhu/DiffPIR.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from deepinv.physics import DecomposablePhysics, Downsampling
from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Choice, Integer, Real
from .steps import (
    ddpm_sigmas,
    gaussian_noise_std,
    make_sigmas,
    per_image,
    proximal_least_squares,
    randn_like,
)

__all__ = ["DiffPIR", "quad_sigmas", "has_closed_form_prox"]


def quad_sigmas(steps: int, num_timesteps: int = 1000) -> Tensor:
    """DiffPIR's ``skip_type="quad"`` schedule as VE noise levels on ``[0, 1]``, then a final 0.

    The official code visits the DDPM timesteps :math:`t_k = T - 1 - \\lfloor\\sqrt{k/(N-1)}\\,T\\rfloor`
    (the last one moved to :math:`t = 1`), dense near :math:`t = 0`; each is mapped to
    :math:`\\sigma_t = \\tfrac12\\sqrt{(1-\\bar\\alpha_t)/\\bar\\alpha_t}` (see
    :func:`~invdiff.samplers.steps.ddpm_sigmas`).
    """
    if steps < 2:
        raise ValueError(f"the quad schedule needs steps >= 2, got {steps}")
    table = ddpm_sigmas(None, num_timesteps)  # table[k] = sigma at t = T-1-k
    seq = torch.sqrt(torch.linspace(0, num_timesteps**2, steps, dtype=torch.float64)).long()
    seq[-1] = seq[-1] - 2  # the official code ends at t = 1 (seq[-1] = T - 2)
    return torch.cat([table[seq], table.new_zeros(1)])


def has_closed_form_prox(physics) -> bool:
    """Whether ``physics.prox_l2`` is deepinv's closed form (SVD-diagonal, or circular FFT downsampling)."""
    prox = type(physics).prox_l2
    if isinstance(physics, DecomposablePhysics) and prox is DecomposablePhysics.prox_l2:
        return True  # Inpainting, MRI with complex images, BlurFFT, ...
    return isinstance(physics, Downsampling) and prox is Downsampling.prox_l2 and physics.padding == "circular"


class DiffPIR(Sampler):
    """DiffPIR (Zhu et al., CVPRW 2023, Algorithm 1): denoise, proximal data step, renoise.

    Each step is one half-quadratic-splitting iteration with the diffusion denoiser as the
    prior's proximal map:

    .. math::

        x_0^{(i)} = D(x_i, \\sigma_i), \\qquad
        \\hat x_0 = \\arg\\min_x \\|y - A x\\|^2 + \\rho_i \\|x - x_0^{(i)}\\|^2
                  = (A^\\top A + \\rho_i I)^{-1}(A^\\top y + \\rho_i x_0^{(i)}),

    .. math::

        \\hat\\epsilon = (x_i - \\hat x_0)/\\sigma_i, \\qquad
        x_{i+1} = \\hat x_0 + \\sigma_{i+1}\\big(\\sqrt{1-\\zeta}\\,\\hat\\epsilon + \\sqrt{\\zeta}\\, z\\big),

    with :math:`\\rho_i = \\lambda\\, s^2 / \\bar\\sigma_i^2` (paper eq. 13/14), :math:`s` the
    measurement noise std. The data step is deepinv's closed-form ``physics.prox_l2`` where it
    exists (:func:`has_closed_form_prox`: inpainting, blur, circular super-resolution,
    complex single-coil MRI) and otherwise ``cg_iterations`` conjugate-gradient steps on
    :math:`(I + \\rho_i^{-1} A^\\top A)x = x_0^{(i)} + \\rho_i^{-1} A^\\top y` started from
    :math:`x_0^{(i)}`, calling only ``A`` and ``A_adjoint`` (CT, real-image MRI, ...; a few
    milliseconds per step at 64², where deepinv's generic ``prox_l2`` takes about a second).
    As in the official code, the last step returns the denoiser's estimate without a data
    step. One network call per step, no backward pass (``nfe_backward == 0``).

    **Exact conversion of** :math:`\\rho`. The official code computes
    ``rhos = lambda_ * sigma**2 / sigma_ks**2`` with ``sigma`` the noise std of the ``[0, 1]``
    image (``noise_level_img``) and ``sigma_ks`` :math:`=\\sqrt{(1-\\bar\\alpha_t)/\\bar\\alpha_t}`
    the VE noise level of the ``[-1, 1]`` image, and solves the data step on ``[0, 1]`` images
    (deblur/SR) or ``[-1, 1]`` images (inpainting, where :math:`\\rho` is scale-free). In
    invdiff's units (:math:`s` and :math:`\\sigma_i` both on ``[0, 1]``,
    :math:`\\bar\\sigma = 2\\sigma_i`):

    .. math:: \\rho_i = \\frac{\\lambda\\, s^2}{4\\, \\sigma_i^2},

    dimensionless in image units and proportional to :math:`s^2`, so it carries the scale of
    the measurements (CT sinograms, MRI k-space) with it. The renoising step is the official
    one (its ``eta = 0``) divided by :math:`\\sqrt{\\bar\\alpha_{t-1}}` and mapped to ``[0, 1]``,
    exactly. Noiseless measurements use :math:`s = ` ``min_noise`` (the official code would
    divide by zero).

    **Defaults.** 100 steps (NFE), :math:`\\lambda = 7`, :math:`\\zeta = 0.3`: the paper's
    Gaussian-deblurring setting. Other settings in the official scripts: inpainting
    ``lambda_ = 1``, ``zeta = 1`` (20 steps); the scripts' default lines for deblur / SR read
    ``lambda_ = 1``, ``zeta = 0.1``. Against the exact posterior of a Gaussian prior,
    ``zeta=1`` halves the error of the posterior mean on inpainting -- use ``zeta=1`` for
    inpainting (measured: ``docs/samplers/diffpir.md``). Schedule: the official
    ``skip_type="quad"`` timesteps (:func:`quad_sigmas`); ``"karras"`` / ``"ddpm"`` or
    explicit ``sigmas`` also work.

    Departures from the official code: the sampler starts from :math:`\\sigma_0 z`
    (plus ``x_init`` when given) rather than from the noised measurement (only defined
    when :math:`A` maps images to images; at :math:`\\bar\\alpha_T \\approx 4\\cdot 10^{-5}`
    the two agree to within the noise); the denoised estimate is clipped to ``clip``
    (``None`` for analytic priors); its ``guidance_scale`` (1) and the unused
    "skip when the noise level is below the image noise" branch are left out.

    :param prior: the diffusion prior.
    :param steps: number of steps (= network calls).
    :param lam: :math:`\\lambda`, the weight of the prior in the data step.
    :param zeta: :math:`\\zeta \\in [0, 1]`, fraction of fresh noise in the renoising step.
    :param noise_sigma: measurement noise std; read from ``physics.noise_model`` when ``None``.
    :param min_noise: floor of :math:`s` (noiseless measurements).
    :param data_solver: ``"auto"`` (closed form when available, else CG), ``"prox"`` (always
        ``physics.prox_l2``) or ``"cg"``.
    :param cg_iterations: CG steps of the data step when it is solved iteratively.
    :param cg_tol: relative residual at which CG stops.
    :param schedule: ``"quad"`` (official), ``"karras"`` or ``"ddpm"``; or ``sigmas``.
    :param clip: range the denoised estimate is clamped to; ``None`` disables it.
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.diffpir import DiffPIR
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = DiffPIR(prior, steps=20)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_run.nfe, sampler.last_run.nfe_backward
        (torch.Size([1, 1, 8, 8]), 20, 0)
    """

    name = "diffpir"
    supports_nonlinear = False
    parameter_constraints = {
        "steps": Integer(2),  # the quad schedule's first and last levels
        "lam": Real(0, closed="neither"),
        "zeta": Real(0, 1),
        "data_solver": Choice("auto", "prox", "cg"),
        "schedule": Choice("quad", "karras", "ddpm"),
    }

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 100,
        lam: float = 7.0,
        zeta: float = 0.3,
        noise_sigma: float | None = None,
        min_noise: float = 1e-3,
        data_solver: str = "auto",
        cg_iterations: int = 10,
        cg_tol: float = 1e-5,
        schedule: str = "quad",
        sigmas: Tensor | None = None,
        clip: tuple[float, float] | None = (0.0, 1.0),
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        if sigmas is None and schedule == "quad":
            sigmas = quad_sigmas(steps)
        self.sigmas = make_sigmas(prior, steps, schedule, sigmas)
        self.lam = float(lam)
        self.zeta = float(zeta)
        self.noise_sigma = noise_sigma
        self.min_noise = float(min_noise)
        self.data_solver = data_solver
        self.cg_iterations = int(cg_iterations)
        self.cg_tol = float(cg_tol)
        self.clip = clip

    def _data_step(self, physics, x0: Tensor, y: Tensor, rho: float, closed_form: bool) -> Tensor:
        """eq. 13: ``argmin_x ||y - A x||^2 + rho ||x - x0||^2`` (closed form or warm-started CG)."""
        if closed_form:  # deepinv: argmin 1/2 ||Ax - y||^2 + 1/(2 gamma) ||x - z||^2
            return physics.prox_l2(x0, y, 1.0 / rho).to(x0.dtype)
        return proximal_least_squares(physics, x0, y, 1.0 / rho, self.cg_iterations, self.cg_tol)

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        s = per_image(gaussian_noise_std(physics, y, self.noise_sigma, self.min_noise))
        closed_form = self.data_solver == "prox" or (self.data_solver == "auto" and has_closed_form_prox(physics))
        sigmas = self.sigmas.tolist()
        shape = (y.shape[0], *self.image_shape)
        x = self.initial_noise(shape, sigmas[0], x_init, generator, y)  # x_init (warm start) noised to sigma_0
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # Alg. 1 line 3: x0 = D(x_t) (eq. 12)
            x0 = self.denoise(x, sigma)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
            if sigma_next > 0:
                # Alg. 1 line 4: data proximal step, rho_t = lambda s^2 / sigmabar_t^2 ([0, 1] units)
                rho = self.lam * s**2 / (4 * sigma**2)
                x0 = self._data_step(physics, x0, y, rho, closed_form)
                # Alg. 1 lines 5-6: eps_hat from the corrected x0, then renoise with a zeta share of fresh noise
                eps = (x - x0) / sigma
                z = randn_like(x, generator) if self.zeta > 0 else torch.zeros_like(x)
                x = x0 + sigma_next * (math.sqrt(1 - self.zeta) * eps + math.sqrt(self.zeta) * z)
            else:  # last step: the denoised estimate, no data step (official code)
                x = x0
            self.step_done(i, sigma, x, x0, callback)
        return x
