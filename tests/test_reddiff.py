import math

import pytest
import torch
from conftest import demo_problem_psnr, gaussian_blur_problem, gaussian_inpainting_problem, rel_err

from invdiff.priors import GaussianPrior
from invdiff.samplers import SamplerDivergedError
from invdiff.samplers.reddiff import REDDiff, snr_weight
from invdiff.samplers.steps import ddpm_sigmas


@pytest.mark.parametrize("operator", ["inpainting", "blur"])
def test_reddiff_point_estimate_near_gaussian_posterior_mean(operator):
    """RED-Diff's point estimate vs the closed-form posterior mean (= MAP) of a Gaussian prior.

    Measured (defaults, 100 steps, one run): relative error ||mu - m|| / ||m_prior - m|| 0.21
    (inpainting), 0.17 (blur); the mean over 16 runs 0.16 / 0.15. Monte-Carlo floor of 16 exact
    posterior samples 0.04 (not reachable: RED-Diff is a biased optimiser, not a sampler).
    """
    prior, physics, x, y = gaussian_inpainting_problem()
    if operator == "blur":
        physics, y = gaussian_blur_problem(prior, x)
    post = prior.posterior(y, physics, 0.05)
    prior_mean = prior.means.reshape(1, *prior.image_shape).float()
    sampler = REDDiff(prior, clip=None)
    mu = sampler(y, physics, generator=torch.Generator().manual_seed(2))
    err = rel_err(mu, post.mean.float(), prior_mean)
    assert err < 0.3, f"relative error of the point estimate {err:.3f}"
    assert rel_err(physics.A_dagger(y), post.mean.float(), prior_mean) > 2 * err


def test_snr_weight_is_the_paper_linear_weight_in_ve():
    """w_t = sqrt(1 - abar_t) / sqrt(abar_t) on the DDPM schedule equals 2 sigma_t in VE units."""
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)
    table = ddpm_sigmas()
    for t in (0, 10, 500, 999):
        assert math.isclose(snr_weight(table[999 - t].item()), math.sqrt((1 - abar[t]) / abar[t]), rel_tol=1e-9)
    with pytest.raises(ValueError, match="weighting"):
        REDDiff(GaussianPrior(0.5, 0.1, image_shape=(1, 4, 4)), weighting="magic")


def test_divergence_names_the_step():
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = REDDiff(prior, steps=10, clip=None)
    start = torch.full((1, 1, 8, 8), 0.5)
    start[0, 0, 3, 3] = float("inf")  # an overflowing iterate
    with pytest.raises(SamplerDivergedError, match=r"reddiff: diverged at step 0 \(sigma="):
        sampler(y, physics, generator=torch.Generator().manual_seed(0), x_init=start)
    assert sampler.last_run.nfe == 1


@pytest.mark.parametrize("task, gap, gain", [("ct-sparse-30", 7.0, 0.5), ("mri-4x", 1.5, 0.3)])
def test_reddiff_beats_the_baseline_on_ct_and_mri(task, gap, gain):
    """At its defaults on the 32x32 demo problem, three images and masks: above the baseline
    and within ``gap`` dB of the exact posterior mean. Measured (PSNR averaged over the three),
    old defaults (lam 0.05, DDPM schedule): CT 39.1 dB vs FBP 32.2 and exact 44.8; MRI 21.1 vs
    zero-filled 20.0 and exact 21.7. With the EDM schedule and the data term over ||A||^2
    (issue 19; ``REDDiff`` docstring) MRI loses a little on this smooth Gaussian prior, where
    on the shipped priors it gains; the paper's lam 0.25 gave 20.5 here."""
    red, base, exact = demo_problem_psnr(lambda prior: REDDiff(prior), task, samples=1)
    assert red > base + gain and red > exact - gap, (red, base, exact)


def test_the_data_term_is_normalised_by_the_operator_gain():
    """With ``normalize_operator`` (default) the iterates do not depend on the gain of ``A``:
    ``(k A, k y)`` gives the same result as ``(A, y)`` at the same noise weight. Without it the
    data term grows with ``k^2`` and drowns the regulariser (issue 19: RED-Diff on CT, whose
    ``||A||^2`` is in the thousands, stayed near the FBP start whatever ``lam`` was)."""
    import deepinv as dinv

    prior, physics, x, y = gaussian_inpainting_problem()
    k = 40.0
    scaled = dinv.physics.LinearPhysics(A=lambda v: k * physics.A(v), A_adjoint=lambda v: k * physics.A_adjoint(v))
    start = physics.A_adjoint(y).clamp(0, 1)
    outs = {}
    for normalize in (True, False):
        for name, (op, meas) in {"unit": (physics, y), "scaled": (scaled, k * y)}.items():
            sampler = REDDiff(prior, steps=30, noise_sigma=0.05, normalize_operator=normalize, clip=None)
            outs[normalize, name] = sampler(meas, op, generator=torch.Generator().manual_seed(0), x_init=start)
    assert torch.allclose(outs[True, "unit"], outs[True, "scaled"], atol=1e-4)
    assert (outs[False, "unit"] - outs[False, "scaled"]).abs().max() > 1e-2
    assert torch.allclose(outs[True, "unit"], outs[False, "unit"], atol=1e-4)  # ||A|| = 1 (a mask): no change

