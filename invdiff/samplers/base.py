"""The sampler contract: a :class:`deepinv.models.Reconstructor` over a diffusion prior.

``x_hat = sampler(y, physics, generator=g, x_init=None, callback=None)`` runs one posterior
sample per measurement; :meth:`Sampler.sample` runs ``n`` of them batched through the
network and returns their mean and per-pixel standard deviation. Every run records its
cost in :attr:`Sampler.last_run`. Subclasses implement :meth:`Sampler._run`, a loop that
reads like the paper's algorithm and calls :meth:`Sampler.denoise` for the network.
"""

from __future__ import annotations

import functools
import inspect
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from deepinv.models import Reconstructor
from torch import Tensor
from tqdm.auto import tqdm

from ..priors.base import DiffusionPrior
from .params import (ClipRange, Choice, Hyperparameters, Integer, OptionError, Real, Sigmas, make_params_class,
                     serialisable)
from .steps.likelihood import LIKELIHOODS
from .steps.randomness import randn_like

__all__ = ["Sampler", "RunInfo", "PosteriorSamples", "SamplerDivergedError", "IncompatibleError", "OptionError", "serialisable"]


class IncompatibleError(ValueError, TypeError):
    """A prior or operator this sampler cannot use (a latent prior for a pixel sampler, a
    nonlinear operator for a method that needs ``A_adjoint``): one line, before any work.
    A ``TypeError`` for the code that caught the type mismatch as one."""


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
    :ivar runtime: how the prior's network ran (:attr:`DiffusionPrior.runtime
        <invdiff.priors.DiffusionPrior.runtime>`: dtype, autocast, channels_last, compiled,
        fallback_reason); the sampler's own arithmetic is in the measurement's dtype.
    """

    sampler: str
    nfe: int = 0
    nfe_backward: int = 0
    steps: int = 0
    wall_time: float = 0.0
    peak_memory: int | None = None
    batch: int = 0
    seed: int | None = None
    runtime: dict | None = None
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

    **Image shape.** The shape of the reconstruction comes from the data, not from the
    prior (:meth:`image_shape_for`): ``x_init``'s (a prior of any size), else the operator's
    ``img_size`` (every invdiff operator and most deepinv physics have one), else
    ``A_adjoint(y)``'s (a linear operator), else the prior's own for a fixed-size prior. The prior then says whether it
    can work at that shape (:meth:`~invdiff.priors.DiffusionPrior.check_shape`: a fixed-size
    prior gives its size error, a patch prior works at any size). During a run it is
    :attr:`image_shape`.
    """

    name = "sampler"

    #: The ranges of the options, by name (see :mod:`invdiff.samplers.params`). The names
    #: shared by several samplers are declared here once; a sampler adds its own and may
    #: override these (DiffPIR's ``zeta`` is in [0, 1], its ``schedule`` has ``"quad"``).
    parameter_constraints = {
        "steps": Integer(1),
        "zeta": Real(0),
        "eta": Real(0, 1),
        "schedule": Choice("karras", "ddpm"),
        "sigmas": Sigmas(),
        "clip": ClipRange(),
        "noise_sigma": Real(0, none=True),
        "min_noise": Real(0),
        "likelihood": Choice(*LIKELIHOODS),
        "poisson_gain": Real(0, closed="neither", none=True),
        "operator_norm": Real(0, closed="neither", none=True),
        "cg_iterations": Integer(0),
        "cg_tol": Real(0),
        "max_batch": Integer(1, none=True),
        "gamma_scale": Real(0, closed="neither"),
    }
    #: The frozen, validated dataclass of this sampler's options (built from the
    #: constructor's signature by :func:`~invdiff.samplers.params.make_params_class`).
    Params: type[Hyperparameters]

    def __init_subclass__(cls, **kwargs) -> None:
        """Give every subclass its ``Params`` and make its constructor validate them first."""
        super().__init_subclass__(**kwargs)
        parent_params = next((k.__dict__["Params"] for k in cls.__mro__[1:] if "Params" in k.__dict__), None)
        cls.Params = make_params_class(cls, parent_params)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def validating_init(self, *args, **kw):
            if "params" in self.__dict__:  # super().__init__ of the outermost call: validated there
                return init(self, *args, **kw)
            try:
                bound = signature.bind(self, *args, **kw)
            except TypeError:  # an unknown or missing keyword: Params.build names it
                bound = None
            values = {}
            if bound is not None:
                bound.apply_defaults()
                for k, v in bound.arguments.items():
                    p = signature.parameters[k]
                    if p.kind is p.VAR_KEYWORD:
                        values.update({key: val for key, val in v.items() if key not in ("prior", "verbose")})
                    elif k not in ("self", "prior", "verbose") and p.kind is not p.VAR_POSITIONAL:
                        values[k] = v
            else:
                values = {k: v for k, v in kw.items() if k not in ("prior", "verbose")}
            #: the options this sampler was built with (validated; ``params.to_dict()`` as JSON)
            self.__dict__["params"] = type(self).Params.build(values)
            try:
                init(self, *args, **kw)
            except BaseException:
                self.__dict__.pop("params", None)
                raise

        cls.__init__ = validating_init

    def hyperparameters(self) -> dict:
        """Every option of this sampler (defaults resolved), as JSON: ``params.to_dict()``,
        what the bench records, and what :meth:`from_hyperparameters` rebuilds the sampler from.

        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers import DDS
        >>> s = DDS(GaussianPrior.stationary((1, 8, 8)), steps=7)
        >>> params = s.hyperparameters()
        >>> params["steps"], params["eta"]
        (7, 0.85)
        >>> DDS.from_hyperparameters(s.prior, params).hyperparameters() == params
        True
        """
        return self.params.to_dict()

    @classmethod
    def from_hyperparameters(cls, prior: DiffusionPrior, params: dict, **objects) -> "Sampler":
        """The sampler of ``params`` (:meth:`hyperparameters`) over ``prior``; tensor-valued
        options (``sigmas``) come back as tensors; objects (a second prior) must be passed
        again in ``objects``."""
        return cls.from_params(prior, cls.Params.from_dict(params, **objects))

    @classmethod
    def from_params(cls, prior: DiffusionPrior, params: Hyperparameters, verbose: bool = False) -> "Sampler":
        """The sampler of a ``cls.Params`` object over ``prior``."""
        if not isinstance(params, cls.Params):
            raise TypeError(f"{cls.__name__}.from_params needs a {cls.__name__}.Params, got {type(params).__name__}")
        return cls(prior, verbose=verbose, **params.as_kwargs())

    #: ``"pixel"`` (the default: the sampler denoises images) or ``"latent"`` (it samples the
    #: latents of a :class:`~invdiff.priors.LatentDiffusionPrior`; a pixel prior is then used
    #: through the identity autoencoder). A pixel sampler refuses a latent prior.
    prior_kind: str = "pixel"
    #: False for methods that need ``A_adjoint`` (CG / proximal data steps); they refuse a
    #: nonlinear operator with a clear error instead of failing inside the loop.
    supports_nonlinear = True
    #: True for methods built on the operator's singular value decomposition (DDRM, DDNM):
    #: :meth:`check_physics` refuses an operator without a known one
    #: (:func:`~invdiff.samplers.steps.svd.require_svd`, with the sampler's ``singular_floor``).
    needs_svd = False
    #: True for methods that estimate the operator too (BlindDPS): only they, and the
    #: benchmark's baseline, take a blind operator (``physics.blind``, task ``deblur-blind``),
    #: whose ``A`` needs the unknown kernel; every other sampler refuses it in one line.
    handles_blind = False
    #: ``None`` when the images of a batch are independent: image ``b`` with its own generator
    #: (a list of generators, one per image) gives exactly what it gives alone, because every
    #: shared step works per image (``tests/test_batching.py``); else the reason why not, and
    #: :func:`invdiff.apps.workflows.reconstruct` then runs a series one slice at a time.
    batch_coupling: str | None = None
    #: Run the loop with autograd on (when the caller's grad mode is on), so that a loss on
    #: the output can train the prior's network (deepinv's ``Trainer.train``, unrolled
    #: networks). Off by default: sampling keeps no graph, which is what makes it fast and
    #: light. Gradients flow through every network call and operator application of the
    #: loop; the guidance gradients of DPS-type methods (an inner ``autograd.grad``) are
    #: constants of that graph (no second-order terms). Set it on an instance:
    #: ``sampler.differentiable = True``.
    differentiable: bool = False

    def __init__(self, prior: DiffusionPrior, verbose: bool = False) -> None:
        super().__init__()
        if not isinstance(prior, DiffusionPrior):
            raise IncompatibleError(
                f"{type(self).__name__} needs an invdiff DiffusionPrior, got {type(prior).__name__}; "
                "wrap a deepinv denoiser with invdiff.priors.DenoiserPrior"
            )
        from ..priors.latent import LatentDiffusionPrior

        if isinstance(prior, LatentDiffusionPrior) and type(self).prior_kind != "latent":
            raise IncompatibleError(
                f"{type(self).__name__} samples in pixel space and cannot use a LatentDiffusionPrior; "
                "use a latent sampler (ReSample) or a pixel prior"
            )
        self.prior = prior
        self.verbose = verbose
        self.last_run: RunInfo | None = None
        self._info: RunInfo | None = None
        #: ``(C, H, W)`` of the images of the current (or last) run.
        self.image_shape: tuple[int, int, int] = tuple(prior.image_shape)
        self._generator = None

    # --- what subclasses call ---------------------------------------------------------
    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """The prior's denoiser, counted in ``nfe`` (and ``nfe_backward`` when ``x`` requires grad).

        Runs the network in its own dtype and returns the sampler's dtype.
        """
        self._info.nfe += 1
        if x.requires_grad:
            self._info.nfe_backward += 1
        return self.prior.denoise(x, sigma, generator=self._generator).to(x.dtype)

    def check_finite(self, x: Tensor, step: int, sigma: float) -> None:
        """Stop the run with :class:`SamplerDivergedError` if ``x`` has NaN/Inf."""
        if not torch.isfinite(x).all():
            bad = (~torch.isfinite(x)).sum().item()
            raise SamplerDivergedError(
                f"{self.name}: diverged at step {step} (sigma={float(sigma):.4g}): "
                f"{bad} of {x.numel()} values are NaN/Inf; lower the step size or check the measurement scale"
            )

    def randn(self, shape, generator, like: Tensor) -> Tensor:
        """Standard normal noise of ``shape`` from ``generator``, in the real dtype and on the
        device of ``like`` (volume samplers draw it slice-major)."""
        return randn_like(like.new_zeros(tuple(shape), dtype=like.real.dtype), generator)

    def initial_noise(self, shape, sigma: float, x_init: Tensor | None, generator, like: Tensor) -> Tensor:
        """The start of a diffusion loop, :math:`x_N = x_\\text{init} + \\sigma_N z` (``x_init``
        = 0 when ``None``), in the real dtype and on the device of ``like`` (the measurement)."""
        x = sigma * self.randn(shape, generator, like)
        return x if x_init is None else x + x_init.to(x.dtype)

    def step_done(self, i: int, sigma: float, x: Tensor, x0: Tensor, callback: Callable[[dict], None] | None,
                  check: Tensor | None = None, view: Callable[[Tensor], Tensor] | None = None, **extra) -> None:
        """The end of step ``i``: the divergence check on ``x`` (or on ``check``, e.g. SMC's
        log-weights), the step count, and ``callback(dict(i, sigma, x, x0, **extra))``, with
        ``x`` and ``x0`` passed through ``view`` first when given (EnKG shows ensemble means;
        computed only when there is a callback)."""
        self.check_finite(x if check is None else check, i, sigma)
        self._info.steps += 1
        if callback is not None:
            if view is not None:
                x, x0 = view(x), view(x0)
            callback(dict(i=i, sigma=sigma, x=x, x0=x0, **extra))

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
        *,
        seed: int | None = None,
        x_gt: Tensor | None = None,
        compute_metrics: bool = False,
        **kwargs,
    ) -> Tensor | tuple[Tensor, dict]:
        """Draw one posterior sample per measurement.

        :param y: measurements ``(B, ...)``, as produced by ``physics(x)``.
        :param physics: the forward operator (a :class:`deepinv.physics.Physics`).
        :param generator: source of all randomness (a ``torch.Generator``, or one per batch
            element). When ``None`` a fresh generator is seeded from ``seed``, or from the OS
            (its seed is recorded in ``last_run.seed``); the global RNG is never touched.
        :param x_init: optional starting point ``(B, C, H, W)`` where the method has one.
        :param callback: called after every step with ``dict(i, sigma, x, x0)``.
        :param seed: deepinv's convention: seed of the generator when none is passed.
        :param x_gt: ground truth, for ``compute_metrics`` (deepinv's ``Trainer.test`` passes it).
        :param compute_metrics: also return deepinv's convergence metrics, ``{"psnr": ...,
            "residual": ...}`` with one list per image and one value per step (the PSNR of
            the step's denoised estimate ``x0`` against ``x_gt``, and
            :math:`\\|x_{k+1} - x_k\\| / \\|x_k\\|`), as deepinv's iterative algorithms do.
        :returns: reconstructions ``(B, C, H, W)``, and the metrics when ``compute_metrics``.

        The loop runs under ``torch.no_grad()`` (fast, no graph kept) unless
        :attr:`differentiable` is set.
        """
        if kwargs:
            unknown = sorted(k for k in kwargs if k not in ("update_parameters",))
            if unknown:
                raise TypeError(f"{self.name}: unexpected arguments {unknown}")
        y, physics = self._single_tensor(y, physics)
        if not isinstance(y, Tensor):
            raise TypeError(f"{self.name}: y must be a torch.Tensor, got {type(y).__name__}")
        batch = y.shape[0]
        self.image_shape = self.image_shape_for(y, physics, x_init)
        y = self._check_measurement(y, physics)
        if x_init is not None and tuple(x_init.shape) != (batch, *self.image_shape):
            raise ValueError(
                f"{self.name}: x_init has shape {tuple(x_init.shape)}, expected {(batch, *self.image_shape)}"
            )
        if generator is None:
            generator = torch.Generator(device=y.device)
            seed = generator.seed() if seed is None else generator.manual_seed(int(seed)).initial_seed()
        else:
            seed = None
        self._generator = generator
        metrics = None
        if compute_metrics:
            metrics, callback = self._metrics_callback(x_gt, batch, callback)
        self._info = RunInfo(sampler=self.name, batch=batch, seed=seed)
        cuda = y.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(y.device)
        start = time.perf_counter()
        try:
            with torch.set_grad_enabled(self.differentiable and torch.is_grad_enabled()):
                x = self._run(y, physics, x_init, generator, callback)
        finally:
            if cuda:
                torch.cuda.synchronize(y.device)
                self._info.peak_memory = torch.cuda.max_memory_allocated(y.device)
            self._info.wall_time = time.perf_counter() - start
            self._info.runtime = self.prior.runtime  # after the run: a compile fallback happens at the first call
            self.last_run, self._info, self._generator = self._info, None, None
        return (x, metrics) if compute_metrics else x

    @staticmethod
    def _metrics_callback(x_gt: Tensor | None, batch: int, callback):
        """deepinv's convergence metrics (psnr of ``x0`` vs ``x_gt``, residual) per image and step."""
        metrics: dict[str, list[list[float]]] = {"residual": [[] for _ in range(batch)]}
        if x_gt is not None:
            metrics["psnr"] = [[] for _ in range(batch)]
        previous: list[Tensor | None] = [None]

        def per_image(t: Tensor) -> Tensor:  # particles (row k * B + b, SMC) -> their mean per image
            t = t.detach()
            return t if t.shape[0] == batch else t.reshape(-1, batch, *t.shape[1:]).mean(0)

        def record(info: dict) -> None:
            x = per_image(info["x"])
            flat = x.reshape(batch, -1)
            if previous[0] is not None:
                prev = previous[0].reshape(batch, -1)
                res = (flat - prev).norm(dim=1) / prev.norm(dim=1).clamp_min(1e-12)
                for b in range(batch):
                    metrics["residual"][b].append(float(res[b]))
            previous[0] = x
            if x_gt is not None:
                x0 = per_image(info["x0"]).real.clamp(0, 1).reshape(batch, -1)
                mse = ((x0 - x_gt.detach().to(x0).reshape(batch, -1)) ** 2).mean(1)
                for b in range(batch):
                    metrics["psnr"][b].append(float(-10 * torch.log10(mse[b].clamp_min(1e-20))))
            if callback is not None:
                callback(info)

        return metrics, record

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
        ``k * B + b`` of the run); per-image operator parameters (masks, kernels, noise
        levels of a deepinv physics generator) are repeated with it.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        y, physics = self._single_tensor(y, physics)
        b = y.shape[0]
        physics = self._expand_physics(physics, b, n)
        y_rep = y.repeat(n, *([1] * (y.ndim - 1)))
        x0 = None if x_init is None else x_init.repeat(n, *([1] * (x_init.ndim - 1)))  # images or volumes
        x = self.forward(y_rep, physics, generator=generator, x_init=x0, callback=callback)
        samples = x.reshape(n, b, *x.shape[1:])
        std = samples.std(0, unbiased=True) if n > 1 else torch.zeros_like(samples[0])
        return PosteriorSamples(samples, samples.mean(0), std)

    # --- checks ---------------------------------------------------------------------------
    @staticmethod
    def _single_tensor(y, physics):
        """A deepinv stack (``StackedPhysics``, ``TensorList`` measurements) as one whitened
        operator on one tensor (:func:`invdiff.operators.whitened_stack`: the same likelihood)."""
        from deepinv.physics import StackedPhysics

        if isinstance(physics, StackedPhysics):
            from ..operators.stacked import whitened_stack

            physics = whitened_stack(physics)
            y = physics.whiten(y)
        return y, physics

    #: Names of operator parameters that may carry one entry per image (deepinv's physics
    #: generators: masks, kernels and their FFTs, coil maps, noise levels and gains).
    _PER_IMAGE_PARAMETERS = ("mask", "coil_maps", "filter", "angle", "sigma", "gain")

    def _expand_physics(self, physics, b: int, n: int, interleave: bool = False):
        """``physics`` for a batch of ``n * b`` rows (samples, particles) over ``b`` images.

        Per-image parameters (a mask, kernel, coil maps or noise level whose first dimension
        is ``b > 1``) are repeated so that each row sees its own image's parameters: row
        ``k * b + j`` is image ``j`` (``interleave=False``, :meth:`sample` and SMC) or row
        ``j * n + k`` (``interleave=True``, EnKG's ensembles). The operator is copied only
        when it has such parameters; the caller's operator is never changed."""
        if n <= 1 or b <= 1:
            return physics
        targets = [name for name, t in list(physics.named_buffers()) + list(physics.named_parameters())
                   if t.ndim >= 1 and t.shape[0] == b and name.split(".")[-1] in self._PER_IMAGE_PARAMETERS]
        if not targets:
            return physics
        import copy

        expanded = copy.deepcopy(physics)
        for name in targets:
            path, _, attr = name.rpartition(".")
            module = expanded.get_submodule(path) if path else expanded
            t = getattr(module, attr)
            rep = t.detach().repeat_interleave(n, 0) if interleave else t.detach().repeat(n, *([1] * (t.ndim - 1)))
            if isinstance(t, torch.nn.Parameter):
                setattr(module, attr, torch.nn.Parameter(rep, requires_grad=False))
            else:
                setattr(module, attr, rep)
        return expanded

    def check_physics(self, physics) -> None:
        """Refuse an operator this sampler cannot use (a nonlinear one for a method that needs
        ``A_adjoint``, one without a known SVD for a method that ``needs_svd``), before any work:
        :class:`IncompatibleError`, one line."""
        from deepinv.physics import LinearPhysics

        if getattr(physics, "blind", False) and not self.handles_blind:
            raise IncompatibleError(
                f"{self.name}: the operator's kernel is unknown (a blind task, {type(physics).__name__}); "
                "use a blind sampler (blind-dps), or give this sampler the operator with its kernel"
            )
        if not self.supports_nonlinear and not isinstance(physics, LinearPhysics):
            from . import available, get

            others = ", ".join(n for n in available() if get(n).supports_nonlinear)
            raise IncompatibleError(
                f"{self.name}: needs a linear operator (a deepinv LinearPhysics with A_adjoint), "
                f"got {type(physics).__name__}; these samplers take nonlinear operators: {others}"
            )
        if self.needs_svd:  # DDRM, DDNM: the operator's singular basis, read off it and checked
            from .steps.svd import require_svd

            require_svd(physics, self.image_shape, getattr(self, "singular_floor", 0.0), where=self.name)

    def _check_measurement(self, y: Tensor, physics) -> Tensor:
        self.check_physics(physics)
        if not isinstance(y, Tensor):
            raise TypeError(f"{self.name}: y must be a torch.Tensor, got {type(y).__name__}")
        if not torch.isfinite(y).all():
            bad = (~torch.isfinite(y)).sum().item()
            raise ValueError(f"{self.name}: the measurement y has {bad} NaN/Inf values of {y.numel()}")
        probe = torch.zeros(1, *self.image_shape, device=y.device, dtype=y.real.dtype)
        try:
            # a blind operator's A needs a kernel: its generic guess gives the shape
            known = {"filter": physics.guess()} if getattr(physics, "blind", False) else {}
            expected = tuple(physics.A(probe, **known).shape[1:])
        except Exception as err:  # the operator cannot take images of that shape at all
            raise ValueError(
                f"{self.name}: the operator does not accept images of shape {self.image_shape}: {err}"
            ) from err
        if tuple(y.shape[1:]) != expected:
            raise ValueError(
                f"{self.name}: y has shape {tuple(y.shape)}, but the operator maps images of shape "
                f"{self.image_shape} to (B, {', '.join(map(str, expected))})"
            )
        return y

    def image_shape_for(self, y: Tensor, physics, x_init: Tensor | None = None) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images behind ``y`` (see the class doc), checked by the prior."""
        from deepinv.physics import LinearPhysics

        shape = None
        if x_init is not None and self.prior.any_size:  # (a fixed-size prior checks x_init against its size)
            shape = tuple(x_init.shape[1:])
        else:
            size = getattr(physics, "img_size", None)
            if isinstance(size, (tuple, list, torch.Size)) and len(size) == 3 and all(
                    isinstance(s, int) and s > 0 for s in size):
                shape = tuple(int(s) for s in size)
            elif not self.prior.any_size:
                shape = tuple(self.prior.image_shape)
            elif isinstance(physics, LinearPhysics):
                shape = tuple(physics.A_adjoint(y[:1]).shape[1:])
            else:
                raise ValueError(
                    f"{self.name}: cannot tell the image size of a {type(physics).__name__} without img_size; "
                    f"set physics.img_size = (C, H, W) or pass x_init"
                )
        if not self.prior.any_size and tuple(shape) != tuple(self.prior.image_shape) \
                and self._accepts(physics, y, self.prior.image_shape):
            # an operator that works at any size (deepinv's denoising, a stale img_size, the (2, H, W) of
            # deepinv's complex MRI) and maps the prior's images to y: the prior's shape, as before
            shape = tuple(self.prior.image_shape)
        return self.prior.check_shape(shape, where=self.name)

    @staticmethod
    def _accepts(physics, y: Tensor, shape) -> bool:
        """Whether ``physics`` maps images of ``shape`` to measurements shaped like ``y``."""
        try:
            probe = torch.zeros(1, *shape, device=y.device, dtype=y.real.dtype)
            return tuple(physics.A(probe).shape[1:]) == tuple(y.shape[1:])
        except Exception:  # noqa: BLE001 - any failure means: not that shape
            return False

    def extra_repr(self) -> str:
        return f"prior={type(self.prior).__name__}{self.prior.image_shape}{', any size' if self.prior.any_size else ''}"
