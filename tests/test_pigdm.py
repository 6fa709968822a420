"""ΠGDM (Song et al., ICLR 2023): the guidance solve, the exact posterior, determinism, refusals."""

import deepinv as dinv
import pytest
import torch
from conftest import gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff import operators
from invdiff.priors.analytic import operator_matrix
from invdiff.samplers import IncompatibleError
from invdiff.samplers.pigdm import PiGDM, gram_diagonal
from invdiff.samplers.steps import GaussianGuidance


def test_closed_form_solve_equals_cg_and_dense_on_diagonal_gram():
    """Inpainting (A A^T = diag(mask)): the closed form of (r^2 A A^T + s^2 I)^{-1} v equals
    the shared CG solve run to convergence and a dense solve with the operator's matrix."""
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    y = y.double()
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r2, s2 = 0.3, 0.05**2
    d = gram_diagonal(physics, y)
    assert d is not None and torch.equal(d, physics.mask.expand_as(y).double())
    closed = PiGDM(prior, noise_sigma=0.05).likelihood_precision(physics, y)(r2)(v)
    cg = GaussianGuidance(physics, s2, None, cg_iterations=50, cg_tol=1e-12, warm_start=False).precision(r2)(v)
    amat = operator_matrix(physics, (1, 8, 8))
    dense = torch.linalg.solve(r2 * amat @ amat.T + s2 * torch.eye(64, dtype=torch.float64), v.reshape(-1))
    torch.testing.assert_close(closed, cg, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(closed.reshape(-1), dense, rtol=1e-9, atol=1e-9)


def test_gram_diagonal_only_where_it_is_diagonal():
    """Blur, CT and MRI of real images are not diagonal (they go through CG)."""
    y = torch.zeros(1, 1, 16, 16)
    for task in ("deblur-gauss", "ct-sparse-30", "mri-4x"):
        physics = operators.make(task, img_size=(1, 16, 16), seed=0)
        assert gram_diagonal(physics, physics.A(y)) is None, task
    assert gram_diagonal(dinv.physics.Denoising(), y).eq(1).all()


def test_cg_solve_on_blur_matches_dense():
    """Blur (A A^T not diagonal): the warm-started CG of the sampler, converged, is the dense solve."""
    prior, _, x, _ = gaussian_inpainting_problem(shape=(1, 8, 8))
    physics, y = gaussian_blur_problem(prior, x)
    y = y.double()
    sampler = PiGDM(prior, noise_sigma=0.05, cg_iterations=200, cg_tol=1e-12)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sampler.likelihood_precision(physics, y)(0.2)(v)
    amat = operator_matrix(physics, (1, 8, 8))
    dense = torch.linalg.solve(0.2 * amat @ amat.T + 0.05**2 * torch.eye(64, dtype=torch.float64), v.reshape(-1))
    torch.testing.assert_close(out.reshape(-1), dense, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("operator, tol", [("inpainting", 0.2), pytest.param("blur", 0.15, marks=pytest.mark.slow)])
def test_pigdm_near_gaussian_posterior_mean(operator, tol):
    """Mean of 32 ΠGDM samples (defaults: 100 steps, eta 1) vs the exact posterior mean.

    Measured (seed 2): relative error 0.13 (inpainting), 0.09 (blur); the samples are
    under-dispersed (std ratio 0.55-0.66), asserted loosely."""
    prior, physics, x, y = gaussian_inpainting_problem()
    if operator == "blur":
        physics, y = gaussian_blur_problem(prior, x)
    post = prior.posterior(y, physics, 0.05)
    out = PiGDM(prior, clip=None).sample(y, physics, n=32, generator=torch.Generator().manual_seed(2))
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    err = rel_err(out.mean, post.mean.float(), prior_mean)
    ratio = (out.std.mean() / post.std.mean()).item()
    assert err < tol, f"relative error of the posterior mean {err:.3f}"
    assert 0.4 < ratio < 1.1, f"std ratio {ratio:.3f}"


def test_zero_guidance_is_plain_ddim_and_runs_are_deterministic():
    """zeta = 0 is the unconditional DDIM sampler (same noise); a seed fixes the run; the
    guidance moves the sample towards the data."""
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    a = PiGDM(prior, steps=20, clip=None)(y, physics, generator=torch.Generator().manual_seed(0))
    b = PiGDM(prior, steps=20, clip=None)(y, physics, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    free = PiGDM(prior, steps=20, zeta=0.0, clip=None)(y, physics, generator=torch.Generator().manual_seed(0))
    mask = physics.mask
    assert ((a - y) * mask).norm() < 0.5 * ((free - y) * mask).norm()
    # zeta = 0 by hand: the DDIM chain with the same noise draws
    from invdiff.samplers.steps import ddim_step, randn_like

    g = torch.Generator().manual_seed(0)
    sigmas = PiGDM(prior, steps=20).sigmas.tolist()
    xt = sigmas[0] * randn_like(torch.zeros(1, 1, 8, 8), g)
    for s, sn in zip(sigmas[:-1], sigmas[1:]):
        noise = randn_like(xt, g) if sn > 0 else None
        xt = ddim_step(xt, prior.denoise(xt, s).float(), s, sn, 1.0, noise)
    torch.testing.assert_close(free, xt, rtol=1e-5, atol=1e-6)


def test_refuses_nonlinear_operators_before_any_work():
    prior, _, x, _ = gaussian_inpainting_problem(shape=(1, 16, 16))
    physics = operators.make("phase-retrieval", img_size=(1, 16, 16), seed=0)
    y = physics(x)
    with pytest.raises(IncompatibleError, match="pigdm: needs a linear operator"):
        PiGDM(prior, steps=3)(y, physics)
    with pytest.raises(ValueError, match="min_noise"):
        PiGDM(prior, min_noise=0.0)
