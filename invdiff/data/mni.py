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

__all__ = ["template_path", "load_template", "slices", "tissue_maps", "randomised_slice", "randomised", "heldout_from_template", "write_heldout", "HELDOUT", "GUARD",
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


# ----------------------------------------------------------------------------------
# domain randomisation
# ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def tissue_maps() -> dict[str, np.ndarray]:
    """Tissue probability maps of the template, float32 in ``[0, 1]`` on its 1 mm grid:
    ``gm`` and ``wm`` (nilearn's ICBM 2009a maps), ``csf`` (inside the brain's filled mask,
    neither grey nor white matter: ventricles, sulci), ``other`` (the T1 template outside the
    brain: scalp, skull marrow, fat) and ``t1`` (the template)."""
    from scipy import ndimage

    try:
        import nibabel as nib
    except ImportError as err:
        raise ImportError(f"the MNI tissue maps need nibabel: {_EXTRA}") from err
    folder = template_path().parent
    gm = np.asarray(nib.load(str(folder / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                    np.float32) / 255
    wm = np.asarray(nib.load(str(folder / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")).dataobj,
                    np.float32) / 255
    brain = ndimage.binary_fill_holes(ndimage.binary_closing(gm + wm > 0.2, iterations=3))
    brain = ndimage.gaussian_filter(brain.astype(np.float32), 1.0)
    csf = np.clip(brain - gm - wm, 0, 1)
    t1 = load_template()
    other = t1 * np.clip(1 - brain, 0, 1)
    return {"gm": gm, "wm": wm, "csf": csf, "other": other, "t1": t1}


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], scale: float, amplitude: float) -> np.ndarray:
    from scipy import ndimage

    coarse = rng.standard_normal((max(2, int(shape[0] / scale)), max(2, int(shape[1] / scale))))
    field = ndimage.zoom(coarse, (shape[0] / coarse.shape[0], shape[1] / coarse.shape[1]), order=3)
    return amplitude * field[: shape[0], : shape[1]] / max(float(np.abs(coarse).max()), 1e-6)


def randomised_slice(size: int, rng: np.random.Generator, heldout_guard: bool = True,
                     orientations: tuple[str, ...] = ORIENTATIONS) -> np.ndarray:
    """One domain-randomised brain slice ``(size, size)`` in ``[0, 1]`` (SynthSeg-style):

    * a random **plane** through the template: near one of the three orientations (tilt up
      to 15°), any in-plane rotation, a random field of view (pixel spacing 0.5–1.3 x the
      head's extent / ``size``) and centre, with a smooth **elastic** displacement of the
      sampling grid (up to 4 mm);
    * a random **contrast**: the intensities of grey matter, white matter, CSF and the
      other head tissue drawn independently in ``[0, 1]`` (T1-like, T2-like or arbitrary,
      a quarter of the slices T1-ordered), with the template's own texture in the other
      tissue;
    * a multiplicative **bias field** ``exp(f)`` with a smooth ``f`` (up to ±0.3), partial-
      volume blur and Rician **noise** of a random level (0–3 %), then the 99.5th percentile
      scaled to 1.

    With ``heldout_guard`` the plane's centre keeps :data:`GUARD` mm away from every held-out
    slice of its orientation (and its sagittal mirror), as for the template slices.
    ``orientations`` restricts the planes to those orientations (a perpendicular prior).
    """
    from scipy import ndimage

    maps = tissue_maps()
    shape = np.asarray(maps["t1"].shape, np.float64)
    orient = orientations[rng.integers(len(orientations))]
    axis = _AXIS[orient]
    usable = _usable(maps["t1"], axis)
    held = np.asarray(HELDOUT[orient])
    if orient == "sagittal":
        held = np.concatenate([held, int(shape[axis]) - 1 - held])
    while True:
        centre_index = int(rng.integers(usable.min(), usable.max() + 1))
        if not heldout_guard or np.abs(held - centre_index).min() > GUARD:
            break
    # the plane: normal near `axis`, in-plane basis rotated by a random angle
    normal = np.zeros(3)
    normal[axis] = 1.0
    tilt = rng.normal(0, 1, 3)
    tilt[axis] = 0
    tilt *= np.tan(np.radians(rng.uniform(0, 15))) / max(np.linalg.norm(tilt), 1e-9)
    normal = (normal + tilt) / np.linalg.norm(normal + tilt)
    helper = np.eye(3)[(axis + 1) % 3]
    u = np.cross(normal, helper)
    u /= np.linalg.norm(u)
    v = np.cross(normal, u)
    theta = rng.uniform(0, 2 * np.pi)
    u, v = np.cos(theta) * u + np.sin(theta) * v, -np.sin(theta) * u + np.cos(theta) * v
    centre = shape / 2 + rng.uniform(-12, 12, 3)
    centre[axis] = centre_index
    spacing = max(190.0 / size * rng.uniform(0.75, 1.3), 0.5)
    t = (np.arange(size) - (size - 1) / 2) * spacing
    a, b = np.meshgrid(t, t, indexing="ij")
    coords = centre[:, None, None] + a[None] * u[:, None, None] + b[None] * v[:, None, None]
    for k in range(3):  # elastic displacement, in mm
        coords[k] += _smooth_field(rng, (size, size), size / 4, rng.uniform(0, 4))
    sample = {k: ndimage.map_coordinates(m, coords, order=1, mode="constant", cval=0.0)
              for k, m in maps.items() if k != "t1"}
    if rng.uniform() < 0.25:  # T1-ordered: CSF < GM < WM
        csf_i, gm_i, wm_i = np.sort(rng.uniform(0.05, 1.0, 3))
    else:
        csf_i, gm_i, wm_i = rng.uniform(0.05, 1.0, 3)
    other_i = rng.uniform(0.3, 1.5)
    img = gm_i * sample["gm"] + wm_i * sample["wm"] + csf_i * sample["csf"] + other_i * sample["other"]
    img = img * np.exp(_smooth_field(rng, (size, size), size / 3, rng.uniform(0, 0.3)))
    img = ndimage.gaussian_filter(img, rng.uniform(0, 0.8))
    level = rng.uniform(0, 0.03) * max(float(img.max()), 1e-6)
    img = np.hypot(img + level * rng.standard_normal(img.shape), level * rng.standard_normal(img.shape))
    scale = np.percentile(img[img > 0.05 * img.max()], 99.5) if (img > 0.05 * img.max()).any() else 1.0
    return np.clip(img / max(scale, 1e-6), 0, 1).astype(np.float32)


def randomised(n: int, size: int = 256, seed: int = 0, stream: int = 0,
               orientations: tuple[str, ...] = ORIENTATIONS) -> torch.Tensor:
    """``n`` domain-randomised brain slices ``(n, 1, size, size)`` (:func:`randomised_slice`);
    slice ``k`` depends only on ``(seed, stream, k, orientations)``."""
    for o in orientations:
        if o not in _AXIS:
            raise ValueError(f"unknown orientation {o!r}; use {ORIENTATIONS}")
    out = [randomised_slice(size, np.random.default_rng([seed, stream, k]), orientations=orientations)
           for k in range(n)]
    return torch.from_numpy(np.stack(out)[:, None]) if out else torch.zeros(0, 1, size, size)


# ----------------------------------------------------------------------------------
# volumes
# ----------------------------------------------------------------------------------


def volume(size: int = 80, seed: int | None = None, depth: int | None = None) -> torch.Tensor:
    """The MNI152 head as a volume ``(1, 1, D, size, size)`` in ``[0, 1]``, oriented as the
    2D slices: axial slice ``d`` (superior first) is an image ``(H, W)`` with anterior up, as
    :func:`slices` renders it, and the coronal slice ``V[:, :, :, h, :]`` is ``(D, W)`` with
    superior up, as :func:`slices` renders coronal planes. The head's bounding cube (plus a
    margin) is resampled isotropically to ``size`` voxels a side (anti-aliased; ``size = 80``
    is about 2.5 mm voxels); ``depth`` keeps the ``depth`` central axial slices.

    :param seed: ``None`` gives the T1 template; an integer a domain-randomised contrast of
        the same anatomy in 3D (tissue intensities of grey and white matter, CSF and other
        head tissue drawn as in :func:`randomised_slice`, T1-ordered, a smooth 3D bias field
        and Rician noise of 1 %), which no prior has seen as an image. The anatomy is the
        template's: the 2D priors trained on its slices outside the held-out guard bands,
        so only the held-out axial and coronal planes of :data:`HELDOUT` are unseen anatomy.
    """
    from scipy import ndimage
    from skimage.transform import resize

    if seed is None:
        vol = load_template()
    else:
        rng = np.random.default_rng([int(seed), 7])
        maps = tissue_maps()
        csf_i, gm_i, wm_i = np.sort(rng.uniform(0.05, 1.0, 3))
        vol = gm_i * maps["gm"] + wm_i * maps["wm"] + csf_i * maps["csf"] + rng.uniform(0.3, 1.5) * maps["other"]
        coarse = rng.standard_normal((4, 4, 4))
        bias = ndimage.zoom(coarse, np.array(vol.shape) / 4, order=3)[: vol.shape[0], : vol.shape[1], : vol.shape[2]]
        vol = vol * np.exp(0.2 * bias / max(float(np.abs(coarse).max()), 1e-6))
        level = 0.01 * float(vol.max())
        vol = np.hypot(vol + level * rng.standard_normal(vol.shape), level * rng.standard_normal(vol.shape))
        vol = np.clip(vol / np.percentile(vol[vol > 0.05 * vol.max()], 99.5), 0, 1)
    def oriented(a: np.ndarray) -> np.ndarray:  # V[d, h, w] = a[x = w, y = Y - 1 - h, z = Z - 1 - d]
        return np.transpose(a, (2, 1, 0))[::-1, ::-1, :]

    v = np.ascontiguousarray(oriented(vol))
    inside = np.nonzero(oriented(load_template()) > 0.05)  # the head's box, the same for every contrast
    lo = np.array([i.min() for i in inside])
    hi = np.array([i.max() + 1 for i in inside])
    side = int((hi - lo).max()) + 2 * _MARGIN
    cube = np.zeros((side, side, side), np.float32)
    centre = (lo + hi) // 2
    src = [slice(max(c - side // 2, 0), min(c - side // 2 + side, n)) for c, n in zip(centre, v.shape)]
    dst = [slice(s.start - (c - side // 2), s.stop - (c - side // 2)) for s, c in zip(src, centre)]
    cube[tuple(dst)] = v[tuple(src)]
    out = np.clip(resize(cube, (size, size, size), anti_aliasing=True, order=1), 0, 1).astype(np.float32)
    if depth is not None:
        if not 1 <= depth <= size:
            raise ValueError(f"mni volume: depth must be in [1, {size}], got {depth}")
        start = (size - depth) // 2
        out = out[start:start + depth]
    return torch.from_numpy(out)[None, None]
