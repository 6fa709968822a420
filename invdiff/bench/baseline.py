"""The classical reconstruction as a benchmark row: ``invdiff bench --samplers baseline,dps ...``."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from ..priors.base import DiffusionPrior
from ..samplers.base import Sampler
from ..samplers.volume import VOLUME_SAMPLERS, VolumeSampler

__all__ = ["Baseline", "VolumeBaseline", "bench_sampler_class"]


class Baseline(Sampler):
    """The operator's own fast reconstruction, ``physics.A_dagger(y)``: filtered back-projection
    for CT, the zero-filled inverse FFT (adjoint coil combination) for MRI, the Wiener filter
    for blur, zero-filling for inpainting, the minimum-norm solution for super-resolution, HIO
    for phase retrieval. No network call (``nfe == 0``); the prior only fixes the image shape.

    It is a benchmark row, not a posterior sampler, so it is not in ``samplers.available()``;
    ``invdiff bench`` accepts the name ``baseline``.

    :param prior: any prior of the images' shape.
    :param clip: range the reconstruction is clamped to (``None``: none).

    Example::

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.priors import GaussianPrior
        >>> physics = operators.make("ct-sparse-30", img_size=(1, 16, 16))
        >>> y = physics(torch.full((1, 1, 16, 16), 0.5), seed=1)
        >>> Baseline(GaussianPrior(0.5, 0.1, image_shape=(1, 16, 16)))(y, physics).shape
        torch.Size([1, 1, 16, 16])
    """

    name = "baseline"
    handles_blind = True  # a blind operator's A_dagger: the Wiener filter with a generic Gaussian guess

    def __init__(self, prior: DiffusionPrior, clip: tuple[float, float] | None = (0.0, 1.0),
                 verbose: bool = False) -> None:
        super().__init__(prior, verbose=verbose)
        self.clip = clip

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        x = physics.A_dagger(y).reshape(y.shape[0], *self.image_shape).to(y.real.dtype)
        self.check_finite(x, 0, 0.0)
        return x.clamp(*self.clip) if self.clip is not None else x


class VolumeBaseline(VolumeSampler):
    """:class:`Baseline` for volumes: ``physics.A_dagger(y)`` of a volume operator (FBP per
    slice, zero-filled 3D IFFT, slice interpolation), clamped to ``clip``."""

    name = "baseline"

    def __init__(self, prior: DiffusionPrior, clip: tuple[float, float] | None = (0.0, 1.0),
                 verbose: bool = False) -> None:
        super().__init__(prior, verbose=verbose)
        self.clip = clip

    _run = Baseline._run


def bench_sampler_class(name: str, volume: bool = False) -> type[Sampler]:
    """The sampler class the benchmark builds for ``name``: ``baseline`` or a registered
    sampler; with ``volume``, ``baseline`` or a volume sampler (``VOLUME_SAMPLERS``)."""
    from .. import samplers

    if volume:
        if name.lower() == "baseline":
            return VolumeBaseline
        if name.lower() not in VOLUME_SAMPLERS:
            raise ValueError(f"a volume grid (--depth) takes baseline or a volume sampler "
                             f"({', '.join(VOLUME_SAMPLERS)}), got {name!r}")
        return VOLUME_SAMPLERS[name.lower()]
    if name.lower() == "baseline":
        return Baseline
    return samplers.get(name)
