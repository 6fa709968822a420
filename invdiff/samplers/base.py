"""The sampler contract: a :class:`deepinv.models.Reconstructor` over a diffusion prior.

``x_hat = sampler(y, physics, generator=g, x_init=None, callback=None)`` runs one posterior
sample per measurement; :meth:`Sampler.sample` runs ``n`` of them batched through the
network and returns their mean and per-pixel standard deviation. Every run records its
cost in :attr:`Sampler.last_run`. Subclasses implement :meth:`Sampler._run`, a loop that
reads like the paper's algorithm and calls :meth:`Sampler.denoise` for the network.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from deepinv.models import Reconstructor
from torch import Tensor
from tqdm.auto import tqdm

from ..priors.base import DiffusionPrior

__all__ = ["Sampler", "RunInfo", "PosteriorSamples", "SamplerDivergedError"]


class SamplerDivergedError(RuntimeError):
    """Raised when an iterate becomes NaN or infinite; names the sampler, step and sigma."""


@dataclass
class RunInfo:
    """Cost of the last run of a sampler.

    :ivar nfe: network (denoiser) calls; a batched call counts once.
    :ivar nfe_backward: of those, the calls whose graph was differentiated (vector-Jacobian products).
    :ivar steps: iterations of the sampler's main loop.
    :ivar wall_time: seconds.
    :ivar peak_memory: peak CUDA memory in bytes (None on CPU).
    :ivar batch: images per network call.
    :ivar seed: seed of the generator the run created, when none was passed (so it can be re-run).
    """

    sampler: str
    nfe: int = 0
    nfe_backward: int = 0
    steps: int = 0
    wall_time: float = 0.0
    peak_memory: int | None = None
    batch: int = 0
    seed: int | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PosteriorSamples:
    """``n`` posterior samples per measurement with their mean and per-pixel std.

    :ivar samples: ``(n, B, C, H, W)``.
    :ivar mean: ``(B, C, H, W)``.
    :ivar std: ``(B, C, H, W)`` (unbiased, zero when ``n == 1``).
    """

    samples: Tensor
    mean: Tensor
    std: Tensor


class Sampler(Reconstructor):
    """Base class of every invdiff posterior sampler.

    :param prior: a :class:`~invdiff.priors.DiffusionPrior`.
    :param verbose: show a tqdm progress bar.

    Subclasses define ``name`` and :meth:`_run`. The public :meth:`forward` validates the
    inputs, makes the generator, runs the loop under ``torch.no_grad()``, times it and fills
    :attr:`last_run`.
    """

    name = "sampler"
    #: False for methods that need ``A_adjoint`` (CG / proximal data steps); they refuse a
    #: nonlinear operator with a clear error instead of failing inside the loop.
    supports_nonlinear = True

    def __init__(self, prior: DiffusionPrior, verbose: bool = False) -> None:
        super().__init__()
        if not isinstance(prior, DiffusionPrior):
            raise TypeError(
                f"{type(self).__name__} needs an invdiff DiffusionPrior, got {type(prior).__name__}; "
                "wrap a deepinv denoiser with invdiff.priors.DenoiserPrior"
            )
        from ..priors.latent import LatentDiffusionPrior

        if isinstance(prior, LatentDiffusionPrior) and getattr(type(self), "prior_kind", "pixel") != "latent":
            raise TypeError(
                f"{type(self).__name__} samples in pixel space and cannot use a LatentDiffusionPrior; "
                "use a latent sampler (ReSample) or a pixel prior"
            )
        self.prior = prior
        self.verbose = verbose
        self.last_run: RunInfo | None = None
        self._info: RunInfo | None = None

    # --- what subclasses call ---------------------------------------------------------
    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The prior's denoiser, counted in ``nfe`` (and ``nfe_backward`` when ``x`` requires grad).

        Runs the network in its own dtype and returns the sampler's dtype.
        """
        self._info.nfe += 1
        if x.requires_grad:
            self._info.nfe_backward += 1
        return self.prior.denoise(x, sigma).to(x.dtype)

    def check_finite(self, x: Tensor, step: int, sigma: float) -> None:
        """Stop the run with :class:`SamplerDivergedError` if ``x`` has NaN/Inf."""
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            raise SamplerDivergedError(
                f"{self.name}: diverged at step {step} (sigma={float(sigma):.4g}): "
                f"{bad} of {x.numel()} values are NaN/Inf; lower the step size or check the measurement scale"
            )

    def progress(self, iterable, total: int | None = None):
        """Wrap ``iterable`` in a tqdm bar when ``verbose``."""
        return tqdm(iterable, total=total, desc=self.name, disable=not self.verbose, leave=False)

    def _run(
        self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable[[dict], None] | None
    ) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # --- the public interface ---------------------------------------------------------
    def forward(
        self,
        y: Tensor,
        physics,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        x_init: Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
        **kwargs,
    ) -> Tensor:
        """Draw one posterior sample per measurement.

        :param y: measurements ``(B, ...)``, as produced by ``physics(x)``.
        :param physics: the forward operator (a :class:`deepinv.physics.Physics`).
        :param generator: source of all randomness (a ``torch.Generator``, or one per batch
            element). When ``None`` a fresh generator is seeded from the OS and its seed is
            recorded in ``last_run.seed``; the global RNG is never touched.
        :param x_init: optional starting point ``(B, C, H, W)`` where the method has one.
        :param callback: called after every step with ``dict(i, sigma, x, x0)``.
        :returns: reconstructions ``(B, C, H, W)``.
        """
        if kwargs:
            unknown = sorted(k for k in kwargs if k not in ("x_gt",))
            if unknown:
                raise TypeError(f"{self.name}: unexpected arguments {unknown}")
        y = self._check_measurement(y, physics)
        batch = y.shape[0]
        if x_init is not None and tuple(x_init.shape) != (batch, *self.prior.image_shape):
            raise ValueError(
                f"{self.name}: x_init has shape {tuple(x_init.shape)}, expected {(batch, *self.prior.image_shape)}"
            )
        seed = None
        if generator is None:
            generator = torch.Generator(device=y.device)
            seed = generator.seed()
        self._info = RunInfo(sampler=self.name, batch=batch, seed=seed)
        cuda = y.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(y.device)
        start = time.perf_counter()
        try:
            with torch.no_grad():
                x = self._run(y, physics, x_init, generator, callback)
        finally:
            if cuda:
                torch.cuda.synchronize(y.device)
                self._info.peak_memory = torch.cuda.max_memory_allocated(y.device)
            self._info.wall_time = time.perf_counter() - start
            self.last_run, self._info = self._info, None
        return x

    def sample(
        self,
        y: Tensor,
        physics,
        n: int,
        generator: torch.Generator | None = None,
        x_init: Tensor | None = None,
        callback: Callable[[dict], None] | None = None,
    ) -> PosteriorSamples:
        """``n`` posterior samples per measurement, batched through the network in one run.

        The measurement batch is repeated ``n`` times (sample ``k`` of image ``b`` is row
        ``k * B + b`` of the run), so the operator must accept a batch of ``n * B``; an
        operator whose parameters have a batch dimension > 1 is rejected.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        b = y.shape[0]
        if n > 1:
            self._check_operator_batch(physics, b, "call sample() once per measurement")
        y_rep = y.repeat(n, *([1] * (y.ndim - 1)))
        x0 = None if x_init is None else x_init.repeat(n, 1, 1, 1)
        x = self.forward(y_rep, physics, generator=generator, x_init=x0, callback=callback)
        samples = x.reshape(n, b, *x.shape[1:])
        std = samples.std(0, unbiased=True) if n > 1 else torch.zeros_like(samples[0])
        return PosteriorSamples(samples, samples.mean(0), std)

    # --- checks -------------------------------------------------------------------------
    def _check_operator_batch(self, physics, b: int, advice: str) -> None:
        """Refuse an operator whose mask / coil maps / filter has a batch dimension of ``b > 1``:
        it cannot take the measurements repeated into a larger batch (samples, particles)."""
        if b <= 1:
            return
        for name, buf in list(physics.named_buffers()) + list(physics.named_parameters()):
            if buf.ndim >= 1 and buf.shape[0] == b and name.split(".")[-1] in ("mask", "coil_maps", "filter"):
                raise ValueError(f"{self.name}: the operator's {name!r} has a batch dimension of {b}; {advice}")

    def _check_measurement(self, y: Tensor, physics) -> Tensor:
        from deepinv.physics import LinearPhysics

        if not self.supports_nonlinear and not isinstance(physics, LinearPhysics):
            raise TypeError(
                f"{self.name}: needs a linear operator (a deepinv LinearPhysics with A_adjoint), "
                f"got {type(physics).__name__}"
            )
        if not isinstance(y, Tensor):
            raise TypeError(f"{self.name}: y must be a torch.Tensor, got {type(y).__name__}")
        if not torch.isfinite(y).all():
            bad = (~torch.isfinite(y)).sum().item()
            raise ValueError(f"{self.name}: the measurement y has {bad} NaN/Inf values of {y.numel()}")
        probe = torch.zeros(1, *self.prior.image_shape, device=y.device, dtype=y.real.dtype)
        try:
            expected = tuple(physics.A(probe).shape[1:])
        except Exception as err:  # the operator cannot take the prior's images at all
            raise ValueError(
                f"{self.name}: the operator does not accept images of the prior's shape "
                f"{self.prior.image_shape}: {err}"
            ) from err
        if tuple(y.shape[1:]) != expected:
            raise ValueError(
                f"{self.name}: y has shape {tuple(y.shape)}, but the operator maps images of shape "
                f"{self.prior.image_shape} to (B, {', '.join(map(str, expected))})"
            )
        return y

    def extra_repr(self) -> str:
        return f"prior={type(self.prior).__name__}{self.prior.image_shape}"
