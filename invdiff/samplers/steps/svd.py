r"""Spectral (SVD) views of linear operators, for the samplers that work in the singular
basis of :math:`A` (DDRM, DDNM).

A :class:`SpectralView` is :math:`A^\top A = V \operatorname{diag}(s^2) V^\top` with
:math:`V` orthonormal (for the real inner product of the images) and cheap to apply. The
samplers need only :math:`V^\top`, :math:`V`, the singular values :math:`s` and

.. math:: \bar y = \Sigma^+ U^\top y = V^\top A^\top y \,/\, s^2 \quad (0 \text{ where } s = 0),

so that :math:`A^+ y = V \bar y` is the exact pseudo-inverse (no :math:`U` is ever formed).
:func:`spectral_view` builds one for the operators whose singular basis is known:

* ``"diagonal"``: :class:`deepinv.physics.Inpainting` and :class:`~deepinv.physics.Denoising`
  (:math:`V = I`, :math:`s = |m|`);
* ``"circulant"``: circular blur (:class:`~deepinv.physics.BlurFFT`, invdiff's
  ``WienerBlurFFT``) and single-coil Cartesian MRI on real images: :math:`A^\top A` is a
  circular convolution per channel, :math:`V^\top` the orthonormal 2D DFT;
* ``"circulant-complex"``: single-coil MRI on complex images (2 channels = real and
  imaginary part), :math:`V^\top` the DFT of :math:`x_0 + i x_1`;
* ``"aliased"``: filtered decimation with circular padding (:class:`~deepinv.physics.Downsampling`,
  invdiff's ``ClosedFormDownsampling``): in the DFT each low-resolution frequency sees the
  :math:`f^2` high-resolution frequencies that alias onto it through one row
  :math:`u^\top`; a Householder reflection per group maps :math:`\bar u / \|u\|` to the first
  coordinate, so :math:`s = \|u\|` there and 0 on the other :math:`f^2 - 1`.

The singular values are read off the operator itself (one application of :math:`A^\top A` or
:math:`A^\top` to a delta), and the view is checked on a random image
(:math:`A^\top A x = V(s^2 V^\top x)` to 1e-4) before it is returned. Singular values below
``floor`` are set to 0 (the official DDRM code zeroes those below 3e-2 for deblurring and
super-resolution: without it :math:`\bar y` divides the measurement by rounding errors), and
so are those whose square is below 1e-6 of the largest (a zero computed in single precision).

For real images the DFT coordinates are Hermitian-symmetric; every update of DDRM and DDNM
acts on them with real coefficients that depend on :math:`s` only, which keeps the symmetry,
and noise is drawn as :math:`V^\top z` of a real white image :math:`z`
(:meth:`SpectralView.noise`), so that it is exactly white in the image.

:func:`renoise` is the re-noising step DDRM (unmeasured coordinates) and DDNM share.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .randomness import randn_like

__all__ = ["SpectralView", "spectral_view", "require_svd", "renoise", "KNOWN_SVD"]

#: the operators :func:`spectral_view` knows the singular basis of, in words (for errors)
KNOWN_SVD = ("inpainting, denoising, circular blur (BlurFFT), circular-padding super-resolution (Downsampling), "
             "single-coil Cartesian MRI")


def renoise(x0: Tensor, eps: Tensor, sigma_next: float, eta: float, noise: Tensor | None) -> Tensor:
    """DDRM's / DDNM's re-noising to ``sigma_next`` (VE form of their DDIM step, whose
    ``eta`` sets the fresh-noise std to :math:`\\eta\\sigma_{i+1}`, not DDIM's ancestral one):

    .. math:: x_{i+1} = \\hat x_0 + \\sigma_{i+1}\\big(\\sqrt{1 - \\eta^2}\\, \\hat\\epsilon + \\eta\\, z\\big).
    """
    out = x0 + sigma_next * math.sqrt(1 - eta**2) * eps
    return out if noise is None or eta == 0 else out + sigma_next * eta * noise


class SpectralView:
    """:math:`A^\\top A = V \\operatorname{diag}(s^2) V^\\top` with :math:`V` orthonormal (see the module doc).

    :ivar kind: ``"diagonal"``, ``"circulant"``, ``"circulant-complex"`` or ``"aliased"``.
    :ivar s: singular values, real, shaped to broadcast against :meth:`V_adjoint`'s output.
    """

    def __init__(self, physics, kind: str, s: Tensor, image_shape, householder: Tensor | None = None,
                 factor: int = 1) -> None:
        self.physics, self.kind, self.s = physics, kind, s
        self.image_shape = tuple(image_shape)
        self._w, self._f = householder, factor  # aliased: Householder vectors (.., f^2), factor

    # --- V^T and V ----------------------------------------------------------------------
    def V_adjoint(self, x: Tensor) -> Tensor:
        """Image ``(B, C, H, W)`` -> coordinates in the singular basis."""
        if self.kind == "diagonal":
            return x
        if self.kind == "circulant":
            return torch.fft.fft2(x, norm="ortho")
        if self.kind == "circulant-complex":
            return torch.fft.fft2(torch.complex(x[:, :1], x[:, 1:2]), norm="ortho")
        return self._reflect(self._group(torch.fft.fft2(x, norm="ortho")))

    def V(self, c: Tensor) -> Tensor:
        """Coordinates -> image (the inverse of :meth:`V_adjoint`)."""
        if self.kind == "diagonal":
            return c
        if self.kind == "circulant":
            return torch.fft.ifft2(c, norm="ortho").real
        if self.kind == "circulant-complex":
            z = torch.fft.ifft2(c, norm="ortho")
            return torch.cat([z.real, z.imag], dim=1)
        return torch.fft.ifft2(self._ungroup(self._reflect(c)), norm="ortho").real

    # --- what the samplers use ------------------------------------------------------------
    def y_bar(self, y: Tensor) -> Tensor:
        """:math:`\\Sigma^+ U^\\top y = V^\\top A^\\top y / s^2`, 0 where :math:`s = 0`."""
        s2 = self.s**2
        c = self.V_adjoint(self.physics.A_adjoint(y))
        return torch.where(s2 > 0, c / torch.where(s2 > 0, s2, torch.ones_like(s2)), torch.zeros_like(c))

    def pinv(self, y: Tensor) -> Tensor:
        """The exact pseudo-inverse :math:`A^+ y = V \\Sigma^+ U^\\top y`."""
        return self.V(self.y_bar(y))

    def scale(self, x: Tensor, weights: Tensor | float) -> Tensor:
        """:math:`V \\operatorname{diag}(w) V^\\top x` (``w`` a number: :math:`w x`)."""
        if not isinstance(weights, Tensor):
            return weights * x
        return self.V(weights * self.V_adjoint(x))

    def noise(self, like: Tensor, generator) -> Tensor:
        """:math:`V^\\top z` for a white image :math:`z` (``like``: an image of the batch)."""
        return self.V_adjoint(randn_like(like, generator))

    # --- the aliased (super-resolution) basis ---------------------------------------------
    def _group(self, X: Tensor) -> Tensor:
        """``(B, C, H, W)`` spectrum -> ``(B, C, H/f, W/f, f^2)``: the aliases of each low frequency."""
        f = self._f
        B, C, H, W = X.shape
        return X.reshape(B, C, f, H // f, f, W // f).permute(0, 1, 3, 5, 2, 4).reshape(B, C, H // f, W // f, f * f)

    def _ungroup(self, G: Tensor) -> Tensor:
        f = self._f
        B, C, h, w, _ = G.shape
        return G.reshape(B, C, h, w, f, f).permute(0, 1, 4, 2, 5, 3).reshape(B, C, f * h, f * w)

    def _reflect(self, G: Tensor) -> Tensor:
        """The Householder reflection :math:`H = I - 2 w w^H / \\|w\\|^2` per group (its own inverse)."""
        w = self._w
        norm2 = (w.abs() ** 2).sum(-1, keepdim=True).clamp_min(1e-30)
        return G - 2 * w * (w.conj() * G).sum(-1, keepdim=True) / norm2


def _delta(shape, like: Tensor) -> Tensor:
    d = like.new_zeros((1, *shape))
    d[..., 0, 0] = 1
    return d


def _aliased(physics, shape, like: Tensor) -> tuple[Tensor, Tensor, int]:
    """Singular values and Householder vectors of a circular filtered decimation."""
    f = int(physics.factor)
    C, H, W = shape
    h, w = H // f, W // f
    # A^T of a low-resolution delta: its spectrum is conj(u) / sqrt(h w) in each alias group
    delta_lr = _delta((C, h, w), like)
    G = torch.fft.fft2(physics.A_adjoint(delta_lr), norm="ortho")
    view = SpectralView(physics, "aliased", like.new_zeros(1), shape, factor=f)
    u_conj = view._group(G) * math.sqrt(h * w)  # (1, C, h, w, f^2)
    s = (u_conj.abs() ** 2).sum(-1, keepdim=True).sqrt()
    q = u_conj / s.clamp_min(1e-30)
    alpha = -torch.exp(1j * torch.angle(q[..., :1]))
    e1 = torch.zeros_like(q)
    e1[..., 0] = 1
    house = torch.where(s > 0, q - alpha * e1, torch.zeros_like(q))
    # H e1 = q / alpha: the first coordinate of H X is alpha q^H X = alpha (u^T X) / s
    s_full = torch.cat([s, s.new_zeros(*s.shape[:-1], f * f - 1)], dim=-1)
    return s_full, house, f


def spectral_view(physics, image_shape, like: Tensor, floor: float = 0.0, where: str = "sampler") -> SpectralView:
    """The :class:`SpectralView` of ``physics`` for images of ``image_shape`` (``(C, H, W)``),
    in the dtype and on the device of ``like``; singular values below ``floor`` set to 0.

    Raises the one-line :class:`~invdiff.samplers.IncompatibleError` (prefixed with ``where``)
    for an operator whose singular basis is not known, or whose view fails the check.
    """
    from deepinv.physics import BlurFFT, Denoising, Downsampling, Inpainting, MRI, MultiCoilMRI

    from ..base import IncompatibleError

    shape = tuple(int(n) for n in image_shape)
    like = like.new_zeros(()).to(like.real.dtype)
    house, factor = None, 1
    with torch.no_grad():
        if isinstance(physics, (Inpainting, Denoising)):
            kind = "diagonal"
            s = physics.A_adjoint(physics.A(like.new_ones((1, *shape)))).abs().sqrt()
        elif isinstance(physics, MRI) and not isinstance(physics, MultiCoilMRI) and shape[0] == 2:
            kind = "circulant-complex"
            r = physics.A_adjoint(physics.A(_delta(shape, like)))
            s = torch.fft.fft2(torch.complex(r[:, :1], r[:, 1:2])).real.clamp_min(0).sqrt()
        elif isinstance(physics, BlurFFT) or (isinstance(physics, MRI) and not isinstance(physics, MultiCoilMRI)):
            kind = "circulant"
            s = torch.fft.fft2(physics.A_adjoint(physics.A(_delta(shape, like)))).real.clamp_min(0).sqrt()
        elif isinstance(physics, Downsampling) and getattr(physics, "padding", None) == "circular":
            kind = "aliased"
            s, house, factor = _aliased(physics, shape, like)
        else:
            raise IncompatibleError(
                f"{where}: needs an operator with a known SVD ({KNOWN_SVD}), got {type(physics).__name__}; "
                "use a sampler for general linear operators (dds, dps, diffpir)")
        # eigenvalues of A^T A below 1e-6 of the largest are rounding errors of a zero (s ~ 1e-3 max)
        s = torch.where((s >= floor) & (s**2 > 1e-6 * (s**2).max()), s, torch.zeros_like(s))
        view = SpectralView(physics, kind, s, shape, house, factor)
        _check(view, physics, shape, like, where)
    return view


def require_svd(physics, image_shape, floor: float = 0.0, where: str = "sampler") -> None:
    """Refuse ``physics`` unless :func:`spectral_view` can build its view (on the operator's
    own device): a sampler's ``check_physics``, before any network call."""
    buffer = next(iter(physics.buffers()), None)
    like = torch.zeros((), device=buffer.device if buffer is not None else "cpu")
    spectral_view(physics, image_shape, like, floor, where)


def _check(view: SpectralView, physics, shape, like: Tensor, where: str) -> None:
    """:math:`A^\\top A x = V(s^2 V^\\top x)` on a random image (singular values below the floor
    are left out of both sides)."""
    from ..base import IncompatibleError

    x = torch.randn((1, *shape), generator=torch.Generator().manual_seed(0), dtype=like.dtype).to(like.device)
    x = view.scale(x, (view.s > 0).to(like.dtype))
    lhs = physics.A_adjoint(physics.A(x))
    rhs = view.scale(x, view.s**2)
    err = float((lhs - rhs).norm() / lhs.norm().clamp_min(1e-30))
    if not err < 1e-4:
        raise IncompatibleError(
            f"{where}: the {view.kind} SVD of {type(physics).__name__} does not reproduce A^T A "
            f"(relative error {err:.2g}); needs {KNOWN_SVD}")
