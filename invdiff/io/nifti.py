r"""NIfTI volumes in and out (nibabel, the optional extra ``invdiff[nifti]``).

A volume ``(X, Y, Z)`` is read as ``Z`` axial slices; slice ``k`` is
``np.rot90(data[:, :, k])`` (rows along :math:`-Y`, columns along :math:`X`, the usual
radiological display of a RAS volume) and the inverse rotation puts it back, so
:func:`write_nifti` with the source's affine and header restores the voxel grid exactly.
Values are the scaled data (``scl_slope``/``scl_inter`` applied by nibabel). NIfTI has no
modality field: ``modality="auto"`` calls a volume CT when its minimum is at most
-500 (air in Hounsfield units), MR otherwise; the guess is recorded.
A resampled slice grid (factor :math:`f_x, f_y`) gets the affine
:math:`A \, \mathrm{diag}(f_x, f_y, 1, 1)` with its origin moved by :math:`(f-1)/2` voxels.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import atomic_file
from .stack import ImageStack, check_finite

__all__ = ["NIFTI_SUFFIXES", "read_nifti", "write_nifti", "resampled_affine"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise RuntimeError("reading NIfTI needs nibabel: pip install 'invdiff[nifti]'") from None
    return nibabel


def is_nifti_path(path: str | os.PathLike) -> bool:
    name = Path(path).name.lower()
    return name.endswith(".nii") or name.endswith(".nii.gz")


def read_nifti(path: str | os.PathLike, modality: str = "auto") -> ImageStack:
    """Read a 2D or 3D NIfTI file (4D with one volume) into an :class:`ImageStack`.

    :param modality: ``"CT"`` (values are HU), ``"MR"``, or ``"auto"`` (see module doc).
    """
    nib = _nibabel()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such NIfTI file")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.get_fdata(dtype=np.float64))
    except Exception as err:
        raise ValueError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err})".replace("\n", " ")) from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim == 2:
        data = data[..., None]
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 2D or 3D volume, got shape {data.shape}")
    if data.size == 0:
        raise ValueError(f"{path}: empty NIfTI volume (shape {data.shape})")
    check_finite(data, path, "voxels")  # before any statistic of the values (nanmin of all-NaN warns)
    slices = np.stack([np.rot90(data[:, :, k]) for k in range(data.shape[2])])[:, None]
    if modality == "auto":
        modality = "CT" if data.min() <= -500 else "MR"
        rule = "auto: minimum <= -500 -> CT (HU)" if modality == "CT" else "auto: minimum > -500 -> MR"
    else:
        modality, rule = modality.upper(), "given"
    zooms = img.header.get_zooms()
    return ImageStack(
        values=np.ascontiguousarray(slices),
        kind="nifti",
        source=str(path),
        identifiers=[f"{path.name}:{k}" for k in range(data.shape[2])],
        modality=modality,
        units="HU" if modality == "CT" else "stored",
        spacing=(float(zooms[1]), float(zooms[0])),
        affine=np.asarray(img.affine, dtype=np.float64),
        nifti_header=bytes(img.header.binaryblock),
        info={"modality_rule": rule, "dtype": str(img.get_data_dtype())},
    )


def resampled_affine(affine: np.ndarray, factor: tuple[float, float]) -> np.ndarray:
    """Affine of the slice grid resampled by ``factor = (rows, columns)`` (rows run along
    the volume's Y axis, columns along X; see the module doc)."""
    fh, fw = factor
    scale = np.array([[fw, 0, 0, (fw - 1) / 2], [0, fh, 0, (fh - 1) / 2], [0, 0, 1, 0], [0, 0, 0, 1]], float)
    return np.asarray(affine, float) @ scale


def write_nifti(
    path: str | os.PathLike,
    slices: np.ndarray,
    affine: np.ndarray,
    header: bytes | None = None,
    dtype: str | None = None,
    factor: tuple[float, float] = (1.0, 1.0),
    overwrite: bool = False,
) -> Path:
    """Write slices ``(N, H, W)`` (source units) as a NIfTI volume ``(X, Y, N)``.

    :param affine: the source affine (adjusted for ``factor`` here).
    :param header: the source header bytes (keeps units, descriptions, qform/sform codes).
    :param dtype: on-disk data type (the source's). An unscaled integer source gets the
        values rounded and clipped to the type (within its quantisation); a scaled one
        (``scl_slope``/``scl_inter``) gets the scaling nibabel chooses for the new values;
        ``None`` writes float32.
    """
    nib = _nibabel()
    slices = np.asarray(slices, dtype=np.float64)
    if slices.ndim != 3:
        raise ValueError(f"write_nifti: slices must be (N, H, W), got {slices.shape}")
    data = np.stack([np.rot90(s, k=-1) for s in slices], axis=2)
    hdr = nib.Nifti1Header(binaryblock=header) if header is not None else None
    slope, inter = hdr.get_slope_inter() if hdr is not None else (None, None)
    unscaled = slope in (None, 1.0) and inter in (None, 0.0)
    target = np.dtype(dtype) if dtype else np.dtype(np.float32)
    if np.issubdtype(target, np.integer) and unscaled:
        # integer source without scaling: the stored integers, rounded and clipped to the type
        info = np.iinfo(target)
        data = np.clip(np.rint(data), info.min, info.max).astype(target)
    elif not np.issubdtype(target, np.integer):
        data = data.astype(target)
    # (a scaled integer source: nibabel picks scl_slope/scl_inter for the values on writing)
    affine = resampled_affine(affine, factor)
    img = nib.Nifti1Image(data, affine, header=hdr)
    img.set_data_dtype(target)
    img.header.set_zooms(tuple(np.sqrt((affine[:3, :3] ** 2).sum(0))))
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        nib.save(img, str(tmp))
    return path
