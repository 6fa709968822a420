"""Brain MRI slices from the MNI152 T1 template that ``nilearn`` ships (no download).

The template (ICBM 2009a nonlinear symmetric, 1 mm, 197 x 233 x 189) is read with
nibabel from nilearn's package data. Slices are taken in the three orientations, kept
when the head covers at least 12 % of the slice, cropped to the head's square bounding
box (plus a margin), resized with anti-aliasing to the requested size and scaled by the
volume's 99.5th percentile to ``[0, 1]``.

**Held-out slices.** A fixed set of slices (:data:`HELDOUT`) is reserved for evaluation:
6 axial, 5 coronal and 5 sagittal slices spread over the brain. Training uses every
other usable slice *except* those within :data:`GUARD` mm of a held-out slice — or of
its mirror image for sagittal slices, since the template is left-right symmetric — so no
training slice is a near-duplicate of an evaluation slice (neighbouring 1 mm slices of
the template are almost identical).

The 16 held-out slices ship with invdiff (``mni_heldout.npz``: the template's own uint8
voxels of those slices and its intensity scale, 0.3 MB), so the demo and the benchmark run
on a plain install; :func:`heldout_from_template` rebuilds that file from nilearn's
template, and a test checks the two are identical. The training slices need the optional
extra ``pip install "invdiff[train]"`` (nibabel, nilearn).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

__all__ = ["template_path", "load_template", "slices", "heldout_from_template", "write_heldout", "HELDOUT", "GUARD",
           "ORIENTATIONS", "HELDOUT_FILE"]

ORIENTATIONS = ("axial", "coronal", "sagittal")
_AXIS = {"sagittal": 0, "coronal": 1, "axial": 2}

#: Held-out slice indices (voxel index along the orientation's axis of the template).
HELDOUT: dict[str, tuple[int, ...]] = {
    "axial": (48, 64, 80, 96, 112, 124),
    "coronal": (65, 95, 125, 150, 170),
    "sagittal": (50, 62, 74, 86, 98),
}
#: Training slices are more than this many slices (mm) away from every held-out slice
#: (and, for sagittal slices, from its mirror image: the template is left-right symmetric).
GUARD = 3
_MIN_COVER = 0.12
_MARGIN = 4
#: The held-out slices as shipped with the package (see the module doc).
HELDOUT_FILE = Path(__file__).with_name("mni_heldout.npz")
_EXTRA = "pip install 'invdiff[train]'"


def template_path() -> Path:
    """Path of the MNI152 T1 template inside the installed nilearn package."""
    try:
        import nilearn
    except ImportError as err:
        raise ImportError(f"the MNI training slices need nilearn and nibabel: {_EXTRA}") from err
    path = Path(nilearn.__file__).parent / "datasets" / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the MNI152 template is missing from the installed nilearn")
    return path


@lru_cache(maxsize=1)
def _raw_template() -> tuple[np.ndarray, float]:
    """The template's voxels as stored (uint8) and the intensity scale: the 99.5th
    percentile of its non-zero voxels."""
    path = template_path()
    try:
        import nibabel as nib
    except ImportError as err:
        raise ImportError(f"the MNI training slices need nibabel: {_EXTRA}") from err
    raw = np.asarray(nib.load(str(path)).dataobj)
    vol = raw.astype(np.float32)
    return raw, float(np.percentile(vol[vol > 0], 99.5))


def _scaled(raw: np.ndarray, scale: float) -> np.ndarray:
    return np.clip(raw.astype(np.float32) / np.float32(scale), 0, 1)


@lru_cache(maxsize=1)
def load_template() -> np.ndarray:
    """The template volume as float32, scaled so its 99.5th percentile is 1 (clipped)."""
    raw, scale = _raw_template()
    return _scaled(raw, scale)


def heldout_from_template() -> dict[str, np.ndarray]:
    """The content of :data:`HELDOUT_FILE`, computed from nilearn's template: one uint8
    slice per held-out index (``"axial_48"``, ...) and the template's ``scale``."""
    raw, scale = _raw_template()
    out: dict[str, np.ndarray] = {"scale": np.float64(scale)}
    for o in ORIENTATIONS:
        for i in HELDOUT[o]:
            out[f"{o}_{i}"] = np.ascontiguousarray(np.moveaxis(raw, _AXIS[o], 0)[i])
    return out


def write_heldout(path: Path = HELDOUT_FILE) -> Path:
    """Write :func:`heldout_from_template` to ``path`` (compressed ``.npz``, no pickle)."""
    np.savez_compressed(path, **heldout_from_template())
    return path


@lru_cache(maxsize=1)
def _shipped_heldout() -> dict[str, np.ndarray]:
    with np.load(HELDOUT_FILE, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    scale = float(data.pop("scale"))
    return {k: _scaled(v, scale) for k, v in data.items()}


def _usable(vol: np.ndarray, axis: int) -> np.ndarray:
    cover = (np.moveaxis(vol, axis, 0) > 0.05).mean(axis=(1, 2))
    return np.nonzero(cover >= _MIN_COVER)[0]


def _render(sl: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import resize

    sl = np.rot90(sl)  # radiological display: anterior/superior up
    rows, cols = np.nonzero(sl > 0.05)
    r0, r1, c0, c1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    side = max(r1 - r0, c1 - c0) + 2 * _MARGIN
    out = np.zeros((side, side), np.float32)
    h, w = r1 - r0, c1 - c0
    out[(side - h) // 2:(side - h) // 2 + h, (side - w) // 2:(side - w) // 2 + w] = sl[r0:r1, c0:c1]
    return np.clip(resize(out, (size, size), anti_aliasing=True, order=1), 0, 1)


def slice_indices(split: str) -> dict[str, list[int]]:
    """Slice indices per orientation for ``split`` = ``"train"`` or ``"heldout"``."""
    if split == "heldout":
        return {o: list(HELDOUT[o]) for o in ORIENTATIONS}
    if split != "train":
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    vol = load_template()
    out = {}
    for o in ORIENTATIONS:
        held = np.asarray(HELDOUT[o])
        if o == "sagittal":
            held = np.concatenate([held, vol.shape[_AXIS[o]] - 1 - held])
        out[o] = [int(i) for i in _usable(vol, _AXIS[o]) if np.abs(held - i).min() > GUARD]
    return out


def slices(split: str = "train", size: int = 64, orientations: tuple[str, ...] = ORIENTATIONS) -> torch.Tensor:
    """MNI152 T1 slices, ``(n, 1, size, size)`` float32 in ``[0, 1]``.

    :param split: ``"train"`` (every usable slice outside the guard band around the
        held-out slices; needs the ``train`` extra) or ``"heldout"`` (the 16 slices of
        :data:`HELDOUT`, in the order axial, coronal, sagittal; shipped with invdiff).
    :param size: output side in pixels.
    :param orientations: which orientations to include.
    """
    for o in orientations:
        if o not in _AXIS:
            raise ValueError(f"unknown orientation {o!r}; use {ORIENTATIONS}")
    index = slice_indices(split)
    out = []
    if split == "heldout":  # shipped with the package: no nibabel / nilearn needed
        shipped = _shipped_heldout()
        for o in orientations:
            out.extend(_render(shipped[f"{o}_{i}"], size) for i in index[o])
    else:
        vol = load_template()
        for o in orientations:
            moved = np.moveaxis(vol, _AXIS[o], 0)
            out.extend(_render(moved[i], size) for i in index[o])
    return torch.from_numpy(np.stack(out)[:, None].astype(np.float32))
