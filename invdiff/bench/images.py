"""Ground-truth images of a benchmark, from any source, conformed to the prior's shape.

Sources (the ``images`` argument of :func:`invdiff.bench.run`, ``--images-from`` on the
command line):

* ``"ct-phantom"``, ``"mri-brain"`` — the built-in held-out images of the shipped priors
  (:func:`invdiff.data.heldout`; never trained on); ids ``ct-phantom/0``, ...
* ``"prior"`` — exact samples of an analytic prior (held-out seed 10000, clamped to
  [0, 1], see :func:`prior_images`); ids ``prior/0``, ...
* a folder of PNG / DICOM / NIfTI files, read by :func:`invdiff.io.read_image_folder`;
  ids are the names it returns;
* any ``torch.utils.data.Dataset`` (deepinv datasets included) whose items are image
  tensors or ``(x, y, ...)`` tuples; ids ``<ClassName>/<index>``;
* a tensor ``(N, C, H, W)`` or a list of ``(id, tensor)`` pairs.

``None`` picks the held-out set matching a shipped prior's name (``ct-phantom-64`` ->
``ct-phantom``) or ``"prior"`` for a prior that can sample itself.

Every image is made ``(C, H, W)`` float32 in [0, 1] with the prior's shape: RGB becomes
grey (``kornia.color.rgb_to_grayscale``) for a 1-channel prior, grey is repeated for a
3-channel one and gets a zero imaginary part for a 2-channel (complex MRI) one, and a
different size is resized with antialiasing (``kornia.geometry.transform.resize``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from .grid import tensor_hash

__all__ = ["BenchImage", "load_images", "load_volumes", "conform", "default_source", "prior_images",
           "HELDOUT_PRIOR_SEED"]

#: Seed of the generator that draws ``"prior"`` images (disjoint from the samplers' seeds).
HELDOUT_PRIOR_SEED = 10_000
_BUILTIN = ("ct-phantom", "mri-brain")
_RANGE_TOL = 1e-3


@dataclass(frozen=True)
class BenchImage:
    """One ground-truth image: ``x`` is ``(C, H, W)`` (a volume: ``(C, D, H, W)``) float32 in
    [0, 1] on the CPU."""

    id: str
    index: int
    x: Tensor
    source: str
    hash: str
    note: str = ""


def default_source(prior_name: str, prior: Any) -> str:
    """The image source used when none is given (see module doc)."""
    for name in _BUILTIN:
        if Path(prior_name).stem.startswith(name):
            return name
    if callable(getattr(prior, "sample", None)):
        return "prior"
    raise ValueError(
        f"no default images for prior {prior_name!r}: give --images-from (ct-phantom, mri-brain, a folder) "
        "or images= (a folder, a torch Dataset, a tensor)"
    )


def conform(x: Tensor, shape: Sequence[int], where: str) -> tuple[Tensor, str]:
    """``x`` (C, H, W) made float32 of ``shape`` (see module doc); returns it and a note on what changed."""
    import kornia

    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3:
        raise ValueError(f"{where}: expected an image (C, H, W) or (H, W), got shape {tuple(x.shape)}")
    x = x.detach().cpu().float()
    c, h, w = shape
    notes = []
    if x.shape[0] != c:
        if x.shape[0] == 3 and c == 1:
            x = kornia.color.rgb_to_grayscale(x[None])[0]
            notes.append("rgb->grey")
        elif x.shape[0] == 1 and c == 3:
            x = x.repeat(3, 1, 1)
            notes.append("grey->rgb")
        elif x.shape[0] == 1 and c == 2:
            x = torch.cat([x, torch.zeros_like(x)])
            notes.append("real->complex")
        else:
            raise ValueError(f"{where}: {x.shape[0]} channels cannot be matched to the prior's {c}")
    if tuple(x.shape[1:]) != (h, w):
        notes.append(f"resized from {x.shape[1]}x{x.shape[2]}")
        x = kornia.geometry.transform.resize(x[None], (h, w), antialias=True)[0]
    if not torch.isfinite(x).all():
        raise ValueError(f"{where}: the image has NaN/Inf values")
    lo, hi = float(x.min()), float(x.max())
    if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
        raise ValueError(f"{where}: values in [{lo:.4g}, {hi:.4g}]; the benchmark expects images in [0, 1]")
    return x.clamp(0, 1).contiguous(), ", ".join(notes)


def prior_images(prior: Any, n: int) -> Tensor:
    """``n`` held-out samples of a prior, ``(n, C, H, W)`` float32 in [0, 1] on a 16-bit grid.

    A :class:`~invdiff.priors.GaussianMixturePrior` is sampled here as
    :math:`x = \\mu_k + L_k z` with :math:`L_k` the Cholesky factor of component :math:`k`'s
    covariance, not with ``prior.sample`` (which uses the eigenvectors: within a repeated
    eigenvalue, as in a stationary prior, LAPACK may return another basis under another
    thread count, and so other images). The Cholesky factor is unique, and rounding to
    multiples of 1/65535 (a 16-bit image) makes the images bit-identical across machines, so
    their hashes, and the cell ids, are too. Other priors use ``prior.sample(n, generator)``.
    """
    from ..priors import GaussianMixturePrior

    g = torch.Generator().manual_seed(HELDOUT_PRIOR_SEED)
    if isinstance(prior, GaussianMixturePrior):
        k, d = prior.means.shape
        comp = torch.multinomial(prior.weights.cpu(), n, replacement=True, generator=g)
        z = torch.randn(n, d, generator=g, dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64)
        chol = torch.linalg.cholesky(prior.covariances.cpu() + 1e-10 * eye)
        x = prior.means.cpu()[comp] + torch.einsum("nde,ne->nd", chol[comp], z)
        x = x.reshape(n, *prior.image_shape)
    elif callable(getattr(prior, "sample", None)):
        x = prior.sample(n, g).detach().cpu()
    else:
        raise ValueError(f"images='prior' needs a prior with a sample() method, got {type(prior).__name__}")
    return (x.clamp(0, 1) * 65535).round().div(65535).float()


def _dataset_item(item: Any, where: str) -> Tensor:
    if isinstance(item, Tensor):
        return item
    if isinstance(item, (tuple, list)) and item and isinstance(item[0], Tensor):
        return item[0]
    if isinstance(item, dict) and isinstance(item.get("x"), Tensor):
        return item["x"]
    raise ValueError(f"{where}: dataset items must be tensors or (x, y) tuples, got {type(item).__name__}")


def _raw(source: Any, n: int | None, prior: Any, shape: Sequence[int]) -> tuple[str, list[tuple[str, Tensor]]]:
    """(source label, [(id, image)]) before conforming."""
    if isinstance(source, Tensor):
        x = source if source.ndim == 4 else source[None]
        x = x if n is None else x[:n]
        return "tensor", [(f"tensor/{i}", x[i]) for i in range(x.shape[0])]
    if isinstance(source, torch.utils.data.Dataset):
        total = len(source)  # type: ignore[arg-type]
        count = total if n is None else min(n, total)
        if n is not None and n > total:
            raise ValueError(f"the dataset has {total} items; asked for {n} images")
        label = type(source).__name__
        return label, [(f"{label}/{i}", _dataset_item(source[i], f"{label}[{i}]")) for i in range(count)]
    if isinstance(source, (list, tuple)):
        pairs = list(source) if n is None else list(source)[:n]
        for p in pairs:
            if not (isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], Tensor)):
                raise ValueError("a list of images must hold (id, tensor) pairs")
        return "list", [(str(i), x) for i, x in pairs]
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"images must be a source name, a folder, a Dataset or a tensor, got {type(source).__name__}")
    text = os.fspath(source)
    if text in _BUILTIN:
        from .. import data  # lazy: the built-in images load nilearn / numpy code

        side = max(shape[1], shape[2])
        x = data.heldout(text, n, size=side)
        return text, [(f"{text}/{i}", x[i]) for i in range(x.shape[0])]
    if text == "prior":
        x = prior_images(prior, 8 if n is None else n)
        return "prior", [(f"prior/{i}", x[i]) for i in range(x.shape[0])]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"no image folder at {path.resolve()} (sources: a folder, {', '.join(_BUILTIN)}, prior)"
        )
    try:
        from ..io import read_image_folder
    except ImportError as err:
        raise RuntimeError(f"reading the image folder {path} needs invdiff.io.read_image_folder ({err})") from None
    pairs = read_image_folder(path)
    if not pairs:
        raise ValueError(f"{path}: no PNG/DICOM/NIfTI images found")
    pairs = pairs if n is None else pairs[:n]
    return str(path), [(str(i), x) for i, x in pairs]


def load_images(source: Any, n: int | None, prior: Any, prior_name: str,
                shape: Sequence[int] | None = None) -> list[BenchImage]:
    """The benchmark's images for ``prior`` (see module doc); ``n`` = how many (``None``: all);
    ``shape`` = ``(C, H, W)`` of the grid (default: the prior's)."""
    if n is not None and n < 1:
        raise ValueError(f"the number of images must be >= 1, got {n}")
    shape = tuple(prior.image_shape) if shape is None else tuple(int(s) for s in shape)
    if source is None:
        source = default_source(prior_name, prior)
    label, raw = _raw(source, n, prior, shape)
    ids = [i for i, _ in raw]
    if len(set(ids)) != len(ids):
        raise ValueError(f"image ids from {label} are not unique")
    out = []
    for index, (image_id, x) in enumerate(raw):
        x, note = conform(torch.as_tensor(x), shape, f"image {image_id}")
        out.append(BenchImage(image_id, index, x, label, tensor_hash(x), note))
    return out


def load_volumes(source: Any, n: int | None, prior_name: str, shape: Sequence[int]) -> list[BenchImage]:
    """Ground-truth volumes ``(C, D, H, W)`` of a volume grid (``invdiff bench --depth D``).

    :param source: ``"ct-phantom"`` (:func:`invdiff.data.phantoms.ct_volume`, held-out
        stream 1, volume ``k`` of seed ``k``), ``"mri-brain"`` (:func:`invdiff.data.mni.volume`
        of side ``H`` with the central ``D`` axial slices, contrast seed ``k``), a tensor
        ``(N, C, D, H, W)``, or ``None`` (by the prior's name: ``mri`` -> ``mri-brain``, else
        ``ct-phantom``).
    :param n: how many (default 2; a tensor: all).
    :param shape: ``(C, D, H, W)``; the built-in volumes need ``H == W``.
    """
    C, D, H, W = (int(s) for s in shape)
    if n is not None and n < 1:
        raise ValueError(f"the number of volumes must be >= 1, got {n}")
    if source is None:
        source = "mri-brain" if "mri" in prior_name else "ct-phantom"
    if isinstance(source, Tensor):
        x = source if source.ndim == 5 else source[None]
        x = x if n is None else x[:n]
        label, raw = "tensor", [(f"tensor/{i}", x[i]) for i in range(x.shape[0])]
    elif source in _BUILTIN:
        if H != W or C != 1:
            raise ValueError(f"the built-in {source} volumes are (1, D, N, N); the grid is {tuple(shape)}")
        from .. import data

        count = 2 if n is None else n
        if source == "ct-phantom":
            vols = [data.phantoms.ct_volume(D, H, seed=k, stream=1)[0] for k in range(count)]
        else:
            if D > H:
                raise ValueError(f"mri-brain volumes have at most {H} slices at side {H}; asked for {D}")
            vols = [data.mni.volume(H, seed=k, depth=D)[0] for k in range(count)]
        label, raw = f"{source}-volume", [(f"{source}-volume/{k}", v) for k, v in enumerate(vols)]
    else:
        raise ValueError(f"volume grids take images from ct-phantom, mri-brain or a (N, C, D, H, W) tensor; "
                         f"got {source!r}")
    out = []
    for index, (image_id, x) in enumerate(raw):
        if tuple(x.shape) != (C, D, H, W):
            raise ValueError(f"volume {image_id} has shape {tuple(x.shape)}, the grid's is {(C, D, H, W)}")
        x = x.float().contiguous()
        out.append(BenchImage(image_id, index, x, label, tensor_hash(x), ""))
    return out
