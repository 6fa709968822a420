"""Manifold Constrained Gradient (MCG).

Chung, Sim, Ryu, Ye, "Improving Diffusion Models for Inverse Problems using Manifold
Constraints", NeurIPS 2022 (arXiv:2206.00941); official code HJ-harry/MCG_diffusion.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from .dps import DPS, DPSRun
from .params import Flag, Integer, Real
from .steps import project_measurements, randn_like

__all__ = ["MCG"]


class MCG(DPS):
    r"""Manifold Constrained Gradient (Chung et al., NeurIPS 2022): DPS's gradient step through
    the denoiser, followed by a projection onto the measurement-consistent set at the
    iterate's noise level.

    Each step (paper Alg. 1 / eq. 14, in invdiff's VE coordinates on [0, 1] images):

    1. :math:`\hat x_0 = D(x_i, \sigma_i)`, the ancestral (DDIM, ``eta``) step of the prior
       :math:`x'_{i+1}`;
    2. the **manifold constrained gradient**
       :math:`x''_{i+1} = x'_{i+1} - \gamma_i \nabla_{x_i} \tfrac12\|y - A\hat x_0(x_i)\|^2_{W}`,
       the derivative through the network that keeps the update on the data manifold — the
       same step as :class:`~invdiff.samplers.DPS` (its ``weighting``, ``zeta`` and the
       Gaussian or Poisson ``likelihood`` are inherited);
    3. the **projection** onto :math:`\{x : A x = y_{i+1}\}` with the measurement noised to
       the next level, :math:`y_{i+1} = y + \sigma_{i+1} A\epsilon` (VE form of the paper's
       ``q_sample(y, t)``: :math:`A x_{i+1} = A x_0 + \sigma_{i+1} A \epsilon`),

       .. math:: x_{i+1} = x''_{i+1} + A^{+}(y_{i+1} - A x''_{i+1}),

       the minimum-norm correction, solved by CG on the normal equations for any linear
       ``A`` (:func:`~invdiff.samplers.steps.project_measurements`). For inpainting it is the
       paper's replacement of the measured pixels by the noised measurement; for CT it
       replaces the paper's ``lambda A^T(y - Ax) / (A^T A 1)`` sweep by the exact projection.

    **Noisy measurements** (a departure; the paper's experiments are noiseless): a hard
    projection onto a noisy ``y`` copies its noise into the image (and, for blur, amplifies
    it through :math:`A^+`). With measurement noise of variance :math:`s^2` and ``relax=True``
    (default) the projection is the Tikhonov-relaxed one,
    :math:`x + (I + A^\top W A)^{-1} A^\top W (y_{i+1} - A x)` with
    :math:`W = \rho\,\sigma_{i+1}^2 / s^2` (``relax_scale`` :math:`\rho`): hard while the
    diffusion noise dominates, vanishing as :math:`\sigma_{i+1} \to 0`, where the measurement
    noise dominates and the likelihood gradient of step 2 takes over; the last step is not
    projected. On the 16x16 Gaussian problems of ``benchmarks/exactness.py`` the relaxed
    projection is closer to the exact posterior mean than the hard one, which fails on blur
    (measured: ``docs/samplers/mcg.md``). The projection removes the spread of the samples in
    the measured subspace: MCG's samples are narrower than the posterior, a property of the
    method, not only of this implementation.

    Defaults: 200 steps (invdiff's DPS; the paper uses 1000 DDPM steps and, for CT, 2000
    VE-SDE predictor-corrector steps), ``zeta=1`` with the likelihood weighting; CG with at
    most ``projection_iterations=10`` iterations to relative residual ``1e-4`` (exact in one
    for inpainting; on the 32x32 CT problem of ``invdiff demo --analytic`` more iterations
    cost time without improving the result; measured: ``docs/samplers/mcg.md``). Needs a linear
    operator (``A_adjoint`` for the projection). Cost per step: one forward and one backward
    pass of the network plus the CG (``A`` and ``A_adjoint`` only).

    :param prior: a pixel-space :class:`~invdiff.priors.DiffusionPrior`.
    :param relax: Tikhonov-relaxed projection for noisy measurements (see above).
    :param projection_iterations: most CG iterations per projection.
    :param projection_tol: CG relative-residual tolerance.
    :param relax_scale: :math:`\rho`.
    :param kwargs: :class:`DPS`'s arguments, with its defaults: ``steps`` (200), ``zeta`` (scale
        of the gradient step), ``weighting`` (DPS's step rule), ``eta``, ``clip``, ``likelihood``,
        ``poisson_gain``, ``noise_sigma``, ``sigmas``, ``verbose``...

    Example::

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.priors import GaussianPrior
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = operators.make("inpaint-random-70", img_size=(1, 8, 8), noise_sigma=0.0)
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> x_hat = MCG(prior, steps=20)(y, physics, generator=g)
        >>> bool((physics.A(x_hat) - y).abs().max() < 1e-3)  # noiseless: exactly consistent
        True
    """

    name = "mcg"
    supports_nonlinear = False
    parameter_constraints = {
        "relax": Flag(),
        "projection_iterations": Integer(0),
        "projection_tol": Real(0),
        "relax_scale": Real(0),
    }

    def __init__(
        self,
        prior: DiffusionPrior,
        relax: bool = True,
        projection_iterations: int = 10,
        projection_tol: float = 1e-4,
        relax_scale: float = 1.0,
        **kwargs,
    ) -> None:
        super().__init__(prior, **kwargs)  # DPS's options and defaults (steps 200, zeta 1, weighting)
        self.relax = bool(relax)
        self.projection_iterations = int(projection_iterations)
        self.projection_tol = float(projection_tol)
        self.relax_scale = float(relax_scale)

    def _setup(self, y: Tensor, physics) -> DPSRun:
        run = super()._setup(y, physics)
        run.noisy = self.relax and bool(torch.as_tensor(run.noise_var).max() > 0)
        return run

    def _correct(self, x: Tensor, i: int, y: Tensor, physics, run: DPSRun, generator) -> Tensor:
        """Step 3: project onto ``{A x = y + sigma_{i+1} A eps}`` (relaxed when the data are noisy)."""
        sigma_next = float(self.sigmas[i + 1])
        if run.noisy and sigma_next == 0:  # the last step is not projected onto noisy data
            return x
        y_t = y + sigma_next * physics.A(randn_like(x, generator)) if sigma_next > 0 else y
        weight = self.relax_scale * sigma_next**2 / run.noise_var if run.noisy else None
        return project_measurements(physics, x, y_t, weight, self.projection_iterations, self.projection_tol)
