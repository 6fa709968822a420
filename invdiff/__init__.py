"""invdiff: imaging inverse problems with diffusion priors and swappable posterior samplers."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

__all__ = ["operators", "priors", "samplers", "__version__"]


def __getattr__(name: str):
    """``invdiff.operators``, ``invdiff.priors``, ``invdiff.samplers`` are imported on first use
    (PEP 562), so that ``invdiff --help`` and the command line start without loading torch,
    and an interrupt during start-up is the command line's to report."""
    if name in ("operators", "priors", "samplers"):
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
