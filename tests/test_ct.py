"""CT operators: exact adjoint, FBP quality on Shepp-Logan, agreement with skimage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import radon, resize

from invdiff.operators import FanBeamCT, ParallelBeamCT, make


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / np.mean((a - b) ** 2)))


@pytest.fixture(scope="module")
def phantom128():
    return resize(shepp_logan_phantom(), (128, 128), anti_aliasing=True)


def fbp_psnr(physics, phantom):
    x = torch.from_numpy(phantom).float()[None, None]
    x_fbp = physics.A_dagger(physics.A(x))[0, 0].clamp(0, 1).numpy()
    return psnr(x_fbp, phantom)


@pytest.mark.parametrize("cls", [ParallelBeamCT, FanBeamCT])
@pytest.mark.parametrize("size", [(1, 37, 31), (2, 20, 33)])
def test_exact_adjoint_float64_and_float32(cls, size):
    g = torch.Generator().manual_seed(0)
    period = 180 if cls is ParallelBeamCT else 360
    physics = cls(size, np.linspace(0, period, 23, endpoint=False) + 0.3)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = torch.randn((3,) + size, generator=g, dtype=dtype)
        y = torch.randn(physics.A(x).shape, generator=g, dtype=dtype)
        lhs, rhs = (physics.A(x) * y).sum(), (x * physics.A_adjoint(y)).sum()
        assert abs(lhs - rhs) / abs(lhs) < tol


def test_constant_image_gives_chord_lengths():
    # a 41x41 square of ones: at 0 degrees each detector bin over it integrates 41 pixels
    physics = ParallelBeamCT((1, 41, 41), [0.0, 90.0], n_detectors=41)
    y = physics.A(torch.ones(1, 1, 41, 41, dtype=torch.float64))
    assert torch.allclose(y, torch.full_like(y, 41.0))
    # at 45 degrees the total mass is preserved (sum over bins = sum of pixels)
    physics = ParallelBeamCT((1, 41, 41), [45.0])
    assert torch.isclose(physics.A(torch.ones(1, 1, 41, 41)).sum(), torch.tensor(41.0 * 41))


def test_forward_matches_skimage_radon():
    # odd size so skimage's rotation centre (n // 2) equals the geometric centre
    phantom = resize(shepp_logan_phantom(), (129, 129), anti_aliasing=True)
    theta = np.linspace(0, 180, 60, endpoint=False)
    physics = ParallelBeamCT((1, 129, 129), theta, n_detectors=129)
    ours = physics.A(torch.from_numpy(phantom)[None, None])[0, 0].numpy()
    ref = radon(phantom, theta, circle=True)
    rel = np.linalg.norm(ours - ref) / np.linalg.norm(ref)
    assert rel < 0.005  # measured 0.0018: ours integrates over the bin width, skimage samples


def test_fbp_parallel_180_views(phantom128):
    physics = ParallelBeamCT((1, 128, 128), np.linspace(0, 180, 180, endpoint=False))
    assert fbp_psnr(physics, phantom128) > 27.0  # measured 30.0 dB


def test_fbp_sparse_30_views_lower(phantom128):
    value = fbp_psnr(make("ct-sparse-30", (1, 128, 128)), phantom128)
    assert 18.0 < value < 27.0  # measured 23.6 dB (streaks)


def test_fbp_fan_beam_full_scan(phantom128):
    physics = make("ct-fan-360", (1, 128, 128))
    assert fbp_psnr(physics, phantom128) > 27.0  # measured 30.1 dB


def test_fbp_windows_change_result(phantom128):
    ramp = fbp_psnr(make("ct-sparse-90", (1, 64, 64)), resize(phantom128, (64, 64)))
    hann = fbp_psnr(make("ct-sparse-90", (1, 64, 64), fbp_filter="hann"), resize(phantom128, (64, 64)))
    assert ramp != hann and hann > 15


def test_limited_angle_geometry():
    physics = make("ct-limited-90", (1, 32, 32))
    assert physics.n_views == 90 and physics.angles_deg.max() == 89.0


def test_fan_defaults_documented():
    physics = make("ct-fan-90", (1, 30, 40))
    assert physics.source_distance == pytest.approx(2 * 50.0)
    assert physics.detector_distance == pytest.approx(50.0)


def test_channels_folded_into_batch():
    physics = ParallelBeamCT((3, 17, 19), np.linspace(0, 180, 9, endpoint=False))
    x = torch.rand(2, 3, 17, 19)
    y = physics.A(x)
    assert torch.allclose(y[1, 2], physics.A(x[1:2, 2:3])[0, 0])


# --------------------------------------------------------------------------- references
# The system matrix and the FBP as they were first written (COO triplets with the
# clipped-squares trapezoid CDF; FBP as an interpolation matrix), kept tiny, to check
# that the fast build (sorted CSR, view-major internally) and the matrix-free FBP
# compute the same thing.
def reference_geometry(physics, views):
    """Per (view, pixel): detector position u, trapezoid widths a, b and amplitude."""
    x, y = physics._pixel_coordinates()
    theta = np.deg2rad(physics.angles_deg[views])[:, None]
    c, s = np.cos(theta), np.sin(theta)
    if isinstance(physics, ParallelBeamCT):
        u = x[None] * c + y[None] * s
        return u, np.broadcast_to(np.abs(c), u.shape), np.broadcast_to(np.abs(s), u.shape), np.ones((1, 1))
    D = physics.source_distance
    along, across = x[None] * c + y[None] * s, -x[None] * s + y[None] * c
    L = D - along
    dx, dy = -L * c - across * s, -L * s + across * c
    norm = np.hypot(dx, dy)
    m = D * norm / L**2
    return D * across / L, np.abs(dx) / norm * m, np.abs(dy) / norm * m, m


def reference_matrix(physics) -> np.ndarray:
    """Dense system matrix, row k * n_views + v, column i * W + j."""
    from invdiff.operators.ct import _trapezoid_cdf

    K, V, du = physics.n_detectors, physics.n_views, physics.detector_spacing
    first = -(K - 1) / 2.0 * du
    M = np.zeros((K * V, physics.H * physics.W))
    pixel = np.arange(physics.H * physics.W)
    views = np.arange(V)
    u, a, b, amp = reference_geometry(physics, views)
    a, b = np.maximum(a, 1e-9), np.maximum(b, 1e-9)
    half = 0.5 * (a + b)
    k0 = np.floor((u - half - first) / du + 0.5)
    n_bins = int(np.ceil(2.0 * half.max() / du)) + 1
    lo = first + (k0 - 0.5) * du - u
    cdf = [_trapezoid_cdf(lo + m * du, a, b) for m in range(n_bins + 1)]
    for m in range(n_bins):
        k = k0.astype(int) + m
        w = (cdf[m + 1] - cdf[m]) * (amp / du)
        keep = (k >= 0) & (k < K) & (w > 1e-9)
        M[(k * V + views[:, None])[keep], np.broadcast_to(pixel, k.shape)[keep]] = w[keep]
    return M


def reference_fbp(physics, y: torch.Tensor) -> torch.Tensor:
    """FBP with the interpolation matrix built from ``_fbp_coordinates`` (float32 entries)."""
    K, V, du = physics.n_detectors, physics.n_views, physics.detector_spacing
    first = -(K - 1) / 2.0 * du
    u, weight = physics._fbp_coordinates(np.arange(V))  # (V, n_pix)
    pos = (u - first) / du
    i0 = np.floor(pos).astype(int)
    frac = pos - i0
    M = np.zeros((physics.H * physics.W, K * V))
    pixel = np.broadcast_to(np.arange(physics.H * physics.W), u.shape)
    for k, w in ((i0, 1.0 - frac), (i0 + 1, frac)):
        keep = (k >= 0) & (k < K)
        np.add.at(M, (pixel[keep], (k * V + np.arange(V)[:, None])[keep]), (w * weight)[keep])
    B, C = y.shape[:2]
    p = y.reshape(B * C, K, V).transpose(1, 2)
    if isinstance(physics, FanBeamCT):
        D = physics.source_distance
        t = torch.from_numpy(physics._detector_positions).to(y.dtype)
        p = p * (D / torch.sqrt(D**2 + t**2))
    q = physics._filter_sinogram(p.contiguous(), du) * (0.5 if isinstance(physics, FanBeamCT) else 1.0)
    q2d = q.permute(2, 1, 0).reshape(K * V, B * C).numpy()  # row k * V + v
    M = M.astype(np.float32).astype(q2d.dtype)
    return torch.from_numpy(M @ q2d).t().reshape(B, C, physics.H, physics.W)


GEOMETRIES = [
    (ParallelBeamCT, (1, 13, 11), np.linspace(0, 180, 7, endpoint=False) + 0.3, {}),
    (ParallelBeamCT, (1, 12, 12), [0.0, 45.0, 90.0, 135.0], {}),
    (ParallelBeamCT, (1, 16, 10), np.linspace(0, 180, 9, endpoint=False), {"n_detectors": 9, "detector_spacing": 1.3}),
    (ParallelBeamCT, (1, 10, 14), np.arange(0.0, 90.0, 11.0), {"detector_spacing": 0.6}),
    (FanBeamCT, (1, 13, 11), np.linspace(0, 360, 7, endpoint=False) + 0.3, {}),
    (FanBeamCT, (1, 14, 18), np.linspace(0, 360, 10, endpoint=False),
     {"n_detectors": 13, "source_distance": 20.0, "detector_spacing": 0.8}),
]


@pytest.mark.parametrize("cls,size,angles,kwargs", GEOMETRIES)
def test_system_matrix_equals_reference_entries(cls, size, angles, kwargs):
    physics = cls(size, angles, **kwargs)
    n_pix = size[1] * size[2]
    basis = torch.eye(n_pix, dtype=torch.float64).reshape(n_pix, 1, size[1], size[2])
    ours = physics.A(basis).reshape(n_pix, -1).t().numpy()  # (K * V, n_pix), row k * V + v
    ref = reference_matrix(physics)
    # identical up to float32 storage and the clipped-squares form's cancellation (~1e-7)
    assert np.abs(ours - ref).max() < 1e-6
    # the stored adjoint is sorted CSR, rows = pixels
    crow, col = physics._adj_crow.numpy(), physics._adj_col.numpy()
    assert crow[0] == 0 and crow[-1] == col.size and np.all(np.diff(crow) >= 0)
    for r in range(n_pix):
        assert np.all(np.diff(col[crow[r] : crow[r + 1]]) > 0)


@pytest.mark.parametrize("cls,size,angles,kwargs", GEOMETRIES)
def test_fbp_equals_interpolation_matrix_reference(cls, size, angles, kwargs):
    physics = cls(size, angles, **kwargs)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((2, 1) + tuple(size[1:]), generator=g, dtype=torch.float64)
    y = physics.A(x) + 0.1 * torch.randn(physics.A(x).shape, generator=g, dtype=torch.float64)
    for dtype, tol in ((torch.float64, 1e-6), (torch.float32, 1e-5)):
        ref = reference_fbp(physics, y.to(dtype))
        scale = ref.abs().max()
        assert (physics.A_dagger(y.to(dtype)) - ref).abs().max() < tol * scale
        physics._fbp_numpy_on_cpu = False  # the torch loop (other devices, autograd)
        assert (physics.A_dagger(y.to(dtype)) - ref).abs().max() < tol * scale
        del physics._fbp_numpy_on_cpu


def test_fbp_matrix_free_at_clinical_size_matches_reference_rows():
    # 512x512, 90 views: no matrix is built; a few image rows checked against the reference
    physics = make("ct-limited-90", (1, 512, 512))
    assert not any(name.startswith("_fbp_") and name.endswith(("_val", "_col")) for name, _ in physics.named_buffers())
    x = torch.rand(1, 1, 512, 512, generator=torch.Generator().manual_seed(2))
    y = physics.A(x)
    ours = physics.A_dagger(y)[0, 0]
    cached = sum(v.size for v in physics._fbp_cache[next(iter(physics._fbp_cache))].values() if isinstance(v, np.ndarray))
    assert cached < 4 * physics.n_views * (512 + 512)  # per-view vectors only
    K, V, du = physics.n_detectors, physics.n_views, physics.detector_spacing
    q = physics._filter_sinogram(y.reshape(1, K, V).transpose(1, 2).contiguous(), du)[0].double().numpy()
    u, weight = physics._fbp_coordinates(np.arange(V))
    rows = [0, 100, 255, 511]
    pix = np.concatenate([np.arange(r * 512, (r + 1) * 512) for r in rows])
    pos = (u[:, pix] + (K - 1) / 2.0 * du) / du
    i0 = np.floor(pos).astype(int)
    frac = pos - i0
    vv = np.arange(V)[:, None]
    ref = (weight[:, pix] * ((1 - frac) * q[vv, i0] + frac * q[vv, i0 + 1])).sum(0)
    got = ours.reshape(-1)[pix].double().numpy()
    assert np.abs(got - ref).max() < 1e-5 * np.abs(ref).max()


@pytest.mark.parametrize("cls", [ParallelBeamCT, FanBeamCT])
def test_fbp_autograd_is_its_transpose(cls):
    period = 180 if cls is ParallelBeamCT else 360
    physics = cls((2, 15, 17), np.linspace(0, period, 11, endpoint=False))
    g = torch.Generator().manual_seed(3)
    y = torch.randn(physics.A(torch.zeros(1, 2, 15, 17)).shape, generator=g, dtype=torch.float64)
    yg = y.clone().requires_grad_(True)
    out = physics.A_dagger(yg)
    assert torch.allclose(out, physics.A_dagger(y), atol=1e-10)
    w = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (out * w).sum().backward()
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    assert torch.isclose((w * physics.A_dagger(dy)).sum(), (yg.grad * dy).sum(), rtol=1e-9)


@pytest.mark.parametrize("cls", [ParallelBeamCT, FanBeamCT])
def test_torch_sparse_path_matches_scipy(cls):
    # the path of non-CPU devices: torch CSR of A^T and of A (the sorted transpose)
    period = 180 if cls is ParallelBeamCT else 360
    physics = cls((1, 19, 16), np.linspace(0, period, 13, endpoint=False) + 1.0)
    g = torch.Generator().manual_seed(4)
    x2d = torch.randn(19 * 16, 3, generator=g, dtype=torch.float64)
    y2d = torch.randn(physics._shape[1], 3, generator=g, dtype=torch.float64)
    for transpose, v in ((False, x2d), (True, y2d)):
        ours = torch.sparse.mm(physics._torch_matrix(transpose, torch.float64), v)
        assert torch.allclose(ours, physics._spmm(v, transpose), atol=1e-12)
