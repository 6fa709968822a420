r"""Plug-and-Play Diffusion Models (PnP-DM): split Gibbs sampling with a diffusion prior.

Wu, Sun, Chen, Zhang, Yue, Bouman, "Principled Probabilistic Imaging using Diffusion Models
as Plug-and-Play Priors", NeurIPS 2024 (arXiv:2405.18782); official code
zihuiwu/PnP-DM-public (``pnpdm/samplers/pnp_edm/``, ``configs/sampler/pnp_edm.yaml``,
``commands.sh``); also devzhk/InverseBench (``algo/pnpdm.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from deepinv.physics import LinearPhysics
from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import IncompatibleError, Sampler
from .params import Choice, Integer, Real
from .steps import (
    gaussian_noise_std,
    karras_sigmas,
    langevin_data_step,
    operator_norm_squared,
    per_image,
    proximal_least_squares,
    randn_like,
)

__all__ = ["PnPDM", "exact_likelihood_step", "langevin_likelihood_step"]

#: the number of iterations the paper's annealing rate ``rho_decay`` is given for
PAPER_ITERATIONS = 100


def exact_likelihood_step(physics, x: Tensor, y: Tensor, noise_std: float | Tensor, rho: float, generator,
                          iterations: int, tol: float = 1e-6) -> Tensor:
    r"""A sample of :math:`p(z \mid x, y) \propto \exp(-\|y - Az\|^2/(2s^2) - \|z - x\|^2/(2\rho^2))`
    for a linear :math:`A`, by perturb-and-solve (Papandreou & Yuille 2010):

    .. math::

        z = \big(A^\top A / s^2 + I/\rho^2\big)^{-1}
            \big(A^\top (y + s\,\epsilon_2)/s^2 + (x + \rho\,\epsilon_1)/\rho^2\big),
        \qquad \epsilon_1, \epsilon_2 \sim \mathcal N(0, I),

    exactly :math:`\mathcal N(m, \Sigma)` with :math:`\Sigma = (A^\top A/s^2 + I/\rho^2)^{-1}`,
    :math:`m = \Sigma (A^\top y/s^2 + x/\rho^2)`, when the solve is exact. The solve is
    :func:`~invdiff.samplers.steps.proximal_least_squares` with :math:`\gamma = \rho^2/s^2`
    (CG from :math:`x + \rho\epsilon_1`, ``iterations`` at most, relative residual ``tol``).
    ``noise_std`` is :math:`s > 0`, a number or a ``(B,)`` tensor."""
    s_img, s_meas = per_image(noise_std, x.ndim), per_image(noise_std, y.ndim)
    x_perturbed = x + rho * randn_like(x, generator)
    y_perturbed = y + s_meas * randn_like(y, generator)
    return proximal_least_squares(physics, x_perturbed, y_perturbed, rho**2 / s_img**2, iterations, tol)


def langevin_likelihood_step(physics, x: Tensor, y: Tensor, noise_std: float | Tensor, rho: float, generator,
                             steps: int, step: float | Tensor) -> Tensor:
    r"""``steps`` unadjusted Langevin steps on the same target for any differentiable :math:`A`
    (paper, Sec. 3.2 and the official ``proximal_generator`` of nonlinear tasks), from
    :math:`z = x`:

    .. math:: z \leftarrow z - \eta\Big(\frac{J_A(z)^\top (A(z) - y)}{s^2} + \frac{z - x}{\rho^2}\Big)
              + \sqrt{2\eta}\, \epsilon,

    with ``physics.A_vjp`` for :math:`J_A^\top` (no network call)."""
    return langevin_data_step(physics, x, y, per_image(noise_std, x.ndim) ** 2, rho**2, step, steps, generator)


class PnPDM(Sampler):
    r"""Plug-and-Play Diffusion Models (Wu et al., NeurIPS 2024, Algorithm 1).

    Split Gibbs sampling of :math:`\pi(x, z) \propto p(x)\, \mathcal N(z; x, \rho^2 I)\,
    p(y \mid z)`, whose :math:`x`-marginal tends to the posterior as :math:`\rho \to 0`,
    alternating two exact conditionals with an annealed coupling :math:`\rho_k`:

    .. math::

        \rho_k &= \max(\rho_0\, \alpha^{100 k / N},\; \rho_{\min}) \quad\text{(annealing, Sec. 3.3)},\\
        z_k &\sim p(z \mid x_k, y) \propto \exp\Big(-\frac{\|y - A z\|^2}{2 s^2}
               - \frac{\|z - x_k\|^2}{2\rho_k^2}\Big) \quad\text{(likelihood step, eq. 5)},\\
        x_{k+1} &\sim p(x \mid z_k) \propto p(x)\, \mathcal N(z_k; x, \rho_k^2 I)
               \quad\text{(prior step, eq. 6)}.

    **Likelihood step.** For a linear :math:`A` the conditional is Gaussian and is sampled
    exactly by perturb-and-solve with CG (:func:`exact_likelihood_step`); for a nonlinear
    :math:`A` by ``langevin_steps`` Langevin steps (:func:`langevin_likelihood_step`), as the
    paper does. ``likelihood_step="auto"`` picks by the operator.

    **Prior step.** :math:`p(x \mid z)` is the posterior of a denoising problem at noise level
    :math:`\rho`: the reverse diffusion started from :math:`x = z` at :math:`\sigma = \rho`
    (eq. 7). The levels are :math:`\rho` then those of the EDM grid (``diffusion_steps``
    levels over the prior's sigma range, rho 7) below :math:`\rho`, then 0; each step is the
    official Euler(-Maruyama) step of EDM's reverse SDE (``prior_solver="sde"``, the paper's
    ``*_sde`` modes for linear tasks) or of the probability-flow ODE (``"ode"``):

    .. math::

        d_j = \frac{x - D(x, \sigma_j)}{\sigma_j}, \qquad
        \text{SDE: } x \leftarrow x + 2(\sigma_{j+1} - \sigma_j)\, d_j
            + \sqrt{2\sigma_j(\sigma_j - \sigma_{j+1})}\; \epsilon, \qquad
        \text{ODE: } x \leftarrow x + (\sigma_{j+1} - \sigma_j)\, d_j,

    with no noise on the last step (:math:`\sigma_{j+1} = 0`), as the official code. The
    output is the last :math:`x` (the official code also keeps the iterates after a burn-in
    as further samples; here one run gives one sample, ``sample(n)`` runs ``n`` chains).

    **The floor of the coupling is in units of** :math:`1/\|A\|` (departure). At a fixed
    :math:`\rho` the chain's :math:`x`-marginal is the posterior under the measurement noise
    :math:`s^2 I + \rho^2 A A^\top`: the coupling acts as extra noise :math:`\rho A\epsilon`.
    The paper's :math:`\rho_{\min}` is set for operators of norm about 1 (inpainting, blur,
    orthonormal MRI), where that extra noise is :math:`\rho_{\min}`; for CT in pixel units
    (:math:`\|A\|^2 \sim 10^3`) the same :math:`\rho_{\min}` would drown the measurements and the
    chain would end below filtered back-projection. So a run anneals to
    :math:`\rho_{\min}/\|A\|` (:meth:`coupling`; :math:`\|A\|^2` by power iteration or
    ``operator_norm``, 1 for a nonlinear operator; recorded in ``last_run.extra["rho_min"]``),
    which is the paper's value at norm 1.

    Conversions and departures from the paper, exactly: the official settings on ``[-1, 1]``
    images (``commands.sh``, linear tasks) are 100 iterations, :math:`\rho_0 = 10`,
    :math:`\alpha = 0.9`, :math:`\rho_{\min} = 0.3` (0.1 for phase retrieval and coded
    diffraction), a 100-level EDM grid and :math:`\sigma_y = 0.05`; on ``[0, 1]`` images every
    length halves: :math:`\rho_0 = 5`, :math:`\rho_{\min} = 0.15`, and :math:`s` is the
    measurement noise on ``[0, 1]`` (``physics.noise_model`` or ``noise_sigma``, floored at
    ``min_noise``). The official prior step starts the grid at its first level below
    :math:`\rho` with the state :math:`z` of level :math:`\rho`; here it starts at
    :math:`\rho` itself. The official start is zeros on ``[-1, 1]``, here the constant 0.5
    (``x_init`` when given). The Langevin step size (official: :math:`\gamma = 10^{-4}` on
    ``[-1, 1]``) is scale-aware, as DAPS's: :math:`\eta = c / (\|A\|^2/s^2 + 1/\rho^2)` with
    :math:`c` = ``step_scale`` and :math:`\|A\|^2` by power iteration (or ``operator_norm``;
    1 for a nonlinear operator). ``clip`` clamps the output only. The decay
    :math:`\alpha` is the paper's per iteration of a 100-iteration run; for :math:`N` iterations
    the exponent is :math:`100k/N`, so that :math:`\rho` reaches :math:`\rho_{\min}` at the same
    fraction of the run (about a third) whatever :math:`N` (at :math:`N = 100`, the paper's
    :math:`\rho_0 \alpha^k`).

    Cost: NFE = the number of grid levels below each :math:`\rho_k`, plus one, summed over the
    iterations (no backward pass); the exact likelihood step costs up to ``cg_iterations``
    applications of :math:`A^\top A` per iteration.

    :param prior: the diffusion prior.
    :param steps: number of Gibbs iterations (paper: 100).
    :param rho: :math:`\rho_0` on ``[0, 1]`` images (paper: 10 on ``[-1, 1]``).
    :param rho_decay: :math:`\alpha`, per iteration of a 100-iteration run (paper: 0.9).
    :param rho_min: :math:`\rho_{\min}` at :math:`\|A\| = 1` (paper: 0.3 on ``[-1, 1]``, linear tasks);
        a run's floor is ``rho_min / ||A||``.
    :param diffusion_steps: levels of the EDM grid of the prior step (paper: 100).
    :param prior_solver: ``"sde"`` (paper, linear tasks) or ``"ode"``.
    :param likelihood_step: ``"auto"``, ``"exact"`` (linear operators) or ``"langevin"``.
    :param cg_iterations: most CG iterations of the exact likelihood step.
    :param cg_tol: relative residual at which that CG stops.
    :param langevin_steps: Langevin steps of the likelihood step (paper: 100).
    :param step_scale: :math:`c` of the Langevin step size.
    :param noise_sigma: measurement noise std :math:`s`; read from ``physics.noise_model`` when ``None``.
    :param min_noise: floor of :math:`s` (noiseless measurements).
    :param operator_norm: :math:`\|A\|^2` for the coupling floor and the Langevin step size; estimated
        when ``None``.
    :param clip: range the output is clamped to, ``None`` for none.
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.pnpdm import PnPDM
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = PnPDM(prior, steps=10, diffusion_steps=20)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_run.nfe_backward
        (torch.Size([1, 1, 8, 8]), 0)
    """

    name = "pnpdm"
    parameter_constraints = {
        "rho": Real(0, closed="neither"),
        "rho_decay": Real(0, 1, closed="right"),
        "rho_min": Real(0, closed="neither"),
        "diffusion_steps": Integer(2),
        "prior_solver": Choice("sde", "ode"),
        "likelihood_step": Choice("auto", "exact", "langevin"),
        "langevin_steps": Integer(1),
        "step_scale": Real(0, closed="neither"),
        "min_noise": Real(0, closed="neither"),
    }

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 100,
        rho: float = 5.0,
        rho_decay: float = 0.9,
        rho_min: float = 0.15,
        diffusion_steps: int = 100,
        prior_solver: str = "sde",
        likelihood_step: str = "auto",
        cg_iterations: int = 50,
        cg_tol: float = 1e-6,
        langevin_steps: int = 100,
        step_scale: float = 0.5,
        noise_sigma: float | None = None,
        min_noise: float = 1e-3,
        operator_norm: float | None = None,
        clip: tuple[float, float] | None = (0.0, 1.0),
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        if rho_min > rho:
            raise ValueError(f"pnpdm: rho_min={rho_min} must not exceed rho={rho}")
        self.rho, self.rho_decay, self.rho_min = float(rho), float(rho_decay), float(rho_min)
        self.iterations = int(steps)
        #: the coupling rho_k of each iteration for an operator of norm 1 (annealing, Sec. 3.3), on the
        #: paper's 100-iteration clock; a run uses :meth:`coupling` of its operator's norm
        self.rhos = self.coupling(1.0)
        #: the EDM grid of the prior step (ending at 0)
        self.grid = karras_sigmas(diffusion_steps, prior.sigma_min, prior.sigma_max)
        self.prior_solver, self.likelihood_step = prior_solver, likelihood_step
        self.cg_iterations, self.cg_tol = int(cg_iterations), float(cg_tol)
        self.langevin_steps, self.step_scale = int(langevin_steps), float(step_scale)
        self.noise_sigma, self.min_noise, self.operator_norm = noise_sigma, float(min_noise), operator_norm
        self.clip = clip
        self._norm_a: float | None = None  # ||A||^2 of the current run (coupling floor, Langevin step size)

    def check_physics(self, physics) -> None:
        """The exact likelihood step needs a linear operator; the Langevin one does not."""
        super().check_physics(physics)
        if self.likelihood_step == "exact" and not isinstance(physics, LinearPhysics):
            raise IncompatibleError(
                f"{self.name}: needs a linear operator (a deepinv LinearPhysics with A_adjoint) for "
                f"likelihood_step='exact', got {type(physics).__name__}; use likelihood_step='langevin' or 'auto'")

    def coupling(self, norm_a: float) -> list[float]:
        """The run's :math:`\\rho_k = \\max(\\rho_0 \\alpha^{100k/N}, \\rho_{\\min}/\\|A\\|)` for
        ``norm_a`` = :math:`\\|A\\|^2`: the floor in units of :math:`1/\\|A\\|` (see the class doc)."""
        floor = min(self.rho_min / max(float(norm_a), 1e-12) ** 0.5, self.rho)
        return [max(self.rho * self.rho_decay ** (k * PAPER_ITERATIONS / self.iterations), floor)
                for k in range(self.iterations)]

    def prior_levels(self, rho: float) -> list[float]:
        """The noise levels of the prior step from ``rho``: ``rho``, the grid's levels below it, 0."""
        return [rho] + [s for s in self.grid.tolist() if s < rho]

    def _likelihood(self, x: Tensor, y: Tensor, physics, s: float | Tensor, rho: float, generator) -> Tensor:
        """Eq. 5: ``z ~ p(z | x, y)``, exact (linear) or by Langevin."""
        exact = self.likelihood_step == "exact" or (
            self.likelihood_step == "auto" and isinstance(physics, LinearPhysics))
        if exact:
            return exact_likelihood_step(physics, x, y, s, rho, generator, self.cg_iterations, self.cg_tol)
        step = self.step_scale / (self._norm_a / per_image(s, x.ndim) ** 2 + 1 / rho**2)
        return langevin_likelihood_step(physics, x, y, s, rho, generator, self.langevin_steps, step)

    def _prior(self, z: Tensor, rho: float, generator) -> Tensor:
        """Eqs. 6-7: ``x ~ p(x | z)``, the EDM reverse SDE (or PF-ODE) from ``z`` at level ``rho``."""
        levels = self.prior_levels(rho)
        x = z
        for sigma, sigma_next in zip(levels[:-1], levels[1:]):
            d = (x - self.denoise(x, sigma)) / sigma
            if self.prior_solver == "ode":
                x = x + (sigma_next - sigma) * d
            elif sigma_next > 0:
                x = x + 2 * (sigma_next - sigma) * d + (2 * sigma * (sigma - sigma_next)) ** 0.5 * randn_like(
                    x, generator)
            else:  # the last Euler step of the SDE, without noise (official)
                x = x - 2 * sigma * d
        return x

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        shape = (y.shape[0], *self.image_shape)
        s = gaussian_noise_std(physics, y, self.noise_sigma, self.min_noise)
        self._norm_a = self.operator_norm or operator_norm_squared(physics, self.image_shape, device=y.device,
                                                                   dtype=y.real.dtype)
        rhos = self.coupling(self._norm_a)
        self._info.extra["rho_min"] = rhos[-1]
        x = x_init.to(y.real.dtype) if x_init is not None else y.new_full(shape, 0.5, dtype=y.real.dtype)
        for k in self.progress(range(len(rhos))):
            rho = rhos[k]
            # Alg. 1 line 3: likelihood step, z_k ~ p(z | x_k, y) (eq. 5)
            z = self._likelihood(x, y, physics, s, rho, generator)
            # Alg. 1 line 4: prior step, x_{k+1} ~ p(x | z_k) by reverse diffusion from rho (eqs. 6-7)
            x = self._prior(z, rho, generator)
            self.step_done(k, rho, x, x, callback, z=z)
        return x.clamp(*self.clip) if self.clip is not None else x
