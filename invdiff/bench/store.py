"""Results files: JSON lines appended (flushed and fsynced) the moment a cell finishes.

Layout of a benchmark folder::

    results.jsonl            one JSON object per finished cell (merged)
    results.rank<R>.jsonl    per-rank files of a distributed run, merged into results.jsonl
                             by rank 0 at the end (and by any later run of the same folder)
    recon/<cell_id>.safetensors   reconstructions kept for the figure
    summary.md, summary.csv, grid.png

A line is written with one ``os.write`` on a file opened with ``O_APPEND`` and then
``os.fsync``-ed, so a killed run leaves at most one partial last line; readers skip it
(and an appender first terminates it), so it is as if the cell never finished; the next
merge drops it.

**Deduplication.** Each line has a ``cell_id``. When a cell has several lines (a failed
cell re-run with ``--rerun-failed``, or a rank file and the merged file after a crash
between merging and removing the rank files), the last successful one wins, else the last
failed one. :func:`merge` rewrites ``results.jsonl`` atomically (temporary file in the same
folder, then ``os.replace``) with one line per cell, in first-seen order.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Sequence

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
]

RESULTS = "results.jsonl"


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
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
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
