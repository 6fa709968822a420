r"""PSLD: posterior sampling with latent diffusion, DPS through the decoder plus a gluing term.

Rout, Raoof, Daras, Caramanis, Dimakis, Shakkottai, "Solving Linear Inverse Problems Provably
via Posterior Sampling with Latent Diffusion Models", NeurIPS 2023 (arXiv:2307.00619); official
code LituRout/PSLD (``stable-diffusion/ldm/models/diffusion/psld.py``: ``p_sample_ddim``, the
``general_inverse`` and ``inpainting`` branches; ``scripts/inverse.py`` for the defaults).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from ..priors.latent import IdentityAutoencoder, LatentDiffusionPrior
from .base import Sampler
from .params import Choice, Integer, Real
from .steps import (
    GaussianGuidance,
    batch_norm,
    ddim_step,
    ddpm_timestep,
    denoiser_error_variance,
    likelihood_variance,
    make_sigmas,
    operator_norm_squared,
    project_measurements,
    randn_like,
)
from .steps.guidance import jacobian_norm_squared
from .steps.updates import ddim_score_weight

__all__ = ["PSLD"]


@dataclass
class PSLDRun:
    """The per-run state of PSLD: the likelihood's noise variance, the shared Gaussian guidance
    and the decoder's Jacobian norm (computed at the first denoised latent unless given)."""

    noise_var: float | Tensor
    guidance: GaussianGuidance
    decoder_norm: float | None


class PSLD(Sampler):
    r"""PSLD (Rout et al., NeurIPS 2023; the official ``p_sample_ddim``) on a
    :class:`~invdiff.priors.LatentDiffusionPrior`.

    DDIM in the latent space of an autoencoder (:math:`\mathcal D` the decoder, :math:`\mathcal E`
    the encoder, :math:`\hat z_0 = D_z(z_i, \sigma_i)` the latent denoiser), each step corrected
    by the gradient, through the denoiser, of two terms of :math:`\hat z_0`:

    .. math::

        z_{i+1} = \mathrm{DDIM}(z_i, \hat z_0) - \omega_i \nabla_{z_i} \mathcal L\big(y, A\mathcal D(\hat z_0)\big)
                  - \gamma_i \nabla_{z_i} \mathcal G\big(\hat z_0 - \mathcal E(\Pi_y \mathcal D(\hat z_0))\big),

    the DPS data term :math:`\mathcal L` through the decoder, and the *gluing* term
    :math:`\mathcal G`, which asks :math:`\hat z_0` to be the encoding of its own decoded image
    with the measured part replaced by the data, :math:`\Pi_y x = A^\top y + (I - A^\top A)x` in the
    paper (a fixed point of :math:`\mathcal E \circ \Pi_y \circ \mathcal D`; the decoder is not
    injective, so the DPS term alone can move the latent off the encoder's range). The gradient
    runs through everything (denoiser, decoder, projection, encoder), as in the official code.

    **The projection.** :math:`A^\top y + (I - A^\top A)x` is the projection onto
    :math:`\{Ax = y\}` only when :math:`A^\top A` is a projector (inpainting: the paper's
    operators have orthonormal rows; the official code's "transpose" of a blur is the identity
    and of super-resolution an upsampling, so there :math:`\Pi_y` is no projection). invdiff uses
    the projection for every linear operator, :math:`\Pi_y x = x + A^{+}(y - Ax) = A^{+}y + (I - A^{+}A)x`
    (CG on the normal equations, ``projection_iterations`` steps,
    :func:`~invdiff.samplers.steps.project_measurements`): the paper's form for inpainting,
    exactly, and the pseudo-inverse form for the operators where :math:`A^\top A` is no
    projector (blur, CT, MRI). Its vector-Jacobian product is the
    homogeneous projection :math:`(I - A^{+}A)v` (symmetric), applied the same way.

    ``weighting="paper"``: the official terms and steps, :math:`\mathcal L = \omega\|y - A\mathcal D(\hat z_0)\|_2`
    and :math:`\mathcal G = \gamma\|g\|_2` (norms, not squared; per image here, of the whole batch
    in the official code; ``scripts/inverse.py``: :math:`\omega = 1`, :math:`\gamma = 0.1`, the
    LDM-FFHQ runs :math:`\omega = \gamma = 0.1`), subtracted as they are after each of 1000 DDIM
    steps (eta 0) in VP coordinates on ``[-1, 1]`` images. In invdiff's VE coordinates on
    ``[0, 1]`` images the step is :math:`\sqrt{(1+\sigma_i^2)(1+\sigma_{i+1}^2)}\,\Delta t_i` times
    the gradient, with ``2 omega`` for the data term (the image range) and :math:`\Delta t_i` the
    DDPM steps step ``i`` spans (:func:`~invdiff.samplers.steps.ddpm_timestep` of :math:`\sigma/2`:
    ADM's linear schedule, not SD's scaled-linear one), so that a coarse schedule carries the
    guidance of the steps it replaces, as DPS's paper rule. Latents keep the encoder's scale.
    Pass ``omega=1, gamma=0.1, eta=0, steps=1000`` for the official run. That rule is tuned to
    Stable Diffusion (unit-scale 64x64x4 latents of 512x512 images): its pull grows with the
    latent scale and the image size, and a coarse schedule multiplies it. On invdiff's problems
    it is off scale: on the exactness problems (100 steps) mean errors 0.25-0.64 and std ratios
    0.28-1.12 (the default rule: 0.03-0.14 and 0.78-0.92), and 5.7 dB on the analytic demo's CT
    at 40 steps, where its steps overshoot (the default: 44.1 dB; exact posterior mean 45.8).

    ``weighting="likelihood"`` (default, a departure): both terms become Gaussian
    log-densities, applied with the weight the DDIM step gives the prior's score,
    :math:`\kappa_i = \sigma_i^2 - \sigma_i\sqrt{\sigma_{i+1}^2 - c_i^2}`
    (:func:`~invdiff.samplers.steps.ddim_score_weight`; :math:`\sigma_i^2 - \sigma_{i+1}^2` for
    eta 1, :math:`\sigma_i(\sigma_i - \sigma_{i+1})` for eta 0), so that the step is the DDIM
    step of the posterior, whatever the number of steps, ``eta`` and the latent scale:

    .. math::

        \omega_i \nabla\mathcal L = \omega\,\kappa_i\, \nabla_{z_i} \tfrac12 r^\top
            \big(s^2 I + \rho_i^2 A A^\top\big)^{-1} r, \qquad
        \gamma_i \nabla\mathcal G = \gamma\,\kappa_i\, \nabla_{z_i} \frac{\|g\|^2}{2 r_i^2},

    with :math:`r = y - A\mathcal D(\hat z_0)`, :math:`r_i^2 = \sigma_i^2\sigma_d^2/(\sigma_i^2 + \sigma_d^2)`
    the latent denoiser's error variance (ΠGDM's model, :math:`\sigma_d` the latent prior's
    ``sigma_data``) and :math:`\rho_i^2 = r_i^2 \|J_{\mathcal D}\|^2` the same error pushed through the
    decoder (:math:`\|J_{\mathcal D}\|^2` by power iteration at the first :math:`\hat z_0`, or
    ``decoder_norm``): the data term is ReSample's latent DPS step (invariant to the scale of
    ``A``; the solve by at most ``cg_iterations`` warm-started CG steps, :math:`\|A\|^2 I` for
    :math:`AA^\top` when ``operator_norm`` is given). The gluing residual is measured against
    :math:`r_i^2`, and with noisy data the projection is the noise-aware one,
    :math:`\Pi_y x = x + A^\top(AA^\top + s^2/\rho_i^2\, I)^{-1}(y - Ax)` (the exact one for
    noiseless data): the paper's exact projection pulls the latent onto the noise. On a pixel
    prior (identity autoencoder) and inpainting the gluing step is then
    :math:`\rho_i^2/(\rho_i^2 + s^2)` times the DPS step: there the gluing only adds data pull.

    **Defaults** (departures, measured; ``docs/samplers/psld.md``): ``gamma`` = 1 and
    ``eta`` = 1 (the paper: 0.1 and DDIM's 0), and 200 steps (the paper: 1000). With a learned
    autoencoder the gluing matters: with ``ct-phantom-latent-64`` (2 held-out phantoms, 100
    steps) ``gamma`` 0 / 0.1 / 1 / 3 gave 31.1 / 31.9 / 32.3 / 32.1 dB on ``ct-sparse-30`` and
    25.2 / 25.9 / 28.2 / 27.6 dB on ``deblur-gauss``; on the analytic latent problem of
    ``tests/test_psld.py`` the mean error fell from 0.45 (``gamma`` 0) to 0.36 and the spread
    from 1.56 to 1.13 times the exact one. The ancestral step (``eta`` 1) halved the
    posterior-mean error on three of the four exactness problems (100 steps: 0.23 / 0.10 /
    0.20 / 0.07 with eta 0 and ``gamma`` 0.1, 0.14 / 0.05 / 0.08 / 0.03 at the defaults). The
    rule does not depend on the number of steps: on ``ct-sparse-30`` with the latent prior 50,
    100, 200 (and once 1000) steps gave 32.27, 32.26, 32.26 (32.26) dB.

    Cost: ``steps`` network calls with a backward pass, one decoder and one encoder pass (each
    with a backward) per step, two projections (``projection_iterations`` ``A``/``A^T`` pairs
    each) and the likelihood's CG; decoder and encoder passes in ``last_run.extra``.

    ``callback(dict(i, sigma, x, x0))`` receives the *latent* iterate and estimate (decode
    with ``sampler.prior.decode``).

    :param prior: a :class:`~invdiff.priors.LatentDiffusionPrior` (a pixel prior is used with
        the identity autoencoder).
    :param steps: number of DDIM steps (paper: 1000; see **Defaults**).
    :param omega: weight of the data term (paper: 1).
    :param gamma: weight of the gluing term (paper: 0.1; see **Defaults**).
    :param weighting: ``"likelihood"`` (default) or ``"paper"`` (see above).
    :param schedule: ``"karras"`` or ``"ddpm"``; or explicit ``sigmas``.
    :param eta: DDIM's eta (paper: 0, deterministic; see **Defaults**).
    :param projection_iterations: CG steps of each projection (exact in one for inpainting and
        single-coil MRI, where :math:`AA^\top` is diagonal).
    :param noise_sigma: measurement noise std; read from ``physics.noise_model`` when ``None``.
    :param likelihood: ``"auto"``, ``"gaussian"`` or ``"poisson"``.
    :param poisson_gain: gain of Poisson noise, when not read from the physics.
    :param operator_norm: :math:`\|A\|^2`, to use the scalar error model instead of the CG solve.
    :param decoder_norm: :math:`\|J_{\mathcal D}\|^2`; estimated by power iteration when ``None``.
    :param cg_iterations: most CG steps of the likelihood solve (``0``: scalar :math:`\|A\|^2`).
    :param cg_tol: relative residual at which that CG stops (warm-started from the previous step).
    :param clip: range of the returned images (``None``: none).
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import LatentDiffusionPrior
        >>> from invdiff.samplers import PSLD
        >>> prior = LatentDiffusionPrior.linear_gaussian((1, 4, 4), factor=2)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> x_hat = PSLD(prior, steps=30)(y, physics, generator=g)
        >>> x_hat.shape
        torch.Size([1, 1, 8, 8])
    """

    name = "psld"
    #: the prior this sampler is built for: a LatentDiffusionPrior (read by the contract tests)
    prior_kind = "latent"
    #: the gluing term projects onto {Ax = y}: it needs A_adjoint
    supports_nonlinear = False
    batch_coupling = ("the decoder's Jacobian norm of the guidance weight is the largest over the batch "
                      "(steps.guidance.jacobian_norm_squared)")
    parameter_constraints = {
        "omega": Real(0),
        "gamma": Real(0),
        "weighting": Choice("likelihood", "paper"),
        "projection_iterations": Integer(1),
        "decoder_norm": Real(0, closed="neither", none=True),
    }

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 200,
        omega: float = 1.0,
        gamma: float = 1.0,
        weighting: str = "likelihood",
        schedule: str = "karras",
        sigmas: Tensor | None = None,
        eta: float = 1.0,
        projection_iterations: int = 10,
        noise_sigma: float | None = None,
        likelihood: str = "auto",
        poisson_gain: float | None = None,
        operator_norm: float | None = None,
        decoder_norm: float | None = None,
        cg_iterations: int = 5,
        cg_tol: float = 1e-3,
        clip: tuple[float, float] | None = (0.0, 1.0),
        verbose: bool = False,
    ) -> None:
        super().__init__(LatentDiffusionPrior.of(prior), verbose=verbose)
        self.sigmas = make_sigmas(self.prior.latent, steps, schedule, sigmas)
        self.omega, self.gamma = float(omega), float(gamma)
        self.weighting = weighting
        self.eta = float(eta)
        self.projection_iterations = int(projection_iterations)
        self.noise_sigma, self.likelihood, self.poisson_gain = noise_sigma, likelihood, poisson_gain
        self.operator_norm, self.decoder_norm = operator_norm, decoder_norm
        self.cg_iterations, self.cg_tol = int(cg_iterations), float(cg_tol)
        self.clip = clip

    # --- the network, the decoder and the encoder, counted ------------------------------
    def denoise(self, z: Tensor, sigma: float | Tensor) -> Tensor:
        """The *latent* prior's denoiser, counted in ``nfe`` / ``nfe_backward``."""
        self._info.nfe += 1
        if z.requires_grad:
            self._info.nfe_backward += 1
        return self.prior.latent.denoise(z, sigma, generator=self._generator).to(z.dtype)

    def _decode(self, z: Tensor) -> Tensor:
        self._info.extra["decoder_calls"] += 1
        return self.prior.decode(z)

    def _encode(self, x: Tensor) -> Tensor:
        self._info.extra["encoder_calls"] += 1
        return self.prior.encode(x)

    # --- the sampling loop ------------------------------------------------------------------------
    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas = self.sigmas.tolist()
        dtype = y.real.dtype
        self._info.extra = dict(decoder_calls=0, encoder_calls=0)
        _, noise_var = likelihood_variance(physics, y, self.likelihood, self.noise_sigma, self.poisson_gain)
        norm_a = self.operator_norm
        if norm_a is None and self.cg_iterations == 0:
            norm_a = operator_norm_squared(physics, self.image_shape, device=y.device, dtype=dtype)
        run = PSLDRun(noise_var=noise_var, decoder_norm=self.decoder_norm,
                      guidance=GaussianGuidance(physics, noise_var, norm_a, self.cg_iterations, self.cg_tol))
        paper_scale = self._paper_scale() if self.weighting == "paper" else None
        z_init = None if x_init is None else self.prior.encode(x_init.to(dtype)).detach()
        # a pixel prior (identity autoencoder) has latents of the run's image shape, whatever its size
        latent_shape = self.image_shape if isinstance(self.prior.autoencoder, IdentityAutoencoder) \
            else self.prior.latent_shape
        z = self.initial_noise((y.shape[0], *latent_shape), sigmas[0], z_init, generator, y)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if paper_scale is not None:  # the official steps: omega ||r|| and gamma ||g||, as they are
                weights = (2 * self.omega * paper_scale[i], self.gamma * paper_scale[i])
            else:  # the likelihood rule: the posterior's DDIM step
                kappa = ddim_score_weight(sigma, sigma_next, self.eta)
                weights = (self.omega * kappa, self.gamma * kappa)
            z0, grad = self.gradient(z, sigma, y, physics, run, *weights)
            noise = randn_like(z, generator) if (self.eta > 0 and sigma_next > 0) else None
            z = ddim_step(z, z0, sigma, sigma_next, self.eta, noise) - grad
            self.step_done(i, sigma, z, z0, callback)
        x = self._decode(z).detach()
        return x.clamp(*self.clip) if self.clip is not None else x

    def _paper_scale(self) -> list[float]:
        """The official step in VE coordinates (VP -> VE; the DDPM steps each step spans)."""
        s, s_next = self.sigmas[:-1].double(), self.sigmas[1:].double()
        spanned = ddpm_timestep(s / 2) - ddpm_timestep(s_next / 2)  # latent sigma = VP's sqrt((1-abar)/abar)
        return (torch.sqrt((1 + s**2) * (1 + s_next**2)) * spanned).tolist()

    # --- the two terms ------------------------------------------------------------------------
    def gradient(self, z: Tensor, sigma: float, y: Tensor, physics, run: PSLDRun, omega: float,
                 gamma: float) -> tuple[Tensor, Tensor]:
        r"""``(z0_hat, omega * grad L + gamma * grad G)`` at ``z`` (level ``sigma``), the gradients
        with respect to ``z`` through the denoiser, one backward pass of the network:

        * ``"likelihood"``: :math:`L = \tfrac12 r^\top (s^2 I + \rho^2 AA^\top)^{-1} r` (the
          precision held fixed) and :math:`G = \|g\|^2 / (2 r_\sigma^2)`;
        * ``"paper"``: :math:`L = \|r\|_2`, :math:`G = \|g\|_2` (per image);

        with :math:`r = y - A\mathcal D(\hat z_0)`, :math:`g = \hat z_0 - \mathcal E(\Pi_y \mathcal D(\hat z_0))`.
        """
        paper = self.weighting == "paper"
        r2 = denoiser_error_variance(sigma, self.prior.latent.sigma_data)
        with torch.enable_grad():
            zg = z.detach().requires_grad_(True)
            z0 = self.denoise(zg, sigma)
            z0_leaf = z0.detach().requires_grad_(True)
            x0 = self._decode(z0_leaf)
            x0d = x0.detach()
            r = y - physics.A(x0d)
            if paper:
                weighted, weight = r / batch_norm(r).clamp_min(torch.finfo(r.real.dtype).tiny), None
            else:
                if run.decoder_norm is None:  # ||J_D||^2 at the first z0_hat, as ReSample
                    run.decoder_norm = jacobian_norm_squared(self._decode, z0.detach())
                rho2 = r2 * run.decoder_norm
                precision = run.guidance.precision(rho2)
                weighted = precision(r) if callable(precision) else r * precision
                weight = self._projection_weight(rho2, run.noise_var)
            dx = -physics.A_vjp(x0d, weighted).real.to(x0d.dtype)  # d L / d x0
            # the gluing term: g = z0 - E(P(D(z0))), P(x) = x + K(y - A x) affine with symmetric part I - K A
            glued = project_measurements(physics, x0d, y, weight, self.projection_iterations).real.to(x0d.dtype)
            glued.requires_grad_(True)
            encoded = self._encode(glued)
            g = z0_leaf.detach() - encoded.detach()
            dg = g / batch_norm(g).clamp_min(torch.finfo(g.dtype).tiny) if paper else g / r2  # d G / d g
            (through_e,) = torch.autograd.grad(encoded, glued, dg)
            through_p = project_measurements(physics, through_e, torch.zeros_like(y), weight,
                                             self.projection_iterations).real.to(x0d.dtype)
            (dz0,) = torch.autograd.grad(x0, z0_leaf, omega * dx - gamma * through_p)
            (grad,) = torch.autograd.grad(z0, zg, dz0 + gamma * dg)
        return z0.detach(), grad.detach()

    @staticmethod
    def _projection_weight(rho2: float, noise_var: float | Tensor) -> float | Tensor | None:
        """The weight :math:`\\rho^2 / s^2` of the noise-aware projection (``None``, the exact
        projection, for noiseless data)."""
        if isinstance(noise_var, Tensor):
            return rho2 / noise_var.clamp_min(1e-12)
        return None if noise_var <= 0 else rho2 / noise_var
