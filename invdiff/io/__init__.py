r"""Medical and ordinary images in and out: DICOM, NIfTI, fastMRI ``.h5``, PNG/TIFF, and
invdiff's measurement files.

* :func:`read` — any one source (a DICOM file or series folder, a NIfTI volume, a PNG or
  TIFF) as an :class:`ImageStack` in the source's units;
* :func:`read_image_folder` — every readable image in a folder as ``(identifier,
  (C, H, W) float32 tensor in [0, 1])``, for benchmarks;
* :func:`read_fastmri` — k-space files of the fastMRI layout;
* :func:`write_dicom_series`, :func:`write_nifti`, :func:`write_image`, :func:`write_png`
  — derived outputs, written to a temporary name and renamed;
* :func:`save_measurement` / :func:`load_measurement` — measurements with the operator's
  full record and seed (see :mod:`invdiff.io.measurement`).

Values map to [0, 1] by :class:`ValueMap` (CT: HU window ``[-1000, 1000]``; MR and other:
the 99.5th percentile; 8/16-bit images: ``v / (2^bits - 1)``).
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path

import torch

from ..files import atomic_dir, atomic_file, check_new_path
from .dicom import (check_volume_geometry, headers_from_json, headers_to_json, is_dicom_file, read_dicom,
                    write_dicom_series)
from .fastmri import KSpaceData, estimate_coil_maps, read_fastmri, write_fastmri
from .images import IMAGE_SUFFIXES, read_image, write_image, write_png
from .intensity import HU_WINDOW, ROBUST_PERCENTILE, ValueMap, value_map_for
from .measurement import Measurement, load_measurement, save_measurement
from .nifti import is_nifti_path, read_nifti, write_nifti
from .stack import ImageStack

__all__ = [
    "ImageStack",
    "ValueMap",
    "value_map_for",
    "HU_WINDOW",
    "ROBUST_PERCENTILE",
    "read",
    "read_image_folder",
    "read_dicom",
    "read_nifti",
    "read_image",
    "read_fastmri",
    "write_fastmri",
    "KSpaceData",
    "estimate_coil_maps",
    "write_dicom_series",
    "check_volume_geometry",
    "write_nifti",
    "write_image",
    "write_png",
    "headers_to_json",
    "headers_from_json",
    "Measurement",
    "save_measurement",
    "load_measurement",
    "atomic_file",
    "atomic_dir",
    "check_new_path",
    "source_kind",
]


def source_kind(path: str | os.PathLike) -> str:
    """``"dicom"``, ``"nifti"``, ``"png"``, ``"tiff"`` or ``"fastmri"`` (``.h5`` with
    ``kspace``) for a path; a folder is a DICOM series.

    :raises FileNotFoundError: no such path.
    :raises ValueError: a file of no known kind.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if path.is_dir():
        return "dicom"
    suffix = path.suffix.lower()
    if is_nifti_path(path):
        return "nifti"
    if suffix == ".png":
        return "png"
    if suffix in (".tif", ".tiff"):
        return "tiff"
    if suffix in (".h5", ".hdf5"):
        return "fastmri"
    if is_dicom_file(path):
        return "dicom"
    raise ValueError(f"{path}: unknown image format (expected DICOM, NIfTI, PNG, TIFF or a fastMRI .h5)")


def read(path: str | os.PathLike, modality: str = "auto", volume: bool = False) -> ImageStack:
    """Read a DICOM file or series folder, a NIfTI volume, or a PNG/TIFF image.

    :param modality: for NIfTI only (``"CT"``, ``"MR"`` or ``"auto"``); DICOM states its own.
    :param volume: a DICOM series must be one regular volume (one orientation, evenly
        spaced slices, one size: :func:`invdiff.io.dicom.check_volume_geometry`); a NIfTI
        volume is one by construction.

    >>> from pydicom.data import get_testdata_file
    >>> read(get_testdata_file("MR_small.dcm")).shape
    (1, 1, 64, 64)
    """
    kind = source_kind(path)
    try:
        if kind == "dicom":
            return read_dicom(path, volume=volume)
        if kind == "nifti":
            return read_nifti(path, modality)
        if kind in ("png", "tiff"):
            return read_image(path)
    except (FileNotFoundError, ImportError):
        raise
    except (ValueError, RuntimeError) as err:  # the readers' own messages, kept to one line naming the source
        text = " ".join(str(err).split())
        cls = type(err) if type(err) in (ValueError, RuntimeError) else ValueError
        raise cls(text if str(path) in text else f"{path}: {text}") from None
    except (OSError, KeyError, TypeError, AttributeError, IndexError, OverflowError, MemoryError, EOFError,
            struct.error) as err:
        # an odd header or a damaged file the readers did not foresee: still one line, never a traceback
        raise ValueError(f"{path}: unreadable {kind} source ({type(err).__name__}: "
                         f"{' '.join(str(err).split()) or 'no detail'})") from None
    raise ValueError(f"{path}: a fastMRI k-space file is a measurement, not an image; use read_fastmri")


def read_image_folder(path: str | os.PathLike) -> list[tuple[str, torch.Tensor]]:
    """Every readable image in a folder, as ``(identifier, float32 tensor (C, H, W) in [0, 1])``.

    PNG/TIFF files (one entry per page), DICOM files (grouped by series; each series
    sorted by slice position and normalised as a whole: CT with the HU window
    ``[-1000, 1000]``, others by their 99.5th percentile), NIfTI volumes split into axial
    slices (``"<file>:<k>"``). Files are visited in name order; sub-folders and hidden
    files are skipped, as are files of other kinds. A file that looks like an image but
    cannot be decoded is skipped with a warning naming it and the reason.

    :raises FileNotFoundError: ``path`` is not a folder.
    :raises ValueError: the folder holds no readable image.

    >>> import tempfile, numpy as np
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = write_image(f"{folder}/a.png", np.full((4, 6), 255.0))
    ...     [(name, tuple(x.shape), x.max().item()) for name, x in read_image_folder(folder)]
    [('a.png', (1, 4, 6), 1.0)]
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    # blocks of entries, ordered by the (first) file name of each block
    blocks: list[tuple[str, list[tuple[str, torch.Tensor]]]] = []
    dicom_files = []
    for p in files:
        try:
            if is_nifti_path(p):
                stack = read_nifti(p)
            elif p.suffix.lower() in IMAGE_SUFFIXES:
                stack = read_image(p)
            elif is_dicom_file(p):
                dicom_files.append(p)
                continue
            else:
                continue
        except (ValueError, RuntimeError) as err:
            warnings.warn(f"skipped {p.name}: {err}", stacklevel=2)
            continue
        blocks.append((p.name, list(zip(stack.identifiers, stack.to_unit().unbind(0)))))
    blocks.extend(_dicom_blocks(dicom_files))
    if not blocks:
        raise ValueError(f"{folder}: no readable images (PNG, TIFF, DICOM, NIfTI)")
    blocks.sort(key=lambda block: block[0])
    return [entry for _, entries in blocks for entry in entries]


def _dicom_blocks(paths: list[Path]) -> list[tuple[str, list[tuple[str, torch.Tensor]]]]:
    """DICOM files grouped by series (slices of one size), each sorted by position and
    normalised as a whole; keyed by the series' first file name."""
    import numpy as np

    from .dicom import read_dicom_files, sort_key

    readable = []
    for p in paths:
        try:
            readable.extend(read_dicom_files([p]))
        except (ValueError, RuntimeError) as err:
            warnings.warn(f"skipped {p.name}: {err}", stacklevel=3)
    groups: dict[tuple, list] = {}
    for item in readable:
        uid = str(item[1].get("SeriesInstanceUID", "")) or item[0]
        groups.setdefault((uid, item[2].shape[1:]), []).append(item)
    blocks = []
    for items in groups.values():
        items.sort(key=lambda it: sort_key(it[1], it[0]))
        values = np.concatenate([it[2] for it in items])
        vm = value_map_for(values, str(items[0][1].get("Modality", "")) or None)
        names = [n if v.shape[0] == 1 else f"{n}:{f}" for n, _, v in items for f in range(v.shape[0])]
        x = torch.from_numpy(vm.to_unit(values)).float()
        blocks.append((min(it[0] for it in items), list(zip(names, x.unbind(0)))))
    return blocks
