"""Volumes: volume operators (adjoints, baselines), the TV-z ADMM step, the volume samplers
(reduction to 2D, determinism, batched network calls, the effect of the z coupling) and the
3D ground truth."""

from __future__ import annotations

import pytest
import torch

from invdiff import operators
from invdiff.data.phantoms import ct, ct_volume
from invdiff.operators.volume import Cartesian3DMRI, SliceAveraging, SliceStack, from_slices, to_slices
from invdiff.priors import GaussianPrior
from invdiff.samplers import DDS
from invdiff.samplers.steps.volume import TVzADMM, soft_threshold, z_difference, z_difference_adjoint
from invdiff.samplers.volume import DDS3D, TPDM, DiffusionMBIR, make_volume

VOLUME_TASKS = [
    ("ct-sparse-20", (1, 4, 24, 24)),
    ("ct-limited-90", (1, 3, 24, 24)),
    ("ct-fan-30", (1, 4, 24, 24)),
    ("mri-4x", (1, 4, 16, 16)),
    ("mri-4x", (2, 3, 16, 16)),
    ("mri-multicoil-4x", (1, 3, 16, 16)),
    ("mri3d-6x", (1, 8, 16, 12)),
    ("mri3d-4x", (2, 8, 16, 16)),
    ("zsr-4x", (1, 8, 12, 12)),
    ("zsr-2x", (2, 6, 8, 8)),
]


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name,size", VOLUME_TASKS)
def test_volume_operator_adjoint(name, size):
    physics = operators.make(name, size, noise="none")
    assert physics.info.volume and tuple(physics.img_size) == size
    x = torch.randn(2, *size, generator=_gen(1))
    y = physics.A(x)
    v = torch.randn(y.shape, generator=_gen(2))
    lhs, rhs = float((y * v).sum()), float((x * physics.A_adjoint(v)).sum())
    assert abs(lhs - rhs) <= 2e-5 * max(abs(lhs), 1.0)
    # A_vjp is the adjoint, and autograd agrees
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((physics.A(xr) * v).sum(), xr)
    assert torch.allclose(g, physics.A_vjp(x, v), atol=1e-4, rtol=1e-4)
    # the task record rebuilds the same operator
    assert torch.allclose(operators.make(**physics.task).A(x), y)


def test_slice_stack_is_the_2d_operator_per_slice():
    ct2d = operators.make("ct-fan-30", (1, 24, 24), noise="none")
    vol = operators.make("ct-fan-30", (1, 5, 24, 24), noise="none")
    assert isinstance(vol, SliceStack)
    x = ct_volume(5, 24)
    y = vol.A(x)
    for d in range(5):
        assert torch.allclose(y[:, d], ct2d.A(x[:, :, d]), atol=1e-5)
        assert torch.allclose(vol.A_dagger(y)[:, :, d], ct2d.A_dagger(y[:, d]), atol=1e-5)


def test_cartesian_3d_mri_mask_and_inverse():
    physics = operators.make("mri3d-8x", (1, 16, 12, 20), noise="none")
    mask = physics.mask[:, 0]  # (D, W)
    assert mask.shape == (16, 20)
    assert abs(mask.numel() / mask.sum().item() - 8) < 0.5  # the acceleration asked for
    assert mask[8, 10] == 1  # the k-space centre is sampled
    full = Cartesian3DMRI(torch.ones(16, 20), (2, 16, 12, 20))
    x = torch.randn(1, 2, 16, 12, 20, generator=_gen(0))
    assert torch.allclose(full.A_dagger(full.A(x)), x, atol=1e-5)
    # the undersampling is along (kz, kx) only: every readout line is complete or empty
    k = physics.A(torch.rand(1, 1, 16, 12, 20, generator=_gen(3)))
    sampled = k.abs().sum(dim=(0, 1)) > 0  # (D, H, W)
    assert torch.equal(sampled, sampled[:, :1, :].expand_as(sampled))


def test_slice_averaging_baseline_interpolates():
    physics = SliceAveraging((1, 8, 4, 4), factor=2)
    ramp = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(1, 1, 8, 4, 4)
    thick = physics.A(ramp)  # centres at 0.5, 2.5, 4.5, 6.5
    assert torch.allclose(thick[0, 0, :, 0, 0], torch.tensor([0.5, 2.5, 4.5, 6.5]))
    up = physics.A_dagger(thick)
    # linear in between the thick slices' centres, held at the two ends
    assert torch.allclose(up[0, 0, 1:7, 0, 0], ramp[0, 0, 1:7, 0, 0])
    assert torch.allclose(up[0, 0, [0, 7], 0, 0], torch.tensor([0.5, 6.5]))
    with pytest.raises(ValueError, match="not divisible"):
        operators.make("zsr-3x", (1, 8, 4, 4))


def test_volume_registry_errors():
    with pytest.raises(ValueError, match="a volume task"):
        operators.make("mri3d-4x", (1, 16, 16))
    with pytest.raises(ValueError, match="not linear"):
        operators.make("phase-retrieval", (1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"expected volumes \(B, 1, 4, 16, 16\)"):
        operators.make("ct-sparse-10", (1, 4, 16, 16)).A(torch.zeros(1, 1, 3, 16, 16))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_slices_round_trip(plane):
    x = torch.randn(2, 3, 4, 5, 6, generator=_gen(0))
    s = to_slices(x, plane)
    n, hw = {"axial": (2 * 4, (5, 6)), "coronal": (2 * 5, (4, 6)), "sagittal": (2 * 6, (4, 5))}[plane]
    assert s.shape == (n, 3, *hw)
    assert torch.equal(from_slices(s, x.shape, plane), x)
    # slice k of the batch is the k-th plane of volume 0
    if plane == "coronal":
        assert torch.equal(s[1], x[0, :, :, 1, :])


def test_z_difference_adjoint_and_soft_threshold():
    x = torch.randn(2, 1, 6, 3, 3, generator=_gen(0))
    v = torch.randn(2, 1, 5, 3, 3, generator=_gen(1))
    assert torch.allclose((z_difference(x) * v).sum(), (x * z_difference_adjoint(v)).sum(), atol=1e-5)
    # soft threshold = argmin_z tau|z| + (z - v)^2 / 2, checked on a grid
    grid = torch.linspace(-3, 3, 60001)
    for val in (-2.0, -0.3, 0.0, 0.2, 1.7):
        best = grid[(0.5 * (grid - val) ** 2 + 0.5 * grid.abs()).argmin()]
        assert abs(float(soft_threshold(torch.tensor(val), 0.5)) - float(best)) < 1e-3


def test_tv_admm_converges_to_the_z_constant_solution_for_large_weight():
    # min 1/2 ||x - y||^2 + lam ||Dz x||_1 with lam large: every slice equals the mean slice
    denoise = operators.make("inpaint-random-0", (1, 4, 4), noise="none")  # A = identity
    physics = SliceStack(denoise, depth=5)
    image = torch.randn(1, 1, 5, 4, 4, generator=_gen(0))
    y = physics.A(image)
    admm = TVzADMM(physics, y, rho=1.0, tv_weight=100.0, cg_iterations=30)
    x = image.clone()
    for _ in range(400):
        x = admm(x)
    assert torch.allclose(x, image.mean(dim=2, keepdim=True).expand_as(image), atol=2e-3)
    # and with lam = 0 the least-squares solution, the image itself
    admm = TVzADMM(physics, y, rho=1.0, tv_weight=0.0, cg_iterations=30)
    x = torch.zeros_like(image)
    for _ in range(200):
        x = admm(x)
    assert torch.allclose(x, image, atol=1e-3)


def _ct_problem(depth=4, size=16, views=12, sigma=0.02):
    physics = operators.make(f"ct-sparse-{views}", (1, depth, size, size), noise_sigma=sigma)
    x = ct_volume(depth, size, seed=0)
    return physics, x, physics(x, seed=0)


def test_dds3d_without_coupling_is_dds_on_every_slice():
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
    physics, x, y = _ct_problem()
    vol = DDS3D(prior, steps=8, rho=0.0, tv_weight=0.0)(y, physics, generator=_gen(5))
    ct2d = physics.physics2d
    ct2d.noise_model = physics.noise_model
    flat = DDS(prior, steps=8)(y.reshape(4, *y.shape[2:]), ct2d, generator=_gen(5))
    assert torch.allclose(vol[0].transpose(0, 1), flat, atol=1e-4)


@pytest.mark.parametrize("cls", [DDS3D, DiffusionMBIR])
def test_uncoupled_volume_samplers_treat_slices_independently(cls):
    # a volume of D slices with no coupling == D volumes of one slice (same noise, slice-major)
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
    physics, x, y = _ct_problem()
    kw = dict(steps=6, rho=0.0, tv_weight=0.0)
    vol = cls(prior, **kw)(y, physics, generator=_gen(2))
    single = operators.make("ct-sparse-12", (1, 1, 16, 16), noise_sigma=0.02)
    sep = cls(prior, **kw)(y.reshape(4, 1, *y.shape[2:]), single, generator=_gen(2))
    assert torch.allclose(vol[0, 0], sep[:, 0, 0], atol=1e-4)


def _samplers(prior):
    coronal = GaussianPrior.stationary((1, 4, 16), length_scale=3.0)
    return [DDS3D(prior, steps=6), TPDM(prior, coronal, steps=6), DiffusionMBIR(prior, steps=6)]


def test_volume_samplers_are_deterministic_and_batch_the_slices():
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
    physics, x, y = _ct_problem()
    for sampler in _samplers(prior):
        a = sampler(y, physics, generator=_gen(3))
        b = sampler(y, physics, generator=_gen(3))
        assert torch.equal(a, b), sampler.name
        assert not torch.equal(a, sampler(y, physics, generator=_gen(4))), sampler.name
        assert a.shape == x.shape and torch.isfinite(a).all()


@pytest.mark.parametrize("budget,per_step", [(None, 1), (8, 1), (3, 3), (1, 8)])
def test_one_network_call_per_step_within_the_budget(budget, per_step):
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
    counts = {"calls": 0, "rows": 0}
    network = prior.denoise

    def counting(x, sigma, generator=None):  # counted at the prior
        counts["calls"] += 1
        counts["rows"] += x.shape[0]
        return network(x, sigma, generator=generator)

    prior.denoise = counting
    physics = operators.make("ct-sparse-12", (1, 8, 16, 16), noise_sigma=0.02)
    y = physics(ct_volume(8, 16), seed=0)
    sampler = DDS3D(prior, steps=5, slices_per_call=budget)
    sampler(y, physics, generator=_gen(0))
    assert counts["calls"] == 5 * per_step
    assert counts["rows"] == 5 * 8  # every slice once per step
    assert sampler.last_run.nfe == 5 and sampler.last_run.extra["network_calls"] == 5 * per_step


def test_tpdm_alternates_the_planes():
    axial = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
    coronal = GaussianPrior.stationary((1, 4, 16), length_scale=3.0)
    physics, x, y = _ct_problem()
    planes = []
    TPDM(axial, coronal, steps=6, alternate=3)(y, physics, generator=_gen(0),
                                               callback=lambda d: planes.append(d["plane"]))
    assert planes == ["axial", "axial", "coronal"] * 2
    with pytest.raises(ValueError, match="coronal slices"):  # the auxiliary prior's slices are (D, W) = (4, 16)
        TPDM(axial, GaussianPrior.stationary((1, 16, 16)), steps=4)(y, physics, generator=_gen(0))


def test_z_coupling_reduces_the_z_gradient_error():
    # a truth constant along z, sparse views and noise: TV-z must beat independent slices
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=2.0)
    physics = operators.make("ct-sparse-6", (1, 6, 16, 16), noise_sigma=0.5)
    x = ct(1, 16, 0).reshape(1, 1, 1, 16, 16).expand(1, 1, 6, 16, 16).contiguous()
    y = physics(x, seed=0)

    def errors(sampler):
        u = sampler(y, physics, generator=_gen(0))
        return float(((u - x) ** 2).mean()), float(z_difference(u).norm())

    mse_2d, dz_2d = errors(DDS3D(prior, steps=10, rho=0.0, tv_weight=0.0))
    mse_3d, dz_3d = errors(DDS3D(prior, steps=10, rho=0.1, tv_weight=0.03))  # strong coupling: z-constant truth
    assert dz_3d < 0.5 * dz_2d and mse_3d < mse_2d


def test_volume_sampler_errors():
    prior = GaussianPrior.stationary((1, 16, 16))
    flat = operators.make("ct-sparse-10", (1, 16, 16))
    with pytest.raises(ValueError, match=r"img_size = \(C, D, H, W\)"):
        DDS3D(prior, steps=3)(flat(torch.rand(1, 1, 16, 16)), flat)
    physics = operators.make("ct-sparse-10", (1, 4, 24, 24))
    with pytest.raises(ValueError, match="axial slices"):
        DDS3D(prior, steps=3)(physics(torch.rand(1, 1, 4, 24, 24)), physics)
    with pytest.raises(ValueError, match="rho > 0"):
        DDS3D(prior, rho=0.0, tv_weight=1e-3)
    with pytest.raises(ValueError, match="unknown volume sampler"):
        make_volume("nope", prior)


def test_ct_volume_varies_smoothly_along_z():
    v = ct_volume(12, 48, seed=1)
    assert torch.equal(v, ct_volume(12, 48, seed=1)) and not torch.equal(v, ct_volume(12, 48, seed=2))
    neighbours = (v[0, 0, 1:] - v[0, 0, :-1]).abs().mean()
    independent = (ct(2, 48, 1)[0] - ct(2, 48, 1)[1]).abs().mean()
    ends = (v[0, 0, 0] - v[0, 0, -1]).abs().mean()
    assert neighbours < 0.1 * independent  # continuous anatomy ...
    assert ends > 3 * neighbours  # ... that does change over the volume
    flat = ct_volume(3, 32, seed=0, variation=0.0)
    assert torch.equal(flat[0, 0, 0], flat[0, 0, 2])


def test_mni_volume_is_oriented_as_the_slices():
    pytest.importorskip("nilearn")
    from invdiff.data import mni

    v = mni.volume(32)
    assert v.shape == (1, 1, 32, 32, 32) and 0 <= float(v.min()) and float(v.max()) <= 1
    head = v[0, 0] > 0.05
    # superior first along D: the brain's axial area grows from the top slices down to the middle
    area = head.sum(dim=(1, 2))
    assert area[:6].float().mean() < area[12:20].float().mean()
    # W is left-right: the head is mirror-symmetric along it
    assert torch.allclose(head.float().mean(dim=(0, 1)), head.float().mean(dim=(0, 1)).flip(0), atol=0.08)
    w = mni.volume(32, seed=0)
    assert torch.equal(w, mni.volume(32, seed=0)) and not torch.allclose(w, v, atol=0.05)
    assert mni.volume(32, depth=10).shape == (1, 1, 10, 32, 32)


def test_coronal_training_set_holds_out_the_coronal_slices():
    pytest.importorskip("nilearn")
    from invdiff import data
    from invdiff.data import mni

    held = data.heldout("mri-brain-coronal-synth", size=32)
    assert torch.equal(held, mni.slices("heldout", 32, orientations=("coronal",)))
    a = mni.randomised(2, 32, seed=0, orientations=("coronal",))
    assert torch.equal(a, mni.randomised(2, 32, seed=0, orientations=("coronal",)))
    assert not torch.equal(a, mni.randomised(2, 32, seed=0))
    with pytest.raises(ValueError, match="unknown orientation"):
        mni.randomised(1, 32, orientations=("oblique",))


def test_bench_volume_grid(tmp_path):
    from safetensors.torch import load_file

    from invdiff.bench import run
    from invdiff.bench.metrics import volume_metrics

    result = run("ct-sparse-20,zsr-2x", "baseline,dds-3d,dds-3d:rho=0:tv_weight=0", "gaussian-16", images="ct-phantom",
                 n_images=1, steps=4, size=16, depth=4, out=tmp_path / "b", progress=False, lpips=False,
                 save_recon="all")
    rows = result.rows
    assert len(rows) == 6 and all(r["status"] == "ok" for r in rows)
    for r in rows:
        saved = load_file(str(tmp_path / "b" / r["recon"]))
        assert saved["x"].shape == (1, 1, 4, 16, 16)
        expected = volume_metrics(saved["x_hat"], saved["x"], "mri" if r["psnr_range"] == "gt-max" else "ct")
        assert r["psnr"] == pytest.approx(expected["psnr"]) and r["z_error"] == pytest.approx(expected["z_error"])
    assert "z-gradient error" in (tmp_path / "b" / "summary.md").read_text()
    with pytest.raises(ValueError, match="volume sampler"):
        run("ct-sparse-20", "dps", "gaussian-16", images="ct-phantom", n_images=1, steps=2, size=16, depth=4,
            out=tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="volume grids take images"):
        run("ct-sparse-20", "dds-3d", "gaussian-16", images="prior", n_images=1, steps=2, size=16, depth=4,
            out=tmp_path / "d", progress=False)
