"""Official flag files loaded verbatim, data ranges, model cards, ``inspect`` and half precision.

The YAML texts below are copied verbatim from the official repositories (named above each);
they are parsed with PyYAML exactly as the official code parses them.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from invdiff.priors import DataRange, inspect, load, parse_dtype, save
from invdiff.priors.adm import ADMConfig, ADMPrior, GuidedDiffusionUNet
from invdiff.priors.conventions import vp_prediction_to_x0

yaml = pytest.importorskip("yaml", reason="PyYAML parses the official YAML config files")

# DPS2022/diffusion-posterior-sampling @ effbde7, configs/model_config.yaml (ffhq_10m.pt)
DPS_FFHQ_YAML = """\
# Defaults for image training.

image_size: 256
num_channels: 128
num_res_blocks: 1
channel_mult: ""
learn_sigma: True
class_cond: False
use_checkpoint: False
attention_resolutions: 16
num_heads: 4
num_head_channels: 64
num_heads_upsample: -1
use_scale_shift_norm: True
dropout: 0.0
resblock_updown: True
use_fp16: False
use_new_attention_order: False

model_path: models/ffhq_10m.pt
"""

# HJ-harry/DDS @ 509b140, configs/vp/AAPM256.yml
DDS_AAPM_YAML = """\
data:
    image_size: 256
    channels: 1

model:
    type: "openai"
    in_channels: 1
    out_channels: 2
    num_channels: 256
    num_heads: 4
    num_res_blocks: 1
    attention_resolutions: "16"
    dropout: 0.0
    resamp_with_conv: True
    learn_sigma: True
    use_scale_shift_norm: true
    use_fp16: false
    resblock_updown: true
    num_heads_upsample: -1
    var_type: 'fixedsmall'
    num_head_channels: 64
    image_size: 256
    class_cond: false
    use_new_attention_order: false

diffusion:
    beta_schedule: linear
    beta_start: 0.0001
    beta_end: 0.02
    num_diffusion_timesteps: 1000

sampling:
    batch_size: 1
    T_sampling: 100"""

# HJ-harry/DDS @ 509b140, configs/vp/fastmri_knee_320_complex.yml
DDS_FASTMRI_YAML = DDS_AAPM_YAML.replace("image_size: 256", "image_size: 320").replace(
    "channels: 1", "channels: 2").replace("in_channels: 1", "in_channels: 2").replace("out_channels: 2", "out_channels: 4")


def meta_state(config: ADMConfig) -> dict[str, torch.Tensor]:
    """The official-size network's keys and shapes, without memory (meta tensors)."""
    with torch.device("meta"):
        return GuidedDiffusionUNet(config).state_dict()


def test_fastmri_yaml_is_the_official_file():
    """The fastMRI file differs from the AAPM one in exactly these four lines (as in the repository)."""
    text = DDS_FASTMRI_YAML
    assert text.count("image_size: 320") == 2 and "in_channels: 2" in text and "out_channels: 4" in text


def test_dps_yaml_verbatim_int_attention_resolutions():
    """Found 1: YAML reads `attention_resolutions: 16` as an int; the flags load as they are."""
    flags = yaml.safe_load(DPS_FFHQ_YAML)
    assert flags["attention_resolutions"] == 16
    config, diffusion = ADMConfig.from_flags(flags)
    assert diffusion == {}
    assert config.canonical() == ADMConfig.preset("ffhq_10m").canonical()
    assert config.attention_ds == (16,)
    assert ADMConfig(attention_resolutions=16).attention_resolutions == "16"


@pytest.mark.parametrize("text, preset, size, channels, data_range", [
    (DDS_AAPM_YAML, "dds_aapm256", 256, 1, "[0, 1]"),
    (DDS_FASTMRI_YAML, "dds_fastmri320", 320, 2, "complex-max"),
])
def test_dds_yaml_verbatim(text, preset, size, channels, data_range):
    """Found 2 and 3: DDS's `model:` section with its extra keys (type, var_type, resamp_with_conv),
    image_size 320 mapped to the 256 defaults as DDS's create_model does; the nested file's
    `diffusion:` section gives the official linear schedule."""
    flags = yaml.safe_load(text)
    config, diffusion = ADMConfig.from_flags(flags)
    assert diffusion == flags["diffusion"]
    assert config.image_size == size and config.in_channels == channels and config.out_channels == 2 * channels
    assert config.channel_mult_tuple == (1, 1, 2, 2, 4, 4)
    assert config == ADMConfig.from_flags(flags["model"])[0] == ADMConfig.preset(preset)
    # 320 // 16 = 20 is no downsampling factor: only the middle block attends (as in the official UNetModel)
    assert config.attention_ds == ((16,) if size == 256 else (20,))
    state = meta_state(config)
    has_attention = any(".1.qkv." in k for k in state if k.startswith(("input_blocks", "output_blocks")))
    assert has_attention == (size == 256)
    # the weights alone give the right image size and channels back (2 channels: DDS's 320 knee model)
    inferred = ADMConfig.infer_from_state_dict(state)
    assert inferred.image_size == size and inferred.canonical() == config.canonical()
    with pytest.raises(ValueError, match="unknown ADM config section 'solver'"):
        ADMConfig.from_flags({**flags, "solver": {}})
    from invdiff.priors.adm import PRESET_OPTIONS

    assert PRESET_OPTIONS[preset]["data_range"] == data_range


def small_adm(seed: int = 0, channels: int = 1, **overrides) -> GuidedDiffusionUNet:
    torch.manual_seed(seed)  # tests only: module init draws from the global RNG
    cfg = dict(image_size=16, in_channels=channels, model_channels=32, num_res_blocks=1, channel_mult="1,2",
               attention_resolutions="8", num_head_channels=64, learn_sigma=True, resblock_updown=True)
    net = GuidedDiffusionUNet(ADMConfig(**{**cfg, **overrides}))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():  # the zero-initialised output layers get weights too
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return net.eval()


def test_dds_like_file_loads_at_320_with_its_data_range(tmp_path):
    """A checkpoint with DDS's fastMRI layout (narrower, same structure) loads at 320x320 from the
    weights alone, and with the preset-style flags and data range from the YAML's sections."""
    flags = yaml.safe_load(DDS_FASTMRI_YAML)
    flags["model"].update(num_channels=32, num_head_channels=32)  # the same network, 8x narrower
    config, _ = ADMConfig.from_flags(flags)
    torch.manual_seed(0)
    path = tmp_path / "fastmri.pt"
    torch.save(GuidedDiffusionUNet(config).state_dict(), path)
    prior = load(path)
    assert prior.image_shape == (2, 320, 320) and prior.card["config_source"].startswith("inferred")
    prior = load(path, config=flags, data_range="complex-max")
    assert prior.image_shape == (2, 320, 320) and str(prior.data_range) == "complex-max"
    assert prior.card["data_range"] == "complex-max" and prior.card["family"] == "adm"
    with pytest.raises(ValueError, match="complex-max needs .*channel pairs"):
        ADMPrior(small_adm(), data_range="complex-max")


@pytest.mark.parametrize("data_range", ["[0, 1]", "complex-max", "[-1, 1]", (-0.5, 2.0)])
def test_adm_data_range_is_the_affine_map_of_the_vp_formula(data_range):
    """D(x, sigma) = (D'(shift + scale x, scale sigma) - shift) / scale with the official VP
    epsilon formula x0' = (x_t - sqrt(1 - abar) eps) / sqrt(abar), at the schedule's own steps."""
    channels = 2 if data_range == "complex-max" else 1
    net = small_adm(channels=channels)
    prior = ADMPrior(net, data_range=data_range)
    r = DataRange.parse(data_range)
    abar = torch.cumprod(1 - prior.betas, 0)
    x0 = torch.rand(3, channels, 16, 16, generator=torch.Generator().manual_seed(2))
    for t in (0, 137, 600, 999):
        sigma_m = float(((1 - abar[t]) / abar[t]).sqrt())  # the model-scale noise of step t
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t))
        x = x0 + sigma_m / r.scale * noise  # invdiff's VE image
        x_t = (abar[t].sqrt() * (r.shift + r.scale * x.double())).float()  # the VP input, official scale
        with torch.no_grad():
            eps = net(x_t, torch.full((3,), float(t)))[:, :channels]
            x0_official = (x_t.double() - (1 - abar[t]).sqrt() * eps.double()) / abar[t].sqrt()
            expected = ((x0_official - r.shift) / r.scale).float()
            got = prior.denoise(x, sigma_m / r.scale)
        assert (got - expected).abs().max() <= 1e-4 * max(1.0, sigma_m / r.scale), (t, data_range)
    assert prior.sigma_min == pytest.approx(float(((1 - abar[0]) / abar[0]).sqrt()) / r.scale)


def test_data_range_parse_and_errors():
    assert DataRange.parse("[-1,1]") == DataRange.parse((-1, 1)) == DataRange.parse("centered")
    assert str(DataRange.parse("complex")) == "complex-max" and DataRange.parse("complex-max").is_identity
    assert DataRange.parse(str(DataRange.parse((-0.5, 2.0)))) == DataRange(-0.5, 2.0)
    for bad in ("[1, 0]", "wide", (0, float("inf")), (1,)):
        with pytest.raises(ValueError, match="data.range"):
            DataRange.parse(bad)
    x = torch.rand(4)
    r = DataRange.parse("[-1, 1]")
    torch.testing.assert_close(r.from_model(r.to_model(x)), x)
    with pytest.raises(ValueError, match="prediction_type must be one of epsilon, sample, v_prediction"):
        vp_prediction_to_x0(x, x, x, "score")


def test_save_load_round_trip_keeps_data_range(tmp_path):
    prior = ADMPrior(small_adm(), data_range="[0, 1]")
    path = save(prior, tmp_path / "p.safetensors")
    again = load(path)
    assert again.data_range == prior.data_range and again.card["data_range"] == "[0, 1]"
    x = torch.rand(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(again.denoise(x, 0.3), prior.denoise(x, 0.3), rtol=0, atol=0)


def test_half_precision_weights_run_in_their_dtype_with_a_float32_sampler(tmp_path):
    """fp16 / bf16 files: dtype=None (or 'file') runs the network in the file's dtype; denoise
    takes and returns float32; the difference to the float32 network is that of the rounding."""
    net = small_adm()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    sigma = torch.tensor([0.05, 2.0])
    with torch.no_grad():
        reference = ADMPrior(net).denoise(x, sigma)
    for half, tol in ((torch.float16, 2e-2), (torch.bfloat16, 0.25)):  # at sigma = 2 (sigma' = 4 times the eps error)
        path = tmp_path / f"{half}.pt"
        torch.save({k: v.to(half) for k, v in net.state_dict().items()}, path)
        prior = load(path, dtype=None)
        assert prior.dtype == half and prior.card["dtype"] == str(half).removeprefix("torch.")
        assert prior.card["file_dtype"] == prior.card["dtype"]
        with torch.no_grad():
            out = prior.denoise(x, sigma)
        assert out.dtype == torch.float32
        err = float((out - reference).abs().max())
        assert 0 < err < tol, (half, err)
        assert load(path).dtype == torch.float32  # the default runs float32 whatever the file holds
        assert load(path, dtype="fp16").dtype == torch.float16
    assert parse_dtype("bf16") == torch.bfloat16 and parse_dtype("file") is None
    with pytest.raises(ValueError, match="dtype must be one of"):
        parse_dtype("int8")


def test_inspect_and_card_say_what_a_checkpoint_is(tmp_path):
    path = tmp_path / "adm.pt"
    torch.save({"ema": small_adm().state_dict(), "step": torch.tensor(5)}, path)
    card = inspect(path)
    assert card["family"] == "adm" and "guided-diffusion" in card["source"]
    assert "epsilon" in card["parameterisation"] and card["data_range"] == "[-1, 1]"
    assert card["config_source"].startswith("inferred") and card["config"]["model_channels"] == 32
    assert card["image_shape"] == [1, 16, 16] and card["file_dtype"] == "float32"
    assert "dtype" not in card  # nothing was loaded
    loaded = load(path).card
    assert {k: v for k, v in loaded.items() if k != "dtype"} == card
    with pytest.raises(ValueError, match=r"^\S*adm.pt: the weights do not match the adm model of config 'ffhq_10m'"):
        inspect(path, config="ffhq_10m")


def test_unknown_weights_name_what_invdiff_reads(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"encoder.weight": torch.zeros(3), "decoder.bias": torch.zeros(2)}, path)
    with pytest.raises(ValueError) as err:
        load(path)
    message = str(err.value)
    assert "\n" not in message and "cannot tell which model family" in message
    assert "invdiff reads: adm (.pt/.pth/.ckpt" in message and "pass family= and config=" in message
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "weights.txt").write_text("x")
    with pytest.raises(ValueError, match="not a model folder invdiff can read; it reads the files of: adm"):
        load(folder)


def test_cli_list_priors_file(tmp_path):
    path = tmp_path / "adm.pt"
    torch.save(small_adm().state_dict(), path)
    run = subprocess.run([sys.executable, "-m", "invdiff", "list", "priors", "--file", str(path), "--param",
                          'data_range="[0, 1]"'], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    lines = dict(line.strip().split(": ", 1) for line in run.stdout.splitlines()[1:])
    assert lines["family"] == "adm" and lines["data_range"] == "[0, 1]" and lines["image_shape"] == "[1, 16, 16]"
    assert json.loads(lines["config"])["num_res_blocks"] == 1
    bad = subprocess.run([sys.executable, "-m", "invdiff", "list", "--file", str(path), "--config", "ffhq_10m"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "do not match the adm model" in bad.stderr


class _Payload:
    """Pickles to a call of ``open(marker, "w")``: a file that appears if anything unpickles it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("family", [None, "adm", "score-sde", "nvlabs-edm", "deepinv", "diffusers", "edm"])
def test_no_family_unpickles(tmp_path, family):
    """A checkpoint whose pickle would run code is refused in one line by every family's path
    (torch.load(weights_only=True) before any family code), and the payload stays inert."""
    marker = tmp_path / "marker"
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "payload": _Payload(marker)}, path)
    with pytest.raises(ValueError, match=r"refused to load: not a weights-only checkpoint") as err:
        load(path, family=family)
    assert "\n" not in str(err.value) and not marker.exists()
    with pytest.raises(ValueError, match="refused to load"):
        inspect(path, family=family)
    assert not marker.exists()


def test_convert_keeps_config_options_and_outputs(tmp_path):
    """`invdiff convert`: an outside file with its flags and data range becomes an invdiff file
    that loads with nothing more said and denoises identically; the input is never replaced."""
    flags = yaml.safe_load(DPS_FFHQ_YAML)
    flags.update(image_size=16, num_channels=32, channel_mult="1,2", attention_resolutions=8, in_channels=1)
    config, _ = ADMConfig.from_flags(flags)
    torch.manual_seed(0)
    source = tmp_path / "model.pt"
    torch.save({"ema": GuidedDiffusionUNet(config).state_dict()}, source)
    (tmp_path / "flags.yaml").write_text(yaml.safe_dump(flags))
    out = tmp_path / "model.safetensors"
    cmd = [sys.executable, "-m", "invdiff", "convert", str(source), "--out", str(out), "--config",
           str(tmp_path / "flags.yaml"), "--param", 'data_range="[0, 1]"']
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "family adm" in run.stdout and "data range [0, 1]" in run.stdout
    converted, original = load(out), load(source, config=flags, data_range="[0, 1]")
    assert converted.card["converted_from"] == str(source) and converted.card["data_range"] == "[0, 1]"
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(converted.denoise(x, 0.2), original.denoise(x, 0.2), rtol=0, atol=0)
    before = source.read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 1 and "already exists" in again.stderr and again.stderr.count("\n") == 1
    onto_input = subprocess.run(cmd[:6] + [str(source)] + cmd[7:], capture_output=True, text=True)
    assert onto_input.returncode == 1 and "refusing to write over an input" in onto_input.stderr
    foreign = tmp_path / "foreign.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(foreign))
    refused = subprocess.run(cmd[:6] + [str(foreign)] + cmd[7:] + ["--overwrite"], capture_output=True, text=True)
    assert refused.returncode == 1 and "was not written by invdiff" in refused.stderr
    assert source.read_bytes() == before and load(out).card["family"] == "adm"
    assert subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True).returncode == 0
