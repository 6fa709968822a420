"""FPS / FPS-SMC (filtering posterior sampling): the exact Gaussian conditional of each step
against dense closed forms, the measurement bridge, the posterior of analytic priors,
particle batching, determinism and the refusal of nonlinear operators."""

import math

import deepinv as dinv
import pytest
import torch
from conftest import gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff import operators
from invdiff.operators import SingleCoilMRI
from invdiff.priors import DiffusionPrior, GaussianPrior
from invdiff.priors.analytic import operator_matrix
from invdiff.samplers import IncompatibleError
from invdiff.samplers.fps import FPS, GaussianConditional

TINY = (1, 4, 4)  # d = 16: dense matrices are cheap


@pytest.fixture(autouse=True)
def one_thread():
    """These problems are small matrix products: a second thread only adds contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class RecordingPrior(DiffusionPrior):
    """Delegates to ``inner`` and records the batch size of every network call."""

    def __init__(self, inner):
        super().__init__(inner.image_shape, inner.sigma_min, inner.sigma_max, inner.sigma_data)
        self.inner, self.batches = inner, []

    def _denoise(self, x, sigma):
        self.batches.append(x.shape[0])
        return self.inner._denoise(x, sigma)


def _tiny_operator(kind):
    if kind == "inpainting":
        mask = (torch.rand(TINY, generator=torch.Generator().manual_seed(0)) > 0.5).float()
        return dinv.physics.Inpainting(TINY, mask=mask)
    if kind == "blur":
        return dinv.physics.BlurFFT(TINY, filter=dinv.physics.functional.blur.gaussian_blur(sigma=1.0))
    if kind == "mri":  # a DecomposablePhysics whose A is not U diag V^T (real images): CG
        mask = torch.tensor([[1.0, 1, 0, 1], [1, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])
        return SingleCoilMRI(mask, img_size=TINY)
    return operators.make("sr-2x", img_size=TINY, seed=0).double()  # not decomposable: CG


@pytest.mark.parametrize("kind, svd", [("inpainting", True), ("blur", True), ("mri", False), ("sr", False)])
def test_step_is_the_exact_gaussian_conditional(kind, svd):
    """The Kalman draw x = m + sqrt(v) z + v A^T S^-1 (y - A(m + sqrt(v) z) - s n) is affine in
    (z, n): at z = n = 0 it is the dense posterior mean of N(m, v I) given y = A x + s n, its
    Jacobian J gives J J^T = (I / v + A^T A / s^2)^-1, and the log weights of two means differ
    by the dense log N(y; A m, s^2 I + v A A^T)."""
    physics = _tiny_operator(kind)
    a = operator_matrix(physics, TINY)  # (p, d), float64
    p_dim, d = a.shape
    s, v = 0.1, 0.3
    kalman = GaussianConditional(physics, s, cg_iterations=200, cg_tol=1e-12)
    g = torch.Generator().manual_seed(1)
    y = physics.A(torch.rand(1, *TINY, generator=g, dtype=torch.float64))
    assert kalman.check_svd(y) is svd
    m = torch.rand(2, *TINY, generator=g, dtype=torch.float64)
    zeros_z, zeros_n = torch.zeros(2, *TINY, dtype=torch.float64), torch.zeros_like(y.repeat(2, 1, 1, 1))
    x_mean, log_lik = kalman.sample(m, v, y.repeat(2, 1, 1, 1), zeros_z, zeros_n, weighted=True)

    precision = torch.eye(d, dtype=torch.float64) / v + a.T @ a / s**2
    cov = torch.linalg.inv(precision)
    dense_mean = (cov @ (m.reshape(2, d).T / v + (a.T @ y.reshape(p_dim, 1)) / s**2)).T
    torch.testing.assert_close(x_mean.reshape(2, d), dense_mean, rtol=1e-6, atol=1e-8)
    # the covariance: columns of the Jacobian from unit z and n
    basis_z = torch.eye(d, dtype=torch.float64).reshape(d, *TINY)
    basis_n = torch.eye(p_dim, dtype=torch.float64).reshape(p_dim, *y.shape[1:])
    m0, y0 = m[:1].repeat(d + p_dim, 1, 1, 1), y.repeat(d + p_dim, 1, 1, 1)
    z = torch.cat([basis_z, torch.zeros(p_dim, *TINY, dtype=torch.float64)])
    n = torch.cat([torch.zeros(d, *y.shape[1:], dtype=torch.float64), basis_n])
    cols = (kalman.sample(m0, v, y0, z, n)[0] - x_mean[:1]).reshape(d + p_dim, d)
    torch.testing.assert_close(cols.T @ cols, cov, rtol=1e-6, atol=1e-8)
    # the weights: log N(y; A m, S) up to the constant shared by the two means
    sigma_y = s**2 * torch.eye(p_dim, dtype=torch.float64) + v * a @ a.T
    r = y.reshape(1, p_dim) - m.reshape(2, d) @ a.T
    dense = -0.5 * (r @ torch.linalg.solve(sigma_y, r.T)).diagonal()
    torch.testing.assert_close(log_lik[0] - log_lik[1], dense[0] - dense[1], rtol=1e-6, atol=1e-8)


def test_measurement_bridge_has_the_forward_marginals():
    """The y-path (DDIM bridge of rate c towards y) has the marginals y_i = y + sigma_i A eps of
    the forward noising: checked on 4000 paths of a 2x2 identity measurement."""
    prior = GaussianPrior.stationary((1, 2, 2), length_scale=1.0)
    sampler = FPS(prior, steps=6, schedule="karras")
    sampler.image_shape = (1, 2, 2)
    physics = dinv.physics.Denoising()
    g = torch.Generator().manual_seed(0)
    y = torch.full((4000, 1, 2, 2), 0.3)
    sigmas = sampler.sigmas.tolist()
    level = y + sigmas[0] * torch.randn(y.shape, generator=g)
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        level = sampler._bridge(y, level, sigma, sigma_next, physics, g)
        if sigma_next > 0:
            assert abs((level - y).std().item() / sigma_next - 1) < 0.04
            assert abs((level - y).mean().item()) < 0.05 * sigma_next
    assert torch.equal(level, y)  # the path ends at the measurement


@pytest.mark.parametrize("operator, particles, tol", [("inpainting", 5, 0.12), ("blur", 5, 0.08),
                                                      pytest.param("inpainting", 1, 0.13, marks=pytest.mark.slow)])
def test_samples_match_the_gaussian_posterior(operator, particles, tol):
    """32 samples at the defaults (1000 steps, c 0.95) vs the exact posterior of a 16x16 Gaussian
    prior. Measured (seed 2): mean error 0.063 (inpainting) / 0.035 (blur) with 5 particles
    (1 particle: 0.077), Monte-Carlo floor of 32 exact samples 0.03-0.06; std ratio 0.72 / 0.66
    (1 particle 0.79 / 0.73): the filter conditions every level on the noised measurement, and
    comes out under-dispersed."""
    prior, physics, x, y = gaussian_inpainting_problem()
    if operator == "blur":
        physics, y = gaussian_blur_problem(prior, x)
    post = prior.posterior(y, physics, 0.05)
    sampler = FPS(prior, particles=particles, clip=None)
    out = sampler.sample(y, physics, n=32, generator=torch.Generator().manual_seed(2))
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    err = rel_err(out.mean, post.mean.float(), prior_mean)
    ratio = (out.std.mean() / post.std.mean()).item()
    assert err < tol, f"relative error of the posterior mean {err:.3f}"
    assert 0.55 < ratio < 1.0, f"std ratio {ratio:.3f}"
    assert sampler.last_run.extra["solver"] == "svd" and sampler.last_run.nfe == 1000


def test_particles_share_one_network_call_per_step():
    """K particles for B measurements (and n samples of each) go through the network together:
    one call of K * B * n images per step; nfe counts calls, not images."""
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    recording = RecordingPrior(prior)
    sampler = FPS(recording, steps=12, particles=3, clip=None)
    sampler.sample(y.repeat(2, 1, 1, 1), physics, n=2, generator=torch.Generator().manual_seed(0))
    assert recording.batches == [3 * 2 * 2] * 12
    assert sampler.last_run.nfe == 12 and sampler.last_run.nfe_backward == 0 and sampler.last_run.steps == 12
    assert sampler.last_run.extra["particles"] == 3 and sampler.last_run.extra["resampled"] > 0


def test_deterministic_and_each_measurement_reproducible_alone():
    """Same seed, same output; with one generator per measurement, a measurement's sample does
    not depend on the others of the batch (particle noise, bridge noise, resampling uniforms
    and the final draw all come from its generator)."""
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = FPS(prior, steps=20, particles=4)
    a = sampler(y, physics, generator=torch.Generator().manual_seed(3))
    b = sampler(y, physics, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert not torch.equal(a, sampler(y, physics, generator=torch.Generator().manual_seed(4)))
    y2 = torch.cat([y, physics(x.flip(-1))])
    both = sampler(y2, physics, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    alone = sampler(y2[1:], physics, generator=[torch.Generator().manual_seed(6)])
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)


def test_noiseless_measurement_is_fitted():
    """Without measurement noise (s floored at ``min_noise``) the sample fits y to that level."""
    prior, _, x, _ = gaussian_inpainting_problem(shape=(1, 8, 8))
    mask = (torch.rand(prior.image_shape, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    physics = dinv.physics.Inpainting(prior.image_shape, mask=mask)
    y = physics(x)
    out = FPS(prior, steps=50, particles=2, clip=None)(y, physics, generator=torch.Generator().manual_seed(0))
    assert (physics.A(out) - y).abs().max() < 3e-2  # the last step returns x0_hat, a little smoother than y


def test_nonlinear_operator_is_refused_before_any_work():
    prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
    recording = RecordingPrior(prior)
    physics = operators.make("phase-retrieval", img_size=(1, 8, 8), seed=0)
    y = physics(prior.sample(1, torch.Generator().manual_seed(0)).float())
    with pytest.raises(IncompatibleError, match=r"^fps: needs a linear operator") as info:
        FPS(recording, steps=5)(y, physics)
    assert "\n" not in str(info.value) and recording.batches == []


def test_bad_arguments():
    prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
    for bad in (dict(c=0.0), dict(c=1.5), dict(particles=0), dict(ess_threshold=2.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FPS(prior, **bad)
    assert math.isclose(FPS(prior).c, 0.95) and FPS(prior).particles == 5
