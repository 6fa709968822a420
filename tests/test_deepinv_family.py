"""The ``deepinv`` family: deepinv's denoisers loaded from their state dicts, bit-identical."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from invdiff import priors
from invdiff.priors import deepinv_family as df

NCSN = {"class": "NCSNpp", "kwargs": dict(model_type="ncsn", img_resolution=16, in_channels=1, out_channels=1,
                                          model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                                          augment_dim=0, pixel_std=0.5, _was_trained_on_minus_one_one=True)}
DDPM = {"class": "NCSNpp", "kwargs": dict(NCSN["kwargs"], model_type="ddpm")}
ADM = {"class": "ADMUNet", "kwargs": dict(img_resolution=16, in_channels=1, out_channels=1, model_channels=32,
                                          channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])}
PRECOND = {"class": "EDMPrecond", "kwargs": {"model": {"class": "ADMUNet", "kwargs": dict(ADM["kwargs"])},
                                            "pixel_std": 0.5}}
DRUNET = {"class": "DRUNet", "kwargs": {"in_channels": 1, "out_channels": 1, "nc": [8, 8, 8, 8], "nb": 1}}
CASES = {"NCSNpp-ncsn": NCSN, "NCSNpp-ddpm": DDPM, "ADMUNet": ADM, "DRUNet": DRUNET}
# deepinv 0.5's EDMPrecond feeds c_noise = ln(sigma)/4 to model.forward, which NCSNpp / ADMUNet read as a
# noise level (log of a negative number: NaN); its files load (test_edm_precond_layout), its output is deepinv's
OPTIONS = {"DRUNet": {"image_shape": (1, 16, 16), "sigma_min": 0.01, "sigma_max": 0.5}}


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return net


def module(spec: dict) -> torch.nn.Module:
    torch.manual_seed(0)  # FourierEmbedding draws its frequencies from the global generator
    return randomise(df.build_deepinv(spec)).eval()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_loads_bit_identical(case, fmt, tmp_path):
    spec = CASES[case]
    net = module(spec)
    path = tmp_path / f"w.{fmt}"
    state = net.state_dict()
    torch.save(state, path) if fmt == "pt" else save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    prior = priors.load(path, family="deepinv", config=spec, **OPTIONS.get(case, {}))
    assert type(prior) is df.DeepinvPrior and str(prior.data_range) == "[0, 1]"
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in (0.01, 0.1, 0.5):
            sigma = torch.full((2,), s)
            assert torch.equal(prior.denoise(x, sigma), net(x, sigma))


@pytest.mark.slow  # DiffUNet is a full-width (128-channel) guided-diffusion U-Net: ~15 s on one CPU core
def test_diffunet_loads_bit_identical(tmp_path):
    spec = {"class": "DiffUNet", "kwargs": {"in_channels": 3, "out_channels": 3, "large_model": False}}
    net = module(spec)
    torch.save(net.state_dict(), tmp_path / "d.pt")
    prior = priors.load(tmp_path / "d.pt", family="deepinv", config=spec, image_shape=(3, 32, 32))
    inferred = priors.load(tmp_path / "d.pt", family="deepinv", image_shape=(3, 32, 32))
    assert inferred.spec == spec
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = net(x, torch.full((1,), 0.2))
        assert torch.equal(prior.denoise(x, 0.2), ref) and torch.equal(inferred.denoise(x, 0.2), ref)


def test_edm_precond_layout(tmp_path):
    """EDMPrecond(model)'s file (keys model.<...>) loads into the inner network, bit-identical."""
    net = module(PRECOND)
    assert all(k.startswith("model.") for k in net.state_dict())
    save_file(net.state_dict(), str(tmp_path / "w.safetensors"))
    prior = priors.load(tmp_path / "w.safetensors", family="deepinv", config=PRECOND)
    assert prior.spec == PRECOND and type(prior.model).__name__ == "EDMPrecond"
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    c = torch.tensor([0.1, -0.4])
    with torch.no_grad():
        assert torch.equal(prior.model.model.forward_unet(x, c), net.model.forward_unet(x, c))
        ref = net(x, torch.full((2,), 0.3))
        torch.testing.assert_close(prior.denoise(x, 0.3), ref, rtol=0, atol=0, equal_nan=True)  # deepinv's output


@pytest.mark.parametrize("case", ["NCSNpp-ncsn", "NCSNpp-ddpm", "ADMUNet", "EDMPrecond"])
def test_config_inferred_from_the_keys(case, tmp_path):
    spec = {**CASES, "EDMPrecond": PRECOND}[case]
    net = module(spec)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    prior = priors.load(tmp_path / "w.pt", family="deepinv")
    inner = spec["kwargs"]["model"] if case == "EDMPrecond" else spec
    assert prior.spec["class"] == inner["class"]
    assert all(prior.spec["kwargs"][k] == v for k, v in inner["kwargs"].items() if k in prior.spec["kwargs"])
    # the weights went in: the inner network's raw output is the module's
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    c = torch.tensor([0.1, -0.4])
    ref_net = net.model if case == "EDMPrecond" else net
    with torch.no_grad():
        assert torch.equal(prior.model.forward_unet(x, c), ref_net.forward_unet(x, c))


def test_save_load_round_trip(tmp_path):
    net = module(NCSN)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    prior = priors.load(tmp_path / "w.pt", family="deepinv", config=NCSN, sigma_max=20.0)
    path = priors.save(prior, tmp_path / "p.safetensors")
    back = priors.load(path)
    assert back.spec == NCSN and back.sigma_max == 20.0
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(back.denoise(x, 0.3), net(x, torch.full((2,), 0.3)))


def test_data_range_option():
    net = module(DRUNET)
    prior = df.DeepinvPrior(net, (1, 16, 16), 0.01, 1.0, data_range="[-1, 1]", spec=DRUNET)
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = (net(2 * x - 1, torch.full((1,), 0.4)) + 1) / 2
        assert torch.allclose(prior.denoise(x, 0.2), ref, atol=1e-6)


def test_errors_are_one_line(tmp_path):
    net = module(ADM)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    wrong = {"class": "ADMUNet", "kwargs": dict(ADM["kwargs"], model_channels=64)}
    with pytest.raises(ValueError) as err:
        priors.load(tmp_path / "w.pt", family="deepinv", config=wrong)
    assert "\n" not in str(err.value) and "shape mismatches" in str(err.value)
    for spec, match in (({"class": "NoSuchNet"}, "no Denoiser class"),
                        ({"class": "ADMUNet", "kwargs": dict(ADM["kwargs"], pretrained="download")}, "pretrained"),
                        ({"class": "ADMUNet", "kwargs": dict(ADM["kwargs"], bogus=1)}, "ADMUNet"),
                        ({"class": "DRUNet", "kwargs": {}}, "image_shape")):
        with pytest.raises(ValueError, match=match) as err:
            priors.load(tmp_path / "w.pt", family="deepinv", config=spec)
        assert "\n" not in str(err.value)
