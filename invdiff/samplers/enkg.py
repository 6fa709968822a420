"""Ensemble Kalman Diffusion Guidance (EnKG).

Zheng, Chen, Yao, Wang, Dhariwal, Kamyar Azizzadenesheli, Anandkumar, Yue, "Ensemble Kalman
Diffusion Guidance: A Derivative-free Method for Inverse Problems", 2024 (arXiv:2409.20175);
official code devzhk/enkg-pytorch (``algo/enkg.py``).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..priors.base import DiffusionPrior
from ._steps import karras_sigmas, randn_like
from .base import PosteriorSamples, Sampler
from .dps import make_sigmas

__all__ = ["EnKG"]


class EnKG(Sampler):
    """Ensemble Kalman Diffusion Guidance (Zheng et al. 2024, Algorithm 1): derivative-free.

    An ensemble of :math:`J` particles :math:`x^{(j)}` follows the probability-flow ODE of the
    prior on the EDM grid (Karras et al. 2022, eq. 5, :math:`\\rho = 7`). Before the Euler
    step at level :math:`\\sigma_i` (inside the guidance window), each particle is pushed to
    :math:`x_0^{(j)} = \\Phi_{\\sigma_i \\to 0}(x^{(j)})` by ``ode_steps`` Euler steps of the
    same ODE, and the ensemble is moved by the ensemble Kalman update, ``updates`` times:

    .. math::

        e_j = A(x_0^{(j)}) - y, \\qquad
        \\bar Y_k = A(x_0^{(k)}) - \\tfrac1J \\textstyle\\sum_l A(x_0^{(l)}), \\qquad
        \\bar X_k = x^{(k)} - \\tfrac1J \\textstyle\\sum_l x^{(l)},

    .. math::

        C_{jk} = \\tfrac1J \\langle e_j, \\bar Y_k \\rangle, \\qquad
        x^{(j)} \\leftarrow x^{(j)} - \\frac{s}{\\|C\\|_F} \\textstyle\\sum_k C_{jk} \\bar X_k,

    then the Euler PF-ODE step :math:`x \\leftarrow x + (\\sigma_{i+1} - \\sigma_i)(x - D(x, \\sigma_i))/\\sigma_i`.
    :math:`C \\bar X` is the ensemble estimate of :math:`\\mathrm{Cov}(x, A x_0)\\, (A x_0 - y)`,
    the preconditioned gradient of :math:`\\tfrac12\\|A(x_0(x)) - y\\|^2`, so only ``physics.A``
    is ever evaluated: no ``A_adjoint``, no ``A_vjp``, no backward pass of the network
    (``nfe_backward == 0``). The operator may be a black box.

    As in the official code: ``s = 2`` (``guidance_scale``), 2 updates per step
    (``num_updates``), 80 steps, guidance only for :math:`0.05 N < i < 0.95 N`
    (``threshold_start = threshold_end = 0.05``, FFHQ configs), and the number of Euler steps
    to :math:`x_0` shrinks along the run, :math:`\\min(1 + \\lfloor (N - i)/4 \\rfloor, 20)`
    (``ode_steps=None``; an integer fixes it), from :math:`\\sigma_i` down to the prior's
    ``sigma_min`` on an EDM sub-grid, then to 0. The step is normalised by :math:`\\|C\\|_F`
    and is therefore invariant to the scale of ``A`` and ``y``; the residual
    :math:`e_j` is unweighted (the measurement noise level is not used), as in the paper.

    Departures: the ensemble is ``ensemble_size = 32`` particles by default, not the paper's
    1024-2048 (hours per image on an A100), so that a 32x32 image runs in seconds on a CPU;
    the particles stay in the affine span their ODE flow gives them, so a small ensemble
    under-resolves the posterior in high dimension (raise it on a GPU). The whole ensemble
    goes through the network as one batch, in chunks of at most ``max_batch`` images.
    :meth:`forward` returns the **ensemble mean** for each measurement (the estimate the
    paper reports); the particles of the last run are kept in :attr:`last_particles`
    (``(J, B, C, H, W)``), and :meth:`sample` returns an ensemble of ``n`` particles as
    ``n`` samples. Measurement noise is on the ``[0, 1]`` image scale.

    Cost: with :math:`K_i` the Euler steps to :math:`x_0` at step :math:`i`, ``nfe`` =
    :math:`N + \\text{updates} \\sum_{i \\in \\text{window}} K_i` network calls on the whole
    ensemble (each chunk of ``max_batch`` counts as one call); 1712 at the defaults
    (``steps=80``).

    :param prior: the diffusion prior.
    :param steps: number of PF-ODE steps :math:`N` (EDM grid over the prior's sigma range).
    :param ensemble_size: particles :math:`J` per measurement.
    :param guidance_scale: :math:`s`, the normalised step of the Kalman update.
    :param num_updates: Kalman updates per guided step.
    :param ode_steps: Euler steps from :math:`\\sigma_i` to :math:`x_0`; ``None`` = the paper's rule.
    :param threshold_start: fraction of the first steps left unguided.
    :param threshold_end: fraction of the last steps left unguided.
    :param sigmas: explicit schedule (decreasing, ending at 0) instead of ``steps``.
    :param max_batch: most images per network call (``None``: the whole ensemble at once).
    :param verbose: tqdm progress bar.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.enkg import EnKG
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5,
        ...     noise_model=dinv.physics.GaussianNoise(0.05), rng=torch.Generator().manual_seed(0))
        >>> g = torch.Generator().manual_seed(0)
        >>> y = physics(prior.sample(1, g).float())
        >>> sampler = EnKG(prior, steps=20, ensemble_size=16)
        >>> x_hat = sampler(y, physics, generator=g)
        >>> x_hat.shape, sampler.last_particles.shape
        (torch.Size([1, 1, 8, 8]), torch.Size([16, 1, 1, 8, 8]))
    """

    name = "enkg"

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 80,
        ensemble_size: int = 32,
        guidance_scale: float = 2.0,
        num_updates: int = 2,
        ode_steps: int | None = None,
        threshold_start: float = 0.05,
        threshold_end: float = 0.05,
        sigmas: Tensor | None = None,
        max_batch: int | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, verbose=verbose)
        if ensemble_size < 2:
            raise ValueError(f"ensemble_size must be >= 2 (an ensemble covariance), got {ensemble_size}")
        if ode_steps is not None and ode_steps < 1:
            raise ValueError(f"ode_steps must be >= 1 or None, got {ode_steps}")
        if max_batch is not None and max_batch < 1:
            raise ValueError(f"max_batch must be >= 1 or None, got {max_batch}")
        self.sigmas = make_sigmas(prior, steps, "karras", sigmas)
        self.ensemble_size = int(ensemble_size)
        self.guidance_scale = float(guidance_scale)
        self.num_updates = int(num_updates)
        self.ode_steps = ode_steps
        self.threshold_start = float(threshold_start)
        self.threshold_end = float(threshold_end)
        self.max_batch = max_batch
        self.last_particles: Tensor | None = None
        self._ensemble = self.ensemble_size

    # --- the pieces of Algorithm 1 ------------------------------------------------------
    def guided(self, i: int) -> bool:
        """Whether step ``i`` is inside the guidance window (official: strict inequalities)."""
        n = len(self.sigmas) - 1
        return self.threshold_start * n < i < n - int(self.threshold_end * n)

    def ode_steps_at(self, i: int) -> int:
        """Euler steps from sigma_i to x0 (official rule ``min(1 + (N - i) // 4, 20)``)."""
        n = len(self.sigmas) - 1
        return self.ode_steps if self.ode_steps is not None else min(1 + (n - i) // 4, 20)

    def _denoise_ensemble(self, x: Tensor, sigma: float) -> Tensor:
        """``D(x, sigma)`` on the flattened ensemble, in chunks of ``max_batch``."""
        if self.max_batch is None or x.shape[0] <= self.max_batch:
            return self.denoise(x, sigma)
        return torch.cat([self.denoise(c, sigma) for c in x.split(self.max_batch)])

    def _to_x0(self, x: Tensor, sigma: float, steps: int) -> Tensor:
        """PF-ODE Euler steps from ``sigma`` to 0 (official ``ode_sampler``); 1 step = ``D(x, sigma)``."""
        if steps == 1:
            return self._denoise_ensemble(x, sigma)
        grid = karras_sigmas(steps, self.prior.sigma_min, sigma).tolist()
        for s, s_next in zip(grid[:-1], grid[1:]):
            d = (x - self._denoise_ensemble(x, s)) / s
            x = x + (s_next - s) * d
        return x

    def _kalman_update(self, x: Tensor, x0: Tensor, y: Tensor, physics, batch: int) -> Tensor:
        """One ensemble Kalman step ``x <- x - s/||C||_F C Xbar`` per measurement (only ``A`` is called)."""
        J = self._ensemble
        ax = physics.A(x0)  # (B*J, ...), b-major
        ax = ax.reshape(batch, J, -1)
        e = ax - y.reshape(batch, 1, -1)  # e_j = A(x0_j) - y
        y_bar = ax - ax.mean(1, keepdim=True)  # Ybar_k
        xf = x.reshape(batch, J, -1)
        x_bar = xf - xf.mean(1, keepdim=True)  # Xbar_k
        C = (e.conj() @ y_bar.transpose(1, 2)).real / J  # (B, J, J); real part for complex data
        norm = torch.linalg.matrix_norm(C).clamp_min(torch.finfo(C.dtype).tiny).reshape(batch, 1, 1)
        return (xf - self.guidance_scale / norm * (C @ x_bar)).reshape(x.shape)

    # --- the loop ------------------------------------------------------------------------
    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas = self.sigmas.tolist()
        batch, J, shape = y.shape[0], self._ensemble, self.prior.image_shape
        dtype = y.real.dtype
        # particles (B, J, C, H, W): initial noise at sigma_max (one generator per measurement if a list)
        x = sigmas[0] * randn_like(y.new_zeros((batch, J, *shape), dtype=dtype), generator)
        if x_init is not None:
            x = x + x_init.to(dtype)[:, None]
        x = x.reshape(batch * J, *shape)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            if self.guided(i):  # Alg. 1: ensemble Kalman guidance, `num_updates` times
                for _ in range(self.num_updates):
                    x0_ode = self._to_x0(x, sigma, self.ode_steps_at(i))
                    x = self._kalman_update(x, x0_ode, y, physics, batch)
            # Euler step of the PF-ODE, dx/dsigma = (x - D(x, sigma)) / sigma
            x0 = self._denoise_ensemble(x, sigma)
            x = x + (sigma_next - sigma) * (x - x0) / sigma
            self.check_finite(x, i, sigma)
            self._info.steps += 1
            if callback is not None:
                mean = x.reshape(batch, J, *shape).mean(1)
                callback(dict(i=i, sigma=sigma, x=mean, x0=x0.reshape(batch, J, *shape).mean(1)))
        particles = x.reshape(batch, J, *shape)
        self.last_particles = particles.transpose(0, 1).contiguous()
        self._info.extra["ensemble_size"] = J
        return particles.mean(1)

    def sample(
        self,
        y: Tensor,
        physics,
        n: int | None = None,
        generator: torch.Generator | None = None,
        x_init: Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> PosteriorSamples:
        """An ensemble of ``n`` particles (default ``ensemble_size``) per measurement as ``n`` samples.

        The ensemble *is* the sample set: one run with :math:`J = n` (the particles interact
        through the Kalman update, so they are not independent draws).
        """
        n = self.ensemble_size if n is None else int(n)
        if n < 2:
            raise ValueError(f"EnKG.sample needs n >= 2 particles, got {n}")
        self._ensemble = n
        try:
            self.forward(y, physics, generator=generator, x_init=x_init, callback=callback)
        finally:
            self._ensemble = self.ensemble_size
        samples = self.last_particles
        return PosteriorSamples(samples, samples.mean(0), samples.std(0, unbiased=True))

    def network_calls(self, batch: int = 1) -> int:
        """``nfe`` of one run on ``batch`` measurements: ``N + updates * sum K_i`` (times the chunks)."""
        n = len(self.sigmas) - 1
        calls = n + self.num_updates * sum(self.ode_steps_at(i) for i in range(n) if self.guided(i))
        chunks = 1 if self.max_batch is None else -(-batch * self._ensemble // self.max_batch)
        return calls * chunks

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, steps={len(self.sigmas) - 1}, ensemble_size={self.ensemble_size}"

