"""BlindDPS and the blind deblurring operator, against problems with known answers.

* With the kernel prior a point mass at the true kernel, BlindDPS is DPS with that kernel:
  its posterior mean and spread match the closed-form Gaussian posterior as closely as DPS's.
* With the image prior a point mass at the true image (a texture), the kernel chain alone
  must find the kernel that blurred it.
* Images in one batch have their own kernels and their own chains.
"""

import pytest
import torch
from deepinv.physics import BlurFFT

from invdiff import operators, samplers
from invdiff.operators.natural import BlindBlur, WienerBlurFFT, circular_blur
from invdiff.priors import GaussianPrior
from invdiff.samplers import IncompatibleError
from invdiff.operators.kernels import centre, centroid
from invdiff.operators.natural import fourier_shift
from invdiff.samplers.blind_dps import centring_shift, normalised_kernel, roll_each

SHAPE = (1, 16, 16)
KERNEL = torch.tensor([[0.0, 1, 2, 0], [1, 3, 2, 0], [0, 2, 1, 0], [0, 0, 0, 0]])[None, None]
KERNEL = KERNEL / KERNEL.sum()
SIGMA = 0.02


@pytest.fixture(scope="module")
def problem():
    prior = GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.05, mean=0.5)
    physics = operators.make("deblur-blind", SHAPE, kernel_size=4, noise_sigma=SIGMA)
    x = prior.sample(1, torch.Generator().manual_seed(0)).float()
    y = physics(x, seed=1, filter=KERNEL)
    return prior, physics, x, y


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_blind_blur_is_the_circular_blur_adjoint_and_differentiable_in_the_kernel():
    physics = BlindBlur((1, 16, 16), kernel_size=4)
    g = torch.Generator().manual_seed(0)
    x, v = torch.rand(2, 1, 16, 16, generator=g, dtype=torch.float64), torch.rand(2, 1, 16, 16, generator=g,
                                                                                   dtype=torch.float64)
    k = KERNEL.double()
    torch.testing.assert_close(physics.A(x, filter=k), BlurFFT((1, 16, 16), filter=k).A(x))
    lhs, rhs = (physics.A(x, filter=k) * v).sum(), (x * physics.A_adjoint(v, filter=k)).sum()
    assert abs(float(lhs - rhs)) < 1e-12 * float(lhs.abs())
    # bilinear: the kernel's gradient is the image's correlation with the residual, by autograd
    kg = k.clone().requires_grad_(True)
    (g_auto,) = torch.autograd.grad((circular_blur(x, kg) * v).sum(), kg)
    eps = 1e-6
    e = torch.zeros_like(k)
    e[0, 0, 1, 2] = eps
    numeric = ((circular_blur(x, k + e) * v).sum() - (circular_blur(x, k - e) * v).sum()) / (2 * eps)
    assert abs(float(g_auto[0, 0, 1, 2] - numeric)) < 1e-6 * abs(float(numeric))
    # the kernel is hidden: A without one refuses, the measurement draws nature's kernel by its seed
    with pytest.raises(ValueError, match="the kernel is unknown to the solver"):
        physics.A(x)
    made = operators.make("deblur-blind", (1, 16, 16), kernel_size=4)  # noise std 0.01
    y = made(x.float(), seed=5)
    assert torch.equal(made.kernel(5), made.kernel(5)) and not torch.equal(made.kernel(5), made.kernel(6))
    assert float((y - made.A(x.float(), filter=made.kernel(5))).std()) == pytest.approx(0.01, rel=0.2)
    blurred = made.A(x.float(), filter=made.guess())  # A_dagger without a kernel: Wiener with the guess
    wiener = WienerBlurFFT((1, 16, 16), filter=made.guess(), wiener_reg=made.wiener_reg)
    torch.testing.assert_close(made.A_dagger(blurred), wiener.A_dagger(blurred), atol=1e-5, rtol=1e-5)


def test_nonblind_samplers_refuse_the_blind_task_and_blind_dps_refuses_known_operators(problem):
    prior, physics, x, y = problem
    with pytest.raises(IncompatibleError, match="dps: the operator's kernel is unknown"):
        samplers.make("dps", prior, steps=2)(y, physics)
    kernel_prior = GaussianPrior(0.25, 0.05, image_shape=(1, 4, 4))
    blind = samplers.make("blind-dps", prior, kernel_prior=kernel_prior, steps=2)
    with pytest.raises(IncompatibleError, match="blind-dps: needs a blind operator"):
        blind(y, BlurFFT(SHAPE, filter=KERNEL))
    wrong = samplers.make("blind-dps", prior, kernel_prior=GaussianPrior(0.25, 0.05, image_shape=(1, 8, 8)), steps=2)
    with pytest.raises(IncompatibleError, match=r"kernel prior takes \(1, 8, 8\) kernels but the operator's are 4x4"):
        wrong(y, physics)


def test_point_mass_kernel_prior_gives_the_exact_nonblind_posterior(problem):
    prior, physics, x, y = problem
    exact = prior.posterior(y, BlurFFT(SHAPE, filter=KERNEL), SIGMA)
    kernel_prior = GaussianPrior(KERNEL[0] / KERNEL.max(), 1e-8)
    blind = samplers.make("blind-dps", prior, kernel_prior=kernel_prior, steps=50, clip=None,
                          center_kernel=False)  # KERNEL is off-centre: no gauge to fix
    out = blind.sample(y, physics, n=16, generator=torch.Generator().manual_seed(0))
    dps = samplers.make("dps", prior, steps=50, clip=None, noise_sigma=SIGMA)
    ref = dps.sample(y, BlurFFT(SHAPE, filter=KERNEL), n=16, generator=torch.Generator().manual_seed(0))
    err, err_dps = _rel(out.mean, exact.mean), _rel(ref.mean, exact.mean)
    assert err < 0.03 and err < 1.5 * err_dps, (err, err_dps)  # measured 0.014 (DPS 0.014)
    ratio = float(out.std.double().mean() / exact.std.mean())
    assert 0.7 < ratio < 1.3, ratio  # measured 0.88
    torch.testing.assert_close(blind.kernel, KERNEL.expand(16, -1, -1, -1), atol=1e-4, rtol=0)


def test_known_image_recovers_each_images_kernel_in_a_batch(problem):
    g = torch.Generator().manual_seed(1)
    textures = torch.rand(2, 1, 16, 16, generator=g)
    other = torch.zeros_like(KERNEL)
    other[..., 1:3, 0:4] = 1 / 8  # a horizontal motion
    kernels = torch.cat([KERNEL, other])
    physics = operators.make("deblur-blind", SHAPE, kernel_size=4, noise_sigma=SIGMA)
    y = physics(textures, seed=1, filter=kernels)  # image b blurred by kernel b

    class KnownImages(GaussianPrior):  # a point mass at each image of the batch
        def _denoise(self, xt, sigma):
            return textures.to(xt.dtype).expand_as(xt)

    image_prior = KnownImages(0.5, 1e-8, image_shape=SHAPE)
    kernel_prior = GaussianPrior(0.25, 0.05, image_shape=(1, 4, 4))
    blind = samplers.make("blind-dps", image_prior, kernel_prior=kernel_prior, steps=200, clip=None,
                          center_kernel=False)
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    blind(y, physics, generator=gens)
    both = blind.kernel
    err = ((both - kernels).flatten(1).norm(dim=1) / kernels.flatten(1).norm(dim=1)).tolist()
    uniform = float((torch.full_like(KERNEL, 1 / 16) - KERNEL).norm() / KERNEL.norm())
    assert max(err) < 0.15 < 0.5 * uniform, err  # measured 0.07-0.09 over six seeds (the uniform kernel: 0.79)
    assert torch.allclose(both.sum((-2, -1)), torch.ones(2, 1)) and (both >= 0).all()


def test_normalised_kernel_sums_to_one_and_seeded_runs_repeat(problem):
    u = torch.rand(3, 1, 4, 4) - 0.2
    assert torch.allclose(normalised_kernel(u).sum((-2, -1)), torch.ones(3, 1))
    prior, physics, x, y = problem
    kernel_prior = GaussianPrior(0.25, 0.05, image_shape=(1, 4, 4))
    blind = samplers.make("blind-dps", prior, kernel_prior=kernel_prior, steps=10)
    a = blind(y, physics, generator=torch.Generator().manual_seed(3))
    ka = blind.kernel.clone()
    b = blind(y, physics, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and torch.equal(ka, blind.kernel)
    assert blind.last_run.extra["kernel_nfe"] == 10 and blind.last_run.nfe == 10


def test_the_translation_gauge_centres_the_kernel_and_keeps_the_blur():
    k = torch.zeros(2, 1, 8, 8)
    k[0, 0, 1, 2] = 1.0  # a delta at (1, 2), 2.5 and 1.5 px from the centre 3.5: rounded (half to even) (2, 2)
    k[1, 0, 3:5, 3:5] = 0.25  # centred already
    shift = centring_shift(k)
    assert shift.tolist() == [[2, 2], [0, 0]]
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    moved_k, moved_x = roll_each(k, shift), roll_each(x, -shift)
    torch.testing.assert_close(circular_blur(moved_x, moved_k), circular_blur(x, k), atol=1e-6, rtol=0)
    assert torch.equal(roll_each(x, torch.zeros(2, 2, dtype=torch.long)), x)
    # the sub-pixel part: a Fourier shift commutes with the blur; a whole-pixel one is the roll
    offset = torch.tensor([[0.3, -0.45], [1.25, 0.0]])
    torch.testing.assert_close(circular_blur(fourier_shift(x, offset), k), fourier_shift(circular_blur(x, k), offset),
                               atol=1e-5, rtol=0)  # a shift commutes with the blur
    torch.testing.assert_close(fourier_shift(x, torch.tensor([[1.0, 2.0], [0.0, -3.0]])),
                               roll_each(x, torch.tensor([[1, 2], [0, -3]])), atol=1e-5, rtol=0)
    # centre: the centroid at the centre exactly, mass and sign kept; a centred kernel unchanged
    c = centre(k)
    assert centroid(c).abs().max() < 1e-4 and torch.allclose(c.sum((-2, -1)), torch.ones(2, 1))
    assert (c >= 0).all() and torch.allclose(c[1], k[1], atol=1e-6)
    torch.testing.assert_close(centroid(k), torch.tensor([[-2.5, -1.5], [0.0, 0.0]]))


def test_blind_dps_returns_the_pair_in_the_centred_gauge(problem):
    """The returned kernel's centroid is the centre (sub-pixel), and the returned image moved
    with it: a kernel prior that is a point mass at a kernel less than half a pixel off centre
    (so the whole-pixel gauge of the loop never fires) gives back that kernel centred, and the
    image of the run without the gauge moved by the kernel's offset, with the same blur."""
    prior, physics, x, y = problem
    off = torch.tensor([[0.0, 0.1, 0.1, 0.0], [0.1, 0.3, 0.3, 0.1], [0.0, 0.2, 0.1, 0.0], [0.0, 0.05, 0.0, 0.0]])
    off = (off / off.sum())[None, None]
    offset = centroid(off)
    assert offset.abs().max() < 0.5 and offset.abs().max() > 0.3
    runs = {}
    for gauge in (False, True):
        blind = samplers.make("blind-dps", prior, kernel_prior=GaussianPrior(off[0] / off.max(), 1e-8), steps=20,
                              clip=None, center_kernel=gauge)
        runs[gauge] = (blind(y, physics, generator=torch.Generator().manual_seed(0)), blind.kernel)
    (x_free, k_free), (x_gauged, k_gauged) = runs[False], runs[True]
    torch.testing.assert_close(k_free, off, atol=1e-4, rtol=0)
    assert centroid(k_gauged).abs().max() < 1e-3
    torch.testing.assert_close(x_gauged, fourier_shift(x_free, offset), atol=1e-5, rtol=0)
    # the same blur up to the bilinear interpolation of the centred kernel
    assert _rel(circular_blur(x_gauged, k_gauged), circular_blur(x_free, off)) < 0.03  # measured 0.016
