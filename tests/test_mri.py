"""MRI operators: masks, exact inverses for full sampling, coil maps."""

from __future__ import annotations

import pytest
import torch

from invdiff.operators import MultiCoilMRIOperator, birdcage_coil_maps, cartesian_mask, make


@pytest.mark.parametrize("name", ["mri-1x", "mri-multicoil-1x"])
@pytest.mark.parametrize("channels", [1, 2])
def test_full_mask_dagger_is_identity(name, channels):
    physics = make(name, (channels, 37, 31), noise="none")
    x = torch.rand(2, channels, 37, 31, dtype=torch.float64)
    assert torch.allclose(physics.A_dagger(physics(x)), x, atol=1e-6)


@pytest.mark.parametrize("R", [2, 4, 8])
@pytest.mark.parametrize("mask_type", ["random", "equispaced"])
def test_mask_acceleration_and_centre(R, mask_type):
    W = 256
    mask = cartesian_mask(64, W, R, mask_type=mask_type, generator=torch.Generator().manual_seed(0))
    cols = mask[0]
    assert torch.equal(mask, cols.expand_as(mask))  # whole columns
    assert W / cols.sum().item() == pytest.approx(R, rel=0.12)
    cf = 0.08 if R < 8 else 0.04
    n_center = int(cf * W)
    assert cols[W // 2 - n_center // 2 : W // 2 + (n_center + 1) // 2].all()


def test_task_mask_is_seeded():
    a = make("mri-4x", (1, 32, 32), seed=0).mask
    assert torch.equal(a, make("mri-4x", (1, 32, 32), seed=0).mask)
    assert not torch.equal(a, make("mri-4x", (1, 32, 32), seed=1).mask)


def test_complex_single_coil_dagger_is_pseudo_inverse():
    physics = make("mri-4x", (2, 32, 30), noise="none")
    x = torch.randn(1, 2, 32, 30, dtype=torch.float64)
    y = physics.A(x)
    assert torch.allclose(physics.A(physics.A_dagger(y)), y, atol=1e-10)


def test_real_adjoint_is_real_part():
    physics = make("mri-4x", (1, 32, 30))
    complex_physics = make("mri-4x", (2, 32, 30))
    y = torch.randn(1, 2, 32, 30, dtype=torch.float64)
    assert torch.allclose(physics.A_adjoint(y), complex_physics.A_adjoint(y)[:, :1])


def test_birdcage_normalised_and_multicoil_shapes():
    maps = birdcage_coil_maps(8, 37, 31)
    assert maps.shape == (8, 37, 31) and maps.is_complex()
    assert torch.allclose(maps.abs().square().sum(0), torch.ones(37, 31), atol=1e-5)
    physics = make("mri-multicoil-4x", (1, 37, 31))
    assert physics.n_coils == 8
    assert physics.A(torch.rand(1, 1, 37, 31)).shape == (1, 2, 8, 37, 31)


def test_user_coil_maps_are_normalised_and_recorded():
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(4, 16, 16, generator=g, dtype=torch.complex64)
    physics = make("mri-multicoil-2x", (1, 16, 16), coil_maps=maps)
    assert isinstance(physics, MultiCoilMRIOperator) and physics.n_coils == 4
    assert torch.allclose(physics.coil_maps.abs().square().sum(1), torch.ones(1, 16, 16), atol=1e-5)
    assert physics.task["coil_maps"] == "user"
    with pytest.raises(ValueError, match="coil_maps"):
        make(**physics.task)
    again = make(**{**physics.task, "coil_maps": maps})
    assert torch.equal(again.coil_maps, physics.coil_maps)


def test_noise_only_on_sampled_kspace():
    physics = make("mri-4x", (1, 32, 32), noise_sigma=0.1)
    y = physics(torch.zeros(1, 1, 32, 32))
    unsampled = physics.mask[0, 0] == 0
    assert (y[0, :, unsampled] == 0).all() and y.abs().sum() > 0
