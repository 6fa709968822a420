r"""Hyperparameters: one validated, serialisable object per sampler.

Every sampler class ``S`` has a frozen dataclass ``S.Params`` whose fields are the keyword
arguments of ``S.__init__`` (defaults included; the base class builds it from the
constructor's signature, so the signature stays the one place a parameter is declared).
Building it validates every field against the ranges the sampler declares in
``parameter_constraints`` (merged along the class hierarchy, with the shared names such as
``steps``, ``noise_sigma`` or ``clip`` declared once on :class:`~invdiff.samplers.Sampler`);
a value out of range is a one-line :class:`OptionError` naming the sampler, the option,
the value and the allowed range, raised before any work. A sampler's constructor builds its
``Params`` first, so ``S(prior, zeta=-1)`` fails the same way, and ``sampler.params`` is the
object it was built from. The bench records ``params.to_dict()`` as is, and
``S.from_params(prior, params)`` / ``S.Params.from_dict(d)`` rebuild it.

The constraint objects follow scikit-learn's ``_parameter_constraints`` (``Interval``,
``StrOptions``): declarative, one per parameter name, checked in one place.

>>> from invdiff.samplers import DPS
>>> p = DPS.Params(steps=50, zeta=0.5)
>>> p.steps, p.weighting
(50, 'likelihood')
>>> DPS.Params.from_dict(p.to_dict()) == p
True
>>> DPS.Params(zeta=-1)
Traceback (most recent call last):
...
invdiff.samplers.params.OptionError: dps: zeta=-1 is out of range: zeta must be a number >= 0
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, Mapping

import torch
from torch import Tensor

__all__ = [
    "OptionError",
    "Constraint",
    "Integer",
    "Real",
    "Choice",
    "Flag",
    "ClipRange",
    "Sigmas",
    "Instance",
    "Hyperparameters",
    "make_params_class",
    "serialisable",
]


class OptionError(ValueError, TypeError):
    """A sampler option that is unknown, of the wrong type or out of range (one line). A
    ``ValueError`` and, for the unknown-keyword case Python reports as one, a ``TypeError``."""


def serialisable(value: Any) -> Any:
    """A constructor argument as JSON: numbers, strings, ``None``, lists (tuples and tensors
    become lists), dicts; a module (a second prior) as its class name."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, (list, tuple)):
        return [serialisable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): serialisable(v) for k, v in value.items()}
    if isinstance(value, torch.nn.Module):
        return f"<{type(value).__name__}>"
    return repr(value)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


class Constraint:
    """The allowed values of one option: :meth:`accepts` says whether a value is one, and
    :meth:`describe` says what they are (completing "``name`` must be ...")."""

    none: bool = False

    def accepts(self, value: Any) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def check(self, sampler: str, name: str, value: Any) -> None:
        """Raise a one-line :class:`OptionError` unless ``value`` is allowed."""
        if value is None and self.none:
            return
        if not self.accepts(value):
            shown = repr(value) if not isinstance(value, Tensor) else f"tensor of shape {tuple(value.shape)}"
            kind = "out of range" if self._right_type(value) else "of the wrong type"
            raise OptionError(f"{sampler}: {name}={shown} is {kind}: {name} must be {self.describe()}"
                              + (" or None" if self.none else ""))

    def _right_type(self, value: Any) -> bool:
        return True


@dataclass(frozen=True)
class Integer(Constraint):
    """A whole number in ``[low, high]`` (``None``: no bound); not a float, not a boolean."""

    low: int | None = None
    high: int | None = None
    none: bool = False

    def _right_type(self, value: Any) -> bool:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)

    def accepts(self, value: Any) -> bool:
        return (self._right_type(value) and (self.low is None or value >= self.low)
                and (self.high is None or value <= self.high))

    def describe(self) -> str:
        if self.high is None:
            return "a whole number" + (f" >= {self.low}" if self.low is not None else "")
        return f"a whole number in [{self.low}, {self.high}]"


@dataclass(frozen=True)
class Real(Constraint):
    """A number between ``low`` and ``high`` (each bound open or closed; ``None``: none).
    NaN is never allowed; infinity only with ``infinite=True``."""

    low: float | None = None
    high: float | None = None
    closed: str = "both"  # "both", "left", "right", "neither"
    none: bool = False
    infinite: bool = False

    def _right_type(self, value: Any) -> bool:
        return _is_number(value)

    def accepts(self, value: Any) -> bool:
        if not _is_number(value) or math.isnan(value) or (math.isinf(value) and not self.infinite):
            return False
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and not (value >= self.low if left else value > self.low):
            return False
        return self.high is None or (value <= self.high if right else value < self.high)

    def describe(self) -> str:
        left, right = self.closed in ("both", "left"), self.closed in ("both", "right")
        if self.low is not None and self.high is not None:
            return f"a number in {'[' if left else '('}{self.low:g}, {self.high:g}{']' if right else ')'}"
        if self.low is not None:
            return f"a number {'>=' if left else '>'} {self.low:g}"
        if self.high is not None:
            return f"a number {'<=' if right else '<'} {self.high:g}"
        return "a finite number" if not self.infinite else "a number"


@dataclass(frozen=True)
class Choice(Constraint):
    """One of a fixed set of strings."""

    options: tuple[str, ...] = ()
    none: bool = False

    def __init__(self, *options: str, none: bool = False) -> None:
        object.__setattr__(self, "options", tuple(options))
        object.__setattr__(self, "none", none)

    def _right_type(self, value: Any) -> bool:
        return isinstance(value, str)

    def accepts(self, value: Any) -> bool:
        return isinstance(value, str) and value in self.options

    def describe(self) -> str:
        return "one of " + ", ".join(repr(o) for o in self.options)


@dataclass(frozen=True)
class Flag(Constraint):
    """``True`` or ``False``."""

    none: bool = False

    def _right_type(self, value: Any) -> bool:
        return False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, bool)

    def describe(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class ClipRange(Constraint):
    """The range images are clipped to: ``(low, high)`` with finite ``low < high``."""

    none: bool = True

    def _right_type(self, value: Any) -> bool:
        return isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_number(v) for v in value)

    def accepts(self, value: Any) -> bool:
        return (self._right_type(value) and all(math.isfinite(v) for v in value) and value[0] < value[1])

    def describe(self) -> str:
        return "a pair (low, high) of finite numbers with low < high"


@dataclass(frozen=True)
class Sigmas(Constraint):
    """Explicit noise levels: a 1-d tensor or list of numbers (the schedule's own check,
    :func:`~invdiff.samplers.steps.make_sigmas`, then asks for a strictly decreasing
    sequence ending at 0)."""

    none: bool = True

    def _right_type(self, value: Any) -> bool:
        return isinstance(value, (Tensor, list, tuple))

    def accepts(self, value: Any) -> bool:
        if isinstance(value, Tensor):
            return value.ndim == 1 and value.numel() >= 2 and bool(torch.isfinite(value).all())
        return (isinstance(value, (list, tuple)) and len(value) >= 2
                and all(_is_number(v) and math.isfinite(v) for v in value))

    def describe(self) -> str:
        return "a 1-d sequence of at least two finite noise levels"


@dataclass(frozen=True)
class Instance(Constraint):
    """An object of a given class (a second prior)."""

    cls: type = object
    none: bool = False

    def _right_type(self, value: Any) -> bool:
        return False

    def accepts(self, value: Any) -> bool:
        return isinstance(value, self.cls)

    def describe(self) -> str:
        return f"a {self.cls.__name__}"


class Hyperparameters:
    """Base of every sampler's ``Params`` dataclass (see the module doc). Frozen; equal when
    their :meth:`to_dict` are; validated on construction."""

    #: the sampler's registry name (error messages) and its merged constraints
    sampler_name: ClassVar[str] = "sampler"
    constraints: ClassVar[Mapping[str, Constraint]] = {}

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            constraint = self.constraints.get(f.name)
            if constraint is not None:
                constraint.check(self.sampler_name, f.name, getattr(self, f.name))

    @classmethod
    def names(cls) -> list[str]:
        """The option names, in the constructor's order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def build(cls, values: Mapping[str, Any]) -> "Hyperparameters":
        """``cls(**values)``, with an unknown option as a one-line :class:`OptionError`
        that lists the known ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise OptionError(f"{cls.sampler_name}: unknown option{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(map(repr, unknown))}; its options are {', '.join(cls.names())}")
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING]
        if missing:
            raise OptionError(f"{cls.sampler_name}: missing option{'s' if len(missing) > 1 else ''} "
                              f"{', '.join(missing)}")
        return cls(**values)

    @classmethod
    def check(cls, values: Mapping[str, Any]) -> None:
        """Validate some options without building the object (the others keep their defaults):
        what the command line does with ``--sampler NAME:key=value`` before any work."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            cls.build(values)  # the one-line unknown-option error
        for name, value in values.items():
            constraint = cls.constraints.get(name)
            if constraint is not None:
                constraint.check(cls.sampler_name, name, value)

    def as_kwargs(self) -> dict[str, Any]:
        """The values as the constructor's keyword arguments (objects as they are)."""
        return {name: getattr(self, name) for name in self.names()}

    def to_dict(self) -> dict[str, Any]:
        """The values as JSON (:func:`serialisable`): what the bench records."""
        return {name: serialisable(value) for name, value in self.as_kwargs().items()}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], **objects: Any) -> "Hyperparameters":
        """The inverse of :meth:`to_dict`: lists of noise levels become tensors again; objects
        recorded by class name (a second prior, ``"<EDMPrior>"``) must be given in ``objects``."""
        values = {k: v for k, v in values.items() if not (isinstance(v, str) and v.startswith("<"))}
        for name, constraint in cls.constraints.items():
            if isinstance(constraint, Sigmas) and isinstance(values.get(name), list):
                values[name] = torch.tensor(values[name], dtype=torch.float64)
            if isinstance(constraint, ClipRange) and isinstance(values.get(name), list):
                values[name] = tuple(values[name])
        return cls.build({**values, **objects})

    def replace(self, **changes: Any) -> "Hyperparameters":
        """A copy with ``changes`` (validated)."""
        return type(self).build({**self.as_kwargs(), **changes})

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        import json

        return hash(json.dumps(self.to_dict(), sort_keys=True, default=str))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"{type(self).__name__}({shown})"


def merged_constraints(cls: type) -> dict[str, Constraint]:
    """``parameter_constraints`` of ``cls`` and its bases, the most derived winning."""
    merged: dict[str, Constraint] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get("parameter_constraints", {}))
    return merged


def _signature_fields(init, parent_params: type | None) -> Iterable[tuple]:
    signature = inspect.signature(init)
    for p in list(signature.parameters.values())[1:]:  # past self
        if p.name in ("prior", "verbose") or p.kind is p.VAR_POSITIONAL:
            continue
        if p.kind is p.VAR_KEYWORD:  # forwarded to the parent's constructor: its options
            if parent_params is not None:
                for f in dataclasses.fields(parent_params):
                    yield f.name, f.type, f.default
            continue
        yield p.name, p.annotation if p.annotation is not p.empty else Any, p.default


def make_params_class(cls: type, parent_params: type | None) -> type:
    """The frozen ``Params`` dataclass of sampler class ``cls`` (see the module doc)."""
    fields, seen = [], set()
    for name, annotation, default in _signature_fields(cls.__init__, parent_params):
        if name in seen:
            continue
        seen.add(name)
        if default is inspect.Parameter.empty or default is dataclasses.MISSING:
            fields.append((name, annotation))
        else:
            fields.append((name, annotation, dataclasses.field(default=default)))
    required = [f for f in fields if len(f) == 2]
    optional = [f for f in fields if len(f) == 3]
    namespace = {"sampler_name": getattr(cls, "name", cls.__name__.lower()),
                 "constraints": merged_constraints(cls),
                 "__module__": cls.__module__,
                 "__qualname__": f"{cls.__qualname__}.Params"}
    return dataclasses.make_dataclass(f"{cls.__name__}Params", required + optional, bases=(Hyperparameters,),
                                      namespace=namespace, frozen=True, eq=False)
