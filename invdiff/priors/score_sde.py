r"""Score-SDE checkpoints (NCSN++ / DDPM++; Song et al. 2021) as invdiff priors.

The family of ``yang-song/score_sde_pytorch`` and of the medical checkpoints trained with
that code base (score-MRI, MCG, DiffusionMBIR). Three pieces:

* :class:`NCSNpp` — the NCSN++ / DDPM++ network of ``models/ncsnpp.py`` (with
  ``models/layerspp.py``, ``models/layers.py`` and ``models/up_or_down_sampling.py``),
  re-written here with **exactly** the official ``state_dict`` layout (``all_modules.N.…``,
  ``NIN`` parameters ``W``/``b``, the Fourier ``W``, the ``sigmas`` buffer) so that the
  published checkpoints load unchanged. The FIR up/down-sampling of StyleGAN2 is written
  with ``torch.nn.functional`` convolutions (the official pure-PyTorch ``upfirdn2d_native``
  path; no CUDA extension).
* :class:`ScoreSDEConfig` — the official ``config.model`` / ``config.data`` /
  ``config.training`` names that change the weights or the outputs;
  :meth:`ScoreSDEConfig.from_flags` reads an official config (``config.to_dict()``) and
  :meth:`ScoreSDEConfig.infer_from_state_dict` reads what the key names and shapes fix.
* :class:`ScoreSDEPrior` — the adapter onto invdiff's VE denoiser on ``[0, 1]`` images,
  following ``models/utils.py: get_score_fn`` and ``sde_lib.py`` exactly.

The adapter's math
------------------
With the data range (:class:`~invdiff.priors.conventions.DataRange`; ``"[-1, 1]"`` when
``data.centered``, else ``"[0, 1]"``, or ``"complex-max"`` for max-normalised complex MRI)
the model-scale image and noise level are :math:`x' = \text{shift} + \text{scale}\,x`,
:math:`\sigma' = \text{scale}\,\sigma` (the network itself maps ``[0, 1]`` inputs to
``[-1, 1]`` when ``data.centered`` is False, as the official code does).

**VE SDE** (:math:`\sigma'(t) = \sigma_\min (\sigma_\max/\sigma_\min)^t`): the network is
the score, so Tweedie's formula gives

.. math::

    D'(x', \sigma') = x' + \sigma'^2\, s_\theta(x', \text{label}), \qquad
    \text{label} = \begin{cases} \sigma' & \text{continuous} \\
    \operatorname{round}\!\big((1 - t)(N - 1)\big),\ t = \frac{\ln(\sigma'/\sigma_\min)}{\ln(\sigma_\max/\sigma_\min)}
    & \text{discrete (an index into } \sigma_\max \ldots \sigma_\min) \end{cases}

(``scale_by_sigma`` divides the network output by :math:`\sigma'`, resp. by the
``sigmas`` entry of the index, inside the network, as official).

**VP / sub-VP SDE** (:math:`\log m(t) = -\tfrac14 t^2(\beta_1-\beta_0) - \tfrac12 t\beta_0`;
VP :math:`s(t) = \sqrt{1 - m^2}`, sub-VP :math:`s(t) = 1 - m^2`): the network sees
:math:`x_t = m\,x'` at the time :math:`t` whose VE-equivalent noise :math:`s/m` equals
:math:`\sigma'` (VP: :math:`m = 1/\sqrt{1+\sigma'^2}`; sub-VP:
:math:`m = 2/(\sigma' + \sqrt{\sigma'^2 + 4})`; then :math:`t` solves the quadratic in
closed form), with label :math:`999\,t` (continuous, and always for sub-VP) or the
fractional index of :math:`\sigma'` in the discrete DDPM table
:math:`\sqrt{(1-\bar\alpha_i)/\bar\alpha_i}` (VP, ``continuous=False``; the official label
``t (N - 1)``). The official score is :math:`-\text{out}/s`, and Tweedie's formula on
:math:`x_t` mapped to the VE image gives

.. math::

    D'(x', \sigma') = \frac{x_t + s^2\,(-\text{out}/s)}{m} = x' - \sigma'\,\text{out}.

**Outside the SDE's range.** VE continuous: no clamp — the official network takes
:math:`\sigma'` itself and is evaluated there. VE discrete: the index is clamped to
``[0, N - 1]`` (the official lookup would fail outside). VP / sub-VP: :math:`t` is clamped
to ``[0, 1]`` (the SDE's ``[0, T]``; beyond it a positional network would index past its
``sigmas``), while the input scaling and Tweedie's formula keep the true :math:`\sigma'`
(as :class:`~invdiff.priors.adm.ADMPrior`). ``sigma_min`` / ``sigma_max`` are the SDE's
(VE: ``model.sigma_min`` / ``model.sigma_max``; VP / sub-VP continuous: the noise at the
official training ``eps = 1e-5`` and at ``t = 1``; VP discrete: the ends of the DDPM table),
divided by the data-range scale.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import DiffusionPrior
from .conventions import DataRange, vp_input, vp_prediction_to_x0

__all__ = [
    "NCSNpp",
    "ScoreSDEConfig",
    "ScoreSDEPrior",
    "IGNORED_FLAGS",
    "upfirdn2d",
]

_SOURCE = ("yang-song/score_sde_pytorch models/ncsnpp.py, models/layerspp.py, models/layers.py, "
           "models/up_or_down_sampling.py (key layout), models/utils.py get_score_fn, sde_lib.py (noise)")

#: Official config names (per section) that change neither the weights nor the outputs of
#: NCSN++; :meth:`ScoreSDEConfig.from_flags` accepts and drops them.
IGNORED_FLAGS: dict[str, frozenset[str]] = {
    "model": frozenset({"name", "ema_rate", "normalization", "interpolation", "sigma_begin"}),
    "data": frozenset({"dataset", "root", "category", "tfrecords_path", "random_flip", "uniform_dequantization",
                       "is_multi", "is_complex", "magpha"}),
    "training": frozenset({"batch_size", "n_iters", "epochs", "snapshot_freq", "log_freq", "eval_freq",
                           "snapshot_freq_for_preemption", "snapshot_sampling", "likelihood_weighting",
                           "reduce_mean", "loss", "mask_type", "acc_factor", "continuouse"}),
    # whole sections and top-level entries of an official config
    "": frozenset({"sampling", "eval", "optim", "seed", "device"}),
}

_SECTIONS = {
    "model": ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "resamp_with_conv", "conditional",
              "fir", "fir_kernel", "skip_rescale", "resblock_type", "progressive", "progressive_input",
              "progressive_combine", "attention_type", "embedding_type", "init_scale", "fourier_scale",
              "conv_size", "scale_by_sigma", "nonlinearity", "sigma_min", "sigma_max", "num_scales",
              "beta_min", "beta_max"),
    "data": ("image_size", "num_channels", "centered"),
    "training": ("sde", "continuous"),
}
_SDES = ("vesde", "vpsde", "subvpsde")
_ACTS = ("swish", "elu", "relu", "lrelu")
#: smallest time of the official training loss (losses.get_sde_loss_fn, eps=1e-5)
_TRAIN_EPS = 1e-5


# ----------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------


@dataclass
class ScoreSDEConfig:
    """Configuration of an :class:`NCSNpp` and its SDE, with the official names.

    Network fields are ``config.model.*``, ``image_size``/``num_channels``/``centered``
    are ``config.data.*``, ``sde``/``continuous`` are ``config.training.*``. Defaults are
    the NCSN++ VE continuous configuration shared by the official
    ``configs/ve/*_ncsnpp_continuous.py`` and the medical ones (score-MRI
    ``fastmri_knee_320_ncsnpp_continuous``, DiffusionMBIR ``AAPM_256_ncsnpp_continuous``),
    with the SDE of ``default_lsun_configs`` (``sigma_max=378``, ``num_scales=2000``).

    ``attention_type`` (``"ddpm"``) and ``conv_size`` (3) are recorded but NCSN++ uses
    neither; ``init_scale`` and ``fourier_scale`` only set the random initialisation.

    Example::

        >>> cfg = ScoreSDEConfig.from_flags({"model": {"nf": 16, "ch_mult": (1, 2), "name": "ncsnpp"},
        ...                                  "data": {"image_size": 16, "centered": True},
        ...                                  "training": {"sde": "vpsde", "n_iters": 10}})
        >>> cfg.nf, cfg.ch_mult, cfg.sde, cfg.centered
        (16, (1, 2), 'vpsde', True)
        >>> ScoreSDEConfig.from_flags({"nf": 16, "colour": 3})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: unknown score-SDE config key 'colour' (known: model.*, data.*, training.* names of ScoreSDEConfig; ignored: ...)
    """

    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    resamp_with_conv: bool = True
    conditional: bool = True
    fir: bool = True
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "none"
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    attention_type: str = "ddpm"
    embedding_type: str = "fourier"
    init_scale: float = 0.0
    fourier_scale: float = 16.0
    conv_size: int = 3
    scale_by_sigma: bool = True
    nonlinearity: str = "swish"
    sigma_min: float = 0.01
    sigma_max: float = 378.0
    num_scales: int = 2000
    beta_min: float = 0.1
    beta_max: float = 20.0
    image_size: int = 256
    num_channels: int = 1
    centered: bool = False
    sde: str = "vesde"
    continuous: bool = True

    def __post_init__(self) -> None:
        self.ch_mult = tuple(int(m) for m in self.ch_mult)
        self.attn_resolutions = tuple(int(r) for r in self.attn_resolutions)
        self.fir_kernel = tuple(int(k) for k in self.fir_kernel)
        for name in ("resblock_type", "progressive", "progressive_input", "progressive_combine", "embedding_type",
                     "nonlinearity", "sde", "attention_type"):
            setattr(self, name, str(getattr(self, name)).lower())
        checks = [
            ("resblock_type", ("ddpm", "biggan")),
            ("progressive", ("none", "output_skip", "residual")),
            ("progressive_input", ("none", "input_skip", "residual")),
            ("progressive_combine", ("sum", "cat")),
            ("embedding_type", ("fourier", "positional")),
            ("nonlinearity", _ACTS),
            ("sde", _SDES),
        ]
        for name, allowed in checks:
            if getattr(self, name) not in allowed:
                raise ValueError(f"ScoreSDEConfig.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if not self.ch_mult or self.nf < 1 or self.num_res_blocks < 1 or self.num_channels < 1:
            raise ValueError(f"ScoreSDEConfig needs nf, num_res_blocks, num_channels >= 1 and a ch_mult, got "
                             f"nf={self.nf}, num_res_blocks={self.num_res_blocks}, ch_mult={self.ch_mult}")
        if self.embedding_type == "fourier" and not self.continuous:
            raise ValueError("ScoreSDEConfig: Fourier embeddings need continuous=True (as the official ncsnpp.py asserts)")
        if self.image_size % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"ScoreSDEConfig: image_size {self.image_size} is not divisible by "
                             f"2**{len(self.ch_mult) - 1} ({len(self.ch_mult)} levels)")
        if not 0 < self.sigma_min < self.sigma_max or self.num_scales < 2:
            raise ValueError(f"ScoreSDEConfig needs 0 < sigma_min < sigma_max and num_scales >= 2, got "
                             f"{self.sigma_min}, {self.sigma_max}, {self.num_scales}")
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError(f"ScoreSDEConfig needs 0 < beta_min <= beta_max, got {self.beta_min}, {self.beta_max}")

    # --- derived ------------------------------------------------------------------
    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size per level (``image_size // 2**level``)."""
        return tuple(self.image_size // 2**i for i in range(len(self.ch_mult)))

    @property
    def attention_levels(self) -> tuple[int, ...]:
        """Levels with self-attention (those whose resolution is in ``attn_resolutions``)."""
        return tuple(i for i, r in enumerate(self.resolutions) if r in self.attn_resolutions)

    @property
    def default_data_range(self) -> str:
        """``"[-1, 1]"`` when ``centered`` else ``"[0, 1]"`` (the official ``get_data_scaler``)."""
        return "[-1, 1]" if self.centered else "[0, 1]"

    # --- constructors -------------------------------------------------------------
    @classmethod
    def from_flags(cls, flags: Mapping[str, Any] | "ScoreSDEConfig") -> "ScoreSDEConfig":
        """Config from an official config as a nested dict (``config.to_dict()`` of
        ml_collections: ``{"model": {...}, "data": {...}, "training": {...}, ...}``) or a
        flat dict of field names (e.g. :meth:`to_dict`).

        Official names that change nothing in the weights or outputs (:data:`IGNORED_FLAGS`:
        ``model.name`` — which must be ``"ncsnpp"`` —, ``ema_rate``, the data paths, the
        training schedule, the ``sampling`` / ``eval`` / ``optim`` sections, ``seed``,
        ``device``) are dropped; any other unknown key is a one-line :class:`ValueError`.
        """
        if isinstance(flags, ScoreSDEConfig):
            return flags
        if not isinstance(flags, Mapping):
            raise ValueError(f"score-SDE config must be a ScoreSDEConfig or a dict, got {type(flags).__name__}")
        names = {f.name for f in fields(cls)}
        ignored_all = frozenset().union(*IGNORED_FLAGS.values())
        values: dict[str, Any] = {}

        def take(section: str, key: str, value: Any) -> None:
            where = f"{section}.{key}" if section else key
            if key == "name" and section in ("model", ""):
                if str(value).lower() != "ncsnpp":
                    raise ValueError(f"score-SDE config {where}={value!r}: only the 'ncsnpp' model (NCSN++ / DDPM++) "
                                     f"is implemented (not the 'ddpm' / 'ncsnv2' / 'ncsn' models)")
                return
            if key in names and (not section or key in _SECTIONS.get(section, ())):
                values[key] = value
            elif key in (IGNORED_FLAGS.get(section, frozenset()) if section else ignored_all):
                return
            else:
                raise ValueError(f"unknown score-SDE config key {where!r} (known: model.*, data.*, training.* names "
                                 f"of ScoreSDEConfig; ignored: {', '.join(sorted(ignored_all))})")

        for key, value in flags.items():
            if key in _SECTIONS and isinstance(value, Mapping):
                for k, v in value.items():
                    take(key, str(k), v)
            elif key in IGNORED_FLAGS[""]:
                continue
            else:
                take("", str(key), value)
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Flat JSON-serialisable dict of the fields (read back by :meth:`from_flags`)."""
        d = asdict(self)
        for k in ("ch_mult", "attn_resolutions", "fir_kernel"):
            d[k] = list(d[k])
        return d

    def to_official(self) -> dict[str, dict[str, Any]]:
        """The nested official layout ``{"model": ..., "data": ..., "training": ...}``
        (with ``model.name = "ncsnpp"``), e.g. to build the official network."""
        d = self.to_dict()
        out = {section: {k: d[k] for k in keys} for section, keys in _SECTIONS.items()}
        out["model"]["name"] = "ncsnpp"
        return out

    # --- inference from the weights -------------------------------------------------
    @classmethod
    def infer_from_state_dict(cls, state_dict: Mapping[str, Tensor], **given: Any) -> "ScoreSDEConfig":
        """Read the configuration off an official-layout ``state_dict``.

        Fixed by the key names and shapes: ``nf``, ``ch_mult``, ``num_res_blocks``, the
        levels with attention, ``num_channels``, ``conditional``, ``embedding_type``
        (a Fourier ``all_modules.0.W`` or not), ``resblock_type`` (BigGAN up/down blocks or
        DDPM resamplers), ``progressive`` / ``progressive_input`` /
        ``progressive_combine``, ``resamp_with_conv`` (DDPM blocks), ``fir`` where there
        are convolutional resamplers (``Conv2d_0`` means FIR, ``Conv_0`` not), and
        ``sigma_max`` / ``sigma_min`` / ``num_scales`` from the ``sigmas`` buffer.

        Not fixed by the weights, hence from ``given`` or these defaults: ``sde="vesde"``
        and ``continuous=True`` (False for a VE model with positional embeddings, the
        official discrete NCSN++), ``scale_by_sigma`` (True for VE, else False),
        ``centered`` (False for VE, True for VP / sub-VP — the official configs),
        ``fir=True`` when no convolutional resampler shows it (BigGAN blocks resample the
        same weights with or without FIR: pass ``fir`` for DDPM++ VP checkpoints, which
        use ``fir=False``), ``skip_rescale=True``, ``nonlinearity="swish"``,
        ``dropout=0``, ``beta_min=0.1``, ``beta_max=20`` and ``image_size``. The image
        size only turns attention levels into ``attn_resolutions``: by default the size
        that puts the first attention level at resolution 16 (every official config), or
        with no attention ``4 * 2**(levels - 1)`` (a 4x4 bottleneck as the CIFAR-10
        configs); give ``image_size`` (``image_shape`` to :func:`~invdiff.priors.load`)
        for the real one. Any field in ``given`` overrides inference.
        """
        sd = state_dict
        mods: dict[int, dict[str, Tensor]] = {}
        for k, v in sd.items():
            if k.startswith("all_modules."):
                idx, _, rest = k[len("all_modules."):].partition(".")
                if idx.isdigit():
                    mods.setdefault(int(idx), {})[rest] = v
        if not mods or "sigmas" not in sd:
            raise ValueError("not a score-SDE NCSN++ state dict: no all_modules.N.* keys or no sigmas buffer")
        n_mod = max(mods) + 1

        def kind(i: int) -> str:
            m = mods.get(i)
            if m is None:
                return "gap"
            if "Conv_1.weight" in m:
                return "res"
            if "NIN_3.W" in m:
                return "attn"
            if "W" in m:
                return "fourier"
            if "Conv2d_0.weight" in m:
                return "fir_resample"
            if "Conv_0.weight" in m:
                return "combine" if m["Conv_0.weight"].shape[-1] == 1 else "resample"
            if "weight" in m:
                return {1: "norm", 2: "dense", 4: "conv"}.get(m["weight"].ndim, "?")
            return "?"

        def res_io(i: int) -> tuple[int, int]:
            w = mods[i]["Conv_0.weight"]
            return int(w.shape[1]), int(w.shape[0])

        def is_updown(i: int) -> bool:  # a BigGAN up/down block: 1x1 shortcut although in == out
            cin, cout = res_io(i)
            return kind(i) == "res" and "Conv_2.weight" in mods[i] and cin == cout

        i = 0
        inferred: dict[str, Any] = {}
        if kind(0) == "fourier":
            inferred["embedding_type"] = "fourier"
            nf = int(mods[0]["W"].shape[0])
            i = 1
        else:
            inferred["embedding_type"] = "positional"
            nf = None
        conditional = kind(i) == "dense"
        if conditional:
            nf = nf or int(mods[i]["weight"].shape[1])
            i += 2
        if kind(i) != "conv":
            raise ValueError(f"not a score-SDE NCSN++ state dict: all_modules.{i} is not the input convolution")
        nf = nf or int(mods[i]["weight"].shape[0])
        channels = int(mods[i]["weight"].shape[1])
        i += 1
        inferred.update(nf=nf, conditional=conditional, num_channels=channels)

        # --- the downsampling path --------------------------------------------------
        resblock = "ddpm" if any("NIN_0.W" in mods[j] for j in mods if kind(j) == "res") else None
        if any(kind(j) == "res" and is_updown(j) for j in mods):
            resblock = "biggan"
        down_kinds = ("gap", "resample", "fir_resample")
        # num_res_blocks: regular blocks before the first down module
        nrb, j = 0, i
        while j < n_mod and kind(j) == "res" and not is_updown(j):
            nrb += 1
            j += 1
            if kind(j) == "attn":
                j += 1
        first_down = j < n_mod and (kind(j) in down_kinds or (kind(j) == "res" and is_updown(j)))
        if not first_down:  # a single level: nrb down + 3 middle + (nrb + 1) up blocks
            n_res = sum(kind(j) == "res" for j in mods)
            nrb = (n_res - 3) // 2
        ch_mult, attn_levels = [], []
        progressive_input, combine = "none", "sum"
        resamp_with_conv, fir = None, None
        level = 0
        while True:
            outs, attn = [], False
            for _ in range(nrb):
                if kind(i) != "res":
                    raise ValueError(f"cannot read the NCSN++ layout at all_modules.{i} (expected a residual block)")
                outs.append(res_io(i)[1])
                i += 1
                if kind(i) == "attn":
                    attn = True
                    i += 1
            if len(set(outs)) != 1 or outs[0] % nf:
                raise ValueError(f"cannot read the NCSN++ layout: level {level} widths {outs} are not one multiple of nf={nf}")
            ch = outs[0]
            ch_mult.append(ch // nf)
            if attn:
                attn_levels.append(level)
            k = kind(i)
            if k == "res" and is_updown(i):
                resblock = "biggan"
            elif k in down_kinds:
                resblock = "ddpm"
                resamp_with_conv = k != "gap"
                if k != "gap":
                    fir = k == "fir_resample"
            else:
                break  # the middle block follows: last level
            i += 1
            k = kind(i)
            if k == "combine":
                progressive_input = "input_skip"
                i += 1
                combine = "cat" if kind(i) == "res" and res_io(i)[0] == 2 * ch else "sum"
            elif k in ("resample", "fir_resample"):
                progressive_input = "residual"
                fir = k == "fir_resample"
                i += 1
            level += 1
        levels = len(ch_mult)
        # --- the upsampling path: progressive output --------------------------------
        # none: one norm (the final one); output_skip: a norm + conv to `channels` per level and no
        # final one; residual: a norm + conv (ch -> ch) at the top level, then the final norm + conv
        norms = [j for j in range(i, n_mod) if kind(j) == "norm"]
        progressive = "none"
        if len(norms) > 1:
            after = mods.get(norms[0] + 1, {}).get("weight")
            to_image = after is not None and int(after.shape[0]) == channels
            progressive = "output_skip" if to_image and len(norms) == levels else "residual"
            up_res = [j for j in range(norms[0], n_mod) if kind(j) in ("resample", "fir_resample")]
            if progressive == "residual" and up_res:
                fir = kind(up_res[0]) == "fir_resample"
        if resblock == "ddpm" and resamp_with_conv is None:  # single level
            resamp_with_conv = True
        sigmas = sd["sigmas"]
        inferred.update(
            ch_mult=tuple(ch_mult),
            num_res_blocks=nrb,
            resblock_type=resblock or "biggan",
            progressive=progressive,
            progressive_input=progressive_input,
            progressive_combine=combine,
            num_scales=int(sigmas.shape[0]),
            sigma_max=float(f"{float(sigmas[0]):.7g}"),
            sigma_min=float(f"{float(sigmas[-1]):.7g}"),
        )
        if resamp_with_conv is not None:
            inferred["resamp_with_conv"] = resamp_with_conv
        if fir is not None:
            inferred["fir"] = fir
        sde = str(given.get("sde", "vesde")).lower()
        if "continuous" not in given:
            inferred["continuous"] = not (sde == "vesde" and inferred["embedding_type"] == "positional")
        inferred["scale_by_sigma"] = sde == "vesde"
        inferred["centered"] = sde != "vesde"
        inferred["image_size"] = 16 * 2 ** attn_levels[0] if attn_levels else 4 * 2 ** (levels - 1)
        size = int(given.get("image_size", inferred["image_size"]))
        inferred["attn_resolutions"] = tuple(size // 2**lv for lv in attn_levels)
        cfg = cls(**{**inferred, **given})
        if cfg.attention_levels != tuple(attn_levels) and "attn_resolutions" not in given:
            raise ValueError(f"image_size={size} does not have the attention levels {attn_levels} of the weights")
        return cfg


# ----------------------------------------------------------------------------------
# FIR up/down-sampling (models/up_or_down_sampling.py, op/upfirdn2d.py: upfirdn2d_native)
# ----------------------------------------------------------------------------------


def _setup_kernel(k: Sequence[float]) -> np.ndarray:
    """The official 2-D FIR kernel: outer product of ``k`` with itself, normalised to sum 1."""
    k = np.asarray(k, dtype=np.float32)
    if k.ndim == 1:
        k = np.outer(k, k)
    return k / np.sum(k)


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    r"""Upsample (zero insertion), pad, FIR-filter and downsample each channel of ``x``
    (StyleGAN2's ``upfirdn2d``; the official pure-PyTorch ``upfirdn2d_native``):

    .. math::

        y = \downarrow_{d}\Big(\operatorname{pad}_{p_0, p_1}(\uparrow_u x) \star \operatorname{flip}(k)\Big),

    the same padding ``(p0, p1)`` on both axes (negative values crop).

    >>> import torch
    >>> k = torch.tensor(_setup_kernel([1, 3, 3, 1]))
    >>> y = upfirdn2d(torch.ones(1, 1, 4, 4), k * 4, up=2, pad=(2, 1))
    >>> y.shape, round(float(y[0, 0, 3, 3]), 6)
    (torch.Size([1, 1, 8, 8]), 1.0)
    """
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    p0, p1 = pad
    out = x.reshape(b * c, 1, h, 1, w, 1)
    if up > 1:
        out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(b * c, 1, h * up, w * up)
    out = F.pad(out, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out[:, :, max(-p0, 0): out.shape[2] - max(-p1, 0), max(-p0, 0): out.shape[3] - max(-p1, 0)]
    weight = torch.flip(kernel, [0, 1]).reshape(1, 1, kh, kw).to(device=out.device, dtype=out.dtype)
    out = F.conv2d(out, weight)
    out = out[:, :, ::down, ::down]
    return out.reshape(b, c, out.shape[2], out.shape[3])


def _fir(k: Sequence[int], gain: float) -> Tensor:
    return torch.from_numpy(_setup_kernel(k) * np.float32(gain))


def upsample_2d(x: Tensor, k: Sequence[int], factor: int = 2) -> Tensor:
    """FIR upsampling by ``factor`` (official ``upsample_2d``)."""
    kernel = _fir(k, factor**2)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, k: Sequence[int], factor: int = 2) -> Tensor:
    """FIR downsampling by ``factor`` (official ``downsample_2d``)."""
    kernel = _fir(k, 1)
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel, down=factor, pad=((p + 1) // 2, p // 2))


def upsample_conv_2d(x: Tensor, w: Tensor, k: Sequence[int], factor: int = 2) -> Tensor:
    """Fused upsampling + convolution (official ``upsample_conv_2d``; its
    ``w[..., ::-1, ::-1]``, which torch rejects, is the spatial flip written here)."""
    kernel = _fir(k, factor**2)
    conv = w.shape[-1]
    p = (kernel.shape[0] - factor) - (conv - 1)
    w = torch.flip(w, [-2, -1]).transpose(0, 1)  # (in, out, kh, kw) for conv_transpose2d
    x = F.conv_transpose2d(x, w, stride=factor, padding=0)
    return upfirdn2d(x, kernel, pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x: Tensor, w: Tensor, k: Sequence[int], factor: int = 2) -> Tensor:
    """Fused convolution + downsampling (official ``conv_downsample_2d``)."""
    kernel = _fir(k, 1)
    p = (kernel.shape[0] - factor) + (w.shape[-1] - 1)
    x = upfirdn2d(x, kernel, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, w, stride=factor, padding=0)


def _naive_upsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    _, c, h, w = x.shape
    x = x.reshape(-1, c, h, 1, w, 1).repeat(1, 1, 1, factor, 1, factor)
    return x.reshape(-1, c, h * factor, w * factor)


def _naive_downsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    _, c, h, w = x.shape
    return x.reshape(-1, c, h // factor, factor, w // factor, factor).mean(dim=(3, 5))


# ----------------------------------------------------------------------------------
# layers (models/layerspp.py, models/layers.py), official attribute names
# ----------------------------------------------------------------------------------


def _gn(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(ch // 4, 32), num_channels=ch, eps=1e-6)


def _conv3x3(cin: int, cout: int, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=padding)


def _conv1x1(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1)


def _act(name: str) -> nn.Module:
    return {"elu": nn.ELU(), "relu": nn.ReLU(), "lrelu": nn.LeakyReLU(negative_slope=0.2), "swish": nn.SiLU()}[name]


class _FourierProjection(nn.Module):
    """``GaussianFourierProjection``: ``[sin(2 pi x W), cos(2 pi x W)]`` (``W`` frozen)."""

    def __init__(self, size: int, scale: float) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        proj = x[:, None] * self.W[None, :].to(x.dtype) * 2 * np.pi
        return torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1)


class _NIN(nn.Module):
    """``NIN``: a 1x1 convolution stored as ``W`` (in, out) and ``b``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(cin, cout) / math.sqrt(cin))
        self.b = nn.Parameter(torch.zeros(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.einsum("abcd,de->abce", x.permute(0, 2, 3, 1), self.W) + self.b
        return y.permute(0, 3, 1, 2)


class _Combine(nn.Module):
    def __init__(self, dim1: int, dim2: int, method: str) -> None:
        super().__init__()
        self.Conv_0 = _conv1x1(dim1, dim2)
        self.method = method

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        h = self.Conv_0(x)
        return torch.cat([h, y], dim=1) if self.method == "cat" else h + y


class _AttnBlockpp(nn.Module):
    def __init__(self, channels: int, skip_rescale: bool) -> None:
        super().__init__()
        self.GroupNorm_0 = _gn(channels)
        self.NIN_0 = _NIN(channels, channels)
        self.NIN_1 = _NIN(channels, channels)
        self.NIN_2 = _NIN(channels, channels)
        self.NIN_3 = _NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hh = self.GroupNorm_0(x)
        q, k, v = self.NIN_0(hh), self.NIN_1(hh), self.NIN_2(hh)
        att = torch.einsum("bchw,bcij->bhwij", q, k) * (int(c) ** (-0.5))
        att = F.softmax(att.reshape(b, h, w, h * w), dim=-1).reshape(b, h, w, h, w)
        hh = self.NIN_3(torch.einsum("bhwij,bcij->bchw", att, v))
        return (x + hh) / math.sqrt(2.0) if self.skip_rescale else x + hh


class _FIRConv2d(nn.Module):
    """``up_or_down_sampling.Conv2d``: a 3x3 convolution fused with FIR up/down-sampling."""

    def __init__(self, cin: int, cout: int, up: bool, down: bool, fir_kernel: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) / math.sqrt(9 * cin))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.up, self.down, self.fir_kernel = up, down, tuple(fir_kernel)

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = upsample_conv_2d(x, self.weight, self.fir_kernel)
        elif self.down:
            x = conv_downsample_2d(x, self.weight, self.fir_kernel)
        else:
            x = F.conv2d(x, self.weight, padding=1)
        return x + self.bias.reshape(1, -1, 1, 1)


class _Upsample(nn.Module):
    def __init__(self, cin: int, cout: int | None, with_conv: bool, fir: bool, fir_kernel: Sequence[int]) -> None:
        super().__init__()
        cout = cout or cin
        if with_conv:
            if fir:
                self.Conv2d_0 = _FIRConv2d(cin, cout, True, False, fir_kernel)
            else:
                self.Conv_0 = _conv3x3(cin, cout)
        self.fir, self.with_conv, self.fir_kernel = fir, with_conv, tuple(fir_kernel)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fir:
            _, _, h, w = x.shape
            x = F.interpolate(x, (h * 2, w * 2), mode="nearest")
            return self.Conv_0(x) if self.with_conv else x
        return self.Conv2d_0(x) if self.with_conv else upsample_2d(x, self.fir_kernel)


class _Downsample(nn.Module):
    def __init__(self, cin: int, cout: int | None, with_conv: bool, fir: bool, fir_kernel: Sequence[int]) -> None:
        super().__init__()
        cout = cout or cin
        if with_conv:
            if fir:
                self.Conv2d_0 = _FIRConv2d(cin, cout, False, True, fir_kernel)
            else:
                self.Conv_0 = _conv3x3(cin, cout, stride=2, padding=0)
        self.fir, self.with_conv, self.fir_kernel = fir, with_conv, tuple(fir_kernel)

    def forward(self, x: Tensor) -> Tensor:
        if not self.fir:
            if self.with_conv:
                return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
            return F.avg_pool2d(x, 2, stride=2)
        return self.Conv2d_0(x) if self.with_conv else downsample_2d(x, self.fir_kernel)


class _ResnetBlockDDPMpp(nn.Module):
    def __init__(self, act: nn.Module, cin: int, cout: int | None, temb_dim: int, dropout: float,
                 skip_rescale: bool) -> None:
        super().__init__()
        cout = cout or cin
        self.GroupNorm_0 = _gn(cin)
        self.Conv_0 = _conv3x3(cin, cout)
        self.Dense_0 = nn.Linear(temb_dim, cout)
        self.GroupNorm_1 = _gn(cout)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(cout, cout)
        if cin != cout:
            self.NIN_0 = _NIN(cin, cout)
        self.act, self.out_ch, self.skip_rescale = act, cout, skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.Conv_0(self.act(self.GroupNorm_0(x)))
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if x.shape[1] != self.out_ch:
            x = self.NIN_0(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


class _ResnetBlockBigGANpp(nn.Module):
    def __init__(self, act: nn.Module, cin: int, cout: int | None, temb_dim: int, dropout: float, skip_rescale: bool,
                 fir: bool, fir_kernel: Sequence[int], up: bool = False, down: bool = False) -> None:
        super().__init__()
        cout = cout or cin
        self.GroupNorm_0 = _gn(cin)
        self.up, self.down, self.fir, self.fir_kernel = up, down, fir, tuple(fir_kernel)
        self.Conv_0 = _conv3x3(cin, cout)
        self.Dense_0 = nn.Linear(temb_dim, cout)
        self.GroupNorm_1 = _gn(cout)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = _conv3x3(cout, cout)
        if cin != cout or up or down:
            self.Conv_2 = _conv1x1(cin, cout)
        self.act, self.in_ch, self.out_ch, self.skip_rescale = act, cin, cout, skip_rescale

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.act(self.GroupNorm_0(x))
        if self.up:
            if self.fir:
                h, x = upsample_2d(h, self.fir_kernel), upsample_2d(x, self.fir_kernel)
            else:
                h, x = _naive_upsample_2d(h), _naive_upsample_2d(x)
        elif self.down:
            if self.fir:
                h, x = downsample_2d(h, self.fir_kernel), downsample_2d(x, self.fir_kernel)
            else:
                h, x = _naive_downsample_2d(h), _naive_downsample_2d(x)
        h = self.Conv_0(h)
        if temb is not None:
            h = h + self.Dense_0(self.act(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(self.act(self.GroupNorm_1(h))))
        if self.in_ch != self.out_ch or self.up or self.down:
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


def _timestep_embedding(timesteps: Tensor, dim: int, max_positions: int = 10000) -> Tensor:
    """Sinusoidal embedding of ``layers.get_timestep_embedding`` (float32)."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device)
                     * -(math.log(max_positions) / (half - 1)))
    emb = timesteps.float()[:, None] * freq[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 == 1 else emb


def _sigma_table(config: ScoreSDEConfig) -> Tensor:
    """``utils.get_sigmas``: ``num_scales`` noise levels from ``sigma_max`` down to
    ``sigma_min``, geometric, float64 (the official ``sigmas`` buffer)."""
    return torch.from_numpy(np.exp(np.linspace(np.log(config.sigma_max), np.log(config.sigma_min), config.num_scales)))


# ----------------------------------------------------------------------------------
# the network
# ----------------------------------------------------------------------------------


class NCSNpp(nn.Module):
    r"""NCSN++ / DDPM++ (``models/ncsnpp.py``) with the official ``state_dict`` layout.

    ``forward(x, time_cond)`` is the official one: ``time_cond`` is the noise level
    :math:`\sigma` for Fourier embeddings (embedded as :math:`\log\sigma`) or the
    (possibly fractional) time step for positional ones; inputs are mapped from ``[0, 1]``
    to ``[-1, 1]`` inside when ``centered`` is False; with ``scale_by_sigma`` the output is
    divided by :math:`\sigma` (``time_cond``, resp. ``sigmas[time_cond]``). Attention is
    applied at the levels of ``config.attention_levels`` (at the training size this is the
    official test ``h.shape[-1] in attn_resolutions``). The network runs in the dtype of
    its parameters; the embedding input and the output scaling are computed in float32
    and the output has the dtype of ``x``.

    Example::

        >>> import torch
        >>> cfg = ScoreSDEConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), image_size=16,
        ...                      num_scales=10)
        >>> net = NCSNpp(cfg)
        >>> sorted(net.state_dict())[:3]
        ['all_modules.0.W', 'all_modules.1.bias', 'all_modules.1.weight']
        >>> net(torch.rand(2, 1, 16, 16), torch.tensor([0.1, 10.0])).shape
        torch.Size([2, 1, 16, 16])
    """

    def __init__(self, config: ScoreSDEConfig | Mapping[str, Any]) -> None:
        super().__init__()
        c = config if isinstance(config, ScoreSDEConfig) else ScoreSDEConfig.from_flags(config)
        self.config = c
        self.act = act = _act(c.nonlinearity)
        self.register_buffer("sigmas", _sigma_table(c))
        nf, levels, nrb = c.nf, len(c.ch_mult), c.num_res_blocks
        self._attn = set(c.attention_levels)
        temb_dim = 4 * nf
        kernel = c.fir_kernel

        def resblock(cin: int, cout: int | None = None, up: bool = False, down: bool = False) -> nn.Module:
            if c.resblock_type == "ddpm":
                return _ResnetBlockDDPMpp(act, cin, cout, temb_dim, c.dropout, c.skip_rescale)
            return _ResnetBlockBigGANpp(act, cin, cout, temb_dim, c.dropout, c.skip_rescale, c.fir, kernel, up, down)

        modules: list[nn.Module] = []
        if c.embedding_type == "fourier":
            modules.append(_FourierProjection(nf, c.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if c.conditional:
            modules += [nn.Linear(embed_dim, temb_dim), nn.Linear(temb_dim, temb_dim)]
        if c.progressive == "output_skip":
            self.pyramid_upsample = _Upsample(0, None, False, c.fir, kernel)
        if c.progressive_input == "input_skip":
            self.pyramid_downsample = _Downsample(0, None, False, c.fir, kernel)

        channels = c.num_channels
        input_pyramid_ch = channels
        modules.append(_conv3x3(channels, nf))
        hs_c = [nf]
        in_ch = nf
        for level in range(levels):
            for _ in range(nrb):
                out_ch = nf * c.ch_mult[level]
                modules.append(resblock(in_ch, out_ch))
                in_ch = out_ch
                if level in self._attn:
                    modules.append(_AttnBlockpp(in_ch, c.skip_rescale))
                hs_c.append(in_ch)
            if level != levels - 1:
                if c.resblock_type == "ddpm":
                    modules.append(_Downsample(in_ch, None, c.resamp_with_conv, c.fir, kernel))
                else:
                    modules.append(resblock(in_ch, down=True))
                if c.progressive_input == "input_skip":
                    modules.append(_Combine(input_pyramid_ch, in_ch, c.progressive_combine))
                    if c.progressive_combine == "cat":
                        in_ch *= 2
                elif c.progressive_input == "residual":
                    modules.append(_Downsample(input_pyramid_ch, in_ch, True, c.fir, kernel))
                    input_pyramid_ch = in_ch
                hs_c.append(in_ch)

        in_ch = hs_c[-1]
        modules += [resblock(in_ch), _AttnBlockpp(in_ch, c.skip_rescale), resblock(in_ch)]
        pyramid_ch = 0
        for level in reversed(range(levels)):
            for _ in range(nrb + 1):
                out_ch = nf * c.ch_mult[level]
                modules.append(resblock(in_ch + hs_c.pop(), out_ch))
                in_ch = out_ch
            if level in self._attn:
                modules.append(_AttnBlockpp(in_ch, c.skip_rescale))
            if c.progressive != "none":
                if level == levels - 1:
                    modules.append(_gn(in_ch))
                    if c.progressive == "output_skip":
                        modules.append(_conv3x3(in_ch, channels))
                        pyramid_ch = channels
                    else:
                        modules.append(_conv3x3(in_ch, in_ch))
                        pyramid_ch = in_ch
                elif c.progressive == "output_skip":
                    modules += [_gn(in_ch), _conv3x3(in_ch, channels)]
                    pyramid_ch = channels
                else:
                    modules.append(_Upsample(pyramid_ch, in_ch, True, c.fir, kernel))
                    pyramid_ch = in_ch
            if level != 0:
                if c.resblock_type == "ddpm":
                    modules.append(_Upsample(in_ch, None, c.resamp_with_conv, c.fir, kernel))
                else:
                    modules.append(resblock(in_ch, up=True))
        if c.progressive != "output_skip":
            modules += [_gn(in_ch), _conv3x3(in_ch, channels)]
        self.all_modules = nn.ModuleList(modules)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the weights (the network's compute dtype)."""
        return self.all_modules[-1].weight.dtype

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        """The official output (the score for VE models, ``-std * score`` for VP / sub-VP).

        :param x: ``(B, num_channels, H, W)`` on the data scale.
        :param time_cond: ``(B,)`` noise levels (Fourier) or time steps (positional).
        """
        c = self.config
        m = self.all_modules
        dtype = self.dtype
        idx = 0
        time_cond = torch.as_tensor(time_cond, device=x.device)
        if time_cond.ndim == 0:
            time_cond = time_cond.expand(x.shape[0])
        if c.embedding_type == "fourier":
            used_sigmas = time_cond.float()
            temb = m[0](torch.log(used_sigmas))
            idx = 1
        else:
            used_sigmas = self.sigmas[time_cond.long()].float() if c.scale_by_sigma else None
            temb = _timestep_embedding(time_cond, c.nf)
        if c.conditional:
            temb = m[idx](temb.to(dtype))
            temb = m[idx + 1](self.act(temb))
            idx += 2
        else:
            temb = None
        h0 = x.to(dtype)
        if not c.centered:
            h0 = 2 * h0 - 1.0
        levels, nrb = len(c.ch_mult), c.num_res_blocks
        input_pyramid = h0 if c.progressive_input != "none" else None
        hs = [m[idx](h0)]
        idx += 1
        for level in range(levels):
            for _ in range(nrb):
                h = m[idx](hs[-1], temb)
                idx += 1
                if level in self._attn:
                    h = m[idx](h)
                    idx += 1
                hs.append(h)
            if level != levels - 1:
                h = m[idx](hs[-1]) if c.resblock_type == "ddpm" else m[idx](hs[-1], temb)
                idx += 1
                if c.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = m[idx](input_pyramid, h)
                    idx += 1
                elif c.progressive_input == "residual":
                    input_pyramid = m[idx](input_pyramid)
                    idx += 1
                    input_pyramid = (input_pyramid + h) / math.sqrt(2.0) if c.skip_rescale else input_pyramid + h
                    h = input_pyramid
                hs.append(h)
        h = m[idx](hs[-1], temb)
        h = m[idx + 1](h)
        h = m[idx + 2](h, temb)
        idx += 3
        pyramid = None
        for level in reversed(range(levels)):
            for _ in range(nrb + 1):
                h = m[idx](torch.cat([h, hs.pop()], dim=1), temb)
                idx += 1
            if level in self._attn:
                h = m[idx](h)
                idx += 1
            if c.progressive != "none":
                if level == levels - 1:
                    pyramid = m[idx + 1](self.act(m[idx](h)))
                    idx += 2
                elif c.progressive == "output_skip":
                    pyramid = self.pyramid_upsample(pyramid)
                    pyramid = pyramid + m[idx + 1](self.act(m[idx](h)))
                    idx += 2
                else:
                    pyramid = m[idx](pyramid)
                    idx += 1
                    pyramid = (pyramid + h) / math.sqrt(2.0) if c.skip_rescale else pyramid + h
                    h = pyramid
            if level != 0:
                h = m[idx](h) if c.resblock_type == "ddpm" else m[idx](h, temb)
                idx += 1
        if c.progressive == "output_skip":
            h = pyramid
        else:
            h = m[idx + 1](self.act(m[idx](h)))
            idx += 2
        assert idx == len(m) and not hs
        out = h.to(x.dtype)
        if c.scale_by_sigma:
            out = out / used_sigmas.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        return out


# ----------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------


def _wide(device: torch.device) -> torch.dtype:
    """float64 for the noise-level arithmetic, float32 where the device has no float64 (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _log_mean_coeff(t: Tensor | float, b0: float, b1: float) -> Any:
    """``sde_lib`` VP / sub-VP: :math:`\\log m(t) = -\\tfrac14 t^2(\\beta_1-\\beta_0) - \\tfrac12 t\\beta_0`."""
    return -0.25 * t**2 * (b1 - b0) - 0.5 * t * b0


class ScoreSDEPrior(DiffusionPrior):
    r"""A score-SDE model (VE, VP or sub-VP; ``yang-song/score_sde_pytorch``) as a
    variance-exploding denoiser on ``[0, 1]`` images.

    .. math::

        x' = \text{shift} + \text{scale}\,x,\quad \sigma' = \text{scale}\,\sigma,\quad
        D'(x', \sigma') = \begin{cases} x' + \sigma'^2\, s_\theta(x', \text{label}) & \text{VE} \\
        x' - \sigma'\,\varepsilon_\theta(m x', \text{label}) & \text{VP, sub-VP} \end{cases},\quad
        D(x, \sigma) = \frac{D' - \text{shift}}{\text{scale}}

    (labels and :math:`m` in the module docstring, which derives them from the official
    ``get_score_fn``).

    :param model: an :class:`NCSNpp` (its ``config`` holds the SDE settings).
    :param image_shape: ``(C, H, W)``; defaults to ``(num_channels, image_size, image_size)``.
    :param data_range: range of the training images: ``"[-1, 1]"`` (default when
        ``data.centered``), ``"[0, 1]"`` (default otherwise: DiffusionMBIR CT, score-MRI),
        ``"complex-max"`` (max-normalised complex MRI as real/imaginary channels) or a pair.
    :param sigma_data: standard deviation of the training images on ``[0, 1]``.
    :param dtype: run the network in this dtype; ``None`` keeps the model's.

    Example::

        >>> import torch
        >>> cfg = ScoreSDEConfig(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), image_size=16,
        ...                      num_scales=10, sigma_min=0.01, sigma_max=50.0)
        >>> prior = ScoreSDEPrior(NCSNpp(cfg))
        >>> str(prior.data_range), prior.sigma_min, prior.sigma_max
        ('[0, 1]', 0.01, 50.0)
        >>> prior.denoise(torch.rand(1, 1, 16, 16), 0.3).shape
        torch.Size([1, 1, 16, 16])
    """

    fully_convolutional = True

    def __init__(
        self,
        model: NCSNpp,
        image_shape: Sequence[int] | None = None,
        *,
        data_range: str | Sequence[float] | DataRange | None = None,
        sigma_data: float = 0.5,
        dtype: torch.dtype | None = None,
    ) -> None:
        c = getattr(model, "config", None)
        if not isinstance(c, ScoreSDEConfig):
            raise ValueError("ScoreSDEPrior needs a model with a ScoreSDEConfig (an NCSNpp)")
        if image_shape is None:
            image_shape = (c.num_channels, c.image_size, c.image_size)
        data_range = DataRange.parse(c.default_data_range if data_range is None else data_range)
        self.sde, self.continuous = c.sde, bool(c.continuous)
        b0, b1 = float(c.beta_min), float(c.beta_max)
        self._discrete_log_sigmas: Tensor | None = None
        if c.sde == "vesde":
            lo, hi = c.sigma_min, c.sigma_max
            how = ("continuous: label = sigma" if c.continuous else
                   f"discrete: label = round((1 - t)(N - 1)) into sigma_max..sigma_min, N={c.num_scales}")
            div = ", output divided by the label's sigma" if c.scale_by_sigma else ""
            self.parameterisation = (f"VE score s(x, sigma) (NCSN++, {how}{div}), sigma {lo:g}..{hi:g} on the model "
                                     f"scale; D = x + sigma^2 s")
        else:
            if c.sde == "vpsde" and not c.continuous:
                # sde_lib.VPSDE's discrete DDPM table (float32 as official), as VE-equivalent noise levels
                betas = torch.linspace(b0 / c.num_scales, b1 / c.num_scales, c.num_scales, device="cpu")
                abar = torch.cumprod(1.0 - betas, dim=0).double()
                log_sig = 0.5 * torch.log((1 - abar) / abar)
                self._discrete_log_sigmas = log_sig
                lo, hi = float(log_sig[0].exp()), float(log_sig[-1].exp())
                how = f"discrete DDPM table N={c.num_scales}: label = fractional index (log-sigma interpolation)"
            else:
                lo, hi = self._t_to_sigma(_TRAIN_EPS, c.sde, b0, b1), self._t_to_sigma(1.0, c.sde, b0, b1)
                how = "continuous: t solved from sigma, label = 999 t"
            name = "VP" if c.sde == "vpsde" else "sub-VP"
            self.parameterisation = (f"{name} epsilon model (score = -out/std), beta(t) {b0:g}..{b1:g}, {how}; "
                                     f"D = x - sigma out, sigma {lo:.3g}..{hi:.3g} on the model scale")
        super().__init__(image_shape, float(data_range.sigma_from_model(lo)), float(data_range.sigma_from_model(hi)),
                         sigma_data)
        self.set_data_range(data_range)
        self.model = model if dtype is None else model.to(dtype)
        self.config = c
        self._b0, self._b1 = b0, b1

    @staticmethod
    def _t_to_sigma(t: float, sde: str, b0: float, b1: float) -> float:
        lmc = _log_mean_coeff(t, b0, b1)
        if sde == "vpsde":
            return math.sqrt(math.expm1(-2 * lmc))
        return -math.expm1(2 * lmc) / math.exp(lmc)

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the network runs in."""
        p = next(self.model.parameters(), None)
        return torch.float32 if p is None else p.dtype

    # --- noise level -> network label -----------------------------------------------
    def mean_coefficient(self, sigma_m: Tensor) -> Tensor:
        """:math:`m` with :math:`s/m = \\sigma'` (VP: :math:`1/\\sqrt{1+\\sigma'^2}`, sub-VP:
        :math:`2/(\\sigma' + \\sqrt{\\sigma'^2+4})`), float64, for model-scale ``sigma_m``."""
        s = sigma_m.to(_wide(sigma_m.device))
        if self.sde == "vpsde":
            return torch.rsqrt(1 + s**2)
        return 2 / (s + torch.sqrt(s**2 + 4))

    def sigma_to_t(self, sigma_m: Tensor) -> Tensor:
        """SDE time ``t`` of the model-scale noise level ``sigma_m`` (float64): VE
        :math:`\\ln(\\sigma'/\\sigma_\\min)/\\ln(\\sigma_\\max/\\sigma_\\min)` (not clamped); VP /
        sub-VP the root of :math:`\\log m(t) = \\log m(\\sigma')`, clamped to ``[0, 1]``."""
        s = sigma_m.to(_wide(sigma_m.device)).reshape(-1)
        c = self.config
        if self.sde == "vesde":
            return torch.log(s / c.sigma_min) / math.log(c.sigma_max / c.sigma_min)
        lmc = torch.log(self.mean_coefficient(s))  # <= 0
        a, b = (self._b1 - self._b0) / 4, self._b0 / 2
        t = 2 * (-lmc) / (b + torch.sqrt(b * b - 4 * a * lmc))  # a t^2 + b t + lmc = 0, stable root
        return t.clamp(0, 1)

    def labels(self, sigma_m: Tensor) -> Tensor:
        """The network's ``time_cond`` for model-scale noise levels ``sigma_m`` (``(B,)``):
        the official ``get_score_fn`` labels (see the module docstring)."""
        s = sigma_m.reshape(-1)
        c = self.config
        if self.sde == "vesde":
            if self.continuous:
                return s.float()
            t = self.sigma_to_t(s)
            return torch.round((1 - t) * (c.num_scales - 1)).clamp(0, c.num_scales - 1).long()
        if self._discrete_log_sigmas is not None:
            table = self._discrete_log_sigmas.to(s.device, _wide(s.device))
            log_s = torch.log(s.to(table.dtype))
            hi = torch.searchsorted(table, log_s).clamp(1, len(table) - 1)
            lo = hi - 1
            w = ((log_s - table[lo]) / (table[hi] - table[lo])).clamp(0, 1)
            return (lo + w).float()
        return (self.sigma_to_t(s) * 999).float()

    # --- the contract -------------------------------------------------------------
    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        r = self.data_range
        x_m = r.to_model(x)
        s_m = r.sigma_to_model(sigma)
        labels = self.labels(s_m).to(x.device)
        dtype = self.dtype
        if self.sde == "vesde":
            score = self.model(x_m.to(dtype), labels).to(x.dtype)
            d_m = x_m + s_m**2 * score
        else:
            if self.sde == "vpsde":
                x_t = vp_input(x_m, s_m)
            else:
                x_t = self.mean_coefficient(s_m).to(x.dtype) * x_m
            out = self.model(x_t.to(dtype), labels).to(x.dtype)
            d_m = vp_prediction_to_x0(out, x_m, s_m, "epsilon")
        return r.from_model(d_m)

    def extra_repr(self) -> str:
        kind = "continuous" if self.continuous else "discrete"
        return f"{super().extra_repr()}, sde={self.sde} ({kind}), data_range={self.data_range}, dtype={self.dtype}"


# ----------------------------------------------------------------------------------
# the checkpoint family
# ----------------------------------------------------------------------------------

_OPTIONS = {"image_shape", "data_range", "sigma_data"}


def _build(config: Any, options: dict) -> ScoreSDEPrior:
    cfg = ScoreSDEConfig.from_flags(config)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown score-SDE prior options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    opts = dict(options)
    shape = opts.pop("image_shape", None)
    return ScoreSDEPrior(NCSNpp(cfg), shape, **opts)


def _describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    assert isinstance(prior, ScoreSDEPrior)
    options = dict(image_shape=list(prior.image_shape), data_range=str(prior.data_range), sigma_data=prior.sigma_data)
    return prior.config.to_dict(), options


def _infer(state_dict: Mapping[str, Tensor], options: dict) -> ScoreSDEConfig:
    given: dict[str, Any] = {}
    shape = options.get("image_shape")
    if shape is not None and shape[-1] == shape[-2]:
        given["image_size"] = int(shape[-1])
    return ScoreSDEConfig.infer_from_state_dict(state_dict, **given)


def _recognizes(state_dict: Mapping[str, Tensor]) -> bool:
    return "sigmas" in state_dict and any(k.startswith("all_modules.0.") for k in state_dict)


def _strip_module(state: Mapping[str, Any]) -> dict[str, Tensor]:
    state = {str(k): v for k, v in state.items() if isinstance(v, Tensor)}
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def unwrap(obj: Any, ema: bool = True) -> dict[str, Tensor] | None:
    """The weights of an official score-SDE checkpoint
    (``torch.save({'optimizer', 'model', 'ema', 'step'})``, ``run_lib.py``).

    ``'model'`` is the state dict of the ``DataParallel`` network (``module.`` is
    stripped). With ``ema`` the ``'ema'`` entry
    (``ExponentialMovingAverage.state_dict()``: ``{'decay', 'num_updates',
    'shadow_params'}``, a list of tensors in ``model.parameters()`` order of the
    parameters with ``requires_grad``) replaces those parameters — the official
    ``ema.copy_to(model.parameters())``; the frozen Fourier ``W`` and the ``sigmas``
    buffer come from ``'model'``. ``None`` when ``obj`` is not of this layout.

    >>> import torch
    >>> w = {"module.sigmas": torch.ones(2), "module.all_modules.0.W": torch.zeros(2),
    ...      "module.all_modules.1.weight": torch.zeros(3)}
    >>> ckpt = {"model": w, "ema": {"decay": 0.9, "num_updates": 1, "shadow_params": [torch.ones(3)]}, "step": 1}
    >>> unwrap(ckpt)["all_modules.1.weight"].tolist(), unwrap(ckpt, ema=False)["all_modules.1.weight"].tolist()
    ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
    """
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        return None
    model = _strip_module(obj["model"])
    if not _recognizes(model):
        return None
    shadow = obj.get("ema", {}).get("shadow_params") if isinstance(obj.get("ema"), Mapping) else None
    if not ema or not isinstance(shadow, (list, tuple)) or not shadow:
        return model
    trainable = [k for k in model if k != "sigmas" and k != "all_modules.0.W"]
    if len(shadow) == len(trainable) + 1 and "all_modules.0.W" in model:  # W trained (not the official code)
        trainable = [k for k in model if k != "sigmas"]
    if len(shadow) != len(trainable):
        raise ValueError(f"score-SDE checkpoint: the EMA holds {len(shadow)} shadow_params, the model "
                         f"{len(trainable)} trainable parameters; pass ema=False to load the raw weights")
    out = dict(model)
    for key, value in zip(trainable, shadow):
        if not isinstance(value, Tensor) or tuple(value.shape) != tuple(model[key].shape):
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"score-SDE checkpoint: EMA shadow parameter for {key} has shape {got}, the model "
                             f"{tuple(model[key].shape)}; pass ema=False to load the raw weights")
        out[key] = value
    return out


def _register() -> None:
    from .loading import PriorFamily, register_family

    register_family(
        PriorFamily(
            name="score-sde",
            prior_type=ScoreSDEPrior,
            build=_build,
            describe=_describe,
            network=lambda prior: prior.model,
            infer_config=_infer,
            recognizes=_recognizes,
            source=_SOURCE,
            formats=("official run_lib.py checkpoints (.pth: {'optimizer', 'model', 'ema', 'step'}, EMA shadow "
                     "params preferred), a bare NCSN++ state dict (.pt/.pth/.safetensors), invdiff .safetensors"),
            unwrap=unwrap,
        )
    )


_register()
