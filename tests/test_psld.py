"""PSLD: the score weight of the DDIM step, the two terms' gradient against autograd of the
stated objectives, the gluing term's fixed point, the analytic latent problem's closed-form
posterior, and the run's accounting."""

import deepinv as dinv
import pytest
import torch
from conftest import gaussian_inpainting_problem, latent_gaussian_problem, rel_err

from invdiff import operators
from invdiff.priors import DiffusionPrior, LatentDiffusionPrior, LinearAutoencoder
from invdiff.samplers import PSLD, RunInfo
from invdiff.samplers.psld import PSLDRun
from invdiff.samplers.steps import GaussianGuidance, ddim_step, denoiser_error_variance
from invdiff.samplers.steps.updates import ddim_score_weight

LATENT, FACTOR = (1, 4, 4), 2
IMAGE = (1, 8, 8)


class AffineDenoiser(DiffusionPrior):
    """``D(z, sigma) = a z + b``: a latent denoiser with a known, non-trivial Jacobian (``a I``)."""

    def __init__(self, a: float, b: torch.Tensor):
        super().__init__(LATENT, sigma_min=0.01, sigma_max=10.0, sigma_data=0.3)
        self.a, self.b = a, b

    def _denoise(self, x, sigma):
        return self.a * x + self.b


def _setup(weighting, noise, seed=0, a=0.7):
    g = torch.Generator().manual_seed(seed)
    ae = LinearAutoencoder.upsampling(LATENT, FACTOR, bias=0.5)
    prior = LatentDiffusionPrior(ae, AffineDenoiser(a, 0.1 * torch.randn(1, *LATENT, generator=g, dtype=torch.float64)))
    mask = (torch.rand(IMAGE, generator=g) > 0.5).double()
    physics = dinv.physics.Inpainting(IMAGE, mask=mask)
    z = torch.randn(2, *LATENT, generator=g, dtype=torch.float64)
    y = physics.A(0.5 + 0.2 * torch.randn(2, *IMAGE, generator=g, dtype=torch.float64))
    sampler = PSLD(prior, steps=10, weighting=weighting, noise_sigma=noise, decoder_norm=1.7, projection_iterations=20,
                   cg_iterations=20, cg_tol=1e-12)
    sampler._info = RunInfo(sampler="psld", extra=dict(decoder_calls=0, encoder_calls=0))
    run = PSLDRun(noise_var=noise**2, decoder_norm=1.7, guidance=GaussianGuidance(physics, noise**2, None, 20, 1e-12))
    return prior, physics, mask, z, y, sampler, run


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_score_weight_is_the_ddim_steps(eta):
    """ddim_step(x, x + sigma^2 s) = x + kappa s + c z: the weight PSLD gives its likelihood score;
    eta 1 is the reverse SDE's sigma_i^2 - sigma_{i+1}^2, eta 0 the probability flow's
    sigma_i (sigma_i - sigma_{i+1})."""
    g = torch.Generator().manual_seed(0)
    x, score = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    sigma, sigma_next = 1.3, 0.8
    kappa = ddim_score_weight(sigma, sigma_next, eta)
    out = ddim_step(x, x + sigma**2 * score, sigma, sigma_next, eta, torch.zeros_like(x))
    torch.testing.assert_close(out, x + kappa * score, rtol=0, atol=1e-12)
    if eta == 1.0:
        assert kappa == pytest.approx(sigma**2 - sigma_next**2, rel=1e-12)
    if eta == 0.0:
        assert kappa == pytest.approx(sigma * (sigma - sigma_next), rel=1e-12)
    assert ddim_score_weight(sigma, 0.0, eta) == pytest.approx(sigma**2)


@pytest.mark.parametrize("weighting", ["likelihood", "paper"])
def test_gradient_is_autograd_of_the_stated_objective(weighting):
    """omega * grad L + gamma * grad G against torch.autograd on the objectives written out with
    dense operations: inpainting (A A^T diagonal, so the CG solves are exact), a linear decoder
    with its least-squares encoder, an affine denoiser; noisy data (the noise-aware projection)
    for the likelihood rule, the exact projection for the paper's."""
    noise = 0.05
    prior, physics, m, z, y, sampler, run = _setup(weighting, noise)
    sigma, omega, gamma = 0.9, 0.6, 1.7
    got_z0, got = sampler.gradient(z, sigma, y, physics, run, omega, gamma)

    ae, r2 = prior.autoencoder, denoiser_error_variance(sigma, 0.3)
    zg = z.clone().requires_grad_(True)
    z0 = prior.latent.denoise(zg, sigma)
    x0 = ae.decode(z0)
    r = y - m * x0
    rho2 = r2 * 1.7
    if weighting == "likelihood":
        data = 0.5 * (r**2 / (noise**2 + rho2 * m)).sum()
        glued = x0 + m * (y - m * x0) * rho2 / (rho2 + noise**2)  # x + A^T (A A^T + s^2/rho^2)^{-1} (y - A x)
        gl = ae.encode(glued) - z0
        glue = 0.5 * (gl**2).sum() / r2
    else:
        data = r.flatten(1).norm(dim=1).sum()
        glued = x0 + m * (y - m * x0)  # A^T y + (I - A^T A) x
        glue = (ae.encode(glued) - z0).flatten(1).norm(dim=1).sum()
    (expected,) = torch.autograd.grad(omega * data + gamma * glue, zg)
    torch.testing.assert_close(got_z0, z0.detach())
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert sampler._info.nfe == sampler._info.nfe_backward == 1


def test_gluing_term_vanishes_at_a_consistent_latent():
    """With noiseless data that the decoded estimate already fits, D(z0) is its own projection and
    z0 its encoding: the gluing gradient is zero; data it does not fit give a non-zero one."""
    prior, physics, m, z, _, sampler, run = _setup("likelihood", 0.0)
    run.noise_var = 0.0
    sigma = 0.9
    z0 = prior.latent.denoise(z, sigma)
    y = physics.A(prior.decode(z0))
    _, glue = sampler.gradient(z, sigma, y, physics, run, 0.0, 1.0)
    assert glue.abs().max() < 1e-10
    _, data = sampler.gradient(z, sigma, y, physics, run, 1.0, 0.0)
    assert data.abs().max() < 1e-10
    _, moved = sampler.gradient(z, sigma, y + 0.1 * m, physics, run, 0.0, 1.0)
    assert moved.abs().max() > 1e-3


def test_psld_on_the_analyticlatent_gaussian_problem():
    """Mean and spread of 16 PSLD samples (100 steps) against the closed-form posterior of a
    linear-decoder Gaussian latent prior (16x16 images from 8x8 latents), 50 % inpainting,
    noise 0.05. Measured: relative mean error 0.36 (Monte-Carlo floor of 16 exact samples
    0.06; ReSample 0.33), std ratio 1.13; without the gluing term (``gamma=0``) 0.45 and 1.56;
    with ``weighting="paper"`` (the official step rule) 0.76 and 5.6 (off scale here)."""
    prior, physics, x, y = latent_gaussian_problem()
    post = prior.posterior(y, physics, 0.05)
    prior_mean = prior.decode(torch.zeros(1, *prior.latent_shape))

    def run(**kwargs):
        out = PSLD(prior, steps=100, clip=None, **kwargs).sample(y, physics, n=16,
                                                                 generator=torch.Generator().manual_seed(4))
        return rel_err(out.mean, post.mean.float(), prior_mean), (out.std.mean() / post.std.float().mean()).item(), out

    err, ratio, out = run()
    assert err < 0.42, f"relative error of the posterior mean {err:.3f}"
    assert 0.9 < ratio < 1.35, f"std ratio {ratio:.3f}"
    flat = out.samples[:, 0]  # every sample is a decoded latent
    assert torch.allclose(prior.decode(prior.encode(flat)), flat, atol=1e-5)
    no_glue_err, no_glue_ratio, _ = run(gamma=0.0)  # the gluing term brings the mean and the spread closer
    assert no_glue_err > err + 0.04 and no_glue_ratio > ratio + 0.2
    paper_err, paper_ratio, _ = run(weighting="paper")
    assert paper_err > err + 0.2 and paper_ratio > 2.0


def test_run_accounting_and_seeds():
    prior, physics, x, y = latent_gaussian_problem("ct-sparse-30", noise=0.01)
    sampler = PSLD(prior, steps=12)
    calls = []
    a = sampler(y, physics, generator=torch.Generator().manual_seed(0), callback=calls.append)
    info = sampler.last_run
    # one network call with a backward pass per step; a decoder and an encoder pass per step,
    # one decoder pass for ||J_D|| (power iteration) and one for the output
    assert info.nfe == info.nfe_backward == info.steps == 12
    assert info.extra == dict(decoder_calls=12 + 2, encoder_calls=12)
    assert calls[0]["x"].shape == (1, *prior.latent_shape)  # the callback sees latents
    assert torch.equal(a, sampler(y, physics, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(a, sampler(y, physics, generator=torch.Generator().manual_seed(1)))


def test_pixel_prior_and_bad_arguments():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = PSLD(prior, steps=50, clip=None)
    assert isinstance(sampler.prior, LatentDiffusionPrior)
    post = prior.posterior(y, physics, 0.05)
    out = sampler.sample(y, physics, n=8, generator=torch.Generator().manual_seed(0))
    assert rel_err(out.mean, post.mean.float(), prior.means.reshape(1, *prior.image_shape).float()) < 0.35
    for kwargs, match in ((dict(gamma=-1.0), "gamma"), (dict(weighting="exact"), "weighting"),
                          (dict(projection_iterations=0), "projection_iterations"), (dict(eta=2.0), "eta")):
        with pytest.raises(ValueError, match=match):
            PSLD(prior, **kwargs)
    pr = operators.make("phase-retrieval", img_size=(1, 8, 8), seed=0)
    with pytest.raises(TypeError, match="psld: needs a linear operator"):
        sampler(pr(x.clamp(0, 1), seed=1), pr)
