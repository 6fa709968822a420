"""PnP-DM (Wu et al., NeurIPS 2024): the likelihood step against its closed-form conditional,
the chain against the exact posterior, determinism, refusals."""

import pytest
import torch
from conftest import gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff import operators
from invdiff.priors.analytic import operator_matrix
from invdiff.samplers import IncompatibleError
from invdiff.samplers.pnpdm import PnPDM, exact_likelihood_step, langevin_likelihood_step
from invdiff.samplers.steps import randn_like

S, RHO = 0.05, 0.2


def _conditional(amat, x, y, s, rho):
    """Mean and covariance of p(z | x, y) ∝ exp(-||y - Az||²/2s² - ||z - x||²/2ρ²), dense."""
    prec = amat.T @ amat / s**2 + torch.eye(amat.shape[1], dtype=amat.dtype) / rho**2
    cov = torch.linalg.inv(prec)
    mean = (cov @ (amat.T @ y.reshape(-1) / s**2 + x.reshape(-1) / rho**2))
    return mean, cov


def _blur_problem():
    prior, _, x, _ = gaussian_inpainting_problem(shape=(1, 8, 8))
    physics, y = gaussian_blur_problem(prior, x)
    return prior, physics, x.double(), y.double(), operator_matrix(physics, (1, 8, 8))


def test_exact_likelihood_step_is_the_perturbed_closed_form():
    """Draw for draw (same generator): the CG perturb-and-solve equals the dense
    Σ (A^T (y + s e2)/s² + (x + ρ e1)/ρ²), i.e. m + Σ (A^T e2 / s + e1 / ρ) ~ N(m, Σ)."""
    _, physics, _, y, amat = _blur_problem()
    x = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    z = exact_likelihood_step(physics, x, y, S, RHO, torch.Generator().manual_seed(7), iterations=300, tol=1e-13)
    g = torch.Generator().manual_seed(7)
    e1, e2 = randn_like(x, g), randn_like(y, g)
    mean, cov = _conditional(amat, x, y, S, RHO)
    dense = cov @ (amat.T @ (y + S * e2).reshape(-1) / S**2 + (x + RHO * e1).reshape(-1) / RHO**2)
    torch.testing.assert_close(z.reshape(-1), dense, rtol=1e-8, atol=1e-8)


def test_exact_likelihood_step_moments_match_the_conditional():
    """4000 draws (blur, 8x8): sample mean and per-pixel variance vs the closed form."""
    _, physics, _, y, amat = _blur_problem()
    x = torch.full((1, 1, 8, 8), 0.4, dtype=torch.float64)
    n = 4000
    z = exact_likelihood_step(physics, x.repeat(n, 1, 1, 1), y.repeat(n, 1, 1, 1), S, RHO,
                              torch.Generator().manual_seed(0), iterations=200, tol=1e-10).reshape(n, -1)
    mean, cov = _conditional(amat, x, y, S, RHO)
    std = cov.diagonal().sqrt()
    assert ((z.mean(0) - mean).abs() / (std / n**0.5)).max() < 4.5
    assert ((z.var(0) / cov.diagonal()) - 1).abs().max() < 0.12
    # covariance: within 1.5x the Monte-Carlo error of as many exact draws (about 0.1 here)
    exact = mean + torch.randn(n, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) @ \
        torch.linalg.cholesky(cov).T
    floor = (torch.cov(exact.T) - cov).norm() / cov.norm()
    assert (torch.cov(z.T) - cov).norm() / cov.norm() < 1.5 * floor


def test_langevin_likelihood_step_approaches_the_conditional():
    """The Langevin variant (nonlinear operators) with a small step, on a linear problem
    (inpainting): mean and variance near the closed form (unadjusted: O(step) bias)."""
    _, physics, _, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    y, amat = y.double(), operator_matrix(physics, (1, 8, 8))
    x = torch.full((1, 1, 8, 8), 0.4, dtype=torch.float64)
    n = 500
    step = 0.2 / (1.0 / S**2 + 1 / RHO**2)  # ||A|| = 1
    z = langevin_likelihood_step(physics, x.repeat(n, 1, 1, 1), y.repeat(n, 1, 1, 1), S, RHO,
                                 torch.Generator().manual_seed(0), steps=300, step=step).reshape(n, -1)
    mean, cov = _conditional(amat, x, y, S, RHO)
    std = cov.diagonal().sqrt()
    assert ((z.mean(0) - mean).abs() / std).max() < 0.25
    ratio = (z.var(0) / cov.diagonal()).mean().item()
    assert 0.9 < ratio < 1.15, ratio


def test_fixed_rho_chain_targets_the_smoothed_posterior():
    """At a fixed coupling ρ (no annealing) the x-marginal of π(x, z) is the posterior with
    noise covariance s² I + ρ² A A^T; for inpainting (A A^T = diag(mask)) that is the exact
    posterior at noise std sqrt(s² + ρ²). 48 chains x 15 iterations, Gaussian prior."""
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    rho = 0.15
    sampler = PnPDM(prior, steps=15, rho=rho, rho_min=rho, clip=None)
    out = sampler.sample(y, physics, n=48, generator=torch.Generator().manual_seed(1))
    target = prior.posterior(y, physics, (S**2 + rho**2) ** 0.5)
    exact = prior.posterior(y, physics, S)
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    err = rel_err(out.mean, target.mean.float(), prior_mean)
    ratio = (out.std.mean() / target.std.mean()).item()
    assert err < 0.2 and 0.85 < ratio < 1.15, (err, ratio)
    assert (out.std.mean() / exact.std.mean()).item() > 1.1  # and not the exact posterior: rho > 0 smooths it


def test_annealed_to_small_rho_is_near_the_exact_posterior():
    """Annealing ρ down to 0.02 (< s): the samples approach the exact posterior (asymptotic exactness)."""
    prior, physics, x, y = gaussian_inpainting_problem()
    post = prior.posterior(y, physics, S)
    sampler = PnPDM(prior, steps=60, rho_min=0.02, clip=None)
    out = sampler.sample(y, physics, n=32, generator=torch.Generator().manual_seed(2))
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    err = rel_err(out.mean, post.mean.float(), prior_mean)
    ratio = (out.std.mean() / post.std.mean()).item()
    assert err < 0.15 and 0.85 < ratio < 1.25, (err, ratio)
    assert sampler.last_run.nfe_backward == 0


def test_prior_step_levels_and_determinism():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = PnPDM(prior, steps=5, diffusion_steps=30)
    levels = sampler.prior_levels(0.5)
    assert levels[0] == 0.5 and levels[-1] == 0 and all(a > b for a, b in zip(levels, levels[1:]))
    assert sampler.rhos == [max(5.0 * 0.9 ** (k * 100 / 5), 0.15) for k in range(5)]
    assert PnPDM(prior).rhos == [max(5.0 * 0.9**k, 0.15) for k in range(100)]  # the paper's at 100
    a = sampler(y, physics, generator=torch.Generator().manual_seed(0))
    b = sampler(y, physics, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert sampler.last_run.nfe == sum(len(sampler.prior_levels(r)) - 1 for r in sampler.rhos)


def test_refusals_and_the_langevin_variant_on_a_nonlinear_operator():
    """The exact likelihood step refuses a nonlinear operator before any work; "auto" takes
    the Langevin step there."""
    prior, _, x, _ = gaussian_inpainting_problem(shape=(1, 16, 16))
    physics = operators.make("phase-retrieval", img_size=(1, 16, 16), seed=0)
    y = physics(x)
    with pytest.raises(IncompatibleError, match="pnpdm: needs a linear operator .* likelihood_step='exact'"):
        PnPDM(prior, steps=2, likelihood_step="exact")(y, physics)
    sampler = PnPDM(prior, steps=2, langevin_steps=5, diffusion_steps=10)
    out = sampler(y, physics, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out).all() and sampler.last_run.steps == 2
    with pytest.raises(ValueError, match="rho_min"):
        PnPDM(prior, rho=0.1, rho_min=0.2)
