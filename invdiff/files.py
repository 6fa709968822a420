"""Write-then-rename: nothing half-written is ever left at the final path. The one
implementation every writer of invdiff uses (measurement files, DICOM / NIfTI / PNG
outputs, weights, training checkpoints, benchmark results, figures), and the one place of
the rules about output paths (:func:`check_output`).

A file is written to a hidden temporary file in the *same* folder and moved into place
with :func:`os.replace` (atomic on POSIX and Windows within one file system); a folder is
built under a hidden temporary name next to its final place and renamed when complete.
On any error the temporary is removed and the final path is untouched; a full disk
(``ENOSPC``, ``EDQUOT``) is reported as one ``OSError`` naming the final path. Every file
and folder gets the mode the process's umask gives (``0o666 & ~umask``, ``0o777 & ~umask``),
not the private mode of :mod:`tempfile`. A temporary left by a killed process (its name
records the process id and host) is removed by the next write of the same path.

**Output paths** (:func:`check_output`): an output is never, contains, or sits inside an
input (real paths, symlinks resolved); an existing output is replaced only with
``overwrite`` and only when it is invdiff's own (:func:`invdiff_folder`: a folder with its
``provenance.json`` and nothing else than the files it lists; :func:`invdiff_hdf5`: an
HDF5 file with invdiff's attributes). This module is at the bottom of the layers: it
imports nothing from invdiff.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "atomic_write", "atomic_dir", "check_new_path", "check_output", "check_not_input",
           "invdiff_folder", "invdiff_hdf5", "umask"]

#: errors of a full disk or quota
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def check_new_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``path`` as a :class:`~pathlib.Path`, refusing one that exists unless ``overwrite``.

    :raises FileExistsError: (an ``OSError``) the output exists and ``overwrite`` is False.
    :raises FileNotFoundError: the parent folder does not exist.
    """
    path = Path(path)
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"output {path} already exists; choose a new path or pass --overwrite")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {path.parent} does not exist")
    return path


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(os.fspath(path)))


def check_not_input(out: str | os.PathLike, inputs: Iterable, flag: str = "output") -> Path:
    """Refuse an output that is, contains or sits inside one of ``inputs`` (compared by real
    path, symlinks resolved; an existing output is also compared with :func:`os.path.samefile`,
    for hard links). Inputs that are ``None`` or do not exist are skipped.

    :raises ValueError: one line naming the input.
    """
    out = Path(out)
    real_out = _real(out)
    for inp in inputs:
        if inp is None or not isinstance(inp, (str, os.PathLike)) or not os.path.lexists(inp):
            continue
        real_in = _real(inp)
        same = real_out == real_in
        if not same and os.path.exists(out) and os.path.exists(inp):
            try:
                same = os.path.samefile(out, inp)
            except OSError:
                pass
        if same:
            raise ValueError(f"{flag} {out} is the input {inp}; refusing to write over an input, choose another path")
        if real_in in real_out.parents:
            raise ValueError(f"{flag} {out} is inside the input {inp}; choose a path outside it")
        if real_out in real_in.parents:
            raise ValueError(f"{flag} {out} contains the input {inp}; choose a path that does not hold an input")
    return out


def invdiff_folder(marker: str = "provenance.json") -> Callable[[Path], str | None]:
    """A recogniser of a folder invdiff wrote (for :func:`check_output`'s ``own``): it holds
    ``marker`` (a JSON record whose ``"files"`` lists what was written, relative paths) and
    nothing else than those files and their folders. Returns why not, or ``None``."""

    def own(path: Path) -> str | None:
        if path.is_symlink() or not path.is_dir():
            return "not a folder"
        try:
            record = json.loads((path / marker).read_text())
        except FileNotFoundError:
            return f"no {marker}"
        except (OSError, ValueError):
            return f"{marker} is not invdiff's record"
        listed = record.get("files") if isinstance(record, dict) else None
        if not isinstance(listed, dict):
            return f"{marker} is not invdiff's record"
        known = {marker}
        for names in listed.values():
            for name in names if isinstance(names, list) else [names]:
                parts = Path(str(name)).parts
                known.update(str(Path(*parts[: i + 1])) for i in range(len(parts)))
        for root, dirs, files in os.walk(path):
            for name in sorted(dirs) + sorted(files):
                rel = str((Path(root) / name).relative_to(path))
                if rel not in known:
                    return f"it holds {rel}, which invdiff did not write"
        return None

    return own


def invdiff_hdf5(path: Path) -> str | None:
    """A recogniser of an HDF5 file invdiff wrote (a measurement file of
    ``invdiff.io.save_measurement``: attributes ``invdiff_format`` / ``invdiff_version``).
    Returns why not, or ``None``."""
    if path.is_symlink() or not path.is_file():
        return "a folder, not a measurement file" if path.is_dir() else "not a regular file"
    try:
        with open(path, "rb") as f:
            if f.read(8) != b"\x89HDF\r\n\x1a\n":
                return "not an HDF5 file"
        import h5py

        with h5py.File(path, "r") as f:
            if "invdiff_format" not in f.attrs and "invdiff_version" not in f.attrs:
                return "an HDF5 file without invdiff's attributes"
    except (OSError, ValueError):
        return "not a readable HDF5 file"
    return None


def check_output(
    out: str | os.PathLike,
    inputs: Iterable = (),
    overwrite: bool = False,
    own: Callable[[Path], str | None] | None = None,
    flag: str = "output",
) -> Path:
    """The rules of an output path, checked before any work:

    - it is never, contains, or sits inside one of ``inputs`` (:func:`check_not_input`);
    - an existing ``out`` is an error unless ``overwrite``;
    - with ``overwrite`` it is replaced only if ``own(out)`` recognises it as invdiff's
      (returns ``None``; else the reason: :func:`invdiff_folder`, :func:`invdiff_hdf5`);
    - its parent folder exists.

    :param flag: how the messages name the output (``"--out"`` on the command line).
    :raises ValueError: the output overlaps an input.
    :raises FileExistsError: it exists (without ``overwrite``, or not invdiff's).
    :raises FileNotFoundError: the parent folder does not exist.
    """
    out = check_not_input(out, inputs, flag)
    if os.path.lexists(out):
        if not overwrite:
            raise FileExistsError(f"{flag} {out} already exists; choose a new path or pass --overwrite")
        reason = own(out) if own is not None else None
        if reason:
            raise FileExistsError(f"{flag} {out} exists and was not written by invdiff ({reason}); "
                                  f"refusing to replace it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"{flag} folder {out.parent} does not exist")
    return out


def umask() -> int:
    """The process's file-creation mask, read without changing it (``/proc/self/status`` on
    Linux; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@functools.lru_cache(maxsize=1)
def _host() -> str:
    return hashlib.sha1(socket.gethostname().encode()).hexdigest()[:6]


def _tmp_name(final: Path) -> str:
    # keep the full suffix (".nii.gz", ".h5") so writers that dispatch on it work; the
    # process id and host let a later write remove a killed process's temporary
    return f".{final.name}.tmp-{os.getpid()}@{_host()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale(final: Path) -> None:
    """Remove temporaries of ``final`` left by killed processes of this host."""
    prefix, host = f".{final.name}.tmp-", _host()
    try:
        entries = list(os.scandir(final.parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        owner = entry.name[len(prefix):].split("-", 1)[0]
        pid, _, where = owner.partition("@")
        if where != host or not pid.isdigit() or int(pid) == os.getpid() or _alive(int(pid)):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:
            pass


def _full_disk(err: BaseException, final: Path) -> BaseException:
    """A full disk as one line naming ``final``; other errors as they are."""
    if isinstance(err, OSError) and err.errno in _FULL:
        return OSError(err.errno, f"cannot write {final}: {os.strerror(err.errno).lower()} (nothing was written)")
    return err


@contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = False, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` (same suffixes); on success move it to ``path``.

    :param overwrite: replace an existing ``path`` (else :func:`check_new_path` refuses it).
    :param fsync: flush the file to disk before the rename (results that must survive a
        power cut, e.g. the benchmark's result lines).
    :raises OSError: a full disk, as one line naming ``path`` (the temporary is removed).

    >>> import tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     out = pathlib.Path(folder) / "a.txt"
    ...     with atomic_file(out) as tmp:
    ...         _ = tmp.write_text("done")
    ...     out.read_text()
    'done'
    """
    final = check_new_path(path, overwrite)
    _remove_stale(final)
    mode = 0o666 & ~umask()
    try:
        fd, name = tempfile.mkstemp(prefix=_tmp_name(final), suffix="".join(final.suffixes), dir=final.parent)
    except OSError as err:
        raise _full_disk(err, final) from None
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, mode)  # mkstemp makes it private; give it the usual mode
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)  # again: a writer may have replaced the file (safetensors does)
        os.replace(tmp, final)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        new = _full_disk(err, final)
        if new is err:
            raise
        raise new from None


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
    Callers decide what may be replaced (:func:`check_output`).
    """
    final = check_new_path(path, overwrite)
    _remove_stale(final)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_name(final), dir=final.parent))
    except OSError as err:
        raise _full_disk(err, final) from None
    try:
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes it private
        yield tmp
        if os.path.lexists(final):
            old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
            os.replace(final, old / final.name)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        new = _full_disk(err, final)
        if new is err:
            raise
        raise new from None
