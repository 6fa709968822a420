r"""Measurement files: the data of a (simulated or acquired) scan with everything needed to
rebuild its operator and to write the reconstruction back in the source's format.

An HDF5 file (``.h5``, h5py) with attribute ``invdiff_format = "invdiff-measurement/1"``:

==================  =====================================================================
``y``               float32 ``(N, ...)``: one measurement per slice, as ``physics(x)`` gives;
                    for a volume task (``img_size`` ``(C, D, H, W)``: ``mri3d-<R>x``,
                    ``zsr-<k>x``) ``(1, ...)``, the one measurement of the ``D`` slices
``attrs["task"]``   JSON: the operator's full record (``physics.task``: name, ``img_size``,
                    seed, noise and every task parameter) — ``operators.make(**task)``
                    rebuilds it exactly; ``{"name": "acquired-mri", ...}`` for fastMRI data
``attrs["noise_seed"]``  seed of the simulated noise (``physics(x, seed=noise_seed)``); -1 if acquired
``attrs["value_map"]``  JSON :class:`~invdiff.io.intensity.ValueMap` (source units <-> [0, 1])
``attrs["source"]``  JSON: kind, path, slice identifiers, modality, units, pixel spacing, bit depth
``attrs["resample"]``  JSON: ``factor`` (rows, columns), ``source_shape``, ``shape``, ``method``
``dicom_headers``   DICOM sources: one JSON string per slice (``Dataset.to_json_dict``, pixel
                    data and private tags removed), enough to write a derived series
``nifti_affine``, ``nifti_header``  NIfTI sources: the affine and the raw header bytes
``mask``, ``coil_maps``  acquired MRI: ``(H, W)`` mask and ``(N, coils, H, W)`` complex maps;
                    simulated multi-coil with user maps: ``(coils, H, W)``
==================  =====================================================================

The ground truth is **not** stored: a measurement file is what a reconstruction method
may see. Files are written to a temporary name and renamed.

**As one volume.** :meth:`Measurement.volume_physics` and :meth:`Measurement.volume_y` read
the ``N`` slices' measurements as one volume ``(1, N, ...)`` under the slice-stacked operator
:class:`~invdiff.operators.volume.SliceStack` of their common 2D operator (or the volume
task's own operator), for joint 3D reconstruction.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..files import atomic_write, check_new_path
from .intensity import ValueMap

__all__ = ["Measurement", "save_measurement", "load_measurement", "FORMAT", "ACQUIRED_MRI"]

FORMAT = "invdiff-measurement/1"
ACQUIRED_MRI = "acquired-mri"


@dataclass
class Measurement:
    """Measurements of ``N`` slices and their provenance (see the module docstring).

    :ivar y: ``(N, ...)`` measurements (``(1, ...)`` for a volume task).
    :ivar task: the operator record.
    :ivar noise_seed: seed of the simulated noise, ``None`` for acquired data.
    :ivar value_map: source units <-> [0, 1].
    :ivar source: description of the source (kind, path, identifiers, modality, ...).
    :ivar resample: ``{"factor": [fh, fw], "source_shape": [H, W], "shape": [h, w], "method": ...}``.
    :ivar headers: DICOM datasets, one per slice, or ``None``.
    :ivar affine: NIfTI affine or ``None``.
    :ivar nifti_header: NIfTI header bytes or ``None``.
    :ivar mask: acquired MRI mask ``(H, W)``.
    :ivar coil_maps: coil maps ``(N, coils, H, W)`` (acquired) or ``(coils, H, W)`` (user maps).
    :ivar attrs: other attributes (creation time, version, file path).
    """

    y: Tensor
    task: dict
    noise_seed: int | None
    value_map: ValueMap
    source: dict
    resample: dict
    headers: list | None = None
    affine: np.ndarray | None = None
    nifti_header: bytes | None = None
    mask: Tensor | None = None
    coil_maps: Tensor | None = None
    attrs: dict = field(default_factory=dict)
    _physics: dict = field(default_factory=dict, repr=False)

    @property
    def img_size(self) -> tuple[int, ...]:
        """``(C, H, W)`` of the images the operator takes; ``(C, D, H, W)`` for a volume task."""
        return tuple(int(s) for s in self.task["img_size"])

    @property
    def volume(self) -> bool:
        """True when the operator is a volume task (``y`` is one measurement of ``D`` slices)."""
        return len(self.task["img_size"]) == 4

    @property
    def slice_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one slice."""
        size = self.img_size
        return (size[0], size[2], size[3]) if self.volume else size

    @property
    def n_slices(self) -> int:
        """Number of slices: ``N`` of ``y`` (one measurement per slice), ``D`` for a volume task."""
        return self.img_size[1] if self.volume else int(self.y.shape[0])

    @property
    def per_slice_operator(self) -> bool:
        """True when each slice has its own operator (acquired MRI with per-slice coil maps)."""
        return self.coil_maps is not None and self.coil_maps.ndim == 4

    def physics(self, k: int = 0, device: torch.device | str = "cpu"):
        """The operator of slice ``k`` (rebuilt from :attr:`task`; cached per device)."""
        key = (k if self.per_slice_operator else 0, str(device))
        if key not in self._physics:
            self._physics[key] = self._build(key[0], device)
        return self._physics[key]

    def volume_physics(self, device: torch.device | str = "cpu"):
        """The operator of all slices as one volume ``(1, C, N, H, W)``: the volume task's own
        operator, or :class:`~invdiff.operators.volume.SliceStack` of the slices' common 2D
        operator (its noise model kept); its ``task`` is the record ``operators.make`` builds
        the same volume operator from (the 2D task with ``img_size = (C, N, H, W)``).

        :raises ValueError: the slices have different operators (acquired MRI with
            per-slice coil maps).
        """
        if self.volume:
            return self.physics(0, device)
        if self.per_slice_operator:
            where = self.attrs.get("path", "measurement")
            raise ValueError(f"{where}: the {self.n_slices} slices have different operators (per-slice coil maps of "
                             f"{self.task.get('name')}); a joint volume reconstruction needs one 2D operator for every slice")
        key = ("volume", str(device))
        if key not in self._physics:
            from ..operators.volume import SliceStack

            physics = SliceStack(self.physics(0, device), self.n_slices)
            C, H, W = self.img_size
            physics.task = {**dict(self.task), "img_size": [C, self.n_slices, H, W]}  # operators.make rebuilds it
            self._physics[key] = physics
        return self._physics[key]

    def volume_y(self) -> Tensor:
        """The measurements as one volume's: ``(1, N, ...)`` (slice-stacked), or ``y`` itself
        for a volume task."""
        return self.y if self.volume else self.y[None]

    def _build(self, k: int, device):
        from .. import operators

        where = self.attrs.get("path", "measurement")
        if self.task.get("name") == ACQUIRED_MRI:
            from deepinv.physics import GaussianNoise

            if self.mask is None or self.coil_maps is None:
                raise ValueError(f"{where}: acquired MRI data needs 'mask' and 'coil_maps'")
            maps = self.coil_maps[k] if self.coil_maps.ndim == 4 else self.coil_maps
            physics = operators.MultiCoilMRIOperator(self.mask, maps, img_size=self.img_size, device=device)
            physics.noise_model = GaussianNoise(float(self.task.get("noise_sigma", 0.0)))
            physics.task = dict(self.task)
            return physics
        task = dict(self.task)
        if task.get("coil_maps") == "user":
            if self.coil_maps is None:
                raise ValueError(f"{where}: the task uses user coil maps but the file has no 'coil_maps'")
            task["coil_maps"] = self.coil_maps
        try:
            return operators.make(**task, device=device)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RuntimeError, OverflowError,
                ZeroDivisionError) as err:  # a tampered record: one line, never a traceback
            raise ValueError(f"{where}: cannot rebuild the operator from its task record: "
                             f"{_one_line(err) or type(err).__name__}") from None

    def check(self) -> None:
        """Raise ``ValueError`` unless every slice's measurement has the shape its operator
        gives and the file's per-slice records agree with ``N``."""
        where = self.attrs.get("path", "measurement")
        n = self.n_slices
        if self.volume and self.y.shape[0] != 1:
            raise ValueError(f"{where}: a volume task ({self.task.get('name')}) holds one measurement, y has {self.y.shape[0]}")
        for name, records in (("dicom_headers", self.headers), ("source identifiers", self.source.get("identifiers"))):
            if records is not None and len(records) != n:
                raise ValueError(f"{where}: {len(records)} {name} for {n} measured slices")
        if self.per_slice_operator and self.coil_maps.shape[0] != n:
            raise ValueError(f"{where}: coil maps for {self.coil_maps.shape[0]} slices, {n} measured")
        physics = self.physics(0)
        probe = torch.zeros(1, *self.img_size)
        expected = tuple(physics.A(probe).shape[1:])
        if tuple(self.y.shape[1:]) != expected:
            raise ValueError(
                f"{where}: measurement y has shape {tuple(self.y.shape)} but the operator "
                f"{self.task.get('name')} for images {self.img_size} gives ({'1' if self.volume else 'N'}, "
                f"{', '.join(map(str, expected))}); "
                "the measurement and operator records do not match"
            )
        if not torch.isfinite(self.y).all():
            raise ValueError(f"{where}: measurement y has NaN/Inf values")


def _json_attr(f, key: str, path: Path, required: bool = True, default=None):
    if key not in f.attrs:
        if required:
            raise ValueError(f"{path}: measurement file lacks the '{key}' attribute")
        return default
    value = f.attrs[key]
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return json.loads(value)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: attribute '{key}' is not valid JSON ({err})") from None


def save_measurement(path: str | os.PathLike, m: Measurement, overwrite: bool = False) -> Path:
    """Write ``m`` to ``path`` (HDF5 built in memory, then written to a temporary file and
    renamed: a full disk is one ``OSError``, never an HDF5 library error at close).

    :raises FileExistsError: ``path`` exists and ``overwrite`` is False.
    """
    import io

    import h5py

    from .. import __version__
    from .dicom import headers_to_json

    path = Path(path)
    if m.noise_seed is not None and int(m.noise_seed) < 0:  # -1 on disk means acquired data
        raise ValueError(f"{path}: noise_seed must be a non-negative integer (or None for acquired data), "
                         f"got {m.noise_seed}")
    check_new_path(path, overwrite)  # before the work
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        f.attrs["invdiff_format"] = FORMAT
        f.attrs["invdiff_version"] = __version__
        f.attrs["created"] = datetime.datetime.now().isoformat(timespec="seconds")
        f.attrs["task"] = json.dumps(m.task)
        f.attrs["noise_seed"] = -1 if m.noise_seed is None else int(m.noise_seed)
        f.attrs["value_map"] = m.value_map.to_json()
        f.attrs["source"] = json.dumps(m.source)
        f.attrs["resample"] = json.dumps(m.resample)
        f.create_dataset("y", data=m.y.detach().cpu().float().numpy(), compression="gzip", compression_opts=4)
        if m.headers is not None:
            f.create_dataset("dicom_headers", data=headers_to_json(m.headers), dtype=h5py.string_dtype())
        if m.affine is not None:
            f.create_dataset("nifti_affine", data=np.asarray(m.affine, np.float64))
        if m.nifti_header is not None:
            f.create_dataset("nifti_header", data=np.void(m.nifti_header))
        if m.mask is not None:
            f.create_dataset("mask", data=m.mask.cpu().numpy().astype(np.float32))
        if m.coil_maps is not None:
            f.create_dataset("coil_maps", data=m.coil_maps.cpu().numpy().astype(np.complex64))
    atomic_write(path, buf.getvalue(), overwrite=overwrite, fsync=True)
    return path


def load_measurement(path: str | os.PathLike, check: bool = True) -> Measurement:
    """Read a measurement file written by :func:`save_measurement`.

    :param check: verify the measurement against the rebuilt operator (:meth:`Measurement.check`).
    :raises FileNotFoundError: no such file.
    :raises ValueError: not HDF5, not an invdiff measurement (a fastMRI file gets a hint),
        missing or invalid records, or a measurement that does not match its operator; one
        line naming the file, whatever the edit or truncation (the file is only read).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such measurement file")
    try:
        return _load_measurement(path, check)
    except ValueError as err:
        text = _one_line(err)
        if text.startswith(str(path)):
            raise ValueError(text) from None
        raise ValueError(f"{path}: invalid measurement file ({text})") from None
    except (OSError, KeyError, TypeError, AttributeError, IndexError, OverflowError, RuntimeError, MemoryError,
            ZeroDivisionError) as err:
        if isinstance(err, FileNotFoundError):
            raise
        raise ValueError(f"{path}: corrupt or edited measurement file ({type(err).__name__}: "
                         f"{_one_line(err) or 'no detail'})") from None


def _one_line(err) -> str:
    return " ".join(str(err).split())


#: the most voxels a task record may ask for (a tampered img_size must not allocate terabytes)
_MAX_VOXELS = 1 << 28


def _check_task_record(task, path: Path) -> None:
    if not isinstance(task, dict) or not isinstance(task.get("name"), str) or "img_size" not in task:
        raise ValueError(f"{path}: the task record must be a dict with 'name' and 'img_size', got {task!r:.200}")
    size = task["img_size"]
    if (not isinstance(size, list) or len(size) not in (3, 4)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size)):
        raise ValueError(f"{path}: the task record's img_size must be 3 or 4 positive integers, got {size!r:.200}")
    if int(np.prod(size, dtype=np.float64)) > _MAX_VOXELS:
        raise ValueError(f"{path}: the task record's img_size {size} is implausibly large (edited file?)")


def _load_measurement(path: Path, check: bool) -> Measurement:
    import h5py

    from .dicom import headers_from_json

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 measurement file ({_one_line(err)})") from None
    with f:
        fmt = f.attrs.get("invdiff_format")
        fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
        if fmt != FORMAT:
            if "kspace" in f:
                raise ValueError(f"{path}: a fastMRI k-space file, not an invdiff measurement; "
                                 "reconstruct it directly (invdiff.apps.workflows.fastmri_measurement)")
            raise ValueError(f"{path}: not an invdiff measurement file (invdiff_format {fmt!r:.80}, expected {FORMAT!r})")
        for name in ("y",):
            if name not in f or not isinstance(f[name], h5py.Dataset):
                raise ValueError(f"{path}: measurement file has no '{name}' dataset")
        try:
            y = torch.from_numpy(np.asarray(f["y"][()], dtype=np.float32))
            headers = [h.decode() if isinstance(h, bytes) else h for h in f["dicom_headers"][()]] if "dicom_headers" in f else None
            affine = np.asarray(f["nifti_affine"][()]) if "nifti_affine" in f else None
            nifti_header = f["nifti_header"][()].tobytes() if "nifti_header" in f else None
            mask = torch.from_numpy(np.asarray(f["mask"][()])) if "mask" in f else None
            maps = torch.from_numpy(np.asarray(f["coil_maps"][()])) if "coil_maps" in f else None
        except OSError as err:
            raise ValueError(f"{path}: corrupt measurement file ({_one_line(err)})") from None
        if y.ndim < 2 or y.numel() == 0:
            raise ValueError(f"{path}: measurement y has shape {tuple(y.shape)}; expected (N, ...) with N >= 1")
        if headers is not None and not all(isinstance(h, str) for h in headers):
            raise ValueError(f"{path}: 'dicom_headers' must be one JSON string per slice")
        if affine is not None and (affine.shape != (4, 4) or not np.isfinite(affine).all()):
            raise ValueError(f"{path}: 'nifti_affine' must be a finite 4x4 matrix, got shape {affine.shape}")
        task = _json_attr(f, "task", path)
        _check_task_record(task, path)
        seed = f.attrs.get("noise_seed", -1)
        if isinstance(seed, (np.ndarray, bytes, str)) or not float(seed).is_integer():
            raise ValueError(f"{path}: attribute 'noise_seed' must be an integer, got {seed!r:.80}")
        noise_seed = int(seed)
        record = _json_attr(f, "value_map", path)
        if not isinstance(record, dict):
            raise ValueError(f"{path}: attribute 'value_map' must be a JSON object, got {record!r:.80}")
        value_map = ValueMap.from_dict(record)
        source = _json_attr(f, "source", path)
        resample = _json_attr(f, "resample", path, required=False, default={})
        for key, value in (("source", source), ("resample", resample)):
            if not isinstance(value, dict):
                raise ValueError(f"{path}: attribute '{key}' must be a JSON object, got {value!r:.80}")
        factor = resample.get("factor", [1.0, 1.0])
        if (not isinstance(factor, list) or len(factor) != 2
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v) and v > 0
                           for v in factor)):
            raise ValueError(f"{path}: the resample record's factor must be two positive numbers, got {factor!r:.80}")
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()
                 if k in ("invdiff_version", "created")}
    attrs["path"] = str(path)
    m = Measurement(
        y=y, task=task, noise_seed=None if noise_seed < 0 else noise_seed, value_map=value_map, source=source,
        resample=resample, headers=headers_from_json(headers) if headers is not None else None,
        affine=affine, nifti_header=nifti_header, mask=mask, coil_maps=maps, attrs=attrs,
    )
    if check:
        m.check()
    return m
