r"""Fast 2D computed tomography operators (parallel beam and flat-detector fan beam).

Why not :class:`deepinv.physics.Tomography`? Its forward projection rotates the
image once per view (``grid_sample``), its adjoint is obtained by back-propagation,
and its default ``A_dagger`` is an iterative least-squares solve that takes seconds
at 256²; ``benchmarks/operators.py`` measures it side by side with these classes.
Measured there (256², 60 views, 2 CPU threads, loaded machine): deepinv ``A`` ~110 ms,
``A_adjoint`` ~200-290 ms, ``A_dagger`` ~10-18 s; its adjoint (by back-propagation) is
accurate (relative adjointness error 2e-7) — speed, not accuracy, is the issue.
This module's build time, peak memory, ``A``, ``A_adjoint`` and FBP times (first call and
later ones) and adjointness errors at 256² and 512² are measured by
``benchmarks/ct_build.py`` (``python benchmarks/ct_build.py [--threads N]``).

The operators here precompute the system matrix once, as one sparse CSR matrix with
32-bit indices (the adjoint's: rows are pixels), generated pixel chunk by pixel chunk
directly in sorted CSR order (no COO sort, no transpose), so

* ``A`` and ``A_adjoint`` are each one sparse-dense product with the same stored
  entries (``A`` reads them as CSC), in tens of ms at 512²,
* ``A_adjoint`` is the exact transpose of ``A`` (adjointness error ~1e-6 in float32),
* ``A_vjp(x, v) = A_adjoint(v)`` and autograd through ``A`` uses the same transpose,
* ``A_dagger`` is filtered back-projection (FBP) in milliseconds, first call included:
  linear interpolation computed on the fly, no iterative solve and no matrix.

**Discretisation.** The image is a sum of unit square pixels (pixel size 1; all
lengths are in pixel units). Pixel :math:`(i, j)` of an ``H × W`` image has centre

.. math::

    x_j = j - \tfrac{W-1}{2}, \qquad y_i = \tfrac{H-1}{2} - i

(``y`` points up, as in :func:`skimage.transform.radon`). A measurement is the line
integral of the image averaged over the width of one detector bin. For parallel
beams the shadow of a square pixel on the detector is exactly a trapezoid (the
convolution of two boxes of widths :math:`|\cos\theta|` and :math:`|\sin\theta|`), so
the matrix entry is the exact fraction of that trapezoid falling in the bin
("separable-footprint" projector, exact for the pixel basis). For fan beams the same
trapezoid is used, magnified by the local fan geometry (locally parallel rays within
one pixel). Measurements are therefore in *pixel units*: a constant image of value 1
gives line integrals equal to chord lengths in pixels, like ``skimage.transform.radon``.

**Layout.** Sinograms are ``(B, C, n_detectors, n_views)`` like deepinv's
``Tomography`` and skimage (internally view-major, one transpose away). Channels are
folded into the batch.

**Memory.** One sparse matrix of ~2.3 non-zeros per (pixel, view), 8 bytes each:
about ``19 · H · W · n_views`` bytes, e.g. 71 MB at 256², 60 views and 430 MB at 512²,
90 views; the build needs little more (it writes straight into the final arrays).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import scipy.fft
import scipy.sparse as sp
import torch
from deepinv.physics import LinearPhysics
from torch import Tensor

__all__ = ["ParallelBeamCT", "FanBeamCT", "ramp_filter"]


# --------------------------------------------------------------------------- helpers
def _trapezoid_cdf(v: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    r"""CDF at ``v`` of the unit-mass trapezoid ``box(a) * box(b)`` centred at 0.

    Written as a sum of clipped squares (a quadratic B-spline form), valid for
    ``a, b > 0``: :math:`F(v) = [r(u) - r(u-a) - r(u-b) + r(u-a-b)] / (2ab)` with
    :math:`u = v + (a+b)/2` and :math:`r(z) = \max(z, 0)^2`.
    """
    u = v + 0.5 * (a + b)
    r = lambda z: np.square(np.maximum(z, 0.0))  # noqa: E731
    return (r(u) - r(u - a) - r(u - b) + r(u - a - b)) / (2.0 * a * b)


def ramp_filter(n_pad: int, spacing: float = 1.0, window: str = "ramp") -> Tensor:
    r"""Frequency response (``rfft`` layout, length ``n_pad // 2 + 1``) of the ramp filter.

    Built as the DFT of the band-limited spatial ramp kernel of Kak & Slaney (eq. 3.61),
    :math:`h[0] = 1/(4\tau^2)`, :math:`h[n] = -1/(\pi n \tau)^2` for odd :math:`n`,
    0 for even :math:`n`, times :math:`\tau` (the convolution's quadrature weight), so
    the DC term is correct (no cupping). ``window`` multiplies it by ``"ramp"`` (none,
    Ram-Lak), ``"shepp-logan"`` (sinc), ``"cosine"`` or ``"hann"``.
    """
    n = np.concatenate([np.arange(0, n_pad // 2 + 1), np.arange(-(n_pad // 2) + 1, 0)])
    h = np.zeros(n_pad)
    h[0] = 0.25 / spacing**2
    odd = n % 2 == 1
    h[odd] = -1.0 / (np.pi * n[odd] * spacing) ** 2
    response = spacing * np.real(np.fft.rfft(h))
    f = np.fft.rfftfreq(n_pad)  # cycles per sample, in [0, 0.5]
    if window == "ramp":
        pass
    elif window == "shepp-logan":
        response = response * np.sinc(f)
    elif window == "cosine":
        response = response * np.cos(np.pi * f)
    elif window == "hann":
        response = response * 0.5 * (1.0 + np.cos(2.0 * np.pi * f))
    else:
        raise ValueError(
            f"unknown FBP window {window!r}; use 'ramp', 'shepp-logan', 'cosine' or 'hann'"
        )
    return torch.from_numpy(response)


class _SparseProject(torch.autograd.Function):
    """``Y = M @ X`` with the stored sparse matrix or its transpose; the backward uses the other one."""

    @staticmethod
    def forward(ctx, x2d: Tensor, op: "_ProjectionCT", transpose: bool) -> Tensor:
        ctx.op, ctx.transpose = op, transpose
        return op._spmm(x2d, transpose)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return ctx.op._spmm(grad.contiguous(), not ctx.transpose), None, None


def _check_size(img_size: Sequence[int], where: str) -> tuple[int, int, int]:
    if len(img_size) != 3:
        raise ValueError(f"{where}: img_size must be (C, H, W), got {tuple(img_size)}")
    c, h, w = (int(s) for s in img_size)
    if c < 1 or h < 4 or w < 4:
        raise ValueError(f"{where}: image too small {(c, h, w)}; need C >= 1 and H, W >= 4")
    return c, h, w


def _bin_fractions(u, a, b, amp, first: float, du: float, n_bins: int):
    r"""Fractions of each pixel's trapezoid footprint falling in ``n_bins`` consecutive bins.

    ``u, a, b, amp`` (float64, broadcastable to a common shape ``S``): footprint centre,
    the two box widths and the amplitude. Returns ``(w, k0)``: ``w`` of shape ``S + (n_bins,)``
    with ``w[..., m]`` the footprint's mass in bin ``k0 + m`` times ``amp / du``, and ``k0``
    (float, shape ``S``) the bin holding the footprint's left end. ``n_bins`` must cover the
    widest footprint, ``n_bins >= ceil(max(a + b) / du) + 1``, so the CDF is 0 at the first
    bin edge and 1 at the last one.

    The CDF is :func:`_trapezoid_cdf` written around the centre: with ``s = min(a, b)``,
    ``l = max(a, b)``, :math:`F(t) = 1/2 + \operatorname{sign}(t)\, G(|t|)`,
    :math:`G(t) = [\min(t, h) - \max(\min(t, h) - g, 0)^2 / (2 s)] / l`, ``h = (l + s)/2``,
    ``g = (l - s)/2`` — the same piecewise quadratic, in 10 in-place operations per edge and
    without the cancellation of the clipped-squares form when one width is tiny.
    """
    a = np.maximum(a, 1e-9)
    b = np.maximum(b, 1e-9)
    small, large = np.minimum(a, b), np.maximum(a, b)
    half = 0.5 * (a + b)
    ramp = 0.5 * (large - small)
    inv2s, invl = 0.5 / small, 1.0 / large
    k0 = np.floor((u - half - first) / du + 0.5)
    lo = first + (k0 - 0.5) * du - u  # lower edge of bin k0, relative to the footprint centre
    shape = np.broadcast_shapes(u.shape, a.shape, b.shape)
    w = np.empty(shape + (n_bins,))
    buffers = [np.empty(shape) for _ in range(4)]
    F_prev = None  # F at the first edge is 0
    for m in range(1, n_bins):
        t, T, E = buffers[0], buffers[1 + (m % 2)], buffers[3]
        np.add(lo, m * du, out=t)
        np.abs(t, out=T)
        np.minimum(T, half, out=T)
        np.subtract(T, ramp, out=E)
        np.maximum(E, 0.0, out=E)
        np.square(E, out=E)
        E *= inv2s
        T -= E
        T *= invl
        np.copysign(T, t, out=T)
        T += 0.5  # F at the m-th edge
        if F_prev is None:
            w[..., 0] = T
        else:
            np.subtract(T, F_prev, out=w[..., m - 1])
        F_prev = T
    if F_prev is None:
        w[..., 0] = 1.0
    else:  # F at the last edge is 1
        np.subtract(1.0, F_prev, out=w[..., n_bins - 1])
    scale = np.asarray(amp, dtype=np.float64) / du
    if scale.ndim == 0:
        if float(scale) != 1.0:
            w *= float(scale)
    else:
        w *= scale[..., None]
    return w, k0


# --------------------------------------------------------------------------- base class
class _ProjectionCT(LinearPhysics):
    """Shared machinery: sparse system matrix, autograd, channel folding, FBP.

    Internally the sinogram is view-major, index ``v * n_detectors + k``; the public
    layout ``(B, C, n_detectors, n_views)`` is one transpose of it away. The stored matrix
    is the *adjoint* ``A^T`` as CSR (rows = pixels ``i * W + j``, columns ``v * n_det + k``),
    generated directly in sorted CSR order, pixel chunk by pixel chunk; ``A`` uses its
    transpose (a CSC view of the same arrays on CPU, a CSR copy made once per device/dtype
    elsewhere).
    """

    _chunk_entries = 1 << 17  # (pixel, view, bin) entries generated per chunk of the build

    def __init__(self, img_size, angles_deg, n_detectors, detector_spacing, fbp_filter, device, **kwargs):
        super().__init__(**kwargs)
        self.img_size = tuple(int(s) for s in img_size)
        _, self.H, self.W = self.img_size
        angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1)
        if angles.size == 0:
            raise ValueError(f"{type(self).__name__}: need at least one view angle")
        self.angles_deg = angles
        self.n_views = angles.size
        self.n_detectors = int(n_detectors)
        if self.n_detectors < 1:
            raise ValueError(f"{type(self).__name__}: n_detectors must be >= 1, got {n_detectors}")
        self.detector_spacing = float(detector_spacing)
        self.fbp_filter = fbp_filter
        ramp_filter(8, window=fbp_filter)  # validate the window name early

        crow, col, val = self._adjoint_csr()
        self.register_buffer("_adj_crow", torch.from_numpy(crow), persistent=False)
        self.register_buffer("_adj_col", torch.from_numpy(col), persistent=False)
        self.register_buffer("_adj_val", torch.from_numpy(val), persistent=False)
        self.to(device)

    # -- geometry, implemented by subclasses --------------------------------------
    def _pixel_coordinates(self) -> tuple[np.ndarray, np.ndarray]:
        xs = np.arange(self.W, dtype=np.float64) - (self.W - 1) / 2.0
        ys = (self.H - 1) / 2.0 - np.arange(self.H, dtype=np.float64)
        x, y = np.meshgrid(xs, ys)  # (H, W), row-major like the image
        return x.reshape(-1), y.reshape(-1)

    def _footprints(self, x: np.ndarray, y: np.ndarray):
        """For pixels at ``x, y`` (shape ``(P,)``) and every view return, broadcastable to
        ``(P, n_views)``: detector position ``u``, trapezoid widths ``a, b`` on the detector
        and amplitude ``amp``."""
        raise NotImplementedError

    def _max_half_footprint(self) -> float:
        """An upper bound of ``(a + b) / 2`` over all pixels and views."""
        raise NotImplementedError

    @property
    def _detector_positions(self) -> np.ndarray:
        return (np.arange(self.n_detectors) - (self.n_detectors - 1) / 2.0) * self.detector_spacing

    def _adjoint_csr(self):
        """CSR arrays ``(crow, col, val)`` of ``A^T``: row ``i * W + j`` (pixel), column
        ``v * n_detectors + k`` (view-major sinogram), entry = the exact fraction of the
        pixel's trapezoid footprint in bin ``k`` of view ``v`` (times ``amp / du``).

        Entries are generated per chunk of pixels in (pixel, view, bin) order, which is
        already sorted CSR order, straight into the output arrays (no COO, no sort, no
        transpose). The output is allocated at its upper bound ``n_pix * n_views * n_bins``
        and filled from the front; the untouched tail is never resident in memory.
        """
        K, V = self.n_detectors, self.n_views
        n_pix = self.H * self.W
        du = self.detector_spacing
        first = -(K - 1) / 2.0 * du
        n_bins = math.ceil(2.0 * self._max_half_footprint() / du) + 1
        if V * K >= 2**31:
            raise ValueError(f"{type(self).__name__}: sinogram of {V} x {K} too large for 32-bit indices")
        capacity = n_pix * V * n_bins
        val = np.empty(capacity, dtype=np.float32)
        col = np.empty(capacity, dtype=np.int32)
        counts = np.zeros(n_pix + 1, dtype=np.int64)
        view_offset = (np.arange(V, dtype=np.int32) * K)[None, :, None]
        bins = np.arange(n_bins, dtype=np.int32)
        xs, ys = self._pixel_coordinates()
        chunk = max(1, self._chunk_entries // (V * n_bins))
        pos = 0
        for p0 in range(0, n_pix, chunk):
            p1 = min(p0 + chunk, n_pix)
            u, a, b, amp = self._footprints(xs[p0:p1], ys[p0:p1])
            w, k0 = _bin_fractions(u, a, b, amp, first, du, n_bins)
            k0 = k0.astype(np.int32)[..., None]
            if k0.min() < 0 or k0.max() + n_bins > K:
                k = k0 + bins
                w[(k < 0) | (k >= K)] = 0.0
            keep = w > 1e-9
            nz = np.flatnonzero(keep)
            n = nz.size
            val[pos : pos + n] = w.reshape(-1)[nz]
            col[pos : pos + n] = (k0 + view_offset + bins).reshape(-1)[nz]
            counts[p0 + 1 : p1 + 1] = keep.reshape(p1 - p0, -1).sum(axis=1)
            pos += n
        crow = np.cumsum(counts)
        if pos < 2**31:
            crow = crow.astype(np.int32)
            col = col[:pos]
        else:  # torch wants crow and col of one dtype
            col = col[:pos].astype(np.int64)
        return crow, col, val[:pos]

    # -- linear algebra ---------------------------------------------------------------
    @property
    def _shape(self) -> tuple[int, int]:
        """Shape of the stored matrix ``A^T``: ``(H * W, n_views * n_detectors)``."""
        return self.H * self.W, self.n_views * self.n_detectors

    def _scipy_adjoint(self, dtype: torch.dtype) -> sp.csr_matrix:
        """CPU: a scipy CSR view of the buffers (scipy's CSR/CSC kernels measured 2-3x
        faster than torch's CPU sparse-dense product here); cached per dtype."""
        cache = self.__dict__.setdefault("_scipy_cache", {})
        val = self._adj_val
        key = (dtype, val.data_ptr())
        if key not in cache:
            np_dtype = np.float64 if dtype == torch.float64 else np.float32
            cache[key] = sp.csr_matrix(
                (val.numpy().astype(np_dtype, copy=False), self._adj_col.numpy(), self._adj_crow.numpy()),
                shape=self._shape,
            )
        return cache[key]

    def _torch_matrix(self, transpose: bool, dtype: torch.dtype) -> Tensor:
        """torch CSR of ``A^T`` (``transpose=True``: the buffers) or of ``A`` (its transpose,
        made once per device and dtype by a stable sort of the entries by sinogram index,
        then cached)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            if transpose:
                val = self._adj_val.to(dtype)
                return torch.sparse_csr_tensor(self._adj_crow, self._adj_col, val, size=self._shape, check_invariants=False)
            cache = self.__dict__.setdefault("_fwd_cache", {})
            key = (dtype, self._adj_val.device, self._adj_val.data_ptr())
            if key not in cache:
                cache.clear()
                crow, col = self._adj_crow, self._adj_col
                n_pix, n_sino = self._shape
                order = torch.argsort(col, stable=True)  # entries are in pixel order: stays so per row
                pixel = torch.repeat_interleave(torch.arange(n_pix, device=col.device), (crow[1:] - crow[:-1]).long())
                fwd_crow = torch.zeros(n_sino + 1, dtype=torch.int64, device=col.device)
                fwd_crow[1:] = torch.cumsum(torch.bincount(col.long(), minlength=n_sino), 0)
                cache[key] = torch.sparse_csr_tensor(
                    fwd_crow.to(crow.dtype), pixel[order].to(crow.dtype), self._adj_val[order].to(dtype),
                    size=(n_sino, n_pix), check_invariants=False,
                )
            return cache[key]

    def _spmm(self, x2d: Tensor, transpose: bool) -> Tensor:
        """``A^T @ x2d`` (``transpose=True``, rows of ``x2d`` view-major) or ``A @ x2d``."""
        if x2d.device.type == "cpu" and x2d.dtype in (torch.float32, torch.float64):
            mat = self._scipy_adjoint(x2d.dtype)
            out = (mat if transpose else mat.T) @ x2d.detach().numpy()
            return torch.from_numpy(np.ascontiguousarray(out, dtype=out.dtype))
        return torch.sparse.mm(self._torch_matrix(transpose, x2d.dtype), x2d)

    def nnz(self) -> int:
        """Number of non-zeros of the system matrix."""
        return int(self._adj_val.numel())

    def A(self, x: Tensor, **kwargs) -> Tensor:
        r"""Forward projection :math:`y = A x`: ``(B, C, H, W) -> (B, C, n_detectors, n_views)``."""
        B, C, H, W = x.shape
        if (H, W) != (self.H, self.W):
            raise ValueError(f"{type(self).__name__}.A: expected images of size {(self.H, self.W)}, got {(H, W)}")
        x2d = x.reshape(B * C, H * W).t().contiguous()
        y2d = _SparseProject.apply(x2d, self, False)  # (n_views * n_det, B * C), view-major
        return y2d.reshape(self.n_views, self.n_detectors, B * C).permute(2, 1, 0).reshape(
            B, C, self.n_detectors, self.n_views
        )

    def A_adjoint(self, y: Tensor, **kwargs) -> Tensor:
        r"""Exact transpose (back-projection) :math:`A^\top y`: ``(B, C, n_det, n_views) -> (B, C, H, W)``."""
        B, C = y.shape[:2]
        if tuple(y.shape[2:]) != (self.n_detectors, self.n_views):
            raise ValueError(
                f"{type(self).__name__}.A_adjoint: expected sinograms of size "
                f"{(self.n_detectors, self.n_views)}, got {tuple(y.shape[2:])}"
            )
        y2d = y.reshape(B * C, self.n_detectors, self.n_views).permute(2, 1, 0).reshape(-1, B * C)
        x2d = _SparseProject.apply(y2d.contiguous(), self, True)
        return x2d.t().reshape(B, C, self.H, self.W)

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    # -- filtered back-projection --------------------------------------------------
    def _filter_sinogram(self, p, spacing: float):
        """Ramp-filter each view along the detector axis. ``p``: (N, n_views, n_det), a
        tensor or (CPU) a numpy array; the result is of the same kind."""
        n_pad = max(64, 1 << int(math.ceil(math.log2(2 * self.n_detectors))))
        cache = self.__dict__.setdefault("_ramp_cache", {})
        is_numpy = isinstance(p, np.ndarray)
        if is_numpy:
            device, dtype = "cpu", torch.float64 if p.dtype == np.float64 else torch.float32
        else:
            device, dtype = p.device, p.dtype
        key = (n_pad, spacing, self.fbp_filter, device, dtype)
        if key not in cache:
            cache[key] = ramp_filter(n_pad, spacing, self.fbp_filter).to(device, dtype)
        response = cache[key]
        if is_numpy or (p.device.type == "cpu" and not p.requires_grad):
            # scipy.fft: torch's CPU FFT was measured 100x slower with 2 threads on small
            # batched transforms (thread-pool overhead); results are identical
            a = p if is_numpy else p.numpy()
            spectrum = scipy.fft.rfft(a, n=n_pad, axis=-1) * response.numpy()
            out = np.ascontiguousarray(scipy.fft.irfft(spectrum, n=n_pad, axis=-1)[..., : self.n_detectors], dtype=a.dtype)
            return out if is_numpy else torch.from_numpy(out)
        spectrum = torch.fft.rfft(p, n=n_pad, dim=-1) * response
        return torch.fft.irfft(spectrum, n=n_pad, dim=-1)[..., : self.n_detectors]

    def _view_weights(self) -> np.ndarray:
        """Quadrature weight (radians) of each view: half the gap to its neighbours."""
        period = self._angular_period
        theta = np.deg2rad(self.angles_deg)
        if self.n_views == 1:
            return np.array([math.radians(period)])
        order = np.argsort(theta % math.radians(period))
        t = theta[order] % math.radians(period)
        gaps = np.diff(t)
        step = np.median(gaps) if gaps.size else math.radians(period)
        # a view's weight: half the gap on each side; open ends get half a typical step
        full = math.isclose(t[-1] - t[0] + step, math.radians(period), rel_tol=1e-3)
        left = np.concatenate([[(t[0] + math.radians(period) - t[-1]) if full else step], gaps])
        right = np.concatenate([gaps, [(t[0] + math.radians(period) - t[-1]) if full else step]])
        w = np.empty(self.n_views)
        w[order] = 0.5 * (left + right)
        return w

    def _fbp_coordinates(self, views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per (view, pixel), shape ``(len(views), H * W)``: detector position ``u`` of the
        pixel and its FBP weight (float64 numpy). The reference of the fast path
        (:meth:`_fbp_view_factors`, :meth:`_fbp_chunk`) that :meth:`A_dagger` uses."""
        x, y = self._pixel_coordinates()
        beta = np.deg2rad(self.angles_deg[views])[:, None]
        u, weight = self._fbp_geometry(x[None], y[None], np.cos(beta), np.sin(beta), self._view_weights()[views][:, None])
        return u, np.broadcast_to(weight, u.shape)

    def _fbp_geometry(self, x, y, c, s, w):
        """``(u, weight)`` from pixel coordinates ``x, y``, a view's ``cos, sin`` and its
        quadrature weight ``w``, all broadcastable (numpy arrays or torch tensors)."""
        raise NotImplementedError

    def _fbp_view_factors(self) -> np.ndarray:
        """Per view, the factor of the FBP weight that does not depend on the pixel
        (folded into the interpolation tables)."""
        raise NotImplementedError

    def _fbp_vectors(self, stride: int, float_dtype) -> dict:
        """Per-view separable pieces of the pixels' detector positions (numpy arrays of
        shape ``(V, 1, W)`` or ``(V, H, 1)``; integer arrays become the loop's index type)
        and flags, for :meth:`_fbp_chunk`; cached."""
        raise NotImplementedError

    def _fbp_chunk(self, ops: _FBPOps, vec: dict, views: slice, rows: slice):
        """Interpolation of views ``views`` at the pixels of image rows ``rows``, flattened
        (view, pixel): ``(idx, f, weight)``. The pixel's value from view ``v`` is
        ``(T_A[idx] + f T_B[idx]) * weight`` (``weight=None``: 1) with the tables of
        :meth:`_fbp_tables` (their views scaled by :meth:`_fbp_view_factors`):
        ``idx = 2 (v * stride + b + 3) + c`` for the detector segment ``[b + c, b + c + 1]``
        holding the pixel's position, ``c`` in ``{0, 1}``, ``f`` that position minus ``b``;
        bins beyond the zero padding are clamped to it. Implemented by subclasses."""
        raise NotImplementedError

    @staticmethod
    def _fbp_tables(q, ops: _FBPOps):
        """Interpolation tables of filtered views ``q`` (N, V, K): for bin ``b`` in
        ``[-3, K]`` (zero padding outside the detector) and carry ``c`` in ``{0, 1}``, the
        linear interpolant on segment ``[b + c, b + c + 1]`` at offset ``f`` from ``b`` is
        ``A + f B`` with ``B = q[b+c+1] - q[b+c]``, ``A = q[b+c] - c B``. Returns
        ``(T_A, T_B, stride)``, tables of shape ``(N, V * stride * 2)``, ``stride = K + 4``."""
        N, V, K = q.shape
        stride = K + 4
        qp = ops.zeros((N, V, K + 6))  # index r <-> detector bin r - 3
        qp[..., 3 : K + 3] = q
        d = qp[..., 1:] - qp[..., :-1]
        b1 = d[..., 1 : stride + 1]
        ta = ops.xp.stack((qp[..., :stride], qp[..., 1 : stride + 1] - b1), -1).reshape(N, -1)
        tb = ops.xp.stack((d[..., :stride], b1), -1).reshape(N, -1)
        return ta, tb, stride

    _fbp_numpy_on_cpu = True  # False: the torch loop on CPU too (tests)
    _fbp_block = (1 << 18, 1 << 15)  # (view, pixel) pairs per chunk: torch, numpy

    def _fbp(self, y: Tensor, detector_weight: np.ndarray | None = None) -> Tensor:
        """FBP of sinograms ``y`` (B, C, n_det, n_views): optional weight per detector bin,
        ramp filter, :meth:`_backproject_interp`. On CPU without autograd all of it runs
        in numpy/scipy, single-threaded: on a busy machine torch's thread pool stalls small
        operations at its barriers (measured 2-3x slower with 2 threads)."""
        B, C = y.shape[:2]
        N, K, V = B * C, self.n_detectors, self.n_views
        grad = torch.is_grad_enabled() and y.requires_grad
        use_numpy = (
            self._fbp_numpy_on_cpu and y.device.type == "cpu" and not grad and y.dtype in (torch.float32, torch.float64)
        )
        ops = _FBPOps(y, use_numpy, reuse=not grad, big_index=2 * V * (K + 4) >= 2**31)
        p = (y.detach().numpy() if use_numpy else y).reshape(N, K, V).swapaxes(1, 2)  # (N, V, K)
        factors = ops.float_array(self._fbp_view_factors()[:, None])
        if detector_weight is not None:
            p = p * ops.float_array(detector_weight)
        q = self._filter_sinogram(p, self.detector_spacing) * factors
        x = self._backproject_interp(q, ops)
        return (torch.from_numpy(x) if use_numpy else x).reshape(B, C, self.H, self.W)

    def _backproject_interp(self, q, ops: _FBPOps):
        """FBP back-projection ``(N, n_views, n_det) -> (N, H * W)`` of filtered views
        already scaled by :meth:`_fbp_view_factors`: linear interpolation of each view at
        the pixel's detector position times the pixel part of the FBP weight; in all,
        ``sum_v weight (1 - frac) q[v, i0] + weight frac q[v, i0 + 1]`` with ``(u, weight)``
        of :meth:`_fbp_coordinates` and ``i0 + frac`` the position of ``u`` in bins.
        Computed on the fly, a chunk at a time (gathers from small per-call tables; no
        matrix, nothing built in advance). ``q`` and the result: numpy arrays or tensors,
        as ``ops``."""
        N, V, _ = q.shape
        H, W = self.H, self.W
        ta, tb, stride = self._fbp_tables(q, ops)
        cache = self.__dict__.setdefault("_fbp_cache", {})
        key = (ops.numpy, ops.device, ops.float, stride)
        if key not in cache:
            cache.clear()
            vec = self._fbp_vectors(stride, ops.np_float)
            cache[key] = {k: ops.asarray(v) if isinstance(v, np.ndarray) else v for k, v in vec.items()}
        vec = cache[key]
        grad = not ops.reuse
        out = [None] * N if grad else ops.zeros((N, H * W))
        block = self._fbp_block[int(ops.numpy)]
        n_views = max(1, block // (H * W))
        n_rows = H if (n_views > 1 or not ops.numpy) else max(1, block // W)
        for v0 in range(0, V, n_views):
            views = slice(v0, min(v0 + n_views, V))
            n = views.stop - views.start
            for r0 in range(0, H, n_rows):
                rows = slice(r0, min(r0 + n_rows, H))
                idx, f, weight = self._fbp_chunk(ops, vec, views, rows)
                for i in range(N):
                    ga, gb = ops.take(ta[i], idx, "ga"), ops.take(tb[i], idx, "gb")
                    if grad:  # out-of-place, differentiable in q
                        val = torch.addcmul(ga, f, gb)
                        val = (val if weight is None else val * weight).reshape(n, -1).sum(0)
                        out[i] = val if out[i] is None else out[i] + val
                    else:
                        ops.accumulate(out[i, rows.start * W : rows.stop * W], ga, gb, f, weight, n)
        return torch.stack(out) if grad else out


class _FBPOps:
    """The few array operations of the FBP loop, on numpy or on torch tensors, with
    scratch arrays reused between chunks (``reuse``; not under autograd, which keeps them)."""

    def __init__(self, like: Tensor, use_numpy: bool, reuse: bool, big_index: bool):
        self.numpy, self.reuse, self.device = use_numpy, reuse, like.device
        self.np_float = np.float64 if like.dtype == torch.float64 else np.float32
        self.xp = np if use_numpy else torch
        if use_numpy:
            self.float, self.f64, self.index = self.np_float, np.float64, np.intp
        else:
            self.float, self.f64 = like.dtype, torch.float64
            self.index = torch.int64 if big_index else torch.int32
        self.store = {}

    def float_array(self, a: np.ndarray):
        """``a`` in the working precision."""
        return a.astype(self.float) if self.numpy else torch.as_tensor(a, dtype=self.float, device=self.device)

    def zeros(self, shape: tuple[int, ...]):
        if self.numpy:
            return np.zeros(shape, self.float)
        return torch.zeros(shape, dtype=self.float, device=self.device)

    def asarray(self, a: np.ndarray):
        if np.issubdtype(a.dtype, np.integer):
            return a.astype(self.index) if self.numpy else torch.as_tensor(a, dtype=self.index, device=self.device)
        return a if self.numpy else torch.as_tensor(a, device=self.device)

    def empty(self, name: str, shape: tuple[int, ...], dtype):
        numel = math.prod(shape)
        t = self.store.get(name) if self.reuse else None
        if t is None or t.shape[0] < numel or t.dtype != dtype:
            t = np.empty(numel, dtype) if self.numpy else torch.empty(numel, dtype=dtype, device=self.device)
            if self.reuse:
                self.store[name] = t
        return t[:numel].reshape(shape)

    def cast(self, src, name: str, dtype):
        """``src`` converted to ``dtype`` (truncating towards zero for integers)."""
        dst = self.empty(name, tuple(src.shape), dtype)
        if self.numpy:
            np.copyto(dst, src, casting="unsafe")
            return dst
        return dst.copy_(src)

    def clip(self, a, lo, hi):
        return np.clip(a, lo, hi, out=a) if self.numpy else torch.clamp(a, lo, hi, out=a)

    def take(self, table, idx, name: str):
        if self.numpy:  # mode="clip": no bounds-check buffering (indices are in range)
            return np.take(table, idx, out=self.empty(name, idx.shape, self.float), mode="clip")
        if not self.reuse:
            return table.index_select(0, idx)
        return torch.index_select(table, 0, idx, out=self.empty(name, tuple(idx.shape), self.float))

    def accumulate(self, out, ga, gb, f, weight, n: int) -> None:
        """``out += sum over the chunk's views of (ga + f gb) * weight``; clobbers ``ga, gb``."""
        if self.numpy:
            gb *= f
            if weight is None and n == 1:
                out += ga
                out += gb
                return
            ga += gb
        else:
            if weight is None and n == 1:
                out.add_(ga).addcmul_(f, gb)
                return
            ga.addcmul_(f, gb)
        if weight is not None:
            ga *= weight
        out += ga.reshape(n, -1).sum(0) if n > 1 else ga


# --------------------------------------------------------------------------- parallel beam
class ParallelBeamCT(_ProjectionCT):
    r"""2D parallel-beam CT (Radon transform) with an exact sparse transpose and FBP.

    .. math::

        y(t_k, \theta_v) = \frac{1}{\Delta t}\int_{t_k-\Delta t/2}^{t_k+\Delta t/2}
        \int_{\mathbb{R}} x(s\,\boldsymbol{\theta}^\perp + t\,\boldsymbol{\theta})\, ds\, dt,
        \qquad \boldsymbol{\theta} = (\cos\theta_v, \sin\theta_v),

    for the pixel-basis image :math:`x` (unit square pixels), computed exactly (see the
    module docstring). Detector bins :math:`t_k = (k - (n_\text{det}-1)/2)\,\Delta t`.
    ``A_dagger`` is filtered back-projection

    .. math::

        x^\text{FBP}(\mathbf{r}) = \sum_v w_v\, (h * y_{\theta_v})(\mathbf{r}\cdot\boldsymbol{\theta}_v)

    with the ramp filter :math:`h` (:func:`ramp_filter`, optionally windowed), linear
    interpolation, and :math:`w_v` the angular spacing of view :math:`v` (:math:`\pi/n`
    for :math:`n` views uniform over :math:`[0, \pi)`); for limited-angle scans it is the
    exact FBP of the measured wedge, which is biased (missing wedge).

    Sign conventions follow :func:`skimage.transform.radon`: ``radon(img, angles).T``
    is comparable to ``A(img)[0, 0].T`` for odd square images and ``circle=True``.

    :param tuple img_size: ``(C, H, W)``; any size >= 4, odd or non-square. ``C`` channels
        are projected independently.
    :param angles_deg: view angles in degrees.
    :param int n_detectors: number of detector bins; default covers the image diagonal,
        ``ceil(2 r + sqrt(2))`` where ``r`` is the distance from the centre to the centre
        of a corner pixel.
    :param float detector_spacing: bin width in pixel units (default 1).
    :param str fbp_filter: ``"ramp"`` (default), ``"shepp-logan"``, ``"cosine"`` or ``"hann"``.
    :param device: torch device of the matrices.

    |sep|

    :Examples:

        >>> import torch, numpy as np
        >>> from invdiff.operators import ParallelBeamCT
        >>> physics = ParallelBeamCT((1, 64, 64), np.linspace(0, 180, 90, endpoint=False))
        >>> x = torch.zeros(1, 1, 64, 64); x[..., 20:44, 20:44] = 1.0
        >>> y = physics.A(x)
        >>> y.shape
        torch.Size([1, 1, 91, 90])
        >>> x_fbp = physics.A_dagger(y)
        >>> bool((x_fbp - x).abs().mean() < 0.05)
        True
    """

    _angular_period = 180.0

    def __init__(
        self,
        img_size: tuple[int, int, int],
        angles_deg: Sequence[float] | np.ndarray | Tensor,
        n_detectors: int | None = None,
        detector_spacing: float = 1.0,
        fbp_filter: str = "ramp",
        device: torch.device | str = "cpu",
        **kwargs,
    ):
        _, H, W = _check_size(img_size, "ParallelBeamCT")
        if n_detectors is None:
            n_detectors = self.default_n_detectors(H, W, detector_spacing)
        if isinstance(angles_deg, Tensor):
            angles_deg = angles_deg.detach().cpu().numpy()
        super().__init__(img_size, angles_deg, n_detectors, detector_spacing, fbp_filter, device, **kwargs)

    @staticmethod
    def default_n_detectors(H: int, W: int, detector_spacing: float = 1.0) -> int:
        """Bins needed to see every pixel's full footprint at every angle."""
        r = math.hypot((H - 1) / 2.0, (W - 1) / 2.0)
        return int(math.ceil((2.0 * r + math.sqrt(2.0)) / detector_spacing - 1e-9))

    def _footprints(self, x, y):
        theta = np.deg2rad(self.angles_deg)[None]
        c, s = np.cos(theta), np.sin(theta)
        u = x[:, None] * c + y[:, None] * s
        return u, np.abs(c), np.abs(s), 1.0

    def _max_half_footprint(self) -> float:
        theta = np.deg2rad(self.angles_deg)
        return float(np.max(np.maximum(np.abs(np.cos(theta)), 1e-9) + np.maximum(np.abs(np.sin(theta)), 1e-9))) / 2.0

    def _fbp_geometry(self, x, y, c, s, w):
        return x * c + y * s, w

    def _fbp_view_factors(self) -> np.ndarray:
        return self._view_weights()

    def _fbp_vectors(self, stride, float_dtype):
        r"""The pixel's position in bins, :math:`(x_j \cos\theta - t_0)/\Delta t +
        y_i \sin\theta / \Delta t`, split per view into integer and fractional parts of its
        two terms (float64 on the ``W`` and ``H`` vectors), so that per pixel only
        ``f = f_j + f_i`` in ``[0, 2)``, the carry ``c = floor(f)`` and ``b = b_j + b_i``
        remain: exact but for the rounding of ``f`` in the working precision."""
        K, du = self.n_detectors, self.detector_spacing
        theta = np.deg2rad(self.angles_deg)[:, None]
        xs = np.arange(self.W, dtype=np.float64) - (self.W - 1) / 2.0
        ys = (self.H - 1) / 2.0 - np.arange(self.H, dtype=np.float64)
        parts = []
        for t in ((xs[None] * np.cos(theta) + (K - 1) / 2.0 * du) / du, ys[None] * np.sin(theta) / du):
            whole = np.floor(t)
            frac = (t - whole).astype(float_dtype)
            wrap = frac >= 1.0  # rounded up to 1: carry it over, so that f < 2
            frac[wrap] = 0.0
            parts += [(whole + wrap).astype(np.int64), frac]
        (bx, fx), (by, fy) = parts[:2], parts[2:]
        lo, hi = bx.min(1) + by.min(1), bx.max(1) + by.max(1)
        offset = (np.arange(self.n_views, dtype=np.int64) * stride + 3)[:, None]
        return {
            "fx": fx[:, None, :], "fy": fy[:, :, None], "bx": 2 * bx[:, None, :], "by": (2 * (by + offset))[:, :, None],
            "clamp": bool(lo.min() < -3 or hi.max() > K),
            "lo": (2 * offset - 6)[:, :, None], "hi": (2 * (offset + K))[:, :, None],
        }

    def _fbp_chunk(self, ops, vec, views, rows):
        xp = ops.xp
        shape = (views.stop - views.start, rows.stop - rows.start, self.W)
        f = xp.add(vec["fx"][views], vec["fy"][views, rows], out=ops.empty("f", shape, ops.float))  # in [0, 2)
        idx = xp.add(vec["bx"][views], vec["by"][views, rows], out=ops.empty("idx", shape, ops.index))
        if vec["clamp"]:  # bins beyond the zero padding read zeros
            idx = ops.clip(idx, vec["lo"][views], vec["hi"][views])
        idx += ops.cast(f, "carry", ops.index)  # floor(f) = trunc(f) as f >= 0
        return idx.reshape(-1), f.reshape(-1), None

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        r"""Filtered back-projection (closed form, milliseconds); see the class docstring."""
        return self._fbp(y)


# --------------------------------------------------------------------------- fan beam
class FanBeamCT(_ProjectionCT):
    r"""2D fan-beam CT with a flat detector, exact sparse transpose and weighted FBP.

    The source turns on a circle of radius :math:`D` = ``source_distance`` around the
    image centre; the flat detector is at ``detector_distance`` :math:`D_d` beyond the
    centre, with ``n_detectors`` bins of width ``detector_spacing`` (physical units,
    pixels), magnification :math:`M = (D + D_d)/D`. For source angle :math:`\beta` the
    source sits at :math:`D(\cos\beta, \sin\beta)` and a pixel at :math:`\mathbf{r}` is
    seen on the virtual detector through the centre at

    .. math::

        u(\mathbf{r}, \beta) = \frac{D\, \mathbf{r}\cdot\mathbf{e}_t}{D - \mathbf{r}\cdot\mathbf{e}_s},
        \quad \mathbf{e}_s = (\cos\beta, \sin\beta),\ \mathbf{e}_t = (-\sin\beta, \cos\beta),

    and :math:`y(u_k, \beta_v)` is the bin-averaged line integral along the rays from the
    source through bin :math:`u_k` (pixel units, as for :class:`ParallelBeamCT`).
    ``A_dagger`` is the FBP for equally spaced collinear detectors (Kak & Slaney §3.4.2):

    .. math::

        x^\text{FBP}(\mathbf{r}) = \sum_v \frac{w_v}{U^2}\,
        \Big(\tfrac{1}{2} h * \big[\tfrac{D}{\sqrt{D^2 + u^2}}\, y_{\beta_v}\big]\Big)(u(\mathbf{r}, \beta_v)),
        \qquad U = \frac{D - \mathbf{r}\cdot\mathbf{e}_s}{D},

    exact (up to discretisation) for a full 360° scan; for shorter scans no Parker
    weights are applied (biased reconstruction).

    :param tuple img_size: ``(C, H, W)``.
    :param angles_deg: source angles in degrees (a full scan: uniform over ``[0, 360)``).
    :param float source_distance: source-to-centre distance in pixels; default twice the
        image diagonal.
    :param float detector_distance: centre-to-detector distance in pixels; default the
        image diagonal.
    :param int n_detectors: number of bins; default covers the fan through the image's
        circumscribed circle.
    :param float detector_spacing: physical bin width; default :math:`M` (one pixel on
        the virtual detector through the centre).
    :param str fbp_filter: ramp window, see :func:`ramp_filter`.

    |sep|

    :Examples:

        >>> import torch, numpy as np
        >>> from invdiff.operators import FanBeamCT
        >>> physics = FanBeamCT((1, 64, 64), np.linspace(0, 360, 180, endpoint=False))
        >>> x = torch.zeros(1, 1, 64, 64); x[..., 20:44, 20:44] = 1.0
        >>> x_fbp = physics.A_dagger(physics.A(x))
        >>> bool((x_fbp - x).abs().mean() < 0.05)
        True
    """

    _angular_period = 360.0

    def __init__(
        self,
        img_size: tuple[int, int, int],
        angles_deg: Sequence[float] | np.ndarray | Tensor,
        source_distance: float | None = None,
        detector_distance: float | None = None,
        n_detectors: int | None = None,
        detector_spacing: float | None = None,
        fbp_filter: str = "ramp",
        device: torch.device | str = "cpu",
        **kwargs,
    ):
        _, H, W = _check_size(img_size, "FanBeamCT")
        diagonal = math.hypot(H, W)
        self.source_distance = float(2.0 * diagonal if source_distance is None else source_distance)
        self.detector_distance = float(diagonal if detector_distance is None else detector_distance)
        if self.source_distance <= diagonal / 2.0 + 1.0:
            raise ValueError(
                f"FanBeamCT: source_distance {self.source_distance} must exceed half the image diagonal "
                f"({diagonal / 2:.1f}) + 1 pixel"
            )
        if self.detector_distance < 0:
            raise ValueError(f"FanBeamCT: detector_distance must be >= 0, got {self.detector_distance}")
        self.magnification = (self.source_distance + self.detector_distance) / self.source_distance
        if detector_spacing is None:
            detector_spacing = self.magnification
        self.physical_detector_spacing = float(detector_spacing)
        virtual_spacing = float(detector_spacing) / self.magnification
        if n_detectors is None:
            radius = diagonal / 2.0 + 1.0
            D = self.source_distance
            u_max = D * radius / math.sqrt(D**2 - radius**2)
            n_detectors = 2 * int(math.ceil(u_max / virtual_spacing)) + 1
        if isinstance(angles_deg, Tensor):
            angles_deg = angles_deg.detach().cpu().numpy()
        # internally everything lives on the virtual detector through the centre
        super().__init__(img_size, angles_deg, n_detectors, virtual_spacing, fbp_filter, device, **kwargs)

    def _geometry(self, x, y, c, s):
        """Broadcast pixel coordinates ``x, y`` with source directions ``(c, s)``."""
        along = x * c + y * s  # towards the source
        across = -x * s + y * c  # along the detector
        L = self.source_distance - along  # source-to-pixel distance along the central ray
        return along, across, L

    def _footprints(self, x, y):
        beta = np.deg2rad(self.angles_deg)[None]
        c, s = np.cos(beta), np.sin(beta)
        _, across, L = self._geometry(x[:, None], y[:, None], c, s)
        D = self.source_distance
        u = D * across / L
        # ray direction source -> pixel, in image coordinates
        dx = -L * c - across * s
        dy = -L * s + across * c
        norm = np.hypot(dx, dy)
        # magnification of perpendicular lengths at the pixel onto the virtual detector
        m = D * norm / L**2
        a = np.abs(dx) / norm * m
        b = np.abs(dy) / norm * m
        return u, a, b, m

    def _max_half_footprint(self) -> float:
        # a + b <= sqrt(2) m and m = (D / L) sqrt(1 + (across / L)^2), with L >= D - r, |across| <= r
        D = self.source_distance
        r = math.hypot((self.H - 1) / 2.0, (self.W - 1) / 2.0)
        m = D / (D - r) * math.sqrt(1.0 + (r / (D - r)) ** 2)
        return (math.sqrt(2.0) * m * (1.0 + 1e-9) + 2e-9) / 2.0

    def _fbp_geometry(self, x, y, c, s, w):
        _, across, L = self._geometry(x, y, c, s)
        D = self.source_distance
        U = L / D
        u = D * across / L
        return u, w / U**2

    def _fbp_view_factors(self) -> np.ndarray:
        return 0.5 * self._view_weights()  # the 1/2 of the fan-beam filter

    def _fbp_vectors(self, stride, float_dtype):
        r"""The pixel's position in bins is ``P / U`` with ``U = (D - x cos - y sin) / D`` and
        ``P = (y cos - x sin) / du + c_0 U``, ``c_0 = (n_det - 1) / 2``: both sums of a
        column and a row term (float64), so per pixel two adds, a division and a floor
        (float64), and the weight ``1 / U^2``."""
        K = self.n_detectors
        D, du, c0 = self.source_distance, self.detector_spacing, (K - 1) / 2.0
        beta = np.deg2rad(self.angles_deg)[:, None]
        c, s = np.cos(beta), np.sin(beta)
        xs = (np.arange(self.W, dtype=np.float64) - (self.W - 1) / 2.0)[None]
        ys = ((self.H - 1) / 2.0 - np.arange(self.H, dtype=np.float64))[None]
        # |u| <= D r / sqrt(D^2 - r^2) over the image: no clamping needed when inside the padding
        r = math.hypot((self.H - 1) / 2.0, (self.W - 1) / 2.0)
        reach = D * r / math.sqrt(D**2 - r**2) / du + 1e-6
        return {
            "px": (-xs * s / du + c0 * (1.0 - xs * c / D))[:, None, :],
            "py": (ys * c / du - c0 * ys * s / D)[:, :, None],
            "lx": (1.0 - xs * c / D)[:, None, :],
            "ly": (-ys * s / D)[:, :, None],
            "offset": (2.0 * (np.arange(self.n_views) * stride + 3))[:, None, None],
            "clamp": bool(c0 - reach < -3 or c0 + reach >= K + 1),
        }

    def _fbp_chunk(self, ops, vec, views, rows):
        xp = ops.xp
        shape = (views.stop - views.start, rows.stop - rows.start, self.W)
        pos = xp.add(vec["px"][views], vec["py"][views, rows], out=ops.empty("pos", shape, ops.f64))
        U = xp.add(vec["lx"][views], vec["ly"][views, rows], out=ops.empty("U", shape, ops.f64))
        pos /= U
        weight = ops.cast(U, "weight", ops.float)
        xp.reciprocal(weight, out=weight)
        xp.square(weight, out=weight)
        b = xp.floor(pos, out=U)
        pos -= b
        f = ops.cast(pos, "f", ops.float)
        if vec["clamp"]:  # bins beyond the zero padding read zeros
            b = ops.clip(b, -3, self.n_detectors)
        b *= 2
        b += vec["offset"][views]
        idx = ops.cast(b, "idx", ops.index)
        return idx.reshape(-1), f.reshape(-1), weight.reshape(-1)

    def A_dagger(self, y: Tensor, **kwargs) -> Tensor:
        r"""Weighted (flat-detector) fan-beam FBP, closed form; see the class docstring."""
        D = self.source_distance
        return self._fbp(y, D / np.sqrt(D**2 + self._detector_positions**2))
