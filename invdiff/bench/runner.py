r"""``invdiff.bench.run``: a resumable, shardable grid of tasks x samplers x priors x images x seeds.

Each cell: the image ``x`` is measured on the CPU, ``y = physics(x, seed=s_measure)``
(see :mod:`invdiff.bench.grid` for the seeds), the sampler reconstructs
``x_hat = sampler(y, physics, generator=Generator(device).manual_seed(s_sampler))`` (one
posterior sample, batch 1, through :class:`SeededSampler`), and :func:`image_metrics`
scores ``x_hat`` against ``x``. The row (parameters, seeds, metrics, NFE, wall time, peak
GPU memory, versions) is appended to the results file at once (:mod:`invdiff.bench.store`).
A cell that raises (divergence, out of memory) is recorded with ``status="failed"`` and its
error, and the run goes on; a sampler that cannot use the task's operator (its
``IncompatibleError``, e.g. DDRM without an SVD) gives ``status="incompatible"`` with the
reason, shown as ``n/a`` in the tables and never rerun.

**Resuming.** Cells whose ``cell_id`` already has a row are skipped (failed ones too,
unless ``rerun_failed``), so a killed run restarted with the same arguments finishes the
grid without writing a cell twice.

**Distributed.** Under ``torchrun --nproc-per-node N`` (``WORLD_SIZE > 1``) the process
group is initialised (NCCL when ``device`` is CUDA, gloo otherwise; rank ``r`` uses
``cuda:<LOCAL_RANK>``), every rank computes the same list of pending cells, takes every
``N``-th one starting at its rank, and appends to ``results.rank<r>.jsonl``; after a
barrier rank 0 merges the files into ``results.jsonl`` and writes the summary. Measurements
are drawn on the CPU and every cell's randomness comes from its own seeds, so the merged
results equal a 1-process run's (up to floating-point reduction order where the thread count
differs). Without torchrun the same call runs every cell in this process.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import functools
import hashlib
import os
import platform
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from deepinv.models import Reconstructor
from torch import Tensor

from ..files import atomic_file, check_not_input
from ..samplers.base import IncompatibleError, Sampler
from ..samplers.steps.likelihood import noise_batch_coupling
from . import store
from .baseline import bench_sampler_class
from .distributed import ProcessGroup, init_distributed
from .grid import (
    Cell,
    SamplerSpec,
    TaskSpec,
    canonical_json,
    parse_seeds,
    sampler_params,
    sampler_specs,
    split_list,
    task_specs,
    tensor_hash,
)
from .images import BenchImage, load_images, load_volumes
from .metrics import image_metrics, kernel_error

#: statuses of a finished cell (a resumed run does not redo them)
DONE = ("ok", "incompatible")

__all__ = ["run", "SeededSampler", "BenchResult", "BenchPrior", "resolve_priors", "prior_hash", "versions"]

_ANALYTIC = re.compile(r"gaussian-(\d+)")
_SAVE_RECON = ("figure", "all", "none")
#: buffers derived from the others, left out of :func:`prior_hash` (by class name)
_DERIVED = {"GaussianMixturePrior": ("eigenvalues", "eigenvectors"), "GaussianPrior": ("eigenvalues", "eigenvectors")}


class SeededSampler(Reconstructor):
    """A sampler whose every call draws from ``torch.Generator(y.device).manual_seed(seed)``.

    This is how the benchmark calls a sampler, and it is a :class:`deepinv.models.Reconstructor`,
    so ``deepinv.test(SeededSampler(sampler, s), loader, physics, metrics=deepinv_metrics(...))``
    on the benchmark's images and measurements (batch size 1) reproduces its PSNR and SSIM.

    :param sampler: an invdiff sampler.
    :param seed: the generator's seed (the benchmark uses ``Cell.sampler_seed``).
    """

    def __init__(self, sampler: Reconstructor, seed: int) -> None:
        super().__init__()
        self.sampler = sampler
        self.seed = int(seed)

    def forward(self, y: Tensor, physics, **kwargs: Any) -> Tensor:
        generator = torch.Generator(device=y.device).manual_seed(self.seed)
        return self.sampler(y, physics, generator=generator, **kwargs)

    @property
    def last_run(self):
        return self.sampler.last_run


@dataclass
class BenchPrior:
    """A prior of the grid: display ``name``, the module, its ``hash`` and where it came from.

    ``hash``: SHA-256 of the file for a shipped or file prior; for a prior built in memory
    (an object passed to :func:`run`, or the analytic ``gaussian-<N>``), see :func:`prior_hash`.
    """

    name: str
    prior: Any
    hash: str
    source: str


@dataclass
class BenchResult:
    """What :func:`run` did: the merged rows of this grid and the files written."""

    out: Path
    rows: list[dict]
    cells: int
    ran: int
    skipped: int
    failed: int
    files: dict = field(default_factory=dict)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def prior_hash(prior: Any) -> str:
    """SHA-256 identifying an in-memory prior.

    Computed over the class name, ``image_shape``, ``sigma_min``, ``sigma_max``,
    ``sigma_data`` and every entry of ``state_dict()`` (name, dtype, shape and bytes, in
    sorted order); a prior with an empty state dict is identified by its ``repr`` instead.
    Buffers computed from the others are left out (a Gaussian mixture's eigendecomposition:
    within a repeated eigenvalue LAPACK may return another basis under another thread count).
    Two priors with the same weights and settings get the same hash on any device.
    """
    h = hashlib.sha256(type(prior).__qualname__.encode())
    attrs = {k: getattr(prior, k, None) for k in ("image_shape", "sigma_min", "sigma_max", "sigma_data")}
    h.update(canonical_json(attrs).encode())
    state = dict(prior.state_dict()) if hasattr(prior, "state_dict") else {}
    for derived in _DERIVED.get(type(prior).__name__, ()):
        state.pop(derived, None)
    if not state:
        h.update(repr(prior).encode())
    for name in sorted(state):
        h.update(name.encode())
        h.update(tensor_hash(state[name]).encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _analytic_cached(size: int):
    from ..priors import GaussianPrior

    return GaussianPrior.stationary((1, size, size), length_scale=size / 8, variance=0.02, mean=0.5)


def _analytic(size: int):
    """The analytic prior ``gaussian-<size>``; built once per process (an eigendecomposition
    of a ``size**2``-square covariance), a fresh copy per call."""
    if not 4 <= size <= 64:
        raise ValueError(f"gaussian-{size}: the analytic prior's side must be in [4, 64]")
    return copy.deepcopy(_analytic_cached(size))


def _one_prior(spec: Any, name: str | None = None) -> BenchPrior:
    from .. import priors as priors_mod
    from ..priors.base import DiffusionPrior

    if isinstance(spec, DiffusionPrior):
        digest = prior_hash(spec)
        return BenchPrior(name or f"{type(spec).__name__}-{digest[:8]}", spec, digest, "object")
    if not isinstance(spec, (str, os.PathLike)):
        raise ValueError(f"a prior must be a name, a path or a DiffusionPrior, got {type(spec).__name__}")
    text = os.fspath(spec)
    path = Path(text).expanduser()
    shipped = priors_mod.loading.WEIGHTS_DIR / f"{text}.safetensors"
    m = _ANALYTIC.fullmatch(text)
    if m and not path.exists() and not shipped.is_file():
        prior = _analytic(int(m.group(1)))
        return BenchPrior(name or text, prior, prior_hash(prior), "analytic")
    prior = priors_mod.load(text)  # raises FileNotFoundError naming where the file should be
    file = path if path.is_file() else shipped
    return BenchPrior(name or (text if file == shipped else path.stem), prior, _file_sha256(file),
                      "shipped" if file == shipped else "file")


def resolve_priors(priors: Any) -> list[BenchPrior]:
    """Priors from names (``"ct-phantom-64"``, ``"gaussian-16"``, a comma list), paths,
    prior objects, a list of those, or a ``{name: prior or path}`` mapping."""
    if isinstance(priors, str):
        items: list[tuple[str | None, Any]] = [(None, p) for p in split_list(priors)]
    elif isinstance(priors, Mapping):
        items = [(str(k), v) for k, v in priors.items()]
    elif isinstance(priors, (list, tuple)):
        items = [(None, p) for p in priors]
    else:
        items = [(None, priors)]
    if not items:
        raise ValueError("no prior given")
    out = [_one_prior(spec, name) for name, spec in items]
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"priors given twice: {names} (give them distinct names with a mapping)")
    return out


def versions() -> dict:
    """Versions recorded in every row."""
    import deepinv

    from .. import __version__

    return {"invdiff": __version__, "torch": torch.__version__, "deepinv": deepinv.__version__,
            "python": platform.python_version()}


# ----------------------------------------------------------------------- distributed
# the process group is shared with ``invdiff reconstruct`` (:mod:`invdiff.bench.distributed`)
_Dist = ProcessGroup
_init_distributed = init_distributed


# ----------------------------------------------------------------------- the run
@dataclass
class _Setup:
    priors: list[BenchPrior]
    tasks: list[TaskSpec]
    samplers: list[SamplerSpec]
    images: dict[str, list[BenchImage]]
    physics: dict[tuple[str, str], Any]  # (prior, task label) -> CPU physics (measures)
    params: dict[str, dict]  # sampler label -> full parameters (JSON record)
    overrides: dict[str, dict]  # sampler label -> the keyword arguments it is built with
    cells: list[Cell]
    depth: int | None = None  # a volume grid: D slices per volume
    sampler_priors: dict[str, BenchPrior] = field(default_factory=dict)  # sampler label -> its own prior


def grid_shape(prior, size) -> tuple[int, int, int]:
    """``(C, H, W)`` of a benchmark grid: ``size`` (``N``, ``"HxW"`` or a pair), else the prior's
    own size (a fixed-size prior) or 256x256 (a prior of any size); checked by the prior."""
    from ..specs import parse_size

    if size is None:
        shape = tuple(prior.image_shape) if not prior.any_size else (prior.channels, 256, 256)
    else:
        h, w = parse_size(size)
        shape = (prior.channels, h, w)
    return prior.check_shape(shape, where="bench")


def _setup(tasks, samplers, priors, images, n_images, seeds, steps, size=None, depth=None, samples=1,
           dtype=None) -> _Setup:
    from .. import operators

    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive integer, got {samples!r}")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive integer, got {depth!r}")
    volume = depth is not None
    task_list = task_specs(tasks)
    for task in task_list:
        operators.describe(task.name)  # unknown names fail before any work
    sampler_list = sampler_specs(samplers)
    seed_list = parse_seeds(seeds)
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    params, overrides = {}, {}
    for spec in sampler_list:
        bench_sampler_class(spec.name, volume)  # unknown names fail before any work
        takes_steps = spec.name.lower() != "baseline"
        overrides[spec.label] = {**({"steps": steps} if steps is not None and takes_steps else {}),
                                 **spec.overrides}
        params[spec.label] = sampler_params(spec.name, overrides[spec.label], volume)
    # a sampler's own prior (SamplerSpec.prior), by name, path or object
    own = {spec.label: _one_prior(spec.prior) for spec in sampler_list if spec.prior is not None}
    prior_list = resolve_priors(priors)
    image_sets, physics, cells = {}, {}, []
    for bp in prior_list:
        shape = grid_shape(bp.prior, size)
        if volume:  # (C, D, H, W): the prior sees the (C, H, W) slices
            shape = (shape[0], depth, *shape[1:])
            image_sets[bp.name] = load_volumes(images, n_images, bp.name, shape)
        else:
            image_sets[bp.name] = load_images(images, n_images, bp.prior, bp.name, shape)
        for task in task_list:
            try:
                physics[bp.name, task.label] = operators.make(task.name, img_size=shape, **task.overrides)
            except TypeError as err:
                raise ValueError(f"task {task.label!r}: {err}") from None
    for bp in prior_list:
        for task in task_list:
            record = physics[bp.name, task.label].task
            for image in image_sets[bp.name]:
                for seed in seed_list:
                    for spec in sampler_list:
                        mine = own.get(spec.label)
                        cells.append(Cell(bp.name, bp.hash, task, record, spec, params[spec.label],
                                          image.id, image.index, image.hash, seed, samples,
                                          mine.hash if mine is not None else None, dtype))
    ids = [c.cell_id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("the grid has identical cells (the same prior given twice under different names?)")
    return _Setup(prior_list, task_list, sampler_list, image_sets, physics, params, overrides, cells, depth, own)


def _input_paths(images: Any, priors: Any) -> list:
    """The paths among the image source and the priors (what the output folder must keep clear of)."""
    if isinstance(priors, str):
        items = split_list(priors)
    elif isinstance(priors, Mapping):
        items = list(priors.values())
    else:
        items = list(priors) if isinstance(priors, (list, tuple)) else [priors]
    return [p for p in [images, *items] if isinstance(p, (str, os.PathLike))]


@contextlib.contextmanager
def _locked(out: Path, dist: _Dist):
    """Hold ``out``'s lock (:func:`invdiff.bench.store.lock`) for this run: rank 0 takes it and
    tells the other ranks whether it could, so a refused distributed run stops on every rank."""
    if dist.world == 1:
        with store.lock(out):
            yield
        return
    import torch.distributed as tdist

    with contextlib.ExitStack() as held:
        message = [None]
        if dist.rank == 0:
            try:
                held.enter_context(store.lock(out))
            except store.BenchLocked as err:
                message = [str(err)]
        tdist.broadcast_object_list(message, src=0)
        if message[0] is not None:
            raise store.BenchLocked(message[0])
        yield


def _save_recon(out: Path, cell: Cell, x_hat: Tensor, x: Tensor, std: Tensor | None = None,
                kernels: dict | None = None) -> str:
    from safetensors.torch import save_file

    folder = out / "recon"
    folder.mkdir(exist_ok=True)
    path = folder / f"{cell.cell_id}.safetensors"
    tensors = {"x_hat": x_hat, "x": x, **({"std": std} if std is not None else {}), **(kernels or {})}
    with atomic_file(path, overwrite=True) as tmp:
        save_file({k: v.detach().cpu().float().contiguous() for k, v in tensors.items()},
                  str(tmp), metadata={"cell_id": cell.cell_id})
    return f"recon/{path.name}"


def _error_text(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first}"


class _Runner:
    """Runs cells of one rank with cached operators, samplers and measurements."""

    def __init__(self, setup: _Setup, out: Path, device: str, dist: _Dist, verbose: bool, lpips: bool,
                 lpips_net: str, save_recon: str, figure_images: int, first_seed: int, dtype: str | None = None,
                 compile: bool | str = False) -> None:
        self.dtype, self.compile = dtype, compile
        self.setup, self.out, self.device, self.dist = setup, out, torch.device(device), dist
        self.verbose, self.lpips, self.lpips_net = verbose, lpips, lpips_net
        self.save_recon, self.figure_images, self.first_seed = save_recon, figure_images, first_seed
        self.priors = {p.name: p for p in setup.priors}
        self.images = {(name, im.id): im for name, ims in setup.images.items() for im in ims}
        self._physics_dev: dict = {}
        self._samplers: dict = {}
        self._measurement: tuple | None = None
        self.versions = versions()
        self.device_name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"

    def physics_on_device(self, cell: Cell):
        key = (cell.prior, cell.task.label)
        if key not in self._physics_dev:
            if self.device.type == "cpu":
                self._physics_dev[key] = self.setup.physics[key]
            else:
                from .. import operators

                self._physics_dev[key] = operators.make(**cell.task_record, device=self.device)
        return self._physics_dev[key]

    def sampler(self, cell: Cell):
        key = (cell.prior, cell.sampler.label)
        if key not in self._samplers:
            own = self.setup.sampler_priors.get(cell.sampler.label)  # the sampler's own prior, else the grid's
            prior = self.accelerated((own if own is not None else self.priors[cell.prior]).prior.to(self.device))
            overrides = dict(self.setup.overrides[cell.sampler.label])
            for second in ("perpendicular_prior", "kernel_prior"):  # TPDM's, BlindDPS's second prior, by name or path
                if isinstance(overrides.get(second), str):
                    overrides[second] = self.accelerated(_one_prior(overrides[second]).prior.to(self.device))
            cls = bench_sampler_class(cell.sampler.name, self.setup.depth is not None)
            self._samplers[key] = cls(prior, verbose=self.verbose, **overrides)
        return self._samplers[key]

    def accelerated(self, prior):
        """``prior`` with its network in the run's ``dtype``, compiled when asked (priors.runtime)."""
        if self.dtype is not None or self.compile:
            prior.accelerate(dtype=self.dtype, compile=self.compile)
        return prior

    def measure(self, cell: Cell, x: Tensor) -> Tensor:
        key = (cell.prior, cell.task.label, cell.image_id, cell.seed)
        if self._measurement is None or self._measurement[0] != key:
            physics = self.setup.physics[cell.prior, cell.task.label]
            with torch.no_grad():
                y = physics(x, seed=cell.measurement_seed)
            self._measurement = (key, y)
        return self._measurement[1]

    def kernels(self, cell: Cell, sampler) -> dict | None:
        """A blind task's kernels: nature's (of the cell's measurement seed) and the sampler's
        estimate (the mean over samples), or ``None``."""
        physics = self.setup.physics[cell.prior, cell.task.label]
        estimate = getattr(sampler, "kernel", None)
        if not getattr(physics, "blind", False) or estimate is None:
            return None
        return {"kernel_hat": estimate.detach().float().cpu().mean(0, keepdim=True),
                "kernel": physics.kernel(cell.measurement_seed).float().cpu()}

    def run_group(self, cells: list[Cell]) -> list[dict]:
        """The rows of ``cells`` (one prior, task, sampler and samples; :func:`_groups`) from one
        batched sampler call: their measurements as one batch and one generator per cell
        (its ``sampler_seed``), so every cell's reconstruction is the one it gets alone
        (``Sampler.batch_coupling`` is ``None``: the samplers' steps work per image); each row
        gets the call's cost and ``batched`` (the cells in the call). One by one instead for a
        single cell, a volume grid, a blind task (an operator per measurement seed), a sampler
        that couples a batch, Poisson data (``steps.likelihood.noise_batch_coupling``), and
        after any error of the batched call (so a failing cell is recorded as alone)."""
        first = cells[0]
        if len(cells) == 1 or self.setup.depth is not None:
            return [self.run_cell(c) for c in cells]
        try:
            sampler = self.sampler(first)
            physics = self.physics_on_device(first)
            if (not isinstance(sampler, Sampler) or sampler.batch_coupling or getattr(physics, "blind", False)
                    or noise_batch_coupling(physics)):
                return [self.run_cell(c) for c in cells]
            y = torch.cat([self.measure(c, self.images[c.prior, c.image_id].x[None]) for c in cells]).to(self.device)
            generators = [torch.Generator(self.device).manual_seed(c.sampler_seed) for c in cells]
            post = sampler.sample(y, physics, n=first.samples, generator=generators)
        except Exception:  # noqa: BLE001 - each cell's own error (or success) comes from running it alone
            return [self.run_cell(c) for c in cells]
        return [self.run_cell(c, done=(post.mean[j : j + 1], post.std[j : j + 1] if c.samples > 1 else None, len(cells)))
                for j, c in enumerate(cells)]

    def run_cell(self, cell: Cell, done: tuple | None = None) -> dict:
        """The row of ``cell``: measure, reconstruct, score, save. ``done``: its
        ``(x_hat, std, cells in the call)`` from :meth:`run_group`'s batched call."""
        start = time.perf_counter()
        image = self.images[cell.prior, cell.image_id]
        own = self.setup.sampler_priors.get(cell.sampler.label)
        row = {
            "cell_id": cell.cell_id,
            "status": "ok",
            "error": None,
            "prior": cell.prior,
            "prior_hash": cell.prior_hash,
            "prior_source": self.priors[cell.prior].source,
            "task": cell.task.label,
            "task_name": cell.task.name,
            "task_params": cell.task_record,
            "sampler": cell.sampler.label,
            "sampler_name": cell.sampler.name,
            "sampler_params": cell.sampler_params,
            "sampler_prior": own.name if own is not None else None,
            "sampler_prior_hash": cell.sampler_prior_hash,
            "samples": cell.samples,
            "image": cell.image_id,
            "image_index": cell.image_index,
            "image_source": image.source,
            "image_hash": cell.image_hash,
            "image_note": image.note,
            "seed": cell.seed,
            "measurement_seed": cell.measurement_seed,
            "sampler_seed": cell.sampler_seed,
            "dtype": cell.dtype or "float32",
        }
        metrics: dict = {"psnr": None, "ssim": None, "lpips": None, "psnr_range": None, "notes": "",
                         "kernel_error": None}
        cost: dict = {"wall_time": None, "nfe": None, "nfe_backward": None, "steps": None, "peak_memory": None,
                      "runtime": None}
        recon = None
        sampler = None
        try:
            x = image.x[None]
            y = self.measure(cell, x)
            sampler = SeededSampler(self.sampler(cell), cell.sampler_seed)
            std = None
            if done is not None:  # this cell's share of a batched call: what it gets alone
                x_hat, std = done[0], done[1]
            elif cell.samples == 1:
                x_hat = sampler(y.to(self.device), self.physics_on_device(cell))
            else:  # the mean of K samples, one batched run from the same seeded generator
                post = sampler.sampler.sample(y.to(self.device), self.physics_on_device(cell), n=cell.samples,
                                              generator=torch.Generator(self.device).manual_seed(cell.sampler_seed))
                x_hat, std = post.mean, post.std
            metrics = image_metrics(x_hat, x, cell.task.family, self.lpips, self.lpips_net)
            kernels = self.kernels(cell, sampler.sampler)
            metrics["kernel_error"] = kernel_error(kernels["kernel_hat"], kernels["kernel"]) if kernels else None
            if self.save_recon == "all" or (
                self.save_recon == "figure" and cell.image_index < self.figure_images and cell.seed == self.first_seed
            ):
                recon = _save_recon(self.out, cell, x_hat, x, std, kernels)
        except IncompatibleError as err:  # the method cannot use this operator: a fact, not a failure
            row["status"], row["error"] = "incompatible", _error_text(err)
        except Exception as err:  # a failed cell is recorded and the grid goes on
            row["status"], row["error"] = "failed", _error_text(err)
            row["traceback"] = traceback.format_exc(limit=-3)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        info = sampler.last_run if sampler is not None else None
        if info is not None:
            cost = {"wall_time": info.wall_time, "nfe": info.nfe, "nfe_backward": info.nfe_backward,
                    "steps": info.steps, "peak_memory": info.peak_memory, "runtime": info.runtime}
        row.update(metrics)
        row.update(cost)
        row.update({
            "recon": recon,
            "cell_time": time.perf_counter() - start,
            "device": str(self.device),
            "device_name": self.device_name,
            "batched": done[2] if done is not None else 1,
            "rank": self.dist.rank,
            "world_size": self.dist.world,
            "versions": self.versions,
            "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        })
        return row


def _groups(cells: Sequence[Cell], size: int) -> list[list[Cell]]:
    """``cells`` in groups of at most ``size`` that share prior, task, sampler and samples
    (what :meth:`_Runner.run_group` batches: the images and seeds of a grid's group), each
    group in grid order and the groups in the order of their first cell (the rows are merged
    in grid order at the end)."""
    out: list[list[Cell]] = []
    filling: dict[tuple, list[Cell]] = {}
    for cell in cells:
        key = (cell.prior, cell.task.label, cell.sampler.label, cell.samples)
        group = filling.get(key)
        if group is None or len(group) >= size:
            group = filling[key] = []
            out.append(group)
        group.append(cell)
    return out


def run(
    tasks: str | Sequence[Any],
    samplers: str | Sequence[Any],
    priors: Any,
    images: Any = None,
    n_images: int | None = None,
    seeds: int | str | Sequence[int] = 1,
    steps: int | None = None,
    out: str | os.PathLike = "invdiff-bench",
    samples: int = 1,
    size: int | str | tuple[int, int] | None = None,
    depth: int | None = None,
    device: str = "cpu",
    rerun_failed: bool = False,
    save_recon: str = "figure",
    figure_images: int = 2,
    lpips: bool = True,
    lpips_net: str = "alex",
    verbose: bool = False,
    progress: bool = True,
    report: bool = True,
    on_cell: Callable[[dict], None] | None = None,
    batch: int = 1,
    inputs: Sequence[str | os.PathLike] = (),
    dtype: str | None = None,
    compile: bool | str = False,
) -> BenchResult:
    """Run (or resume) a benchmark grid and write its results, summary and figure to ``out``.

    :param tasks: operator registry names with overrides: ``"ct-sparse-30,mri-4x"``,
        ``["ct-sparse-30:noise_sigma=0.02"]``, or tables ``{"name": ..., "label": ..., **overrides}``.
    :param samplers: sampler names with overrides, in the same forms (``"dps:zeta=0.5"``).
    :param priors: a shipped name (``"ct-phantom-64"``), a checkpoint path, ``"gaussian-<N>"``
        (the analytic stationary Gaussian prior on ``N x N`` images, length scale ``N/8``,
        variance 0.02, mean 0.5), a :class:`~invdiff.priors.DiffusionPrior`, a list of
        those or a ``{name: prior}`` mapping.
    :param images: image source (see :mod:`invdiff.bench.images`): ``"ct-phantom"``,
        ``"mri-brain"``, ``"prior"``, a folder, a ``torch.utils.data.Dataset``, a tensor;
        ``None`` picks the held-out set of a shipped prior or samples of an analytic one.
    :param n_images: how many images (``None``: all the source has; 8 prior samples).
    :param size: image size of the grid, ``N`` or ``"HxW"`` (default: the prior's own for a
        fixed-size prior, 256x256 for a prior of any size); images are resized to it
        (antialiased) and operators built at it. A fixed-size prior at another size is an error.
    :param depth: a volume grid: volumes of ``depth`` slices of the grid's size
        (:func:`~invdiff.bench.images.load_volumes`), every task on ``(C, depth, H, W)``
        (a 2D task slice-stacked, or ``mri3d-<R>x`` / ``zsr-<k>x``), the samplers ``baseline``
        and the volume samplers (``dds-3d``, ``tpdm:perpendicular_prior=NAME``,
        ``diffusion-mbir``), 3D PSNR / SSIM and the z-gradient error (``z_error``).
    :param seeds: a count ``S`` (seeds ``0 .. S-1``) or a list of seeds.
    :param steps: overrides every sampler's ``steps`` (a sampler spec's own ``steps`` wins).
    :param samples: posterior samples per cell, ``K``: a cell scores the mean of ``K`` samples
        (``sampler.sample(y, physics, n=K)``, one batched run from the cell's seeded generator)
        and keeps their per-pixel std with the reconstruction; ``K`` is part of the cell's id.
    :param out: output folder (created); running again into it resumes. One run at a time:
        a second run on the same folder is refused (``RuntimeError``, naming the first's pid);
        the folder is never an input (the image folder, a prior file) nor inside or around one.
    :param device: ``"cpu"``, ``"cuda"`` (``cuda:<LOCAL_RANK>`` under torchrun) or ``"cuda:1"``.
    :param rerun_failed: run again the cells recorded as failed.
    :param save_recon: keep reconstructions for the figure (``"figure"``: the first
        ``figure_images`` images at the first seed), ``"all"`` or ``"none"``.
    :param lpips: compute LPIPS when its weights are on this machine (never downloaded).
    :param lpips_net: LPIPS network: ``"alex"``, ``"vgg"`` or ``"squeeze"``.
    :param verbose: show each sampler's own progress bar.
    :param progress: show the grid's progress bar (cells done, ETA).
    :param report: write ``summary.md``, ``summary.csv`` and ``grid.png`` at the end.
    :param on_cell: called with each row right after it is written (a hook for notebooks
        and tests; an exception it raises stops the run, as a kill would).
    :param inputs: other files ``out`` must not be, contain or sit inside (the command's
        ``--config``); the image folder and prior files are checked anyway.
    :param batch: up to this many pending cells of one prior, task, sampler and samples (in
        grid order, e.g. the images of a group) go through the sampler in one call, one
        generator per cell: the same rows as one by one (:meth:`_Runner.run_group`; 2D grids).
    :param dtype: precision of the priors' networks (``"bf16"``, ``"fp16"``; ``None``: as
        loaded, float32); part of a cell's id when not float32. ``compile``: ``torch.compile``
        the networks (:func:`invdiff.priors.runtime.accelerate`; the priors given as objects
        are changed in place). Each row records ``dtype`` and the ``runtime`` that ran.
    :returns: a :class:`BenchResult` with the rows of this grid.
    :raises ValueError: an unknown task, sampler, parameter or image source, before any cell runs.
    """
    from tqdm.auto import tqdm

    if save_recon not in _SAVE_RECON:
        raise ValueError(f"save_recon must be one of {_SAVE_RECON}, got {save_recon!r}")
    if figure_images < 0:
        raise ValueError(f"figure_images must be >= 0, got {figure_images}")
    if int(batch) < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    from ..priors.loading import parse_dtype
    from ..priors.runtime import dtype_name

    net_dtype = dtype_name(parse_dtype(dtype))  # an unknown name fails before any work
    out = Path(out)
    check_not_input(out, [*_input_paths(images, priors), *inputs], "out")  # results never go into an input
    dist = _init_distributed(str(device))
    held = contextlib.ExitStack()
    try:
        if dist.world > 1 and str(device) == "cuda":
            device = f"cuda:{dist.local_rank}"
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            raise RuntimeError(f"device {device!r} requested but CUDA is not available")
        torch.device(device)  # a malformed device fails here, before any work
        setup = _setup(tasks, samplers, priors, images, n_images, seeds, steps, size, depth, samples, net_dtype)
        out.mkdir(parents=True, exist_ok=True)
        held.enter_context(_locked(out, dist))  # one run per folder, from reading the finished cells to the summary
        previous = store.load_results(out) if (out / store.RESULTS).exists() or store.rank_files(out) else []
        finished = {r["cell_id"] for r in previous if r.get("status") in DONE or not rerun_failed}
        pending = [c for c in setup.cells if c.cell_id not in finished]
        mine = pending[dist.rank :: dist.world]
        target = store.rank_file(out, dist.rank) if dist.world > 1 else out / store.RESULTS
        files = [store.rank_file(out, r) for r in range(dist.world)] if dist.world > 1 else [target]
        dist.barrier()  # every rank has read the finished cells before anyone writes
        base = {f: store.count_lines(f) for f in files} if dist.world > 1 else {}
        done_before = len(setup.cells) - len(pending)
        bar = tqdm(total=len(setup.cells), initial=done_before, desc="bench", unit="cell", dynamic_ncols=True,
                   disable=not progress or dist.rank != 0, file=sys.stderr)
        runner = _Runner(setup, out, str(device), dist, verbose, lpips, lpips_net, save_recon, figure_images,
                         parse_seeds(seeds)[0], dtype=net_dtype, compile=compile)
        ran = 0
        for group in _groups(mine, int(batch)):
            for cell, row in zip(group, runner.run_group(group)):
                store.append_row(target, row)
                ran += 1
                if not bar.disable:
                    # the whole grid's progress: this rank's cells and the other ranks' lines
                    done = done_before + (ran if dist.world == 1 else
                                          sum(store.count_lines(f) - base[f] for f in files))
                    bar.update(done - bar.n)
                    bar.set_postfix_str(f"{cell.task.label} {cell.sampler.label} "
                                        + (f"{row['psnr']:.2f} dB" if row["status"] == "ok" else row["status"]))
                if on_cell is not None:
                    on_cell(row)
        dist.barrier()  # every rank's cells are written
        paths: dict = {}
        if dist.rank == 0:
            store.merge(out, order=[c.cell_id for c in setup.cells])
            bar.update(len(setup.cells) - bar.n)
        bar.close()
        dist.barrier()  # the merged file is complete
        ids = {c.cell_id for c in setup.cells}
        rows = [r for r in store.load_results(out) if r["cell_id"] in ids]
        if report and dist.rank == 0:
            from .report import write_report

            paths = write_report(rows, out, figure_images=figure_images)
        return BenchResult(out, rows, len(setup.cells), ran, len(setup.cells) - len(pending),
                           sum(r["status"] not in DONE for r in rows), paths)
    finally:
        held.close()
        dist.close()
