"""How a prior's network runs: its precision, memory layout and compilation.

:func:`accelerate` is the one switch (``prior.accelerate(...)`` calls it). Only the *network
call* changes; everything around it stays as it was:

- **Precision.** ``dtype="bf16"`` / ``"fp16"`` casts the network's weights (as
  ``priors.load(..., dtype=)`` does), or with ``autocast=True`` keeps them in float32 and runs
  the call under :func:`torch.autocast`. The adapters cast the network's input to its dtype
  and its output back, and compute the noise conditioning (``c_noise``, ADM timesteps,
  EDM's ``c_in``/``c_skip``/``c_out``) in the caller's float32; GroupNorm runs in float32
  inside the U-Nets. So a sampler's iterate, schedule, guidance, CG and likelihood stay in
  the sampler's dtype (float32, or float64 where an exactness test asks for it): the
  network's output is one more rounding, of relative size ``2^-8`` (bf16) or ``2^-11``
  (fp16), on the denoiser's estimate.
- **Memory layout.** ``channels_last`` (``"auto"``: on CUDA, for networks with 2D
  convolutions) converts the weights and the network's 4D inputs to NHWC, the layout of
  the tensor-core convolution kernels.
- **Compilation.** ``compile=True`` (or a backend name) wraps the network's ``forward``
  alone in :func:`torch.compile` with ``dynamic=False``: the preconditioning around it stays
  eager, so DPS-type samplers differentiate with respect to an input of the compiled graph.
  Dynamo keeps one graph per input shape and grad mode (sampling without grad, guidance
  with grad): toggling ``requires_grad`` between steps reuses the two graphs and does not
  recompile. If the compiler is missing (no C++ compiler for inductor on the CPU, no Triton
  on CUDA, an unsupported Python) or the first compiled call fails, the network runs eager,
  a one-line :class:`RuntimeWarning` says why, and :attr:`~invdiff.priors.DiffusionPrior.runtime`
  records it in ``fallback_reason``.

:attr:`DiffusionPrior.runtime <invdiff.priors.DiffusionPrior.runtime>` says what actually
ran (``dtype``, ``autocast``, ``channels_last``, ``compile`` requested, ``compiled`` after a
successful compiled call, ``fallback_reason``); samplers copy it into ``last_run.runtime``.

Example::

    >>> import torch
    >>> from invdiff import priors
    >>> prior = priors.load("ct-phantom-64").accelerate(dtype="bf16")
    >>> prior.runtime["dtype"], prior.runtime["compiled"]
    ('bfloat16', False)
    >>> prior.denoise(torch.rand(2, 1, 64, 64), 0.5).dtype   # the caller's dtype
    torch.float32
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = ["accelerate", "network_of", "runtime_of", "compile_unavailable", "dtype_name", "DTYPE_CHOICES"]

#: The names ``--dtype`` accepts on the command line.
DTYPE_CHOICES = ("float32", "bf16", "fp16")


def dtype_name(dtype: torch.dtype | None) -> str | None:
    """``torch.bfloat16`` -> ``"bfloat16"`` (``None`` stays ``None``)."""
    return None if dtype is None else str(dtype).removeprefix("torch.")


@dataclass
class _Runtime:
    """What runs (see the module doc); one per accelerated network."""

    dtype: str | None
    autocast: bool = False
    channels_last: bool = False
    compile: str | None = None
    compiled: bool = False
    fallback_reason: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def network_of(prior: nn.Module) -> nn.Module | None:
    """The network of ``prior`` (the module whose weights its checkpoint holds), or ``None``
    for a prior without one (the analytic priors). A prior around another prior (latent
    diffusion) gives the inner prior's network."""
    net = _weights_of(prior)
    if net is prior:  # the family's file is the prior's own state dict (EDM's official wrapper): its network
        net = max(prior.children(), key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    return net if isinstance(net, nn.Module) and any(True for _ in net.parameters()) else None


def _weights_of(prior: nn.Module) -> Any:
    """The module whose ``state_dict`` is the checkpoint (the family's ``network``; what
    ``load(dtype=)`` casts), else ``prior.model``."""
    from .base import DiffusionPrior
    from .loading import family_of

    inner = getattr(prior, "latent", None)
    if isinstance(inner, DiffusionPrior):
        return _weights_of(inner)
    family = family_of(prior) if isinstance(prior, DiffusionPrior) else None
    if family is not None:
        try:
            return family.network(prior)
        except AttributeError:  # a prior of the family's class around a denoiser of the user's (no network)
            pass
    return getattr(prior, "model", None)


def _parameter_dtype(net: nn.Module) -> torch.dtype:
    """The dtype most of the network's floating-point weights are in."""
    counts: dict[torch.dtype, int] = {}
    for p in net.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def runtime_of(prior: nn.Module) -> dict:
    """What the network of ``prior`` runs as: ``{"dtype", "autocast", "channels_last",
    "compile", "compiled", "fallback_reason"}`` (``dtype`` None: the prior has no network
    and computes in the caller's dtype)."""
    net = network_of(prior)
    state = getattr(net, "_invdiff_runtime", None) if net is not None else None
    if state is not None:
        return state.as_dict()
    return _Runtime(dtype=None if net is None else dtype_name(_parameter_dtype(net))).as_dict()


def compile_unavailable(device: torch.device | str, backend: str = "inductor") -> str | None:
    """Why :func:`torch.compile` with ``backend`` cannot work for ``device`` here, or ``None``
    when it may (whether it does is known at the first call)."""
    device = torch.device(device)
    if not hasattr(torch, "compile"):
        return f"torch {torch.__version__} has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return f"torch.compile does not support Python {sys.version.split()[0]} with torch {torch.__version__}"
    except Exception as err:  # pragma: no cover - a broken install
        return f"torch.compile is unavailable ({type(err).__name__}: {_first_line(err)})"
    if backend == "inductor":
        if device.type == "cpu":
            cxx = os.environ.get("CXX") or "g++"
            if not any(shutil.which(c) for c in (cxx, "g++", "clang++", "c++")):
                return "no C++ compiler found (the inductor backend needs one on the CPU; set CXX)"
        elif device.type == "cuda":
            try:
                from torch.utils._triton import has_triton
            except ImportError:  # pragma: no cover - old torch
                has_triton = None
            if has_triton is not None and not has_triton():
                return "Triton is not installed (the inductor backend needs it on CUDA)"
    return None


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [""])[0][:200]


def _root_cause(err: BaseException) -> BaseException:
    """The compiler's own error inside dynamo's wrappers (``BackendCompilerFailed``...)."""
    seen = {id(err)}
    while True:
        inner = getattr(err, "inner_exception", None) or err.__cause__
        if inner is None or id(inner) in seen:
            return err
        seen.add(id(inner))
        err = inner


class _NetworkCall:
    """The network's ``forward``, set on the instance: layout, autocast and the compiled call
    with its eager fallback. Copies (``copy.deepcopy``) rebuild the compiled function lazily."""

    def __init__(self, forward: Callable, state: _Runtime, backend: str | Callable | None = None) -> None:
        self.forward = forward  # the module's own bound forward
        self.state = state
        self.backend = backend
        self._compiled: Callable | None = None

    def __getstate__(self) -> dict:
        return {"forward": self.forward, "state": self.state, "backend": self.backend, "_compiled": None}

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if state.channels_last:
            args = tuple(a.contiguous(memory_format=torch.channels_last)
                         if isinstance(a, Tensor) and a.ndim == 4 and a.is_floating_point() else a for a in args)
        autocast = contextlib.nullcontext()
        if state.autocast:
            first = next((a for a in args if isinstance(a, Tensor)), None)
            kind = first.device.type if first is not None else "cpu"
            autocast = torch.autocast(kind, dtype=getattr(torch, state.dtype))
        with autocast:
            if state.compile is None or state.fallback_reason is not None:
                return self.forward(*args, **kwargs)
            return self._call_compiled(*args, **kwargs)

    def _call_compiled(self, *args: Any, **kwargs: Any) -> Any:
        state = self.state
        if self._compiled is None:
            self._compiled = torch.compile(self.forward, backend=self.backend, dynamic=False)
        try:
            out = self._compiled(*args, **kwargs)
        except Exception as err:
            out = self.forward(*args, **kwargs)  # an error of the inputs raises here, as it would eager
            cause = _root_cause(err)
            self.fall_back(f"the compiled call failed ({type(cause).__name__}: {_first_line(cause)})")
            return out
        state.compiled = True
        return out

    def fall_back(self, reason: str) -> None:
        self.state.fallback_reason = reason
        self.state.compiled = False
        self._compiled = None
        warnings.warn(f"invdiff: torch.compile not used: {reason}; the network runs eager", RuntimeWarning,
                      stacklevel=4)


def accelerate(
    prior: nn.Module,
    dtype: torch.dtype | str | None = None,
    *,
    autocast: bool = False,
    channels_last: bool | str = "auto",
    compile: bool | str = False,
) -> nn.Module:
    """Run the network of ``prior`` in ``dtype``, in ``channels_last`` layout and compiled
    (see the module doc); returns ``prior``, changed in place. Call it after moving the prior
    to its device; calling it again replaces the earlier settings.

    :param dtype: ``"bf16"``, ``"fp16"``, ``"float32"`` (or a ``torch.dtype``); ``None`` keeps
        the network's. Only the network call is in this precision.
    :param autocast: keep the weights in float32 and run the call under
        :func:`torch.autocast` in ``dtype`` (matrix products and convolutions in half
        precision, reductions in float32) instead of casting the weights.
    :param channels_last: ``True``, ``False`` or ``"auto"`` (on CUDA, for a network with 2D
        convolutions).
    :param compile: ``True`` (the ``"inductor"`` backend), a backend (a name such as
        ``"aot_eager"`` or ``"cudagraphs"``, or a callable) or ``False``. Falls back to eager with a one-line warning when
        it cannot be used.
    :returns: ``prior``; :attr:`~invdiff.priors.DiffusionPrior.runtime` says what runs.
    :raises ValueError: an unknown dtype name, or ``autocast`` without a half ``dtype``.
    """
    from .loading import parse_dtype

    want = parse_dtype(dtype)
    if autocast and want not in (torch.bfloat16, torch.float16):
        raise ValueError(f"autocast needs dtype bf16 or fp16, got {dtype!r}")
    backend = None if compile is False or compile is None else "inductor" if compile is True else compile
    backend_name = backend if backend is None or isinstance(backend, str) else getattr(backend, "__name__", repr(backend))
    net = network_of(prior)
    if net is None:
        if (want not in (None, torch.float32)) or backend or channels_last is True:
            warnings.warn(f"invdiff: {type(prior).__name__} has no network: it runs as it is, in the sampler's dtype",
                          RuntimeWarning, stacklevel=2)
        return prior
    old = net.__dict__.pop("forward", None)  # undo an earlier accelerate
    forward = old.forward if isinstance(old, _NetworkCall) else (old or net.forward)
    weights = _weights_of(prior)  # cast as load(dtype=) does (a family may keep parts in float32)
    if autocast:
        weights.to(torch.float32)
    elif want is not None:
        weights.to(want)
    device = next(net.parameters()).device
    has_conv = any(isinstance(m, nn.Conv2d) for m in net.modules())
    layout = bool(has_conv and device.type == "cuda") if channels_last == "auto" else bool(channels_last)
    net.to(memory_format=torch.channels_last if layout else torch.contiguous_format)
    state = _Runtime(dtype=dtype_name(want if autocast else _parameter_dtype(net)), autocast=bool(autocast),
                     channels_last=layout, compile=backend_name)
    call = _NetworkCall(forward, state, backend)
    if backend is not None:
        reason = compile_unavailable(device, backend_name)
        if reason is not None:
            call.fall_back(reason)
    net._invdiff_runtime = state  # what runtime_of reads
    if layout or autocast or backend is not None:
        net.forward = call
    return prior
