r"""fastMRI k-space files (``.h5``, h5py).

The layout of the fastMRI data sets (Zbontar et al., 2018): a dataset ``kspace``, complex,
``(slices, H, W)`` for single-coil or ``(slices, coils, H, W)`` for multi-coil files, with
centred k-space (``fftshift(fft2(ifftshift(x), norm="ortho"))``, the convention of
invdiff's MRI operators); optional ``mask`` ``(W,)`` (challenge/test files: which
phase-encode columns were acquired), ``reconstruction_esc`` / ``reconstruction_rss``
(reference images), attributes ``acquisition``, ``max``, ``norm``, ``patient_id``. Optional
coil sensitivities may be given as a dataset ``sens_maps`` or ``coil_maps``
``(slices, coils, H, W)`` (not part of fastMRI; written by some pipelines).

When no mask is stored it is read off the data: a column is sampled if any of its
entries is non-zero (so fully sampled training files give a full mask).

**Coil maps** absent from the file are estimated from the auto-calibration (ACS) region
— the fully sampled block of columns around the centre — by the low-resolution method:
the ACS block (rows limited to a centred band of the same fraction of :math:`H`) under a
separable Hann window gives low-resolution coil images :math:`I_c`, and
:math:`S_c = I_c / \sqrt{\sum_c |I_c|^2}`. This is simpler than ESPIRiT (Uecker et al.,
2014), which the reference pipelines use through BART/sigpy (not dependencies of invdiff);
it is exact for smooth coils and objects and absorbs the object's low-resolution phase,
so a real-valued (magnitude) prior fits the coil-combined image. A single-coil file gets
the one "coil" :math:`S = e^{i\phi}` with :math:`\phi` the ACS image's phase, for the
same reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..files import atomic_file

__all__ = ["KSpaceData", "read_fastmri", "write_fastmri", "estimate_coil_maps", "acs_columns", "is_fastmri_file"]


@dataclass
class KSpaceData:
    """A fastMRI file in memory.

    :ivar kspace: complex64 ``(slices, coils, H, W)`` (``coils = 1`` for single-coil).
    :ivar mask: ``(H, W)`` float32 in {0, 1}.
    :ivar multicoil: whether the file was multi-coil (a 4D ``kspace``).
    :ivar mask_source: ``"file"`` or ``"data"`` (read off the non-zero columns).
    :ivar coil_maps: complex64 ``(slices, coils, H, W)`` if the file had them.
    :ivar reference: the file's reference reconstruction, if any.
    :ivar attrs: the file's attributes (JSON-able values).
    """

    kspace: np.ndarray
    mask: np.ndarray
    multicoil: bool
    path: str
    mask_source: str = "file"
    coil_maps: np.ndarray | None = None
    reference: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.kspace.shape)


def is_fastmri_file(path: str | os.PathLike) -> bool:
    """True for an HDF5 file with a ``kspace`` dataset."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "kspace" in f
    except OSError:
        return False


def _attr(value):
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def read_fastmri(path: str | os.PathLike) -> KSpaceData:
    """Read a fastMRI ``.h5`` file (single- or multi-coil).

    :raises FileNotFoundError: no such file.
    :raises ValueError: not HDF5, no ``kspace``, wrong dtype or rank, mask of the wrong length,
        non-finite k-space; a truncated or edited file is one line naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such fastMRI file")
    try:
        return _read_fastmri(path)
    except ValueError as err:
        text = " ".join(str(err).split())
        raise ValueError(text if text.startswith(str(path)) else f"{path}: invalid fastMRI file ({text})") from None
    except (OSError, KeyError, TypeError, AttributeError, IndexError, RuntimeError, MemoryError) as err:
        raise ValueError(f"{path}: corrupt fastMRI file ({type(err).__name__}: {' '.join(str(err).split())})") from None


def _read_fastmri(path: Path) -> KSpaceData:
    import h5py

    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise ValueError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        if "kspace" not in f:
            raise ValueError(f"{path}: no 'kspace' dataset; a fastMRI file holds kspace (slices, [coils,] H, W)")
        ds = f["kspace"]
        if not np.issubdtype(ds.dtype, np.complexfloating):
            raise ValueError(f"{path}: 'kspace' must be complex, got {ds.dtype}")
        if ds.ndim not in (3, 4):
            raise ValueError(f"{path}: 'kspace' must be (slices, H, W) or (slices, coils, H, W), got {ds.shape}")
        try:
            kspace = np.asarray(ds[()], dtype=np.complex64)
        except OSError as err:
            raise ValueError(f"{path}: corrupt 'kspace' dataset ({err})") from None
        if kspace.size == 0:
            raise ValueError(f"{path}: empty 'kspace' dataset {kspace.shape}")
        from .stack import check_finite

        check_finite(kspace, path, "k-space values")
        multicoil = kspace.ndim == 4
        if not multicoil:
            kspace = kspace[:, None]
        H, W = kspace.shape[-2:]
        mask_source = "file"
        if "mask" in f:
            mask = np.asarray(f["mask"][()], dtype=np.float32)
            if mask.ndim == 1:
                if mask.shape[0] != W:
                    raise ValueError(f"{path}: 'mask' has {mask.shape[0]} columns, k-space has {W}")
                mask = np.broadcast_to(mask[None, :], (H, W))
            elif mask.shape[-2:] != (H, W):
                raise ValueError(f"{path}: 'mask' shape {mask.shape} does not match k-space {(H, W)}")
            mask = np.ascontiguousarray(mask.reshape(-1, H, W)[0] > 0, dtype=np.float32)
        else:
            mask_source = "data"
            cols = np.abs(kspace).reshape(-1, H, W).max(axis=(0, 1)) > 0
            mask = np.broadcast_to(cols[None, :].astype(np.float32), (H, W)).copy()
        maps = None
        for key in ("sens_maps", "coil_maps"):
            if key in f:
                maps = np.asarray(f[key][()], dtype=np.complex64)
                if maps.shape != kspace.shape:
                    raise ValueError(f"{path}: '{key}' shape {maps.shape} does not match k-space {kspace.shape}")
        reference = None
        for key in ("reconstruction_rss", "reconstruction_esc"):
            if key in f:
                reference = np.asarray(f[key][()], dtype=np.float32)
        attrs = {k: _attr(v) for k, v in f.attrs.items()}
    if mask.sum() == 0:
        raise ValueError(f"{path}: the mask samples no k-space column")
    return KSpaceData(kspace, mask, multicoil, str(path), mask_source, maps, reference, attrs)


def write_fastmri(
    path: str | os.PathLike,
    kspace: np.ndarray,
    mask: np.ndarray | None = None,
    attrs: dict | None = None,
    reconstructions: dict[str, np.ndarray] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a file in the fastMRI layout (``kspace``, optional ``mask (W,)``, optional
    datasets such as ``reconstruction_rss``), to a temporary file then renamed."""
    import h5py

    kspace = np.asarray(kspace)
    if not np.iscomplexobj(kspace) or kspace.ndim not in (3, 4):
        raise ValueError(f"write_fastmri: kspace must be complex (slices, [coils,] H, W), got {kspace.dtype} {kspace.shape}")
    path = Path(path)
    with atomic_file(path, overwrite) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("kspace", data=kspace.astype(np.complex64))
            if mask is not None:
                f.create_dataset("mask", data=np.asarray(mask, dtype=bool))
            for key, value in (reconstructions or {}).items():
                f.create_dataset(key, data=np.asarray(value, dtype=np.float32))
            for key, value in (attrs or {}).items():
                f.attrs[key] = value
    return path


def acs_columns(mask: np.ndarray) -> tuple[int, int]:
    """``[start, stop)`` of the run of sampled columns that contains the centre ``W // 2``.

    :raises ValueError: the centre column is not sampled (no ACS region).
    """
    cols = np.asarray(mask).reshape(-1, np.asarray(mask).shape[-1]).max(0) > 0
    W = cols.shape[0]
    c = W // 2
    if not cols[c]:
        raise ValueError("the k-space centre column is not sampled: no auto-calibration region to estimate coil maps")
    lo, hi = c, c + 1
    while lo > 0 and cols[lo - 1]:
        lo -= 1
    while hi < W and cols[hi]:
        hi += 1
    return lo, hi


def estimate_coil_maps(kspace: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""Coil sensitivities from the ACS region (see the module docstring).

    :param kspace: complex ``(coils, H, W)`` centred k-space of one slice.
    :param mask: ``(H, W)`` or ``(W,)`` sampling mask.
    :param eps: relative floor of :math:`\sqrt{\sum_c |I_c|^2}` (background pixels).
    :returns: complex64 ``(coils, H, W)`` with :math:`\sum_c |S_c|^2 = 1` wherever the
        low-resolution image is above the floor.

    For a smooth coil times a smooth object the estimate is exact:

    >>> H = W = 32
    >>> yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    >>> obj = torch.exp(-(xx**2 + yy**2) * 2)
    >>> coils = torch.stack([torch.exp(1j * 0.5 * xx), torch.exp(-1j * 0.5 * yy)]) / 2**0.5
    >>> k = torch.fft.fftshift(torch.fft.fft2(torch.fft.ifftshift(coils * obj, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    >>> S = estimate_coil_maps(k, torch.ones(H, W))
    >>> bool(((S.abs() ** 2).sum(0) - 1).abs().max() < 1e-4)
    True
    """
    k = torch.as_tensor(np.asarray(kspace) if not isinstance(kspace, torch.Tensor) else kspace).to(torch.complex64)
    if k.ndim != 3:
        raise ValueError(f"estimate_coil_maps: kspace must be (coils, H, W), got {tuple(k.shape)}")
    C, H, W = k.shape
    m = torch.as_tensor(np.asarray(mask)).float()
    lo, hi = acs_columns(m.reshape(-1, m.shape[-1]).numpy())
    n_acs = hi - lo
    rows = max(1, min(H, round(H * n_acs / W)))
    r0 = (H - rows) // 2
    win = torch.zeros(H, W)
    win[r0 : r0 + rows, lo:hi] = torch.outer(torch.hann_window(rows + 2, periodic=False)[1:-1],
                                             torch.hann_window(n_acs + 2, periodic=False)[1:-1])
    low = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k * win, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    rss = low.abs().pow(2).sum(0).sqrt()
    floor = eps * float(rss.max()) + 1e-30
    return (low / rss.clamp_min(floor)).to(torch.complex64)
