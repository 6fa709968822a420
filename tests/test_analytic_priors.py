import math

import deepinv as dinv
import pytest
import torch

from invdiff.priors import DiffusionPrior, GaussianMixturePrior, GaussianPrior, operator_matrix


def _random_cov(d, gen, scale=0.05):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def test_gaussian_denoiser_matches_formula():
    g = torch.Generator().manual_seed(0)
    d, shape = 12, (1, 3, 4)
    cov = _random_cov(d, g)
    mean = torch.rand(shape, generator=g, dtype=torch.float64)
    prior = GaussianPrior(mean, cov)
    x = torch.randn(3, *shape, generator=g, dtype=torch.float64)
    for sigma in (0.01, 0.3, 5.0):
        expect = mean.flatten() + (cov @ torch.linalg.solve(cov + sigma**2 * torch.eye(d, dtype=torch.float64),
                                                             (x.reshape(3, d) - mean.flatten()).T)).T
        assert torch.allclose(prior.denoise(x, sigma).reshape(3, d), expect, atol=1e-10)


def test_score_is_gradient_of_log_density():
    g = torch.Generator().manual_seed(1)
    d, shape = 8, (2, 2, 2)
    means = torch.rand(2, *shape, generator=g, dtype=torch.float64)
    covs = torch.stack([_random_cov(d, g), _random_cov(d, g)])
    prior = GaussianMixturePrior(torch.tensor([0.3, 0.7]), means, covs)
    x = torch.randn(4, *shape, generator=g, dtype=torch.float64, requires_grad=True)
    sigma = 0.4
    logp = 0
    comps = []
    for k in range(2):
        dist = torch.distributions.MultivariateNormal(means[k].flatten(), covs[k] + sigma**2 * torch.eye(d, dtype=torch.float64))
        comps.append(dist.log_prob(x.reshape(4, d)) + math.log([0.3, 0.7][k]))
    logp = torch.logsumexp(torch.stack(comps), 0).sum()
    (grad,) = torch.autograd.grad(logp, x)
    assert torch.allclose(prior.score(x.detach(), sigma), grad, atol=1e-8)


def test_gaussian_posterior_matches_information_form():
    g = torch.Generator().manual_seed(2)
    shape = (1, 5, 5)
    prior = GaussianPrior.stationary(shape, length_scale=1.5)
    mask = (torch.rand(shape, generator=g) > 0.4).float()
    physics = dinv.physics.Inpainting(shape, mask=mask)
    s = 0.05
    y = physics(prior.sample(2, g))
    post = prior.posterior(y, physics, s)
    a = operator_matrix(physics, shape)
    sigma_inv = torch.linalg.inv(prior.covariances[0])
    cov = torch.linalg.inv(sigma_inv + a.T @ a / s**2)
    mean = (cov @ (sigma_inv @ prior.means[0][:, None] + a.T @ y.reshape(2, -1).double().T / s**2)).T
    assert torch.allclose(post.covariance[0], cov, atol=1e-8)
    assert torch.allclose(post.mean.reshape(2, -1), mean, atol=1e-7)
    # exact posterior samples have that mean and covariance
    samples = post.sample(20000, torch.Generator().manual_seed(3)).reshape(20000, 2, -1)
    assert (samples.mean(0) - mean).abs().max() < 0.01
    emp = torch.cov(samples[:, 0].T)
    assert (emp - cov).abs().max() < 0.1 * cov.diagonal().max()


def test_mixture_posterior_weights_pick_the_right_component():
    shape = (1, 3, 3)
    means = torch.stack([torch.full(shape, 0.2), torch.full(shape, 0.8)]).double()
    prior = GaussianMixturePrior(torch.tensor([0.5, 0.5]), means, torch.tensor([0.01, 0.01]))
    physics = dinv.physics.Inpainting(shape, mask=torch.ones(shape))
    y = torch.full((1, *shape), 0.78)
    post = prior.posterior(y, physics, 0.05)
    assert post.weights[0, 1] > 0.999
    # the mixture denoiser at small sigma is close to the identity, at large sigma to the prior mean
    x = torch.full((1, *shape), 0.75)
    assert torch.allclose(prior.denoise(x, 1e-3), x, atol=1e-3)
    assert torch.allclose(prior.denoise(x, 1e3), torch.full_like(x, 0.5), atol=1e-3)


def test_prior_sample_moments():
    prior = GaussianPrior.stationary((1, 4, 4), length_scale=1.0, variance=0.04, mean=0.5)
    s = prior.sample(40000, torch.Generator().manual_seed(0)).reshape(40000, -1)
    assert (s.mean(0) - 0.5).abs().max() < 0.01
    assert (torch.cov(s.T) - prior.covariances[0]).abs().max() < 0.005


def test_contract_and_errors():
    prior = GaussianPrior(0.5, 0.1, image_shape=(1, 4, 4))
    assert isinstance(prior, DiffusionPrior) and isinstance(prior, dinv.models.Denoiser)
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(prior(x, 0.1), prior.denoise(x, 0.1))
    assert torch.allclose(prior.denoise(x, torch.tensor([0.1, 0.1])), prior.denoise(x, 0.1))
    with pytest.raises(ValueError, match=r"expected images of shape \(B, 1, 4, 4\)"):
        prior.denoise(torch.rand(2, 1, 5, 4), 0.1)
    with pytest.raises(ValueError, match="one entry per batch element"):
        prior.denoise(x, torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="covariances"):
        GaussianMixturePrior(torch.ones(2), torch.zeros(2, 1, 2, 2), torch.ones(3))
    with pytest.raises(ValueError, match="positive semi-definite"):
        GaussianPrior(0.0, -torch.eye(4), image_shape=(1, 2, 2))
