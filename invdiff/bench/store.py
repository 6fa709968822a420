"""Results files: JSON lines appended (flushed and fsynced) the moment a cell finishes.

Layout of a benchmark folder::

    results.jsonl            one JSON object per finished cell (merged)
    results.rank<R>.jsonl    per-rank files of a distributed run, merged into results.jsonl
                             by rank 0 at the end (and by any later run of the same folder)
    recon/<cell_id>.safetensors   reconstructions kept for the figure
    summary.md, summary.csv, grid.png
    .invdiff-bench.pid       the process id of the run holding the folder's lock (while it runs)

A line is written with one ``os.write`` on a file opened with ``O_APPEND`` and then
``os.fsync``-ed, so a killed run leaves at most one partial last line; readers skip it
(and an appender first terminates it), so it is as if the cell never finished; the next
merge drops it.

**Deduplication.** Each line has a ``cell_id``. When a cell has several lines (a failed
cell re-run with ``--rerun-failed``, or a rank file and the merged file after a crash
between merging and removing the rank files), the last successful one wins, else the last
failed one. :func:`merge` rewrites ``results.jsonl`` atomically (temporary file in the same
folder, then ``os.replace``) with one line per cell, in first-seen order.

**One run per folder.** A run holds an exclusive :func:`fcntl.flock` on the folder itself
(:func:`lock`) from reading the finished cells to writing the summary; a second run on the
same folder is refused at once with one line naming the first one's process id. The lock
belongs to the open file, so the kernel releases it when its process dies (a killed run
never blocks the next one). Without ``fcntl`` (Windows) runs are not locked.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Sequence

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

from ..files import atomic_write

__all__ = [
    "RESULTS",
    "append_row",
    "read_rows",
    "dedupe",
    "load_results",
    "rank_files",
    "rank_file",
    "merge",
    "count_lines",
    "lock",
    "BenchLocked",
]

RESULTS = "results.jsonl"
PID_FILE = ".invdiff-bench.pid"


class BenchLocked(RuntimeError):
    """Another run holds the benchmark folder."""


@contextmanager
def lock(out: str | os.PathLike) -> Iterator[None]:
    """Hold the exclusive lock of the benchmark folder ``out`` (which must exist).

    :raises BenchLocked: (a ``RuntimeError``) another process holds it: one line,
        ``another invdiff bench is running on OUT (pid N)``.
    """
    out = Path(out)
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = os.open(out, os.O_RDONLY)  # the folder itself: no lock file to leave behind
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise
            try:
                pid = (out / PID_FILE).read_text().strip() or "unknown"
            except OSError:
                pid = "unknown"
            raise BenchLocked(f"another invdiff bench is running on {out} (pid {pid}); wait for it to finish "
                              f"or use another --out") from None
        pid_file = out / PID_FILE
        try:
            atomic_write(pid_file, f"{os.getpid()}\n", fsync=False)
            yield
        finally:
            pid_file.unlink(missing_ok=True)  # still locked: no other run has written it
    finally:
        os.close(fd)  # releases the lock


def rank_file(out: Path, rank: int) -> Path:
    """The results file of ``rank`` in a distributed run."""
    return Path(out) / f"results.rank{rank}.jsonl"


def rank_files(out: Path) -> list[Path]:
    """Per-rank results files present in ``out``, sorted by rank."""
    files = [p for p in Path(out).glob("results.rank*.jsonl") if p.stem[len("results.rank"):].isdigit()]
    return sorted(files, key=lambda p: int(p.stem[len("results.rank"):]))


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` as one JSON line to ``path``; flushed and fsynced before returning."""
    data = (json.dumps(row, sort_keys=True, allow_nan=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)  # the umask decides
    try:
        size = os.fstat(fd).st_size
        if size:
            with open(path, "rb") as f:  # terminate a partial line left by a killed writer
                f.seek(size - 1)
                if f.read(1) != b"\n":
                    data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> tuple[list[dict], int]:
    """Rows of one JSON-lines file and the number of lines that are not a row."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    rows, bad = [], 0
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    for line in lines:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and "cell_id" in row:
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def read_rows(path: Path) -> list[dict]:
    """Rows of one JSON-lines file; lines that are not rows (the partial line of a killed
    writer) are skipped."""
    return _read(path)[0]


def dedupe(rows: Iterable[dict]) -> list[dict]:
    """One row per ``cell_id``: the last ``ok`` row, else the last row; first-seen order."""
    best: dict[str, dict] = {}
    for row in rows:
        cid = row["cell_id"]
        old = best.get(cid)
        if old is None or row.get("status") == "ok" or old.get("status") != "ok":
            best[cid] = row
    return list(best.values())


def load_results(path: str | os.PathLike) -> list[dict]:
    """Deduplicated rows of a results file, or of a benchmark folder (merged and rank files)."""
    path = Path(path)
    if path.is_dir():
        files = [path / RESULTS, *rank_files(path)]
    elif path.is_file():
        files = [path, *(rank_files(path.parent) if path.name == RESULTS else [])]
    else:
        raise FileNotFoundError(f"no results file or benchmark folder at {path.resolve()}")
    rows = [row for f in files for row in read_rows(f)]
    return dedupe(rows)


def merge(out: Path, order: Sequence[str] | None = None) -> list[dict]:
    """Merge ``results.jsonl`` and every rank file of ``out`` into ``results.jsonl`` (one line
    per cell, atomic), remove the rank files, and return the rows.

    :param order: cell ids in grid order; merged rows are sorted by it (others last, in
        first-seen order), so a distributed run's file reads like a 1-process run's.
    """
    out = Path(out)
    main = out / RESULTS
    parts = rank_files(out)
    main_rows, bad = _read(main)
    rows = dedupe(main_rows + [row for p in parts for row in read_rows(p)])
    if order is not None:
        rank = {cid: i for i, cid in enumerate(order)}
        rows = sorted(rows, key=lambda r: rank.get(r["cell_id"], len(rank)))
    changed = [r["cell_id"] for r in rows] != [r["cell_id"] for r in main_rows]
    if parts or changed or bad:
        text = "".join(json.dumps(r, sort_keys=True, allow_nan=True) + "\n" for r in rows)
        atomic_write(main, text)
        for p in parts:
            p.unlink()
    return rows


def count_lines(path: Path) -> int:
    """Number of complete lines in ``path`` (0 if it does not exist); cheap, for progress."""
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0
