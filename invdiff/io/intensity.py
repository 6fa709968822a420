r"""Mapping scanner values to the [0, 1] images priors work on, and back.

Every image read by :mod:`invdiff.io` keeps its values in the source's units (Hounsfield
units for CT, the stored value after the DICOM modality LUT otherwise). A
:class:`ValueMap` is the affine map to the prior's range, stored with every measurement
and every reconstruction so the result is written back in the source's units:

.. math::

    x = \operatorname{clip}\Big(\frac{v - \text{offset}}{\text{scale}}, 0, 1\Big), \qquad
    v = \text{offset} + \text{scale}\cdot x, \qquad
    \operatorname{std}(v) = \text{scale}\cdot\operatorname{std}(x).

Rules (:func:`value_map_for`):

* **CT** (Hounsfield units): the window ``[low, high]`` (default ``[-1000, 1000]``, the
  shipped CT prior's) maps to [0, 1]: ``x = (HU + 1000) / 2000`` clipped — air 0, water
  0.5, dense bone 1. Values outside the window are clipped.
* **integer images** (PNG/TIFF): ``x = v / (2^bits - 1)``.
* **anything else** (MR magnitude, float TIFF, ...): ``offset = 0`` (or the 0.5th
  percentile when values are negative) and ``scale`` = the 99.5th percentile minus the
  offset, over the whole series or volume (one map for all slices). The brightest 0.5 %
  are clipped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import torch

__all__ = ["ValueMap", "value_map_for", "HU_WINDOW", "ROBUST_PERCENTILE"]

#: HU window mapped to [0, 1] for CT (the shipped ``ct-phantom-64`` prior's).
HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)
#: percentile of the values mapped to 1 for MR and other non-CT images.
ROBUST_PERCENTILE = 99.5


@dataclass(frozen=True)
class ValueMap:
    """``x = clip((v - offset) / scale, 0, 1)`` and its inverse ``v = offset + scale x``.

    :param offset: source value mapped to 0.
    :param scale: source units per unit of ``x`` (> 0).
    :param units: the source's units (``"HU"``, ``"stored"``, ``"intensity"``).
    :param rule: how it was chosen, for the record (e.g. ``"window [-1000, 1000] HU"``).

    >>> m = ValueMap(offset=-1000.0, scale=2000.0, units="HU", rule="window")
    >>> float(m.to_unit(np.array(0.0))), float(m.from_unit(np.array(0.5)))
    (0.5, 0.0)
    """

    offset: float
    scale: float
    units: str = "stored"
    rule: str = ""

    def __post_init__(self) -> None:
        if not np.isfinite(self.scale) or self.scale <= 0 or not np.isfinite(self.offset):
            raise ValueError(f"ValueMap: scale must be finite and > 0, offset finite; got {self.scale}, {self.offset}")

    def to_unit(self, values):
        """Source values -> [0, 1] (numpy array or tensor; clipped)."""
        x = (values - self.offset) / self.scale
        return x.clamp(0, 1) if isinstance(x, torch.Tensor) else np.clip(x, 0.0, 1.0)

    def from_unit(self, x):
        """[0, 1] images -> source values (not clipped)."""
        return self.offset + self.scale * x

    def std_from_unit(self, std):
        """A standard deviation on the [0, 1] scale -> in source units."""
        return self.scale * std

    def as_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_dict(cls, record: dict) -> "ValueMap":
        try:
            return cls(float(record["offset"]), float(record["scale"]), str(record.get("units", "")),
                       str(record.get("rule", "")))
        except (KeyError, TypeError) as err:
            raise ValueError(f"invalid value map record {record!r}: {err}") from None


def value_map_for(
    values: np.ndarray,
    modality: str | None = None,
    bits: int | None = None,
    window: tuple[float, float] = HU_WINDOW,
    percentile: float = ROBUST_PERCENTILE,
) -> ValueMap:
    """The rule of the module docstring for one series or volume.

    :param values: the whole series in source units.
    :param modality: ``"CT"`` selects the HU window; anything else the other rules.
    :param bits: bit depth of integer PNG/TIFF images (8 or 16), ``None`` otherwise.
    :param window: HU ``(low, high)`` for CT.
    :param percentile: percentile mapped to 1 for non-CT images.

    >>> value_map_for(np.array([-1024.0, 40.0]), "CT").rule
    'window [-1000, 1000] HU'
    >>> value_map_for(np.arange(201.0), "MR").scale
    199.0
    """
    if modality is not None and modality.upper() == "CT":
        low, high = (float(w) for w in window)
        if not high > low:
            raise ValueError(f"HU window must have high > low, got {window}")
        return ValueMap(low, high - low, "HU", f"window [{low:g}, {high:g}] HU")
    if bits is not None:
        return ValueMap(0.0, float(2**bits - 1), "intensity", f"{bits}-bit integer / {2**bits - 1}")
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        raise ValueError("cannot normalise an image without finite values")
    offset = 0.0 if finite.min() >= 0 else float(np.percentile(finite, 100 - percentile))
    scale = float(np.percentile(finite, percentile)) - offset
    if scale <= 0:  # a constant image (or mostly so): fall back to the full range, then 1
        scale = float(finite.max()) - offset or 1.0
    return ValueMap(offset, scale, "stored", f"robust: offset {offset:g}, {percentile:g}th percentile -> 1")
