"""Loading and saving priors: shipped weights, invdiff safetensors files, and official
``.pt`` checkpoints.

* ``load("ct-phantom-64")`` — a prior shipped in ``invdiff/priors/weights/`` (see
  :func:`available` and :func:`model_card`).
* ``load("my_prior.safetensors")`` — invdiff's own format, written by :func:`save`: the
  network's ``state_dict`` as safetensors plus metadata (``invdiff_format``, ``family``,
  JSON ``config`` and ``options``, ``image_shape``, ``sigma_min``, ``sigma_max``, JSON
  ``card``). A safetensors file without invdiff metadata is read as a plain state dict.
* ``load("ffhq_10m.pt")`` — a checkpoint of a known family (guided-diffusion / ADM),
  read with ``torch.load(path, map_location="cpu", weights_only=True)`` only. The
  configuration is taken from ``config=`` (a preset name, a dict of official flags, or an
  :class:`~invdiff.priors.adm.ADMConfig`) or inferred from the key names and shapes.

Loading never executes code from a file and never downloads anything: a missing name or
path raises :class:`FileNotFoundError` naming the file expected and where to put it.

New checkpoint families plug in with :func:`register_family`.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import Tensor, nn

from ..files import atomic_file, check_output
from .adm import PRESET_OPTIONS, ADMConfig, ADMPrior, GuidedDiffusionUNet, get_named_beta_schedule
from .base import DiffusionPrior

__all__ = [
    "PriorFamily",
    "WEIGHTS_DIR",
    "available",
    "convert",
    "families",
    "family_of",
    "get_family",
    "inspect",
    "jsonable",
    "load",
    "parse_dtype",
    "model_card",
    "register_family",
    "save",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
FORMAT_VERSION = "1"
_TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
_SUFFIXES = (".safetensors",) + _TORCH_SUFFIXES
# wrappers around the state dict in training checkpoints, most preferred first
_EMA_KEYS = ("ema", "ema_model", "model_ema", "ema_state_dict", "state_dict_ema")
_MODEL_KEYS = ("state_dict", "model_state_dict", "model", "net", "network", "params")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "net.")
_EMA_PREFIXES = ("ema.", "model_ema.", "ema_model.")
_SHOW = 5  # keys shown per kind of mismatch


# ----------------------------------------------------------------------------------
# the family registry
# ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriorFamily:
    """How to rebuild one kind of prior from a config, and to describe it for saving.

    :param name: family name stored in the ``family`` metadata field.
    :param prior_type: the :class:`DiffusionPrior` subclass :func:`save` accepts.
    :param build: ``build(config, options) -> prior`` with random weights; ``config`` is
        whatever :func:`load` got (``config=``, the file's JSON config, or the result of
        ``infer_config``), ``options`` the adapter keywords (``image_shape``, …).
    :param describe: ``describe(prior) -> (config, options)``, both JSON-serialisable and
        accepted by ``build``.
    :param network: ``network(prior) -> nn.Module`` whose ``state_dict`` is the file.
    :param infer_config: ``infer_config(state_dict, options) -> config`` for files
        without a config, or ``None`` if the family cannot infer one.
    :param recognizes: ``recognizes(state_dict) -> bool``, to pick the family of a raw
        checkpoint when ``family=`` is not given.
    :param ignored_keys: keys other tools add to this family's state dicts that carry no
        weights (dropped on loading).
    :param source: where the architecture and key layout come from (repository and file),
        for the model card and ``invdiff list priors --file``.
    :param formats: the file formats the family reads, in words (for messages and cards).
    :param unwrap: ``unwrap(obj, ema) -> state_dict | None``: the family's own reading of a
        raw ``torch.load`` result (e.g. score-SDE's EMA, a list of tensors in parameter
        order), tried before the generic :func:`extract_state_dict`; ``None`` when the
        object is not of this family.
    :param recognizes_folder: ``recognizes_folder(path) -> bool`` for a model folder, or for a
        file of one that the family reads with its folder (a diffusers weights file).
    :param read_folder: ``read_folder(path) -> (state_dict, config, options)`` of a model
        folder (or such a file) the family recognises (e.g. a diffusers ``UNet2DModel`` folder).
    """

    name: str
    prior_type: type
    build: Callable[[Any, dict], DiffusionPrior]
    describe: Callable[[DiffusionPrior], tuple[dict, dict]]
    network: Callable[[DiffusionPrior], nn.Module]
    infer_config: Callable[[Mapping[str, Tensor], dict], Any] | None = None
    recognizes: Callable[[Mapping[str, Tensor]], bool] | None = None
    ignored_keys: frozenset[str] = frozenset()
    source: str = ""
    formats: str = ""
    unwrap: Callable[[Any, bool], dict[str, Tensor] | None] | None = None
    recognizes_folder: Callable[[Path], bool] | None = None
    read_folder: Callable[[Path], tuple[dict[str, Tensor], Any, dict]] | None = None


_FAMILIES: dict[str, PriorFamily] = {}


def register_family(family: PriorFamily) -> None:
    """Make a checkpoint family known to :func:`load` and :func:`save` (replaces any
    family of the same name)."""
    _FAMILIES[family.name] = family


def families() -> list[str]:
    """Names of the registered checkpoint families."""
    return sorted(_FAMILIES)


def get_family(name: str) -> PriorFamily:
    """The registered checkpoint family called ``name`` (``ValueError`` naming the known ones)."""
    if name not in _FAMILIES:
        raise ValueError(f"unknown prior family {name!r}; known: {', '.join(families())}")
    return _FAMILIES[name]


def family_of(prior: DiffusionPrior, exclude: tuple[str, ...] = ()) -> PriorFamily | None:
    """The first registered family (not in ``exclude``) whose prior type ``prior`` is, or ``None``."""
    return next((f for f in _FAMILIES.values() if f.name not in exclude and isinstance(prior, f.prior_type)), None)


# --- guided-diffusion / ADM -----------------------------------------------------------

_ADM_OPTIONS = {"image_shape", "schedule", "num_timesteps", "rescale_timesteps", "clip", "sigma_data", "data_range"}


def _adm_schedule(diffusion: Mapping[str, Any]) -> dict[str, Any]:
    """ADMPrior options from diffusion flags: guided-diffusion's ``noise_schedule`` /
    ``diffusion_steps`` / ``rescale_timesteps``, or DDS's ``beta_schedule`` ("linear" only,
    ``np.linspace(beta_start, beta_end, num_diffusion_timesteps)`` as its ``get_beta_schedule``)."""
    if diffusion.get("predict_xstart"):
        raise ValueError("x0-predicting ADM models (predict_xstart=True) are not supported; ADMPrior needs ε")
    options: dict[str, Any] = {}
    if "noise_schedule" in diffusion:
        options["schedule"] = diffusion["noise_schedule"]
    if "diffusion_steps" in diffusion:
        options["num_timesteps"] = int(diffusion["diffusion_steps"])
    if "rescale_timesteps" in diffusion:
        options["rescale_timesteps"] = bool(diffusion["rescale_timesteps"])
    if "beta_schedule" in diffusion:
        if diffusion["beta_schedule"] != "linear":
            raise ValueError(f"beta_schedule {diffusion['beta_schedule']!r} is not supported (DDS's configs use 'linear')")
        steps = int(diffusion.get("num_diffusion_timesteps", 1000))
        start, end = float(diffusion.get("beta_start", 1e-4)), float(diffusion.get("beta_end", 0.02))
        betas = np.linspace(start, end, steps, dtype=np.float64)
        if np.array_equal(betas, get_named_beta_schedule("linear", 1000)):
            options.update(schedule="linear", num_timesteps=1000)
        else:
            options["schedule"] = betas.tolist()
    return options


def _adm_parse(config: Any) -> tuple[ADMConfig, dict]:
    """``config`` (ADMConfig, preset name, or dict of flags) -> (ADMConfig, options)."""
    if isinstance(config, ADMConfig):
        return config, {}
    if isinstance(config, str):
        return ADMConfig.preset(config), dict(PRESET_OPTIONS.get(config, {}))
    if isinstance(config, Mapping):
        net, diffusion = ADMConfig.from_flags(config)
        return net, _adm_schedule(diffusion)
    raise TypeError(f"ADM config must be an ADMConfig, a preset name or a dict, got {type(config).__name__}")


def _adm_build(config: Any, options: dict) -> ADMPrior:
    cfg, from_flags = _adm_parse(config)
    options = {**from_flags, **options}
    unknown = set(options) - _ADM_OPTIONS
    if unknown:
        raise TypeError(f"unknown ADMPrior options {sorted(unknown)}; known: {sorted(_ADM_OPTIONS)}")
    image_shape = options.pop("image_shape", None)
    return ADMPrior(GuidedDiffusionUNet(cfg), image_shape, **options)


def _adm_describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    assert isinstance(prior, ADMPrior)
    if not isinstance(prior.model, GuidedDiffusionUNet):
        raise ValueError(
            f"can only save an ADMPrior around a GuidedDiffusionUNet, not {type(prior.model).__name__}"
        )
    schedule: Any = prior.schedule if prior.schedule is not None else prior.betas.tolist()
    options = dict(
        image_shape=list(prior.image_shape),
        schedule=schedule,
        num_timesteps=prior.num_timesteps,
        rescale_timesteps=prior.rescale_timesteps,
        clip=prior.clip,
        sigma_data=prior.sigma_data,
        data_range=str(prior.data_range),
    )
    return prior.model.config.to_dict(), options


def _adm_infer(state_dict: Mapping[str, Tensor], options: dict) -> ADMConfig:
    given: dict[str, Any] = {}
    shape = options.get("image_shape")
    if shape is not None and shape[-1] == shape[-2]:
        given["image_size"] = int(shape[-1])
    cfg = ADMConfig.infer_from_state_dict(state_dict, **given)
    if given and ADMConfig.infer_from_state_dict(state_dict).attention_ds != cfg.attention_ds:
        cfg = ADMConfig.infer_from_state_dict(state_dict)  # size does not divide the ds values
    return cfg


def _adm_recognizes(state_dict: Mapping[str, Tensor]) -> bool:
    return all(k in state_dict for k in ("time_embed.0.weight", "input_blocks.0.0.weight", "out.2.weight"))


register_family(
    PriorFamily(
        name="adm",
        prior_type=ADMPrior,
        build=_adm_build,
        describe=_adm_describe,
        network=lambda prior: prior.model,
        infer_config=_adm_infer,
        recognizes=_adm_recognizes,
        # deepinv's DiffUNet registers its schedule as buffers next to the official weights
        ignored_keys=frozenset({"sqrt_alphas_cumprod", "sqrt_1m_alphas_cumprod"}),
        source="openai/guided-diffusion guided_diffusion/unet.py UNetModel (also DPS, DDS, deepinv DiffUNet)",
        formats=".pt/.pth/.ckpt (weights-only torch.save of the state dict), .safetensors",
    )
)


# ----------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------


def available() -> list[str]:
    """Names of the priors shipped in ``invdiff/priors/weights/`` (for :func:`load`)."""
    if not WEIGHTS_DIR.is_dir():
        return []
    return sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))


def _resolve(name_or_path: str | os.PathLike) -> Path:
    text = os.fspath(name_or_path)
    path = Path(text).expanduser()
    is_path = (
        isinstance(name_or_path, os.PathLike)
        or "/" in text
        or os.sep in text
        or path.suffix.lower() in _SUFFIXES
        or path.exists()
    )
    if is_path:
        if not (path.is_file() or path.is_dir()):
            raise FileNotFoundError(
                f"no checkpoint at {path.resolve()}: put the .safetensors/.pt/.pth/.ckpt/.bin file (or the model "
                f"folder) there (invdiff never downloads weights)"
            )
        return path
    shipped = WEIGHTS_DIR / f"{text}.safetensors"
    if not shipped.is_file():
        names = ", ".join(available()) or "none"
        raise FileNotFoundError(
            f"no shipped prior named {text!r}: expected {shipped} (put the .safetensors file there, "
            f"or pass the path of your own checkpoint); shipped: {names}"
        )
    return shipped


def _read_safetensors(path: Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as err:  # SafetensorError and friends: a corrupt or truncated file
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({err})") from err
    return state, metadata


_CONVERT = ("to convert a file you trust, load it in your own trusted environment and save model.state_dict() "
            "with safetensors.torch.save_file (or torch.save(model.state_dict(), path))")


def _one_line(text: Any) -> str:
    return " ".join(str(text).split())


def _torch_reason(err: BaseException) -> str:
    """The one informative line of torch's weights-only refusal (``Unsupported global: ...``,
    ``Unsupported operand 147``), without its advice to re-run with ``weights_only=False``."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.startswith("Unsupported") or "Unsupported global" in ln or "unsupported GLOBAL" in ln:
            reason = ln.split("WeightsUnpickler error:")[-1].strip()
            # keep what was refused, not torch's advice on how to allow it
            return reason.split(" was not an allowed global")[0] + (" (not an allowed global)" if
                                                                     " was not an allowed global" in reason else "")
    for k, ln in enumerate(lines):  # "WeightsUnpickler error: <reason>" (the reason may be on the next line)
        if "WeightsUnpickler error" in ln:
            rest = ln.split("WeightsUnpickler error:")[-1].strip()
            return rest or (lines[k + 1] if k + 1 < len(lines) else "")
    first = lines[0] if lines else type(err).__name__
    return "" if "weights only load failed" in first.lower() else first


def _read_torch(path: Path) -> Any:
    """``torch.load(weights_only=True)``: never unpickles code; every failure is one line."""
    try:
        with warnings.catch_warnings():  # torch's multi-line notes on the pickle protocol: the error says it
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        reason = _torch_reason(err)
        if re.search(r"Unsupported global|Unsupported class|GLOBAL |unrecognized function", str(err), re.I):
            raise ValueError(
                f"{path}: refused to load: not a weights-only checkpoint, it holds pickled Python objects"
                f"{' (' + reason + ')' if reason else ''}; invdiff never unpickles (it reads .pt/.pth/.ckpt files "
                f"only with torch.load(weights_only=True)); {_CONVERT}"
            ) from None
        with open(path, "rb") as f:
            head = f.read(2)
        if head[:1] == b"\x80":  # pickle's PROTO opcode: a plain pickle, not torch's zip format
            raise ValueError(
                f"{path}: refused to load: not a weights-only checkpoint, it is a plain Python pickle "
                f"(protocol {head[1] if len(head) > 1 else '?'}); invdiff never unpickles; {_CONVERT}"
            ) from None
        raise ValueError(
            f"{path}: corrupt or truncated checkpoint, or not a weights-only one: torch.load(weights_only=True) "
            f"cannot read it{' (' + reason + ')' if reason else ''}; invdiff never unpickles; {_CONVERT}"
        ) from None
    except Exception as err:
        raise ValueError(f"{path}: corrupt or truncated checkpoint, or not a weights-only one ({type(err).__name__}: "
                         f"{_one_line(_torch_reason(err) or err)}); invdiff never unpickles; {_CONVERT}") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(isinstance(v, Tensor) for v in obj.values())


def extract_state_dict(obj: Any, ema: bool = True) -> dict[str, Tensor]:
    """The weights of a training checkpoint as a flat ``{key: tensor}`` dict.

    Unwraps ``{"state_dict": ...}``, ``{"model": ...}``, … (an EMA copy — ``"ema"``,
    ``"model_ema"``, … or ``ema.``-prefixed keys — is preferred when ``ema``), drops
    non-tensor entries and strips ``module.`` / ``_orig_mod.`` / ``model.`` prefixes that
    every key shares.
    """
    for _ in range(4):
        if not isinstance(obj, Mapping) or _is_state_dict(obj):
            break
        keys = (_EMA_KEYS if ema else ()) + _MODEL_KEYS
        inner = next((obj[k] for k in keys if isinstance(obj.get(k), Mapping) and obj[k]), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a state dict (a mapping of tensors), found {type(obj).__name__}")
    state = {str(k): v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    for prefix in _EMA_PREFIXES:  # flat dicts with an EMA copy next to the raw weights
        copy = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if copy and len(copy) < len(state):
            state = copy if ema else {k: v for k, v in state.items() if not k.startswith(prefix)}
            state = {k: v for k, v in state.items() if v.is_floating_point()}  # drop decay/num_updates
            break
    changed = True
    while changed:
        changed = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                changed = True
    return state


def _check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str, what: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return

    def listing(label: str, items: list[str]) -> str:
        more = f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
        return f"{len(items)} {label}: {', '.join(items[:_SHOW])}{more}"

    parts = []
    if missing:
        parts.append(listing("missing keys", missing))
    if unexpected:
        parts.append(listing("unexpected keys", unexpected))
    if shapes:
        parts.append(listing("shape mismatches", shapes))
    raise ValueError(f"{source}: the weights do not match {what}: " + "; ".join(parts)
                     + "; pass the checkpoint's config= (a preset name or a dict of flags), or check family=")


def _metadata_json(metadata: Mapping[str, str], key: str, path: Path, default: Any = None) -> Any:
    if key not in metadata:
        return default
    try:
        return json.loads(metadata[key])
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata field {key!r} is not valid JSON ({err})") from err

# ----------------------------------------------------------------------------------
# reading a checkpoint: file or folder -> family, state dict, config, options
# ----------------------------------------------------------------------------------


@dataclass
class _Checkpoint:
    path: Path
    family: PriorFamily
    state: dict[str, Tensor]
    config: Any
    options: dict[str, Any]
    metadata: dict[str, str]
    config_inferred: bool = False


def _folder_family(path: Path) -> PriorFamily | None:
    return next((f for f in _FAMILIES.values() if f.recognizes_folder and f.read_folder and f.recognizes_folder(path)),
                None)


def _supported() -> str:
    return "; ".join(f"{f.name} ({f.formats})" if f.formats else f.name for f in _FAMILIES.values())


def _prepare(name_or_path: str | os.PathLike, family: str | None, config: Any, ema: bool,
             kwargs: Mapping[str, Any]) -> _Checkpoint:
    """Everything :func:`load` and :func:`inspect` need before building the network."""
    path = _resolve(name_or_path)
    metadata: dict[str, str] = {}
    options = dict(kwargs)
    fam: PriorFamily | None = get_family(family) if family else None
    # a model folder, or a file its family claims (a diffusers folder's weights file)
    folder = path if path.is_dir() or _folder_family(path) else None
    if folder is not None:
        folder_fam = fam if fam and fam.read_folder else _folder_family(folder)
        if folder_fam is None:
            raise ValueError(f"{folder}: not a model folder invdiff can read; it reads the files of: {_supported()}")
        try:
            state, folder_config, folder_options = folder_fam.read_folder(folder)
        except FileNotFoundError as err:
            raise ValueError(f"{folder}: {_one_line(err)}") from None
        fam, path = folder_fam, folder
        options = {**folder_options, **options}
        config = folder_config if config is None else config
    else:
        if path.suffix.lower() == ".safetensors":
            state, metadata = _read_safetensors(path)
        else:
            state = _read_torch(path)
        if metadata.get("invdiff_format"):
            if metadata["invdiff_format"] != FORMAT_VERSION:
                raise ValueError(
                    f"{path}: invdiff format version {metadata['invdiff_format']} is not supported "
                    f"(this invdiff reads version {FORMAT_VERSION})"
                )
            if fam is None and metadata.get("family"):
                fam = get_family(metadata["family"])
            options = {**_metadata_json(metadata, "options", path, {}), **options}
            if config is None:
                config = _metadata_json(metadata, "config", path)
        else:
            unwrapped = None
            for candidate in ([fam] if fam else list(_FAMILIES.values())):
                if candidate.unwrap is not None:
                    unwrapped = candidate.unwrap(state, ema)
                    if unwrapped is not None:
                        fam = candidate
                        break
            try:
                state = unwrapped if unwrapped is not None else extract_state_dict(state, ema=ema)
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from None
    if fam is None:
        fam = next((f for f in _FAMILIES.values() if f.recognizes and f.recognizes(state)), None)
        if fam is None:
            keys = ", ".join(list(state)[:3])
            raise ValueError(
                f"{path}: cannot tell which model family these weights belong to ({len(state)} tensors: {keys}, ...); "
                f"invdiff reads: {_supported()}; pass family= and config="
            )
    state = {k: v for k, v in state.items() if k not in fam.ignored_keys}
    inferred = False
    if config is None:
        if fam.infer_config is None:
            raise ValueError(f"{path}: no config in the file and family {fam.name!r} cannot infer one; pass config=")
        try:
            config = fam.infer_config(state, options)
        except (ValueError, KeyError) as err:
            raise ValueError(f"{path}: cannot infer the {fam.name} configuration from the weights "
                             f"({_one_line(err)})") from None
        inferred = True
    if options.get("image_shape") is not None:
        options["image_shape"] = tuple(int(s) for s in options["image_shape"])
    return _Checkpoint(path, fam, state, config, options, metadata, inferred)


def _shown(config: Any) -> str:
    shown = repr(config)
    return shown if len(shown) <= 300 else shown[:300] + "...}"


def _build(ckpt: _Checkpoint) -> tuple[DiffusionPrior, nn.Module]:
    """The prior on the meta device (no memory, no random initialisation), its network
    checked against the file's keys and shapes."""
    try:
        with torch.device("meta"):
            prior = ckpt.family.build(ckpt.config, ckpt.options)
    except (ValueError, TypeError) as err:
        reason = _one_line(err)
        hint = "" if "pass " in reason else "; pass the checkpoint's config= (e.g. its official flags)"
        raise ValueError(f"{ckpt.path}: cannot build the {ckpt.family.name} model ({reason}){hint}") from None
    network = ckpt.family.network(prior)
    _check_state_dict(network, ckpt.state, str(ckpt.path), f"the {ckpt.family.name} model of config {_shown(ckpt.config)}")
    return prior, network


def _needs_real_build(prior: nn.Module, network: nn.Module) -> bool:
    """True when the meta-built prior holds tensors the file does not restore (non-persistent
    buffers, or tensors of the adapter outside the network)."""
    if any(t.is_meta for t in list(prior.parameters()) + list(prior.buffers())):
        return True
    return any(m._non_persistent_buffers_set for m in network.modules())


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A network dtype from ``torch.float16`` or a name (``"fp16"``, ``"bf16"``, ``"float32"``...);
    ``None`` or ``"file"`` returns ``None`` (the checkpoint's own dtype)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key in ("file", "auto"):
        return None
    if key not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(sorted(_DTYPES))} or 'file', got {dtype!r}")
    return _DTYPES[key]


def _file_dtype(state: Mapping[str, Tensor]) -> torch.dtype:
    """The dtype of most floating-point values in ``state`` (float32 if none)."""
    counts: dict[torch.dtype, int] = {}
    for v in state.values():
        if v.is_floating_point():
            counts[v.dtype] = counts.get(v.dtype, 0) + v.numel()
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def jsonable(value: Any) -> Any:
    """``value`` as plain JSON data: configs with ``to_dict()``, numpy arrays and scalars as
    lists and numbers, anything else JSON cannot hold as its ``str``."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()

    def default(obj: Any) -> Any:
        return obj.tolist() if isinstance(obj, (np.ndarray, np.generic)) else str(obj)

    try:
        return json.loads(json.dumps(value, default=default))
    except (TypeError, ValueError):
        return str(value)


def _card(ckpt: _Checkpoint, prior: DiffusionPrior | None, network: nn.Module) -> dict[str, Any]:
    """What a checkpoint is: family, source, parameterisation, data range, config, sizes."""
    fam = ckpt.family
    card: dict[str, Any] = {}
    if ckpt.metadata.get("invdiff_format"):
        card.update(_metadata_json(ckpt.metadata, "card", ckpt.path, {}) or {})
    card.update(family=fam.name, source=fam.source, formats=fam.formats)
    if prior is not None:
        card.update(
            parameterisation=prior.parameterisation,
            data_range=str(prior.data_range),
            data_convention=prior.data_range.describe(),
            image_shape=list(prior.image_shape),
            any_size=prior.any_size,
            sigma_min=prior.sigma_min,
            sigma_max=prior.sigma_max,
        )
    card.update(
        config=jsonable(ckpt.config),
        config_source="inferred from the weights' key names and shapes" if ckpt.config_inferred else "given",
        parameters=sum(v.numel() for v in ckpt.state.values() if v.is_floating_point()),
        file_dtype=str(_file_dtype(ckpt.state)).removeprefix("torch."),
        file=str(ckpt.path),
    )
    params = [p for p in network.parameters() if p.is_floating_point()]
    if params and not params[0].is_meta:
        card["dtype"] = str(params[0].dtype).removeprefix("torch.")
    return card


def inspect(name_or_path: str | os.PathLike, *, family: str | None = None, config: Any = None, ema: bool = True,
            **kwargs: Any) -> dict[str, Any]:
    """What a checkpoint is, without loading its weights into a network: the model card that
    :func:`load` would attach (family, source, parameterisation, data range, image shape,
    noise range, config and whether it was inferred, parameter count, the file's dtype).
    The network is built on the meta device (no memory) and checked against the file's keys
    and shapes, so a file :func:`load` would refuse raises the same one-line error here.

    ``invdiff list priors --file PATH`` prints it.

    Example::

        >>> card = inspect("ct-phantom-64")
        >>> card["family"], card["data_range"], card["image_shape"]
        ('edm', '[0, 1]', [1, 64, 64])
    """
    ckpt = _prepare(name_or_path, family, config, ema, kwargs)
    prior, network = _build(ckpt)
    return _card(ckpt, prior, network)


# ----------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------


def load(
    name_or_path: str | os.PathLike,
    *,
    family: str | None = None,
    config: Any = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str | None = torch.float32,
    ema: bool = True,
    trainable: bool = False,
    **kwargs: Any,
) -> DiffusionPrior:
    """Load a prior by shipped name, from a file or from a model folder; never downloads,
    never unpickles code.

    :param name_or_path: a name from :func:`available`, the path of a ``.safetensors``
        file (invdiff's format, or a bare state dict) or a ``.pt``/``.pth``/``.ckpt``/``.bin``
        checkpoint (read with ``torch.load(weights_only=True)``), or a model folder of a
        family that reads folders (a diffusers ``UNet2DModel`` folder).
    :param family: checkpoint family (see :func:`families` and the README's table); read
        from the file's metadata or recognised from the key names when not given.
    :param config: the network configuration, as the family's official flags: for
        ``"adm"`` a preset name (``"ffhq_10m"``, ``"imagenet256_uncond"``,
        ``"dds_aapm256"``, ``"dds_fastmri320"``), a dict of official flags (verbatim: a
        DPS ``model_config.yaml`` or DDS's YAML sections) or an ``ADMConfig``. By default
        the file's own config, else inferred from the weights (ADM: number of attention
        heads assumed 64 channels per head, see :meth:`ADMConfig.infer_from_state_dict`).
    :param device: where the prior lives.
    :param dtype: dtype the network runs in (``torch.float16``, ``"bf16"``...; ``None``
        or ``"file"``: the checkpoint's own dtype). Inputs and outputs of ``denoise`` keep
        theirs, and the adapter's noise arithmetic stays in the caller's float32, so a
        sampler works in float32 around a half-precision network.
    :param ema: prefer the EMA weights of a training checkpoint that holds both.
    :param kwargs: adapter options, overriding the file's (ADM: ``image_shape``,
        ``schedule``, ``num_timesteps``, ``rescale_timesteps``, ``clip``, ``sigma_data``,
        ``data_range``; every family takes ``data_range``: ``"[-1, 1]"``, ``"[0, 1]"`` or
        ``"complex-max"``, see :class:`~invdiff.priors.conventions.DataRange`).
    :param trainable: return the weights with ``requires_grad`` True, for fine-tuning the
        prior (deepinv's ``Trainer``, unrolled networks; see ``Sampler.differentiable``).
        The default, False, freezes them: sampling then keeps no graph of the weights
        during guidance, and an optimiser built from a model that contains the prior does
        not silently change it.
    :returns: the prior in eval mode, weights frozen unless ``trainable``; ``prior.card``
        says what it is (family, source, parameterisation, data range, config, dtype;
        :func:`inspect` gives the same without loading).
    :raises FileNotFoundError: unknown name or missing path (the message names the file
        expected and where to put it).
    :raises ValueError: corrupt or truncated file, a pickle with arbitrary objects, or
        weights that do not match the configuration (missing / unexpected keys and shape
        mismatches are listed).

    Example::

        >>> from invdiff.priors import load                        # doctest: +SKIP
        >>> prior = load("ffhq_10m.pt", config="ffhq_10m")         # doctest: +SKIP
        >>> prior = load("aapm_ct.pt", image_shape=(1, 256, 256))  # doctest: +SKIP
    """
    ckpt = _prepare(name_or_path, family, config, ema, kwargs)
    prior, network = _build(ckpt)
    network.to_empty(device="cpu")
    if _needs_real_build(prior, network):  # constants the file does not hold: build them for real
        prior = ckpt.family.build(ckpt.config, ckpt.options)
        network = ckpt.family.network(prior)
    try:
        network.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as err:  # torch's multi-line report (e.g. a dtype it cannot copy)
        raise ValueError(f"{ckpt.path}: the weights do not load into the {ckpt.family.name} model: {_one_line(err)}") from None
    run_dtype = parse_dtype(dtype) or _file_dtype(ckpt.state)
    prior.to(device)
    if run_dtype != torch.float32:
        network.to(run_dtype)
    prior.card = _card(ckpt, prior, network)
    # frozen for inference: samplers differentiate w.r.t. the image only, so no graph is kept for
    # the weights (call prior.requires_grad_(True) to fine-tune)
    return prior.eval().requires_grad_(bool(trainable))


def save(prior: DiffusionPrior, path: str | os.PathLike, card: Mapping[str, Any] | None = None) -> Path:
    """Write ``prior`` as an invdiff ``.safetensors`` file that :func:`load` reads back.

    The network's ``state_dict`` is stored (in its dtype, on the CPU) with metadata:
    ``invdiff_format``, ``family``, JSON ``config`` and ``options``, ``image_shape``,
    ``sigma_min``, ``sigma_max`` and the free-form model ``card`` (JSON; e.g. data,
    size, training steps, loss, the command that trained it). The file is written to a
    temporary file in the same folder and moved into place with :func:`os.replace`, so a
    crash never leaves a half-written file under ``path``.

    :returns: the path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"save writes .safetensors files; got {path.name}")
    fam = next((f for f in _FAMILIES.values() if isinstance(prior, f.prior_type)), None)
    if fam is None:
        raise ValueError(
            f"no registered family saves {type(prior).__name__} (families: {', '.join(families())}); "
            f"see register_family"
        )
    config, options = fam.describe(prior)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in fam.network(prior).state_dict().items()}
    metadata = {
        "invdiff_format": FORMAT_VERSION,
        "family": fam.name,
        "config": json.dumps(config),
        "options": json.dumps(options),
        "image_shape": json.dumps(list(prior.image_shape)),
        "sigma_min": repr(prior.sigma_min),
        "sigma_max": repr(prior.sigma_max),
        "card": json.dumps(dict(card or {})),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:  # a weights file is world-readable like any other
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def _own_prior_file(path: Path) -> str | None:
    """``None`` if ``path`` is an invdiff prior file (which :func:`convert` may replace), else why not."""
    if path.suffix.lower() != ".safetensors" or not path.is_file():
        return "not an invdiff .safetensors prior"
    try:
        _, metadata = _read_safetensors(path, tensors=False)
    except ValueError:
        return "not a readable safetensors file"
    return None if metadata.get("invdiff_format") else "a safetensors file without invdiff metadata"


def convert(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    family: str | None = None,
    config: Any = None,
    ema: bool = True,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    card: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> Path:
    """Load an outside checkpoint once, with its config and adapter options, and write it as
    an invdiff ``.safetensors`` file (:func:`save`) that every command then loads by path with
    nothing more to say (``invdiff reconstruct --prior OUT``, ``invdiff bench --prior OUT``).

    The file keeps the family, the config, the options (``data_range`` included) and the
    model card, plus ``converted_from``; the weights keep the source's dtype unless ``dtype``
    says otherwise. ``out`` never replaces the source, nor a file that is not an invdiff
    prior; it is written atomically. ``invdiff convert`` is the command line.

    Example::

        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> path = convert("ct-phantom-64", folder / "copy.safetensors")
        >>> load(path).card["converted_from"].endswith("ct-phantom-64.safetensors")
        True
    """
    ckpt_path = _resolve(source)
    out = check_output(out, inputs=[ckpt_path], overwrite=overwrite, own=_own_prior_file, flag="out")
    if out.suffix != ".safetensors":
        raise ValueError(f"out {out.name}: convert writes .safetensors files")
    prior = load(ckpt_path, family=family, config=config, ema=ema, dtype=dtype, **kwargs)
    keep = {k: v for k, v in prior.card.items() if k not in ("file", "dtype", "config_source")}
    return save(prior, out, card={**keep, "converted_from": str(ckpt_path), **dict(card or {})})


def model_card(name_or_path: str | os.PathLike) -> dict[str, Any]:
    """The model card of a shipped prior (or of an invdiff ``.safetensors`` file).

    Returns the card saved with the weights, plus ``family``, ``image_shape``,
    ``sigma_min``, ``sigma_max`` and ``file`` where the card does not set them. Only the
    file header is read.
    """
    path = _resolve(name_or_path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: only invdiff .safetensors files carry a model card")
    _, metadata = _read_safetensors(path, tensors=False)
    if not metadata.get("invdiff_format"):
        raise ValueError(f"{path}: not an invdiff prior file (no invdiff_format metadata)")
    card = dict(_metadata_json(metadata, "card", path, {}))
    card.setdefault("family", metadata.get("family"))
    card.setdefault("image_shape", _metadata_json(metadata, "image_shape", path))
    if "sigma_min" in metadata:
        card.setdefault("sigma_min", float(metadata["sigma_min"]))
    if "sigma_max" in metadata:
        card.setdefault("sigma_max", float(metadata["sigma_max"]))
    card.setdefault("file", str(path))
    return card

