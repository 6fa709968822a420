r"""Volume operators: deepinv physics on ``(B, C, D, H, W)`` volumes (D slices along z).

* :class:`SliceStack` — any 2D operator applied to every axial slice (slice-stacked CT,
  parallel or fan beam; 2D k-space per slice for multi-slice MRI):
  :math:`A x = [A_2 x_1, \dots, A_2 x_D]`, :math:`A^\top y = [A_2^\top y_1, \dots]`,
  :math:`A^\dagger` the 2D baseline per slice (FBP, zero-filled IFFT). The slices travel
  through the 2D operator as one batch of ``B·D`` images.
* :class:`Cartesian3DMRI` — 3D Cartesian MRI, :math:`y = M F_3 x` with the centred
  orthonormal 3D FFT and a mask on the two phase-encode directions ``(kz, kx)`` (the
  readout along ``H`` is fully sampled), :math:`A^\top y = \rho(F_3^{-1} M y)` (the real part
  for real images), :math:`A^\dagger = A^\top` (zero-filled 3D IFFT, exact for a full mask).
* :class:`SliceAveraging` — z-axis super-resolution: thick slices, each the mean of ``k``
  thin ones, :math:`(Ax)_j = \tfrac1k \sum_{i<k} x_{kj+i}`; :math:`A^\top` spreads each
  thick slice back over its ``k`` thin ones divided by ``k``; :math:`A^\dagger` is linear
  interpolation along z between the thick slices' centres.

Every class is a :class:`deepinv.physics.LinearPhysics` with exact adjoints (tested) and
``img_size = (C, D, H, W)``. :func:`invdiff.operators.make` builds them from a task name
and a 4-entry ``img_size``. deepinv has no volume wrappers of its 2D operators, no 3D
Cartesian MRI with a 2D phase-encode mask, and no slice-averaging operator: they are
written here (on :func:`torch.fft.fftn`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from deepinv.physics import LinearPhysics, Physics
from torch import Tensor

__all__ = ["SliceStack", "Cartesian3DMRI", "SliceAveraging", "phase_encode_mask", "to_slices", "from_slices"]


def to_slices(x: Tensor, plane: str = "axial") -> Tensor:
    """``(B, C, D, H, W)`` volume -> a batch of 2D slices: ``(B·D, C, H, W)`` (``"axial"``,
    slice-major), ``(B·H, C, D, W)`` (``"coronal"``) or ``(B·W, C, D, H)`` (``"sagittal"``)."""
    B, C, D, H, W = x.shape
    if plane == "axial":
        return x.permute(0, 2, 1, 3, 4).reshape(B * D, C, H, W)
    if plane == "coronal":
        return x.permute(0, 3, 1, 2, 4).reshape(B * H, C, D, W)
    if plane == "sagittal":
        return x.permute(0, 4, 1, 2, 3).reshape(B * W, C, D, H)
    raise ValueError(f"unknown plane {plane!r}; use 'axial', 'coronal' or 'sagittal'")


def from_slices(s: Tensor, shape, plane: str = "axial") -> Tensor:
    """The inverse of :func:`to_slices` for a volume of ``shape = (B, C, D, H, W)``."""
    B, C, D, H, W = shape
    if plane == "axial":
        return s.reshape(B, D, C, H, W).permute(0, 2, 1, 3, 4)
    if plane == "coronal":
        return s.reshape(B, H, C, D, W).permute(0, 2, 3, 1, 4)
    if plane == "sagittal":
        return s.reshape(B, W, C, D, H).permute(0, 2, 3, 4, 1)
    raise ValueError(f"unknown plane {plane!r}; use 'axial', 'coronal' or 'sagittal'")


def _check_volume(x: Tensor, img_size, where: str) -> None:
    if x.ndim != 5 or tuple(x.shape[1:]) != tuple(img_size):
        raise ValueError(f"{where}: expected volumes (B, {', '.join(map(str, img_size))}), got {tuple(x.shape)}")


class SliceStack(LinearPhysics):
    r"""A 2D operator applied to each axial slice of a volume (module doc).

    :param physics2d: the 2D operator (a :class:`deepinv.physics.LinearPhysics` on
        ``(N, C, H, W)`` images); its noise model becomes the volume's.
    :param depth: number of slices ``D``.

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.operators.volume import SliceStack
        >>> ct = operators.make("ct-sparse-30", (1, 32, 32), noise="none")
        >>> physics = SliceStack(ct, depth=4)
        >>> x = torch.rand(1, 1, 4, 32, 32)
        >>> physics.A(x).shape[:2], torch.allclose(physics.A(x)[:, 2], ct.A(x[:, :, 2]))
        (torch.Size([1, 4]), True)
    """

    def __init__(self, physics2d: Physics, depth: int, **kwargs) -> None:
        if not isinstance(physics2d, LinearPhysics):
            raise TypeError(f"SliceStack needs a linear 2D operator, got {type(physics2d).__name__}")
        super().__init__(noise_model=physics2d.noise_model, **kwargs)
        self.physics2d = physics2d
        self.depth = int(depth)
        size = getattr(physics2d, "img_size", None)
        if size is None or len(size) != 3:
            raise ValueError("SliceStack: the 2D operator needs img_size = (C, H, W)")
        self.img_size = (int(size[0]), self.depth, int(size[1]), int(size[2]))

    def _slices(self, x: Tensor) -> Tensor:
        _check_volume(x, self.img_size, "SliceStack")
        return to_slices(x)

    def A(self, x: Tensor, **kwargs) -> Tensor:
        """``(B, C, D, H, W) -> (B, D, *m)``, ``m`` the 2D measurement shape."""
        y = self.physics2d.A(self._slices(x))
        return y.reshape(x.shape[0], self.depth, *y.shape[1:])

    def _unstack(self, y: Tensor, fn) -> Tensor:
        if y.ndim < 2 or y.shape[1] != self.depth:
            raise ValueError(f"SliceStack: expected measurements (B, {self.depth}, ...), got {tuple(y.shape)}")
        B = y.shape[0]
        s = fn(y.reshape(B * self.depth, *y.shape[2:]))
        return from_slices(s, (B, *self.img_size))

    def A_adjoint(self, y: Tensor, **kwargs) -> Tensor:
        return self._unstack(y, self.physics2d.A_adjoint)

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        """The 2D operator's baseline on every slice (FBP, zero-filled IFFT, ...)."""
        return self._unstack(y, self.physics2d.A_dagger)


def phase_encode_mask(D: int, W: int, acceleration: float, center_fraction: float = 0.08,
                      generator: torch.Generator | None = None) -> Tensor:
    r"""Variable-density random mask ``(D, W)`` on the two phase-encode directions of 3D
    Cartesian MRI: a fully sampled centre of ``center_fraction`` of each side, and the rest
    drawn without replacement with density :math:`\propto (1 + (r / r_0)^2)^{-1}` (``r`` the
    normalised distance to the k-space centre, :math:`r_0 = 0.25`), so that
    ``D·W / sampled ≈ acceleration``."""
    if acceleration < 1:
        raise ValueError(f"phase_encode_mask: acceleration must be >= 1, got {acceleration}")
    if not 0 <= center_fraction <= 1:
        raise ValueError(f"phase_encode_mask: center_fraction must be in [0, 1], got {center_fraction}")
    mask = torch.zeros(D, W)
    cd, cw = max(1, round(center_fraction * D)), max(1, round(center_fraction * W))
    d0, w0 = D // 2 - cd // 2, W // 2 - cw // 2
    mask[d0:d0 + cd, w0:w0 + cw] = 1
    total = int(round(D * W / acceleration))
    extra = total - int(mask.sum())
    if extra > 0:
        kz = (torch.arange(D) - D // 2) / max(D / 2, 1)
        kx = (torch.arange(W) - W // 2) / max(W / 2, 1)
        r2 = kz[:, None] ** 2 + kx[None, :] ** 2
        density = (1 / (1 + r2 / 0.25**2)) * (1 - mask)
        picks = torch.multinomial(density.reshape(-1), extra, replacement=False, generator=generator)
        mask.reshape(-1)[picks] = 1
    return mask


class Cartesian3DMRI(LinearPhysics):
    r"""3D Cartesian MRI :math:`y = M F_3 \iota(x)` (module doc).

    :param mask: ``(D, W)`` binary mask over ``(kz, kx)``, applied to every readout line
        (``H``); see :func:`phase_encode_mask`.
    :param img_size: ``(1, D, H, W)`` (real images) or ``(2, D, H, W)`` (complex, real and
        imaginary channels). Measurements are ``(B, 2, D, H, W)``, 0 where unsampled.

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators.volume import Cartesian3DMRI
        >>> full = Cartesian3DMRI(torch.ones(8, 16), img_size=(1, 8, 16, 16))
        >>> x = torch.rand(1, 1, 8, 16, 16)
        >>> torch.allclose(full.A_dagger(full.A(x)), x, atol=1e-5)
        True
    """

    def __init__(self, mask: Tensor, img_size, **kwargs) -> None:
        super().__init__(**kwargs)
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != 4 or img_size[0] not in (1, 2):
            raise ValueError(f"Cartesian3DMRI: img_size must be (1 or 2, D, H, W), got {img_size}")
        if tuple(mask.shape) != (img_size[1], img_size[3]):
            raise ValueError(f"Cartesian3DMRI: mask shape {tuple(mask.shape)} must be (D, W) = "
                             f"{(img_size[1], img_size[3])}")
        self.img_size = img_size
        self.register_buffer("mask", mask.to(torch.float32)[:, None, :].contiguous())  # (D, 1, W)

    def _fft(self, x: Tensor, inverse: bool = False) -> Tensor:
        dims = (-3, -2, -1)
        if inverse:
            return torch.fft.fftshift(torch.fft.ifftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho"), dim=dims)
        return torch.fft.fftshift(torch.fft.fftn(torch.fft.ifftshift(x, dim=dims), dim=dims, norm="ortho"), dim=dims)

    def A(self, x: Tensor, **kwargs) -> Tensor:
        _check_volume(x, self.img_size, "Cartesian3DMRI")
        z = torch.complex(x[:, 0], x[:, 1]) if x.shape[1] == 2 else x[:, 0].to(torch.complex64 if x.dtype != torch.float64 else torch.complex128)
        k = self._fft(z) * self.mask
        return torch.stack([k.real, k.imag], dim=1)

    def A_adjoint(self, y: Tensor, **kwargs) -> Tensor:
        if y.ndim != 5 or y.shape[1] != 2:
            raise ValueError(f"Cartesian3DMRI: expected k-space (B, 2, D, H, W), got {tuple(y.shape)}")
        z = self._fft(torch.complex(y[:, 0], y[:, 1]) * self.mask, inverse=True)
        return z.real[:, None] if self.img_size[0] == 1 else torch.stack([z.real, z.imag], dim=1)

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        """Zero-filled 3D inverse FFT (the real part for real images); closed form."""
        return self.A_adjoint(y)


class SliceAveraging(LinearPhysics):
    r"""z-axis super-resolution: ``k`` thin slices averaged into one thick slice (module doc).

    :param img_size: ``(C, D, H, W)`` of the thin-slice volume; ``D`` divisible by ``factor``.
    :param factor: ``k``, thin slices per thick slice.

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators.volume import SliceAveraging
        >>> physics = SliceAveraging((1, 8, 4, 4), factor=4)
        >>> x = torch.rand(1, 1, 8, 4, 4)
        >>> physics.A(x).shape, torch.allclose(physics.A(x)[:, :, 0], x[:, :, :4].mean(2))
        (torch.Size([1, 1, 2, 4, 4]), True)
    """

    def __init__(self, img_size, factor: int, **kwargs) -> None:
        super().__init__(**kwargs)
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != 4:
            raise ValueError(f"SliceAveraging: img_size must be (C, D, H, W), got {img_size}")
        if factor < 1 or img_size[1] % factor:
            raise ValueError(f"SliceAveraging: {img_size[1]} slices are not divisible by factor {factor}")
        self.img_size, self.factor = img_size, int(factor)

    def A(self, x: Tensor, **kwargs) -> Tensor:
        _check_volume(x, self.img_size, "SliceAveraging")
        B, C, D, H, W = x.shape
        return x.reshape(B, C, D // self.factor, self.factor, H, W).mean(3)

    def A_adjoint(self, y: Tensor, **kwargs) -> Tensor:
        return y.repeat_interleave(self.factor, dim=2) / self.factor

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        """Linear interpolation along z between the thick slices' centres (edges held)."""
        B, C, d, H, W = y.shape
        flat = y.permute(0, 1, 3, 4, 2).reshape(B, C * H * W, d)
        up = F.interpolate(flat, scale_factor=self.factor, mode="linear", align_corners=False)
        return up.reshape(B, C, H, W, d * self.factor).permute(0, 1, 4, 2, 3).contiguous()
