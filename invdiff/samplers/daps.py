r"""Decoupled Annealing Posterior Sampling (DAPS).

Zhang, Chu, Berner, Sun, Anandkumar, Yue, Bouman, "Improving Diffusion Inverse Problem
Solving with Decoupled Noise Annealing", CVPR 2025 (arXiv:2407.01521); official code
zhangbingliang2019/DAPS (``sampler.py``: ``DAPS``, ``LangevinDynamics``).
"""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Integer, Real
from .steps import (
    gaussian_noise_std,
    karras_sigmas,
    langevin_data_step,
    operator_norm_squared,
    per_image,
    randn_like,
)

__all__ = ["DAPS", "ode_x0"]


def ode_x0(denoise: Callable[[Tensor, float], Tensor], x: Tensor, sigma: float, steps: int,
           sigma_min: float) -> Tensor:
    r"""Solve the probability-flow ODE from ``x`` at level ``sigma`` down to 0 with Euler steps.

    The levels are EDM's (:func:`~invdiff.samplers.steps.karras_sigmas`, rho 7) from
    ``sigma`` to ``sigma_min``, then 0; each step is one network call,

    .. math:: x \leftarrow x + (\sigma_{k+1} - \sigma_k)\,\frac{x - D(x, \sigma_k)}{\sigma_k},

    so the last step returns :math:`D(x, \sigma_{\text{steps}-1})`. (A candidate for ``samplers.steps``.)
    """
    levels = karras_sigmas(steps, min(sigma_min, sigma), sigma).tolist()
    for k in range(steps):
        d = (x - denoise(x, levels[k])) / levels[k]
        x = x + (levels[k + 1] - levels[k]) * d
    return x


class DAPS(Sampler):
    r"""Decoupled Annealing Posterior Sampling (Zhang et al., CVPR 2025, Algorithm 1).

    For each annealing level :math:`\sigma_i` (decreasing), DAPS *decouples* consecutive
    noisy states: it maps :math:`x_{i}` to a clean estimate, samples the measurement-
    conditioned clean image around it, and re-noises it independently to the next level:

    .. math::

        \hat x_0 &= \mathrm{ODE}_{\sigma_i \to 0}(x_i) \quad\text{(a few PF-ODE Euler steps, eq. 8)},\\
        x_0^{(y)} &\sim \exp\Big(-\frac{\|A(x) - y\|^2}{2 s^2} - \frac{\|x - \hat x_0\|^2}{2 r_i^2}\Big)
            \quad\text{(Langevin, eq. 9)},\\
        x_{i+1} &= x_0^{(y)} + \sigma_{i+1}\, \epsilon .

    The Langevin chain starts at :math:`\hat x_0` and takes ``langevin_steps`` steps
    :math:`x \leftarrow x - \eta \nabla E(x) + \sqrt{2\eta}\, z`, with the data gradient
    through ``physics.A_vjp`` (no network gradient: ``nfe_backward == 0``). The output is the
    last :math:`x_0^{(y)}` (the final level's :math:`\sigma_{N} = 0`).

    **Conversion to invdiff's coordinates.** The official defaults on ``[-1, 1]`` images
    (EDM VE network) are 200 annealing levels from 100 to 0.1 (poly-7 = EDM rho 7), 5 Euler
    ODE steps down to 0.01, :math:`r_i = \sigma_i`, 100 Langevin steps with
    ``lr = 1e-4`` decaying linearly to ``1e-6`` over the annealing and :math:`\tau = 0.01`
    in place of :math:`s`. On ``[0, 1]`` images every length halves: levels 50 → 0.05 (the
    top clamped to the prior's ``sigma_max``), ODE down to 0.005, :math:`\tau = 0.005`,
    and the Langevin step ``lr / 4`` (the same chain, since :math:`x = (x' + 1)/2`).

    **Departure: scale-aware Langevin.** ``lr = 1e-4`` is tied to :math:`\tau = 0.01` and
    :math:`\|A\| = 1` (with them :math:`\eta\,\|A\|^2/\tau^2 = 1`, the edge of stability); on CT
    (:math:`\|A\|^2 \approx 900` at 32x32) it diverges. invdiff uses the measurement noise
    :math:`s` (``physics.noise_model``, or ``noise_sigma``; floored at ``min_noise``) in the
    likelihood — the correct posterior, where the paper's smaller :math:`\tau` is a tuned
    over-weighting — and preconditions the step by the energy's curvature bound:

    .. math:: \eta_i = \frac{c_i}{\|A\|^2 / s^2 + 1 / r_i^2}, \qquad
              c_i = c_0 \big(1 + \tfrac{i}{N}(\rho - 1)\big),

    with :math:`c_0` = ``step_scale`` and :math:`\rho` = ``lr_min_ratio``. :math:`\|A\|^2` comes
    from a power iteration (or ``operator_norm``). In the paper's setting :math:`c_0 \approx 1`
    and :math:`\rho = 0.01`. invdiff's defaults are :math:`c_0 = 1` and **no decay**
    (:math:`\rho = 1`): with an ill-conditioned ``A`` (CT) a step of 1 % of the curvature bound
    no longer moves the chain in the weakly measured directions, and on the 32x32 CT demo the
    decayed step falls below FBP where the full step comes close to the exact posterior mean
    (measured: ``docs/samplers/daps.md``).

    **Departure: fewer levels, lower final level.** The default is 50 levels x 5 ODE steps
    (250 NFE) and 50 Langevin steps per level, a CPU budget (``steps=200,
    langevin_steps=100`` is the paper's), and the annealing ends at 0.01 instead of 0.05
    (the paper's 0.1 on ``[-1, 1]``): the last level's :math:`r = \sigma` is left as noise in
    the directions the measurement does not see, which costs a sample most where the
    measurement sees least (inpainting) (measured: ``docs/samplers/daps.md``).

    DAPS draws samples: one sample is below the posterior mean (as an exact posterior sample
    is), so compare ``sample(n).mean`` with the baselines. On the Gaussian-prior demo
    problems the mean of 8 samples comes within about 1 dB of the exact posterior mean except
    for inpainting; where the prior does most of the work (inpainting, deblurring) the samples
    are over-dispersed: the isotropic :math:`\mathcal N(\hat x_0, \sigma^2 I)` approximation
    ignores how much the prior shrinks (measured: ``docs/samplers/daps.md``).

    NFE = ``steps`` x ``ode_steps`` (no backward pass); ``steps`` x ``langevin_steps``
    applications of ``A`` and ``A_vjp``.

    :param prior: the diffusion prior.
    :param steps: number of annealing levels, the outer loop (paper: 200).
    :param ode_steps: Euler steps of the PF-ODE per level (paper: 5).
    :param langevin_steps: Langevin steps per level (paper: 100).
    :param sigma_max: top annealing level on ``[0, 1]`` images (paper: 100 on ``[-1, 1]``);
        clamped to the prior's ``sigma_max``.
    :param sigma_min: last annealing level (paper: 0.1 on ``[-1, 1]`` = 0.05 here; default 0.01).
    :param ode_sigma_min: last nonzero level of the inner ODE (paper: 0.01 on ``[-1, 1]``).
    :param step_scale: :math:`c_0` (see above).
    :param lr_min_ratio: final fraction of the step size (paper: 0.01; default 1, no decay).
    :param noise_sigma: measurement noise std :math:`s`; read from ``physics.noise_model``
        when ``None``.
    :param min_noise: floor of :math:`s` (noiseless measurements).
    :param operator_norm: :math:`\|A\|^2`; estimated by power iteration when ``None``
        (1 for a nonlinear operator: pass it there).
    :param clip: range the output is clamped to, ``None`` for none.
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.daps import DAPS
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = DAPS(prior, steps=10, langevin_steps=20)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_run.nfe
        (torch.Size([1, 1, 8, 8]), 50)
    """

    name = "daps"
    parameter_constraints = {
        "ode_steps": Integer(1),
        "langevin_steps": Integer(0),
        "sigma_max": Real(0, closed="neither"),
        "sigma_min": Real(0, closed="neither"),
        "ode_sigma_min": Real(0, closed="neither"),
        "step_scale": Real(0, closed="neither"),
        "lr_min_ratio": Real(0, 1, closed="right"),
    }

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 50,
        ode_steps: int = 5,
        langevin_steps: int = 50,
        sigma_max: float = 50.0,
        sigma_min: float = 0.01,
        ode_sigma_min: float = 0.005,
        step_scale: float = 1.0,
        lr_min_ratio: float = 1.0,
        noise_sigma: float | None = None,
        min_noise: float = 1e-3,
        operator_norm: float | None = None,
        clip: tuple[float, float] | None = (0.0, 1.0),
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        top = min(float(sigma_max), prior.sigma_max)
        if not 0 < sigma_min < top:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {top}")
        # annealing levels: EDM poly-7 from sigma_max to sigma_min, then 0 (official Scheduler)
        self.sigmas = karras_sigmas(steps, sigma_min, top)
        self.ode_steps, self.langevin_steps = int(ode_steps), int(langevin_steps)
        self.ode_sigma_min = float(ode_sigma_min)
        self.step_scale, self.lr_min_ratio = float(step_scale), float(lr_min_ratio)
        self.noise_sigma, self.min_noise = noise_sigma, float(min_noise)
        self.operator_norm = operator_norm
        self.clip = clip

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas = self.sigmas.tolist()
        levels = len(sigmas) - 1
        shape = (y.shape[0], *self.image_shape)
        dtype = y.real.dtype
        s2 = per_image(gaussian_noise_std(physics, y, self.noise_sigma, self.min_noise)) ** 2
        norm_a = self.operator_norm
        if norm_a is None:
            norm_a = operator_norm_squared(physics, self.image_shape, device=y.device, dtype=dtype)
        # Alg. 1 line 1: x_N ~ N(x_init or 0, sigma_max^2 I)
        x_t = self.initial_noise(shape, sigmas[0], x_init, generator, y)
        for i in self.progress(range(levels)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # Alg. 1 line 3: x0_hat by the probability-flow ODE (eq. 8)
            x0 = ode_x0(self.denoise, x_t, sigma, self.ode_steps, self.ode_sigma_min)
            # Alg. 1 lines 4-6: Langevin on p(x0 | x_t, y) ~ N(x0_hat, r^2) p(y | x0), r = sigma
            r2 = sigma**2
            ratio = 1 + (self.lr_min_ratio - 1) * i / levels  # the official linear decay (off by default)
            eta = self.step_scale * ratio / (norm_a / s2 + 1 / r2)
            x = langevin_data_step(physics, x0, y, s2, r2, eta, self.langevin_steps, generator)  # eq. 9
            # Alg. 1 line 7: decoupled re-noising to the next level
            x_t = x + sigma_next * randn_like(x, generator) if sigma_next > 0 else x
            self.step_done(i, sigma, x_t, x0, callback)
        return x_t.clamp(*self.clip) if self.clip is not None else x_t
