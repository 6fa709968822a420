"""LatentDiffusionPrior: the analytic case's exact posterior, the autoencoders, saving/loading,
and autoencoder training."""

import deepinv as dinv
import pytest
import torch

from invdiff import operators, priors
from invdiff.priors import (ConvAutoencoder, EDMPrior, GaussianPrior, GuidedDiffusionUNet, IdentityAutoencoder,
                            LatentDiffusionPrior, LinearAutoencoder, small_unet_config)
from invdiff.priors.analytic import operator_matrix
from invdiff.train.autoencoder import encode_images, reconstruction_psnr, train_autoencoder


def _image_space_posterior(prior: LatentDiffusionPrior, y, physics, s):
    """The same posterior computed the long way: the (rank-deficient) Gaussian image prior
    N(W mu + b, W Sigma W^T) conditioned on y = A x + e with the textbook formulas."""
    w, b = prior.autoencoder.weight, prior.autoencoder.bias.reshape(-1)
    mu_x = w @ prior.latent.means[0] + b
    cov_x = w @ prior.latent.covariances[0] @ w.T
    a = operator_matrix(physics, prior.image_shape)
    gain = cov_x @ a.T @ torch.linalg.inv(a @ cov_x @ a.T + s**2 * torch.eye(a.shape[0], dtype=torch.float64))
    mean = mu_x + gain @ (y.reshape(-1).double() - a @ mu_x)
    return mean, cov_x - gain @ a @ cov_x


@pytest.mark.parametrize("task", ["inpaint-random-70", "deblur-gauss", "ct-sparse-30"])
def test_linear_gaussian_posterior_is_exact(task):
    prior = LatentDiffusionPrior.linear_gaussian((1, 6, 6), factor=2, length_scale=1.0, variance=0.05)
    physics = operators.make(task, img_size=prior.image_shape, seed=0, noise_sigma=0.05)
    x = prior.sample(1, torch.Generator().manual_seed(0)).float()
    y = physics(x, seed=1)
    post = prior.posterior(y, physics, 0.05)
    mean, cov = _image_space_posterior(prior, y, physics, 0.05)
    assert torch.allclose(post.mean.reshape(-1), mean, atol=1e-8)
    assert torch.allclose(post.covariance[0], cov, atol=1e-8)
    assert torch.allclose(post.std.reshape(-1), torch.diagonal(cov).clamp_min(0).sqrt(), atol=1e-8)
    # exact samples: in the decoder's affine range, centred on the posterior mean
    samples = post.sample(4000, torch.Generator().manual_seed(2))[:, 0]
    ae = prior.autoencoder
    assert torch.allclose(ae.decode(ae.encode(samples)), samples, atol=1e-8)
    assert (samples.mean(0).reshape(-1) - mean).abs().max() < 4 * post.std.max() / 4000**0.5


def test_linear_autoencoder_round_trips_and_gradients():
    ae = LinearAutoencoder.upsampling((2, 3, 4), factor=2, bias=0.25)
    assert ae.image_shape == (2, 6, 8) and ae.latent_shape == (2, 3, 4)
    z = torch.randn(3, 2, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x = ae.decode(z)
    assert torch.allclose(ae.encode(x), z, atol=1e-10)  # exact on the range
    x_any = torch.rand(3, 2, 6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    proj = ae.decode(ae.encode(x_any))
    assert torch.allclose(ae.decode(ae.encode(proj)), proj, atol=1e-10)  # a projection (idempotent)
    # the decoder is the matrix W plus the bias, and autograd sees W
    assert torch.allclose(x.reshape(3, -1), z.reshape(3, -1) @ ae.weight.T + ae.bias.reshape(1, -1))
    torch.autograd.gradcheck(ae.decode, (z[:1].clone().requires_grad_(True),))
    # nearest-neighbour upsampling copies each latent pixel to a 2x2 block
    near = LinearAutoencoder.upsampling((1, 2, 2), factor=2, bias=0.0, mode="nearest")
    assert torch.equal(near.decode(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])),
                       torch.tensor([[[[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]]]]))
    with pytest.raises(ValueError, match="weight must be"):
        LinearAutoencoder(torch.zeros(5, 4), 0.0, (1, 2, 2), (1, 2, 2))


def test_prior_contract_parts():
    latent = GaussianPrior.stationary((1, 4, 4), length_scale=1.0, variance=0.05, mean=0.0)
    prior = LatentDiffusionPrior(LinearAutoencoder.upsampling((1, 4, 4), factor=2, bias=0.5), latent)
    assert prior.image_shape == (1, 8, 8) and prior.latent_shape == (1, 4, 4)
    assert (prior.sigma_min, prior.sigma_max, prior.sigma_data) == (latent.sigma_min, latent.sigma_max,
                                                                    latent.sigma_data)
    with pytest.raises(NotImplementedError, match="no pixel-space denoiser.*ReSample"):
        prior.denoise(torch.zeros(1, 1, 8, 8), 0.5)
    z = latent.sample(2, torch.Generator().manual_seed(0))
    assert torch.equal(prior.sample(2, torch.Generator().manual_seed(0)), prior.decode(z))
    assert torch.equal(prior.encode(prior.decode(z)), prior.autoencoder.encode(prior.autoencoder.decode(z)))
    with pytest.raises(TypeError, match="encode"):
        LatentDiffusionPrior(torch.nn.Identity(), latent)
    with pytest.raises(ValueError, match="LinearAutoencoder and a Gaussian"):
        LatentDiffusionPrior(IdentityAutoencoder((1, 4, 4)), latent).posterior(
            torch.zeros(1, 1, 4, 4), dinv.physics.Denoising(), 0.1)


def test_conv_autoencoder_shapes_and_bad_input():
    ae = ConvAutoencoder(channels=2, latent_channels=3, width=8, levels=3)
    assert ae.factor == 8 and ae.latent_shape((2, 16, 24)) == (3, 2, 3)
    x = torch.rand(2, 2, 16, 24)
    assert ae.encode(x).shape == (2, 3, 2, 3) and ae(x).shape == x.shape
    with pytest.raises(ValueError, match="multiples of 8"):
        ae.encode(torch.rand(1, 2, 12, 16))
    with pytest.raises(ValueError, match="expected"):
        ae.decode(torch.rand(1, 4, 2, 2))


def _small_latent_prior(seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = ConvAutoencoder(channels=1, latent_channels=4, width=8)
        net = GuidedDiffusionUNet(small_unet_config(8, channels=4, width=32, patch=1))
    latent = EDMPrior(net, (4, 8, 8), sigma_data=0.3, data_mean=0.1)
    return LatentDiffusionPrior(ae, latent)


def test_save_and_load_round_trip(tmp_path):
    prior = _small_latent_prior()
    path = priors.save(prior, tmp_path / "latent.safetensors", card={"data": "none, random weights"})
    loaded = priors.load(path)
    assert isinstance(loaded, LatentDiffusionPrior) and isinstance(loaded.autoencoder, ConvAutoencoder)
    assert loaded.image_shape == (1, 32, 32) and loaded.latent_shape == (4, 8, 8)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.encode(x), prior.encode(x)) and torch.equal(loaded.decode(z), prior.decode(z))
        assert torch.equal(loaded.latent.denoise(z, 0.7), prior.latent.denoise(z, 0.7))
    card = priors.model_card(path)
    assert card["family"] == "latent" and card["data"] == "none, random weights"
    assert not list(tmp_path.glob("*.tmp"))
    # the analytic case (a linear decoder with its matrices as buffers) round-trips too
    lin = LatentDiffusionPrior(LinearAutoencoder.upsampling((4, 8, 8), factor=2, bias=0.5), prior.latent)
    back = priors.load(priors.save(lin, tmp_path / "linear.safetensors"))
    x4 = torch.rand(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    assert torch.equal(back.decode(z), lin.decode(z)) and torch.equal(back.encode(x4), lin.encode(x4))
    # weights that do not fit the recorded architecture are refused, naming the keys
    other = LatentDiffusionPrior(ConvAutoencoder(channels=1, latent_channels=4, width=16), prior.latent)
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "latent.safetensors"))
    tensors.update({f"autoencoder.{k}": v for k, v in other.autoencoder.state_dict().items()})
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="shape mismatches"):
        priors.load(tmp_path / "bad.safetensors")


def test_saving_an_analytic_latent_prior_is_refused(tmp_path):
    prior = LatentDiffusionPrior.linear_gaussian((1, 4, 4))
    with pytest.raises(ValueError, match="no registered family saves it"):
        priors.save(prior, tmp_path / "gauss.safetensors")
    assert not list(tmp_path.iterdir())


def test_train_autoencoder_learns_and_is_reproducible():
    """A width-8 autoencoder, 100 steps on 16x16 smooth images (latents 4x4x4 = a quarter of the
    pixels). Measured: held-out PSNR 23.4 dB against 17.5 dB for the mean image (24.8 dB after
    150 steps)."""
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=2.0, variance=0.02, mean=0.5)
    x = prior.sample(128, torch.Generator().manual_seed(0)).float()
    held = prior.sample(32, torch.Generator().manual_seed(1)).float()
    state = torch.get_rng_state()
    result = train_autoencoder(x, 100, width=8, heldout=held, progress=False, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is left alone
    mean_psnr = (-10 * torch.log10(((held - x.mean(0)) ** 2).flatten(1).mean(1))).mean().item()
    assert result.psnr > mean_psnr + 4, (result.psnr, mean_psnr)
    assert result.psnr == pytest.approx(reconstruction_psnr(result.autoencoder, held))
    assert sum(result.losses[-10:]) < 0.5 * sum(result.losses[:10])
    latents = encode_images(result.autoencoder, x)
    assert latents.shape == (128, 4, 4, 4)
    assert result.latent_std == pytest.approx(float(latents.std()), rel=1e-5)
    # same seed, same run (bit for bit); another seed, another run
    again = train_autoencoder(x, 5, width=8, progress=False, seed=3)
    assert again.losses == train_autoencoder(x, 5, width=8, progress=False, seed=3).losses
    assert again.losses[:2] == result.losses[:2]  # the learning-rate schedule differs from step 2 on
    assert train_autoencoder(x, 5, width=8, progress=False, seed=4).losses != again.losses


@pytest.mark.parametrize("kwargs, match", [
    (dict(images=torch.rand(4, 1, 10, 16)), "multiples of 4"),
    (dict(images=torch.rand(1, 16, 16)), r"\(N, C, H, W\)"),
    (dict(images=torch.full((2, 1, 8, 8), float("nan"))), "NaN"),
    (dict(loss="l3"), "loss must be"),
    (dict(steps=0), "steps and batch"),
])
def test_train_autoencoder_bad_input(kwargs, match):
    args = dict(images=torch.rand(4, 1, 8, 8), steps=2, progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        train_autoencoder(args.pop("images"), args.pop("steps"), **args)


def test_shipped_latent_prior_loads_and_reconstructs_heldout_phantoms():
    from invdiff import data

    prior = priors.load("ct-phantom-latent-64")
    assert isinstance(prior, priors.LatentDiffusionPrior) and prior.latent_shape == (4, 16, 16)
    x = data.heldout("ct-phantom", 4, size=64).float()
    with torch.no_grad():
        r = prior.decode(prior.encode(x)).clamp(0, 1)
    psnr = -10 * torch.log10((r - x).square().flatten(1).mean(1))
    assert float(psnr.min()) > 27.0  # measured 29.3-35.1 dB on these four
