"""The diffusers family: ``UNet2DModel`` folders and pipelines, loaded exactly.

The reference is diffusers itself: its ``UNet2DModel`` with random weights, saved with
``save_pretrained`` (flat model folder and ``DDPMPipeline`` folder), and its schedulers'
own reverse-process formulas (``DDPMScheduler.step(...).pred_original_sample`` for VP
models, ``ScoreSdeVeScheduler.step_pred`` for the VE score model).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers is an optional dependency: pip install 'invdiff[diffusers]'")

import invdiff.priors.diffusers_family as fam  # noqa: E402  (registers the family)
from invdiff.priors import load, save  # noqa: E402
from invdiff.priors.diffusers_family import DiffusersPrior, recognizes, recognizes_folder  # noqa: E402

# several noise levels across the schedule, its two ends included
TIMESTEPS = (0, 40, 250, 600, 999)
# worst differences measured, printed at the end of the module (pytest -s)
MEASURED: dict[str, float] = {}


def tiny_unet(in_ch: int = 1, out_ch: int | None = None, size: int = 16, fourier: bool = False, seed: int = 0):
    """A two-level UNet2DModel (16, 32 channels) with one attention level, random weights."""
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=size, in_channels=in_ch, out_channels=out_ch or in_ch, layers_per_block=1,
        block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        time_embedding_type="fourier" if fourier else "positional",
        **({"flip_sin_to_cos": True} if fourier else {}),
    )
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # perturb every parameter, so that no zero-initialised layer hides an error
        for p in unet.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet.eval()


def ddpm(schedule: str = "linear", prediction: str = "epsilon", **kw):
    # clip_sample off: the posterior mean is not clipped (invdiff's clip=False)
    return diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule=schedule, prediction_type=prediction,
                                   clip_sample=False, **kw)


def flat_folder(tmp_path, unet, scheduler, name="model", safe=True):
    folder = tmp_path / name
    unet.save_pretrained(folder, safe_serialization=safe)
    if scheduler is not None:
        scheduler.save_config(folder)
    return folder


def check_vp(prior: DiffusersPrior, unet, scheduler, label: str, tol: float = 1e-4) -> float:
    """``prior.denoise`` against diffusers' own ``DDPMScheduler.step(...).pred_original_sample``
    mapped to ``[0, 1]`` at the integer timesteps ``TIMESTEPS``.

    The noisy image is diffusers' ``add_noise(x0', noise, t)``, handed to the prior as the VE
    image ``x = (x_t / sqrt(abar_t) + 1) / 2`` at ``sigma = sqrt((1 - abar_t) / abar_t) / 2``.
    Checked: (1) the network input the prior forms equals ``x_t`` and its timestep equals
    ``t``; (2) on that same input, diffusers' model output and step formula (evaluated in
    float64 on diffusers' float32 ``alphas_cumprod``) give the prior's ``D``. Bound: ``tol``
    absolute, times ``max(1, sigma)`` where float32 cannot hold the image to ``tol`` (the
    top of the cosine schedule, sigma ~ 1e4).
    """
    C, H, W = prior.image_shape
    x0_m = 2 * torch.rand(2, C, H, W, generator=torch.Generator().manual_seed(5)) - 1
    ab = scheduler.alphas_cumprod.double()
    dtype = next(unet.parameters()).dtype
    seen: dict = {}
    hook = prior.unet.register_forward_pre_hook(lambda module, args: seen.update(x=args[0], t=args[1]))
    worst = 0.0
    try:
        for t in TIMESTEPS:
            noise = torch.randn(x0_m.shape, generator=torch.Generator().manual_seed(t))
            x_t = scheduler.add_noise(x0_m, noise, torch.tensor([t]))
            x_ve = x_t.double() / ab[t].sqrt()  # the VE image x' on the model's [-1, 1] scale
            sigma = float(((1 - ab[t]) / ab[t]).sqrt() / 2)  # invdiff's sigma on [0, 1]
            with torch.no_grad():
                d = prior.denoise(((x_ve + 1) / 2).float(), sigma)
            # (1) the network input and timestep are diffusers' x_t and t
            rel = 1e-5 if dtype == torch.float32 else 1e-3  # float32 rounding / one fp16 ulp
            assert (seen["x"].double() - x_t.double()).abs().max().item() <= rel * max(1.0, x_t.abs().max().item())
            assert (seen["t"].double() - t).abs().max().item() <= 1e-3, (label, t, seen["t"])
            # (2) diffusers' step on the model output at that input
            with torch.no_grad():
                out = unet(seen["x"], torch.tensor(t), return_dict=False)[0]
            # the sample term is the float32 x_t (the sampler's precision), the model output the network's
            pred = scheduler.step(out.double(), t, x_t.double(),
                                  generator=torch.Generator().manual_seed(1)).pred_original_sample
            diff = (d.double() - (pred + 1) / 2).abs().max().item()
            worst = max(worst, diff / max(1.0, sigma))
            key = f"abs. denoiser diff {label}, sigma {'<= 1' if sigma <= 1 else '> 1'}"
            MEASURED[key] = max(MEASURED.get(key, 0.0), diff)
            assert diff <= tol * max(1.0, sigma), f"{label}: t={t}, sigma={sigma:.3g}: |D - diffusers| = {diff:.2e}"
    finally:
        hook.remove()
    MEASURED[f"denoiser {label} (relative to max(1, sigma))"] = max(
        MEASURED.get(f"denoiser {label} (relative to max(1, sigma))", 0.0), worst)
    return worst


def check_network(prior: DiffusersPrior, unet, label: str) -> None:
    C, H, W = prior.image_shape
    dtype = next(unet.parameters()).dtype
    x = torch.randn(2, C, H, W, generator=torch.Generator().manual_seed(3)).to(dtype)
    t = torch.tensor([7.0, 512.0]) if prior.kind == "vp" else torch.tensor([0.05, 20.0])
    with torch.no_grad():
        diff = (prior.unet(x, t, return_dict=False)[0] - unet(x, t, return_dict=False)[0]).abs().max().item()
    MEASURED[f"network {label}"] = max(MEASURED.get(f"network {label}", 0.0), diff)
    assert diff <= 1e-5, f"{label}: network output differs by {diff:.2e}"


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


CONFIGS = [
    # (beta_schedule, prediction_type, learned variance): every schedule and every prediction type
    ("linear", "epsilon", False),
    ("scaled_linear", "v_prediction", False),
    ("squaredcos_cap_v2", "sample", False),
    ("squaredcos_cap_v2", "epsilon", True),
]


@pytest.mark.parametrize("schedule,prediction,learned", CONFIGS)
def test_flat_folder_matches_diffusers_fp32(tmp_path, schedule, prediction, learned):
    unet = tiny_unet(out_ch=2 if learned else 1, seed=sum(map(ord, schedule + prediction)) % 100)
    scheduler = ddpm(schedule, prediction, **({"variance_type": "learned_range"} if learned else {}))
    folder = flat_folder(tmp_path, unet, scheduler)
    assert recognizes_folder(folder)
    prior = load(folder)
    assert isinstance(prior, DiffusersPrior) and prior.kind == "vp" and prior.prediction_type == prediction
    assert str(prior.data_range) == "[-1, 1]" and prior.image_shape == (1, 16, 16)
    # the schedule is diffusers' own alphas_cumprod (float32 values), exactly
    assert torch.equal(prior.alphas_cumprod, scheduler.alphas_cumprod.double())
    label = f"{schedule}/{prediction}{'/learned-var' if learned else ''} fp32"
    check_network(prior, unet, label)
    check_vp(prior, unet, scheduler, label)


@pytest.mark.parametrize("schedule,prediction", [("linear", "epsilon"), ("scaled_linear", "v_prediction"),
                                                 ("squaredcos_cap_v2", "sample")])
def test_flat_folder_matches_diffusers_fp16(tmp_path, schedule, prediction):
    unet = tiny_unet(in_ch=1, seed=11)
    scheduler = ddpm(schedule, prediction)
    folder = flat_folder(tmp_path, unet, scheduler)
    half = copy.deepcopy(unet).half()
    try:
        with torch.no_grad():
            half(torch.zeros(1, 1, 16, 16, dtype=torch.float16), torch.tensor(1))
    except RuntimeError as err:  # pragma: no cover - depends on the CPU build of torch
        pytest.skip(f"fp16 convolutions do not run on this CPU build of torch ({str(err).splitlines()[0]})")
    prior = load(folder, dtype=torch.float16)
    assert prior.dtype == torch.float16
    label = f"{schedule}/{prediction} fp16"
    check_network(prior, half, label)
    # same formula, the network in fp16 on both sides; the sampler side stays float32
    check_vp(prior, half, scheduler, label)
    # what fp16 costs against the fp32 network (measured, loosely bounded)
    prior32 = load(folder)
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        gap = max((prior.denoise(x, s) - prior32.denoise(x, s)).abs().max().item() for s in (0.01, 0.3, 5.0))
    MEASURED[f"fp16 vs fp32 denoiser {schedule}/{prediction}"] = gap
    assert prior.denoise(x, 0.3).dtype == torch.float32 and gap < 0.05


def test_pipeline_folder_and_weights_file(tmp_path):
    unet, scheduler = tiny_unet(in_ch=3, size=24, seed=4), ddpm("linear", "epsilon")
    folder = tmp_path / "pipe"
    diffusers.DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(folder)
    assert (folder / "model_index.json").is_file() and recognizes_folder(folder)
    prior = load(folder)
    assert prior.image_shape == (3, 24, 24)
    check_network(prior, unet, "pipeline linear/epsilon fp32")
    check_vp(prior, unet, scheduler, "pipeline linear/epsilon fp32")
    # the unet/ subfolder's weights file, read with its folder's configs
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    assert recognizes_folder(weights)
    again = load(weights)
    x = torch.rand(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.equal(again.denoise(x, 0.2), prior.denoise(x, 0.2))
    # the card records what the prior is
    assert prior.card["family"] == "diffusers"
    assert "VP epsilon-prediction" in prior.parameterisation and "T=1000" in prior.parameterisation


def test_data_range_option_and_save_round_trip(tmp_path):
    unet, scheduler = tiny_unet(seed=6), ddpm("linear", "epsilon")
    folder = flat_folder(tmp_path, unet, scheduler)
    prior = load(folder, data_range="[0, 1]")
    assert str(prior.data_range) == "[0, 1]"
    # hand formula for a [0, 1] model: x' = x, sigma' = sigma, t by log-sigma interpolation
    ab = scheduler.alphas_cumprod.double()
    t = 123
    s = ((1 - ab[t]) / ab[t]).sqrt()
    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = unet((x / (1 + s**2).sqrt()).float(), torch.tensor(t), return_dict=False)[0]
        d = prior.denoise(x, s.float())
    assert (d - (x - s.float() * eps)).abs().max().item() <= 1e-4
    # priors.save / priors.load keep the family, the schedule and the data range
    path = save(prior, tmp_path / "saved.safetensors")
    back = load(path)
    assert isinstance(back, DiffusersPrior) and str(back.data_range) == "[0, 1]"
    with torch.no_grad():
        assert torch.equal(back.denoise(x, 0.4), prior.denoise(x, 0.4))
    assert back.sigma_min == prior.sigma_min and back.sigma_max == prior.sigma_max


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_ve_score_model_matches_score_sde_ve(tmp_path, dtype):
    unet = tiny_unet(in_ch=3, fourier=True, seed=8)
    scheduler = diffusers.ScoreSdeVeScheduler(num_train_timesteps=100, sigma_min=0.01, sigma_max=50.0)
    folder = flat_folder(tmp_path, unet, scheduler)
    prior = load(folder, dtype=dtype)
    unet = unet.to(dtype)
    label = f"VE fourier {'fp32' if dtype == torch.float32 else 'fp16'}"
    assert prior.kind == "ve" and str(prior.data_range) == "[0, 1]" and prior.dtype == dtype
    assert prior.sigma_min == pytest.approx(0.01) and prior.sigma_max == pytest.approx(50.0)
    assert "VE score model" in prior.parameterisation
    check_network(prior, unet, label)
    # ScoreSdeVePipeline: model(x, sigma_i) is the score; step_pred's mean is x + (sigma^2 - sigma_adj^2) score
    N = 100
    scheduler.set_timesteps(N)
    scheduler.set_sigmas(N)
    x0 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    worst = 0.0
    for i in (0, 10, 50, 90, 99):
        sigma_i, t_i = scheduler.sigmas[i].float(), scheduler.timesteps[i]
        x = x0 + sigma_i * torch.randn(x0.shape, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():
            out = unet(x.to(dtype), sigma_i * torch.ones(2), return_dict=False)[0].float()
        step = scheduler.step_pred(out, t_i, x, generator=torch.Generator().manual_seed(0))
        k = (t_i * (N - 1)).long()
        s_disc = scheduler.discrete_sigmas[k]
        s_adj = scheduler.discrete_sigmas[k - 1] if k > 0 else torch.tensor(0.0)
        score = (step.prev_sample_mean - x) / (s_disc**2 - s_adj**2)
        ref = x + sigma_i**2 * score  # Tweedie
        with torch.no_grad():
            d = prior.denoise(x, sigma_i)
        diff = ((d - ref).abs().max() / max(1.0, float(sigma_i))).item()  # relative to the noise scale
        worst = max(worst, diff)
        assert diff <= 1e-4, f"VE sigma={float(sigma_i):.3g}: {diff:.2e}"
    MEASURED[f"denoiser {label} (relative to max(1, sigma))"] = worst


def test_sharded_and_variant_weights(tmp_path):
    unet = tiny_unet(seed=12)
    sharded = tmp_path / "sharded"
    unet.save_pretrained(sharded, max_shard_size="300KB")
    ddpm().save_config(sharded)
    assert (sharded / "diffusion_pytorch_model.safetensors.index.json").is_file()
    variant = tmp_path / "variant"
    unet.save_pretrained(variant, variant="fp16")
    ddpm().save_config(variant)
    assert (variant / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for folder in (sharded, variant):
        check_network(load(folder), unet, f"{folder.name} linear/epsilon fp32")


def test_missing_scheduler_config_is_one_line_and_option_fills_it(tmp_path):
    unet = tiny_unet(seed=2)
    folder = flat_folder(tmp_path, unet, None)
    with pytest.raises(ValueError) as err:
        load(folder)
    msg = one_line(err.value)
    assert "no scheduler config" in msg and str(folder / "scheduler_config.json") in msg
    prior = load(folder, scheduler={"_class_name": "DDPMScheduler", "beta_schedule": "linear", "clip_sample": False})
    check_vp(prior, unet, ddpm("linear", "epsilon"), "scheduler= option linear/epsilon fp32")


def test_mismatched_weights_give_one_line_error(tmp_path):
    folder = flat_folder(tmp_path, tiny_unet(seed=3), ddpm())
    other = tiny_unet(in_ch=3, seed=3)  # 3 channels: shapes of conv_in / conv_out differ
    other.save_config(folder)  # the config no longer matches the weights
    with pytest.raises(ValueError) as err:
        load(folder)
    msg = one_line(err.value)
    assert "do not match" in msg and "conv_in.weight" in msg


def test_bare_state_dict_file_asks_for_the_folder(tmp_path):
    from safetensors.torch import save_file

    unet = tiny_unet(seed=1)
    assert recognizes(unet.state_dict())
    path = tmp_path / "unet_weights.safetensors"
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(path))
    with pytest.raises(ValueError) as err:
        load(path)
    msg = one_line(err.value)
    assert "diffusers UNet2DModel state dict" in msg and "model folder" in msg


def test_without_diffusers_a_one_line_import_error(tmp_path, monkeypatch):
    folder = flat_folder(tmp_path, tiny_unet(seed=1), ddpm())
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    with pytest.raises(ImportError) as err:
        load(folder)
    msg = one_line(err.value)
    assert msg.startswith("diffusers is not installed: pip install 'invdiff[diffusers]'")


def test_bin_weights_load_weights_only(tmp_path):
    unet = tiny_unet(seed=9)
    folder = flat_folder(tmp_path, unet, ddpm("scaled_linear", "epsilon"), safe=False)
    assert (folder / "diffusion_pytorch_model.bin").is_file()
    assert not (folder / "diffusion_pytorch_model.safetensors").exists()
    prior = load(folder)
    check_network(prior, unet, ".bin scaled_linear/epsilon fp32")
    check_vp(prior, unet, ddpm("scaled_linear", "epsilon"), ".bin scaled_linear/epsilon fp32")


class _Payload:
    """Pickles as a call that would create a marker file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_bin_is_refused_and_inert(tmp_path):
    folder = flat_folder(tmp_path, tiny_unet(seed=1), ddpm(), safe=False)
    marker = tmp_path / "PWNED"
    torch.save({"conv_in.weight": torch.zeros(1), "payload": _Payload(marker)}, folder / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError) as err:
        load(folder)
    msg = one_line(err.value)
    assert "refused" in msg or "weights-only" in msg
    assert not marker.exists()


def test_build_on_meta_device_keeps_the_schedule_real(tmp_path):
    unet = tiny_unet(seed=1)
    config = {"unet": dict(unet.config), "scheduler": dict(ddpm().config)}
    with torch.device("meta"):
        prior = fam.build(config, {})
    assert next(prior.unet.parameters()).is_meta
    assert not prior._log_sigmas.is_meta and prior._log_sigmas.dtype == torch.float64
    assert round(prior.sigma_min, 4) == 0.005 and round(prior.sigma_max, 1) == 78.7


def test_zz_report_measured():
    """The worst differences measured by this module (printed with -s), all within bounds."""
    for key, value in sorted(MEASURED.items()):
        print(f"  {key}: {value:.3e}")
        if not key.startswith("abs."):  # absolute diffs at sigma > 1 are bounded relative to sigma
            assert value <= (0.05 if key.startswith("fp16 vs fp32") else 1e-4), key
