r"""DICOM in and out (pydicom).

**Reading** (:func:`read_dicom`): one file, or a folder holding one series (files that
are not DICOM are skipped). Pixel data go through pydicom's decoders, so compressed
transfer syntaxes (JPEG 2000, RLE, JPEG, JPEG-LS, ...) decode when a plugin that handles
them is installed; otherwise the error names the plugins pydicom asked for. The modality
LUT (``RescaleSlope``/``RescaleIntercept``) is applied with
:func:`pydicom.pixels.apply_rescale`, so CT values are Hounsfield units. Slices are
sorted by their position along the slice normal
:math:`\mathbf n = \mathbf r \times \mathbf c` (the two ``ImageOrientationPatient``
direction cosines): the key is :math:`\mathbf n \cdot \text{ImagePositionPatient}`;
without positions, by ``InstanceNumber``, then file name. Multi-frame (enhanced) files give one
slice per frame, each with a classic single-frame header: position, orientation, pixel spacing,
slice thickness and rescale from the functional groups (``PerFrameFunctionalGroupsSequence``,
else ``SharedFunctionalGroupsSequence``), so such a file also reads as a volume; a derived
series is written as classic single-frame files referencing the source frame
(``SourceImageSequence`` with ``ReferencedFrameNumber``), which ``info["note"]`` records.

**Volumes** (:func:`check_volume_geometry`, ``read_dicom(..., volume=True)``): a series read as
one volume must be a regular grid: one ``ImageOrientationPatient`` (to 1e-4), every slice
with an ``ImagePositionPatient``, distinct positions along the normal evenly spaced (each gap
within 1 % of the median, so a missing slice or a second stack is caught), and slices of
one size. Each failure is a one-line ``ValueError`` naming the offending files.

**Writing** (:func:`write_dicom_series`): a new series derived from the source slices:
same patient, study and frame of reference; new ``SeriesInstanceUID`` and
``SOPInstanceUID`` s; ``ImageType`` ``DERIVED\SECONDARY``; ``SeriesDescription`` naming
the method; ``DerivationDescription`` with the provenance; ``SourceImageSequence``
pointing at each source slice; the source's pixel spacing, orientation and position (when
the image was resampled by a factor :math:`f`, spacing is multiplied by :math:`f` and the
first pixel's centre moves by :math:`(f-1)/2` source pixels, so every pixel keeps its
place in patient coordinates). Values are mapped back to stored values with the source's
rescale slope/intercept, rounded and clipped to the source's ``BitsStored`` and
``PixelRepresentation``; files are written uncompressed (Explicit VR Little Endian).
Private tags of the source are not copied (they may describe the acquisition's pixels,
which the derived image no longer is).
"""

from __future__ import annotations

import copy
import datetime
import json
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .stack import ImageStack, check_finite

__all__ = [
    "read_dicom",
    "read_dicom_files",
    "check_volume_geometry",
    "is_dicom_file",
    "write_dicom_series",
    "headers_to_json",
    "headers_from_json",
    "stored_range",
]

#: tags that describe one acquired image and do not carry over to a derived one
_DROP = (
    "PixelData", "SmallestImagePixelValue", "LargestImagePixelValue", "SmallestPixelValueInSeries",
    "LargestPixelValueInSeries", "PixelPaddingValue", "PixelPaddingRangeLimit", "IconImageSequence",
    "NumberOfFrames", "FrameIncrementPointer", "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence", "ModalityLUTSequence", "VOILUTSequence",
)


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True for a file with the DICOM preamble (``DICM`` at byte 128) or a ``.dcm`` suffix."""
    from pydicom.misc import is_dicom

    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix.lower() in (".dcm", ".dicom"):
        return True
    try:
        return bool(is_dicom(path))
    except OSError:
        return False


def _one_line(text: str) -> str:
    return re.sub(r"\s*\n\s*", "; ", str(text).strip())


def _decode(ds, path: Path) -> np.ndarray:
    """Decoded, rescaled pixels ``(F, C, H, W)`` float64, or a one-line error."""
    from pydicom.pixels import apply_rescale

    if "PixelData" not in ds:
        raise ValueError(f"{path}: DICOM file has no pixel data (Modality {ds.get('Modality', '?')}): not an image "
                         "(a structured report, presentation state, ...) or a truncated file")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    ts_name = getattr(ts, "name", str(ts)) if ts is not None else "unknown transfer syntax"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (RuntimeError, NotImplementedError) as err:
        msg = str(err)
        # pydicom lists each plugin and what it needs, one per line
        needs = [ln.strip().lstrip("-").strip() for ln in msg.splitlines()[1:] if ln.strip()]
        if needs:
            raise RuntimeError(
                f"{path}: cannot decode {ts_name} pixel data: no usable pydicom plugin; install one of: "
                + "; ".join(needs)
            ) from None
        raise RuntimeError(f"{path}: cannot decode {ts_name} pixel data: {_one_line(msg)}") from None
    except (ValueError, AttributeError, KeyError, TypeError, EOFError, IndexError, OverflowError, MemoryError,
            struct.error) as err:
        raise ValueError(f"{path}: corrupt or incomplete DICOM pixel data ({ts_name}): {_one_line(err)}") from None
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        arr = np.asarray(arr)
        if spp == 1:
            arr = arr.reshape(frames, 1, *arr.shape[-2:])
        else:
            arr = arr.reshape(frames, *arr.shape[-3:]).transpose(0, 3, 1, 2)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: pixel data do not match NumberOfFrames/SamplesPerPixel/Rows/Columns "
                         f"({_one_line(err)})") from None
    if arr.size == 0:
        raise ValueError(f"{path}: DICOM file has empty pixel data")
    if spp == 1 and str(ds.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        warnings.warn(f"{path}: MONOCHROME1 (inverted display); values are read as stored", stacklevel=3)
    try:
        values = apply_rescale(arr, ds) if spp == 1 else arr
    except Exception as err:  # malformed rescale attributes
        raise ValueError(f"{path}: invalid RescaleSlope/RescaleIntercept: {_one_line(err)}") from None
    return np.asarray(values, dtype=np.float64)


def _read(path: Path, stop_before_pixels: bool = False):
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():  # pydicom's notes on encoding quirks it reads through (one-line errors only)
            warnings.simplefilter("ignore")
            return pydicom.dcmread(path, stop_before_pixels=stop_before_pixels)
    except InvalidDicomError as err:
        raise ValueError(f"{path}: not a DICOM file ({_one_line(err)})") from None
    except (EOFError, OSError, ValueError, KeyError, TypeError, AttributeError, NotImplementedError, IndexError,
            OverflowError, MemoryError, struct.error) as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"{path}: no such DICOM file") from None
        raise ValueError(f"{path}: corrupt DICOM file: {_one_line(err) or type(err).__name__}") from None


def _normal(ds) -> np.ndarray | None:
    iop = ds.get("ImageOrientationPatient")
    if iop is None or len(iop) != 6:
        return None
    r, c = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
    n = np.cross(r, c)
    return n / (np.linalg.norm(n) or 1.0)


def sort_key(ds, name: str):
    n, ipp = _normal(ds), ds.get("ImagePositionPatient")
    try:
        pos = float(np.dot(n, np.asarray(ipp, float))) if n is not None and ipp is not None and len(ipp) == 3 else None
    except (TypeError, ValueError):
        pos = None
    try:
        inst = int(ds.get("InstanceNumber") or 0)
    except (TypeError, ValueError):
        inst = 0
    try:
        frame = int(ds.get("ReferencedFrameNumber") or 0)  # a frame of a multi-frame file (see _frames)
    except (TypeError, ValueError):
        frame = 0
    return (pos is None, pos if pos is not None else 0.0, inst, frame, name)


#: enhanced / multi-frame SOP classes and the classic single-frame class a frame is written as
_CLASSIC = {
    "1.2.840.10008.5.1.4.1.1.2.1": "1.2.840.10008.5.1.4.1.1.2",  # Enhanced CT -> CT Image
    "1.2.840.10008.5.1.4.1.1.2.2": "1.2.840.10008.5.1.4.1.1.2",  # Legacy Converted Enhanced CT
    "1.2.840.10008.5.1.4.1.1.4.1": "1.2.840.10008.5.1.4.1.1.4",  # Enhanced MR -> MR Image
    "1.2.840.10008.5.1.4.1.1.4.4": "1.2.840.10008.5.1.4.1.1.4",  # Legacy Converted Enhanced MR
    "1.2.840.10008.5.1.4.1.1.7.2": "1.2.840.10008.5.1.4.1.1.7",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3": "1.2.840.10008.5.1.4.1.1.7",  # Multi-frame Grayscale Word SC
}
#: multi-frame attributes a frame's own header does not keep
_MULTIFRAME_ONLY = ("PixelData", "NumberOfFrames", "FrameIncrementPointer", "PerFrameFunctionalGroupsSequence",
                    "SharedFunctionalGroupsSequence", "DimensionOrganizationSequence", "DimensionIndexSequence")
MULTIFRAME_NOTE = ("multi-frame DICOM: each frame read as one slice (geometry and rescale from the functional "
                   "groups); a derived DICOM output is written as a classic single-frame series")


def _group_value(groups, sequence: str, keyword: str):
    """``keyword`` of the first item of ``sequence`` in the frame's own functional group, else the shared one."""
    for group in groups:
        seq = group.get(sequence) if group is not None else None
        if seq and keyword in seq[0]:
            return seq[0][keyword].value
    return None


def _frames(path: Path, ds, values: np.ndarray) -> list[tuple[str, object, np.ndarray]]:
    """A multi-frame (enhanced) file as one ``(name, header, values (1, C, H, W))`` per frame,
    each header a classic single-frame one: ``ImagePositionPatient``, ``ImageOrientationPatient``,
    ``PixelSpacing``, ``SliceThickness`` and the rescale from the frame's functional groups
    (``PerFrameFunctionalGroupsSequence``, else ``SharedFunctionalGroupsSequence``); the source
    frame is recorded as ``ReferencedSOPClassUID`` / ``ReferencedSOPInstanceUID`` /
    ``ReferencedFrameNumber`` (the writer moves them into ``SourceImageSequence``)."""
    from pydicom.dataset import Dataset

    shared = ds.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    per = ds.get("PerFrameFunctionalGroupsSequence") or []
    base = Dataset()
    for elem in ds:
        if elem.keyword not in _MULTIFRAME_ONLY:
            base.add(copy.deepcopy(elem))
    if hasattr(ds, "file_meta"):
        base.file_meta = copy.deepcopy(ds.file_meta)
    sop_class = str(ds.get("SOPClassUID", ""))
    rescaled = "RescaleSlope" in ds or "ModalityLUTSequence" in ds  # already applied by _decode
    items = []
    for f in range(values.shape[0]):
        groups = ([per[f]] if f < len(per) else []) + [shared]
        h = copy.deepcopy(base)
        for sequence, keyword in (("PlanePositionSequence", "ImagePositionPatient"),
                                  ("PlaneOrientationSequence", "ImageOrientationPatient"),
                                  ("PixelMeasuresSequence", "PixelSpacing"),
                                  ("PixelMeasuresSequence", "SliceThickness"),
                                  ("PixelMeasuresSequence", "SpacingBetweenSlices")):
            value = _group_value(groups, sequence, keyword)
            if value is not None:
                setattr(h, keyword, value)
        frame = values[f : f + 1]
        slope = _group_value(groups, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _group_value(groups, "PixelValueTransformationSequence", "RescaleIntercept")
        if not rescaled and (slope is not None or intercept is not None):
            try:
                slope_f = float(slope) if slope not in (None, "") else 1.0
                intercept_f = float(intercept) if intercept not in (None, "") else 0.0
            except (TypeError, ValueError):
                raise ValueError(f"{path}: frame {f + 1}: invalid RescaleSlope/RescaleIntercept "
                                 f"({slope!r}, {intercept!r})") from None
            if not (np.isfinite(slope_f) and np.isfinite(intercept_f) and slope_f != 0):
                raise ValueError(f"{path}: frame {f + 1}: invalid RescaleSlope/RescaleIntercept ({slope_f}, {intercept_f})")
            frame = frame * slope_f + intercept_f
            h.RescaleSlope, h.RescaleIntercept = _ds_text(slope_f), _ds_text(intercept_f)
            h.RescaleType = _group_value(groups, "PixelValueTransformationSequence", "RescaleType") or \
                ("HU" if str(ds.get("Modality", "")) == "CT" else "US")
        h.SOPClassUID = _CLASSIC.get(sop_class, sop_class)
        h.ReferencedSOPClassUID = sop_class
        h.ReferencedSOPInstanceUID = str(ds.get("SOPInstanceUID", ""))
        h.ReferencedFrameNumber = f + 1
        items.append((f"{path.name}:{f}", h, frame))
    return items


def read_dicom_files(paths: Sequence[str | os.PathLike]) -> list[tuple[str, object, np.ndarray]]:
    """Read DICOM files: ``[(name, header without pixel data, values (1, C, H, W))]``, sorted
    by slice position (then instance number, frame, name); a multi-frame file gives one entry
    per frame (``"<file>:<index>"``, a classic header per frame: :func:`_frames`)."""
    items = []
    for p in paths:
        p = Path(p)
        ds = _read(p)
        values = _decode(ds, p)
        del ds.PixelData
        if values.shape[0] > 1 or "PerFrameFunctionalGroupsSequence" in ds or "NumberOfFrames" in ds:
            entries = _frames(p, ds, values)
        else:
            entries = [(p.name, ds, values)]
        for _, _, v in entries:
            check_finite(v, p, "pixel values")
        items.extend(entries)
    items.sort(key=lambda it: sort_key(it[1], it[0]))
    return items


def _spacing(ds) -> tuple[float, float] | None:
    ps = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return (float(ps[0]), float(ps[1])) if ps is not None and len(ps) == 2 else None


def _listing(names: Sequence[str], limit: int = 6) -> str:
    names = list(names)
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _minority(keys: Sequence, names: Sequence[str]) -> tuple[object, list[str], object]:
    """The most common key, the names whose key differs from it, and the first such key."""
    counts: dict = {}
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    common = max(counts, key=lambda key: (counts[key], -list(keys).index(key)))
    odd = [n for n, key in zip(names, keys) if key != common]
    return common, odd, next((key for key in keys if key != common), None)


def _cosines(orientation) -> str:
    """Direction cosines in the DICOM spelling ``1\\0\\0\\0\\1\\0``."""
    return "\\".join(f"{v:g}" for v in orientation)


def check_volume_geometry(headers: Sequence, names: Sequence[str], where: str = "DICOM series",
                          tolerance: float = 0.01) -> float | None:
    """Check that slices (sorted by position) form one regular volume, as a joint 3D
    reconstruction assumes (module doc): one orientation, evenly spaced positions, one size.

    :param headers: one dataset per slice, in slice order (:func:`read_dicom`'s).
    :param names: the slices' file names (for the messages).
    :param where: the series, for the messages.
    :param tolerance: largest relative deviation of a gap from the median gap.
    :returns: the slice spacing in mm (``None`` for a single slice).
    :raises ValueError: one line naming the offending files.
    """
    n = len(headers)
    if len(names) != n:
        raise ValueError(f"{where}: {len(names)} slice names for {n} headers")
    sizes = [(int(h.get("Rows", 0) or 0), int(h.get("Columns", 0) or 0)) for h in headers]
    common, odd, other = _minority(sizes, names)
    if odd:
        raise ValueError(f"{where}: slices of different sizes: {_listing(odd)} are {other[0]}x{other[1]}, the others "
                         f"{common[0]}x{common[1]}; a volume needs one slice size")
    if n < 2:
        return None
    if len({(str(h.get("SOPInstanceUID", id(h))), str(h.get("ReferencedFrameNumber", ""))) for h in headers}) == 1:
        raise ValueError(f"{where}: a multi-frame file ({names[0].split(':')[0]}); its per-frame positions are not read, "
                         "so it cannot be checked as a volume; use a series of single-frame files")
    missing = [nm for nm, h in zip(names, headers) if _normal(h) is None or len(h.get("ImagePositionPatient") or []) != 3]
    if missing:
        raise ValueError(f"{where}: {_listing(missing)} lack ImageOrientationPatient/ImagePositionPatient; "
                         "a volume needs the position of every slice")
    orientations = [tuple(round(float(v), 4) + 0.0 for v in h.ImageOrientationPatient) for h in headers]
    common, odd, other = _minority(orientations, names)
    if odd:
        raise ValueError(f"{where}: mixed orientations (ImageOrientationPatient): {_listing(odd)} have "
                         f"{_cosines(other)}, the others {_cosines(common)}; a volume needs one orientation")
    normal = _normal(headers[0])
    z = np.array([float(np.dot(normal, np.asarray(h.ImagePositionPatient, float))) for h in headers])
    gaps = np.diff(z)
    same = [i for i, g in enumerate(gaps) if abs(g) < 1e-6]
    if same:
        pairs = "; ".join(f"{names[i]} and {names[i + 1]}" for i in same[:3])
        raise ValueError(f"{where}: slices at the same position: {pairs}{' ...' if len(same) > 3 else ''}; "
                         "a volume needs one slice per position (two stacks in one series?)")
    spacing = float(np.median(gaps))
    uneven = [i for i, g in enumerate(gaps) if abs(g - spacing) > tolerance * abs(spacing)]
    if uneven:
        pairs = "; ".join(f"{names[i]} -> {names[i + 1]} is {gaps[i]:.4g} mm" for i in uneven[:3])
        raise ValueError(f"{where}: uneven slice spacing (gaps in ImagePositionPatient): {pairs}"
                         f"{' ...' if len(uneven) > 3 else ''}, the others {spacing:.4g} mm; a volume needs "
                         "evenly spaced slices (a missing slice?)")
    return abs(spacing)


def read_dicom(path: str | os.PathLike, series_uid: str | None = None, volume: bool = False) -> ImageStack:
    """Read a DICOM file or a folder holding one series into an :class:`ImageStack`.

    :param path: a ``.dcm`` file (or any file with the DICOM preamble) or a folder.
    :param series_uid: pick this ``SeriesInstanceUID`` when the folder holds several.
    :param volume: also check that the slices form one regular volume
        (:func:`check_volume_geometry`; the spacing is recorded as ``info["slice_spacing"]``).
    :raises FileNotFoundError: no such path, or a folder without DICOM files.
    :raises ValueError: corrupt file, several series, slices of different sizes (naming
        the files); with ``volume``, mixed orientations or uneven slice positions.
    :raises RuntimeError: compressed pixel data that no installed plugin decodes (the
        message names the plugins).

    >>> from pydicom.data import get_testdata_file
    >>> ct = read_dicom(get_testdata_file("CT_small.dcm"))
    >>> ct.shape, ct.modality, ct.units, float(ct.values.min())
    ((1, 1, 128, 128), 'CT', 'HU', -896.0)
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such DICOM file or folder")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if not p.name.startswith(".") and is_dicom_file(p))
        if not files:
            raise FileNotFoundError(f"{path}: folder holds no DICOM files")
    else:
        files = [path]
    items = read_dicom_files(files)
    uids = {}
    for name, ds, _ in items:
        uids.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(name)
    if series_uid is not None:
        if series_uid not in uids:
            raise ValueError(f"{path}: no series {series_uid}; found {', '.join(uids)}")
        items = [it for it in items if str(it[1].get("SeriesInstanceUID", "")) == series_uid]
    elif len(uids) > 1:
        listing = ", ".join(f"{u or '(none)'} ({len(v)} files)" for u, v in uids.items())
        raise ValueError(f"{path}: folder holds {len(uids)} series: {listing}; pass one series (series_uid=)")
    shapes = [it[2].shape[2:] for it in items]
    common, odd, other = _minority(shapes, [it[0] for it in items])
    if odd:
        raise ValueError(f"{path}: slices of different sizes in one series: {_listing(odd)} are "
                         f"{other[0]}x{other[1]}, the others {common[0]}x{common[1]}")
    channels = {it[2].shape[1] for it in items}
    if len(channels) > 1:
        raise ValueError(f"{path}: slices with different numbers of channels {sorted(channels)} in one series")
    headers, names, slices = [], [], []
    for name, ds, values in items:
        frames = values.shape[0]
        for f in range(frames):
            headers.append(ds)
            names.append(name if frames == 1 else f"{name}:{f}")
            slices.append(values[f])
    first = items[0][1]
    modality = str(first.get("Modality", "")) or None
    units = "HU" if modality == "CT" and "RescaleIntercept" in first else "stored"
    multiframe = any("ReferencedFrameNumber" in it[1] for it in items)
    meta = getattr(first, "file_meta", None)
    info = {"multiframe": multiframe, "transfer_syntax": str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""}
    if multiframe:
        info["note"] = MULTIFRAME_NOTE
    if volume:
        info["slice_spacing"] = check_volume_geometry(headers, names, str(path))
    return ImageStack(
        values=np.stack(slices),
        kind="dicom",
        source=str(path),
        identifiers=names,
        modality=modality,
        units=units,
        spacing=_spacing(first),
        headers=headers,
        info=info,
    )


# ----------------------------------------------------------------------------- writing


def stored_range(ds) -> tuple[int, int, np.dtype]:
    """``(min, max, dtype)`` of the stored values allowed by ``BitsStored``/``PixelRepresentation``."""
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    allocated = int(ds.get("BitsAllocated", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    if allocated not in (8, 16, 32):
        raise ValueError(f"cannot write DICOM with BitsAllocated={allocated}")
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}").newbyteorder("<")
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return lo, hi, dtype


def _to_stored(values: np.ndarray, ds) -> np.ndarray:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    lo, hi, dtype = stored_range(ds)
    stored = np.rint((np.asarray(values, np.float64) - intercept) / slope)
    return np.clip(stored, lo, hi).astype(dtype)


def _ds_text(value: float) -> str:
    """A DICOM decimal string (at most 16 characters)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.6e}"


def _resampled_geometry(ds, factor: tuple[float, float]) -> None:
    fh, fw = factor
    if (fh, fw) == (1.0, 1.0):
        return
    ps = _spacing(ds)
    if ps is None:
        return
    ds.PixelSpacing = [_ds_text(ps[0] * fh), _ds_text(ps[1] * fw)]
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if iop is not None and ipp is not None and len(iop) == 6 and len(ipp) == 3:
        row_dir, col_dir = np.asarray(iop[:3], float), np.asarray(iop[3:], float)
        # the first pixel's centre moves by (f - 1) / 2 source pixels along each axis
        shift = row_dir * (fw - 1) / 2 * ps[1] + col_dir * (fh - 1) / 2 * ps[0]
        ds.ImagePositionPatient = [_ds_text(v) for v in np.asarray(ipp, float) + shift]


def write_dicom_series(
    folder: str | os.PathLike,
    values: np.ndarray,
    headers: Sequence,
    *,
    description: str,
    derivation: str = "",
    series_number: int | None = None,
    factor: tuple[float, float] = (1.0, 1.0),
    window: tuple[float, float] | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """Write ``values`` as a new DICOM series derived from ``headers`` into ``folder``.

    :param folder: an existing, empty folder (use :func:`invdiff.io.atomic_dir` around it
        so a failed write leaves nothing behind).
    :param values: ``(N, H, W)`` in the source's units (HU for CT), one per header.
    :param headers: the source slices' datasets (from :func:`read_dicom` or
        :func:`headers_from_json`).
    :param description: ``SeriesDescription`` (cut to the 64 characters DICOM allows).
    :param derivation: ``DerivationDescription`` (provenance; cut to 1024 characters).
    :param series_number: default: the source's + 1000.
    :param factor: resampling factor ``(rows, columns)`` of ``values`` relative to the
        source grid (``2`` = half as many rows), recorded in the geometry.
    :param window: display ``(center, width)``; default: the source's.
    :param series_uid: default: a new UID.
    :returns: the files written, ``IM00001.dcm``, ... in slice order.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.sequence import Sequence as DicomSequence
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

    from .. import __version__

    values = np.asarray(values)
    if values.ndim != 3 or values.shape[0] != len(headers):
        raise ValueError(f"write_dicom_series: values {values.shape} must be (N, H, W) with N = {len(headers)} headers")
    if any(int(h.get("SamplesPerPixel", 1) or 1) != 1 for h in headers):
        raise ValueError("write_dicom_series: only monochrome sources can be written back")
    if len({id(h) for h in headers}) != len(headers):
        raise ValueError("write_dicom_series: one header per slice, not the same header for several slices "
                         "(read a multi-frame file with read_dicom: it gives one header per frame)")
    folder = Path(folder)
    series_uid = series_uid or generate_uid()
    now = datetime.datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S.%f")
    written = []
    for k, (src, img) in enumerate(zip(headers, values)):
        ds = copy.deepcopy(src)
        ds.remove_private_tags()
        for keyword in _DROP:
            if keyword in ds:
                delattr(ds, keyword)
        sop_uid = generate_uid()
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series_uid
        ds.ImageType = ["DERIVED", "SECONDARY"]
        ds.SeriesDescription = description[:64]
        if derivation:
            ds.DerivationDescription = derivation[:1024]
        ds.SeriesNumber = int(series_number if series_number is not None else int(src.get("SeriesNumber", 0) or 0) + 1000)
        ds.InstanceNumber = k + 1
        ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = date
        ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = time
        ds.SoftwareVersions = f"invdiff {__version__}"
        ds.BurnedInAnnotation = "NO"
        ref = pydicom.Dataset()
        if "ReferencedFrameNumber" in src:  # a frame of a multi-frame source, written as a classic slice
            ref.ReferencedSOPClassUID = src.ReferencedSOPClassUID
            ref.ReferencedSOPInstanceUID = src.ReferencedSOPInstanceUID
            ref.ReferencedFrameNumber = src.ReferencedFrameNumber
            for keyword in ("ReferencedSOPClassUID", "ReferencedSOPInstanceUID", "ReferencedFrameNumber"):
                delattr(ds, keyword)
        else:
            ref.ReferencedSOPClassUID = src.SOPClassUID
            ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
        ds.SourceImageSequence = DicomSequence([ref])
        _resampled_geometry(ds, factor)
        stored = _to_stored(img, ds)
        ds.Rows, ds.Columns = int(stored.shape[0]), int(stored.shape[1])
        ds.SamplesPerPixel = 1
        if str(ds.get("PhotometricInterpretation", "")) not in ("MONOCHROME1", "MONOCHROME2"):
            ds.PhotometricInterpretation = "MONOCHROME2"
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = _ds_text(window[0]), _ds_text(max(window[1], 1e-6))
        ds.PixelData = stored.tobytes()
        ds["PixelData"].VR = "OW" if stored.dtype.itemsize > 1 else "OB"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.preamble = b"\x00" * 128
        out = folder / f"IM{k + 1:05d}.dcm"
        ds.save_as(out, enforce_file_format=True)
        written.append(out)
    return written


# ------------------------------------------------------------------------ JSON headers


def headers_to_json(headers: Sequence) -> list[str]:
    """Each header (pixel data removed) as DICOM JSON (``Dataset.to_json_dict``), with its
    ``TransferSyntaxUID`` kept under the key ``"_transfer_syntax"``; private tags dropped."""
    out = []
    for ds in headers:
        ds = copy.copy(ds)
        ds.remove_private_tags()
        if "PixelData" in ds:
            del ds.PixelData
        record = ds.to_json_dict(bulk_data_threshold=1 << 30)
        record["_transfer_syntax"] = {"Value": [str(getattr(ds, "file_meta", {}).get("TransferSyntaxUID", ""))]}
        out.append(json.dumps(record))
    return out


def headers_from_json(records: Sequence[str]) -> list:
    """Inverse of :func:`headers_to_json`."""
    import pydicom

    headers = []
    for text in records:
        record = json.loads(text)
        record.pop("_transfer_syntax", None)
        try:
            headers.append(pydicom.Dataset.from_json(record))
        except Exception as err:
            raise ValueError(f"invalid DICOM header record in measurement file: {_one_line(err)}") from None
    return headers
