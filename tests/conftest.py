import deepinv as dinv
import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture
def device():
    return torch.device("cpu")


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(0)


def gaussian_inpainting_problem(shape=(1, 16, 16), noise_sigma=0.05, seed=0, missing=0.5):
    """A Gaussian prior, a random-mask inpainting operator and one measurement, all seeded."""
    from invdiff.priors import GaussianPrior

    prior = GaussianPrior.stationary(shape, length_scale=2.0, variance=0.05, mean=0.5)
    g = torch.Generator().manual_seed(seed)
    x = prior.sample(1, g).float()
    mask = (torch.rand(shape, generator=g) > missing).float()
    physics = dinv.physics.Inpainting(
        shape, mask=mask, noise_model=dinv.physics.GaussianNoise(noise_sigma, rng=torch.Generator().manual_seed(seed + 1))
    )
    return prior, physics, x, physics(x)


def gaussian_blur_problem(prior, x, noise_sigma=0.05, seed=4):
    """Gaussian blur (std 1, circular BlurFFT) with seeded Gaussian noise, and its measurement of ``x``."""
    physics = dinv.physics.BlurFFT(
        prior.image_shape,
        filter=dinv.physics.functional.blur.gaussian_blur(sigma=1.0),
        noise_model=dinv.physics.GaussianNoise(noise_sigma, rng=torch.Generator().manual_seed(seed)),
    )
    return physics, physics(x)


def rel_err(est, exact, ref):
    """``||est - exact|| / ||ref - exact||``: 0 is exact, 1 is no better than ``ref``."""
    return ((est - exact).norm() / (ref - exact).norm()).item()


def psnr(a, b):
    """PSNR in dB for images on [0, 1]."""
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()
