"""Adapters that turn existing denoisers into invdiff priors.

:class:`DenoiserPrior` wraps any :class:`deepinv.models.Denoiser` that already follows
invdiff's convention (variance exploding, images in ``[0, 1]``, ``model(x, sigma)``
returning the denoised image), e.g. ``DRUNet``, ``SCUNet``, ``DiffUNet`` (whose
``forward`` takes a noise level by default) or a denoiser of your own.
Guided-diffusion ε-models have their own adapter, :class:`invdiff.priors.adm.ADMPrior`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from deepinv.models import Denoiser
from torch import Tensor, nn

from .base import DiffusionPrior

__all__ = ["DenoiserPrior"]


class DenoiserPrior(DiffusionPrior):
    r"""A deepinv denoiser ``model(x, sigma) ≈ E[x0 | x0 + sigma n = x]`` as a prior.

    .. math::

        D(x, \sigma) = \mathrm{model}(x, \sigma), \qquad x = x_0 + \sigma n,\; x_0 \in [0, 1].

    The wrapped model receives ``sigma`` as a 1-D tensor with one entry per batch element
    (the form every deepinv denoiser accepts). Nothing is checked about the model's own
    training range: give the noise levels it was trained for as ``sigma_min`` and
    ``sigma_max`` (samplers start at ``sigma_max``).

    :param model: a :class:`deepinv.models.Denoiser` (any ``nn.Module`` with the same call
        signature works).
    :param image_shape: ``(C, H, W)`` of the images the denoiser works on.
    :param sigma_min: smallest trained noise level.
    :param sigma_max: largest trained noise level.
    :param sigma_data: standard deviation of the training images.
    :param dtype: run the model in this dtype (e.g. ``torch.bfloat16``); inputs and
        outputs stay in the caller's dtype. ``None`` keeps the model's dtype.

    Example::

        >>> import torch, deepinv as dinv
        >>> from invdiff.priors.adapters import DenoiserPrior
        >>> net = dinv.models.DRUNet(1, 1, nc=(8, 8, 8, 8), nb=1, pretrained=None)
        >>> prior = DenoiserPrior(net, (1, 16, 16), sigma_min=0.01, sigma_max=0.5)
        >>> prior.denoise(torch.rand(2, 1, 16, 16), torch.tensor([0.1, 0.2])).shape
        torch.Size([2, 1, 16, 16])
    """

    fully_convolutional = True

    def __init__(
        self,
        model: Denoiser | nn.Module,
        image_shape: Sequence[int],
        sigma_min: float,
        sigma_max: float,
        sigma_data: float = 0.5,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(image_shape, sigma_min, sigma_max, sigma_data)
        self.model = model if dtype is None else model.to(dtype)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the model runs in (that of its first floating parameter)."""
        for p in self.model.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dtype = self.dtype
        out = self.model(x.to(dtype), sigma.reshape(-1).to(dtype))
        return out.to(x.dtype)
