"""The ``nvlabs-edm`` family: official EDM checkpoints (NVlabs/edm, training/networks.py).

The reference formulas below are the ``forward`` methods of ``VPPrecond``, ``VEPrecond``,
``iDDPMPrecond`` and ``EDMPrecond`` in NVlabs/edm ``training/networks.py``, re-written in a
few lines each (that code is CC BY-NC-SA 4.0 and is not copied here); the networks are
deepinv's ports (NCSNpp = SongUNet, ADMUNet = DhariwalUNet), whose equality with the
official classes ``benchmarks/official_check.py --edm-repo PATH`` measures (max abs diff
~1e-6 with invdiff's GroupNorm groups).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from invdiff import priors
from invdiff.priors import edm_official as eo

REPO = Path(__file__).resolve().parents[1]

SONG = dict(img_resolution=16, in_channels=3, model_channels=32, channel_mult=[1, 2], num_blocks=1,
            attn_resolutions=[8], augment_dim=9)
DDPMPP = dict(SONG, embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
              decoder_type="standard", resample_filter=[1, 1])
NCSNPP = dict(SONG, embedding_type="fourier", channel_mult_noise=2, encoder_type="residual",
              decoder_type="standard", resample_filter=[1, 3, 3, 1])
DHARIWAL = dict(img_resolution=16, in_channels=1, model_channels=32, channel_mult=[1, 2], num_blocks=1,
                attn_resolutions=[8], label_dim=4)
CASES = {
    "EDMPrecond-ddpmpp": ("EDMPrecond", "SongUNet", DDPMPP),
    "VPPrecond-ddpmpp": ("VPPrecond", "SongUNet", DDPMPP),
    "VEPrecond-ncsnpp": ("VEPrecond", "SongUNet", NCSNPP),
    "EDMPrecond-adm": ("EDMPrecond", "DhariwalUNet", DHARIWAL),
    "iDDPMPrecond-adm": ("iDDPMPrecond", "DhariwalUNet", DHARIWAL),
}
SIGMAS = (0.003, 0.05, 0.5, 5.0, 30.0)  # invdiff scale


def randomise(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (the official init zeroes the last layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan_in = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan_in**0.5)
    return net


def make(case: str, seed: int = 0) -> tuple[dict, eo.EDMOfficialPrior]:
    precond, network, kw = CASES[case]
    cfg = eo.parse_config({"precond": precond, "network": network, "network_kwargs": kw})
    prior = eo._build(cfg, {})
    randomise(prior.model, seed)
    return cfg, prior.eval()


# --- the official preconditioners, from NVlabs/edm training/networks.py -----------------

def official_denoise(precond: str, kw: dict, net, x: torch.Tensor, sigma: torch.Tensor, labels, dtype) -> torch.Tensor:
    """``<precond>.forward(x, sigma, class_labels)`` on the model scale ([-1, 1]).

    As the official code: float32 preconditioning, network input ``(c_in x).to(dtype)``, the
    noise label ``c_noise.flatten()`` and the class labels in float32."""
    x = x.to(torch.float32)
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    if precond == "EDMPrecond":
        sd = kw.get("sigma_data", 0.5)
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
    elif precond == "VPPrecond":
        beta_d, beta_min, M = 19.9, 0.1, 1000
        c_skip, c_out, c_in = 1, -sigma, 1 / (sigma**2 + 1).sqrt()
        c_noise = (M - 1) * (((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d)
    elif precond == "VEPrecond":
        c_skip, c_out, c_in = 1, sigma, 1
        c_noise = (0.5 * sigma).log()
    elif precond == "iDDPMPrecond":
        C_1, C_2, M = 0.001, 0.008, 1000

        def alpha_bar(j):
            return (0.5 * np.pi * torch.as_tensor(j) / M / (C_2 + 1)).sin() ** 2

        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        index = torch.cdist(sigma.reshape(1, -1, 1), u.reshape(1, -1, 1)).argmin(2)
        c_skip, c_out, c_in = 1, -sigma, 1 / (sigma**2 + 1).sqrt()
        c_noise = M - 1 - index.reshape(sigma.shape).to(torch.float32)
    F_x = net.forward_unet((c_in * x).to(dtype), c_noise.flatten(), class_labels=labels)
    return c_skip * x + c_out * F_x[:, : x.shape[1]].to(torch.float32)


def reference(prior: eo.EDMOfficialPrior, x: torch.Tensor, s: float) -> torch.Tensor:
    """invdiff's D(x, sigma) from the official D' on [-1, 1]: (D'(2x - 1, 2 sigma) + 1) / 2."""
    dtype = prior.model.enc[next(iter(prior.model.enc))].weight.dtype  # the first convolution's
    labels = torch.zeros(x.shape[0], prior.label_dim) if prior.label_dim else None
    sigma = torch.full((x.shape[0],), 2 * s)
    return (official_denoise(prior.precond, prior.precond_kwargs, prior.model, 2 * x - 1, sigma, labels, dtype) + 1) / 2


@pytest.mark.parametrize("case", sorted(CASES))
def test_denoiser_is_the_official_formula_fp32(case):
    _, prior = make(case)
    x = torch.rand(2, *prior.image_shape, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    with torch.no_grad():
        for s in SIGMAS:
            worst = max(worst, float((prior.denoise(x, s) - reference(prior, x, s)).abs().max()))
    assert worst <= 1e-4, worst


def _fp16_works() -> str | None:
    try:
        net = torch.nn.Conv2d(2, 2, 3).half()
        net(torch.zeros(1, 2, 4, 4, dtype=torch.float16))
        torch.nn.functional.group_norm(torch.zeros(1, 4, 2, 2, dtype=torch.float16), 2)
    except RuntimeError as err:  # pragma: no cover - depends on the torch build
        return f"fp16 convolutions do not run on this CPU build ({err})"
    return None


@pytest.mark.parametrize("case", ["EDMPrecond-ddpmpp", "VEPrecond-ncsnpp", "iDDPMPrecond-adm"])
def test_denoiser_is_the_official_formula_fp16(case):
    reason = _fp16_works()
    if reason:
        pytest.skip(reason)
    _, prior = make(case)
    ref32 = make(case)[1]
    prior.half()  # as load(..., dtype=torch.float16) does
    assert prior.dtype == torch.float16 and prior.model.map_layer0.weight.dtype == torch.float32
    x = torch.rand(2, *prior.image_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for s in SIGMAS:
            d = prior.denoise(x, s)
            assert d.dtype == torch.float32
            assert float((d - reference(prior, x, s)).abs().max()) <= 1e-4
            # the fp16 network against the fp32 one: half-precision rounding only (relative)
            c = torch.full((2,), math.log(s))
            f16, f32 = prior.network(2 * x - 1, c).float(), ref32.network(2 * x - 1, c)
            # measured on these random weights: ddpmpp 1e-3, adm 3e-3, ncsnpp 5e-2 (its residual
            # encoder and skip decoder sum many large terms)
            bound = 0.1 if "ncsnpp" in case else 1e-2
            assert float((f16 - f32).abs().max() / f32.abs().max()) <= bound


def test_preconditioning_values():
    """Closed forms at sigma' = 1 (model scale)."""
    s = torch.ones(1, 1, 1, 1)
    c_skip, c_out, c_in, c_noise = eo.edm_official_preconditioning("EDMPrecond", s)
    assert torch.allclose(torch.stack([c_skip.flatten()[0], c_out.flatten()[0], c_in.flatten()[0]]),
                          torch.tensor([0.2, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25)]))
    assert float(c_noise) == 0.0
    _, _, _, c_noise = eo.edm_official_preconditioning("VEPrecond", s)
    assert abs(float(c_noise) - math.log(0.5)) < 1e-7
    _, c_out, c_in, c_noise = eo.edm_official_preconditioning("VPPrecond", s)
    t = (math.sqrt(0.01 + 2 * 19.9 * math.log(2)) - 0.1) / 19.9
    assert abs(float(c_noise) - 999 * t) < 1e-3 and float(c_out) == -1.0
    # VP's sigma range (official sigma(epsilon_t), sigma(1)), clamped by generate.py to 80
    # (official float32: sigma(1e-5) = 0.000977), clamped by generate.py to (0.002, 80), halved for [0, 1]
    assert abs(float(eo.vp_sigma(1e-5)) - math.sqrt(math.exp(0.5 * 19.9e-10 + 1e-6) - 1)) < 5e-5
    assert abs(float(eo.vp_sigma(1.0)) - math.sqrt(math.exp(0.5 * 19.9 + 0.1) - 1)) < 1e-2
    prior = make("VPPrecond-ddpmpp")[1]
    assert (prior.sigma_min, prior.sigma_max) == (0.001, 40.0)
    prior = make("iDDPMPrecond-adm")[1]
    assert prior.sigma_min == float(eo.iddpm_u_table()[999]) / 2 and prior.sigma_max == 40.0


# --- loading -------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["EDMPrecond-ddpmpp", "VEPrecond-ncsnpp", "iDDPMPrecond-adm"])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_state_dict_files_load_exactly(case, fmt, tmp_path):
    cfg, prior = make(case)
    # the preconditioner's state dict (model.<...>; iDDPM also its u buffer), saved as EDM users would
    state = {f"model.{k}": v for k, v in prior.model.state_dict().items()}
    if cfg["precond"] == "iDDPMPrecond":
        state["u"] = eo.iddpm_u_table()
    path = tmp_path / f"w.{fmt}"
    torch.save(state, path) if fmt == "pt" else save_file(state, str(path))
    loaded = priors.load(path, family="nvlabs-edm", config=cfg)
    x = torch.rand(2, *prior.image_shape, generator=torch.Generator().manual_seed(2))
    c = torch.tensor([-0.3, 1.1])
    with torch.no_grad():
        assert float((loaded.network(x, c) - prior.network(x, c)).abs().max()) <= 1e-5
        assert float((loaded.denoise(x, 0.4) - prior.denoise(x, 0.4)).abs().max()) <= 1e-5
    # the bare network's state dict, config inferred from the keys (and the family recognised)
    bare = tmp_path / f"bare.{fmt}"
    net_state = prior.model.state_dict()
    torch.save(net_state, bare) if fmt == "pt" else save_file(net_state, str(bare))
    inferred = priors.load(bare)
    assert type(inferred) is eo.EDMOfficialPrior
    assert inferred.config()["network_kwargs"] == cfg["network_kwargs"] | {"dropout": 0.1, "label_dropout": 0}
    assert inferred.precond == ("iDDPMPrecond" if cfg["precond"] == "iDDPMPrecond" else "EDMPrecond")
    with torch.no_grad():
        assert float((inferred.network(x, c) - prior.network(x, c)).abs().max()) <= 1e-5


def test_fp16_file_runs_in_fp16_with_a_float32_embedding(tmp_path):
    reason = _fp16_works()
    if reason:
        pytest.skip(reason)
    cfg, prior = make("VEPrecond-ncsnpp")
    path = tmp_path / "half.safetensors"
    save_file({f"model.{k}": v.half() for k, v in prior.model.state_dict().items()}, str(path))
    loaded = priors.load(path, family="nvlabs-edm", config=cfg, dtype=None)  # the file's dtype
    assert loaded.dtype == torch.float16
    assert loaded.model.map_layer0.weight.dtype == loaded.model.map_noise.freqs.dtype == torch.float32
    x = torch.rand(2, *prior.image_shape, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        for s in SIGMAS:
            d = loaded.denoise(x, s)
            assert d.dtype == torch.float32 and float((d - reference(loaded, x, s)).abs().max()) <= 1e-4


def test_infer_config_reads_the_architecture():
    for case in ("EDMPrecond-ddpmpp", "VEPrecond-ncsnpp", "EDMPrecond-adm"):
        cfg, prior = make(case)
        got = eo.infer_config(prior.model.state_dict())
        assert got["network"] == cfg["network"]
        assert got["network_kwargs"] == cfg["network_kwargs"]


def test_wrong_config_is_a_one_line_key_error(tmp_path):
    cfg, prior = make("EDMPrecond-ddpmpp")
    path = tmp_path / "w.safetensors"
    save_file(prior.model.state_dict(), str(path))
    wrong = json.loads(json.dumps(cfg))
    wrong["network_kwargs"]["model_channels"] = 64
    with pytest.raises(ValueError) as err:
        priors.load(path, family="nvlabs-edm", config=wrong)
    msg = str(err.value)
    assert "\n" not in msg and "shape mismatches" in msg
    assert "model.map_layer0.weight: file (128, 32) vs model (256, 64)" in msg
    wrong = json.loads(json.dumps(cfg))
    wrong["network_kwargs"]["encoder_type"] = "residual"
    with pytest.raises(ValueError) as err:
        priors.load(path, family="nvlabs-edm", config=wrong)
    assert "\n" not in str(err.value) and "ncsnpp" in str(err.value)
    with pytest.raises(ValueError, match="multiples of 32"):
        eo._build({"network": "SongUNet", "network_kwargs": dict(DDPMPP, model_channels=16)}, {})


@pytest.mark.parametrize("case", ["VPPrecond-ddpmpp", "iDDPMPrecond-adm"])
def test_save_load_round_trip(case, tmp_path):
    _, prior = make(case)
    prior.class_label = 2 if prior.label_dim else None
    path = priors.save(prior, tmp_path / "p.safetensors")
    back = priors.load(path)
    assert back.precond == prior.precond and back.class_label == prior.class_label
    assert str(back.data_range) == "[-1, 1]" and back.sigma_max == prior.sigma_max
    x = torch.rand(2, *prior.image_shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back.denoise(x, 0.2), prior.denoise(x, 0.2))


def test_data_range_option():
    cfg, prior = make("EDMPrecond-ddpmpp")
    other = eo._build(cfg, {"data_range": "[0, 1]"})
    other.model.load_state_dict(prior.model.state_dict())
    x = torch.rand(1, *prior.image_shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():  # on [0, 1] the model's scale is invdiff's: D = D'(x, sigma)
        sigma = torch.full((1,), 0.3)
        ref = official_denoise("EDMPrecond", {}, prior.model, x, sigma, None, torch.float32)
        assert float((other.denoise(x, 0.3) - ref).abs().max()) <= 1e-5
    assert other.sigma_max == 80.0


# --- the pickle converter, run as the user would (a subprocess) -------------------------

STAND_IN = '''
"""Stand-ins of EDM's classes: the official names and init_kwargs, deepinv's layers."""
import torch
import deepinv


class SongUNet(deepinv.models.NCSNpp):
    def __init__(self, **kw):
        variant = "ncsn" if kw.get("embedding_type") == "fourier" else "ddpm"
        keep = ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim", "model_channels",
                "channel_mult", "num_blocks", "attn_resolutions")
        super().__init__(model_type=variant, pretrained=None, **{k: kw[k] for k in keep if k in kw})
        self.init_kwargs = dict(kw)


class VPPrecond(torch.nn.Module):
    def __init__(self, img_resolution, img_channels, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5, model_type="SongUNet", **model_kwargs):
        super().__init__()
        self.init_kwargs = dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
                                use_fp16=use_fp16, model_type=model_type, **model_kwargs)
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = (
            img_resolution, img_channels, label_dim, use_fp16)
        sigma = lambda t: ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()
        self.sigma_min = float(sigma(torch.as_tensor(epsilon_t)))
        self.sigma_max = float(sigma(torch.as_tensor(1.0)))
        self.model = SongUNet(img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels,
                              label_dim=label_dim, **model_kwargs)
'''


def test_pickle_converter(tmp_path):
    (tmp_path / "edm_stand_in.py").write_text(textwrap.dedent(STAND_IN))
    sys.path.insert(0, str(tmp_path))
    try:
        import edm_stand_in

        kw = {k: v for k, v in DDPMPP.items() if k not in ("img_resolution", "in_channels")}
        net = edm_stand_in.VPPrecond(img_resolution=16, img_channels=3, **kw).eval()
        randomise(net.model, 5)
        import pickle

        with open(tmp_path / "net.pkl", "wb") as f:
            pickle.dump({"ema": net, "augment_pipe": None}, f)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("edm_stand_in", None)
    out = tmp_path / "net.safetensors"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "edm_pickle_to_safetensors.py"),
                          str(tmp_path / "net.pkl"), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
        assert all(k.startswith("model.") for k in f.keys())
    cfg = json.loads(meta["config"])
    assert meta["family"] == "nvlabs-edm" and meta["invdiff_format"] == "1"
    assert cfg["precond"] == "VPPrecond" and cfg["network"] == "SongUNet"
    assert json.loads(meta["options"])["data_range"] == "[-1, 1]" and json.loads(meta["image_shape"]) == [3, 16, 16]
    assert float(meta["sigma_min"]) == max(0.002, net.sigma_min) / 2 and float(meta["sigma_max"]) == 40.0
    prior = priors.load(out)
    assert prior.precond == "VPPrecond"
    eo._official_group_norms(net.model)  # the stand-in has deepinv's 32 groups; the official: min(32, C // 4)
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for s in SIGMAS:
            ref = (official_denoise("VPPrecond", {}, net.model, 2 * x - 1, torch.full((2,), 2 * s), None,
                                    torch.float32) + 1) / 2
            assert float((prior.denoise(x, s) - ref).abs().max()) <= 1e-4
