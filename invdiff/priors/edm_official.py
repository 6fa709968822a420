r"""Checkpoints of the official EDM code (NVlabs/edm), family ``"nvlabs-edm"``.

Karras, Aittala, Aila, Laine, "Elucidating the design space of diffusion-based generative
models", NeurIPS 2022; code https://github.com/NVlabs/edm, ``training/networks.py``.

An EDM checkpoint is a *preconditioner* (``EDMPrecond``, ``VPPrecond``, ``VEPrecond``,
``iDDPMPrecond``) around a network ``model`` (``SongUNet``, the DDPM++/NCSN++ U-Net, or
``DhariwalUNet``, the ADM U-Net), trained on images in ``[-1, 1]``. On the model's scale
(``x'`` in ``[-1, 1]``, noise ``sigma'``) every preconditioner is

.. math::

    D'(x', \sigma') = c_\text{skip}(\sigma')\, x' + c_\text{out}(\sigma')\,
        F\big(c_\text{in}(\sigma')\, x',\; c_\text{noise}(\sigma')\big)_{[:C]}

with, from ``training/networks.py`` (``sigma_d = 0.5``; VP: ``beta_d = 19.9``,
``beta_min = 0.1``, ``M = 1000``; iDDPM: ``C_1 = 0.001``, ``C_2 = 0.008``, ``M = 1000``):

.. math::

    \text{EDM:}\quad c_\text{skip} = \frac{\sigma_d^2}{\sigma'^2+\sigma_d^2},\;
        c_\text{out} = \frac{\sigma'\sigma_d}{\sqrt{\sigma'^2+\sigma_d^2}},\;
        c_\text{in} = \frac{1}{\sqrt{\sigma'^2+\sigma_d^2}},\;
        c_\text{noise} = \tfrac14 \ln\sigma'

    \text{VP:}\quad c_\text{skip} = 1,\; c_\text{out} = -\sigma',\;
        c_\text{in} = \frac{1}{\sqrt{\sigma'^2+1}},\;
        c_\text{noise} = (M-1)\,\frac{\sqrt{\beta_\min^2 + 2\beta_d \ln(1+\sigma'^2)} - \beta_\min}{\beta_d}

    \text{VE:}\quad c_\text{skip} = 1,\; c_\text{out} = \sigma',\; c_\text{in} = 1,\;
        c_\text{noise} = \ln(\sigma'/2)

    \text{iDDPM:}\quad c_\text{skip} = 1,\; c_\text{out} = -\sigma',\;
        c_\text{in} = \frac{1}{\sqrt{\sigma'^2+1}},\;
        c_\text{noise} = M - 1 - \arg\min_j |\sigma' - u_j|,

where ``u`` is iDDPM's table :math:`u_M = 0`,
:math:`u_{j-1} = \sqrt{(u_j^2 + 1)/\max(\bar\alpha_{j-1}/\bar\alpha_j, C_1) - 1}`,
:math:`\bar\alpha_j = \sin^2(\tfrac{\pi}{2} \tfrac{j}{M (1 + C_2)})`. invdiff's
:math:`x \in [0, 1]` maps onto the model's range by
:class:`~invdiff.priors.conventions.DataRange` (``"[-1, 1]"``: :math:`x' = 2x - 1`,
:math:`\sigma' = 2\sigma`, :math:`D = (D' + 1)/2`).

**Networks.** ``SongUNet`` and ``DhariwalUNet`` are built from deepinv's ports,
:class:`deepinv.models.NCSNpp` (model types ``"ddpm"`` = EDM's ``ddpmpp`` config and
``"ncsn"`` = ``ncsnpp``) and :class:`deepinv.models.ADMUNet`, whose ``state_dict`` keys and
shapes are those of the official classes. deepinv builds every ``GroupNorm`` with 32 groups
where the official ``GroupNorm`` uses ``min(32, C // 4)``: invdiff sets the official number
of groups after construction (the same for ``C >= 128``, the published configs; different
for narrower networks), so the network's output equals the official one
(``benchmarks/official_check.py --edm-repo PATH`` measures it against the official code).
deepinv can build only networks whose channel counts are multiples of 32.

**Files.** invdiff never unpickles EDM's ``.pkl`` files: convert them once, in your own
trusted EDM environment, with ``scripts/edm_pickle_to_safetensors.py`` (writes an invdiff
``.safetensors`` file with the official ``init_kwargs`` as config). A plain state dict
(``.safetensors`` or weights-only ``.pt``) of the preconditioner (keys ``model.<...>``) or of
the bare network loads too, with ``config=`` (see :func:`parse_config`) or with the network
configuration inferred from the keys (:func:`infer_config`); the preconditioner cannot be
read from the weights and defaults to ``EDMPrecond`` (``iDDPMPrecond`` when the network has
twice as many output as input channels).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from .base import DiffusionPrior
from .conventions import DataRange
from .edm import edm_preconditioning
from .loading import PriorFamily, extract_state_dict, register_family

__all__ = ["EDMOfficialPrior", "edm_official_preconditioning", "iddpm_u_table", "vp_sigma", "vp_sigma_inv",
           "parse_config", "infer_config", "build_network", "PRECONDS", "NETWORKS"]

SOURCE = ("NVlabs/edm training/networks.py (SongUNet, DhariwalUNet; EDMPrecond, VPPrecond, VEPrecond, "
          "iDDPMPrecond); networks built from deepinv.models.NCSNpp / ADMUNet (same keys)")

#: official preconditioner classes and their keyword defaults (training/networks.py)
PRECONDS: dict[str, dict[str, Any]] = {
    "EDMPrecond": dict(sigma_min=0.0, sigma_max=math.inf, sigma_data=0.5),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100.0),
    "iDDPMPrecond": dict(C_1=0.001, C_2=0.008, M=1000),
}
_COMMON_PRECOND = ("img_resolution", "img_channels", "label_dim", "use_fp16", "model_type")
NETWORKS = ("SongUNet", "DhariwalUNet")
#: official network keyword defaults (training/networks.py), used where a config omits one
_NET_DEFAULTS: dict[str, dict[str, Any]] = {
    "SongUNet": dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                     num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0,
                     embedding_type="positional", channel_mult_noise=1, encoder_type="standard",
                     decoder_type="standard", resample_filter=[1, 1]),
    "DhariwalUNet": dict(label_dim=0, augment_dim=0, model_channels=192, channel_mult=[1, 2, 3, 4], channel_mult_emb=4,
                         num_blocks=3, attn_resolutions=[32, 16, 8], dropout=0.10, label_dropout=0),
}
# the two SongUNet variants of EDM's train.py (--arch=ddpmpp / ncsnpp) = deepinv NCSNpp's model types
_SONG_VARIANTS = {
    "ddpm": dict(embedding_type="positional", channel_mult_noise=1, encoder_type="standard", decoder_type="standard",
                 resample_filter=[1, 1]),
    "ncsn": dict(embedding_type="fourier", channel_mult_noise=2, encoder_type="residual", decoder_type="standard",
                 resample_filter=[1, 3, 3, 1]),
}
# the sampling range of EDM's generate.py (model scale), clamped to the preconditioner's
_EDM_SAMPLING = (0.002, 80.0)


# ----------------------------------------------------------------------------------
# the official preconditioning formulas
# ----------------------------------------------------------------------------------


def vp_sigma(t: Tensor | float, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    r"""VPPrecond's :math:`\sigma(t) = \sqrt{e^{\beta_d t^2/2 + \beta_\min t} - 1}` (model scale)."""
    t = torch.as_tensor(t, device="cpu") if not isinstance(t, Tensor) else t
    return ((0.5 * beta_d * (t**2) + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma: Tensor, beta_d: float = 19.9, beta_min: float = 0.1) -> Tensor:
    r"""Inverse of :func:`vp_sigma`:
    :math:`t = (\sqrt{\beta_\min^2 + 2\beta_d\ln(1+\sigma^2)} - \beta_\min)/\beta_d`."""
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


def iddpm_u_table(C_1: float = 0.001, C_2: float = 0.008, M: int = 1000) -> Tensor:
    r"""iDDPMPrecond's noise levels ``u_0 > ... > u_M = 0`` (float32, CPU; see the module doc),
    computed in the official order and precision.

    >>> u = iddpm_u_table()
    >>> round(float(u[999]), 4), round(float(u[0]), 1), float(u[1000])
    (0.0064, 20291.2, 0.0)
    """
    def alpha_bar(j: int) -> Tensor:
        return (0.5 * math.pi * torch.as_tensor(j, device="cpu") / M / (C_2 + 1)).sin() ** 2

    u = torch.zeros(M + 1, device="cpu")
    for j in range(M, 0, -1):
        u[j - 1] = ((u[j] ** 2 + 1) / (alpha_bar(j - 1) / alpha_bar(j)).clip(min=C_1) - 1).sqrt()
    return u


def edm_official_preconditioning(precond: str, sigma: Tensor, kwargs: Mapping[str, Any] | None = None,
                                 u: Tensor | None = None) -> tuple[Tensor | float, Tensor, Tensor | float, Tensor]:
    r"""``(c_skip, c_out, c_in, c_noise)`` of the official preconditioner ``precond`` at the
    model-scale noise levels ``sigma`` (float32, shape ``(B, 1, 1, 1)``); ``c_noise`` is flat
    ``(B,)``, as the network receives it. ``kwargs`` are the preconditioner's keywords (defaults
    of :data:`PRECONDS`); ``u`` is iDDPM's table (:func:`iddpm_u_table`).

    >>> s = torch.full((1, 1, 1, 1), 2.0)
    >>> [round(float(torch.as_tensor(c).flatten()[0]), 4) for c in edm_official_preconditioning("EDMPrecond", s)]
    [0.0588, 0.4851, 0.4851, 0.1733]
    """
    kw = {**PRECONDS[precond], **dict(kwargs or {})}
    if precond == "EDMPrecond":
        c_skip, c_out, c_in, _ = edm_preconditioning(sigma, float(kw["sigma_data"]))
        return c_skip, c_out, c_in, (sigma.log() / 4).flatten()
    if precond == "VPPrecond":
        c_noise = (kw["M"] - 1) * vp_sigma_inv(sigma, kw["beta_d"], kw["beta_min"])
        return 1.0, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise.flatten()
    if precond == "VEPrecond":
        return 1.0, sigma, 1.0, (0.5 * sigma).log().flatten()
    if precond == "iDDPMPrecond":
        u = iddpm_u_table(kw["C_1"], kw["C_2"], int(kw["M"])) if u is None else u
        u = u.to(sigma.device)
        index = torch.cdist(sigma.to(torch.float32).reshape(1, -1, 1), u.reshape(1, -1, 1)).argmin(2)
        c_noise = kw["M"] - 1 - index.reshape(sigma.shape).to(torch.float32)
        return 1.0, -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise.flatten()
    raise ValueError(f"unknown EDM preconditioner {precond!r}; known: {', '.join(PRECONDS)}")


def _model_sigma_range(precond: str, kw: Mapping[str, Any], u: Tensor | None) -> tuple[float, float]:
    """The sampling range of EDM's ``generate.py`` on the model scale: its defaults
    ``(0.002, 80)`` clamped to the preconditioner's ``(sigma_min, sigma_max)``."""
    kw = {**PRECONDS[precond], **dict(kw)}
    if precond == "VPPrecond":
        lo, hi = (float(vp_sigma(float(kw["epsilon_t"]), kw["beta_d"], kw["beta_min"])),
                  float(vp_sigma(1.0, kw["beta_d"], kw["beta_min"])))
    elif precond == "iDDPMPrecond":
        assert u is not None
        lo, hi = float(u[int(kw["M"]) - 1]), float(u[0])
    else:
        lo, hi = float(kw["sigma_min"]), float(kw["sigma_max"])
    return max(_EDM_SAMPLING[0], lo), min(_EDM_SAMPLING[1], hi)


# ----------------------------------------------------------------------------------
# configs and networks
# ----------------------------------------------------------------------------------


def _as_list(v: Any) -> Any:
    return [int(a) for a in v] if isinstance(v, (list, tuple)) else v


def parse_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The normal form of an ``nvlabs-edm`` config: ``{"precond": name, "precond_kwargs": {...},
    "network": "SongUNet" | "DhariwalUNet", "network_kwargs": {...}}`` with the official
    keyword names (those of the pickle's ``init_kwargs``); omitted network keywords take the
    official defaults, ``img_resolution`` / ``in_channels`` / ``out_channels`` / ``label_dim``
    come from the preconditioner's keywords where the network's omit them.

    >>> cfg = parse_config({"network": "SongUNet", "precond_kwargs": {"img_resolution": 32, "img_channels": 3}})
    >>> cfg["precond"], cfg["network_kwargs"]["out_channels"], cfg["network_kwargs"]["model_channels"]
    ('EDMPrecond', 3, 128)
    """
    if not isinstance(config, Mapping):
        raise ValueError(f"nvlabs-edm config must be a dict with precond, precond_kwargs, network, network_kwargs; "
                         f"got {type(config).__name__}")
    unknown = set(config) - {"precond", "precond_kwargs", "network", "network_kwargs"}
    if unknown:
        raise ValueError(f"unknown nvlabs-edm config fields {sorted(unknown)}; known: precond, precond_kwargs, "
                         f"network, network_kwargs")
    precond = str(config.get("precond", "EDMPrecond")).rsplit(".", 1)[-1]
    if precond not in PRECONDS:
        raise ValueError(f"unknown EDM preconditioner {precond!r}; known: {', '.join(PRECONDS)}")
    pk = dict(config.get("precond_kwargs") or {})
    allowed = set(_COMMON_PRECOND) | set(PRECONDS[precond])
    extra = set(pk) - allowed
    nk = dict(config.get("network_kwargs") or {})
    # official default model_type: SongUNet for VP / VE, DhariwalUNet for iDDPM / EDM
    network = str(config.get("network") or pk.get("model_type") or
                  ("SongUNet" if precond in ("VPPrecond", "VEPrecond") else "DhariwalUNet"))
    network = network.rsplit(".", 1)[-1]
    if network not in NETWORKS:
        raise ValueError(f"unknown EDM network {network!r}; known: {', '.join(NETWORKS)}")
    # a precond's init_kwargs hold the network's keywords too (model_kwargs): move them over
    for k in sorted(extra):
        if k in _NET_DEFAULTS[network]:
            nk.setdefault(k, pk.pop(k))
    extra = set(pk) - allowed
    if extra:
        raise ValueError(f"unknown {precond} keywords {sorted(extra)}; known: {sorted(allowed)}")
    pk.pop("model_type", None)
    if "img_resolution" in pk:
        nk.setdefault("img_resolution", int(pk["img_resolution"]))
    if "img_channels" in pk:
        nk.setdefault("in_channels", int(pk["img_channels"]))
        nk.setdefault("out_channels", int(pk["img_channels"]) * (2 if precond == "iDDPMPrecond" else 1))
    if "label_dim" in pk:
        nk.setdefault("label_dim", int(pk["label_dim"]))
    for k in ("img_resolution", "in_channels"):
        if k not in nk:
            raise ValueError(f"nvlabs-edm config needs {k} (network_kwargs) or img_resolution / img_channels "
                             f"(precond_kwargs)")
    nk.setdefault("out_channels", int(nk["in_channels"]) * (2 if precond == "iDDPMPrecond" else 1))
    unknown_net = set(nk) - set(_NET_DEFAULTS[network]) - {"img_resolution", "in_channels", "out_channels"}
    if unknown_net:
        raise ValueError(f"unknown {network} keywords {sorted(unknown_net)}; known: "
                         f"{sorted(set(_NET_DEFAULTS[network]) | {'img_resolution', 'in_channels', 'out_channels'})}")
    nk = {**_NET_DEFAULTS[network], **{k: _as_list(v) for k, v in nk.items()}}
    pk.setdefault("img_resolution", int(nk["img_resolution"]))
    pk.setdefault("img_channels", int(nk["in_channels"]))
    pk.setdefault("label_dim", int(nk["label_dim"]))
    return {"precond": precond, "precond_kwargs": pk, "network": network, "network_kwargs": nk}


def _official_group_norms(net: nn.Module) -> nn.Module:
    """Set every ``GroupNorm`` to the official number of groups, ``min(32, C // 4)``
    (training/networks.py ``GroupNorm``); deepinv builds them with 32."""
    for m in net.modules():
        if isinstance(m, nn.GroupNorm):
            m.num_groups = min(32, m.num_channels // 4)
    return net


def build_network(network: str, kwargs: Mapping[str, Any]) -> nn.Module:
    """The official ``SongUNet`` / ``DhariwalUNet`` of keywords ``kwargs`` (official names), as
    deepinv's :class:`~deepinv.models.NCSNpp` / :class:`~deepinv.models.ADMUNet` (random
    weights, never downloaded) with the official ``GroupNorm`` groups. Call it through
    :func:`parse_config` to fill in defaults.

    >>> net = build_network("DhariwalUNet", parse_config({"network": "DhariwalUNet", "network_kwargs": dict(
    ...     img_resolution=8, in_channels=1, model_channels=32, channel_mult=[1], num_blocks=1,
    ...     attn_resolutions=[])})["network_kwargs"])
    >>> type(net).__name__, net.out_norm.num_groups
    ('ADMUNet', 8)
    """
    import deepinv

    kw = dict(kwargs)
    widths = [int(kw["model_channels"]) * int(m) for m in kw["channel_mult"]]
    if any(w % 32 for w in widths):
        raise ValueError(f"{network}: channel counts {widths} (model_channels x channel_mult) must be multiples of 32 "
                         f"for deepinv's {'NCSNpp' if network == 'SongUNet' else 'ADMUNet'}")
    common = {k: kw[k] for k in ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim",
                                 "model_channels", "channel_mult_emb", "num_blocks", "dropout", "label_dropout")}
    common.update(channel_mult=tuple(kw["channel_mult"]), attn_resolutions=tuple(kw["attn_resolutions"]),
                  pretrained=None)
    if network == "SongUNet":
        arch = {k: _as_list(kw[k]) for k in _SONG_VARIANTS["ddpm"]}
        variant = next((name for name, v in _SONG_VARIANTS.items() if v == arch), None)
        if variant is None:
            raise ValueError(f"SongUNet {arch} is neither EDM's ddpmpp ({_SONG_VARIANTS['ddpm']}) nor ncsnpp "
                             f"({_SONG_VARIANTS['ncsn']}), the two variants deepinv's NCSNpp builds")
        net = deepinv.models.NCSNpp(model_type=variant, **common)
    elif network == "DhariwalUNet":
        net = deepinv.models.ADMUNet(**common)
    else:
        raise ValueError(f"unknown EDM network {network!r}; known: {', '.join(NETWORKS)}")
    return _official_group_norms(net)


def _bare(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Network keys: a preconditioner's ``model.`` prefix and iDDPM's ``u`` buffer removed."""
    state = {k: v for k, v in state.items() if k != "u"}
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def _network_kind(state: Mapping[str, Tensor]) -> str | None:
    """``"SongUNet"``, ``"DhariwalUNet"`` or ``None`` from bare network keys."""
    if not all(k in state for k in ("map_layer0.weight", "map_layer1.weight")):
        return None
    if not any(k.startswith("enc.") and k.endswith("_conv.weight") for k in state):
        return None
    if "out_conv.weight" in state and "out_norm.weight" in state:
        return "DhariwalUNet"
    if any(k.startswith("dec.") and k.endswith("_aux_conv.weight") for k in state):
        return "SongUNet"
    return None


def infer_network_kwargs(state: Mapping[str, Tensor]) -> tuple[str, dict[str, Any]]:
    """``(network, kwargs)`` of a bare ``SongUNet`` / ``DhariwalUNet`` state dict, read from
    its keys and shapes: resolution, channels, ``model_channels``, ``channel_mult``,
    ``channel_mult_emb``, ``num_blocks``, ``attn_resolutions``, ``label_dim``,
    ``augment_dim``; for SongUNet also the embedding (``map_noise.freqs``: Fourier), encoder
    (``aux_residual`` / ``aux_skip``), decoder (``aux_up``) and resampling filter (the
    ``resample_filter`` buffers). ``dropout`` is not in the weights (official default 0.1;
    it does nothing at inference)."""
    import re

    kind = _network_kind(state)
    if kind is None:
        raise ValueError("not a SongUNet / DhariwalUNet state dict (no map_layer0 / enc.*_conv / out_conv keys)")
    blocks: dict[int, dict[int, str]] = {}
    for k in state:
        m = re.match(r"enc\.(\d+)x\1_block(\d+)\.conv1\.weight$", k)
        if m:
            blocks.setdefault(int(m.group(1)), {})[int(m.group(2))] = k
    if not blocks:
        raise ValueError("no encoder blocks (enc.<res>x<res>_block<i>.conv1.weight)")
    resolutions = sorted(blocks, reverse=True)
    res0 = resolutions[0]
    conv = state[f"enc.{res0}x{res0}_conv.weight"]
    emb_channels, noise_channels = state["map_layer0.weight"].shape
    widths = [state[blocks[r][max(blocks[r])]].shape[0] for r in resolutions]
    kw: dict[str, Any] = dict(img_resolution=res0, in_channels=int(conv.shape[1]))
    if kind == "SongUNet":
        mc = int(conv.shape[0])
        kw["out_channels"] = int(state[f"dec.{res0}x{res0}_aux_conv.weight"].shape[0])
        fourier = "map_noise.freqs" in state
        enc_type = ("residual" if any("_aux_residual" in k for k in state)
                    else "skip" if any("_aux_skip" in k for k in state) else "standard")
        dec_type = "skip" if any("_aux_up" in k for k in state) else "standard"
        filt = next((v for k, v in state.items() if k.endswith("resample_filter")), None)
        if filt is None or filt.shape[-1] == 2:
            rf = [1, 1]
        else:
            row = filt.reshape(filt.shape[-2], filt.shape[-1])[0].double()
            rf = [int(round(float(a))) for a in (row / row[0])]
        kw.update(embedding_type="fourier" if fourier else "positional", channel_mult_noise=int(noise_channels) // mc,
                  encoder_type=enc_type, decoder_type=dec_type, resample_filter=rf)
    else:
        mc = int(noise_channels)
        kw["out_channels"] = int(state["out_conv.weight"].shape[0])
    if any(w % mc for w in widths):
        raise ValueError(f"channel widths {widths} are not multiples of model_channels {mc}")
    attn = sorted((r for r in resolutions if any(f"enc.{r}x{r}_block{i}.qkv.weight" in state for i in blocks[r])),
                  reverse=True)
    kw.update(model_channels=mc, channel_mult=[int(w) // mc for w in widths], channel_mult_emb=int(emb_channels) // mc,
              num_blocks=max(blocks[res0]) + 1, attn_resolutions=attn,
              label_dim=int(state["map_label.weight"].shape[1]) if "map_label.weight" in state else 0,
              augment_dim=int(state["map_augment.weight"].shape[1]) if "map_augment.weight" in state else 0)
    return kind, kw


def infer_config(state: Mapping[str, Tensor], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A :func:`parse_config` config read from a state dict (bare network or ``model.``-prefixed).
    The preconditioner is not in the weights: ``EDMPrecond``, or ``iDDPMPrecond`` when the
    network has twice as many output as input channels (iDDPM's learned variance); pass
    ``config=`` for ``VPPrecond`` / ``VEPrecond``."""
    network, nk = infer_network_kwargs(_bare(state))
    precond = "iDDPMPrecond" if nk["out_channels"] == 2 * nk["in_channels"] else "EDMPrecond"
    return parse_config({"precond": precond, "network": network, "network_kwargs": nk})


# ----------------------------------------------------------------------------------
# the adapter
# ----------------------------------------------------------------------------------


class EDMOfficialPrior(DiffusionPrior):
    r"""An official EDM checkpoint (preconditioner around a SongUNet / DhariwalUNet) as an
    invdiff prior: the module doc's :math:`D'` on the model scale, mapped to ``[0, 1]``,

    .. math::

        D(x, \sigma) = \frac{D'(\text{shift} + \text{scale}\,x,\ \text{scale}\,\sigma) - \text{shift}}{\text{scale}}.

    The preconditioning arithmetic runs in float32 (as the official ``forward``), the network
    in the dtype of its parameters (inputs cast to it, outputs back to float32). Cast to
    fp16 / bf16 (``load(..., dtype=torch.float16)``, ``prior.half()``), the network keeps its
    noise / label embedding MLP and each block's ``affine`` layer in float32, as the official
    mixed precision does (``use_fp16``: float32 weights, half-precision convolutions, the
    embedding computed in float32); a half-precision Fourier embedding would lose the phase. Class labels:
    ``class_label=None`` gives the official zero label vector (unconditional use of a
    conditional model), an integer its one-hot vector; augmentation labels are left out
    (the official ``augment_labels=None``, equal to zeros).

    :param model: the network ``F(x, c_noise, class_labels, augment_labels)``
        (:func:`build_network`; a deepinv NCSNpp / ADMUNet, whose ``forward_unet`` is called).
    :param precond: ``"EDMPrecond"``, ``"VPPrecond"``, ``"VEPrecond"`` or ``"iDDPMPrecond"``.
    :param precond_kwargs: its official keywords (``sigma_data``, ``beta_d``, ``M``, ...).
    :param image_shape: ``(C, H, W)``; by default ``(img_channels, img_resolution, img_resolution)``.
    :param data_range: range of the training images (default ``"[-1, 1]"``, EDM's).
    :param class_label: class index for a conditional network (``None``: zero labels).
    :param sigma_min: smallest noise level on invdiff's scale (default: the preconditioner's).
    :param sigma_max: largest noise level on invdiff's scale (default: the preconditioner's).

    Example::

        >>> import torch
        >>> cfg = parse_config({"precond": "EDMPrecond", "network": "SongUNet", "network_kwargs": dict(
        ...     img_resolution=8, in_channels=1, model_channels=32, channel_mult=[1], num_blocks=1,
        ...     attn_resolutions=[])})
        >>> prior = EDMOfficialPrior(build_network(cfg["network"], cfg["network_kwargs"]), "EDMPrecond",
        ...                          cfg["precond_kwargs"])
        >>> prior.sigma_min, prior.sigma_max, str(prior.data_range)
        (0.001, 40.0, '[-1, 1]')
        >>> prior.denoise(torch.rand(2, 1, 8, 8), 0.3).shape
        torch.Size([2, 1, 8, 8])
    """

    fully_convolutional = True

    def __init__(
        self,
        model: nn.Module,
        precond: str = "EDMPrecond",
        precond_kwargs: Mapping[str, Any] | None = None,
        image_shape: Sequence[int] | None = None,
        data_range: str | DataRange | Sequence[float] = "[-1, 1]",
        class_label: int | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
    ) -> None:
        if precond not in PRECONDS:
            raise ValueError(f"unknown EDM preconditioner {precond!r}; known: {', '.join(PRECONDS)}")
        kw = dict(precond_kwargs or {})
        unknown = set(kw) - set(_COMMON_PRECOND) - set(PRECONDS[precond])
        if unknown:
            raise ValueError(f"unknown {precond} keywords {sorted(unknown)}")
        rng = DataRange.parse(data_range)
        in_ch = int(getattr(model, "in_channels", 0) or kw.get("img_channels", 0) or 0)
        if image_shape is None:
            res = kw.get("img_resolution") or getattr(model, "img_resolution", None)
            if res is None or not in_ch:
                raise ValueError("EDMOfficialPrior needs image_shape (or img_resolution / img_channels "
                                 "in precond_kwargs)")
            image_shape = (int(in_ch), int(res), int(res))
        u = iddpm_u_table(kw.get("C_1", 0.001), kw.get("C_2", 0.008), int(kw.get("M", 1000))) \
            if precond == "iDDPMPrecond" else None
        lo, hi = _model_sigma_range(precond, kw, u)
        smin = float(rng.sigma_from_model(lo)) if sigma_min is None else float(sigma_min)
        smax = float(rng.sigma_from_model(hi)) if sigma_max is None else float(sigma_max)
        super().__init__(image_shape, sigma_min=smin, sigma_max=smax,
                         sigma_data=float(rng.sigma_from_model(float(kw.get("sigma_data", 0.5)))))
        self.model = model
        self.precond = precond
        self.precond_kwargs = kw
        self.set_data_range(rng)
        self.class_label = None if class_label is None else int(class_label)
        self.label_dim = int(kw.get("label_dim", 0) or 0)
        self._u = u  # a plain CPU tensor, kept out of the state dict (official: a buffer)
        self._explicit_sigmas = (sigma_min, sigma_max)

    @property
    def parameterisation(self) -> str:  # type: ignore[override]
        kw = {**PRECONDS[self.precond], **{k: v for k, v in self.precond_kwargs.items() if k in PRECONDS[self.precond]}}
        if self.precond == "EDMPrecond":
            what = f"EDM preconditioned denoiser (sigma_data={kw['sigma_data']}, c_noise=ln(sigma)/4)"
        elif self.precond == "VPPrecond":
            what = (f"VP epsilon-prediction (beta_d={kw['beta_d']}, beta_min={kw['beta_min']}, M={kw['M']}, "
                    f"c_noise=(M-1) t(sigma))")
        elif self.precond == "VEPrecond":
            what = "VE score network (c_out=sigma, c_noise=ln(sigma/2))"
        else:
            what = (f"iDDPM epsilon-prediction (C_1={kw['C_1']}, C_2={kw['C_2']}, M={kw['M']}, "
                    f"c_noise=M-1-index of nearest u_j)")
        return f"{what}; official NVlabs/edm {self.precond}"

    @property
    def dtype(self) -> torch.dtype:
        """Dtype the network's convolutions run in (the embedding stays float32)."""
        keep = {id(p) for m in self._fp32_parts() for p in m.parameters()}
        p = next((p for p in self.model.parameters() if id(p) not in keep and p.is_floating_point()), None)
        return torch.float32 if p is None else p.dtype

    def _fp32_parts(self) -> list[nn.Module]:
        """The modules the official mixed precision keeps in float32: the noise / label /
        augmentation embedding MLP and each block's ``affine`` (official ``Linear`` computes
        in its input's dtype, and the embedding is float32)."""
        parts = [getattr(self.model, n) for n in ("map_noise", "map_label", "map_augment", "map_layer0", "map_layer1")
                 if isinstance(getattr(self.model, n, None), nn.Module)]
        return parts + [m for n, m in self.model.named_modules() if n.endswith(".affine")]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        # keep the embedding in float32 when the network is cast to fp16 / bf16 (device moves apply)
        parts = self._fp32_parts() if "model" in self._modules else []
        old = [(m, {n: p.data for n, p in m._parameters.items() if p is not None},
                {n: b for n, b in m._buffers.items() if b is not None}) for m in parts]
        out = super()._apply(fn, recurse)
        for m, params, buffers in old:
            for n, t in params.items():
                new = m._parameters[n]
                if t.dtype == torch.float32 and new.dtype != t.dtype and not t.is_meta:
                    new.data = t.to(new.device)
            for n, t in buffers.items():
                new = m._buffers[n]
                if t.dtype == torch.float32 and new.dtype != t.dtype and not t.is_meta:
                    m._buffers[n] = t.to(new.device)
        return out

    def preconditioning(self, sigma_model: Tensor) -> tuple[Tensor | float, Tensor, Tensor | float, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at model-scale ``sigma'`` (:func:`edm_official_preconditioning`)."""
        return edm_official_preconditioning(self.precond, sigma_model, self.precond_kwargs, self._u)

    def network(self, x: Tensor, c_noise: Tensor) -> Tensor:
        """The raw network ``F(x, c_noise)``: ``x`` cast to the network's dtype, the noise and
        class labels in float32 (as the official mixed precision), output in the network's dtype."""
        labels = None
        if self.label_dim:
            labels = torch.zeros(x.shape[0], self.label_dim, device=x.device, dtype=torch.float32)
            if self.class_label is not None:
                labels[:, self.class_label] = 1
        forward = getattr(self.model, "forward_unet", self.model)
        return forward(x.to(self.dtype), c_noise.to(torch.float32), class_labels=labels, augment_labels=None)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        xm = self.data_range.to_model(x.to(torch.float32))
        sm = self.data_range.sigma_to_model(sigma.to(torch.float32))
        c_skip, c_out, c_in, c_noise = self.preconditioning(sm)
        f = self.network(c_in * xm, c_noise)[:, : x.shape[1]].to(torch.float32)
        return self.data_range.from_model(c_skip * xm + c_out * f).to(x.dtype)

    def config(self) -> dict[str, Any]:
        """The :func:`parse_config` config of this prior (for saving)."""
        return getattr(self, "_config", None) or {}

    def extra_repr(self) -> str:
        return f"precond={self.precond}, data_range={self.data_range}, dtype={self.dtype}"


# ----------------------------------------------------------------------------------
# the family
# ----------------------------------------------------------------------------------

_OPTIONS = {"image_shape", "data_range", "class_label", "sigma_min", "sigma_max"}


def _build(config: Any, options: dict) -> EDMOfficialPrior:
    cfg = parse_config(config)
    options = dict(options)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown nvlabs-edm options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    net = build_network(cfg["network"], cfg["network_kwargs"])
    prior = EDMOfficialPrior(net, cfg["precond"], cfg["precond_kwargs"], **options)
    prior._config = cfg
    return prior


def _describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    assert isinstance(prior, EDMOfficialPrior)
    cfg = prior.config()
    if not cfg:  # built in code: read the network's configuration from its weights
        network, nk = infer_network_kwargs(prior.model.state_dict())
        cfg = parse_config({"precond": prior.precond, "precond_kwargs": prior.precond_kwargs, "network": network,
                            "network_kwargs": nk})
    options: dict[str, Any] = dict(image_shape=list(prior.image_shape), data_range=str(prior.data_range),
                                   class_label=prior.class_label)
    if prior._explicit_sigmas[0] is not None:
        options["sigma_min"] = prior.sigma_min
    if prior._explicit_sigmas[1] is not None:
        options["sigma_max"] = prior.sigma_max
    return cfg, options


def _unwrap(obj: Any, ema: bool) -> dict[str, Tensor] | None:
    """A raw checkpoint's weights as ``model.<...>`` keys, if they are a SongUNet / DhariwalUNet
    (bare, or the state dict of a preconditioner); otherwise ``None``."""
    try:
        state = extract_state_dict(obj, ema=ema)
    except ValueError:
        return None
    state = _bare(state)
    if _network_kind(state) is None:
        return None
    return {f"model.{k}": v for k, v in state.items()}


def _recognizes(state: Mapping[str, Tensor]) -> bool:
    return _network_kind(_bare(state)) is not None


def _infer(state: Mapping[str, Tensor], options: dict) -> dict[str, Any]:
    return infer_config(state, options)


register_family(
    PriorFamily(
        name="nvlabs-edm",
        prior_type=EDMOfficialPrior,
        build=_build,
        describe=_describe,
        network=lambda prior: prior,  # its state dict is the preconditioner's: model.<network keys>
        infer_config=_infer,
        recognizes=_recognizes,
        ignored_keys=frozenset({"u"}),  # iDDPMPrecond's table: recomputed from C_1, C_2, M
        source=SOURCE,
        formats="invdiff .safetensors converted from EDM's .pkl by scripts/edm_pickle_to_safetensors.py; "
                "state dicts (.safetensors, weights-only .pt) of the preconditioner or the bare network",
        unwrap=_unwrap,
    )
)
