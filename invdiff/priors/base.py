"""The prior contract: a denoiser ``D(x, sigma) = E[x0 | x0 + sigma * n = x]``.

Every diffusion prior in invdiff, whatever its training convention, is reduced to this
one call by a small adapter (the k-diffusion idea). Images ``x0`` live in ``[0, 1]`` and
the noise is variance exploding (EDM / Karras convention):

.. math::

    x = x_0 + \\sigma n, \\qquad n \\sim \\mathcal{N}(0, I), \\qquad
    D(x, \\sigma) = \\mathbb{E}[x_0 \\mid x], \\qquad
    \\nabla_x \\log p_\\sigma(x) = \\frac{D(x, \\sigma) - x}{\\sigma^2} \\;\\text{(Tweedie)}.
"""

from __future__ import annotations

from typing import Sequence

import torch
from deepinv.models import Denoiser
from torch import Tensor

__all__ = ["DiffusionPrior", "as_sigma"]


def as_sigma(sigma: float | Tensor, x: Tensor) -> Tensor:
    """Noise level(s) as a tensor of shape ``(B, 1, ..., 1)`` broadcastable against ``x``.

    ``sigma`` may be a Python number, a 0-d tensor, or a tensor with one entry per batch
    element, of shape ``(B,)`` or ``(B, 1, ..., 1)`` (the form deepinv's helpers pass).
    Device and dtype follow ``x`` (the real dtype for complex inputs).
    """
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.real.dtype)
    if sigma.ndim == 0 or sigma.numel() == 1:
        sigma = sigma.reshape(1).expand(x.shape[0])
    elif sigma.shape[0] != x.shape[0] or sigma.numel() != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have one entry per batch element; "
            f"got shape {tuple(sigma.shape)} for a batch of {x.shape[0]}"
        )
    return sigma.reshape(-1, *([1] * (x.ndim - 1)))


class DiffusionPrior(Denoiser):
    """Base class of every invdiff prior: a denoiser in the variance-exploding convention.

    Subclasses implement :meth:`_denoise` on tensors ``x`` of shape ``(B, *image_shape)``
    and ``sigma`` of shape ``(B, 1, 1, 1)``; everything else (the public :meth:`denoise`,
    :meth:`score`, input checks, use as a :class:`deepinv.models.Denoiser`) is shared.

    :param image_shape: ``(C, H, W)`` of the images the prior was trained on.
    :param sigma_min: smallest noise level the denoiser was trained for.
    :param sigma_max: largest noise level (where sampling starts).
    :param sigma_data: standard deviation of the training images (EDM's ``sigma_data``);
        used by samplers that need a prior scale, e.g. for default step sizes.

    Example::

        >>> import torch
        >>> from invdiff.priors import GaussianPrior
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> prior.denoise(x, 0.5).shape
        torch.Size([2, 1, 8, 8])
    """

    def __init__(
        self,
        image_shape: Sequence[int],
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
    ) -> None:
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"image_shape must be (C, H, W), got {tuple(image_shape)}")
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.image_shape = tuple(int(s) for s in image_shape)
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)

    # --- the contract -------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Posterior mean ``E[x0 | x]`` of the clean image given ``x = x0 + sigma * n``.

        At :math:`\\sigma = 0` the denoiser is the identity, :math:`D(x, 0) = x` (exactly;
        the network is not called at 0, where EDM's :math:`c_\\text{noise} = \\ln\\sigma` is
        undefined), so deepinv schedules that end at 0 (DDRM's) are safe.

        :param x: noisy images ``(B, C, H, W)``.
        :param sigma: noise level >= 0, a number or one per batch element (``(B,)`` or
            ``(B, 1, 1, 1)``).
        :returns: denoised images, same shape as ``x``.
        """
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(
                f"{type(self).__name__}: expected images of shape (B, {', '.join(map(str, self.image_shape))}), "
                f"got {tuple(x.shape)}"
            )
        sigma = as_sigma(sigma, x)
        clean = sigma == 0
        if not clean.any():
            return self._denoise(x, sigma)
        if (sigma < 0).any() or sigma.isnan().any():
            raise ValueError(f"{type(self).__name__}: sigma must be >= 0, got {sigma.flatten().tolist()}")
        if clean.all():
            return x.clone()
        # the network sees sigma_min where sigma = 0 (no log 0), and its output is discarded there
        out = self._denoise(x, torch.where(clean, torch.full_like(sigma, self.sigma_min), sigma))
        return torch.where(clean, x, out)

    def forward(self, x: Tensor, sigma: float | Tensor, **kwargs) -> Tensor:
        """Same as :meth:`denoise`; makes the prior a :class:`deepinv.models.Denoiser`."""
        return self.denoise(x, sigma)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Score of the noised prior, ``(D(x, sigma) - x) / sigma**2`` (Tweedie's formula)."""
        s = as_sigma(sigma, x)
        return (self._denoise(x, s) - x) / s**2

    def extra_repr(self) -> str:
        return (
            f"image_shape={self.image_shape}, sigma_min={self.sigma_min:g}, "
            f"sigma_max={self.sigma_max:g}, sigma_data={self.sigma_data:g}"
        )
