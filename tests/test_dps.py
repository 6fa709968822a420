import math

import deepinv as dinv
import pytest
import torch
from conftest import gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff.priors import GaussianMixturePrior, GaussianPrior
from invdiff.samplers import DPS, SamplerDivergedError
from invdiff.samplers.steps import ddpm_sigmas


@pytest.mark.parametrize("operator", ["inpainting", "blur"])
def test_dps_recovers_gaussian_posterior(operator):
    """Mean of 32 DPS samples vs the closed-form posterior of a Gaussian prior.

    Measured (100 steps, n=32): relative mean error 0.10 (inpainting), 0.12 (blur); Monte-Carlo
    floor of 32 exact samples 0.03; mean per-pixel std 1.1-1.2x the exact one. DPS's
    likelihood approximation is not exact, so the tolerance is 0.2, not the floor.
    """
    prior, physics, x, y = gaussian_inpainting_problem()
    if operator == "blur":
        physics, y = gaussian_blur_problem(prior, x)
    s = float(physics.noise_model.sigma)
    post = prior.posterior(y, physics, s)
    sampler = DPS(prior, steps=100, clip=None)
    out = sampler.sample(y, physics, n=32, generator=torch.Generator().manual_seed(2))
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    err = rel_err(out.mean, post.mean.float(), prior_mean)
    ratio = (out.std.mean() / post.std.mean()).item()
    assert err < 0.2, f"relative error of the posterior mean {err:.3f}"
    assert 0.7 < ratio < 1.5, f"std ratio {ratio:.3f}"
    # and far better than the trivial estimates
    assert rel_err(physics.A_adjoint(y), post.mean.float(), prior_mean) > 2 * err


def test_dps_on_gaussian_mixture_picks_the_mode():
    shape = (1, 6, 6)
    means = torch.stack([torch.full(shape, 0.3), torch.full(shape, 0.7)]).double()
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.5]), means, torch.tensor([0.01, 0.01]))
    mask = torch.zeros(shape)
    mask[..., :3] = 1
    physics = dinv.physics.Inpainting(shape, mask=mask, noise_model=dinv.physics.GaussianNoise(0.05))
    y = physics.A(torch.full((1, *shape), 0.7))
    post = prior.posterior(y, physics, 0.05)
    out = DPS(prior, steps=100, clip=None).sample(y, physics, n=16, generator=torch.Generator().manual_seed(0))
    assert post.weights[0, 1] > 0.99
    assert (out.mean - post.mean.float()).abs().max() < 0.08


def test_sample_batches_through_the_network():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = DPS(prior, steps=10)
    out = sampler.sample(y, physics, n=5, generator=torch.Generator().manual_seed(0))
    assert out.samples.shape == (5, 1, 1, 8, 8)
    assert sampler.last_run.nfe == 10 and sampler.last_run.batch == 5
    assert torch.allclose(out.mean, out.samples.mean(0)) and torch.allclose(out.std, out.samples.std(0))
    assert (out.std > 0).all()


def test_paper_weighting_reproduces_the_official_vp_update():
    """One step of weighting="paper" equals the official DPS update on [-1, 1] VP states."""
    shape = (1, 6, 6)
    prior = GaussianPrior.stationary(shape, length_scale=1.5, variance=0.05, mean=0.5)
    mask = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    physics = dinv.physics.Inpainting(shape, mask=mask)
    y = physics.A(prior.sample(1, torch.Generator().manual_seed(1)).float()).double()
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    abar = torch.cumprod(1 - betas, 0)
    table = ddpm_sigmas()
    zeta = 0.7
    for t in (600, 20):
        s_t, s_prev = table[999 - t].item(), table[1000 - t].item()
        sampler = DPS(prior, weighting="paper", zeta=zeta, sigmas=torch.tensor([s_t, s_prev, 0.0]))
        x_init = torch.rand(1, *shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        gen = torch.Generator().manual_seed(3)
        z0 = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
        z1 = torch.randn(1, *shape, generator=gen, dtype=torch.float64)
        steps = []
        sampler(y, physics, generator=torch.Generator().manual_seed(3), x_init=x_init, callback=steps.append)
        x_ve = x_init + s_t * z0
        # the official code (guided_diffusion p_sample + DPS PosteriorSampling.conditioning)
        a_t, a_prev, beta = abar[t], abar[t - 1], betas[t]
        x_t = (math.sqrt(a_t) * (2 * x_ve - 1)).requires_grad_(True)
        x0p = 2 * prior.denoise((x_t / math.sqrt(a_t) + 1) / 2, s_t) - 1
        x0p = x0p.clamp(-1, 1)
        mean = beta * math.sqrt(a_prev) / (1 - a_t) * x0p + (1 - a_prev) * math.sqrt(1 - beta) / (1 - a_t) * x_t
        var = beta * (1 - a_prev) / (1 - a_t)
        y_pm = 2 * y - physics.A(torch.ones_like(x_ve))
        norm = (y_pm - physics.A(x0p)).norm()
        (grad,) = torch.autograd.grad(norm, x_t)
        sample = mean + math.sqrt(var) * (2 * math.sqrt(a_prev) * z1 * s_prev * math.sqrt(1 - s_prev**2 / s_t**2)
                                         / math.sqrt(var))
        x_prev = sample.detach() - zeta * grad
        expect = (x_prev / math.sqrt(a_prev) + 1) / 2
        assert torch.allclose(steps[0]["x"], expect, atol=1e-9), t
        # the VE noise level c of the ancestral step is the official posterior std mapped to [0, 1]
        assert math.isclose(s_prev * math.sqrt(1 - s_prev**2 / s_t**2), math.sqrt(var) / (2 * math.sqrt(a_prev)),
                            rel_tol=1e-6)


def test_bad_inputs_raise_clear_errors():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = DPS(prior, steps=5)
    with pytest.raises(ValueError, match=r"y has shape \(1, 1, 8, 7\)"):
        sampler(y[..., :7], physics)
    bad = y.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="1 NaN/Inf values"):
        sampler(bad, physics)
    with pytest.raises(ValueError, match="x_init has shape"):
        sampler(y, physics, x_init=torch.zeros(1, 1, 4, 4))
    with pytest.raises(ValueError, match="strictly decreasing"):
        DPS(prior, sigmas=torch.tensor([1.0, 2.0, 0.0]))
    with pytest.raises(ValueError, match="weighting"):
        DPS(prior, weighting="magic")
    with pytest.raises(TypeError, match="DiffusionPrior"):
        DPS(torch.nn.Identity())


def test_divergence_names_the_step():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = DPS(prior, steps=30, zeta=1e30, clip=None)
    with pytest.raises(SamplerDivergedError, match=r"dps: diverged at step \d+ \(sigma="):
        sampler(y * 1e10, physics, generator=torch.Generator().manual_seed(0))
    assert sampler.last_run is not None and sampler.last_run.nfe > 0


@pytest.mark.parametrize("weighting", ["likelihood", "paper"])
def test_poisson_noise(weighting):
    """Poisson measurements (gain 0.01): both rules use the Poisson variance and beat zero-filling."""
    from invdiff import operators
    from invdiff.priors import GaussianPrior

    shape = (1, 16, 16)
    prior = GaussianPrior.stationary(shape, length_scale=2.0, variance=0.02, mean=0.5)
    x = prior.sample(1, torch.Generator().manual_seed(0)).float().clamp(0, 1)
    physics = operators.make("inpaint-random-70", img_size=shape, noise="poisson", poisson_gain=0.01)
    y = physics(x, seed=1)
    out = DPS(prior, steps=100, weighting=weighting, clip=None).sample(
        y, physics, n=4, generator=torch.Generator().manual_seed(0))
    err = (out.mean - x).norm() / (physics.A_dagger(y) - x).norm()
    assert torch.isfinite(out.samples).all() and err < 0.5, err
