"""Loading priors: official ADM .pt checkpoints, invdiff safetensors files, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from invdiff.priors import loading
from invdiff.priors.adapters import DenoiserPrior
from invdiff.priors.adm import ADMConfig, ADMPrior, GuidedDiffusionUNet
from invdiff.priors.loading import available, extract_state_dict, load, model_card, save

# small official-layout ADM: 1 channel, 32x32, 32 ch, 1 res block, attention at 16 and 8
SMALL = dict(
    image_size=32,
    in_channels=1,
    model_channels=32,
    num_res_blocks=1,
    channel_mult="1,2,2",
    attention_resolutions="16,8",
    num_head_channels=64,
    learn_sigma=True,
    resblock_updown=True,
)


def small_net(seed: int = 0, **overrides) -> GuidedDiffusionUNet:
    torch.manual_seed(seed)  # tests only: module init draws from the global RNG
    net = GuidedDiffusionUNet(ADMConfig(**{**SMALL, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # give the zero-initialised output convs weights too
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return small_net()


@pytest.fixture
def images():
    return torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))


SIGMAS = torch.tensor([0.02, 3.0])


def assert_same_prior(a: ADMPrior, b: ADMPrior, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a.denoise(x, SIGMAS), b.denoise(x, SIGMAS), rtol=0, atol=0)
        t = torch.tensor([3.0, 811.5])
        torch.testing.assert_close(a.model(2 * x - 1, t), b.model(2 * x - 1, t), rtol=0, atol=0)


# --- official .pt checkpoints ----------------------------------------------------------


def test_official_layout_pt_loads_with_inferred_config(tmp_path, net, images):
    path = tmp_path / "adm_ct.pt"
    torch.save(net.state_dict(), path)
    prior = load(path)
    assert isinstance(prior, ADMPrior)
    assert prior.model.config.canonical() == net.config.canonical()
    assert prior.image_shape == (1, 32, 32)
    assert (prior.sigma_min, prior.sigma_max) == (ADMPrior(net).sigma_min, ADMPrior(net).sigma_max)
    assert not prior.training
    assert_same_prior(prior, ADMPrior(net), images)


def test_checkpoint_wrappers_prefixes_and_ema(tmp_path, net, images):
    other = small_net(seed=5)
    sd, other_sd = net.state_dict(), other.state_dict()
    wrapped = {
        "step": 1000,
        "model": {f"module.{k}": v for k, v in other_sd.items()},
        "ema": {"state_dict": {f"module.{k}": v for k, v in sd.items()}},
    }
    path = tmp_path / "train.ckpt"
    torch.save(wrapped, path)
    assert_same_prior(load(path), ADMPrior(net), images)  # EMA preferred
    assert_same_prior(load(path, ema=False), ADMPrior(other), images)
    # flat dict with an EMA copy next to the raw weights, plus deepinv DiffUNet's schedule buffers
    flat = {**{f"ema.{k}": v for k, v in sd.items()}, **other_sd, "sqrt_alphas_cumprod": torch.ones(1000)}
    torch.save(flat, tmp_path / "flat.pth")
    assert_same_prior(load(tmp_path / "flat.pth"), ADMPrior(net), images)
    assert set(extract_state_dict(flat, ema=False)) == set(other_sd) | {"sqrt_alphas_cumprod"}


def test_config_argument_preset_dict_and_adapter_options(tmp_path, net, images):
    path = tmp_path / "adm.pt"
    torch.save(net.state_dict(), path)
    flags = {**SMALL, "num_channels": SMALL["model_channels"], "noise_schedule": "cosine", "diffusion_steps": 1000}
    del flags["model_channels"]
    prior = load(path, config=flags)
    assert prior.schedule == "cosine"
    assert_same_prior(prior, ADMPrior(net, schedule="cosine"), images)
    prior = load(path, config=ADMConfig(**SMALL), rescale_timesteps=True, image_shape=(1, 64, 32))
    assert prior.image_shape == (1, 64, 32) and prior.rescale_timesteps
    with pytest.raises(ValueError, match="unknown ADMPrior options"):
        load(path, schedul="cosine")


# --- invdiff safetensors ----------------------------------------------------------------


def test_safetensors_round_trip(tmp_path, net, images):
    prior = ADMPrior(net, schedule="cosine", rescale_timesteps=True, clip=True)
    card = {"data": "test phantoms", "steps": 10, "loss": 0.1234}
    path = save(prior, tmp_path / "sub" / "prior.safetensors", card=card)
    assert sorted(os.listdir(path.parent)) == ["prior.safetensors"]  # temp file moved into place
    loaded = load(path)
    assert loaded.model.config == net.config
    assert (loaded.schedule, loaded.rescale_timesteps, loaded.clip) == ("cosine", True, True)
    assert_same_prior(loaded, prior, images)
    info = model_card(path)
    assert info["data"] == "test phantoms" and info["family"] == "adm"
    assert info["image_shape"] == [1, 32, 32] and info["sigma_max"] == prior.sigma_max
    # custom betas and bf16 weights survive as well
    betas = torch.linspace(2e-4, 0.03, 300, dtype=torch.float64)
    custom = ADMPrior(small_net(seed=2), schedule=betas)
    save(custom, tmp_path / "custom.safetensors")
    again = load(tmp_path / "custom.safetensors")
    assert torch.equal(again.betas, betas) and again.sigma_max == custom.sigma_max
    assert_same_prior(again, custom, images)
    low = load(tmp_path / "custom.safetensors", dtype=torch.bfloat16)
    assert low.dtype == torch.bfloat16


def test_shipped_names_available_and_model_card(tmp_path, monkeypatch, net, images):
    monkeypatch.setattr(loading, "WEIGHTS_DIR", tmp_path)
    assert available() == []
    save(ADMPrior(net), tmp_path / "ct-test-32.safetensors", card={"description": "unit test prior"})
    assert available() == ["ct-test-32"]
    assert model_card("ct-test-32")["description"] == "unit test prior"
    assert_same_prior(load("ct-test-32"), ADMPrior(net), images)


def test_save_rejects_unknown_family_and_suffix(tmp_path, net):
    wrapped = DenoiserPrior(torch.nn.Identity(), (1, 4, 4), 0.01, 1.0)
    with pytest.raises(ValueError, match="no registered family saves DenoiserPrior"):
        save(wrapped, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="writes .safetensors"):
        save(ADMPrior(net), tmp_path / "x.pt")
    with pytest.raises(ValueError, match="GuidedDiffusionUNet"):
        save(ADMPrior(torch.nn.Conv2d(1, 1, 1), (1, 4, 4)), tmp_path / "x.safetensors")


def test_bare_safetensors_state_dict_loads(tmp_path, net, images):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "bare.safetensors"))
    assert_same_prior(load(tmp_path / "bare.safetensors"), ADMPrior(net), images)


# --- errors --------------------------------------------------------------------------------


def test_missing_name_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load("no-such-prior")
    message = str(err.value)
    assert "\n" not in message
    assert str(loading.WEIGHTS_DIR / "no-such-prior.safetensors") in message and "put" in message
    with pytest.raises(FileNotFoundError, match="no checkpoint at .*missing.pt: put"):
        load(tmp_path / "missing.pt")
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        load(str(tmp_path / "missing.safetensors"))


def test_checkpoint_of_another_config_lists_mismatches(tmp_path, net):
    path = tmp_path / "other.pt"
    torch.save(small_net(model_channels=64, resblock_updown=False).state_dict(), path)
    with pytest.raises(ValueError) as err:
        load(path, config=ADMConfig(**SMALL))
    message = str(err.value)
    assert str(path) in message and "do not match" in message
    assert "missing keys: input_blocks.2.0.in_layers.0.weight" in message  # resblock downsampler absent
    assert "unexpected keys: input_blocks.2.0.op.weight" in message  # conv downsampler instead
    assert "shape mismatches: time_embed.0.weight: file (256, 64) vs model (128, 32)" in message
    assert "more)" in message  # long lists are cut with a count


def test_unrecognised_state_dict(tmp_path):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="cannot tell which model family"):
        load(tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a guided-diffusion"):
        load(tmp_path / "x.pt", family="adm")
    with pytest.raises(ValueError, match="unknown prior family"):
        load(tmp_path / "x.pt", family="nope")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_truncated_file_is_a_clear_error(tmp_path, net, suffix):
    path = tmp_path / f"full{suffix}"
    if suffix == ".pt":
        torch.save(net.state_dict(), path)
    else:
        save(ADMPrior(net), path)
    broken = tmp_path / f"broken{suffix}"
    data = path.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{broken}: corrupt or truncated"):
        load(broken)
    junk = tmp_path / f"junk{suffix}"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load(junk)


class Payload:
    """Unpickling this would create a marker file: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_arbitrary_object_is_refused_not_executed(tmp_path, net):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": net.state_dict(), "payload": Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refused to load.*weights_only=True"):
        load(path)
    assert not marker.exists()


def test_bad_invdiff_metadata(tmp_path, net):
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in net.state_dict().items()}
    save_file(tensors, str(tmp_path / "v9.safetensors"), metadata={"invdiff_format": "9", "family": "adm"})
    with pytest.raises(ValueError, match="format version 9"):
        load(tmp_path / "v9.safetensors")
    bad = {"invdiff_format": "1", "family": "adm", "config": "{not json"}
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=bad)
    with pytest.raises(ValueError, match="'config' is not valid JSON"):
        load(tmp_path / "bad.safetensors")
    assert json.loads(json.dumps(ADMConfig(**SMALL).to_dict())) == ADMConfig(**SMALL).to_dict()


def test_uninferable_heads_give_a_clear_error(tmp_path):
    # attention on 32 channels: the default guess of 64 channels per head cannot apply
    net = small_net(attention_resolutions="32", num_head_channels=32)
    torch.save(net.state_dict(), tmp_path / "heads.pt")
    with pytest.raises(ValueError, match="num_head_channels=64.*pass the checkpoint's config="):
        load(tmp_path / "heads.pt")
    prior = load(tmp_path / "heads.pt", config={**SMALL, "attention_resolutions": "32", "num_head_channels": 32})
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(prior.denoise(x, 0.1), ADMPrior(net).denoise(x, 0.1), rtol=0, atol=0)
