"""PNG and TIFF in and out (Pillow), and quick-look PNGs of any result.

Reading keeps the file's values (``L``/``I;16`` grayscale, ``RGB``; palette images are
expanded, alpha dropped); 8- and 16-bit images record their bit depth so they map to
[0, 1] as ``v / (2^bits - 1)`` and are written back at the same depth. Multi-page TIFFs
give one slice per page.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..files import atomic_file
from .stack import ImageStack, check_finite

__all__ = ["IMAGE_SUFFIXES", "read_image", "write_image", "write_png"]

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


def _page(img, path: Path) -> tuple[np.ndarray, int | None]:
    mode = img.mode
    if mode == "P" or mode == "PA":
        img = img.convert("RGBA" if "transparency" in img.info or mode == "PA" else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA"):
        img = img.convert("RGB" if mode == "RGBA" else "L")
        mode = img.mode
    if mode == "1":
        img, mode = img.convert("L"), "L"
    arr = np.asarray(img)
    if mode in ("L", "RGB"):
        bits = 8
    elif mode.startswith("I;16"):
        bits = 16
    elif mode in ("I", "F"):
        bits = None
    elif mode == "CMYK" or mode == "YCbCr":
        arr, bits = np.asarray(img.convert("RGB")), 8
    else:
        raise ValueError(f"{path}: unsupported image mode {mode!r}")
    arr = arr.astype(np.float64)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return arr, bits


def read_image(path: str | os.PathLike) -> ImageStack:
    """Read a PNG or TIFF file into an :class:`ImageStack` ``(pages, C, H, W)``.

    :raises FileNotFoundError: no such file.
    :raises ValueError: not a readable image.
    """
    from PIL import Image, ImageSequence, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            pages = [_page(p.copy(), path) for p in ImageSequence.Iterator(im)]
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ValueError) and str(err).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a readable image ({err})") from None
    if not pages:
        raise ValueError(f"{path}: not a readable image (no pages)")
    for k, page in enumerate(pages):
        check_finite(page[0], path if len(pages) == 1 else f"{path} (page {k})", "pixel values")
    shapes = {p[0].shape for p in pages}
    if len(shapes) > 1:
        raise ValueError(f"{path}: pages of different sizes {sorted(shapes)}")
    bits = {p[1] for p in pages}
    kind = "png" if path.suffix.lower() == ".png" else "tiff"
    names = [path.name] if len(pages) == 1 else [f"{path.name}:{k}" for k in range(len(pages))]
    return ImageStack(
        values=np.stack([p[0] for p in pages]),
        kind=kind,
        source=str(path),
        identifiers=names,
        units="intensity",
        bits=bits.pop() if len(bits) == 1 else None,
    )


def _to_pil(values: np.ndarray, bits: int | None):
    from PIL import Image

    values = np.asarray(values)
    if values.ndim == 3 and values.shape[0] == 1:
        values = values[0]
    if bits == 8 or bits is None and values.ndim == 3:
        arr = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(arr if arr.ndim == 2 else arr.transpose(1, 2, 0))
    if bits == 16:
        if values.ndim != 2:
            raise ValueError("16-bit images must be grayscale")
        return Image.fromarray(np.clip(np.rint(values), 0, 65535).astype(np.uint16))
    return Image.fromarray(values.astype(np.float32))  # float TIFF


def write_image(path: str | os.PathLike, values: np.ndarray, bits: int | None = 8, overwrite: bool = False) -> Path:
    """Write one image ``(C, H, W)`` or ``(H, W)`` of values on ``[0, 2^bits - 1]``
    (rounded, clipped) to PNG or TIFF (by suffix); ``bits=None`` writes a float TIFF.
    Written to a temporary file and renamed."""
    path = Path(path)
    if bits is None and path.suffix.lower() == ".png":
        raise ValueError(f"{path}: PNG cannot hold float values; use .tif")
    with atomic_file(path, overwrite) as tmp:
        _to_pil(values, bits).save(tmp, format="PNG" if path.suffix.lower() == ".png" else "TIFF")
    return path


def write_png(path: str | os.PathLike, x: np.ndarray, vmax: float = 1.0, overwrite: bool = False) -> Path:
    """Quick look: ``x`` (``(H, W)`` or ``(C, H, W)``, values on ``[0, vmax]``) as an 8-bit PNG."""
    x = np.asarray(x, dtype=np.float64) / (vmax if vmax > 0 else 1.0)
    return write_image(path, np.clip(x, 0, 1) * 255.0, bits=8, overwrite=overwrite)
