import math

import deepinv as dinv
import pytest
import torch

from invdiff.priors import GaussianPrior
from invdiff.samplers.steps import (
    ddim_step,
    ddpm_sigmas,
    ddpm_timestep,
    guidance_gradient,
    karras_sigmas,
    operator_norm_squared,
    randn_like,
)


def test_karras_schedule_endpoints_and_monotone():
    s = karras_sigmas(10, 0.002, 80.0)
    assert s.shape == (11,) and s[-1] == 0
    assert math.isclose(s[0].item(), 80.0) and math.isclose(s[-2].item(), 0.002, rel_tol=1e-9)
    assert (s[1:] < s[:-1]).all()


def test_ddpm_sigmas_and_timestep_are_inverse():
    s = ddpm_sigmas()  # 1000 levels + 0
    assert s.shape == (1001,)
    t = ddpm_timestep(s[:-1])
    assert torch.allclose(t, torch.arange(999, -1, -1, dtype=torch.float64), atol=1e-6)
    assert ddpm_timestep(0.0).item() == -1.0
    # each step of the native schedule spans exactly one DDPM step
    assert torch.allclose(ddpm_timestep(s[:-1]) - ddpm_timestep(s[1:]), torch.ones(1000, dtype=torch.float64))
    # the VP relation sigma = sqrt((1 - abar) / abar) / 2 at t = 0
    abar0 = 1 - 1e-4
    assert math.isclose(s[-2].item(), 0.5 * math.sqrt((1 - abar0) / abar0), rel_tol=1e-9)


def test_ddim_step_eta1_is_the_ddpm_posterior():
    g = torch.Generator().manual_seed(0)
    x, x0, z = (torch.randn(2, 1, 3, 3, generator=g, dtype=torch.float64) for _ in range(3))
    s, sn = 0.7, 0.4
    out = ddim_step(x, x0, s, sn, 1.0, z)
    mean = x0 + sn**2 / s**2 * (x - x0)
    var = sn**2 * (s**2 - sn**2) / s**2
    assert torch.allclose(out, mean + math.sqrt(var) * z)
    # eta = 0: deterministic, on the line from x0 through x
    assert torch.allclose(ddim_step(x, x0, s, sn, 0.0, None), x0 + sn / s * (x - x0))
    assert torch.equal(ddim_step(x, x0, s, 0.0, 1.0, None), x0)


@pytest.mark.parametrize("misfit", ["norm", "squared"])
def test_guidance_gradient_matches_full_autograd(misfit):
    g = torch.Generator().manual_seed(1)
    prior = GaussianPrior.stationary((1, 6, 5), length_scale=1.5)
    physics = dinv.physics.BlurFFT((1, 6, 5), filter=dinv.physics.functional.blur.gaussian_blur(sigma=1.0))
    x = torch.randn(2, 1, 6, 5, generator=g, dtype=torch.float64)
    y = torch.randn(2, 1, 6, 5, generator=g, dtype=torch.float64)
    w = torch.rand(2, 1, 6, 5, generator=g, dtype=torch.float64) + 0.5
    x0, grad, norm = guidance_gradient(prior.denoise, x, 0.3, y, physics, misfit, weight=w)
    xr = x.clone().requires_grad_(True)
    r = y - physics.A(prior.denoise(xr, 0.3))
    per = (w * r**2).flatten(1).sum(1)
    loss = per.sqrt().sum() if misfit == "norm" else 0.5 * per.sum()
    (expect,) = torch.autograd.grad(loss, xr)
    assert torch.allclose(grad, expect, atol=1e-10)
    assert torch.allclose(norm.flatten(), r.detach().flatten(1).norm(dim=1))


def test_operator_norm_power_iteration():
    physics = dinv.physics.Inpainting((1, 4, 4), mask=torch.ones(1, 4, 4) * 0.5)
    assert math.isclose(operator_norm_squared(physics, (1, 4, 4)), 0.25, rel_tol=1e-3)


def test_randn_like_generator_list_is_per_sample():
    x = torch.zeros(3, 2, 2)
    a = randn_like(x, [torch.Generator().manual_seed(i) for i in (5, 6, 7)])
    b = randn_like(x[:1], [torch.Generator().manual_seed(6)])
    assert torch.equal(a[1], b[0])
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        randn_like(x[:2], [torch.Generator() for _ in range(3)])
