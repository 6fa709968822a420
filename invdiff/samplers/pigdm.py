r"""Pseudoinverse-Guided Diffusion Models (ΠGDM).

Song, Vahdat, Mardani, Kautz, "Pseudoinverse-Guided Diffusion Models for Inverse Problems",
ICLR 2023 (OpenReview 9_gsMA8MRKQ). There is no official release; the implementations read
are NVlabs/RED-diff (``algos/pgdm.py``, by two of the authors) and devzhk/InverseBench
(``algo/pigdm.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Real
from .steps import (
    GaussianGuidance,
    ddim_step,
    denoiser_error_variance,
    gaussian_noise_std,
    guidance_gradient,
    make_sigmas,
    per_image,
    randn_like,
)

__all__ = ["PiGDM", "gram_diagonal"]


def gram_diagonal(physics, y: Tensor) -> Tensor | None:
    r"""The diagonal :math:`d` of :math:`A A^\top` (shaped like ``y``) when the operator is one
    whose :math:`A A^\top` is known to be diagonal, else ``None``.

    Diagonal: masking (deepinv ``Inpainting`` and ``Demosaicing``: :math:`d = m^2`), denoising
    (:math:`d = 1`) and Cartesian MRI of complex images (:math:`A = M F` with an orthonormal
    :math:`F`: :math:`d = M`). Not diagonal: invdiff's MRI of *real* images (the real part
    couples :math:`k` and :math:`-k`), multi-coil MRI, blur, CT. For a diagonal
    :math:`A A^\top`, :math:`d = A A^\top \mathbf 1`.
    """
    from deepinv.physics import MRI, Denoising, Inpainting, MultiCoilMRI

    if getattr(physics, "real_input", False) or isinstance(physics, MultiCoilMRI):
        return None
    if not isinstance(physics, (Inpainting, Denoising, MRI)):
        return None
    return physics.A(physics.A_adjoint(torch.ones_like(y))).real


class PiGDM(Sampler):
    r"""Pseudoinverse-Guided Diffusion Models (Song et al., ICLR 2023, Algorithm 1).

    Each step denoises the iterate, takes a DDIM step of the prior, and adds the
    pseudoinverse guidance: the score of the Gaussian approximation
    :math:`p(y \mid x_i) \approx \mathcal N(A \hat x_0,\; r_i^2 A A^\top + s^2 I)` (eq. 7,
    from :math:`p(x_0 \mid x_i) \approx \mathcal N(\hat x_0, r_i^2 I)`), a vector-Jacobian
    product through the denoiser (eq. 8), weighted by :math:`r_i^2`:

    .. math::

        \hat x_0 = D(x_i, \sigma_i), \qquad
        g_i = \Big(\big(y - A \hat x_0\big)^\top \big(r_i^2 A A^\top + s^2 I\big)^{-1}
              A\, \frac{\partial \hat x_0}{\partial x_i}\Big)^\top \quad\text{(eq. 8)},

    .. math::

        c_i = \eta\, \sigma_{i+1}\sqrt{1 - \sigma_{i+1}^2/\sigma_i^2}, \qquad
        x_{i+1} = \hat x_0 + \sqrt{\sigma_{i+1}^2 - c_i^2}\, \frac{x_i - \hat x_0}{\sigma_i}
                  + c_i\, z + \zeta\, r_i^2\, g_i,
        \qquad r_i^2 = \frac{\sigma_i^2 \sigma_d^2}{\sigma_i^2 + \sigma_d^2}

    (:math:`r_i^2` is :func:`~invdiff.samplers.steps.denoiser_error_variance`, the error model DPS
    shares; :math:`\sigma_d` the prior's ``sigma_data``). In the noiseless limit
    :math:`r_i^2 g_i = J^\top (A^{+} y - A^{+} A \hat x_0)`, the pseudoinverse guidance the
    method is named after. The solve with :math:`r_i^2 A A^\top + s^2 I` is closed form where
    :math:`A A^\top` is diagonal (inpainting, MRI of complex images: :func:`gram_diagonal`),
    else at most ``cg_iterations`` conjugate-gradient steps in measurement space, warm-started
    from the previous step's solution. The last step (:math:`\sigma_{N} = 0`) returns
    :math:`\hat x_0 + \zeta r^2 g`. Cost: one forward and one backward pass of the network per step.

    **Operators.** The noisy guidance (eq. 8) needs a linear :math:`A` with ``A_adjoint``;
    the paper's nonlinear variant (noiseless, with a hand-made pseudo-inverse :math:`h^\dagger`
    such as JPEG decoding) has no counterpart in deepinv's physics and is not implemented:
    nonlinear operators are refused.

    Conversions and departures from the paper, exactly: the paper's DDIM update on ``[-1, 1]``
    VP states, :math:`x_s = \sqrt{\bar\alpha_s}\hat x_0 + c_1 \epsilon + c_2 \hat\epsilon
    + \sqrt{\bar\alpha_t}\, g^{VP}`, is, divided by :math:`\sqrt{\bar\alpha_s}` and mapped to
    ``[0, 1]`` VE states, the step above with the same :math:`\eta` (the
    :math:`\sqrt{\bar\alpha_t}` turns the VP gradient into the VE one; the RED-diff code's
    ``awd=True``); the paper's :math:`r_t^2 = \sigma_t^2/(1 + \sigma_t^2)` for unit-variance
    data on ``[-1, 1]`` is the formula above with :math:`\sigma_d = 1/2` on ``[0, 1]``, here the
    prior's own :math:`\sigma_d`; measurement noise is on the ``[0, 1]`` scale (the paper's
    :math:`\sigma_y = 0.05` is 0.025 here) and floored at ``min_noise`` (noiseless data,
    as InverseBench does); the schedule defaults to the EDM (Karras) one over the prior's
    sigma range rather than 100 strided DDPM steps (``schedule="ddpm"`` gives those);
    :math:`\hat x_0` is clipped to ``clip`` before the misfit (as DPS). ``zeta`` (1 = the
    paper) scales the guidance.

    :param prior: the diffusion prior.
    :param steps: number of steps (= network calls); the paper uses 100.
    :param eta: DDIM stochasticity (paper: 1.0).
    :param zeta: multiplier of the guidance (1 = the paper).
    :param schedule: ``"karras"`` or ``"ddpm"``; or pass ``sigmas`` (decreasing, ending at 0).
    :param clip: range :math:`\hat x_0` is clamped to; ``None`` disables it (analytic priors).
    :param noise_sigma: measurement noise std :math:`s`; read from ``physics.noise_model`` when ``None``.
    :param min_noise: floor of :math:`s` (noiseless measurements).
    :param cg_iterations: most CG steps of the solve where :math:`A A^\top` is not diagonal.
    :param cg_tol: relative residual at which CG stops.
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.pigdm import PiGDM
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = PiGDM(prior, steps=20)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_run.nfe, sampler.last_run.nfe_backward
        (torch.Size([1, 1, 8, 8]), 20, 20)
    """

    name = "pigdm"
    supports_nonlinear = False
    parameter_constraints = {"min_noise": Real(0, closed="neither")}

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 100,
        eta: float = 1.0,
        zeta: float = 1.0,
        schedule: str = "karras",
        sigmas: Tensor | None = None,
        clip: tuple[float, float] | None = (0.0, 1.0),
        noise_sigma: float | None = None,
        min_noise: float = 5e-5,
        cg_iterations: int = 5,
        cg_tol: float = 1e-3,
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        self.sigmas = make_sigmas(prior, steps, schedule, sigmas)
        self.eta, self.zeta = float(eta), float(zeta)
        self.clip = clip
        self.noise_sigma, self.min_noise = noise_sigma, float(min_noise)
        self.cg_iterations, self.cg_tol = int(cg_iterations), float(cg_tol)

    def likelihood_precision(self, physics, y: Tensor) -> Callable[[float], Callable[[Tensor], Tensor]]:
        r"""``r2 -> (v -> (r2 A A^T + s^2 I)^{-1} v)`` for this run: closed form where
        :math:`A A^\top` is diagonal (:func:`gram_diagonal`), else warm-started CG
        (:class:`~invdiff.samplers.steps.GaussianGuidance`)."""
        s2 = per_image(gaussian_noise_std(physics, y, self.noise_sigma, self.min_noise), y.ndim) ** 2
        d = gram_diagonal(physics, y)
        if d is not None:
            return lambda r2: (lambda v: v / (s2 + r2 * d))
        return GaussianGuidance(physics, s2, None, self.cg_iterations, self.cg_tol).precision

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas = self.sigmas.tolist()
        precision = self.likelihood_precision(physics, y)
        x = self.initial_noise((y.shape[0], *self.image_shape), sigmas[0], x_init, generator, y)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            r2 = denoiser_error_variance(sigma, self.prior.sigma_data)
            # Alg. 1: x0_hat = D(x_i) and the guidance g (eq. 8), a VJP through the denoiser;
            # guidance_gradient returns the gradient of the misfit, -g
            x0, misfit_grad, _ = guidance_gradient(self.denoise, x, sigma, y, physics, "squared", precision(r2),
                                                   self.clip)
            # Alg. 1: the DDIM step of the prior plus the r^2-weighted guidance
            noise = randn_like(x, generator) if (self.eta > 0 and sigma_next > 0) else None
            x = ddim_step(x, x0, sigma, sigma_next, self.eta, noise) - self.zeta * r2 * misfit_grad
            self.step_done(i, sigma, x, x0, callback)
        return x
