r"""The benchmark grid: task, sampler and prior specifications, cells, and their seeds.

A grid is the product ``priors x tasks x images x seeds x samplers``; each element is a
:class:`Cell`. Specifications come from the command line
(``"ct-sparse-30:noise_sigma=0.02"`` — a registry name, then ``:key=value`` overrides whose
values are read as TOML literals) or from a TOML file (tables with ``name``, an optional
``label`` and the overrides).

**Identity.** A cell's ``cell_id`` is the first 20 hex digits of the SHA-256 of the
canonical JSON of everything that determines its numbers: the prior's hash, the task's
full parameter record (``physics.task``), the sampler's name and full parameters (its
constructor defaults merged with the overrides), the image id and the SHA-256 of the image
tensor, the seed, and the precision of the prior's network when it is not float32
(``dtype``: a bf16 cell is another cell; ``compile`` changes no number beyond rounding and is
not part of it). Re-running the same command therefore finds the same ids, and a
changed parameter gives new cells instead of silently reusing old numbers.

**Seeds.** With :math:`h(\cdot)` the SHA-256 of canonical JSON read as an integer modulo
:math:`2^{63}`:

.. math::

    s_\text{measure} = h(\text{"measurement"}, \text{task record}, \text{image id}, s),
    \qquad
    s_\text{sampler} = h(\text{"sampler"}, s).

The measurement noise depends on the task, the image and the seed but not on the sampler
or the prior, so every sampler is scored on identical measurements; it is drawn on the CPU
(``physics(x, seed=s_measure)``), so it is the same on every device and rank. The sampler's
generator depends on the seed only ("common random numbers": every sampler starts each
task and image from the same random state), which is what lets
:class:`~invdiff.bench.SeededSampler` reproduce a bench cell inside ``deepinv.test``.

>>> parse_spec("ct-sparse-30:noise_sigma=0.02:fbp_filter=hann")
('ct-sparse-30', {'noise_sigma': 0.02, 'fbp_filter': 'hann'})
>>> split_list("dps,ct-sparse-30:angles=[1, 2],mri-4x")
['dps', 'ct-sparse-30:angles=[1, 2]', 'mri-4x']
>>> derive_seed("sampler", 0) == derive_seed("sampler", 0) != derive_seed("sampler", 1)
True
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, as the tomli package
    import tomli as tomllib

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..specs import parse_spec

__all__ = [
    "TaskSpec",
    "SamplerSpec",
    "Cell",
    "parse_spec",
    "split_list",
    "parse_seeds",
    "task_specs",
    "sampler_specs",
    "derive_seed",
    "canonical_json",
    "tensor_hash",
    "sampler_params",
    "load_toml",
    "RESERVED_TASK_KEYS",
]

#: Task keys set by the benchmark itself (the image size comes from the prior).
RESERVED_TASK_KEYS = ("img_size", "device")


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the text every hash and id is computed on."""
    return json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"), allow_nan=True)


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors, tuples, paths and numpy scalars turned into JSON types."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.numel() <= 4096:
            return jsonable(obj.detach().cpu().tolist())
        return f"tensor{tuple(obj.shape)}:sha256={tensor_hash(obj)[:16]}"
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy scalar
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    return repr(obj)


def derive_seed(*parts: Any) -> int:
    """A seed in ``[0, 2**63)`` from the SHA-256 of the canonical JSON of ``parts``."""
    digest = hashlib.sha256(canonical_json(list(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


def tensor_hash(x: torch.Tensor) -> str:
    """SHA-256 of a tensor's dtype, shape and bytes (as stored on the CPU, contiguous)."""
    t = x.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.is_complex():
        t = torch.view_as_real(t)
    h.update(t.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------- parsing
def split_list(text: str) -> list[str]:
    """Split a comma-separated list, ignoring commas inside brackets or quotes."""
    items, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{(":
            depth += 1
        elif ch in "]})":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur).strip())
    return [i for i in items if i]


def _label(name: str, overrides: Mapping[str, Any]) -> str:
    if not overrides:
        return name
    return name + "".join(f":{k}={canonical_json(v).strip(chr(34))}" for k, v in overrides.items())


@dataclass(frozen=True)
class TaskSpec:
    """A registry task with overrides (``operators.make(name, **overrides)``) and a display label."""

    name: str
    overrides: dict = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        bad = sorted(set(self.overrides) & set(RESERVED_TASK_KEYS))
        if bad:
            raise ValueError(f"task {self.name!r}: {bad} are set by the benchmark (the image size is the prior's)")
        if not self.label:
            object.__setattr__(self, "label", _label(self.name, self.overrides))

    @property
    def family(self) -> str:
        """``"mri"`` for MRI tasks (metrics over the ground truth's range), else ``"image"``."""
        from ..operators import task_info

        return "mri" if task_info(self.name).metric_range == "data" else "image"


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler with overrides (``samplers.make(name, prior, **overrides)``) and a label.

    ``prior`` (also given as the override ``prior=NAME``: ``"resample:prior=ct-phantom-latent-64"``)
    is the sampler's own prior, used instead of the grid's (a latent sampler on a latent prior
    trained on the same data); the grid's prior still chooses the images and the size, and the
    cells record both priors' hashes.
    """

    name: str
    overrides: dict = field(default_factory=dict)
    label: str = ""
    prior: Any = None

    def __post_init__(self) -> None:
        if not self.label:
            object.__setattr__(self, "label", _label(self.name, self.overrides))
        if "prior" in self.overrides:
            if self.prior is not None:
                raise ValueError(f"sampler {self.name!r}: its prior is given twice")
            rest = dict(self.overrides)
            object.__setattr__(self, "prior", rest.pop("prior"))
            object.__setattr__(self, "overrides", rest)


def _specs(items: str | Sequence[Any], kind: type, what: str) -> list:
    if isinstance(items, str):
        items = split_list(items)
    out = []
    for item in items:
        if isinstance(item, kind):
            out.append(item)
        elif isinstance(item, str):
            name, overrides = parse_spec(item)
            out.append(kind(name, overrides))
        elif isinstance(item, Mapping):
            if "name" not in item:
                raise ValueError(f"a {what} table needs a 'name' key, got {dict(item)}")
            rest = {k: v for k, v in item.items() if k not in ("name", "label")}
            out.append(kind(str(item["name"]), rest, str(item.get("label", ""))))
        else:
            raise ValueError(f"a {what} must be a name, 'name:key=value' or a table, got {item!r}")
    if not out:
        raise ValueError(f"no {what}s given")
    labels = [s.label for s in out]
    dupes = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dupes:
        raise ValueError(f"{what}s given twice: {', '.join(dupes)} (give them distinct labels)")
    return out


def task_specs(items: str | Sequence[Any]) -> list[TaskSpec]:
    """Task specifications from a comma list, names, ``name:key=value`` strings or tables."""
    return _specs(items, TaskSpec, "task")


def sampler_specs(items: str | Sequence[Any]) -> list[SamplerSpec]:
    """Sampler specifications, as :func:`task_specs`."""
    return _specs(items, SamplerSpec, "sampler")


def parse_seeds(seeds: int | str | Sequence[int]) -> list[int]:
    """``3`` -> ``[0, 1, 2]``; ``"3"`` likewise; ``"0,5"`` or ``[0, 5]`` -> those seeds."""
    if isinstance(seeds, str):
        text = seeds.strip()
        seeds = [int(s) for s in split_list(text)] if "," in text else int(text)
    if isinstance(seeds, bool):
        raise ValueError(f"seeds must be a count or a list of integers, got {seeds!r}")
    if isinstance(seeds, int):
        if seeds < 1:
            raise ValueError(f"seeds must be >= 1, got {seeds}")
        return list(range(seeds))
    out = [int(s) for s in seeds]
    if not out or len(set(out)) != len(out) or min(out) < 0:
        raise ValueError(f"seeds must be distinct non-negative integers, got {list(seeds)}")
    return out


def sampler_params(name: str, overrides: Mapping[str, Any], volume: bool = False) -> dict:
    """The full options of sampler ``name`` (a volume sampler when ``volume``) as recorded in
    every cell: its ``Params`` (:mod:`invdiff.samplers.params`) with ``overrides``, checked
    before any work. A second prior (TPDM's) is recorded by the name or path it is given by.

    :raises ValueError: an option the sampler does not take, or one out of its range.
    """
    from ..samplers.params import Instance
    from .baseline import bench_sampler_class

    params = bench_sampler_class(name, volume).Params
    by_name = {k for k, v in overrides.items() if isinstance(params.constraints.get(k), Instance) and isinstance(v, str)}
    params.check({k: v for k, v in overrides.items() if k not in by_name})
    defaults = {f.name: f.default for f in dataclasses.fields(params) if f.default is not dataclasses.MISSING}
    return jsonable({**defaults, **overrides})


@dataclass(frozen=True)
class Cell:
    """One element of the grid; ``cell_id`` names it in the results file (see module doc)."""

    prior: str
    prior_hash: str
    task: TaskSpec
    task_record: dict
    sampler: SamplerSpec
    sampler_params: dict
    image_id: str
    image_index: int
    image_hash: str
    seed: int
    #: posterior samples per cell: the cell scores their mean (1: one sample, the default)
    samples: int = 1
    #: the hash of the sampler's own prior (:attr:`SamplerSpec.prior`); ``None``: the grid's
    sampler_prior_hash: str | None = None
    #: the precision the prior's network runs in (``"bfloat16"``, ``"float16"``); ``None``:
    #: as loaded (float32). A half-precision cell is another cell; compilation is not
    dtype: str | None = None

    @property
    def key(self) -> dict:
        key = {
            "prior_hash": self.prior_hash,
            "task": self.task_record,
            "sampler": self.sampler.name,
            "sampler_params": self.sampler_params,
            "image_id": self.image_id,
            "image_hash": self.image_hash,
            "seed": self.seed,
        }
        # only when not the defaults, so that the ids of earlier grids stay valid
        if self.samples != 1:
            key["samples"] = self.samples
        if self.sampler_prior_hash is not None:
            key["sampler_prior_hash"] = self.sampler_prior_hash
        if self.dtype not in (None, "float32"):
            key["dtype"] = self.dtype
        return key

    @property
    def cell_id(self) -> str:
        return hashlib.sha256(canonical_json(self.key).encode()).hexdigest()[:20]

    @property
    def measurement_seed(self) -> int:
        return derive_seed("measurement", self.task_record, self.image_id, self.seed)

    @property
    def sampler_seed(self) -> int:
        return derive_seed("sampler", self.seed)


def load_toml(path: str | os.PathLike) -> dict:
    """Read a benchmark TOML file; its keys are :func:`invdiff.bench.run`'s arguments.

    Relative paths of ``images``, ``out`` and file priors are resolved against the file's folder.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark configuration at {path.resolve()}")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: invalid TOML ({err})") from None
    if "prior" in cfg:
        if "priors" in cfg:
            raise ValueError(f"{path}: give 'prior' or 'priors', not both")
        cfg["priors"] = cfg.pop("prior")
    known = {"tasks", "samplers", "priors", "images", "n_images", "seeds", "samples", "steps", "out", "device",
             "rerun_failed", "save_recon", "figure_images", "lpips", "lpips_net", "verbose", "dtype", "compile"}
    unknown = sorted(set(cfg) - known)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown}; valid: {sorted(known)}")
    base = path.parent

    def rel(p: str) -> str:
        q = Path(p).expanduser()
        return str(q if q.is_absolute() or not (base / q).exists() else base / q)

    if isinstance(cfg.get("images"), str):
        cfg["images"] = rel(cfg["images"])
    if isinstance(cfg.get("out"), str) and not Path(cfg["out"]).expanduser().is_absolute():
        cfg["out"] = str(base / cfg["out"])
    priors = cfg.get("priors")
    if isinstance(priors, str):
        priors = [priors]
    if isinstance(priors, list):
        cfg["priors"] = [rel(p) if isinstance(p, str) else p for p in priors]
    return cfg
