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


def demo_problem_psnr(make_sampler, task, samples=8, seeds=(0, 1, 2)):
    """PSNR (dB, averaged over three images and operators) of a sampler's mean of ``samples``
    samples, of the baseline ``A_dagger`` and of the exact posterior mean, on the 32x32
    Gaussian-prior demo problem (``invdiff demo --analytic``). Several images, because on some
    MRI masks the exact posterior mean itself is barely above zero-filling."""
    from deepinv.loss.metric import PSNR

    from invdiff import operators
    from invdiff.priors import GaussianPrior

    prior = GaussianPrior.stationary((1, 32, 32), length_scale=32 / 12, variance=0.02, mean=0.5)
    metric = PSNR()
    ours, base, exact = [], [], []
    for seed in seeds:
        truth = prior.sample(1, torch.Generator().manual_seed(10000 + seed)).float()
        physics = operators.make(task, img_size=(1, 32, 32), seed=seed)
        y = physics(truth, seed=1)
        sampler = make_sampler(prior)
        out = sampler.sample(y, physics, n=samples, generator=torch.Generator().manual_seed(0)).mean
        ours.append(metric(out, truth).item())
        base.append(metric(physics.A_dagger(y), truth).item())
        exact.append(metric(prior.posterior(y, physics, float(physics.noise_model.sigma)).mean.float(), truth).item())
    return tuple(sum(v) / len(v) for v in (ours, base, exact))


def latent_gaussian_problem(task="inpaint", noise=0.05):
    """A linear-decoder Gaussian latent prior (16x16 images from 8x8 latents, exact posterior),
    50 % inpainting (or the named task) with Gaussian noise: ``(prior, physics, x, y)``."""
    from invdiff import operators
    from invdiff.priors import LatentDiffusionPrior

    prior = LatentDiffusionPrior.linear_gaussian((1, 8, 8), factor=2, length_scale=1.0, variance=0.05)
    shape = prior.image_shape
    if task == "inpaint":
        mask = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5).float()
        physics = dinv.physics.Inpainting(shape, mask=mask, noise_model=dinv.physics.GaussianNoise(
            noise, rng=torch.Generator().manual_seed(1)))
    else:
        physics = operators.make(task, img_size=shape, seed=0, noise_sigma=noise)
    x = prior.sample(1, torch.Generator().manual_seed(2)).float()
    return prior, physics, x, physics(x)
