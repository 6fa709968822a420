r"""Hugging Face diffusers ``UNet2DModel`` checkpoints (pixel-space DDPM / DDIM / score-SDE
models) as invdiff priors.

diffusers (``huggingface/diffusers``) is an optional dependency: the network is diffusers'
own :class:`diffusers.UNet2DModel` (``src/diffusers/models/unets/unet_2d.py``), built with
``UNet2DModel.from_config`` from the folder's ``config.json``, so the key layout is the
official one by construction; the noise schedule is diffusers' own scheduler object built
from the scheduler config (``src/diffusers/schedulers/scheduling_ddpm.py`` and friends:
``alphas_cumprod`` exactly as diffusers computes it, in float32). Nothing is re-implemented.

What is read (never downloaded, never unpickled):

* a **model folder**: ``config.json`` with ``"_class_name": "UNet2DModel"``, the weights
  ``diffusion_pytorch_model.safetensors`` (or a sharded ``….safetensors.index.json``, a
  ``….fp16.safetensors`` variant, or ``diffusion_pytorch_model.bin`` read with
  ``torch.load(weights_only=True)``), and the scheduler config ``scheduler_config.json``
  beside ``config.json`` (or one folder up, as in a pipeline);
* a **pipeline folder** (``model_index.json`` with ``unet/`` and ``scheduler/``
  subfolders, written by ``DDPMPipeline.save_pretrained``);
* the weights file of such a folder, read with its folder's configs.

The adapter's math
------------------
invdiff's ``x`` in ``[0, 1]`` is the model's ``x' = shift + scale x`` (the ``data_range``
option, ``"[-1, 1]"`` by default for VP models: ``x' = 2x - 1``, ``σ' = 2σ``;
:class:`~invdiff.priors.conventions.DataRange`).

**VP** schedulers (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``, …): with
diffusers' :math:`\bar\alpha_t` the network input :math:`x_t = \sqrt{\bar\alpha_t}\,x'_0 +
\sqrt{1-\bar\alpha_t}\,\varepsilon` is the VE image :math:`x'` at
:math:`\sigma'_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`, so

.. math::

    t = \sigma'^{-1}_t(\sigma'), \qquad x_t = \frac{x'}{\sqrt{1+\sigma'^2}}, \qquad
    D(x, \sigma) = \frac{\hat x'_0\big(\text{net}(x_t, t), x', \sigma'\big) - \text{shift}}{\text{scale}},

with :math:`\hat x'_0` the scheduler's ``pred_original_sample`` for the
``prediction_type`` (``epsilon``, ``sample``, ``v_prediction``;
:func:`~invdiff.priors.conventions.vp_prediction_to_x0`). ``t`` is continuous, linear in
:math:`\log\sigma'` between integer steps (the rule of
:func:`invdiff.priors.conventions.vp_timestep`, shared with ADM). A learned variance (``out_channels
= 2 in_channels``) is dropped. The scheduler's sampling choices (``clip_sample``,
``thresholding``) are not applied: ``D`` is the posterior mean.

**VE** (``ScoreSdeVeScheduler``, the NCSN++ ``UNet2DModel`` with
``time_embedding_type="fourier"``): as in diffusers' ``ScoreSdeVePipeline``
(``pipelines/deprecated/score_sde_ve/pipeline_score_sde_ve.py``) the network is called
with the noise level itself, ``unet(x', σ')``, and returns the score
(``ScoreSdeVeScheduler.step_pred`` moves along ``+ (σ_t^2 - σ_{t-1}^2) · output``), so
Tweedie gives

.. math::

    D(x, \sigma) = \frac{x' + \sigma'^2\, s_\theta(x', \sigma') - \text{shift}}{\text{scale}},

with ``data_range`` ``"[0, 1]"`` by default (score-SDE's VE models use
``data.centered=False``; the pipeline clamps its samples to ``[0, 1]``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .base import DiffusionPrior
from .conventions import PREDICTION_TYPES, DataRange, vp_input, vp_prediction_to_x0, vp_timestep
from .loading import PriorFamily, _read_safetensors, _read_torch, jsonable, register_family

__all__ = ["DiffusersPrior", "read_folder", "recognizes_folder"]

SOURCE = ("huggingface/diffusers: src/diffusers/models/unets/unet_2d.py (UNet2DModel, diffusers' own class), "
          "src/diffusers/schedulers/scheduling_ddpm.py / scheduling_sde_ve.py (the noise schedules)")
FORMATS = ("diffusers model folder (config.json + diffusion_pytorch_model.safetensors or .bin + "
           "scheduler_config.json) or pipeline folder (model_index.json, unet/, scheduler/)")

_CONFIG = "config.json"
_SCHEDULER = "scheduler_config.json"
_INDEX = "model_index.json"
_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
            "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")
_VE_SCHEDULERS = ("ScoreSdeVeScheduler",)
_OPTIONS = {"image_shape", "data_range", "clip", "sigma_data", "scheduler"}
_INSTALL = ("diffusers is not installed: pip install 'invdiff[diffusers]' (needed for the diffusers family: "
            "UNet2DModel folders and pipelines)")


def _diffusers() -> Any:
    """The ``diffusers`` module, imported on first use (one-line ImportError if missing)."""
    try:
        import diffusers
    except ImportError:
        raise ImportError(_INSTALL) from None
    return diffusers


def _unet_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A UNet2DModel config as a JSON-ready dict (diffusers' bookkeeping keys dropped)."""
    drop = ("_use_default_values", "_name_or_path")
    return {k: v for k, v in jsonable(dict(config)).items() if k not in drop}


# ----------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------


class DiffusersPrior(DiffusionPrior):
    r"""A diffusers ``UNet2DModel`` with its scheduler as a VE denoiser on ``[0, 1]`` images.

    VP schedulers (``DDPMScheduler``, ``DDIMScheduler``, …; :math:`\bar\alpha_t` from
    diffusers' own scheduler object):

    .. math::

        x' = \text{shift} + \text{scale}\,x,\quad \sigma' = \text{scale}\,\sigma,\quad
        t = \sigma'^{-1}_t(\sigma'),\quad
        o = \text{net}\!\left(\tfrac{x'}{\sqrt{1+\sigma'^2}},\, t\right)_{:C},\quad
        D(x, \sigma) = \frac{\hat x'_0(o, x', \sigma') - \text{shift}}{\text{scale}},

    :math:`\sigma'_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`, ``t`` continuous (linear in
    :math:`\log\sigma'` between integer steps, clamped to ``[0, T-1]``) and
    :math:`\hat x'_0` the ``prediction_type``'s estimate
    (:func:`~invdiff.priors.conventions.vp_prediction_to_x0`).
    ``ScoreSdeVeScheduler`` (VE score model called with the noise level):
    :math:`D(x, \sigma) = (x' + \sigma'^2\,\text{net}(x', \sigma') - \text{shift})/\text{scale}`.

    :param unet: a :class:`diffusers.UNet2DModel` (its ``config`` gives the image shape,
        channels and time embedding).
    :param scheduler: the scheduler's config (a dict as in ``scheduler_config.json``, with
        ``_class_name``) or a diffusers scheduler object.
    :param image_shape: ``(C, H, W)``; default ``(in_channels, sample_size, sample_size)``.
    :param data_range: range of the training images: ``"[-1, 1]"`` (default of VP models),
        ``"[0, 1]"`` (default of VE models), … (:class:`~invdiff.priors.conventions.DataRange`).
    :param clip: clamp ``D`` to ``[0, 1]`` (off by default: ``D`` is a posterior mean).
    :param sigma_data: standard deviation of the training images on ``[0, 1]``.

    Example (skipped where diffusers is not installed)::

        >>> import pytest, torch
        >>> diffusers = pytest.importorskip("diffusers")
        >>> unet = diffusers.UNet2DModel(sample_size=16, in_channels=1, out_channels=1, layers_per_block=1,
        ...                              block_out_channels=(16, 32), norm_num_groups=8,
        ...                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        ...                              up_block_types=("AttnUpBlock2D", "UpBlock2D"))
        >>> prior = DiffusersPrior(unet, {"_class_name": "DDPMScheduler", "beta_schedule": "linear"})
        >>> round(prior.sigma_min, 4), round(prior.sigma_max, 1), str(prior.data_range)
        (0.005, 78.7, '[-1, 1]')
        >>> prior.denoise(torch.rand(1, 1, 16, 16), 0.3).shape
        torch.Size([1, 1, 16, 16])
    """

    fully_convolutional = True
    #: ``"vp"`` (DDPM-type scheduler) or ``"ve"`` (``ScoreSdeVeScheduler``)
    kind: str
    #: ``epsilon``, ``sample``, ``v_prediction`` (VP) or ``score`` (VE)
    prediction_type: str

    def __init__(
        self,
        unet: nn.Module,
        scheduler: Mapping[str, Any] | Any,
        image_shape: Sequence[int] | None = None,
        *,
        data_range: str | Sequence[float] | DataRange | None = None,
        clip: bool = False,
        sigma_data: float = 0.5,
    ) -> None:
        diffusers = _diffusers()
        if getattr(unet, "config", None) is None:
            raise ValueError(f"DiffusersPrior needs a diffusers UNet2DModel, got {type(unet).__name__}")
        ucfg = dict(unet.config)
        if ucfg.get("num_class_embeds") is not None or ucfg.get("class_embed_type") is not None:
            raise ValueError("class-conditional UNet2DModel (num_class_embeds / class_embed_type) is not supported: "
                             "the prior contract has no class label")
        if ucfg.get("time_embedding_type", "positional") == "learned":
            raise ValueError("UNet2DModel with time_embedding_type='learned' takes integer timesteps only; "
                             "invdiff needs a continuous noise level (positional or fourier embeddings)")
        sched_cfg = jsonable(dict(scheduler.config if hasattr(scheduler, "config") else scheduler))
        cls_name = str(sched_cfg.get("_class_name") or "DDPMScheduler")
        kind = "ve" if cls_name in _VE_SCHEDULERS else "vp"
        if kind == "ve" and ucfg.get("time_embedding_type") != "fourier":
            raise ValueError(f"a {cls_name} needs a UNet2DModel with time_embedding_type='fourier' (called with "
                             f"the noise level), got {ucfg.get('time_embedding_type', 'positional')!r}")
        if kind == "vp" and ucfg.get("time_embedding_type") == "fourier":
            raise ValueError(f"a fourier-embedding UNet2DModel (a VE score model) needs a ScoreSdeVeScheduler "
                             f"config, got {cls_name}")
        in_ch, out_ch = int(ucfg.get("in_channels", 3)), int(ucfg.get("out_channels", 3))
        if out_ch not in (in_ch, 2 * in_ch):
            raise ValueError(f"UNet2DModel has {in_ch} input and {out_ch} output channels; expected out_channels "
                             f"= in_channels or 2 * in_channels (a learned variance, dropped)")
        if image_shape is None:
            size = ucfg.get("sample_size")
            if size is None:
                raise ValueError("the UNet2DModel config has no sample_size: pass image_shape=(C, H, W)")
            h, w = (size, size) if isinstance(size, (int, float)) else tuple(size)
            image_shape = (in_ch, int(h), int(w))
        dr = DataRange.parse(data_range if data_range is not None else ("[0, 1]" if kind == "ve" else "[-1, 1]"))
        with torch.device("cpu"):  # load() builds under torch.device("meta"); the schedule is data
            cls = getattr(diffusers, cls_name, None) if cls_name.endswith("Scheduler") else None
            if cls is None and kind == "vp":
                cls = diffusers.DDPMScheduler  # same betas code in every diffusers VP scheduler
            if cls is None:
                raise ValueError(f"this diffusers has no scheduler {cls_name!r}")
            sched = cls.from_config(sched_cfg)
            sched_cfg = {**jsonable(dict(sched.config)), "_class_name": cls_name}
            sched_cfg.pop("_use_default_values", None)
        attrs: dict[str, Any] = {"kind": kind, "scheduler_config": sched_cfg}
        if kind == "vp":
            if not hasattr(sched, "alphas_cumprod"):
                raise ValueError(f"scheduler {cls_name} has no alphas_cumprod: not a VP (DDPM-type) scheduler")
            attrs["prediction_type"] = str(sched.config.get("prediction_type", "epsilon"))
            if attrs["prediction_type"] not in PREDICTION_TYPES:
                raise ValueError(f"scheduler prediction_type must be one of {', '.join(PREDICTION_TYPES)}, "
                                 f"got {attrs['prediction_type']!r}")
            alphas_cumprod = sched.alphas_cumprod.detach().to(torch.float64).numpy()  # float32 values, as diffusers
            if not (alphas_cumprod > 0).all():
                raise ValueError("the schedule reaches alpha_bar = 0 (zero terminal SNR, rescale_betas_zero_snr): "
                                 "its last noise level is infinite, not supported")
            sigmas_vp = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)  # σ'_t on the model's scale
            attrs["num_timesteps"] = len(sigmas_vp)
            attrs["_log_sigmas"] = torch.from_numpy(np.log(sigmas_vp))
            attrs["alphas_cumprod"] = torch.from_numpy(alphas_cumprod)  # kept out of the state dict
            s_lo, s_hi = float(sigmas_vp[0]), float(sigmas_vp[-1])
            sched_name = str(sched.config.get("beta_schedule", "linear"))
            if sched.config.get("trained_betas") is not None:
                betas = "trained betas"
            elif sched_name in ("linear", "scaled_linear", "sigmoid"):
                betas = (f"{sched_name} betas {float(sched.config.get('beta_start')):g}.."
                         f"{float(sched.config.get('beta_end')):g}")
            else:
                betas = f"{sched_name} betas"
            attrs["parameterisation"] = (f"VP {attrs['prediction_type']}-prediction (diffusers {cls_name}), "
                                         f"{betas}, T={attrs['num_timesteps']}, continuous t by log-sigma interpolation")
        else:
            attrs["prediction_type"] = "score"
            s_lo, s_hi = float(sched.config.sigma_min), float(sched.config.sigma_max)
            attrs["num_timesteps"] = int(sched.config.num_train_timesteps)
            attrs["parameterisation"] = (f"VE score model s(x', sigma') called with sigma' (diffusers {cls_name}), "
                                         f"sigma' in [{s_lo:g}, {s_hi:g}], D = x' + sigma'^2 s")
        super().__init__(image_shape, dr.sigma_from_model(s_lo), dr.sigma_from_model(s_hi), sigma_data)
        for name, value in attrs.items():
            setattr(self, name, value)
        self.unet = unet
        self.clip = bool(clip)
        self.set_data_range(dr)  # recorded in the model card
        self.out_channels = out_ch

    # --- schedule -----------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        """Dtype the network runs in."""
        p = next(self.unet.parameters(), None)
        return torch.float32 if p is None else p.dtype

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep ``t ∈ [0, T-1]`` of the invdiff noise level ``sigma``
        (``[0, 1]`` scale) for a VP schedule: the log-σ' interpolation of
        :func:`invdiff.priors.conventions.vp_timestep`, clamped outside the schedule."""
        if self.kind != "vp":
            raise ValueError("sigma_to_t is defined for VP schedules only; a VE model takes sigma itself")
        table_dtype = torch.float32 if sigma.device.type == "mps" else torch.float64
        return vp_timestep(self._log_sigmas, self.data_range.scale * sigma.to(table_dtype))

    # --- the contract -------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        dr = self.data_range
        x_m = dr.to_model(x)
        s_m = dr.sigma_to_model(sigma)
        if self.kind == "vp":
            t = self.sigma_to_t(sigma).to(x.device)  # float64; diffusers' Timesteps embeds it in float32
            out = self.unet(vp_input(x_m, s_m).to(self.dtype), t, return_dict=False)[0]
            out = out[:, : x.shape[1]].to(x.dtype)
            x0_m = vp_prediction_to_x0(out, x_m, s_m, self.prediction_type)
        else:
            score = self.unet(x_m.to(self.dtype), s_m.reshape(-1).to(torch.float32), return_dict=False)[0]
            x0_m = x_m + s_m**2 * score[:, : x.shape[1]].to(x.dtype)
        d = dr.from_model(x0_m)
        return d.clamp(0, 1) if self.clip else d

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, scheduler={self.scheduler_config.get('_class_name')}, "
                f"prediction={self.prediction_type}, T={self.num_timesteps}, data_range={self.data_range}, "
                f"dtype={self.dtype}")


# ----------------------------------------------------------------------------------
# folders
# ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable JSON config ({type(err).__name__}: {' '.join(str(err).split())})")
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _class_name(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("_class_name")
    except Exception:
        return None


def _is_latent_pipeline(index: Path) -> bool:
    try:
        data = json.loads(index.read_text())
    except Exception:
        return False
    return any(k in data for k in ("vqvae", "vae", "text_encoder"))


def _unet_dir(path: Path) -> Path | None:
    """The folder holding the UNet2DModel's config.json: ``path`` itself, or ``path/unet``
    of a pipeline; ``None`` when ``path`` is neither."""
    if (path / _CONFIG).is_file() and _class_name(path / _CONFIG) == "UNet2DModel":
        return path
    if (path / _INDEX).is_file() and (path / "unet" / _CONFIG).is_file() and not _is_latent_pipeline(path / _INDEX):
        if _class_name(path / "unet" / _CONFIG) == "UNet2DModel":
            return path / "unet"
    return None


def recognizes_folder(path: str | Path) -> bool:
    """Whether ``path`` is a diffusers ``UNet2DModel`` folder, a pixel-space pipeline folder
    (``model_index.json``, ``unet/``, ``scheduler/``; latent pipelines with a VAE are not
    this family's), or the ``diffusion_pytorch_model.*`` weights file of such a folder."""
    path = Path(path)
    if path.is_file():
        return path.name.startswith("diffusion_pytorch_model.") and _unet_dir(path.parent) is not None
    return path.is_dir() and _unet_dir(path) is not None


def _read_weights(file: Path) -> dict[str, Tensor]:
    name = file.name
    if name.endswith(".index.json"):  # sharded: {"weight_map": {key: shard file}}
        weight_map = _read_json(file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"{file}: sharded-weights index without a weight_map")
        state: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            shard_path = file.parent / str(shard)
            if Path(str(shard)).name != str(shard) or not shard_path.is_file():
                raise ValueError(f"{file}: shard {shard!r} is missing (expected {shard_path})")
            state.update(_read_weights(shard_path))
        return state
    if name.endswith(".safetensors"):
        return _read_safetensors(file)[0]
    obj = _read_torch(file)  # torch.load(weights_only=True): never unpickles code
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, Tensor) for v in obj.values())):
        raise ValueError(f"{file}: expected a diffusers state dict (a flat mapping of tensors), "
                         f"found {type(obj).__name__}")
    return {str(k): v for k, v in obj.items()}


def _weights_file(unet_dir: Path) -> Path:
    for name in _WEIGHTS:
        if (unet_dir / name).is_file():
            return unet_dir / name
    variants = sorted(unet_dir.glob("diffusion_pytorch_model.*.safetensors")) + sorted(
        unet_dir.glob("diffusion_pytorch_model.*.bin"))
    if variants:  # e.g. diffusion_pytorch_model.fp16.safetensors
        return variants[0]
    raise ValueError(f"{unet_dir}: no UNet weights: expected {unet_dir / _WEIGHTS[0]} (or "
                     f"diffusion_pytorch_model.bin) next to config.json")


def read_folder(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, Any]]:
    """``(state_dict, config, options)`` of a diffusers folder (see :func:`recognizes_folder`).

    ``config = {"unet": <config.json>, "scheduler": <scheduler_config.json> or None}``; the
    scheduler config is ``scheduler/scheduler_config.json`` of a pipeline, else
    ``scheduler_config.json`` beside ``config.json`` or one folder up. When there is none,
    ``config["scheduler_file"]`` names the file expected, and :func:`build` raises unless
    the ``scheduler`` option gives it. Weights: safetensors (sharded and ``fp16`` variants
    too) or a ``.bin`` read with ``torch.load(weights_only=True)``; never unpickled.
    """
    path = Path(path)
    weights: Path | None = path if path.is_file() else None
    folder = path.parent if path.is_file() else path
    unet_dir = _unet_dir(folder)
    if unet_dir is None:
        raise ValueError(f"{path}: not a diffusers UNet2DModel folder: expected {folder / _CONFIG} with "
                         f"\"_class_name\": \"UNet2DModel\", or a pipeline folder with {_INDEX}, unet/ and scheduler/")
    unet_cfg = _read_json(unet_dir / _CONFIG)
    candidates = [unet_dir.parent / "scheduler" / _SCHEDULER, unet_dir / _SCHEDULER, unet_dir.parent / _SCHEDULER]
    sched_file = next((c for c in candidates if c.is_file()), None)
    config: dict[str, Any] = {"unet": unet_cfg, "scheduler": _read_json(sched_file) if sched_file else None}
    if sched_file is None:
        expected = candidates[0] if unet_dir != folder else candidates[1]
        config["scheduler_file"] = str(expected)
    state = _read_weights(weights if weights is not None else _weights_file(unet_dir))
    return state, config, {}


# ----------------------------------------------------------------------------------
# the family
# ----------------------------------------------------------------------------------


def _scheduler_option(value: Any) -> dict[str, Any]:
    if isinstance(value, (str, Path)):
        return _read_json(Path(value))
    if isinstance(value, Mapping):
        return dict(value)
    if hasattr(value, "config"):
        return dict(value.config)
    raise ValueError(f"scheduler must be a scheduler config dict, the path of a scheduler_config.json or a "
                     f"diffusers scheduler, got {type(value).__name__}")


def build(config: Any, options: dict) -> DiffusersPrior:
    """A :class:`DiffusersPrior` with random weights from ``config = {"unet": …,
    "scheduler": …}`` (also accepted: a bare UNet2DModel config, with the scheduler in
    ``options["scheduler"]``); works under ``torch.device("meta")``."""
    diffusers = _diffusers()
    options = dict(options)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown diffusers options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    if not isinstance(config, Mapping):
        raise ValueError(f"diffusers config must be a dict {{'unet': ..., 'scheduler': ...}}, got {type(config).__name__}")
    unet_cfg = config["unet"] if "unet" in config else config
    scheduler = options.pop("scheduler", None)
    scheduler = _scheduler_option(scheduler) if scheduler is not None else config.get("scheduler")
    if scheduler is None:
        where = config.get("scheduler_file") or "scheduler_config.json beside config.json"
        raise ValueError(f"no scheduler config: expected {where} (write it with DDPMScheduler(...).save_config(folder)) "
                         f"or pass scheduler= (its config dict or file)")
    if not isinstance(unet_cfg, Mapping) or unet_cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        name = unet_cfg.get("_class_name") if isinstance(unet_cfg, Mapping) else type(unet_cfg).__name__
        raise ValueError(f"the diffusers family loads UNet2DModel (pixel space), not {name}")
    unet = diffusers.UNet2DModel.from_config(dict(unet_cfg))
    shape = options.pop("image_shape", None)
    return DiffusersPrior(unet, scheduler, shape, **options)


def describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    """``(config, options)`` of a :class:`DiffusersPrior`, JSON-ready, accepted by :func:`build`."""
    assert isinstance(prior, DiffusersPrior)
    config = {"unet": _unet_config(prior.unet.config), "scheduler": prior.scheduler_config}
    options = dict(image_shape=list(prior.image_shape), data_range=str(prior.data_range), clip=prior.clip,
                   sigma_data=prior.sigma_data)
    return config, options


_BARE = ("this is a diffusers UNet2DModel state dict, which carries no config: pass its model folder "
         "(config.json + diffusion_pytorch_model.safetensors + the scheduler config), not the file alone")


def _infer(state_dict: Mapping[str, Tensor], options: dict) -> Any:
    raise ValueError(_BARE)


def recognizes(state_dict: Mapping[str, Tensor]) -> bool:
    """A diffusers ``UNet2DModel`` state dict (``conv_in``, ``time_embedding.linear_1``,
    ``down_blocks.0.resnets.0.conv1``)."""
    return all(k in state_dict for k in ("conv_in.weight", "time_embedding.linear_1.weight",
                                         "down_blocks.0.resnets.0.conv1.weight"))


register_family(
    PriorFamily(
        name="diffusers",
        prior_type=DiffusersPrior,
        build=build,
        describe=describe,
        network=lambda prior: prior.unet,
        infer_config=_infer,
        recognizes=recognizes,
        source=SOURCE,
        formats=FORMATS,
        recognizes_folder=recognizes_folder,
        read_folder=read_folder,
    )
)
