"""Write-then-rename helpers: nothing half-written is ever left at the final path.

A file is written to a hidden temporary file in the *same* folder and moved into place
with :func:`os.replace` (atomic on POSIX and Windows within one file system); a folder is
built under a hidden temporary name next to its final place and renamed when complete.
On any error the temporary is removed and the final path is untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "atomic_dir", "check_new_path"]


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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_name(final: Path) -> str:
    # keep the full suffix (".nii.gz", ".h5") so writers that dispatch on it work
    return f".{final.name}.tmp-"


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success move it to ``path``.

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
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the usual mode
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder next to ``path``; on success rename it to ``path``.

    With ``overwrite`` an existing ``path`` is replaced only after the new folder is
    complete (moved aside, the new one renamed into place, then the old one deleted).
    """
    final = check_new_path(path, overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(final), dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())
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
