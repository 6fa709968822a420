r"""Registry of named inverse-problem tasks: :func:`make`, :func:`available`, :func:`describe`.

Every task is built from ``(name, img_size, seed, noise, noise_sigma, poisson_gain)``
plus task parameters with published defaults (overridable by keyword). All randomness
(masks, motion kernels, ...) is drawn from ``torch.Generator().manual_seed(seed)`` on
the CPU — never the global RNG — so ``make(name, seed=s)`` always returns the same
operator, on any device.

**Noise.** ``noise="gaussian"`` uses :class:`deepinv.physics.GaussianNoise` with
standard deviation ``noise_sigma`` stated in the measurement units of an image in
[0, 1]: natural-image tasks default to 0.025 (the reference repos' :math:`\sigma_y = 0.05`
on [-1, 1] images); CT defaults to 0.01 in sinogram units (line integrals of a [0, 1]
image in *pixel* units — a 256-pixel chord of value 0.5 integrates to 128, so this is
a very small relative noise; raise it for realism); MRI defaults to 0.01 per real and
imaginary k-space entry with the orthonormal FFT (so equal to 0.01 image-domain noise
for a full mask). ``noise="poisson"`` uses :class:`deepinv.physics.PoissonNoise`
(``gain`` = ``poisson_gain``, default 1/255 for natural images, 1e-2 for CT;
not available for MRI); ``noise="none"`` gives noiseless measurements.

**Seeded noise.** The noise model gets its own ``torch.Generator`` (on the physics'
device) seeded with ``seed``. In deepinv 0.5 a ``NoiseModel`` draws from ``self.rng``,
which advances with every call; ``physics(x, seed=k)`` re-seeds it first (reproducible
measurements), and ``physics.noise_model.reset_rng()`` returns it to its initial state.

**Task record.** Each physics gets ``physics.task`` (JSON-serialisable: name, img_size,
seed, noise settings and every resolved task parameter) and ``physics.img_size``;
``make(**physics.task)`` rebuilds an identical operator.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from deepinv.physics import GaussianNoise, Inpainting, Physics, PoissonNoise, ZeroNoise
from deepinv.physics.functional import gaussian_blur
from deepinv.physics.generator import MotionBlurGenerator

from .ct import FanBeamCT, ParallelBeamCT
from .mri import (
    MultiCoilMRIOperator,
    SingleCoilMRI,
    birdcage_coil_maps,
    cartesian_mask,
    normalize_coil_maps,
)
from .natural import BlindBlur, ClosedFormDownsampling, WienerBlurFFT
from .phase_retrieval import FourierPhaseRetrieval
from .volume import Cartesian3DMRI, SliceAveraging, SliceStack, phase_encode_mask

__all__ = ["make", "available", "describe", "task_info", "operator_info", "OperatorInfo", "TASK_EXAMPLES"]


@dataclass(frozen=True)
class OperatorInfo:
    """What callers ask of an operator instead of parsing its name.

    :ivar family: ``"ct"``, ``"mri"``, ``"natural"`` (blur, inpainting, super-resolution),
        ``"blind"`` (blind deblurring: the kernel unknown) or ``"nonlinear"`` (phase retrieval) for invdiff's tasks; ``"other"`` for physics
        invdiff did not make.
    :ivar linear: a :class:`deepinv.physics.LinearPhysics` (``A_adjoint`` exists).
    :ivar complex: the images are complex (MRI with 2 channels, real and imaginary).
    """

    family: str
    linear: bool
    complex: bool = False
    #: the images are volumes ``(B, C, D, H, W)`` (:mod:`invdiff.operators.volume`).
    volume: bool = False

    @property
    def metric_range(self) -> str:
        """``"data"`` when PSNR/SSIM use the ground truth's range (MRI magnitudes are not on
        ``[0, 1]``), ``"unit"`` when they use the peak 1."""
        return "data" if self.family == "mri" else "unit"


@dataclass(frozen=True)
class _Task:
    pattern: str  # display name, e.g. "ct-sparse-<N>"
    regex: str  # full-match regex; group 1 (if any) is the number
    description: str  # one line, may use {n}
    default_size: tuple[int, int, int]
    default_sigma: float
    default_gain: float
    defaults: dict  # task parameters and their defaults
    build: Callable  # (number, img_size, generator, params, device) -> Physics
    example: str
    family: str = "natural"
    volume_only: bool = False  # needs img_size (C, D, H, W)


def _odd_clip(size: int, limit: int) -> int:
    """Largest odd number <= min(size, limit)."""
    s = min(size, limit)
    return s if s % 2 == 1 else s - 1


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _number(value, key: str, name: str) -> float:
    """``float(value)``, refusing what is not a finite number (NaN or Inf would make every
    measurement NaN/Inf without an error)."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{name}: {key} must be a number, got {value!r}") from None
    _need(bool(np.isfinite(number)), f"{name}: {key} must be a finite number, got {value!r}")
    return number


# ----------------------------------------------------------------------- builders
def _blur_gauss(n, size, gen, p, device):
    C, H, W = size
    kh, kw = _odd_clip(H, p["psf_size"]), _odd_clip(W, p["psf_size"])
    kernel = gaussian_blur(psf_size=(kh, kw), sigma=(p["kernel_std"], p["kernel_std"]))
    kernel = kernel.reshape(1, 1, kh, kw)
    kernel = kernel / kernel.sum()
    return WienerBlurFFT(size, filter=kernel, wiener_reg=p["wiener_reg"], device=device)


def _blur_motion(n, size, gen, p, device):
    C, H, W = size
    kh, kw = _odd_clip(H, p["psf_size"]), _odd_clip(W, p["psf_size"])
    kernel = MotionBlurGenerator((kh, kw), rng=gen, l=p["length_scale"], sigma=p["intensity"]).step(1)["filter"]
    return WienerBlurFFT(size, filter=kernel, wiener_reg=p["wiener_reg"], device=device)


def _blur_blind(n, size, gen, p, device):
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))  # the kernel of physics(x) without a seed
    return BlindBlur(size, kernel_size=p["kernel_size"], wiener_reg=p["wiener_reg"], guess_std=p["guess_std"],
                     seed=seed, device=device)


def _inpaint_box(n, size, gen, p, device):
    C, H, W = size
    bh, bw = max(1, round(H * p["box_fraction"])), max(1, round(W * p["box_fraction"]))
    top, left = (H - bh) // 2, (W - bw) // 2
    mask = torch.ones(C, H, W)
    mask[:, top : top + bh, left : left + bw] = 0
    return Inpainting(size, mask=mask, device=device)


def _inpaint_random(n, size, gen, p, device):
    C, H, W = size
    _need(0 <= n < 100, f"inpaint-random-{n}: percentage missing must be in [0, 100)")
    keep = (torch.rand(H, W, generator=gen) >= n / 100.0).float()
    return Inpainting(size, mask=keep.expand(C, H, W).clone(), device=device)


def _sr(n, size, gen, p, device):
    _need(n >= 1, f"sr-{n}x: factor must be >= 1")
    _need(size[1] % n == 0 and size[2] % n == 0, f"sr-{n}x: image size {size[1:]} not divisible by {n}")
    return ClosedFormDownsampling(size, factor=n, filter=p["filter"], device=device)


def _ct_common(size, where):
    _need(size[1] >= 8 and size[2] >= 8, f"{where}: image too small {size}; need H, W >= 8")


def _ct_sparse(n, size, gen, p, device):
    _ct_common(size, f"ct-sparse-{n}")
    _need(n >= 1, f"ct-sparse-{n}: number of views must be >= 1")
    angles = np.linspace(0.0, 180.0, n, endpoint=False)
    return ParallelBeamCT(size, angles, n_detectors=p["n_detectors"], fbp_filter=p["fbp_filter"], device=device)


def _ct_limited(n, size, gen, p, device):
    _ct_common(size, f"ct-limited-{n}")
    _need(1 <= n <= 180, f"ct-limited-{n}: angular range must be in [1, 180] degrees")
    angles = np.arange(0.0, float(n), p["angle_step"])
    return ParallelBeamCT(size, angles, n_detectors=p["n_detectors"], fbp_filter=p["fbp_filter"], device=device)


def _ct_fan(n, size, gen, p, device):
    _ct_common(size, f"ct-fan-{n}")
    _need(n >= 1, f"ct-fan-{n}: number of views must be >= 1")
    angles = np.linspace(0.0, 360.0, n, endpoint=False)
    return FanBeamCT(
        size,
        angles,
        source_distance=p["source_distance"],
        detector_distance=p["detector_distance"],
        n_detectors=p["n_detectors"],
        fbp_filter=p["fbp_filter"],
        device=device,
    )


def _mri_checks(n, size, where):
    _need(n >= 1, f"{where}: acceleration must be >= 1")
    _need(size[0] in (1, 2), f"{where}: img_size[0] must be 1 (real) or 2 (complex), got {size}")
    _need(size[1] >= 8 and size[2] >= 8, f"{where}: image too small {size}; need H, W >= 8")


def _mri(n, size, gen, p, device):
    _mri_checks(n, size, f"mri-{n}x")
    mask = cartesian_mask(size[1], size[2], n, p["center_fraction"], p["mask_type"], gen)
    return SingleCoilMRI(mask, img_size=size, device=device)


def _mri_multicoil(n, size, gen, p, device):
    _mri_checks(n, size, f"mri-multicoil-{n}x")
    mask = cartesian_mask(size[1], size[2], n, p["center_fraction"], p["mask_type"], gen)
    maps = p.get("_coil_maps_tensor")
    if maps is None:
        _need(p["n_coils"] >= 1, f"mri-multicoil-{n}x: n_coils must be >= 1")
        maps = birdcage_coil_maps(p["n_coils"], size[1], size[2])
    else:
        maps = normalize_coil_maps(maps.reshape(-1, size[1], size[2]).to(torch.complex64))
    return MultiCoilMRIOperator(mask, maps, img_size=size, device=device)


def _phase(n, size, gen, p, device):
    _need(size[1] >= 4 and size[2] >= 4, f"phase-retrieval: image too small {size}")
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
    return FourierPhaseRetrieval(
        size, oversampling=p["oversampling"], n_hio=p["n_hio"], n_er=p["n_er"], seed=seed, device=device
    )


def _mri3d(n, size, gen, p, device):
    _need(n >= 1, f"mri3d-{n}x: acceleration must be >= 1")
    _need(size[0] in (1, 2), f"mri3d-{n}x: img_size[0] must be 1 (real) or 2 (complex), got {size}")
    mask = phase_encode_mask(size[1], size[3], n, p["center_fraction"], gen)
    return Cartesian3DMRI(mask, size, device=device)


def _zsr(n, size, gen, p, device):
    _need(n >= 1 and size[1] % n == 0, f"zsr-{n}x: {size[1]} slices are not divisible by {n}")
    return SliceAveraging(size, n, device=device)


_NAT = (3, 256, 256)
_VOL = (1, 32, 128, 128)
_TASKS: list[_Task] = [
    _Task("deblur-gauss", r"deblur-gauss", "Gaussian deblurring (std 3.0, 61x61 kernel, circular BlurFFT, Wiener A_dagger)",
          _NAT, 0.025, 1 / 255, {"kernel_std": 3.0, "psf_size": 61, "wiener_reg": 1e-3}, _blur_gauss, "deblur-gauss"),
    _Task("deblur-motion", r"deblur-motion", "motion deblurring (seeded deepinv MotionBlurGenerator, 61x61, circular, Wiener A_dagger)",
          _NAT, 0.025, 1 / 255, {"psf_size": 61, "length_scale": 0.3, "intensity": 0.25, "wiener_reg": 1e-3},
          _blur_motion, "deblur-motion"),
    _Task("deblur-blind", r"deblur-blind", "blind deblurring: each measurement seed draws a held-out motion, diffraction "
          "or Gaussian kernel (invdiff.operators.kernels) hidden from the solver (H/4 kernels, circular, Wiener A_dagger "
          "with a Gaussian guess)", (1, 64, 64), 0.01, 1 / 255,
          {"kernel_size": None, "wiener_reg": 1e-2, "guess_std": 1.5}, _blur_blind, "deblur-blind", "blind"),
    _Task("inpaint-box", r"inpaint-box", "box inpainting (centre box of half the side missing, e.g. 128x128 on 256x256)",
          _NAT, 0.025, 1 / 255, {"box_fraction": 0.5}, _inpaint_box, "inpaint-box"),
    _Task("inpaint-random-<P>", r"inpaint-random-(\d+)", "random inpainting ({n}% of pixels missing, same mask across channels)",
          _NAT, 0.025, 1 / 255, {}, _inpaint_random, "inpaint-random-70"),
    _Task("sr-<k>x", r"sr-(\d+)x", "{n}x super-resolution (bicubic anti-aliasing, circular padding, closed-form A_dagger)",
          _NAT, 0.025, 1 / 255, {"filter": "bicubic"}, _sr, "sr-4x"),
    _Task("ct-sparse-<N>", r"ct-sparse-(\d+)", "sparse-view parallel-beam CT ({n} views uniform over [0, 180) degrees, FBP A_dagger)",
          (1, 256, 256), 0.01, 1e-2, {"n_detectors": None, "fbp_filter": "ramp"}, _ct_sparse, "ct-sparse-30", "ct"),
    _Task("ct-limited-<D>", r"ct-limited-(\d+)", "limited-angle parallel-beam CT (views every 1 degree over [0, {n}), FBP A_dagger)",
          (1, 256, 256), 0.01, 1e-2, {"n_detectors": None, "fbp_filter": "ramp", "angle_step": 1.0},
          _ct_limited, "ct-limited-90", "ct"),
    _Task("ct-fan-<N>", r"ct-fan-(\d+)", "fan-beam CT, flat detector ({n} views over [0, 360), source at 2x the image diagonal, weighted FBP)",
          (1, 256, 256), 0.01, 1e-2,
          {"n_detectors": None, "fbp_filter": "ramp", "source_distance": None, "detector_distance": None},
          _ct_fan, "ct-fan-90", "ct"),
    _Task("mri-<R>x", r"mri-(\d+)x", "single-coil Cartesian MRI, {n}x column undersampling (zero-filled IFFT A_dagger)",
          (1, 256, 256), 0.01, 0.0, {"mask_type": "random", "center_fraction": None}, _mri, "mri-4x", "mri"),
    _Task("mri-multicoil-<R>x", r"mri-multicoil-(\d+)x",
          "multi-coil Cartesian MRI, {n}x column undersampling, simulated birdcage coils (adjoint coil combination A_dagger)",
          (1, 256, 256), 0.01, 0.0, {"mask_type": "random", "center_fraction": None, "n_coils": 8, "coil_maps": None},
          _mri_multicoil, "mri-multicoil-8x", "mri"),
    _Task("phase-retrieval", r"phase-retrieval", "Fourier phase retrieval |FFT(pad(x))|, oversampling 2.0 (DPS), HIO baseline A_dagger",
          _NAT, 0.025, 1 / 255, {"oversampling": 2.0, "n_hio": 40, "n_er": 10}, _phase, "phase-retrieval", "nonlinear"),
    _Task("mri3d-<R>x", r"mri3d-(\d+)x",
          "3D Cartesian MRI, {n}x variable-density undersampling of the (kz, kx) phase encodes (zero-filled 3D IFFT A_dagger)",
          _VOL, 0.01, 0.0, {"center_fraction": 0.08}, _mri3d, "mri3d-8x", "mri", True),
    _Task("zsr-<k>x", r"zsr-(\d+)x", "z-axis super-resolution: thick slices averaging {n} thin ones (linear slice interpolation A_dagger)",
          _VOL, 0.01, 1e-2, {}, _zsr, "zsr-4x", "mri", True),
]

#: one representative concrete name per registered pattern
TASK_EXAMPLES: list[str] = [t.example for t in _TASKS]


def available(examples: bool = False) -> list[str]:
    """Names of the registered tasks: patterns such as ``"ct-sparse-<N>"``, or with
    ``examples=True`` one concrete representative each (``"ct-sparse-30"``)."""
    return list(TASK_EXAMPLES) if examples else [t.pattern for t in _TASKS]


def _lookup(name: str) -> tuple[_Task, int | None]:
    if not isinstance(name, str):
        raise ValueError(f"task name must be a string, got {type(name).__name__}")
    for task in _TASKS:
        m = re.fullmatch(task.regex, name)
        if m:
            return task, (int(m.group(1)) if m.groups() else None)
    raise ValueError(f"unknown task {name!r}; available: {', '.join(available())}")


def task_info(name: str, channels: int = 1, volume: bool = False) -> OperatorInfo:
    """:class:`OperatorInfo` of the registered task ``name`` for images of ``channels``
    channels (volumes when ``volume``), without building it.

    >>> task_info("mri-4x", channels=2)
    OperatorInfo(family='mri', linear=True, complex=True, volume=False)
    """
    task, _ = _lookup(name)
    return OperatorInfo(task.family, task.family not in ("nonlinear", "blind"), task.family == "mri" and channels == 2,
                        volume or task.volume_only)


def operator_info(physics: Physics) -> OperatorInfo:
    """:class:`OperatorInfo` of a built operator: the record invdiff attached in :func:`make`,
    else what its class says (deepinv's ``MRI`` / ``MultiCoilMRI``, ``Tomography``)."""
    info = getattr(physics, "info", None)
    if isinstance(info, OperatorInfo):
        return info
    from deepinv.physics import MRI, LinearPhysics, MultiCoilMRI, Tomography

    family = "mri" if isinstance(physics, (MRI, MultiCoilMRI)) else "ct" if isinstance(physics, Tomography) else "other"
    return OperatorInfo(family, isinstance(physics, LinearPhysics), family == "mri")


def describe(name: str) -> str:
    """One-line description of a task (a concrete name or a pattern from :func:`available`)."""
    for task in _TASKS:
        if name == task.pattern:
            placeholder = re.search(r"<\w+>", task.pattern)
            return f"{task.pattern}: " + task.description.replace("{n}", placeholder.group(0) if placeholder else "")
    task, n = _lookup(name)
    return f"{name}: " + task.description.format(n=n)


def _noise_model(noise, sigma, gain, seed, device):
    gen = torch.Generator(device=device).manual_seed(seed)
    if noise == "gaussian":
        _need(sigma >= 0, f"noise_sigma must be >= 0, got {sigma}")
        return GaussianNoise(sigma=sigma, rng=gen)
    if noise == "poisson":
        _need(gain > 0, f"poisson_gain must be > 0, got {gain}")
        return PoissonNoise(gain=gain, clip_positive=True, rng=gen)
    if noise == "none":
        return ZeroNoise()
    raise ValueError(f"noise must be 'gaussian', 'poisson' or 'none', got {noise!r}")


def make(
    name: str,
    img_size: tuple[int, int, int] | None = None,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
    noise: str = "gaussian",
    noise_sigma: float | None = None,
    poisson_gain: float | None = None,
    **overrides,
) -> Physics:
    r"""Build the named task's deepinv physics with published defaults.

    :param str name: task name, e.g. ``"deblur-gauss"``, ``"inpaint-random-70"``,
        ``"sr-4x"``, ``"ct-sparse-30"``, ``"ct-limited-90"``, ``"ct-fan-360"``, ``"mri-4x"``,
        ``"mri-multicoil-8x"``, ``"phase-retrieval"`` (see :func:`available`).
    :param tuple img_size: ``(C, H, W)``; default ``(3, 256, 256)`` for natural images,
        ``(1, 256, 256)`` for CT and MRI (MRI: ``C=1`` real, ``C=2`` complex). A volume
        ``(C, D, H, W)`` makes a linear 2D task act on every axial slice
        (:class:`~invdiff.operators.volume.SliceStack`); ``mri3d-<R>x`` and ``zsr-<k>x`` are
        volume tasks only (default ``(1, 32, 128, 128)``).
    :param device: device of the physics' buffers (random draws are always on the CPU).
    :param int seed: seed of every random draw of the operator and of its noise generator.
    :param str noise: ``"gaussian"``, ``"poisson"`` or ``"none"``.
    :param float noise_sigma: Gaussian std in [0, 1]-image measurement units (see module doc).
    :param float poisson_gain: Poisson gain.
    :param overrides: task parameters (see ``make(name).task`` for the list), e.g.
        ``kernel_std=2.0``, ``fbp_filter="hann"``, ``mask_type="equispaced"``,
        ``n_coils=4``, ``coil_maps=<complex (N, H, W) tensor>``.
    :return: a :class:`deepinv.physics.Physics` with attributes ``task`` and ``img_size``.
    :raises ValueError: unknown name, unknown parameter or invalid value.

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff import operators
        >>> physics = operators.make("inpaint-random-70", (3, 32, 32), seed=1)
        >>> x = torch.rand(1, 3, 32, 32)
        >>> y = physics(x, seed=0)
        >>> same = operators.make(**physics.task)
        >>> torch.equal(same.mask, physics.mask)
        True
    """
    task, n = _lookup(name)
    if img_size is None:
        img_size = task.default_size
    try:
        img_size = tuple(int(s) for s in img_size)
    except TypeError:
        raise ValueError(f"{name}: img_size must be (C, H, W) or (C, D, H, W), got {img_size!r}") from None
    _need(len(img_size) in (3, 4) and min(img_size) >= 1,
          f"{name}: img_size must be (C, H, W) or, for a volume, (C, D, H, W) of positive ints, got {img_size}")
    volume = len(img_size) == 4
    _need(volume or not task.volume_only, f"{name}: a volume task; img_size must be (C, D, H, W), got {img_size}")
    _need(not volume or task.volume_only or task.family not in ("nonlinear", "blind"),
          f"{name}: volumes are built from linear 2D tasks; {name} is not linear")
    unknown = sorted(set(overrides) - set(task.defaults))
    _need(not unknown, f"{name}: unknown parameter(s) {unknown}; valid: {sorted(task.defaults)}")
    params = {**task.defaults, **overrides}
    record = {k: v for k, v in params.items()}

    if "coil_maps" in params:
        maps = params["coil_maps"]
        if isinstance(maps, torch.Tensor):
            params["_coil_maps_tensor"] = maps
            params["n_coils"] = int(maps.reshape(-1, img_size[1], img_size[2]).shape[0])
            record["coil_maps"] = "user"
            record["n_coils"] = params["n_coils"]
        elif maps == "user":
            raise ValueError(f"{name}: this task used user coil maps; pass the tensor again as coil_maps=...")
        elif maps is not None:
            raise ValueError(f"{name}: coil_maps must be a complex tensor (N, H, W) or None")

    if task.family == "mri" and noise == "poisson":
        raise ValueError(f"{name}: Poisson noise is not defined for complex k-space; use 'gaussian' or 'none'")
    sigma = task.default_sigma if noise_sigma is None else _number(noise_sigma, "noise_sigma", name)
    gain = task.default_gain if poisson_gain is None else _number(poisson_gain, "poisson_gain", name)
    _need(sigma >= 0, f"{name}: noise_sigma must be >= 0, got {sigma:g}")
    _need(gain >= 0, f"{name}: poisson_gain must be >= 0, got {gain:g}")
    for key, value in params.items():  # every numeric task parameter must be a finite number
        if isinstance(value, (float, int, np.floating, np.integer)) and not isinstance(value, bool):
            _number(value, key, name)

    generator = torch.Generator().manual_seed(int(seed))
    if volume and not task.volume_only:  # a 2D task on every axial slice
        physics = task.build(n, (img_size[0], *img_size[2:]), generator, params, device)
        physics.img_size = (img_size[0], *img_size[2:])
        physics = SliceStack(physics, img_size[1])
    else:
        physics = task.build(n, img_size, generator, params, device)
    physics.noise_model = _noise_model(noise, sigma, gain, int(seed), device)
    physics.img_size = img_size

    record = {
        "name": name,
        "img_size": list(img_size),
        "seed": int(seed),
        "noise": noise,
        "noise_sigma": sigma,
        "poisson_gain": gain,
        **record,
    }
    json.dumps(record)  # must stay serialisable
    physics.task = record
    physics.info = task_info(name, img_size[0], volume)
    return physics
