"""MCG: the projection against the pseudo-inverse, the sampler against the exact posterior,
exact measurement consistency when noiseless, and the Poisson likelihood (shared with DPS)."""

import sys
from pathlib import Path

import deepinv as dinv
import pytest
import torch

from invdiff import operators
from invdiff.priors import GaussianPrior
from invdiff.samplers import DPS, MCG
from invdiff.samplers.steps import likelihood_variance, project_measurements

from conftest import rel_err

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from exactness import NOISE, problems  # noqa: E402


def _matrix_physics(m: int, shape=(1, 3, 4), seed=0):
    a = torch.randn(m, int(torch.tensor(shape).prod()), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)
    physics = dinv.physics.LinearPhysics(A=lambda x: (x.flatten(1) @ a.T),
                                         A_adjoint=lambda y: (y @ a).reshape(y.shape[0], *shape))
    return a, physics


@pytest.mark.parametrize("m", [5, 20])  # under- and over-determined
def test_projection_is_the_pseudo_inverse_correction(m):
    a, physics = _matrix_physics(m)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 1, 3, 4, generator=g, dtype=torch.float64)
    y = torch.randn(2, m, generator=g, dtype=torch.float64)
    out = project_measurements(physics, x, y, None, iterations=100, tol=1e-12)
    exact = x.flatten(1) + (y - x.flatten(1) @ a.T) @ torch.linalg.pinv(a).T
    torch.testing.assert_close(out.flatten(1), exact, rtol=1e-7, atol=1e-7)
    w = 0.3
    relaxed = project_measurements(physics, x, y, w, iterations=100, tol=1e-12)
    step = torch.linalg.solve(torch.eye(12, dtype=torch.float64) + w * a.T @ a, w * a.T @ (y - x.flatten(1) @ a.T).T)
    torch.testing.assert_close(relaxed.flatten(1), x.flatten(1) + step.T, rtol=1e-7, atol=1e-7)


def test_poisson_variance_is_the_curvature_of_the_poisson_likelihood():
    """v = g * y: the Gaussian approximation has the exact Poisson NLL's Hessian at u = y."""
    gain = 0.05
    physics = operators.make("inpaint-random-70", img_size=(1, 8, 8), noise="poisson", poisson_gain=gain)
    y = physics(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.8 + 0.1, seed=1)
    kind, v = likelihood_variance(physics, y)
    assert kind == "poisson" and v.shape == y.shape
    obs = y > 2 * gain  # counts well above one
    u = y.clone().double().requires_grad_(True)
    nll = ((u - y * torch.log(u.clamp_min(1e-12))) / gain)[obs].sum()
    (grad,) = torch.autograd.grad(nll, u, create_graph=True)
    (hess_diag,) = torch.autograd.grad(grad.sum(), u)  # diagonal Hessian: separable NLL
    torch.testing.assert_close(hess_diag[obs], (1 / v.double())[obs], rtol=1e-6, atol=0)
    assert grad[obs].abs().max() < 1e-9  # same minimiser u = y


def test_noiseless_samples_are_consistent_and_near_the_posterior():
    shape = (1, 8, 8)
    prior = GaussianPrior.stationary(shape, length_scale=2.0, variance=0.05, mean=0.5)
    physics = operators.make("inpaint-random-70", img_size=shape, seed=0, noise_sigma=0.0)
    truth = prior.sample(1, torch.Generator().manual_seed(1)).float()
    y = physics(truth)
    out = MCG(prior, steps=50, clip=None).sample(y, physics, 32, generator=torch.Generator().manual_seed(0))
    assert (physics.A(out.samples.reshape(32, *shape)) - y).abs().max() < 1e-4
    post = prior.posterior(y, physics, noise_sigma=1e-3)
    assert rel_err(out.mean, post.mean.float(), torch.full_like(truth, 0.5)) < 0.35  # 32 samples: MC error ~0.2


@pytest.mark.parametrize("case", ["gaussian / inpaint-50", "gaussian / blur-1", "mixture / inpaint-50"])
def test_noisy_posterior_mean(case):
    """The exactness problems of the benchmark (noise 0.05): the relaxed projection is
    accurate where the hard one amplifies the noise (blur)."""
    label, prior, physics, y = next(p for p in problems() if p[0] == case)
    post = prior.posterior(y, physics, NOISE)
    prior_mean = torch.einsum("k,kd->d", prior.weights, prior.means).reshape(1, *prior.image_shape).float()
    out = MCG(prior, clip=None, steps=100).sample(y, physics, 16, generator=torch.Generator().manual_seed(4))
    assert rel_err(out.mean, post.mean.float(), prior_mean) < 0.25
    if "blur" in case:
        hard = MCG(prior, clip=None, steps=100, relax=False).sample(y, physics, 4,
                                                                    generator=torch.Generator().manual_seed(4))
        assert rel_err(hard.mean, post.mean.float(), prior_mean) > 1.0


def test_sparse_ct_beats_fbp_and_matches_dps():
    shape = (1, 32, 32)
    prior = GaussianPrior.stationary(shape, length_scale=3.0, variance=0.05, mean=0.5)
    physics = operators.make("ct-sparse-30", img_size=shape, seed=0, noise_sigma=0.01)
    truth = prior.sample(2, torch.Generator().manual_seed(5)).float()
    y = physics(truth, seed=1)
    exact = prior.posterior(y, physics, noise_sigma=0.01).mean.float()
    fbp = physics.A_dagger(y)
    mcg = MCG(prior, steps=60, clip=None)(y, physics, generator=torch.Generator().manual_seed(0))
    dps = DPS(prior, steps=60, clip=None)(y, physics, generator=torch.Generator().manual_seed(0))
    e_mcg, e_dps, e_fbp = ((v - exact).norm().item() for v in (mcg, dps, fbp))
    assert e_mcg < 0.5 * e_fbp and e_mcg < 1.2 * e_dps, (e_mcg, e_dps, e_fbp)


def test_poisson_likelihood_is_used_and_helps():
    shape = (1, 16, 16)
    prior = GaussianPrior.stationary(shape, length_scale=2.0, variance=0.02, mean=0.5)
    x = prior.sample(1, torch.Generator().manual_seed(0)).float().clamp(0, 1)
    physics = operators.make("inpaint-random-70", img_size=shape, noise="poisson", poisson_gain=0.01)
    y = physics(x, seed=1)
    sampler = MCG(prior, steps=60, clip=None)
    state = sampler._setup(y, physics)
    assert state.kind == "poisson" and torch.is_tensor(state.noise_var)
    out = sampler.sample(y, physics, n=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.samples).all()
    assert (out.mean - x).norm() < 0.5 * (physics.A_dagger(y) - x).norm()


def test_refuses_a_nonlinear_operator():
    prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
    physics = operators.make("phase-retrieval", img_size=(1, 8, 8), seed=0)
    y = physics(torch.rand(1, 1, 8, 8))
    with pytest.raises(TypeError, match="mcg: needs a linear operator"):
        MCG(prior, steps=3)(y, physics)
