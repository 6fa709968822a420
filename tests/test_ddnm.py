import math

import pytest
import torch
from conftest import gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff import operators
from invdiff.priors import DiffusionPrior, GaussianPrior
from invdiff.samplers import IncompatibleError
from invdiff.samplers.ddnm import DDNM
from invdiff.samplers.ddrm import DDRM
from invdiff.samplers.steps.svd import spectral_view

SHAPE = (1, 16, 16)


@pytest.fixture(scope="module")
def prior():
    return GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.05, mean=0.5)


@pytest.mark.parametrize("task, shape", [
    ("inpaint-random-70", (1, 8, 10)),
    ("inpaint-box", (2, 8, 8)),
    ("sr-2x", (1, 8, 10)),
    ("mri-4x", (1, 8, 10)),
    ("mri-4x", (2, 8, 8)),
    ("deblur-gauss", (1, 9, 8)),
])
def test_noiseless_output_is_range_space_consistent(task, shape):
    """Noiseless y: the last step returns x0 - A^+(A x0 - y), so A x = y exactly. For blur,
    exactly in the singular coordinates above the floor (those below it are left to the prior)."""
    prior = GaussianPrior.stationary(shape, length_scale=2.0, variance=0.05, mean=0.5)
    physics = operators.make(task, img_size=shape, noise="none", seed=0)
    y = physics(prior.sample(1, torch.Generator().manual_seed(1)).float())
    out = DDNM(prior, steps=3)(y, physics, generator=torch.Generator().manual_seed(0))
    if task == "deblur-gauss":
        view = spectral_view(physics, shape, y, floor=3e-2)
        assert (view.y_bar(physics.A(out)) - view.y_bar(y)).abs().max() < 1e-4
        assert (physics.A(out) - y).abs().max() > 1e-4  # (not in the floored coordinates)
    else:
        assert (physics.A(out) - y).abs().max() < 1e-5


@pytest.mark.parametrize("operator, bounds", [
    ("inpainting", (0.15, (0.65, 1.0))), pytest.param("blur", (0.12, (0.3, 0.6)), marks=pytest.mark.slow)])
def test_ddnm_plus_against_the_gaussian_posterior(prior, operator, bounds):
    """Mean of 32 DDNM+ samples at the defaults (100 steps, eta 0.85) vs the exact posterior.

    Measured (seed 2): mean error 0.09 (inpainting), 0.06 (blur); std ratio 0.82 / 0.43: the
    range-space correction keeps the measured coordinates near y, with less spread than the
    posterior's on blur."""
    _, physics, x, y = gaussian_inpainting_problem()
    if operator == "blur":
        physics, y = gaussian_blur_problem(prior, x)
    post = prior.posterior(y, physics, 0.05)
    out = DDNM(prior).sample(y, physics, n=32, generator=torch.Generator().manual_seed(2))
    prior_mean = prior.means.reshape(1, *SHAPE).float()
    err = rel_err(out.mean, post.mean.float(), prior_mean)
    ratio = (out.std.mean() / post.std.mean()).item()
    assert err < bounds[0], f"relative error of the posterior mean {err:.3f}"
    assert bounds[1][0] < ratio < bounds[1][1], f"std ratio {ratio:.3f}"


def test_ddnm_plus_weights_keep_the_noise_level(prior):
    """Eq. 19 (SVD form): in every coordinate the noise of the scaled range correction
    (lambda rho) and the fresh noise (d1) and the kept noise estimate (d2) add up to sigma'."""
    physics = operators.make("deblur-gauss", img_size=SHAPE, noise="none")
    view = spectral_view(physics, SHAPE, torch.zeros(()), floor=3e-2)
    rho = 0.05 / view.s.where(view.s > 0, torch.full_like(view.s, math.inf))
    sampler = DDNM(prior)
    for sigma_next in (2.0, 0.3, 0.05, 0.01, 1e-3):
        lam, d1, d2 = sampler._weights(view, rho, sigma_next)
        total = (lam * rho.where(view.s > 0, torch.zeros_like(rho))) ** 2 + d1**2 + d2**2
        torch.testing.assert_close(total, torch.full_like(total, sigma_next**2), rtol=1e-5, atol=0)
        assert ((lam == 1) | (sigma_next < rho)).all() and (lam <= 1).all()
    assert sampler._weights(view, None, 0.3) == (1.0, 0.85 * 0.3, math.sqrt(1 - 0.85**2) * 0.3)


def test_ddnm_plus_equals_ddrm_with_eta_b_one(prior):
    """DDNM+ in SVD form and DDRM with eta_b = 1 take the same step in every coordinate (Lambda
    = 1 is DDRM's 'noisier than y' rule, Lambda < 1 its 'less noisy' rule); they differ only in
    the start (DDRM's eq. 7 vs pure noise), which the first step at sigma_max forgets. Two
    transcriptions of two official codes agree."""
    _, physics, x, y = gaussian_inpainting_problem()
    a = DDNM(prior, steps=10)(y, physics, generator=torch.Generator().manual_seed(4))
    b = DDRM(prior, steps=10, eta_b=1.0)(y, physics, generator=torch.Generator().manual_seed(4))
    assert (a - b).abs().max() < 1e-3


def test_pseudo_inverse_is_exact_not_the_operators_baseline(prior):
    """The range correction uses V Sigma^+ U^T, not the operator's A_dagger (a Wiener filter for
    blur): A A^+ y = y for the first, not for the second."""
    physics = operators.make("deblur-gauss", img_size=SHAPE, noise="none", kernel_std=1.0)
    y = physics(prior.sample(1, torch.Generator().manual_seed(1)).float())
    view = spectral_view(physics, SHAPE, y)
    assert (physics.A(view.pinv(y)) - y).norm() < 1e-4 * y.norm()
    assert (physics.A(physics.A_dagger(y)) - y).norm() > 1e-3 * y.norm()


def test_determinism_and_randomness_from_the_generator(prior):
    _, physics, x, y = gaussian_inpainting_problem()
    a = DDNM(prior, steps=5)(y, physics, generator=torch.Generator().manual_seed(5))
    b = DDNM(prior, steps=5)(y, physics, generator=torch.Generator().manual_seed(5))
    c = DDNM(prior, steps=5)(y, physics, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)


class _NoNetwork(DiffusionPrior):
    def _denoise(self, x, sigma):
        raise AssertionError("the network was called")


def test_refuses_ct_before_any_network_call():
    prior = _NoNetwork(SHAPE, 0.002, 80.0, 0.5)
    physics = operators.make("ct-sparse-30", img_size=SHAPE)
    y = physics(torch.rand(1, *SHAPE, generator=torch.Generator().manual_seed(0)))
    message = r"^ddnm: needs an operator with a known SVD \(.*ParallelBeamCT"
    with pytest.raises(IncompatibleError, match=message) as info:
        DDNM(prior)(y, physics, generator=torch.Generator().manual_seed(0))
    assert "\n" not in str(info.value)
