"""The in-memory image record of :mod:`invdiff.io`: values in source units plus what is
needed to write a derived image back (DICOM headers, NIfTI affine, bit depth)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .intensity import HU_WINDOW, ROBUST_PERCENTILE, ValueMap, value_map_for

__all__ = ["ImageStack", "check_finite"]


def check_finite(values, source, what: str = "values") -> None:
    """Refuse images with NaN or Inf values, before any work: one line naming the file and how
    many values (a single NaN would spread through every measurement it touches).

    :raises ValueError: ``"<source>: 1 of 16384 voxels is NaN/Inf; invdiff needs finite images"``.
    """
    values = np.asarray(values)
    if values.dtype.kind not in "fc":
        return
    bad = int(values.size - np.count_nonzero(np.isfinite(values)))
    if bad:
        verb = "is" if bad == 1 else "are"
        raise ValueError(f"{source}: {bad} of {values.size} {what} {verb} NaN/Inf; invdiff needs finite images")


@dataclass
class ImageStack:
    """A stack of 2D slices read from one source.

    :ivar values: ``(N, C, H, W)`` float64 in the source's units (HU for CT).
    :ivar kind: ``"dicom"``, ``"nifti"``, ``"png"``, ``"tiff"``.
    :ivar source: the file or folder read.
    :ivar identifiers: one name per slice (file name, or ``"<file>:<index>"``).
    :ivar modality: DICOM modality (``"CT"``, ``"MR"``, ...), the NIfTI guess, or ``None``.
    :ivar units: ``"HU"`` for CT, ``"stored"`` (after the DICOM modality LUT) or ``"intensity"``.
    :ivar spacing: pixel spacing ``(between rows, between columns)`` in mm, if known.
    :ivar headers: DICOM: one :class:`pydicom.Dataset` per slice, pixel data removed.
    :ivar affine: NIfTI: the 4×4 voxel-to-world affine.
    :ivar nifti_header: NIfTI: the raw header bytes (``header.binaryblock``).
    :ivar bits: PNG/TIFF: integer bit depth (8 or 16), ``None`` for float images.
    :ivar info: anything else worth recording (e.g. how the NIfTI modality was guessed).
    """

    values: np.ndarray
    kind: str
    source: str
    identifiers: list[str]
    modality: str | None = None
    units: str = "stored"
    spacing: tuple[float, float] | None = None
    headers: list | None = None
    affine: np.ndarray | None = None
    nifti_header: bytes | None = None
    bits: int | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.values.ndim != 4:
            raise ValueError(f"{self.source}: ImageStack values must be (N, C, H, W), got {self.values.shape}")
        if len(self.identifiers) != self.values.shape[0]:
            raise ValueError(f"{self.source}: {len(self.identifiers)} identifiers for {self.values.shape[0]} slices")
        check_finite(self.values, self.source, "voxels" if self.kind == "nifti" else "pixel values")

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.values.shape)

    def value_map(self, window: tuple[float, float] = HU_WINDOW, percentile: float = ROBUST_PERCENTILE) -> ValueMap:
        """The :func:`~invdiff.io.intensity.value_map_for` rule for this stack."""
        return value_map_for(self.values, self.modality, self.bits, window, percentile)

    def to_unit(self, value_map: ValueMap | None = None) -> torch.Tensor:
        """The slices as a float32 tensor ``(N, C, H, W)`` in [0, 1]."""
        vm = self.value_map() if value_map is None else value_map
        return torch.from_numpy(vm.to_unit(self.values)).float()
