import deepinv as dinv
import pytest
import torch
from conftest import gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff import operators
from invdiff.priors import GaussianPrior
from invdiff.samplers import SamplerDivergedError
from invdiff.samplers.daps import DAPS, ode_x0


@pytest.mark.parametrize("operator", ["inpainting", "blur"])
def test_daps_recovers_gaussian_posterior(operator):
    """Mean of 16 DAPS samples (defaults) vs the closed-form posterior of a Gaussian prior.

    Measured: relative mean error 0.085 (inpainting), 0.074 (blur); Monte-Carlo floor of 16
    exact posterior samples 0.04. Per-pixel std 1.65x / 1.37x the exact one: DAPS's
    isotropic approximation p(x0 | x_t) = N(x0_hat, sigma^2 I) over-disperses a smooth prior.
    """
    prior, physics, x, y = gaussian_inpainting_problem()
    if operator == "blur":
        physics, y = gaussian_blur_problem(prior, x)
    post = prior.posterior(y, physics, 0.05)
    out = DAPS(prior, clip=None).sample(y, physics, n=16, generator=torch.Generator().manual_seed(2))
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    err = rel_err(out.mean, post.mean.float(), prior_mean)
    ratio = (out.std.mean() / post.std.mean()).item()
    assert err < 0.13, f"relative error of the posterior mean {err:.3f}"
    assert 1.0 < ratio < 2.0, f"std ratio {ratio:.3f}"


def test_ode_x0_is_exact_for_a_point_mass():
    """For a point-mass prior the PF-ODE maps any x_t to the point; the last Euler step returns D."""
    prior = GaussianPrior(0.3, 1e-12, image_shape=(1, 4, 4))
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 5
    out = ode_x0(prior.denoise, x, 5.0, steps=3, sigma_min=0.01)
    assert torch.allclose(out, torch.full_like(out, 0.3), atol=1e-6)


def test_bad_arguments():
    prior = GaussianPrior(0.5, 0.1, image_shape=(1, 4, 4))
    with pytest.raises(ValueError, match="sigma_min"):
        DAPS(prior, sigma_min=100.0)
    with pytest.raises(ValueError, match="steps"):
        DAPS(prior, steps=0)


def test_divergence_names_the_step():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = DAPS(prior, steps=5, langevin_steps=5, step_scale=1e3, clip=None)  # unstable Langevin
    with pytest.raises(SamplerDivergedError, match=r"daps: diverged at step \d+ \(sigma="):
        sampler(y, physics, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("task", ["ct-sparse-30", "mri-4x"])
def test_daps_beats_the_baseline_on_ct_and_mri(task):
    """Mean of 4 samples on the 16x16 demo problem beats FBP / zero-filled (a single sample of
    the exact posterior is ~3 dB below its mean, so the mean is what is compared)."""
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=16 / 12, variance=0.02, mean=0.5)
    truth = prior.sample(1, torch.Generator().manual_seed(10000)).float()
    physics = operators.make(task, img_size=(1, 16, 16), seed=0)
    y = physics(truth, seed=1)
    out = DAPS(prior, steps=25, langevin_steps=30).sample(y, physics, n=4, generator=torch.Generator().manual_seed(0))
    psnr = dinv.metric.PSNR()
    assert psnr(out.mean, truth).item() > psnr(physics.A_dagger(y), truth).item() + 0.3
