"""Posterior samplers: each a :class:`deepinv.models.Reconstructor` over a diffusion prior.

``samplers.make("dps", prior, steps=100)`` builds one by name; ``samplers.available()``
lists the names.
"""

from __future__ import annotations

from .blind_dps import BlindDPS
from .base import IncompatibleError, OptionError, PosteriorSamples, RunInfo, Sampler, SamplerDivergedError
from .daps import DAPS
from .ddnm import DDNM
from .ddrm import DDRM
from .dds import DDS
from .diffpir import DiffPIR
from .dps import DPS
from .enkg import EnKG
from .fps import FPS
from .mcg import MCG
from .pigdm import PiGDM
from .pnpdm import PnPDM
from .psld import PSLD
from .reddiff import REDDiff
from .resample import ReSample
from .smc import SMC, WeightedParticles
from .steps import make_sigmas

_REGISTRY: dict[str, type[Sampler]] = {"dps": DPS, "dds": DDS, "diffpir": DiffPIR, "reddiff": REDDiff, "daps": DAPS,
                                     "smc": SMC, "resample": ReSample, "mcg": MCG, "enkg": EnKG, "pigdm": PiGDM,
                                     "pnpdm": PnPDM, "ddrm": DDRM, "ddnm": DDNM,
                                     "fps": FPS, "blind-dps": BlindDPS, "psld": PSLD}


def register(cls: type[Sampler], *, replace: bool = False) -> type[Sampler]:
    """Make a :class:`Sampler` subclass available to :func:`make`, ``invdiff bench``,
    ``invdiff reconstruct --sampler`` and the demo under ``cls.name`` (usable as a class
    decorator). A name already taken is refused unless ``replace``."""
    if not (isinstance(cls, type) and issubclass(cls, Sampler)):
        raise TypeError(f"register() takes a Sampler subclass, got {cls!r}")
    key = cls.name.lower()
    if key in _REGISTRY and _REGISTRY[key] is not cls and not replace:
        raise ValueError(f"a sampler called {key!r} is already registered ({_REGISTRY[key].__name__})")
    _REGISTRY[key] = cls
    return cls


def unregister(name: str) -> None:
    """Remove the sampler called ``name`` from the registry."""
    _REGISTRY.pop(name.lower(), None)


def available() -> list[str]:
    """Names accepted by :func:`make`."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Sampler]:
    """The sampler class called ``name`` (case-insensitive)."""
    key = name.lower()
    if key not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available())}")
    return _REGISTRY[key]


def make(name: str, prior, **overrides) -> Sampler:
    """Build the sampler called ``name`` (case-insensitive) over ``prior``.

    >>> from invdiff.priors import GaussianPrior
    >>> make("dps", GaussianPrior(0.5, 0.1, image_shape=(1, 4, 4)), steps=10).name
    'dps'
    """
    return get(name)(prior, **overrides)


__all__ = [
    "register",
    "unregister",
    "available",
    "get",
    "make",
    "Sampler",
    "OptionError",
    "IncompatibleError",
    "RunInfo",
    "PosteriorSamples",
    "SamplerDivergedError",
    "DPS",
    "MCG",
    "PiGDM",
    "PnPDM",
    "EnKG",
    "FPS",
    "DDS",
    "DDRM",
    "DDNM",
    "DiffPIR",
    "REDDiff",
    "DAPS",
    "SMC",
    "WeightedParticles",
    "ReSample",
    "PSLD",
    "make_sigmas",
]
