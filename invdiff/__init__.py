"""invdiff: imaging inverse problems with diffusion priors and swappable posterior samplers."""

__version__ = "0.1.0"

from . import operators, priors, samplers  # noqa: E402

__all__ = ["operators", "priors", "samplers", "__version__"]
