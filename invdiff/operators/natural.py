r"""Natural-image operators: deblurring, inpainting, super-resolution.

Thin subclasses of deepinv physics that add a closed-form, fast ``A_dagger``:

* :class:`WienerBlurFFT` — :class:`deepinv.physics.BlurFFT` (circular convolution) whose
  ``A_dagger`` is a Wiener / Tikhonov filter instead of the truncated inverse filter.
* :class:`ClosedFormDownsampling` — :class:`deepinv.physics.Downsampling` with
  circular padding whose ``A_dagger`` is the exact minimum-norm pseudo-inverse in
  Fourier (deepinv's default is an iterative least-squares solve).

Inpainting uses :class:`deepinv.physics.Inpainting` directly: it is a
``DecomposablePhysics`` whose ``A_dagger`` (the masked image) is already closed form.
"""

from __future__ import annotations

import torch
from deepinv.physics import BlurFFT, Downsampling
from torch import Tensor

__all__ = ["WienerBlurFFT", "ClosedFormDownsampling"]


class WienerBlurFFT(BlurFFT):
    r"""Circular blur :math:`y = k * x` with a Wiener/Tikhonov ``A_dagger``.

    .. math::

        A^\dagger_\lambda y = \mathcal{F}^{-1}\!\left[
            \frac{\overline{\hat k}\, \hat y}{|\hat k|^2 + \lambda}\right]
        = (A^\top A + \lambda I)^{-1} A^\top y,

    with :math:`\hat k` the DFT of the kernel zero-padded to the image (so
    :math:`|\hat k| \le 1` for a normalised kernel) and :math:`\lambda` =
    ``wiener_reg`` (default ``1e-3``; roughly the squared noise-to-signal ratio per
    frequency, :math:`\lambda \approx \sigma^2/\mathbb{E}|\hat x|^2`). ``wiener_reg=0``
    gives deepinv's truncated inverse filter (singular values below 1e-5 dropped).

    :param tuple img_size: ``(C, H, W)``.
    :param torch.Tensor filter: kernel of shape ``(1, 1, h, w)`` or ``(1, C, h, w)``.
    :param float wiener_reg: Tikhonov weight :math:`\lambda \ge 0`.

    |sep|

    :Examples:

        >>> import torch
        >>> from deepinv.physics.functional import gaussian_blur
        >>> from invdiff.operators import WienerBlurFFT
        >>> physics = WienerBlurFFT((1, 32, 32), filter=gaussian_blur((9, 9), sigma=(1.0, 1.0)), wiener_reg=1e-3)
        >>> x = torch.rand(1, 1, 32, 32)
        >>> physics.A_dagger(physics.A(x)).shape
        torch.Size([1, 1, 32, 32])
    """

    def __init__(self, img_size: tuple[int, int, int], filter: Tensor, wiener_reg: float = 1e-3, **kwargs):
        super().__init__(img_size=tuple(img_size), filter=filter, **kwargs)
        if wiener_reg < 0:
            raise ValueError(f"WienerBlurFFT: wiener_reg must be >= 0, got {wiener_reg}")
        self.wiener_reg = float(wiener_reg)

    def A_dagger(self, y: Tensor, filter: Tensor | None = None, **kwargs) -> Tensor:
        if self.wiener_reg == 0:
            return super().A_dagger(y, filter=filter, **kwargs)
        self.update_parameters(filter=filter)
        gain = self.mask / (self.mask**2 + self.wiener_reg)  # singular values s / (s^2 + lambda)
        return self.V(self.U_adjoint(y) * gain)


class ClosedFormDownsampling(Downsampling):
    r"""Filtered decimation :math:`y = S (h * x)` (circular padding) with exact ``A_dagger``.

    For circular padding, :math:`A A^\top = S H H^\top S^\top` is a circular convolution
    on the low-resolution grid whose frequency response is the average of
    :math:`|\hat h|^2` over the :math:`f^2` aliases of each low-resolution frequency.
    Hence the minimum-norm least-squares solution is closed form:

    .. math::

        A^\dagger y = A^\top \mathcal{F}^{-1}\!\left[
            \frac{\hat y}{\tfrac{1}{f^2}\sum_{a,b}|\hat h(\omega + (a, b)\,\Omega)|^2 + \epsilon}
        \right],

    with :math:`\epsilon` = ``eps`` (default 1e-6) guarding zeros of the aliased
    spectrum. One FFT pair plus one ``A_adjoint``: milliseconds.

    :param tuple img_size: ``(C, H, W)`` with ``H`` and ``W`` divisible by ``factor``.
    :param int factor: integer downsampling factor.
    :param str filter: anti-aliasing filter name (``"bicubic"``, ``"bilinear"``,
        ``"gaussian"``, ``"sinc"``) or a tensor.

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators import ClosedFormDownsampling
        >>> physics = ClosedFormDownsampling((1, 32, 32), factor=4)
        >>> y = torch.rand(1, 1, 8, 8)
        >>> torch.allclose(physics.A(physics.A_dagger(y)), y, atol=1e-4)
        True
    """

    def __init__(self, img_size: tuple[int, int, int], factor: int = 4, filter="bicubic", eps: float = 1e-6, **kwargs):
        img_size = tuple(int(s) for s in img_size)
        if img_size[1] % factor or img_size[2] % factor:
            raise ValueError(
                f"ClosedFormDownsampling: image size {img_size[1:]} must be divisible by the factor {factor}"
            )
        super().__init__(img_size=img_size, filter=filter, factor=factor, padding="circular", **kwargs)
        self.eps = float(eps)

    def _aliased_power(self) -> Tensor:
        f = self.factor
        power = self.Fh2.real  # (1, c, H, W), |h_hat|^2 on the high-resolution grid
        *lead, H, W = power.shape
        return power.reshape(*lead, f, H // f, f, W // f).mean(dim=(-4, -2))

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        z = torch.fft.ifft2(torch.fft.fft2(y) / (self._aliased_power().to(y.dtype) + self.eps)).real
        return self.A_adjoint(z)
