"""Write-then-rename: nothing half-written is ever left at the final path. The one
implementation every writer of invdiff uses (measurement files, DICOM / NIfTI / PNG
outputs, weights, training checkpoints, benchmark results, figures).

A file is written to a hidden temporary file in the *same* folder and moved into place
with :func:`os.replace` (atomic on POSIX and Windows within one file system); a folder is
built under a hidden temporary name next to its final place and renamed when complete.
On any error the temporary is removed and the final path is untouched. This module is at
the bottom of the layers: it imports nothing from invdiff.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "atomic_write", "atomic_dir", "check_new_path", "umask"]


def check_new_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``path`` as a :class:`~pathlib.Path`, refusing one that exists unless ``overwrite``.

    :raises FileExistsError: (an ``OSError``) the output exists and ``overwrite`` is False.
    :raises FileNotFoundError: the parent folder does not exist.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"output {path} already exists; choose a new path or pass --overwrite")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    return path


def umask() -> int:
    """The process's file-creation mask (read without changing it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_name(final: Path) -> str:
    # keep the full suffix (".nii.gz", ".h5") so writers that dispatch on it work
    return f".{final.name}.tmp-"


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); on success move it to ``path``.

    :param overwrite: replace an existing ``path`` (else :func:`check_new_path` refuses it).
    :param fsync: flush the file to disk before the rename (results that must survive a
        power cut, e.g. the benchmark's result lines).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     out = pathlib.Path(folder) / "a.txt"
    ...     with atomic_file(out) as tmp:
    ...         _ = tmp.write_text("done")
    ...     out.read_text()
    'done'
    """
    final = check_new_path(path, overwrite)
    fd, name = tempfile.mkstemp(prefix=_tmp_name(final), suffix="".join(final.suffixes), dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it private; give it the usual mode
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # again: a writer may have replaced the file (safetensors does)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike, data: bytes | str, overwrite: bool = True, fsync: bool = True) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through :func:`atomic_file`; returns ``path``."""
    with atomic_file(path, overwrite=overwrite, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return Path(path)


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success rename it to ``path``.

    With ``overwrite`` an existing ``path`` is replaced only after the new folder is
    complete (moved aside, the new one renamed into place, then the old one deleted).
    """
    final = check_new_path(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~umask())
    try:
        yield tmp
        if final.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
