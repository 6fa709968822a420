"""Contract tests over the whole operator registry (odd image sizes, exact answers)."""

from __future__ import annotations

import json

import pytest
import torch
from deepinv.physics import LinearPhysics

from invdiff import operators

LINEAR = [n for n in operators.available(examples=True) if n != "phase-retrieval"]
ALL = operators.available(examples=True)


def size_for(name: str) -> tuple[int, ...]:
    if operators.task_info(name).volume:  # (C, D, H, W), odd in-plane, D divisible by the zsr factor
        return (1, 8, 17, 13)
    if name.startswith("sr-"):
        return (3, 36, 28)  # divisible by the factor
    if name.startswith(("ct-", "mri-")):
        return (1, 37, 31)
    return (3, 37, 31)


def dtype_for(name: str) -> torch.dtype:
    # deepinv's Downsampling keeps a float32 filter, so SR runs in float32
    return torch.float32 if name.startswith("sr-") else torch.float64


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="module")
def built():
    cache = {}

    def get(name, **kw):
        key = (name, tuple(sorted(kw.items())))
        if key not in cache:
            physics = operators.make(name, size_for(name), **kw)
            if getattr(physics, "blind", False):  # deblur-blind: the operator of a known kernel
                physics = physics.known(physics.kernel(5).to(dtype_for(name)))
            cache[key] = physics
        return cache[key]

    return get


def _inner(a, b):
    return (a * b).sum()


@pytest.mark.parametrize("name", LINEAR)
def test_adjointness(name, built, rng):
    physics = built(name)
    assert isinstance(physics, LinearPhysics)
    dtype = dtype_for(name)
    x = torch.randn((2,) + size_for(name), generator=rng, dtype=dtype)
    y = physics.A(x)
    v = torch.randn(y.shape, generator=rng, dtype=dtype)
    lhs, rhs = _inner(y, v), _inner(x, physics.A_adjoint(v))
    assert abs(lhs - rhs) / abs(lhs) < 1e-4


@pytest.mark.parametrize("name", ALL)
def test_vjp_matches_autograd(name, built, rng):
    physics = built(name)
    dtype = dtype_for(name)
    x = torch.rand((2,) + size_for(name), generator=rng, dtype=dtype) + 0.1
    v = torch.randn(physics.A(x).shape, generator=rng, dtype=dtype)
    x_req = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_inner(physics.A(x_req), v), x_req)
    assert torch.allclose(physics.A_vjp(x, v), grad, rtol=1e-4, atol=1e-5 * grad.abs().max())


@pytest.mark.parametrize("name", LINEAR)
def test_dagger_is_least_squares_consistent(name, built, rng):
    """A A^dagger A x ≈ A x for the exact pseudo-inverses; looser for the
    regularised (Wiener) and approximate (FBP) baselines, which must still reduce the
    measurement residual far below that of the zero image."""
    physics = built(name)
    dtype = dtype_for(name)
    x = torch.rand((1,) + size_for(name), generator=rng, dtype=dtype)
    y = physics.A(x)
    x_dag = physics.A_dagger(y)
    assert x_dag.shape == x.shape
    rel = ((physics.A(x_dag) - y).norm() / y.norm()).item()
    if name.startswith(("inpaint", "sr-")):
        assert rel < 1e-4
    elif name.startswith("mri-"):
        # zero-filled / coil-combined real part: exact only for a full mask (test_mri.py)
        assert rel < 0.5
    elif name.startswith("deblur"):
        assert rel < 0.05
    elif name.startswith("ct-limited"):
        assert rel < 0.7  # missing wedge: FBP of a partial scan is strongly biased
    else:
        assert rel < 0.35


def test_wiener_formula(rng):
    physics = operators.make("deblur-gauss", (1, 37, 31), wiener_reg=1e-2)
    y = torch.randn(1, 1, 37, 31, generator=rng, dtype=torch.float64)
    x = physics.A_dagger(y)
    # normal equations of Tikhonov: (A^T A + lambda I) x = A^T y
    lhs = physics.A_adjoint(physics.A(x)) + 1e-2 * x
    assert torch.allclose(lhs, physics.A_adjoint(y), atol=1e-6)


def test_sr_dagger_is_pseudo_inverse(rng):
    physics = operators.make("sr-4x", (1, 32, 24))
    y = torch.randn(1, 1, 8, 6, generator=rng)
    x = physics.A_dagger(y)
    assert torch.allclose(physics.A(x), y, atol=1e-4)
    # minimum norm: x lies in the range of A^T, i.e. A^T A^dagger-projected x == x
    x2 = physics.A_dagger(physics.A(x))
    assert torch.allclose(x2, x, atol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_operator_and_measurements(name, rng):
    size = size_for(name)
    a = operators.make(name, size, seed=3)
    b = operators.make(name, size, seed=3)
    x = torch.rand((1,) + size, generator=rng)
    known = {"filter": a.kernel(4)} if getattr(a, "blind", False) else {}  # a blind A needs its kernel
    assert torch.equal(a.A(x, **known), b.A(x, **known))
    assert torch.equal(a(x, seed=7), b(x, seed=7))
    assert torch.equal(a(x, seed=7), a(x, seed=7))


@pytest.mark.parametrize("name", ["deblur-motion", "inpaint-random-70", "mri-4x", "mri-multicoil-4x"])
def test_different_seed_different_operator(name, rng):
    size = size_for(name)
    x = torch.rand((1,) + size, generator=rng)
    a = operators.make(name, size, seed=0, noise="none")
    b = operators.make(name, size, seed=1, noise="none")
    assert not torch.equal(a(x), b(x))


def test_noise_uses_physics_generator_not_global(rng):
    physics = operators.make("inpaint-box", (1, 16, 16), seed=5, noise_sigma=0.1)
    x = torch.rand(1, 1, 16, 16, generator=rng)
    state = torch.get_rng_state()
    y1 = physics(x)
    assert torch.equal(torch.get_rng_state(), state)
    physics.noise_model.reset_rng()
    assert torch.equal(physics(x), y1)
    noise = (y1 - physics.A(x))[physics.mask.expand_as(y1) > 0]
    assert 0.07 < noise.std() < 0.13


@pytest.mark.parametrize("name", ALL)
def test_task_round_trip(name, rng):
    size = size_for(name)
    physics = operators.make(name, size, seed=2)
    task = json.loads(json.dumps(physics.task))
    assert task["name"] == name and tuple(task["img_size"]) == size and physics.img_size == size
    again = operators.make(**task)
    x = torch.rand((1,) + size, generator=rng)
    known = {"filter": physics.kernel(4)} if getattr(physics, "blind", False) else {}  # a blind A needs its kernel
    assert torch.equal(again.A(x, **known), physics.A(x, **known))
    assert torch.equal(again(x, seed=1), physics(x, seed=1))


def test_defaults_and_noise_levels():
    assert operators.make("ct-sparse-30", (1, 16, 16)).task["noise_sigma"] == 0.01
    assert operators.make("mri-4x", (1, 16, 16)).task["noise_sigma"] == 0.01
    assert operators.make("inpaint-box", (3, 16, 16)).task["noise_sigma"] == 0.025
    p = operators.make("inpaint-box", (3, 16, 16), noise="poisson", poisson_gain=0.1)
    assert p.task["noise"] == "poisson"
    assert (p(torch.rand(1, 3, 16, 16)) >= 0).all()


def test_box_mask_geometry():
    p = operators.make("inpaint-box", (3, 256, 256))
    hole = p.mask[0, 0] == 0
    assert hole.sum() == 128 * 128 and hole[64:192, 64:192].all()


def test_random_mask_fraction_and_channels():
    p = operators.make("inpaint-random-70", (3, 64, 64))
    m = p.mask[0]
    assert torch.equal(m[0], m[1]) and torch.equal(m[0], m[2])
    assert abs(1 - m[0].mean().item() - 0.70) < 0.03


def test_blur_kernel_clipped_and_normalised():
    p = operators.make("deblur-gauss", (1, 37, 31))
    assert p.filter.shape[-2:] == (37, 31)
    assert torch.isclose(p.filter.sum(), torch.tensor(1.0))
    p = operators.make("deblur-motion", (1, 37, 31))
    assert torch.isclose(p.filter.sum(), torch.tensor(1.0), atol=1e-4)


def test_available_and_describe():
    names = operators.available()
    assert "ct-sparse-<N>" in names and "mri-<R>x" in names and "phase-retrieval" in names
    for pattern in names:
        assert isinstance(operators.describe(pattern), str)
    assert "45 views" in operators.describe("ct-sparse-45")
    assert "\n" not in operators.describe("mri-multicoil-4x")


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("ct-dense-4", {}, "unknown task.*available"),
        ("ct-sparse-0", {}, "ct-sparse-0"),
        ("ct-limited-0", {}, "ct-limited-0"),
        ("ct-limited-400", {}, "ct-limited-400"),
        ("mri-0x", {}, "mri-0x"),
        ("sr-4x", {"img_size": (3, 30, 30)}, "divisible"),
        ("ct-sparse-30", {"img_size": (1, 4, 4)}, "too small"),
        ("mri-4x", {"img_size": (3, 32, 32)}, "img_size"),
        ("inpaint-random-100", {}, "inpaint-random-100"),
        ("deblur-gauss", {"kernel_sigma": 2.0}, "unknown parameter"),
        ("deblur-gauss", {"noise": "laplace"}, "noise"),
        ("mri-4x", {"noise": "poisson"}, "Poisson"),
        ("ct-sparse-30", {"fbp_filter": "butterworth"}, "window"),
        ("mri-32x", {"center_fraction": 0.08}, "center_fraction"),
    ],
)
def test_bad_parameters_raise(name, kwargs, match):
    kwargs = dict(kwargs)
    size = kwargs.pop("img_size", (1, 32, 32))
    with pytest.raises(ValueError, match=match) as info:
        operators.make(name, size, **kwargs)
    assert "\n" not in str(info.value).strip()


def test_phase_retrieval_matches_definition(rng):
    p = operators.make("phase-retrieval", (1, 32, 32))
    assert p.pad_h == 8  # int(2.0 / 8 * 32), as in the DPS code
    x = torch.rand(1, 1, 32, 32, generator=rng, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (8, 8, 8, 8))
    expected = torch.fft.fft2(torch.fft.ifftshift(padded, dim=(-2, -1)), norm="ortho").abs()
    assert torch.allclose(torch.fft.ifftshift(p.A(x), dim=(-2, -1)), expected, atol=1e-12)


def test_phase_retrieval_dagger_reduces_residual(rng):
    p = operators.make("phase-retrieval", (1, 16, 16), noise="none")
    x = torch.zeros(1, 1, 16, 16)
    x[..., 4:12, 5:10] = torch.rand(8, 5, generator=rng)
    y = p(x)
    x_hat = p.A_dagger(y)
    assert torch.equal(x_hat, p.A_dagger(y))  # deterministic
    res = (p.A(x_hat) - y).norm() / y.norm()
    assert res < 0.5
