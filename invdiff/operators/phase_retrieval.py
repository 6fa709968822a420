r"""Fourier phase retrieval (the DPS paper's nonlinear task)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepinv.physics import Physics
from torch import Tensor

__all__ = ["FourierPhaseRetrieval"]


class FourierPhaseRetrieval(Physics):
    r"""Oversampled Fourier magnitude measurements :math:`y = |\mathcal{F}(P x)|`.

    .. math::

        A(x) = \big|\mathcal{F}_\text{ortho}(P x)\big|,

    where :math:`P` zero-pads each side of the image by ``int(oversampling / 8 * size)``
    pixels, as in the DPS reference code (Chung et al., ICLR 2023: 64 pixels per side
    at 256² for ``oversampling=2.0``), and :math:`\mathcal{F}_\text{ortho}` is the
    orthonormal, centred 2D DFT applied per channel. (DPS uses the unnormalised DFT, which
    scales :math:`y` by the padded side length and makes their noise level negligible;
    with the orthonormal DFT the noise level is comparable to image-domain noise.)

    ``A_vjp`` is autograd's (the default of :class:`deepinv.physics.Physics`); note
    :math:`|\cdot|` is not differentiable at 0.

    ``A_dagger`` is a cheap baseline: ``n_hio`` iterations of Fienup's hybrid
    input-output (``beta`` = 0.9) followed by ``n_er`` error-reduction iterations,
    with the support (the unpadded region) and non-negativity constraints, started
    from random phases drawn from ``torch.Generator().manual_seed(seed)`` — deterministic
    for a given operator. The result is clipped to [0, 1]. Fourier phase retrieval has
    trivial ambiguities (translation, conjugate flip), so expect a plausible but often
    flipped/shifted image.

    :param tuple img_size: ``(C, H, W)``.
    :param float oversampling: padding parameter (DPS: 2.0).
    :param int n_hio: HIO iterations of ``A_dagger``.
    :param int n_er: error-reduction iterations of ``A_dagger``.
    :param int seed: seed of the ``A_dagger`` random initial phases.

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators import FourierPhaseRetrieval
        >>> physics = FourierPhaseRetrieval((1, 32, 32))
        >>> x = torch.rand(1, 1, 32, 32)
        >>> y = physics.A(x)
        >>> y.shape
        torch.Size([1, 1, 48, 48])
        >>> physics.A_dagger(y).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(
        self,
        img_size: tuple[int, int, int],
        oversampling: float = 2.0,
        n_hio: int = 40,
        n_er: int = 10,
        beta: float = 0.9,
        seed: int = 0,
        device: torch.device | str = "cpu",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.to(device)
        self.img_size = tuple(int(s) for s in img_size)
        _, H, W = self.img_size
        if oversampling <= 0:
            raise ValueError(f"FourierPhaseRetrieval: oversampling must be > 0, got {oversampling}")
        self.oversampling = float(oversampling)
        self.pad_h = int(oversampling / 8.0 * H)
        self.pad_w = int(oversampling / 8.0 * W)
        self.n_hio, self.n_er, self.beta, self.seed = int(n_hio), int(n_er), float(beta), int(seed)

    def _fft(self, z: Tensor) -> Tensor:
        dims = (-2, -1)
        return torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(z, dim=dims), norm="ortho"), dim=dims)

    def _ifft(self, z: Tensor) -> Tensor:
        dims = (-2, -1)
        return torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(z, dim=dims), norm="ortho"), dim=dims)

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, (self.pad_w, self.pad_w, self.pad_h, self.pad_h))

    def crop(self, z: Tensor) -> Tensor:
        H, W = self.img_size[1:]
        return z[..., self.pad_h : self.pad_h + H, self.pad_w : self.pad_w + W]

    def A(self, x: Tensor, **kwargs) -> Tensor:
        return self._fft(self.pad(x)).abs()

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        r"""HIO + error reduction from seeded random phases (see the class docstring)."""
        g = torch.Generator().manual_seed(self.seed)  # the same start phases for every image: each as if alone
        phase = torch.rand(y.shape[1:], generator=g, dtype=torch.float64).to(y.device, y.dtype) * (2 * torch.pi)
        support = self.pad(torch.ones((1, 1) + tuple(self.img_size[1:]), device=y.device, dtype=y.dtype)) > 0
        x = self._ifft(y * torch.exp(1j * phase)).real
        for it in range(self.n_hio + self.n_er):
            z = self._fft(x)
            x_new = self._ifft(y * torch.exp(1j * torch.angle(z))).real
            ok = support & (x_new >= 0)
            if it < self.n_hio:  # hybrid input-output
                x = torch.where(ok, x_new, x - self.beta * x_new)
            else:  # error reduction
                x = torch.where(ok, x_new, torch.zeros_like(x_new))
        return self.crop(x).clamp(0, 1)
