r"""Medical workflows from Python: simulate measurements from scans, reconstruct them slice
by slice with a diffusion prior and a posterior sampler, and write the result in the
source's format with its provenance. The ``invdiff simulate`` and ``invdiff reconstruct``
commands are thin wrappers around these functions.

Study design (retrospective simulation, as in the medical papers): a clean image or
series is read in its units, mapped to [0, 1] by a recorded :class:`~invdiff.io.ValueMap`
(CT: HU window ``[-1000, 1000]``), optionally resampled to the prior's grid (the factor
is recorded), and measured with a named operator, ``y = physics(x, seed=seed)``. The
measurement file keeps the operator's full record and the seed, never the clean image.

Reconstruction: every slice ``k`` is sampled with its own generator seeded
``seed + k``; ``samples = K > 1`` draws K posterior samples per slice (batched through
the network) and keeps their mean and per-pixel standard deviation, the uncertainty map,
written as a second series/volume. **Volume** (``reconstruct(..., volume=True)``, the
command's ``--volume``): the slices' measurements are read as one volume under the
slice-stacked operator of their common 2D operator (a volume task, ``mri3d-<R>x`` or
``zsr-<k>x``, is one measurement of all slices already) and reconstructed jointly by a
volume sampler (DDS-3D, TPDM, DiffusionMBIR) with one generator seeded ``seed``; a DICOM
series must then be one regular volume (one orientation, evenly spaced slices), the
metrics against a reference are 3D, and the outputs are written per slice as before. **Size.** A prior that works at any size (a patch prior,
:class:`~invdiff.priors.PatchDiffusionPrior`) reconstructs at the data's own size, and the
output keeps the source's geometry (no resampling recorded, because none happened). For a
fixed-size prior, images whose size differs from the prior's are never resized silently:
``resize=True`` resamples them (antialiased, :func:`kornia` ``resize``) and records the
factor; k-space is cropped centrally (same field of view, coarser pixels). The patches of a
patch prior live inside the prior: the operators stay global (every CT or MRI measurement
mixes all pixels), so the data step always sees the whole image.

>>> from invdiff.apps.workflows import parse_size
>>> parse_size("64"), parse_size("48x64")
((64, 64), (48, 64))
"""

from __future__ import annotations

import datetime
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..io import (
    ImageStack,
    Measurement,
    ValueMap,
    atomic_dir,
    check_volume_geometry,
    read,
    read_fastmri,
    save_measurement,
    load_measurement,
    write_dicom_series,
    write_image,
    write_nifti,
    write_png,
)
from ..io.fastmri import estimate_coil_maps, is_fastmri_file
from ..io.intensity import HU_WINDOW, ROBUST_PERCENTILE
from ..io.measurement import ACQUIRED_MRI
from ..files import check_output, invdiff_folder, invdiff_hdf5
from ..specs import parse_size

__all__ = [
    "parse_size",
    "resample",
    "simulate",
    "simulate_to_file",
    "fastmri_measurement",
    "open_measurement",
    "Reconstruction",
    "reconstruct",
    "write_reconstruction",
    "check_measurement_out",
    "check_reconstruction_out",
    "measurement_inputs",
    "load_prior",
]


# ---------------------------------------------------------------------------- helpers


def resample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Antialiased bilinear resampling of ``(B, C, H, W)`` to ``size`` (kornia), pixel-area
    aligned (``align_corners=False``): pixel centres of a grid coarser by :math:`f` sit at
    :math:`(f-1)/2` source pixels from the first, as the written geometry records."""
    from kornia.geometry.transform import resize

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return resize(x, size, interpolation="bilinear", align_corners=False, antialias=True)


def _resample_record(source_shape, shape, method: str) -> dict:
    (H, W), (h, w) = source_shape, shape
    return {"factor": [H / h, W / w], "source_shape": [int(H), int(W)], "shape": [int(h), int(w)],
            "method": method if (H, W) != (h, w) else "none"}


def load_prior(name_or_path: str | os.PathLike, device: torch.device | str = "cpu"):
    """``invdiff.priors.load`` on ``device``, in eval mode."""
    from .. import priors

    return priors.load(name_or_path).to(device).eval()


def _check_seed(seed) -> int:
    """A seed is a non-negative integer: a measurement file records ``noise_seed`` -1 for
    acquired data, so a negative seed would make a simulation read as an acquisition."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or int(seed) < 0:
        raise ValueError(f"--seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _source_record(stack: ImageStack) -> dict:
    return {"kind": stack.kind, "path": str(stack.source), "identifiers": list(stack.identifiers),
            "modality": stack.modality, "units": stack.units,
            "spacing": list(stack.spacing) if stack.spacing else None, "bits": stack.bits,
            "info": {k: v for k, v in stack.info.items() if isinstance(v, (str, int, float, bool, type(None)))}}


# ---------------------------------------------------------------------------- simulate


def simulate(
    source: str | os.PathLike | ImageStack,
    task: str,
    *,
    size: tuple[int, int] | str | int | None = None,
    seed: int = 0,
    noise: str = "gaussian",
    noise_sigma: float | None = None,
    window: tuple[float, float] = HU_WINDOW,
    percentile: float = ROBUST_PERCENTILE,
    modality: str = "auto",
    params: dict | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Measurement, Tensor]:
    """Retrospective measurements of a clean image or series.

    :param source: a DICOM file or series folder, NIfTI volume, PNG/TIFF, or an :class:`ImageStack`.
    :param task: operator name (``"ct-sparse-60"``, ``"mri-4x"``, ...; see ``operators.available()``).
    :param size: resample the slices to this size first (factor recorded); default: native.
    :param seed: seed of the operator's random parts (mask, ...) and of the noise.
    :param noise: ``"gaussian"``, ``"poisson"`` or ``"none"``.
    :param noise_sigma: noise std in the [0, 1] image's measurement units (task default if None).
    :param window: HU window mapped to [0, 1] for CT.
    :param percentile: percentile mapped to 1 for non-CT images.
    :param modality: for NIfTI sources (``"CT"``, ``"MR"``, ``"auto"``).
    :param params: task parameters (``operators.make`` keyword overrides).
    :returns: the measurement (with the operator's record and seed) and the clean slices
        ``(N, C, h, w)`` in [0, 1] (the reference; not part of the measurement).

    A volume task (``mri3d-<R>x``, ``zsr-<k>x``) measures the ``N`` slices as one volume
    ``(1, C, N, h, w)``: the measurement holds one ``y`` (``(1, ...)``) and the task record's
    ``img_size`` is ``(C, N, h, w)``; a DICOM series must then be one regular volume
    (:func:`invdiff.io.check_volume_geometry`). Any other task measures each slice.
    """
    from .. import operators

    _check_seed(seed)  # before any work
    is_volume = operators.task_info(task).volume
    stack = source if isinstance(source, ImageStack) else read(source, modality, volume=is_volume)
    if is_volume and stack.headers is not None:  # (idempotent for a stack read with volume=True)
        check_volume_geometry(stack.headers, stack.identifiers, str(stack.source))
    value_map = stack.value_map(window, percentile)
    x = stack.to_unit(value_map)
    H, W = x.shape[-2:]
    h, w = (H, W) if size is None else parse_size(size)
    x = resample(x, (h, w)).clamp(0, 1)
    C, N = x.shape[1], x.shape[0]
    physics = operators.make(task, img_size=(C, N, h, w) if is_volume else (C, h, w), seed=seed, noise=noise,
                             noise_sigma=noise_sigma, device=device, **(params or {}))
    with torch.no_grad():
        if is_volume:  # the slices as one volume (1, C, N, h, w)
            y = physics(x.transpose(0, 1)[None].to(device), seed=seed).cpu()
        else:
            y = physics(x.to(device), seed=seed).cpu()
    m = Measurement(
        y=y, task=dict(physics.task), noise_seed=int(seed), value_map=value_map, source=_source_record(stack),
        resample=_resample_record((H, W), (h, w), "antialiased bilinear (kornia resize)"),
        headers=stack.headers, affine=stack.affine, nifti_header=stack.nifti_header,
        attrs={"path": f"simulated from {stack.source}"},
    )
    if isinstance(params, dict) and isinstance(params.get("coil_maps"), Tensor):
        m.coil_maps = params["coil_maps"]
    return m, x


def simulate_to_file(source, task: str, out: str | os.PathLike, overwrite: bool = False, **kwargs) -> Measurement:
    """:func:`simulate`, then :func:`invdiff.io.save_measurement` to ``out``, checked before
    any work (:func:`check_measurement_out`): ``out`` is never the source (nor inside it), and
    an existing ``out`` is replaced only with ``overwrite`` and only if it is a measurement
    file invdiff wrote."""
    check_measurement_out(out, [source.source if isinstance(source, ImageStack) else source], overwrite)
    m, _ = simulate(source, task, **kwargs)
    save_measurement(out, m, overwrite=overwrite)
    m.attrs["path"] = str(out)
    return m


# ----------------------------------------------------------------------------- fastMRI


def _noise_std_kspace(kspace: np.ndarray, mask: np.ndarray) -> float:
    """Robust noise std of k-space (per real/imaginary part) from the outer 1/16 of rows
    at each end of the readout (sampled columns): ``1.4826 * MAD``."""
    H = kspace.shape[-2]
    band = max(1, H // 16)
    cols = mask.max(0) > 0
    edge = np.concatenate([kspace[..., :band, :][..., cols], kspace[..., H - band:, :][..., cols]], axis=-1)
    parts = np.concatenate([edge.real.ravel(), edge.imag.ravel()])
    if parts.size == 0:
        return 0.0
    return float(1.4826 * np.median(np.abs(parts - np.median(parts))))


def fastmri_measurement(
    path: str | os.PathLike,
    img_size: tuple[int, int, int],
    *,
    resize: bool = False,
    noise_sigma: float | None = None,
    percentile: float = ROBUST_PERCENTILE,
) -> Measurement:
    r"""A fastMRI ``.h5`` file as a :class:`Measurement` for images of ``img_size``
    (``(C, None, None)``: the k-space's own size, for a prior that works at any size).

    k-space is cropped centrally to the image grid when ``resize`` (same field of view,
    pixels coarser by the recorded factor); coil maps are the file's or estimated from
    the ACS region (:func:`invdiff.io.estimate_coil_maps`, per slice); k-space is divided
    by the 99.5th percentile of the zero-filled coil-combined magnitude (the recorded
    value map, so the output is in the file's units); the noise std is estimated from
    the outer k-space rows (``1.4826 MAD``) unless ``noise_sigma`` (on the [0, 1] scale)
    is given. The operator of slice :math:`k` is :math:`y_c = M F S_{k,c} x`.
    """
    kd = read_fastmri(path)
    S, C, H, W = kd.kspace.shape
    ch, h, w = img_size[0], img_size[1] or H, img_size[2] or W  # None: the k-space's own size
    ch, h, w = int(ch), int(h), int(w)
    kspace, mask, maps = kd.kspace, kd.mask, kd.coil_maps
    if (H, W) != (h, w):
        if not resize:
            raise ValueError(
                f"{path}: k-space is {H}x{W} but the prior takes {h}x{w} images; pass --resize to crop "
                f"k-space centrally (pixels {H / h:.3g}x{W / w:.3g} coarser, same field of view; recorded)"
            )
        if h > H or w > W:
            raise ValueError(f"{path}: k-space {H}x{W} is smaller than the prior's {h}x{w}; cannot crop")
    sigma_k = _noise_std_kspace(kspace, mask)
    r0, c0 = H // 2 - h // 2, W // 2 - w // 2  # keeps the DC sample at (h // 2, w // 2)
    kspace = kspace[..., r0 : r0 + h, c0 : c0 + w]
    mask = mask[r0 : r0 + h, c0 : c0 + w]
    if maps is not None:
        maps = maps[..., r0 : r0 + h, c0 : c0 + w]
        if (H, W) != (h, w):  # image-domain maps do not crop like k-space: re-estimate
            maps = None
    mask_t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))
    k_t = torch.from_numpy(np.ascontiguousarray(kspace)) * mask_t
    if maps is None:
        maps_t = torch.stack([estimate_coil_maps(k_t[s], mask_t) for s in range(S)])
        maps_kind = "acs-lowres"
    else:
        from ..operators import normalize_coil_maps

        maps_t = torch.stack([normalize_coil_maps(torch.from_numpy(maps[s])) for s in range(S)])
        maps_kind = "file"
    coil_images = torch.fft.fftshift(torch.fft.ifft2(torch.fft.ifftshift(k_t, dim=(-2, -1)), norm="ortho"), dim=(-2, -1))
    combined = (maps_t.conj() * coil_images).sum(1).abs()
    scale = float(np.percentile(combined.numpy(), percentile)) or 1.0
    y = torch.stack([(k_t / scale).real, (k_t / scale).imag], dim=1).float()  # (S, 2, C, h, w)
    sampled = float(mask_t.max(0).values.sum())
    task = {
        "name": ACQUIRED_MRI, "img_size": [ch, h, w], "noise": "gaussian",
        "noise_sigma": float(noise_sigma) if noise_sigma is not None else sigma_k / scale,
        "noise_sigma_rule": "given" if noise_sigma is not None else "1.4826 MAD of the outer k-space rows",
        "n_coils": int(C), "multicoil": bool(kd.multicoil), "mask": kd.mask_source, "coil_maps": maps_kind,
        "acceleration": w / sampled, "kspace_shape": [int(H), int(W)],
    }
    name = Path(path).name
    return Measurement(
        y=y, task=task, noise_seed=None,
        value_map=ValueMap(0.0, scale, "intensity", f"k-space / {percentile:g}th percentile of the zero-filled magnitude"),
        source={"kind": "fastmri", "path": str(path), "identifiers": [f"{name}:{s}" for s in range(S)],
                "modality": "MR", "units": "intensity", "spacing": None, "bits": None,
                "info": {k: v for k, v in kd.attrs.items() if isinstance(v, (str, int, float, bool))}},
        resample=_resample_record((H, W), (h, w), "central k-space crop"),
        mask=mask_t, coil_maps=maps_t, attrs={"path": str(path)},
    )


def open_measurement(path: str | os.PathLike, img_size: tuple[int, int, int] | None = None,
                     resize: bool = False, noise_sigma: float | None = None) -> Measurement:
    """An invdiff measurement file, or a fastMRI k-space file (which needs ``img_size``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such measurement file")
    if is_fastmri_file(path):
        if img_size is None:
            raise ValueError(f"{path}: a fastMRI file needs the prior's image size")
        return fastmri_measurement(path, img_size, resize=resize, noise_sigma=noise_sigma)
    return load_measurement(path)


# -------------------------------------------------------------------------- reconstruct


@dataclass
class Reconstruction:
    """Per-slice posterior mean and standard deviation, in [0, 1] image units.

    :ivar mean: ``(N, C, H, W)``; for complex (2-channel) images, of the magnitude ``(N, 1, H, W)``.
    :ivar std: same shape, or ``None`` when one sample was drawn.
    :ivar baseline: the operator's ``A_dagger`` (FBP, zero-filled IFFT, ...), same shape.
    :ivar runs: ``sampler.last_run`` of each slice (of the one run, for a volume); slices
        sampled together share their call's record (``call``, ``call_slices``).
    :ivar metrics: PSNR/SSIM against a reference, when one was given.
    :ivar info: sampler name and options, prior(s), samples, seeds, device, slices per call
        (``batch``); ``joint`` is True for a volume reconstruction (with ``volume_shape`` and
        ``slice_spacing``); ``world_size`` under torchrun.
    :ivar rank: this process's rank under torchrun (0 otherwise): only rank 0 writes.
    """

    mean: Tensor
    std: Tensor | None
    baseline: Tensor
    runs: list[dict]
    metrics: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    rank: int = 0


def _display(x: Tensor) -> Tensor:
    """Images to output: 1 channel as is, complex (2 channels) as magnitude."""
    return x.pow(2).sum(1, keepdim=True).sqrt() if x.shape[1] == 2 else x


def _metrics(estimates: dict[str, Tensor], reference: Tensor) -> dict:
    """PSNR (peak 1) and SSIM of each estimate against the reference (the benchmark's metrics)."""
    from ..bench.metrics import mean_psnr_ssim

    out = {}
    for name, est in estimates.items():
        psnr, ssim = mean_psnr_ssim(est, reference)
        out[name] = {"psnr": psnr} if ssim is None else {"psnr": psnr, "ssim": ssim}
    return out


def _volume_metrics(estimates: dict[str, Tensor], reference: Tensor) -> dict:
    """3D PSNR (peak 1, the estimate clipped to [0, 1]), 3D SSIM and the z-gradient error of
    each estimate (:func:`invdiff.bench.metrics.volume_metrics` on the ``(D, H, W)`` volume)."""
    from ..bench.metrics import volume_metrics

    ref = reference[:, 0]  # (D, H, W), one channel (magnitudes)
    out = {}
    for name, est in estimates.items():
        v = volume_metrics(est[:, 0].clamp(0, 1), ref)
        out[name] = {"dims": 3, **{k: v[k] for k in ("psnr", "ssim", "ssim_window", "z_error") if v.get(k) is not None}}
    return out


def _make_sampler(name: str, prior, volume: bool, options: dict, perpendicular_prior, progress: bool):
    """The sampler ``name`` over ``prior``: a volume sampler (with the perpendicular prior
    for TPDM and a bar over the diffusion steps) or a 2D one; one-line errors."""
    from .. import samplers
    from ..samplers.volume import VOLUME_SAMPLERS, make_volume

    key = name.lower()
    names = ", ".join(VOLUME_SAMPLERS)
    if volume and key not in VOLUME_SAMPLERS:
        raise ValueError(f"a joint volume reconstruction needs a volume sampler ({names}), got {name!r}")
    if not volume and key in VOLUME_SAMPLERS:
        raise ValueError(f"{name} is a volume sampler: reconstruct the series as one volume (--volume, volume=True)")
    if perpendicular_prior is not None and key != "tpdm":
        raise ValueError(f"a perpendicular prior is for the tpdm sampler, not {name}")
    if key == "tpdm" and perpendicular_prior is None:
        raise ValueError("tpdm needs a perpendicular prior (--perpendicular-prior NAME_OR_PATH): a 2D prior of "
                         "coronal slices (C, D, W), e.g. a patch prior")
    if not volume:  # an unknown or out-of-range option, an unusable prior: one-line errors
        return samplers.make(name, prior, **options)
    extra = {"perpendicular_prior": perpendicular_prior} if key == "tpdm" else {}
    return make_volume(name, prior, verbose=progress, **extra, **options)


def _volume_geometry(m: Measurement) -> float | None:
    """Slice spacing (mm) of the measured slices as a volume, after checking a DICOM
    source's geometry (:func:`invdiff.io.check_volume_geometry`); ``None`` when unknown."""
    where = m.source.get("path") or m.attrs.get("path", "the measurement")
    if m.headers is not None:
        names = m.source.get("identifiers") or [f"slice {k + 1}" for k in range(m.n_slices)]
        return check_volume_geometry(m.headers, names, where)
    if m.affine is not None:
        return float(np.linalg.norm(np.asarray(m.affine, float)[:3, 2]))
    return None


#: Slices per sampler call on the CPU when ``batch`` is automatic (divided by the samples
#: per slice): the network's cost per slice falls with the batch, and 16 rows keep the
#: memory of a 256^2 U-Net's activations modest.
CPU_BATCH_ROWS = 16
#: Most slices per call when ``batch`` is automatic on CUDA.
MAX_AUTO_BATCH = 64
#: Share of the free CUDA memory (plus the allocator's cache) an automatic batch may fill.
CUDA_MEMORY_SHARE = 0.8


def parse_batch(value) -> int | None:
    """``batch`` of :func:`reconstruct` from a number or ``"auto"`` (``None``); one-line errors.

    >>> parse_batch("auto"), parse_batch("8")
    (None, 8)
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"batch must be a positive integer or 'auto', got {value!r}") from None
    if isinstance(value, float) and value != n or n < 1:
        raise ValueError(f"batch must be a positive integer or 'auto', got {value!r}")
    return n


def _batch_plan(batch: int | None, method, measurement: Measurement, device: torch.device,
                samples: int, n: int) -> tuple[int, bool, str]:
    """``(slices per call, probe first, why)`` for ``n`` slices: 1 for a sampler whose images
    are coupled in a batch (``batch_coupling``), per-slice operators or Poisson data
    (:func:`~invdiff.samplers.steps.likelihood.noise_batch_coupling`); the given ``batch``;
    automatic: :data:`CPU_BATCH_ROWS` rows on the CPU, on CUDA one slice first (the probe)
    and then as many as the free memory holds (:func:`_cuda_batch`)."""
    coupling = getattr(method, "batch_coupling", None)
    if coupling:
        return 1, False, f"one slice per call: {method.name} couples the images of a batch ({coupling})"
    if measurement.per_slice_operator:
        return 1, False, "one slice per call: every slice has its own operator (per-slice coil maps)"
    from ..samplers.steps.likelihood import noise_batch_coupling

    coupling = noise_batch_coupling(measurement.physics(0, device))
    if coupling:
        return 1, False, f"one slice per call: {coupling}"
    if batch is not None:
        return max(1, min(int(batch), n)), False, "given"
    if device.type == "cuda":
        return 1, n > 1, "automatic: from the free CUDA memory and the probe slice's peak memory"
    return max(1, min(CPU_BATCH_ROWS // samples, n)), False, f"automatic: {CPU_BATCH_ROWS} rows on the CPU"


def _cuda_batch(device: torch.device, allocated_before: int, peak: int | None, left: int) -> int:
    """Slices per call from the probe: its peak memory above what was allocated before it is
    the cost of one slice; :data:`CUDA_MEMORY_SHARE` of the free memory (with the allocator's
    reusable cache) over that, at most :data:`MAX_AUTO_BATCH` and the slices left."""
    free, _ = torch.cuda.mem_get_info(device)
    cache = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    per_slice = max(int(peak or 0) - int(allocated_before), 1 << 20)
    return max(1, min(int(CUDA_MEMORY_SHARE * (free + cache) // per_slice), MAX_AUTO_BATCH, left))


def reconstruct(
    measurement: Measurement,
    prior,
    sampler: str | None = None,
    *,
    volume: bool = False,
    perpendicular_prior=None,
    samples: int = 1,
    seed: int = 0,
    device: torch.device | str = "cpu",
    steps: int | None = None,
    options: dict | None = None,
    progress: bool = False,
    reference: Tensor | None = None,
    prior_name: str | None = None,
    perpendicular_prior_name: str | None = None,
    batch: int | str | None = None,
    dtype: str | None = None,
    compile: bool = False,
) -> Reconstruction:
    """Reconstruct the slices of ``measurement`` with ``sampler`` over ``prior``: slice by
    slice, or jointly as one volume (``volume``).

    **Slice by slice** (default sampler ``"dps"``): slice ``k`` is sampled with
    ``torch.Generator(device).manual_seed(seed + k)``, a tqdm bar over the slices. Up to
    ``batch`` slices go through the sampler together, each with its own generator (a list
    of generators, one per image: :func:`~invdiff.samplers.steps.randn_like`), so the result
    is the one of the slices run one by one (every registered sampler's steps work per image,
    ``tests/test_batching.py``; a sampler whose ``batch_coupling`` says otherwise, and
    per-slice operators, run one slice per call, the reason recorded in ``info``).
    ``batch=None`` (``"auto"``): :data:`CPU_BATCH_ROWS` rows per call on the CPU; on CUDA the
    first slice runs alone as a probe and the batch is what :data:`CUDA_MEMORY_SHARE` of the
    free memory holds at the probe's peak memory per slice; a call that still runs out of
    memory is halved and rerun (the same result).

    **torchrun** (``torchrun --nproc-per-node N -m invdiff reconstruct ...``, or this
    function in a process group): rank ``r`` reconstructs its contiguous share of the slices
    (:meth:`~invdiff.bench.distributed.ProcessGroup.share`; NCCL on ``cuda:<LOCAL_RANK>``,
    gloo on the CPU) and every rank receives all the slices in order: the same result as one
    process for the same seeds; only rank 0 writes (``Reconstruction.rank``). A volume is
    one joint run and is refused under torchrun.

    **Volume** (``volume=True``, always for a volume task such as ``mri3d-4x``; default
    sampler ``"dds-3d"``; ``"tpdm"``, ``"diffusion-mbir"``): the ``N`` slices' measurements
    are one volume ``(1, N, ...)`` under the slice-stacked operator of their common 2D
    operator (:meth:`~invdiff.io.Measurement.volume_physics`; a DICOM source's geometry is
    checked first: one orientation, evenly spaced slices), reconstructed jointly by a
    volume sampler (:mod:`invdiff.samplers.volume`) with one generator seeded ``seed``; a
    tqdm bar over the diffusion steps; metrics are 3D (:func:`_volume_metrics`).

    :param sampler: sampler name (default ``"dps"``, or ``"dds-3d"`` for a volume).
    :param volume: reconstruct all slices jointly as one volume.
    :param perpendicular_prior: TPDM's prior of coronal slices ``(C, N, W)``.
    :param samples: posterior samples per slice or volume (``> 1`` gives the std map).
    :param seed: slice ``k`` uses ``seed + k``; a volume uses ``seed``.
    :param steps: the sampler's number of steps (its default if ``None``).
    :param options: other sampler keyword arguments.
    :param progress: a tqdm bar (stderr) over slices, or over a volume's diffusion steps.
    :param reference: clean slices ``(N, C, H, W)`` in [0, 1] for PSNR/SSIM (simulations).
    :param batch: slices per sampler call (slice by slice), or ``None`` / ``"auto"``.
    :param dtype: precision of the prior's network (``"bf16"``, ``"fp16"``; ``None``: as
        loaded) and ``compile``: ``torch.compile`` it (:func:`invdiff.priors.runtime.accelerate`;
        the sampler stays float32); what ran is in ``info["runtime"]`` and every run record.
    :raises ValueError: the prior's image shape is not the measurement's, the slices do not
        form one volume, the sampler does not fit the mode, or a volume under torchrun.
    """
    from tqdm.auto import tqdm

    from ..bench.distributed import init_distributed

    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    _check_seed(seed)
    batch = parse_batch(batch)
    volume = bool(volume or measurement.volume)
    sampler = sampler or ("dds-3d" if volume else "dps")
    shape = measurement.slice_size
    where = measurement.attrs.get("path", "the measurement")
    try:
        prior.check_shape(shape)
    except ValueError as err:
        raise ValueError(
            f"{where}: measured images are {shape} (C, H, W) but the prior takes {prior.image_shape}; "
            f"simulate with --size {prior.image_shape[1]}x{prior.image_shape[2]} or use a prior of that size "
            f"(a patch prior works at any size)"
        ) from err
    spacing = _volume_geometry(measurement) if volume else None
    group = init_distributed(device)
    if group.world > 1 and volume:
        raise ValueError("a joint volume reconstruction is one run: start it without torchrun "
                         "(torchrun shards a series slice by slice)")
    device = torch.device(group.device(device))
    prior = prior.to(device).eval()
    if perpendicular_prior is not None:
        perpendicular_prior = perpendicular_prior.to(device).eval()
    if dtype is not None or compile:  # the network call only (priors.runtime)
        for p in (prior, perpendicular_prior):
            if p is not None:
                p.accelerate(dtype=dtype, compile=compile)
    kwargs = dict(options or {})
    if steps is not None:
        kwargs["steps"] = int(steps)
    method = _make_sampler(sampler, prior, volume, kwargs, perpendicular_prior, progress)
    method.check_physics(measurement.volume_physics(device) if volume else measurement.physics(0, device))
    means, stds, baselines, runs = [], [], [], []

    def keep(shown: Tensor, baseline: Tensor, run: dict) -> None:
        """One run's (K, N, C, H, W) displayed samples: their mean, std, the baseline and the run record."""
        means.append(shown.mean(0).cpu())
        stds.append(shown.std(0, unbiased=True).cpu() if samples > 1 else None)
        baselines.append(_display(baseline).cpu())
        runs.append(run)

    if volume:  # one joint run over the (1, C, N, H, W) volume
        physics = measurement.volume_physics(device)
        y = measurement.volume_y().to(device)
        g = torch.Generator(device=device).manual_seed(int(seed))
        post = method.sample(y, physics, n=samples, generator=g)
        C, D = physics.img_size[:2]
        slices = post.samples[:, 0].transpose(1, 2)  # (K, D, C, H, W): every sample as its slices
        shown = _display(slices.reshape(-1, C, *shape[1:])).reshape(samples, D, -1, *shape[1:])
        with torch.no_grad():
            baseline = physics.A_dagger(y)[0].transpose(0, 1)
        keep(shown, baseline, {**method.last_run.as_dict(), "slices": D, "seed": int(seed)})
    else:
        mine = list(group.share(measurement.n_slices))  # every slice in one process
        size, probe, why = _batch_plan(batch, method, measurement, device, samples, len(mine))
        bar = tqdm(total=len(mine), desc=f"reconstruct ({method.name})", unit="slice",
                   disable=not progress or group.rank != 0, file=sys.stderr)
        calls = []  # slices per call, as run
        pos = 0
        while pos < len(mine):
            ks = mine[pos : pos + size]
            physics = measurement.physics(ks[0], device)  # one operator for every slice of a call
            y = measurement.y[ks[0] : ks[-1] + 1].to(device)
            gens = [torch.Generator(device=device).manual_seed(int(seed) + k) for k in ks]
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            try:
                post = method.sample(y, physics, n=samples, generator=gens[0] if len(ks) == 1 else gens)
            except torch.cuda.OutOfMemoryError:
                if len(ks) == 1:
                    raise
                torch.cuda.empty_cache()  # chunk: half the slices, the same result
                size = max(1, len(ks) // 2)
                why += f"; halved to {size} after running out of memory"
                continue
            b = len(ks)
            shown = _display(post.samples.reshape(-1, *post.samples.shape[2:])).reshape(samples, b, -1, *shape[1:])
            with torch.no_grad():
                baseline = physics.A_dagger(y)
            run = method.last_run.as_dict()
            for j, k in enumerate(ks):
                keep(shown[:, j : j + 1], baseline[j : j + 1],
                     {**run, "slice": k, "seed": int(seed) + k, "call": ks[0], "call_slices": b})
            calls.append(b)
            pos += b
            bar.update(b)
            if probe:  # the first slice was the probe: size the batch from its peak memory
                probe = False
                size = _cuda_batch(device, before, run.get("peak_memory"), len(mine) - pos)
        bar.close()
    mean = torch.cat(means)
    std = torch.cat(stds) if samples > 1 else None
    baseline = torch.cat(baselines)
    if group.world > 1:  # every rank's slices, in order, on every rank
        mean, baseline = group.gather(mean), group.gather(baseline)
        std = group.gather(std) if std is not None else None
        runs[:] = group.gather_json(runs)
    metrics = {}
    if reference is not None:
        ref = _display(reference.float())
        metrics = (_volume_metrics if volume else _metrics)({"baseline": baseline, method.name: mean}, ref)
    info = {
        "sampler": method.name, "sampler_options": {k: v for k, v in kwargs.items() if isinstance(v, (int, float, str, bool))},
        "samples": int(samples), "seed": int(seed), "joint": volume,
        "slice_seeds": "one generator for the volume" if volume else "seed + slice index", "device": str(device),
        "prior": prior_name, "prior_image_shape": list(prior.image_shape), "prior_any_size": bool(prior.any_size),
        "image_shape": list(shape), "runtime": prior.runtime,
    }
    if not volume:
        info["batch"] = {"slices_per_call": max(calls, default=0),
                         "requested": "auto" if batch is None else int(batch), "rule": why}
    if group.world > 1:
        info["world_size"] = group.world
        info["backend"] = group.backend
    if volume:
        info.update({
            "volume_shape": list(physics.img_size), "volume_operator": type(physics).__name__,
            "slice_spacing": spacing, "metrics": "3D PSNR/SSIM over the volume" if reference is not None else None,
        })
        if perpendicular_prior is not None:
            info["perpendicular_prior"] = perpendicular_prior_name
            info["perpendicular_plane"] = getattr(method, "perpendicular_plane", None)
    group.close()  # when this call started the process group (a caller's group stays open)
    return Reconstruction(mean, std, baseline, runs, metrics, info, rank=group.rank)


# ----------------------------------------------------------------------------- outputs


def check_measurement_out(out, inputs, overwrite: bool = False, flag: str = "output") -> Path:
    """The output rules of a measurement file (:func:`invdiff.files.check_output`): never
    one of ``inputs`` or inside one; an existing file is replaced only with ``overwrite``
    and only if invdiff wrote it (an HDF5 file with invdiff's attributes)."""
    return check_output(out, inputs, overwrite, own=invdiff_hdf5, flag=flag)


def check_reconstruction_out(out, inputs, overwrite: bool = False, flag: str = "output") -> Path:
    """The output rules of a reconstruction folder (:func:`invdiff.files.check_output`):
    never one of ``inputs``, inside one or holding one; an existing folder is replaced only
    with ``overwrite`` and only if invdiff wrote it (its ``provenance.json`` and nothing else
    than the files that lists)."""
    return check_output(out, inputs, overwrite, own=invdiff_folder("provenance.json"), flag=flag)


def measurement_inputs(m: Measurement) -> list:
    """The files a reconstruction of ``m`` was made from: the measurement file and its source scan."""
    return [m.attrs.get("path"), (m.source or {}).get("path")]


def _description(rec: Reconstruction, m: Measurement, what: str) -> str:
    k = rec.info["samples"]
    base = f"invdiff {rec.info['sampler']} {what}" + (f" K={k}" if k > 1 else "")
    return f"{base} {m.task.get('name', '')}"[:64]


def _derivation(rec: Reconstruction, m: Measurement, what: str) -> str:
    task = {k: v for k, v in m.task.items() if k in ("name", "noise", "noise_sigma", "seed")}
    info = rec.info
    if info.get("joint"):
        mode = f"joint 3D reconstruction of {m.n_slices} slices; "
        seeds = f"sampler seed {info['seed']} (one for the volume)"
        priors = f"prior {info['prior']}" + (f", perpendicular prior {info['perpendicular_prior']} "
                                               f"({info.get('perpendicular_plane')})" if info.get("perpendicular_prior") else "")
    else:
        mode, seeds, priors = "", f"sampler seed {info['seed']} (+slice)", f"prior {info['prior']}"
    return (
        f"{mode}{what} of {info['samples']} posterior sample(s); sampler {info['sampler']} "
        f"{json.dumps(info['sampler_options'])}; {priors}; operator {json.dumps(task)}; "
        f"noise seed {m.noise_seed}; {seeds}; values: {m.value_map.rule}; "
        f"resampled by {m.resample.get('factor', [1, 1])}"
    )


def _output_format(m: Measurement, fmt: str) -> str:
    kind = m.source.get("kind")
    if fmt == "auto":
        return {"dicom": "dicom", "nifti": "nifti", "png": "png", "tiff": "tiff"}.get(kind, "h5")
    if fmt == "dicom" and m.headers is None:
        raise ValueError(f"DICOM output needs a DICOM source (this measurement's source is {kind})")
    if fmt == "nifti" and m.affine is None:
        raise ValueError(f"NIfTI output needs a NIfTI source (this measurement's source is {kind}); use h5 or png")
    if fmt not in ("dicom", "nifti", "png", "tiff", "h5"):
        raise ValueError(f"unknown output format {fmt!r}; use auto, dicom, nifti, png, tiff or h5")
    return fmt


def write_reconstruction(
    out: str | os.PathLike,
    rec: Reconstruction,
    m: Measurement,
    *,
    fmt: str = "auto",
    png: bool = False,
    overwrite: bool = False,
    extra: dict | None = None,
) -> dict[str, Any]:
    """Write ``rec`` into the new folder ``out`` (built under a temporary name, renamed
    when complete). ``out`` is never the measurement file or its source scan, nor inside or
    around them; an existing ``out`` is an error unless ``overwrite``, and is replaced only
    if it is a reconstruction folder invdiff wrote (:func:`check_reconstruction_out`).

    Contents by source: DICOM -> ``mean/`` and ``std/`` derived series; NIfTI ->
    ``mean.nii.gz``, ``std.nii.gz`` with the source affine; PNG/TIFF -> ``mean_<name>``,
    ``std_<name>`` at the source's bit depth (``fmt="png"`` for another source: 16-bit PNGs
    of the [0, 1] images, i.e. the value map's window; ``fmt="tiff"``: float TIFFs in the
    source's units); fastMRI -> ``reconstruction.h5`` (the fastMRI
    submission layout: ``reconstruction`` and ``std``, ``(N, H, W)``). Always
    ``provenance.json``. The mean is clipped to the prior's range [0, 1] (the value map's
    window) before it is mapped back. With ``png``, quick looks ``png/mean_0001.png`` (the
    value map's [0, 1] range) and ``png/std_0001.png`` (0 to the series' maximum std, recorded).

    :returns: the provenance record written.
    """
    from .. import __version__

    check_reconstruction_out(out, measurement_inputs(m), overwrite)
    fmt = _output_format(m, fmt)
    vm = m.value_map
    factor = tuple(float(f) for f in m.resample.get("factor", [1.0, 1.0]))
    mean_src = vm.from_unit(rec.mean.clamp(0, 1).double().numpy())  # the prior's range
    std_src = vm.std_from_unit(rec.std.double().numpy()) if rec.std is not None else None
    files: dict[str, list[str]] = {}
    with atomic_dir(out, overwrite) as tmp:
        if fmt == "dicom":
            if m.headers is None:
                raise ValueError("DICOM output needs the source's DICOM headers")
            (tmp / "mean").mkdir()
            written = write_dicom_series(tmp / "mean", mean_src[:, 0], m.headers,
                                         description=_description(rec, m, "mean"),
                                         derivation=_derivation(rec, m, "posterior mean"), factor=factor)
            files["mean"] = [f"mean/{p.name}" for p in written]
            if std_src is not None:
                (tmp / "std").mkdir()
                top = float(np.percentile(std_src, 99)) or 1.0
                first = int(m.headers[0].get("SeriesNumber", 0) or 0)
                written = write_dicom_series(tmp / "std", std_src[:, 0], m.headers,
                                             description=_description(rec, m, "std"),
                                             derivation=_derivation(rec, m, "per-pixel standard deviation"),
                                             factor=factor, series_number=first + 1001, window=(top / 2, top))
                files["std"] = [f"std/{p.name}" for p in written]
        elif fmt == "nifti":
            dtype = (m.source.get("info") or {}).get("dtype")
            write_nifti(tmp / "mean.nii.gz", mean_src[:, 0], m.affine, m.nifti_header, dtype=dtype, factor=factor)
            files["mean"] = ["mean.nii.gz"]
            if std_src is not None:
                write_nifti(tmp / "std.nii.gz", std_src[:, 0], m.affine, m.nifti_header, dtype=None, factor=factor)
                files["std"] = ["std.nii.gz"]
        elif fmt in ("png", "tiff"):
            same_kind = m.source.get("kind") in ("png", "tiff")
            suffix = ".png" if fmt == "png" else ".tif"
            if same_kind:  # the source's units and bit depth (16-bit PNG for a float TIFF source)
                bits = m.source.get("bits") or (16 if fmt == "png" else None)
                scale = 1.0
            else:  # HU and other signed units do not fit a PNG: the value map's [0, 1] as 16 bits
                bits, scale = (16, 65535.0) if fmt == "png" else (None, 1.0)
            ids = [str(i).replace(":", "_").rsplit(".", 1)[0] for i in m.source.get("identifiers", [])]
            ids = ids if len(ids) == m.n_slices else [f"{k + 1:04d}" for k in range(m.n_slices)]
            unit_mean = rec.mean.clamp(0, 1).double().numpy()
            for what, values in (("mean", mean_src if same_kind or fmt == "tiff" else unit_mean),
                                 ("std", std_src if same_kind or fmt == "tiff" or std_src is None
                                  else rec.std.double().numpy())):
                if values is None:
                    continue
                files[what] = []
                for k, name in enumerate(ids):
                    target = tmp / f"{what}_{name}{suffix}"
                    write_image(target, values[k] * scale, bits=bits)
                    files[what].append(target.name)
        else:  # fastMRI submission layout
            import io

            import h5py

            buf = io.BytesIO()  # built in memory: a full disk is an OSError of the write, not of HDF5
            with h5py.File(buf, "w") as f:
                f.create_dataset("reconstruction", data=mean_src[:, 0].astype(np.float32))
                if std_src is not None:
                    f.create_dataset("std", data=std_src[:, 0].astype(np.float32))
                f.attrs["invdiff_version"] = __version__
                f.attrs["value_map"] = vm.to_json()
            (tmp / "reconstruction.h5").write_bytes(buf.getvalue())
            files["mean"] = ["reconstruction.h5"]
        std_max = None
        if png:
            (tmp / "png").mkdir()
            files["png"] = []
            std_max = float(rec.std.max()) if rec.std is not None else None
            for k in range(m.n_slices):
                write_png(tmp / "png" / f"mean_{k + 1:04d}.png", rec.mean[k].numpy())
                files["png"].append(f"png/mean_{k + 1:04d}.png")
                if rec.std is not None:
                    write_png(tmp / "png" / f"std_{k + 1:04d}.png", rec.std[k].numpy(), vmax=std_max or 1.0)
                    files["png"].append(f"png/std_{k + 1:04d}.png")
        record = {
            "invdiff_version": __version__,
            "created": datetime.datetime.now().isoformat(timespec="seconds"),
            **(extra or {}),
            "reconstruction": rec.info,
            "measurement": {"path": m.attrs.get("path"), "task": m.task, "noise_seed": m.noise_seed,
                            "value_map": vm.as_dict(), "resample": m.resample,
                            "source": {k: v for k, v in m.source.items() if k != "identifiers"},
                            "slices": m.source.get("identifiers")},
            "format": fmt,
            "files": files,
            "png_std_max": std_max,
            "metrics": rec.metrics,
            "runs": rec.runs,
        }
        (tmp / "provenance.json").write_text(json.dumps(record, indent=2, default=str))
    return record
