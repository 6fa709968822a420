"""The noise model of an operator, read once: :func:`measurement_noise` gives its kind and
level (the samplers' data steps and the whitening of a stacked physics both use it)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["measurement_noise"]


def measurement_noise(physics, batch: int | None = None) -> tuple[str, float | Tensor]:
    """``(kind, level)`` of a deepinv noise model: ``("gaussian", sigma)``, ``("poisson", gain)``
    or ``("none", 0.0)``. Other noise models raise ``ValueError`` (give the level explicitly).

    ``level`` is a number, or a ``(batch,)`` tensor when the noise model has one level per
    image (deepinv's ``SigmaGenerator`` / ``GaussianNoise(sigma=tensor)``). A model with ``b``
    levels and a run over ``batch = n * b`` images (``n`` samples or particles, row
    ``k * b + j`` = image ``j``) gives each row its image's level.
    """
    from deepinv.physics import GaussianNoise, PoissonNoise, ZeroNoise

    model = getattr(physics, "noise_model", None)
    if model is None or isinstance(model, ZeroNoise):
        return "none", 0.0
    if isinstance(model, GaussianNoise):
        kind, level = "gaussian", model.sigma
    elif isinstance(model, PoissonNoise):
        kind, level = "poisson", model.gain
    else:
        raise ValueError(f"unsupported noise model {type(model).__name__}; pass the noise level explicitly")
    level = torch.as_tensor(level).detach().reshape(-1)
    if level.numel() == 1 or bool((level == level[0]).all()):
        return kind, float(level[0])
    if batch is None or batch % level.numel():
        raise ValueError(f"the noise model has {level.numel()} per-image levels, for a batch of {batch} "
                         "measurements; pass noise_sigma explicitly")
    return kind, level.repeat(batch // level.numel())
