"""Guided-diffusion / ADM network and adapter; the deepinv denoiser adapter."""

from __future__ import annotations

import math

import deepinv as dinv
import numpy as np
import pytest
import torch
from deepinv.models import diffunet as dinv_diffunet
from torch import nn

from invdiff.priors.adapters import DenoiserPrior
from invdiff.priors.adm import (
    ADMConfig,
    ADMPrior,
    GuidedDiffusionUNet,
    _AttentionBlock,
    _ResBlock,
    get_named_beta_schedule,
)

# deepinv's DiffUNet registers its noise schedule as two buffers next to the official keys
DEEPINV_EXTRA_KEYS = {"sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod"}

SMALL = dict(
    image_size=32,
    in_channels=1,
    model_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="16,8",
    num_head_channels=64,
    learn_sigma=True,
)

# 16x16, two levels, attention at the 8x8 level: cheap enough for bf16 on a CPU
TINY = dict(SMALL, image_size=16, channel_mult="1,2", attention_resolutions="8")


def randomize(module: nn.Module, seed: int = 0, scale: float = 0.05) -> nn.Module:
    """Perturb every parameter (the zero-initialised output convs included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module.eval()


def linear_sigmas_vp(T: int = 1000) -> np.ndarray:
    """Hand computation of σ'_t = sqrt((1 - ᾱ_t) / ᾱ_t) for the linear schedule."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    alphas_cumprod = np.cumprod(1 - betas)
    return np.sqrt((1 - alphas_cumprod) / alphas_cumprod)


# --- key layout against deepinv's DiffUNet (which loads the official ffhq_10m.pt) ------


def test_ffhq_preset_keys_and_shapes_equal_deepinv_diffunet():
    with torch.device("meta"):
        ref = dinv.models.DiffUNet(in_channels=3, out_channels=3, large_model=False, pretrained=None)
        ours = GuidedDiffusionUNet(ADMConfig.preset("ffhq_10m"))
    ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in DEEPINV_EXTRA_KEYS}
    our_sd = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert list(our_sd) == list(ref_sd)  # same keys, same order
    assert our_sd == ref_sd
    assert set(ref.state_dict()) - set(ref_sd) == DEEPINV_EXTRA_KEYS


def test_imagenet_preset_keys_and_shapes_equal_deepinv_large_diffunet():
    # deepinv's large model is the 256-channel guided-diffusion net, attention at 32,16,8
    with torch.device("meta"):
        ref = dinv.models.DiffUNet(in_channels=3, out_channels=3, large_model=True, pretrained=None)
        ours = GuidedDiffusionUNet("imagenet256_uncond")
    ref_sd = {k: tuple(v.shape) for k, v in ref.state_dict().items() if k not in DEEPINV_EXTRA_KEYS}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == ref_sd
    assert sum(v.numel() for v in ours.state_dict().values()) == 552_814_086


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(channels=64, out_channels=128, use_scale_shift_norm=True),
        dict(channels=64, out_channels=64, use_scale_shift_norm=False),
        dict(channels=64, use_scale_shift_norm=True, down=True),
        dict(channels=64, use_scale_shift_norm=True, up=True),
    ],
)
def test_resblock_equals_deepinv(kwargs):
    kwargs = dict(kwargs)
    channels = kwargs.pop("channels")
    ref = randomize(dinv_diffunet.ResBlock(channels, 128, 0.0, **kwargs))
    ours = _ResBlock(channels, 128, 0.0, **kwargs).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    x, emb = torch.randn(2, channels, 8, 8, generator=g), torch.randn(2, 128, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, emb), ref(x, emb), rtol=0, atol=1e-6)


@pytest.mark.parametrize("new_order", [False, True])
def test_attention_equals_deepinv(new_order):
    ref = randomize(dinv_diffunet.AttentionBlock(128, num_head_channels=32, use_new_attention_order=new_order))
    ours = _AttentionBlock(128, num_head_channels=32, new_order=new_order).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 128, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-6)


def test_attention_equals_official_legacy_einsum():
    """SDPA gives the official QKVAttentionLegacy numbers (einsum with 1/sqrt(sqrt(ch)) on q and k)."""
    block = randomize(_AttentionBlock(128, num_head_channels=64))
    x = torch.randn(2, 128, 4, 4, generator=torch.Generator().manual_seed(3))
    b, c, heads = 2, 128, 2
    ch = c // heads
    with torch.no_grad():
        qkv = block.qkv(block.norm(x.reshape(b, c, -1)))
        q, k, v = qkv.reshape(b * heads, 3 * ch, -1).split(ch, dim=1)
        scale = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
        a = torch.einsum("bts,bcs->bct", weight, v).reshape(b, c, -1)
        expected = (x.reshape(b, c, -1) + block.proj_out(a)).reshape(x.shape)
        torch.testing.assert_close(block(x), expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_ffhq_forward_equals_deepinv_forward_diffusion():
    # ~5 s on 2 cores (two 93M-parameter networks); the block tests above are the fast variant
    torch.manual_seed(0)
    ref = randomize(dinv.models.DiffUNet(3, 3, large_model=False, pretrained=None), scale=0.02)
    ours = GuidedDiffusionUNet("ffhq_10m").eval()
    ours.load_state_dict({k: v for k, v in ref.state_dict().items() if k not in DEEPINV_EXTRA_KEYS})
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 32, 32, generator=g)
    t = torch.tensor([417])
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t), ref.forward_diffusion(x, t), rtol=0, atol=1e-5)


# --- configuration ----------------------------------------------------------------


def test_presets_have_official_flags():
    ffhq = ADMConfig.preset("ffhq_10m")
    assert (ffhq.model_channels, ffhq.num_res_blocks, ffhq.attention_ds, ffhq.out_channels) == (128, 1, (16,), 6)
    assert ffhq.channel_mult_tuple == (1, 1, 2, 2, 4, 4)
    imagenet = ADMConfig.preset("imagenet256_uncond")
    assert (imagenet.model_channels, imagenet.num_res_blocks, imagenet.attention_ds) == (256, 2, (8, 16, 32))
    with pytest.raises(ValueError, match="unknown ADM preset"):
        ADMConfig.preset("nope")
    config, diffusion = ADMConfig.from_flags({"num_channels": 64, "noise_schedule": "cosine", "use_fp16": True})
    assert config.model_channels == 64 and diffusion == {"noise_schedule": "cosine"}
    with pytest.raises(ValueError, match="no default channel_mult"):
        ADMConfig(image_size=300)


@pytest.mark.parametrize("name", ["ffhq_10m", "imagenet256_uncond"])
def test_infer_config_of_presets(name):
    with torch.device("meta"):
        sd = GuidedDiffusionUNet(name).state_dict()
    assert ADMConfig.infer_from_state_dict(sd).canonical() == ADMConfig.preset(name).canonical()


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(resblock_updown=True, num_res_blocks=2),
        dict(use_scale_shift_norm=False, learn_sigma=False, in_channels=2),
        dict(channel_mult="1,2", attention_resolutions="16", num_res_blocks=3),
        dict(num_classes=10, attention_resolutions="", channel_mult="1,1,2,2"),
        dict(image_size=64, channel_mult="", attention_resolutions="16", model_channels=64),  # official 64 default
    ],
)
def test_infer_config_of_small_configs(overrides):
    config = ADMConfig(**{**SMALL, **overrides})
    with torch.device("meta"):
        sd = GuidedDiffusionUNet(config).state_dict()
    inferred = ADMConfig.infer_from_state_dict(sd, image_size=config.image_size)
    assert inferred.canonical() == config.canonical()
    assert inferred.attention_ds == tuple(sorted(config.attention_ds))


def test_infer_image_size_default():
    """Weights do not fix the image size: an official default channel_mult gives its size,
    otherwise an 8x8 bottleneck is assumed (as in every official default)."""
    for config, size in [(ADMConfig(**SMALL), 32), (ADMConfig(**{**SMALL, "channel_mult": "1,2"}), 16)]:
        with torch.device("meta"):
            sd = GuidedDiffusionUNet(config).state_dict()
        assert ADMConfig.infer_from_state_dict(sd).image_size == size
    config = ADMConfig(image_size=64, model_channels=64, attention_resolutions="16", num_head_channels=64)
    with torch.device("meta"):
        sd = GuidedDiffusionUNet(config).state_dict()
    assert ADMConfig.infer_from_state_dict(sd).canonical() == config.canonical()


def test_infer_config_needs_adm_keys():
    with pytest.raises(ValueError, match="not a guided-diffusion"):
        ADMConfig.infer_from_state_dict({"conv.weight": torch.zeros(1)})


def test_unet_class_conditional_and_dtype():
    net = randomize(GuidedDiffusionUNet(ADMConfig(**{**TINY, "num_classes": 3})))
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = net(x, torch.tensor([3.0, 700.0]), y=torch.tensor([0, 2]))
    assert out.shape == (2, 2, 16, 16)
    with pytest.raises(ValueError, match="class labels"):
        net(x, torch.tensor([3.0, 700.0]))
    with torch.no_grad():
        ref = net(x, torch.tensor([3.0, 700.0]), y=torch.tensor([0, 2]))
        net.to(torch.bfloat16)
        low = net(x, torch.tensor([3.0, 700.0]), y=torch.tensor([0, 2]))
    assert low.dtype == torch.float32
    assert (low - ref).norm() / ref.norm() < 0.05


# --- the VP -> VE adapter ------------------------------------------------------------


class SpyEps(nn.Module):
    """ε(x_t, t) = tanh(a x_t) + b t / 1000 (then a variance half), recording its inputs."""

    def __init__(self, channels: int = 1):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.7))
        self.b = nn.Parameter(torch.tensor(0.3))
        self.channels = channels
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def eps(self, x_t, t):
        return torch.tanh(self.a * x_t) + self.b * t.reshape(-1, 1, 1, 1) / 1000

    def forward(self, x_t, t):
        self.calls.append((x_t.detach().clone(), t.detach().clone()))
        return torch.cat([self.eps(x_t, t), torch.full_like(x_t, 123.0)], dim=1)  # learned variance


def test_adapter_equals_hand_computation_at_discrete_t():
    sigmas_vp = linear_sigmas_vp()
    spy = SpyEps()
    prior = ADMPrior(spy, (1, 8, 8))
    assert prior.sigma_min == pytest.approx(sigmas_vp[0] / 2, rel=1e-12)
    assert prior.sigma_max == pytest.approx(sigmas_vp[-1] / 2, rel=1e-12)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    steps = [137, 642]
    sigma = torch.tensor([sigmas_vp[i] / 2 for i in steps], dtype=torch.float64)
    with torch.no_grad():
        out = prior.denoise(x, sigma)
    x_t, t = spy.calls[-1]
    torch.testing.assert_close(t.double(), torch.tensor(steps, dtype=torch.float64), rtol=0, atol=1e-6)
    alphas_cumprod = 1 / (1 + sigmas_vp**2)
    sqrt_ab = torch.tensor(np.sqrt(alphas_cumprod[steps])).reshape(-1, 1, 1, 1)
    expected_x_t = sqrt_ab * (2 * x - 1)  # VP input sqrt(ᾱ_t) x'
    torch.testing.assert_close(x_t.double(), expected_x_t.float().double(), rtol=0, atol=1e-6)
    eps = spy.eps(expected_x_t, torch.tensor(steps, dtype=torch.float64)).detach()
    sigma_vp = 2 * sigma.reshape(-1, 1, 1, 1)
    expected = ((2 * x - 1) - sigma_vp * eps + 1) / 2  # x0' = x' - σ' ε, then back to [0, 1]
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-5 * float(sigma.max()))
    assert prior.score(x, sigma).shape == x.shape


def test_sigma_to_t_is_monotone_and_interpolates_log_sigma():
    prior = ADMPrior(SpyEps(), (1, 8, 8))
    sigmas_vp = linear_sigmas_vp()
    sigma = torch.logspace(-4, 3, 5000, dtype=torch.float64)
    t = prior.sigma_to_t(sigma)
    assert torch.all(t[1:] >= t[:-1])
    inside = (sigma > prior.sigma_min) & (sigma < prior.sigma_max)
    assert torch.all(t[1:][inside[1:] & inside[:-1]] > t[:-1][inside[1:] & inside[:-1]])
    assert t[0] == 0 and t[-1] == 999  # clamped outside the schedule
    torch.testing.assert_close(prior.sigma_to_t(torch.tensor(sigmas_vp / 2)), torch.arange(1000.0).double())
    # halfway in log sigma between steps 10 and 11 is t = 10.5
    mid = torch.tensor([math.sqrt(sigmas_vp[10] * sigmas_vp[11]) / 2], dtype=torch.float64)
    torch.testing.assert_close(prior.sigma_to_t(mid), torch.tensor([10.5], dtype=torch.float64))
    torch.testing.assert_close(prior.t_to_sigma(t[inside]).double(), sigma[inside], rtol=1e-5, atol=0)


class ExactPointEps(nn.Module):
    """The exact ε-model of the data distribution δ(x0*): ε = (x_t - sqrt(ᾱ_t) x0*') / sqrt(1 - ᾱ_t),
    with ᾱ_t at continuous t computed here (log-linear interpolation of σ'_t, by numpy)."""

    def __init__(self, x0_star: torch.Tensor, sigmas_vp: np.ndarray):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros((), dtype=torch.float64))  # run in float64
        self.x0_m = 2 * x0_star - 1
        self.log_sigmas = np.log(sigmas_vp)

    def forward(self, x_t, t):
        sigma_vp = np.exp(np.interp(t.cpu().numpy(), np.arange(len(self.log_sigmas)), self.log_sigmas))
        ab = torch.tensor(1 / (1 + sigma_vp**2), dtype=x_t.dtype).reshape(-1, 1, 1, 1)
        return (x_t - ab.sqrt() * self.x0_m) / (1 - ab).sqrt()


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_adapter_recovers_point_mass_exactly(schedule):
    g = torch.Generator().manual_seed(0)
    x0_star = torch.rand(1, 2, 8, 8, generator=g, dtype=torch.float64)
    betas = get_named_beta_schedule(schedule)
    ab = np.cumprod(1 - betas)
    prior = ADMPrior(ExactPointEps(x0_star, np.sqrt((1 - ab) / ab)), (2, 8, 8), schedule=schedule)
    sigma = torch.logspace(math.log10(prior.sigma_min), math.log10(prior.sigma_max), 40, dtype=torch.float64)
    sigma = sigma.clamp(prior.sigma_min, prior.sigma_max)
    x = x0_star + sigma.reshape(-1, 1, 1, 1) * torch.randn(40, 2, 8, 8, generator=g, dtype=torch.float64)
    with torch.no_grad():
        out = prior.denoise(x, sigma)
    torch.testing.assert_close(out, x0_star.expand_as(out), rtol=0, atol=1e-8)


def test_schedules_rescale_and_custom_betas():
    betas = get_named_beta_schedule("linear", 500)
    assert betas[0] == pytest.approx(2e-4) and betas[-1] == pytest.approx(0.04)
    spy = SpyEps()
    prior = ADMPrior(spy, (1, 4, 4), schedule="linear", num_timesteps=500, rescale_timesteps=True)
    ab = np.cumprod(1 - betas)
    sigma = float(np.sqrt((1 - ab[100]) / ab[100]) / 2)
    prior.denoise(torch.rand(1, 1, 4, 4), sigma)
    assert spy.calls[-1][1].item() == pytest.approx(200.0, abs=1e-3)  # t * 1000 / T (σ in float32)
    custom = ADMPrior(SpyEps(), (1, 4, 4), schedule=torch.tensor(get_named_beta_schedule("linear")))
    default = ADMPrior(SpyEps(), (1, 4, 4))
    x = torch.rand(3, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(custom.denoise(x, 0.3), default.denoise(x, 0.3), rtol=0, atol=0)
    cosine = ADMPrior(SpyEps(), (1, 4, 4), schedule="cosine")
    ab = np.cumprod(1 - get_named_beta_schedule("cosine"))
    assert cosine.sigma_max == pytest.approx(np.sqrt((1 - ab[-1]) / ab[-1]) / 2)
    with pytest.raises(ValueError, match="betas"):
        ADMPrior(SpyEps(), (1, 4, 4), schedule=[0.5, 1.5])
    with pytest.raises(ValueError, match="unknown beta schedule"):
        ADMPrior(SpyEps(), (1, 4, 4), schedule="quadratic")


def test_adm_prior_on_unet_clip_and_half_precision():
    net = randomize(GuidedDiffusionUNet(ADMConfig(**SMALL)))
    prior = ADMPrior(net)
    assert prior.image_shape == (1, 32, 32)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = prior.denoise(x, 0.1)
        clipped = ADMPrior(net, clip=True).denoise(x, 0.1)
        torch.testing.assert_close(clipped, ref.clamp(0, 1))
        tiny = randomize(GuidedDiffusionUNet(ADMConfig(**TINY)))
        x, ref = x[:1, :, :16, :16], ADMPrior(tiny).denoise(x[:1, :, :16, :16], 0.1)
        low = ADMPrior(GuidedDiffusionUNet(ADMConfig(**TINY)), dtype=torch.bfloat16)
        low.model.load_state_dict(tiny.state_dict())
        out = low.denoise(x, 0.1)
    assert low.dtype == torch.bfloat16 and out.dtype == torch.float32
    # D - x = -σ ε: compare the ε part relative to its size
    assert ((out - ref).norm() / (ref - x).norm()).item() < 0.05
    with pytest.raises(ValueError, match="expected images of shape"):
        prior.denoise(torch.rand(1, 1, 16, 16), 0.1)
    with pytest.raises(ValueError, match="image_shape is required"):
        ADMPrior(SpyEps())


# --- deepinv denoisers ------------------------------------------------------------------


class GaussianDenoiser(dinv.models.Denoiser):
    """Exact E[x0 | x] for x0 ~ N(m, s² I): m + s² / (s² + σ²) (x - m)."""

    def __init__(self, mean=0.5, std=0.2):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x, sigma, **kwargs):
        sigma = self._handle_sigma(sigma, reference_tensor=x)
        return self.mean + self.std**2 / (self.std**2 + sigma**2) * (x - self.mean)


def test_denoiser_prior_is_exact_for_gaussian_denoiser():
    prior = DenoiserPrior(GaussianDenoiser(), (1, 5, 7), sigma_min=0.01, sigma_max=10.0)
    x = torch.rand(3, 1, 5, 7, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.05, 0.5, 5.0])
    s = sigma.reshape(-1, 1, 1, 1)
    expected = 0.5 + 0.04 / (0.04 + s**2) * (x - 0.5)
    torch.testing.assert_close(prior.denoise(x, sigma), expected)
    torch.testing.assert_close(prior.score(x, sigma), -(x - 0.5) / (0.04 + s**2))  # exact Gaussian score
    assert (prior.sigma_min, prior.sigma_max) == (0.01, 10.0)


def test_denoiser_prior_wraps_drunet_per_sample_sigma():
    net = dinv.models.DRUNet(1, 1, nc=(8, 8, 8, 8), nb=1, pretrained=None).eval()
    prior = DenoiserPrior(net, (1, 16, 16), sigma_min=0.01, sigma_max=0.5)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = prior.denoise(x, torch.tensor([0.1, 0.3]))
        expected = torch.cat([net(x[:1], 0.1), net(x[1:], 0.3)])
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        low = DenoiserPrior(net, (1, 16, 16), sigma_min=0.01, sigma_max=0.5, dtype=torch.bfloat16)
        assert low.denoise(x, 0.1).dtype == torch.float32
    assert isinstance(prior, dinv.models.Denoiser)
