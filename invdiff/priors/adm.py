r"""Guided-diffusion / ADM checkpoints (Dhariwal & Nichol 2021) as invdiff priors.

Two pieces:

* :class:`GuidedDiffusionUNet` — the ε-prediction U-Net of ``openai/guided-diffusion``
  (``guided_diffusion/unet.py``), re-written here with **exactly** the official
  ``state_dict`` key layout and shapes, so that the published checkpoints
  (``ffhq_10m.pt`` of DPS, ``256x256_diffusion_uncond.pt``, the AAPM CT and fastMRI
  ADM priors) load unchanged. It is configured by :class:`ADMConfig`, whose fields are
  the official command-line flags; :meth:`ADMConfig.infer_from_state_dict` reads the
  configuration off a checkpoint's key names and shapes.
* :class:`ADMPrior` — the adapter from the variance-preserving (VP) ε-model on
  ``[-1, 1]`` images to invdiff's variance-exploding denoiser on ``[0, 1]`` images.

The adapter's math
------------------
invdiff's contract is ``x = x0 + σ n`` with ``x0 ∈ [0, 1]``. In the model's ``[-1, 1]``
scale the same image is

.. math::

    x' = 2x - 1 = x_0' + \sigma' n, \qquad x_0' = 2x_0 - 1, \qquad \sigma' = 2\sigma.

The VP forward process is :math:`x_t = \sqrt{\bar\alpha_t}\, x_0' + \sqrt{1-\bar\alpha_t}\,
\varepsilon`; dividing by :math:`\sqrt{\bar\alpha_t}` shows that it is the VE process
with noise level :math:`\sigma'_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}`. So for a given
``σ'`` the network is evaluated at the timestep ``t`` with :math:`\sigma'_t = \sigma'`, on
the input

.. math::

    x_t = \frac{x'}{\sqrt{1 + \sigma'^2}} \quad(=\sqrt{\bar\alpha_t}\,x'),

and Tweedie's formula for the ε-parametrisation gives

.. math::

    \hat x_0' = x' - \sigma' \hat\varepsilon(x_t, t), \qquad
    D(x, \sigma) = \frac{\hat x_0' + 1}{2}.

The timestep is continuous: between the schedule's integer steps, ``t`` is interpolated
linearly in :math:`\log \sigma'_t` (the k-diffusion ``sigma_to_t`` rule), which is
monotone because :math:`\sigma'_t` is strictly increasing. Outside
``[sigma_min, sigma_max]`` the timestep is clamped to ``0`` or ``T - 1`` (the input
scaling still uses the true σ). A learned variance (the second half of the output
channels when ``learn_sigma``) is dropped. ``sigma_min`` and ``sigma_max`` are
:math:`\sigma'_0/2` and :math:`\sigma'_{T-1}/2` (≈ 0.005 and ≈ 78.7 for the linear
schedule with 1000 steps).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DiffusionPrior
from .conventions import DataRange, vp_input, vp_prediction_to_x0, vp_timestep

__all__ = [
    "ADMConfig",
    "ADMPrior",
    "GuidedDiffusionUNet",
    "PRESET_OPTIONS",
    "get_named_beta_schedule",
    "timestep_embedding",
]

# official default channel multipliers (guided_diffusion/script_util.py: create_model); 320 is
# DDS's addition (HJ-harry/DDS guided_diffusion/script_util.py maps 320 to the 256 defaults)
_DEFAULT_CHANNEL_MULT = {
    512: (0.5, 1, 1, 2, 2, 4, 4),
    256: (1, 1, 2, 2, 4, 4),
    320: (1, 1, 2, 2, 4, 4),
    128: (1, 1, 2, 3, 4),
    64: (1, 2, 3, 4),
}

# official flags that describe the diffusion process (not the network); accepted by
# ADMConfig.from_flags and returned separately so that loaders can hand them to ADMPrior
_DIFFUSION_FLAGS = {
    "diffusion_steps",
    "noise_schedule",
    "timestep_respacing",
    "use_kl",
    "predict_xstart",
    "rescale_timesteps",
    "rescale_learned_sigmas",
    # DDS's `diffusion:` section (configs/vp/*.yml): a linear schedule by its end points
    "beta_schedule",
    "beta_start",
    "beta_end",
    "num_diffusion_timesteps",
}
# official flags that change nothing in the weights or the outputs; `type`, `var_type` and
# `resamp_with_conv` are the extra keys of DDS's `model:` section, which its
# create_model(**kwargs) accepts and ignores
_IGNORED_FLAGS = {"use_fp16", "use_checkpoint", "conv_resample", "dims", "type", "var_type", "resamp_with_conv",
                  "model_path"}
# sections of a nested config file (DDS's YAML) that hold no network or diffusion settings
_IGNORED_SECTIONS = {"data", "sampling", "training", "optim"}
_FLAG_ALIASES = {"num_channels": "model_channels"}

_PRESETS: dict[str, dict[str, Any]] = {
    # DPS (Chung et al. 2023), configs/model_config.yaml for ffhq_10m.pt
    "ffhq_10m": dict(
        image_size=256,
        in_channels=3,
        model_channels=128,
        num_res_blocks=1,
        attention_resolutions="16",
        channel_mult="",
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        learn_sigma=True,
        dropout=0.0,
    ),
    # guided-diffusion README, 256x256_diffusion_uncond.pt
    "imagenet256_uncond": dict(
        image_size=256,
        in_channels=3,
        model_channels=256,
        num_res_blocks=2,
        attention_resolutions="32,16,8",
        channel_mult="",
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        use_new_attention_order=False,
        learn_sigma=True,
        dropout=0.0,
    ),
    # DDS (Chung, Lee & Ye, ICLR 2024), configs/vp/AAPM256.yml `model:` (1-channel CT slices in [0, 1])
    "dds_aapm256": dict(
        type="openai",
        in_channels=1,
        out_channels=2,
        num_channels=256,
        num_heads=4,
        num_res_blocks=1,
        attention_resolutions="16",
        dropout=0.0,
        resamp_with_conv=True,
        learn_sigma=True,
        use_scale_shift_norm=True,
        use_fp16=False,
        resblock_updown=True,
        num_heads_upsample=-1,
        var_type="fixedsmall",
        num_head_channels=64,
        image_size=256,
        class_cond=False,
        use_new_attention_order=False,
    ),
    # DDS, configs/vp/fastmri_knee_320_complex.yml `model:`: AAPM256's with these four values changed
    # (complex knee slices, max-normalised); 320 // 16 = 20 is no downsampling factor, so only the
    # middle block has attention (as officially)
}
_PRESETS["dds_fastmri320"] = dict(_PRESETS["dds_aapm256"], in_channels=2, out_channels=4, image_size=320)

#: adapter options of each preset beyond the defaults: the data range its checkpoint was trained on
PRESET_OPTIONS: dict[str, dict[str, Any]] = {
    "ffhq_10m": {"data_range": "[-1, 1]"},
    "imagenet256_uncond": {"data_range": "[-1, 1]"},
    # DDS's solver_2d.py applies the CT operator to the network's Tweedie estimate of raw [0, 1] slices,
    # and the MRI operator to complex images divided by their largest magnitude
    "dds_aapm256": {"data_range": "[0, 1]"},
    "dds_fastmri320": {"data_range": "complex-max"},
}


def _mult_str(mult: Sequence[float]) -> str:
    return ",".join(str(int(m)) if float(m).is_integer() else str(m) for m in mult)


@dataclass
class ADMConfig:
    """Configuration of a :class:`GuidedDiffusionUNet`, with the official flag names.

    Defaults are those of ``guided_diffusion.script_util.model_and_diffusion_defaults``
    except ``in_channels`` (a flag here; 3 in the official code).

    :param image_size: training image size; picks the default ``channel_mult`` and turns
        ``attention_resolutions`` into downsampling factors ``ds = image_size // res``.
    :param in_channels: image channels (3 RGB, 1 CT magnitude, 2 complex MRI).
    :param model_channels: base width (the official flag ``num_channels``).
    :param out_channels: output channels; ``None`` means ``in_channels`` times 2 with
        ``learn_sigma`` (ε and variance) or times 1 without.
    :param num_res_blocks: residual blocks per level.
    :param attention_resolutions: comma-separated resolutions with self-attention, e.g.
        ``"32,16,8"`` (a sequence of ints is accepted).
    :param channel_mult: comma-separated width multipliers per level; ``""`` for the
        official default of ``image_size`` (256: ``1,1,2,2,4,4``, 512, 128, 64 likewise).
    :param num_heads: attention heads (used when ``num_head_channels == -1``).
    :param num_head_channels: channels per head; overrides ``num_heads`` when not ``-1``.
    :param num_heads_upsample: heads in the decoder; ``-1`` means ``num_heads``.
    :param use_scale_shift_norm: FiLM-style conditioning of the residual blocks.
    :param resblock_updown: residual blocks (not convolutions) for up/downsampling.
    :param use_new_attention_order: split q, k, v before heads (``QKVAttention``)
        instead of the legacy order of the published checkpoints.
    :param learn_sigma: the network also outputs the (dropped) variance interpolation.
    :param dropout: dropout in the residual blocks (training only).
    :param num_classes: number of classes of a class-conditional model, else ``None``.
    """

    image_size: int = 256
    in_channels: int = 3
    model_channels: int = 128
    out_channels: int | None = None
    num_res_blocks: int = 2
    attention_resolutions: str = "16,8"
    channel_mult: str = ""
    num_heads: int = 4
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = True
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    learn_sigma: bool = False
    dropout: float = 0.0
    num_classes: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.attention_resolutions, (int, float)):  # YAML reads `attention_resolutions: 16` as an int
            self.attention_resolutions = str(int(self.attention_resolutions))
        elif not isinstance(self.attention_resolutions, str):
            self.attention_resolutions = ",".join(str(int(r)) for r in self.attention_resolutions)
        if not isinstance(self.channel_mult, str):
            self.channel_mult = _mult_str(self.channel_mult)
        if self.out_channels is None:
            self.out_channels = self.in_channels * (2 if self.learn_sigma else 1)
        if not self.channel_mult and self.image_size not in _DEFAULT_CHANNEL_MULT:
            raise ValueError(
                f"no default channel_mult for image_size={self.image_size} "
                f"(defaults exist for {sorted(_DEFAULT_CHANNEL_MULT)}); pass channel_mult"
            )

    # --- derived quantities -------------------------------------------------------
    @property
    def channel_mult_tuple(self) -> tuple[float, ...]:
        """Width multipliers per level, as numbers."""
        if not self.channel_mult:
            return _DEFAULT_CHANNEL_MULT[self.image_size]
        out = []
        for m in self.channel_mult.split(","):
            v = float(m)
            out.append(int(v) if v.is_integer() else v)
        return tuple(out)

    @property
    def attention_ds(self) -> tuple[int, ...]:
        """Downsampling factors with attention (``image_size // res``, as official)."""
        if not self.attention_resolutions.strip():
            return ()
        return tuple(self.image_size // int(r) for r in self.attention_resolutions.split(","))

    @property
    def eps_channels(self) -> int:
        """Output channels holding ε (the rest is the learned variance)."""
        return self.out_channels // 2 if self.learn_sigma else self.out_channels

    # --- constructors -------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ADMConfig":
        """A published configuration, from its official flags verbatim: ``"ffhq_10m"`` (DPS's
        FFHQ model), ``"imagenet256_uncond"`` (``256x256_diffusion_uncond.pt``),
        ``"dds_aapm256"`` and ``"dds_fastmri320"`` (DDS's CT and complex knee MRI models; their
        data ranges, ``[0, 1]`` and ``complex-max``, are in :data:`PRESET_OPTIONS`)."""
        if name not in _PRESETS:
            raise ValueError(f"unknown ADM preset {name!r}; known: {', '.join(sorted(_PRESETS))}")
        config, _ = cls.from_flags({**_PRESETS[name], **overrides})
        return config

    @classmethod
    def presets(cls) -> list[str]:
        """Names accepted by :meth:`preset`."""
        return sorted(_PRESETS)

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any]) -> tuple["ADMConfig", dict[str, Any]]:
        """Split official flags (``model_and_diffusion_defaults`` names, e.g. a DPS
        ``model_config.yaml``) into a config and the diffusion flags.

        Returns ``(config, diffusion_flags)`` where ``diffusion_flags`` holds
        ``diffusion_steps``, ``noise_schedule``, ``rescale_timesteps``, … as given.
        ``use_fp16``/``use_checkpoint`` are ignored; ``class_cond=True`` needs
        ``num_classes`` (1000 if absent, as the official code). A nested config file is
        read too: DDS's YAML (``{"data": ..., "model": ..., "diffusion": ...}``) gives its
        ``model`` and ``diffusion`` sections (``beta_schedule``, ``beta_start``, ``beta_end``,
        ``num_diffusion_timesteps``), its ``data``/``sampling`` sections are ignored.
        """
        names = {f.name for f in fields(cls)}
        net: dict[str, Any] = {}
        diffusion: dict[str, Any] = {}
        class_cond = False
        if isinstance(flags.get("model"), Mapping):  # a nested config file: flatten its sections
            flat: dict[str, Any] = {}
            for section, values in flags.items():
                if section in _IGNORED_SECTIONS:
                    continue
                if section not in ("model", "diffusion") or not isinstance(values, Mapping):
                    raise ValueError(f"unknown ADM config section {section!r} (known: model, diffusion, "
                                     f"{', '.join(sorted(_IGNORED_SECTIONS))})")
                flat.update(values)
            flags = flat
        for key, value in flags.items():
            key = _FLAG_ALIASES.get(key, key)
            if key in names:
                net[key] = value
            elif key in _DIFFUSION_FLAGS:
                diffusion[key] = value
            elif key == "class_cond":
                class_cond = bool(value)
            elif key in _IGNORED_FLAGS:
                continue
            else:
                raise ValueError(f"unknown ADM flag {key!r}")
        if class_cond and net.get("num_classes") is None:
            net["num_classes"] = 1000
        return cls(**net), diffusion

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ADMConfig":
        """Config from a dict of fields (official aliases such as ``num_channels`` allowed;
        diffusion flags are not — use :meth:`from_flags` for those)."""
        config, diffusion = cls.from_flags(d)
        if diffusion:
            raise ValueError(f"diffusion flags {sorted(diffusion)} are not network settings")
        return config

    @staticmethod
    def _infer_image_size(mult: tuple[float, ...], levels: int, in_channels: int) -> int:
        """The training size the weights suggest (they do not fix it): the size whose
        default ``channel_mult`` they have — 320 rather than 256 for a 2-channel (complex
        MRI) network, the one published model of that kind being DDS's fastMRI knee model —
        else an 8x8 bottleneck, ``8 * 2 ** (levels - 1)``, as in every official default."""
        sizes = [s for s, m in _DEFAULT_CHANNEL_MULT.items() if m == mult]
        if not sizes:
            return 8 * 2 ** (levels - 1)
        if in_channels == 2 and 320 in sizes:
            return 320
        return sizes[0]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (JSON-serialisable)."""
        return asdict(self)

    def canonical(self) -> "ADMConfig":
        """Same network, spelled one way: explicit ``channel_mult``, attention resolutions
        in decreasing order, ``num_heads_upsample`` resolved. Two configs build the same
        network (same keys, shapes and outputs) iff their canonical forms are equal."""
        # only resolutions at a real downsampling factor 2**level attend (e.g. DDS's "16" at 320 does not)
        levels = {2**level for level in range(len(self.channel_mult_tuple))}
        res = sorted({int(r) for r in self.attention_resolutions.split(",") if r.strip()
                      if self.image_size // int(r) in levels}, reverse=True)
        heads = self.num_heads if self.num_head_channels == -1 else -1
        heads_up = self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample
        if self.num_head_channels != -1:
            heads_up = -1
        return replace(
            self,
            channel_mult=_mult_str(self.channel_mult_tuple),
            attention_resolutions=",".join(map(str, res)),
            num_heads=heads,
            num_heads_upsample=heads_up,
            dropout=0.0,
        )

    @classmethod
    def infer_from_state_dict(cls, state_dict: Mapping[str, Tensor], **given: Any) -> "ADMConfig":
        """Read the configuration off an official-layout ``state_dict``.

        Inferred from key names and shapes: ``in_channels``, ``out_channels``,
        ``model_channels``, ``learn_sigma`` (``out == 2 * in``), ``channel_mult``,
        ``num_res_blocks``, the attention levels, ``use_scale_shift_norm``,
        ``resblock_updown`` and ``num_classes``.

        Not inferable, hence taken from ``given`` or defaulted: the number of attention
        heads (``num_head_channels=64``, ``num_heads=4`` — the setting of every published
        ADM checkpoint; a wrong guess changes the outputs, not the shapes),
        ``use_new_attention_order`` (False), ``dropout`` (0) and ``image_size``. The image
        size is only needed to write the attention levels as resolutions and for the
        prior's ``image_shape``: when not given it is the size whose official default
        ``channel_mult`` matches (256 for ``1,1,2,2,4,4``, except 320 for a 2-channel
        network: DDS's complex fastMRI model), else ``8 * 2 ** (levels - 1)`` (an 8×8
        bottleneck, as in every official default; e.g. 32 for 3 levels). Give
        ``image_size`` (or ``image_shape`` to :func:`invdiff.priors.loading.load`) for
        anything else. Any field in ``given`` overrides inference.
        """
        sd = state_dict
        required = (
            "time_embed.0.weight",
            "input_blocks.0.0.weight",
            "middle_block.0.emb_layers.1.weight",
            "out.2.weight",
        )
        missing = [k for k in required if k not in sd]
        if missing:
            raise ValueError(
                f"not a guided-diffusion / ADM state dict: missing {', '.join(missing)}"
            )

        def block_ids(prefix: str) -> list[int]:
            ids = set()
            for k in sd:
                if k.startswith(prefix):
                    ids.add(int(k[len(prefix) :].split(".", 1)[0]))
            return sorted(ids)

        def layer_ids(prefix: str, block: int) -> list[int]:
            return block_ids(f"{prefix}{block}.")

        model_channels = int(sd["time_embed.0.weight"].shape[1])
        in_channels = int(sd["input_blocks.0.0.weight"].shape[1])
        out_channels = int(sd["out.2.weight"].shape[0])
        learn_sigma = out_channels == 2 * in_channels

        out_ids = block_ids("output_blocks.")
        if out_ids != list(range(len(out_ids))) or not out_ids:
            raise ValueError("not a guided-diffusion / ADM state dict: output_blocks are not 0..N-1")
        n_out = len(out_ids)

        def is_resblock(prefix: str) -> bool:
            return f"{prefix}.in_layers.0.weight" in sd

        def has_upsampler(j: int) -> bool:
            for k in layer_ids("output_blocks.", j):
                p = f"output_blocks.{j}.{k}"
                if k > 0 and (is_resblock(p) or f"{p}.conv.weight" in sd):
                    return True
            return False

        up_blocks = [j for j in out_ids if has_upsampler(j)]
        # the first upsampler sits in decoder block i == num_res_blocks of the deepest level
        num_res_blocks = up_blocks[0] if up_blocks else n_out - 1
        per_level = num_res_blocks + 1
        if n_out % per_level:
            raise ValueError("cannot infer num_res_blocks: irregular output_blocks")
        levels = n_out // per_level
        resblock_updown = any(
            is_resblock(f"output_blocks.{j}.{k}") for j in up_blocks for k in layer_ids("output_blocks.", j) if k > 0
        )

        def level_of(j: int) -> int:  # decoder block j -> its level (deepest first)
            return levels - 1 - j // per_level

        mult: list[float] = []
        for level in range(levels):
            j = (levels - 1 - level) * per_level  # first decoder block of this level
            m = int(sd[f"output_blocks.{j}.0.out_layers.3.weight"].shape[0]) / model_channels
            mult.append(int(m) if float(m).is_integer() else m)
        # attention: which downsampling factors ds = 2**level have a qkv layer
        attention_ds = {2 ** level_of(j) for j in out_ids if f"output_blocks.{j}.1.qkv.weight" in sd}
        for i in block_ids("input_blocks."):
            if f"input_blocks.{i}.1.qkv.weight" in sd:  # encoder block i = 1 + level * per_level + r
                attention_ds.add(2 ** ((i - 1) // per_level))
        emb_out = int(sd["middle_block.0.emb_layers.1.weight"].shape[0])
        block_out = int(sd["middle_block.0.out_layers.3.weight"].shape[0])
        use_scale_shift_norm = emb_out == 2 * block_out
        num_classes = int(sd["label_emb.weight"].shape[0]) if "label_emb.weight" in sd else None

        mult_t = tuple(mult)
        image_size = given.get("image_size")
        if image_size is None:
            image_size = cls._infer_image_size(mult_t, levels, in_channels)
        inferred = dict(
            image_size=int(image_size),
            in_channels=in_channels,
            model_channels=model_channels,
            out_channels=out_channels,
            num_res_blocks=num_res_blocks,
            attention_resolutions=",".join(str(image_size // ds) for ds in sorted(attention_ds)),
            channel_mult=_mult_str(mult_t),
            num_heads=4,
            num_head_channels=64,
            num_heads_upsample=-1,
            use_scale_shift_norm=use_scale_shift_norm,
            resblock_updown=resblock_updown,
            use_new_attention_order=False,
            learn_sigma=learn_sigma,
            dropout=0.0,
            num_classes=num_classes,
        )
        given = {_FLAG_ALIASES.get(k, k): v for k, v in given.items()}
        unknown = set(given) - set(inferred)
        if unknown:
            raise ValueError(f"unknown ADMConfig fields {sorted(unknown)}")
        return cls(**{**inferred, **given})


# ----------------------------------------------------------------------------------
# building blocks (official module names: the attribute names make the state_dict keys)
# ----------------------------------------------------------------------------------


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding ``[cos(t f), sin(t f)]`` of (possibly fractional) timesteps."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and parameter dtype."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def _norm(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        p.detach().zero_()
    return module


class _TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""


class _EmbedSequential(nn.Sequential):
    """Sequential that hands the embedding to the children that take one."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _TimestepBlock) else layer(x)
        return x


class _Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        if use_conv:
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class _ResBlock(_TimestepBlock):
    """Residual block with timestep conditioning (official ``ResBlock``)."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
    ) -> None:
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = _Upsample(channels, False), _Upsample(channels, False)
        elif down:
            self.h_upd, self.x_upd = _Downsample(channels, False), _Downsample(channels, False)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            _norm(out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h = self.in_layers[-1](self.h_upd(h))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class _AttentionBlock(nn.Module):
    """Spatial self-attention (official ``AttentionBlock``), computed with
    :func:`torch.nn.functional.scaled_dot_product_attention`.

    The legacy order (``use_new_attention_order=False``, every published checkpoint)
    reshapes ``qkv`` to ``(B, heads, 3 * ch, T)`` and splits q, k, v inside each head;
    the new order splits q, k, v first. The official ``1/sqrt(sqrt(ch))`` scaling of q and
    k is the default ``1/sqrt(ch)`` scale of SDPA.
    """

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1, new_order: bool = False):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        else:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention with {channels} channels is not divisible by num_head_channels={num_head_channels}"
                )
            self.num_heads = channels // num_head_channels
        self.new_order = new_order
        self.norm = _norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        length, heads, ch = qkv.shape[-1], self.num_heads, c // self.num_heads
        if self.new_order:
            q, k, v = (t.reshape(b, heads, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b, heads, 3 * ch, length).split(ch, dim=2)
        a = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(a.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class GuidedDiffusionUNet(nn.Module):
    """The guided-diffusion / ADM U-Net: ``model(x, timesteps) -> ε`` (and the learned
    variance channels when ``learn_sigma``).

    Same modules, in the same order, with the same attribute names as
    ``guided_diffusion.unet.UNetModel`` (2-D), so ``state_dict()`` keys and shapes are the
    official ones (``time_embed.0.weight``, ``input_blocks.N.0.in_layers.0.weight``,
    ``middle_block.1.qkv.weight``, ``out.2.weight``, …).

    :param config: an :class:`ADMConfig`, a preset name, or a dict of official flags.

    The network runs in the dtype of its parameters (``model.to(torch.bfloat16)``);
    inputs of any floating dtype are cast to it and the output is returned in the
    input's dtype. GroupNorm is always computed in float32, as in the official fp16 code.

    Example::

        >>> import torch
        >>> from invdiff.priors.adm import ADMConfig, GuidedDiffusionUNet
        >>> cfg = ADMConfig(image_size=32, in_channels=1, model_channels=32, num_res_blocks=1,
        ...                 channel_mult="1,2", attention_resolutions="16", num_head_channels=32)
        >>> net = GuidedDiffusionUNet(cfg)
        >>> net(torch.randn(2, 1, 32, 32), torch.tensor([10.0, 500.0])).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, config: ADMConfig | str | Mapping[str, Any]) -> None:
        super().__init__()
        if isinstance(config, str):
            config = ADMConfig.preset(config)
        elif isinstance(config, Mapping):
            config = ADMConfig.from_dict(config)
        self.config = config
        c = config
        mc = c.model_channels
        mult = c.channel_mult_tuple
        attention_ds = set(c.attention_ds)
        heads_up = c.num_heads if c.num_heads_upsample == -1 else c.num_heads_upsample
        emb_dim = 4 * mc

        def attention(ch: int, heads: int) -> _AttentionBlock:
            return _AttentionBlock(ch, heads, c.num_head_channels, c.use_new_attention_order)

        def resblock(ch: int, out: int | None = None, **kw: bool) -> _ResBlock:
            return _ResBlock(ch, emb_dim, c.dropout, out, c.use_scale_shift_norm, **kw)

        self.time_embed = nn.Sequential(nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        if c.num_classes is not None:
            self.label_emb = nn.Embedding(c.num_classes, emb_dim)

        ch = input_ch = int(mult[0] * mc)
        self.input_blocks = nn.ModuleList([_EmbedSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        skip_chans = [ch]
        ds = 1
        for level, m in enumerate(mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [resblock(ch, int(m * mc))]
                ch = int(m * mc)
                if ds in attention_ds:
                    layers.append(attention(ch, c.num_heads))
                self.input_blocks.append(_EmbedSequential(*layers))
                skip_chans.append(ch)
            if level != len(mult) - 1:
                down = resblock(ch, ch, down=True) if c.resblock_updown else _Downsample(ch, True)
                self.input_blocks.append(_EmbedSequential(down))
                skip_chans.append(ch)
                ds *= 2

        self.middle_block = _EmbedSequential(resblock(ch), attention(ch, c.num_heads), resblock(ch))

        self.output_blocks = nn.ModuleList()
        for level, m in list(enumerate(mult))[::-1]:
            for i in range(c.num_res_blocks + 1):
                layers = [resblock(ch + skip_chans.pop(), int(mc * m))]
                ch = int(mc * m)
                if ds in attention_ds:
                    layers.append(attention(ch, heads_up))
                if level and i == c.num_res_blocks:
                    layers.append(resblock(ch, ch, up=True) if c.resblock_updown else _Upsample(ch, True))
                    ds //= 2
                self.output_blocks.append(_EmbedSequential(*layers))

        self.out = nn.Sequential(_norm(ch), nn.SiLU(), _zero(nn.Conv2d(input_ch, c.out_channels, 3, padding=1)))

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embed[0].weight.dtype

    def forward(self, x: Tensor, timesteps: Tensor, y: Tensor | None = None) -> Tensor:
        """ε-prediction (and variance channels) for VP inputs ``x`` on the ``[-1, 1]`` scale.

        :param x: ``(B, in_channels, H, W)``, ``H`` and ``W`` divisible by
            ``2 ** (len(channel_mult) - 1)``.
        :param timesteps: ``(B,)`` or a scalar; may be fractional.
        :param y: ``(B,)`` class labels for a class-conditional model.
        :returns: ``(B, out_channels, H, W)`` in the dtype of ``x``.
        """
        if (y is not None) != (self.config.num_classes is not None):
            raise ValueError("pass class labels y if and only if the model is class-conditional")
        timesteps = torch.as_tensor(timesteps, device=x.device)
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        h = x.to(dtype)
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.out(h).to(x.dtype)


# ----------------------------------------------------------------------------------
# noise schedules
# ----------------------------------------------------------------------------------


def get_named_beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """The official ``betas`` (float64): ``"linear"`` (1e-4 → 0.02, scaled by
    ``1000 / num_timesteps``) or ``"cosine"`` (Nichol & Dhariwal 2021, ``max_beta=0.999``)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        return np.array(
            [
                min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
                for i in range(num_timesteps)
            ],
            dtype=np.float64,
        )
    raise ValueError(f"unknown beta schedule {name!r}; use 'linear', 'cosine' or pass betas")


class ADMPrior(DiffusionPrior):
    r"""A VP ε-prediction model on ``[-1, 1]`` images (guided-diffusion / ADM / DDPM) as a
    variance-exploding denoiser on ``[0, 1]`` images.

    .. math::

        x' = 2x - 1,\quad \sigma' = 2\sigma,\quad
        t = \sigma'^{-1}_t(\sigma'),\quad
        \hat\varepsilon = \varepsilon_\theta\!\left(\tfrac{x'}{\sqrt{1+\sigma'^2}},\, t\right)_{:C},\quad
        D(x, \sigma) = \tfrac12\left(x' - \sigma' \hat\varepsilon + 1\right),

    where :math:`\sigma'_t = \sqrt{(1-\bar\alpha_t)/\bar\alpha_t}` and ``t`` is continuous,
    interpolated linearly in :math:`\log\sigma'` between integer steps (see the module
    docstring for the derivation).

    :param model: ``model(x_t, t) -> ε`` (extra output channels, e.g. the learned
        variance, are dropped), typically a :class:`GuidedDiffusionUNet`.
    :param image_shape: ``(C, H, W)``; defaults to ``(in_channels, image_size,
        image_size)`` of a :class:`GuidedDiffusionUNet`'s config.
    :param schedule: ``"linear"`` (default, 1e-4 → 0.02), ``"cosine"``, or the ``betas``
        themselves (a sequence or 1-D tensor).
    :param num_timesteps: steps ``T`` of a named schedule.
    :param rescale_timesteps: feed ``t * 1000 / T`` to the model (the official
        ``rescale_timesteps`` flag), instead of ``t``.
    :param clip: clamp ``D`` to ``[0, 1]`` (off by default: ``D`` is a posterior mean).
    :param dtype: run the network in this dtype (e.g. ``torch.bfloat16``); inputs and
        outputs stay in the caller's dtype. ``None`` keeps the model's dtype.
    :param sigma_data: standard deviation of the training images on ``[0, 1]``.
    :param data_range: range of the training images (:class:`~invdiff.priors.conventions.DataRange`):
        ``"[-1, 1]"`` (guided-diffusion, DPS), ``"[0, 1]"`` (DDS's AAPM CT slices) or
        ``"complex-max"`` (DDS's fastMRI model); the formulas above are for ``[-1, 1]``, in
        general ``x' = shift + scale x`` and ``sigma' = scale sigma``.

    Example::

        >>> import torch
        >>> from invdiff.priors.adm import ADMConfig, ADMPrior, GuidedDiffusionUNet
        >>> cfg = ADMConfig(image_size=32, in_channels=1, model_channels=32, num_res_blocks=1,
        ...                 channel_mult="1,2", attention_resolutions="", learn_sigma=True)
        >>> prior = ADMPrior(GuidedDiffusionUNet(cfg))
        >>> round(prior.sigma_min, 4), round(prior.sigma_max, 1)
        (0.005, 78.7)
        >>> prior.denoise(torch.rand(1, 1, 32, 32), 0.3).shape
        torch.Size([1, 1, 32, 32])
    """

    fully_convolutional = True

    def __init__(
        self,
        model: nn.Module,
        image_shape: Sequence[int] | None = None,
        *,
        schedule: str | Sequence[float] | Tensor | np.ndarray = "linear",
        num_timesteps: int = 1000,
        rescale_timesteps: bool = False,
        clip: bool = False,
        dtype: torch.dtype | None = None,
        sigma_data: float = 0.5,
        data_range: str | DataRange | Sequence[float] = "[-1, 1]",
    ) -> None:
        config = getattr(model, "config", None)
        self_range = DataRange.parse(data_range)
        if image_shape is None:
            if not isinstance(config, ADMConfig):
                raise ValueError("image_shape is required for models without an ADMConfig")
            image_shape = (config.in_channels, config.image_size, config.image_size)
        if isinstance(schedule, str):
            betas = get_named_beta_schedule(schedule, num_timesteps)
            self.schedule: str | None = schedule
        else:
            if isinstance(schedule, Tensor):
                schedule = schedule.detach().cpu().double().numpy()
            betas = np.asarray(schedule, dtype=np.float64)
            self.schedule = None
        if betas.ndim != 1 or len(betas) < 2 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("betas must be a 1-D sequence of at least 2 values in (0, 1)")
        alphas_cumprod = np.cumprod(1.0 - betas)
        sigmas_vp = np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)  # σ'_t on the model's scale
        scale = self_range.scale
        super().__init__(image_shape, sigmas_vp[0] / scale, sigmas_vp[-1] / scale, sigma_data)
        self.set_data_range(self_range)
        self.model = model if dtype is None else model.to(dtype)
        self.num_timesteps = len(betas)
        self.rescale_timesteps = bool(rescale_timesteps)
        self.clip = bool(clip)
        self.betas = torch.from_numpy(betas)  # float64, kept out of the state dict
        self._log_sigmas = torch.from_numpy(np.log(sigmas_vp))

    # --- schedule -----------------------------------------------------------------
    @property
    def parameterisation(self) -> str:  # type: ignore[override]
        sched = self.schedule if self.schedule is not None else "custom"
        rescale = ", timesteps rescaled to 1000" if self.rescale_timesteps else ""
        return (f"VP epsilon-prediction, {sched} betas, T={self.num_timesteps}{rescale}; continuous t by "
                f"log-sigma interpolation; learned variance dropped")

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the network runs in."""
        p = next(self.model.parameters(), None)
        return torch.float32 if p is None else p.dtype

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        """Continuous timestep ``t ∈ [0, T-1]`` of the invdiff noise level ``sigma``
        (``[0, 1]`` scale): log-σ' interpolation, clamped outside the schedule."""
        table_dtype = torch.float32 if sigma.device.type == "mps" else torch.float64
        # float64 (float32 on MPS); the U-Net embeds it in float32
        return vp_timestep(self._log_sigmas, self.data_range.scale * sigma.to(table_dtype))

    def t_to_sigma(self, t: Tensor) -> Tensor:
        """Inverse of :meth:`sigma_to_t` on ``[0, T-1]`` (invdiff ``[0, 1]`` scale)."""
        log_table = self._log_sigmas.to(t.device, torch.float64)
        t = t.to(torch.float64).clamp(0, len(log_table) - 1)
        lo = t.floor().long().clamp(max=len(log_table) - 2)
        w = t - lo
        return (torch.exp((1 - w) * log_table[lo] + w * log_table[lo + 1]) / self.data_range.scale).to(torch.float32)

    # --- the contract -------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        x_m = self.data_range.to_model(x)  # x' on the model's scale ([-1, 1] by default)
        sigma_m = self.data_range.sigma_to_model(sigma)  # σ'
        t = self.sigma_to_t(sigma).to(x.device)
        if self.rescale_timesteps:
            t = t * (1000.0 / self.num_timesteps)
        x_t = vp_input(x_m, sigma_m)  # = sqrt(ᾱ_t) x'
        eps = self.model(x_t.to(self.dtype), t)[:, : x.shape[1]].to(x.dtype)
        d = self.data_range.from_model(vp_prediction_to_x0(eps, x_m, sigma_m, "epsilon"))  # Tweedie
        return d.clamp(0, 1) if self.clip else d

    def extra_repr(self) -> str:
        sched = self.schedule if self.schedule is not None else "custom"
        return (f"{super().extra_repr()}, schedule={sched}, T={self.num_timesteps}, data_range={self.data_range}, "
                f"dtype={self.dtype}")
