r"""Natural-image operators: deblurring, inpainting, super-resolution.

Thin subclasses of deepinv physics that add a closed-form, fast ``A_dagger``:

* :class:`WienerBlurFFT` — :class:`deepinv.physics.BlurFFT` (circular convolution) whose
  ``A_dagger`` is a Wiener / Tikhonov filter instead of the truncated inverse filter.
* :class:`BlindBlur` — blind deblurring, :math:`y = k * x + n` with the kernel a parameter
  of ``A`` (bilinear, differentiable in both), unknown to the solver.
* :class:`ClosedFormDownsampling` — :class:`deepinv.physics.Downsampling` with
  circular padding whose ``A_dagger`` is the exact minimum-norm pseudo-inverse in
  Fourier (deepinv's default is an iterative least-squares solve).

Inpainting uses :class:`deepinv.physics.Inpainting` directly: it is a
``DecomposablePhysics`` whose ``A_dagger`` (the masked image) is already closed form.
"""

from __future__ import annotations

import torch
from deepinv.physics import BlurFFT, Downsampling, Physics
from torch import Tensor

__all__ = ["WienerBlurFFT", "ClosedFormDownsampling", "BlindBlur", "circular_blur", "kernel_spectrum"]


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


def kernel_spectrum(kernel: Tensor, img_size: tuple[int, int]) -> Tensor:
    """The DFT of ``kernel`` ``(B or 1, 1 or C, h, w)`` zero-padded to ``img_size`` and centred
    as :class:`deepinv.physics.BlurFFT` centres it (deepinv's ``filter_fft``), differentiable in
    the kernel."""
    from deepinv.physics.functional import filter_fft

    return filter_fft(kernel, img_size=tuple(img_size), real_fft=False, dims=(-2, -1))


def circular_blur(x: Tensor, kernel: Tensor) -> Tensor:
    r"""Circular convolution :math:`k * x` by the FFT, differentiable in both ``x`` and
    ``kernel`` (the bilinear model of blind deblurring); equal to
    :class:`deepinv.physics.BlurFFT` ``(filter=kernel).A(x)``. A kernel of batch 1 blurs every
    image; one of batch ``B`` blurs image ``b`` with kernel ``b``."""
    spectrum = kernel_spectrum(kernel.to(x.dtype), x.shape[-2:])
    return torch.fft.ifft2(torch.fft.fft2(x) * spectrum).real


def fourier_shift(x: Tensor, shift: Tensor) -> Tensor:
    r"""``x[b]`` ``(B, C, H, W)`` circularly translated by ``shift[b] = (dy, dx)`` pixels, any
    real shift: the phase ramp :math:`\hat x(\omega)\, e^{-i\omega\cdot s}`, real part (kornia's
    ``translate`` interpolates, which blurs). It commutes with the circular blur,
    ``circular_blur(fourier_shift(x, s), k) == fourier_shift(circular_blur(x, k), s)``, so
    moving the image by ``s`` and the kernel by ``-s`` leaves the blur unchanged; a whole-pixel
    shift is ``torch.roll``. On an even grid the Nyquist component of a fractional shift is not
    representable in a real image, so two shifts that add to zero are not quite the identity."""
    h, w = x.shape[-2:]
    real = x.real.dtype if x.is_complex() else x.dtype
    fy = torch.fft.fftfreq(h, device=x.device, dtype=real).reshape(-1, 1)
    fx = torch.fft.fftfreq(w, device=x.device, dtype=real).reshape(1, -1)
    s = shift.to(device=x.device, dtype=real).reshape(-1, 2, 1, 1)
    phase = torch.exp(-2j * torch.pi * (fy * s[:, 0:1] + fx * s[:, 1:2]))
    return torch.fft.ifft2(torch.fft.fft2(x) * phase).real


class BlindBlur(Physics):
    r"""Blind deblurring: :math:`y = k * x + n` with the kernel :math:`k` unknown to the solver
    (task ``deblur-blind``).

    The operator is bilinear: :meth:`A` takes the kernel as a parameter, ``A(x, filter=k)``
    (:func:`circular_blur`, differentiable in ``x`` and ``k``); without one it raises, so a
    method that needs a known operator cannot use it by accident. Nature's kernel is part of
    the measurement's randomness, like the noise: ``physics(x, seed=s)`` blurs with
    :meth:`kernel` ``(s)``, one held-out kernel of :mod:`invdiff.operators.kernels` (stream 1,
    family ``s mod 3``: motion, diffraction, Gaussian), so every benchmark cell has its own
    kernel and the evaluation knows it (:meth:`kernel`) while the solver is given only ``y``.

    ``A_dagger(y)`` (the classical baseline) is the Wiener filter of
    :class:`WienerBlurFFT` with the kernel given, or, when none is, with an isotropic Gaussian
    guess of std ``guess_std`` pixels (a non-blind method with a generic kernel, :meth:`guess`);
    ``A_adjoint`` likewise (deepinv's ``test`` shows it as the "no learning" image).

    :param img_size: ``(C, H, W)``.
    :param kernel_size: side of the kernels (default ``H // 4``: 16 at 64x64, BlindDPS's 64 at 256).
    :param wiener_reg: Tikhonov weight of ``A_dagger``.
    :param guess_std: std of the Gaussian guess of ``A_dagger`` without a kernel.
    :param filter: a known kernel (then ``A`` uses it by default: a non-blind view).
    :param seed: the kernel seed of a measurement made without one (``physics(x)``).

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators.natural import BlindBlur
        >>> physics = BlindBlur((1, 32, 32), kernel_size=8)
        >>> y = physics(torch.rand(1, 1, 32, 32), seed=3)  # blurred by physics.kernel(3)
        >>> physics.kernel(3).shape, y.shape
        (torch.Size([1, 1, 8, 8]), torch.Size([1, 1, 32, 32]))
    """

    blind = True

    def __init__(self, img_size: tuple[int, int, int], kernel_size: int | None = None, wiener_reg: float = 1e-2,
                 guess_std: float = 1.5, filter: Tensor | None = None, seed: int = 0, device="cpu",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.img_size = tuple(int(s) for s in img_size)
        self.kernel_size = int(kernel_size) if kernel_size else max(3, self.img_size[1] // 4)
        if not 1 <= self.kernel_size <= min(self.img_size[1:]):
            raise ValueError(f"deblur-blind: kernel_size {self.kernel_size} does not fit images {self.img_size}")
        if wiener_reg < 0 or guess_std <= 0:
            raise ValueError(f"deblur-blind: wiener_reg must be >= 0 and guess_std > 0, got {wiener_reg}, {guess_std}")
        self.wiener_reg, self.guess_std = float(wiener_reg), float(guess_std)
        self.filter = filter
        self.seed = int(seed)
        self._device = torch.device(device)

    @staticmethod
    def family(seed: int) -> str:
        """The kernel family (:data:`~invdiff.operators.kernels.FAMILIES`) of the measurement seeded
        ``seed``: the families in turn."""
        from .kernels import FAMILIES

        return FAMILIES[int(seed) % len(FAMILIES)]

    def kernel(self, seed: int) -> Tensor:
        """Nature's kernel of the measurement seeded ``seed``: ``(1, 1, k, k)``, non-negative, sum 1,
        of family :meth:`family`."""
        from .kernels import kernels

        return kernels(1, self.kernel_size, seed=int(seed), stream=1, families=(self.family(seed),)).to(self._device)

    def known(self, kernel: Tensor) -> WienerBlurFFT:
        """The non-blind operator with ``kernel`` known: a :class:`WienerBlurFFT` with this task's
        Wiener weight and noise model (what a non-blind sampler is given, e.g. DPS with the true
        or a guessed kernel)."""
        physics = WienerBlurFFT(self.img_size, filter=kernel.to(self._device), wiener_reg=self.wiener_reg,
                                device=self._device)
        physics.noise_model = self.noise_model
        return physics

    def guess(self) -> Tensor:
        """The Gaussian guess of ``A_dagger``: ``(1, 1, k, k)``."""
        from deepinv.physics.functional import gaussian_blur

        k = gaussian_blur(sigma=(self.guess_std, self.guess_std), angle=0.0)
        pad = self.kernel_size - k.shape[-1]
        if pad > 0:
            k = torch.nn.functional.pad(k, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
        elif pad < 0:
            c = (k.shape[-1] - self.kernel_size) // 2
            k = k[..., c : c + self.kernel_size, c : c + self.kernel_size]
        return (k / k.sum()).reshape(1, 1, self.kernel_size, self.kernel_size).to(self._device)

    def _filter(self, filter: Tensor | None, seed: int | None = None, measuring: bool = False,
                guessing: bool = False) -> Tensor:
        """The kernel to use: ``filter``, the known one, nature's (measuring: of ``seed`` or the
        operator's own), or the Gaussian guess (guessing: ``A_adjoint``, ``A_dagger``)."""
        if filter is not None:
            return filter
        if self.filter is not None:
            return self.filter
        if seed is not None:
            return self.kernel(seed)
        if measuring:
            return self.kernel(self.seed)
        if guessing:
            return self.guess()
        raise ValueError("deblur-blind: the kernel is unknown to the solver; pass filter=k "
                         "(a blind method estimates it: blind-dps)")

    def A(self, x: Tensor, filter: Tensor | None = None, **kwargs) -> Tensor:
        return circular_blur(x, self._filter(filter))

    def forward(self, x: Tensor, seed: int | None = None, filter: Tensor | None = None, **kwargs) -> Tensor:
        """Measure: blur by ``filter``, the known kernel, or nature's :meth:`kernel` ``(seed)``
        (``seed`` None: the operator's own ``seed``, drawn from the task's); then the noise."""
        y = circular_blur(x, self._filter(filter, seed, measuring=True))
        return self.noise_model(y, seed=seed) if seed is not None else self.noise_model(y)

    def A_adjoint(self, y: Tensor, filter: Tensor | None = None, **kwargs) -> Tensor:
        spectrum = kernel_spectrum(self._filter(filter, guessing=True).to(y.dtype), y.shape[-2:])
        return torch.fft.ifft2(torch.fft.fft2(y) * spectrum.conj()).real

    def A_dagger(self, y: Tensor, filter: Tensor | None = None, **kwargs) -> Tensor:
        spectrum = kernel_spectrum(self._filter(filter, guessing=True).to(y.dtype), y.shape[-2:])
        gain = spectrum.conj() / (spectrum.abs() ** 2 + self.wiener_reg)
        return torch.fft.ifft2(torch.fft.fft2(y) * gain).real
