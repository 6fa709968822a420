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

import warnings
from typing import Sequence

import torch
from deepinv.models import Denoiser
from torch import Tensor

from .conventions import DataRange

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

    :param image_shape: ``(C, H, W)`` of the images the prior was trained on (for a patch
        prior, its patch).
    :param sigma_min: smallest noise level the denoiser was trained for.
    :param sigma_max: largest noise level (where sampling starts).
    :param sigma_data: standard deviation of the training images (EDM's ``sigma_data``);
        used by samplers that need a prior scale, e.g. for default step sizes.

    **Resolution.** A prior is either *fixed-size* (``any_size`` False: :meth:`denoise`
    accepts only ``image_shape``) or works at *any size* (``any_size`` True: any ``H x W``
    with ``image_shape[0]`` channels; :class:`~invdiff.priors.PatchDiffusionPrior`).
    Samplers take the image shape from the operator and ask :meth:`check_shape`. A fully
    convolutional network (``fully_convolutional``: the U-Nets of EDM/ADM, deepinv
    denoisers) can be used off its training size on request, :meth:`at_any_size`.
    A prior whose denoiser draws random numbers (``uses_generator``: a patch prior's random
    offsets) takes them from the ``generator`` passed to :meth:`denoise`.

    Example::

        >>> import torch
        >>> from invdiff.priors import GaussianPrior
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
        >>> x = torch.rand(2, 1, 8, 8)
        >>> prior.denoise(x, 0.5).shape
        torch.Size([2, 1, 8, 8])
    """

    #: The network works at any image size (no dense layer tied to the training size).
    fully_convolutional: bool = False
    #: :meth:`_denoise` takes a ``generator`` (randomised denoisers, e.g. random patch offsets).
    uses_generator: bool = False
    #: Range of the network's training images (:class:`~invdiff.priors.conventions.DataRange`);
    #: adapters of outside checkpoints set their own, recorded in the model card.
    data_range: DataRange = DataRange(0.0, 1.0)
    #: What the network computes, in one line, for the model card (adapters override it).
    parameterisation: str = "VE denoiser D(x, sigma) on [0, 1] images"

    def __init__(
        self,
        image_shape: Sequence[int],
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        any_size: bool = False,
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
        self.any_size = bool(any_size)
        #: The model card :func:`invdiff.priors.load` attaches (family, source,
        #: parameterisation, data range, config, file); empty for a prior built in code.
        self.card: dict = {}

    def set_data_range(self, data_range: "DataRange | str | Sequence[float]") -> None:
        """Record the range of the network's training images (adapters call this; see
        :class:`~invdiff.priors.conventions.DataRange`); ``"complex-max"`` needs (real,
        imaginary) channel pairs."""
        parsed = DataRange.parse(data_range)
        if parsed.complex_max and self.channels % 2:
            raise ValueError(f"data_range complex-max needs (real, imaginary) channel pairs; the prior has "
                             f"{self.channels} channel(s)")
        self.data_range = parsed

    # --- resolution -----------------------------------------------------------------
    @property
    def channels(self) -> int:
        """Image channels ``C``."""
        return self.image_shape[0]

    def check_shape(self, shape: Sequence[int], where: str | None = None) -> tuple[int, int, int]:
        """``shape = (C, H, W)`` if the prior can denoise images of that shape, else a
        one-line :class:`ValueError` saying why (``where`` names the caller)."""
        shape = tuple(int(s) for s in shape)
        who = where or type(self).__name__
        if len(shape) != 3 or min(shape) < 1:
            raise ValueError(f"{who}: images must be (C, H, W) with positive sizes, got {shape}")
        if shape[0] != self.channels:
            raise ValueError(f"{who}: the prior has {self.channels} channel(s), the images {shape[0]} ({shape})")
        if not self.any_size and shape != self.image_shape:
            hint = (" (resize the images, or use the network off its training size with prior.at_any_size())"
                    if self.fully_convolutional else " (resize the images to the prior's size)")
            raise ValueError(
                f"{who}: this prior is fixed-size {self.image_shape[1]}x{self.image_shape[2]}, "
                f"the images are {shape[1]}x{shape[2]}: expected images of shape "
                f"(B, {', '.join(map(str, self.image_shape))}){hint}"
            )
        return shape

    def at_any_size(self, warn: bool = True) -> "DiffusionPrior":
        """Allow images of any size through a fully convolutional network trained at one size
        (returns ``self``). It runs, but the network never saw that scale of structure: a
        :class:`UserWarning` says so unless ``warn=False``."""
        if self.any_size:
            return self
        if not self.fully_convolutional:
            raise ValueError(f"{type(self).__name__} is not fully convolutional: it works only at {self.image_shape}")
        if warn:
            warnings.warn(f"{type(self).__name__} was trained at {self.image_shape[1]}x{self.image_shape[2]}; "
                          f"used at other sizes it sees structures at scales it was not trained on",
                          UserWarning, stacklevel=2)
        self.any_size = True
        return self

    # --- how the network runs ------------------------------------------------------
    def accelerate(self, dtype=None, *, autocast: bool = False, channels_last: "bool | str" = "auto",
                   compile: "bool | str" = False) -> "DiffusionPrior":
        """Run the network in ``dtype`` (``"bf16"``, ``"fp16"``), ``channels_last`` and
        compiled, with the noise arithmetic left in the caller's dtype; returns ``self``.
        See :func:`invdiff.priors.runtime.accelerate`."""
        from .runtime import accelerate

        return accelerate(self, dtype, autocast=autocast, channels_last=channels_last, compile=compile)

    @property
    def runtime(self) -> dict:
        """What the network runs as: ``dtype`` (``None``: no network), ``autocast``,
        ``channels_last``, ``compile`` (the backend asked for), ``compiled`` (a compiled
        call has run) and ``fallback_reason`` (why it runs eager instead); see
        :mod:`invdiff.priors.runtime`."""
        from .runtime import runtime_of

        return runtime_of(self)

    # --- the contract -------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def denoise(self, x: Tensor, sigma: float | Tensor, generator=None) -> Tensor:
        """Posterior mean ``E[x0 | x]`` of the clean image given ``x = x0 + sigma * n``.

        At :math:`\\sigma = 0` the denoiser is the identity, :math:`D(x, 0) = x` (exactly;
        the network is not called at 0, where EDM's :math:`c_\\text{noise} = \\ln\\sigma` is
        undefined), so deepinv schedules that end at 0 (DDRM's) are safe.

        :param x: noisy images ``(B, C, H, W)``.
        :param sigma: noise level >= 0, a number or one per batch element (``(B,)`` or
            ``(B, 1, 1, 1)``).
        :param generator: source of the denoiser's own randomness, for priors with
            ``uses_generator`` (a ``torch.Generator`` or one per batch element); ignored by
            the others.
        :returns: denoised images, same shape as ``x``.
        """
        if x.ndim != 4:
            raise ValueError(f"{type(self).__name__}: expected images (B, C, H, W), got {tuple(x.shape)}")
        if tuple(x.shape[1:]) != self.image_shape:
            self.check_shape(x.shape[1:])
        sigma = as_sigma(sigma, x)
        clean = sigma == 0
        run = (lambda a, s: self._denoise(a, s, generator=generator)) if self.uses_generator else self._denoise
        if not clean.any():
            return run(x, sigma)
        if (sigma < 0).any() or sigma.isnan().any():
            raise ValueError(f"{type(self).__name__}: sigma must be >= 0, got {sigma.flatten().tolist()}")
        if clean.all():
            return x.clone()
        # the network sees sigma_min where sigma = 0 (no log 0), and its output is discarded there
        out = run(x, torch.where(clean, torch.full_like(sigma, self.sigma_min), sigma))
        return torch.where(clean, x, out)

    def forward(self, x: Tensor, sigma: float | Tensor, generator=None, **kwargs) -> Tensor:
        """Same as :meth:`denoise`; makes the prior a :class:`deepinv.models.Denoiser`."""
        return self.denoise(x, sigma, generator=generator)

    def score(self, x: Tensor, sigma: float | Tensor) -> Tensor:
        """Score of the noised prior, ``(D(x, sigma) - x) / sigma**2`` (Tweedie's formula)."""
        return (self.denoise(x, sigma) - x) / as_sigma(sigma, x) ** 2

    def extra_repr(self) -> str:
        size = ", any size" if self.any_size else ""
        return (
            f"image_shape={self.image_shape}{size}, sigma_min={self.sigma_min:g}, "
            f"sigma_max={self.sigma_max:g}, sigma_data={self.sigma_data:g}"
        )
