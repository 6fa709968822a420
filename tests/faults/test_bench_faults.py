"""Faults of ``invdiff bench``: two runs on one folder, a lock left by a killed run, an output
folder that is an input, the mode of every output, interrupted and killed runs.

The grid is tiny (the analytic 16x16 Gaussian prior, CT 30 views, DDS with 3 steps, 2 images).
"""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from invdiff.bench import store
from invdiff.cli import main

GRID = ["bench", "--tasks", "ct-sparse-30", "--samplers", "dds", "--prior", "gaussian-16", "--images", "2",
        "--steps", "3", "--no-lpips", "-q"]
OUTPUTS = ["grid.png", "recon", "results.jsonl", "summary.csv", "summary.md"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error: ") and "\n" not in err, err
    return err


def complete(out: Path, cells: int) -> None:
    """``out`` is a finished benchmark folder of ``cells`` distinct cells, every line a row."""
    assert sorted(p.name for p in out.iterdir()) == OUTPUTS
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert len(rows) == len({r["cell_id"] for r in rows}) == cells and all(r["status"] == "ok" for r in rows)


def test_a_second_run_on_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    with store.lock(out):  # another run (flock conflicts between open files, even in one process)
        assert main([*GRID, "--out", str(out)]) == 1
        assert one_line(capsys) == (f"invdiff: error: another invdiff bench is running on {out} (pid {os.getpid()}); "
                                    f"wait for it to finish or use another --out")
        assert listing(out) == [store.PID_FILE]  # the holder's; nothing of the refused run
    assert listing(out) == []  # released: the holder removes its pid file


def test_a_lock_left_by_a_killed_run_does_not_block(tmp_path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         f"open(os.path.join(sys.argv[1], {store.PID_FILE!r}), 'w').write(str(os.getpid()))\n"
         "print('locked', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([*GRID, "--out", str(out)]) == 1
        assert f"another invdiff bench is running on {out} (pid {holder.pid})" in one_line(capsys)
        assert listing(out) == [store.PID_FILE]
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()  # else its pipe is closed by the garbage collector, with a ResourceWarning in a later test
    assert (out / store.PID_FILE).read_text() == str(holder.pid)  # stale: the kernel released the lock itself
    assert main([*GRID, "--out", str(out)]) == 0
    capsys.readouterr()
    complete(out, 2)  # the stale pid file is gone too


def test_the_output_folder_is_never_an_input(tmp_path, capsys):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    for k in range(2):
        Image.fromarray(np.full((16, 16), 60 + 40 * k, dtype=np.uint8)).save(images / f"{k}.png")
    before, names = digest(images), listing(tmp_path)
    for out, words in ((images, "is the input"), (images / "bench", "is inside the input"),
                       (tmp_path, "contains the input")):
        assert main([*GRID, "--images-from", str(images), "--out", str(out)]) == 1
        assert f"out {out} {words} {images}" in one_line(capsys)
    config = tmp_path / "grid.toml"
    config.write_text('tasks = "ct-sparse-30"\n')
    assert main([*GRID, "--config", str(config), "--out", str(config)]) == 1
    assert f"out {config} is the input {config}" in one_line(capsys)
    assert digest(images) == before and listing(tmp_path) == sorted([*names, "grid.toml"])


def test_every_output_gets_the_users_umask(tmp_path, capsys):
    out = tmp_path / "b"
    old = os.umask(0o027)
    try:
        assert main([*GRID, "--out", str(out)]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    complete(out, 2)
    paths = [out, *out.rglob("*")]
    assert {p.name for p in paths} >= {"summary.md", "summary.csv", "grid.png", "results.jsonl", "recon"}
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p


# --------------------------------------------------------------------- processes and signals

SLOW_GRID = ["bench", "--tasks", "ct-sparse-30", "--samplers", "baseline,dds:steps=400", "--prior", "gaussian-16",
             "--images", "2", "--no-lpips", "-q"]  # cells: baseline (instant), dds (seconds), baseline, dds


def _start(out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "invdiff", *SLOW_GRID, "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=ENV)


def _wait_for_rows(proc: subprocess.Popen, out: Path, rows: int, timeout: float = 120) -> None:
    start = time.monotonic()
    while store.count_lines(out / "results.jsonl") < rows:
        if proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode}: {proc.stderr.read()}")
        assert time.monotonic() - start < timeout, "the run did not start"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_on_one_folder(tmp_path, capsys):
    out = tmp_path / "b"
    first = _start(out)
    try:
        _wait_for_rows(first, out, 1)  # running, in its first dds cell
        assert main([*SLOW_GRID, "--out", str(out)]) == 1
        assert one_line(capsys) == (f"invdiff: error: another invdiff bench is running on {out} (pid {first.pid}); "
                                    f"wait for it to finish or use another --out")
        _, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
    finally:
        first.kill()
    complete(out, 4)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_mid_bench_then_the_rerun_completes(tmp_path, capsys, sig):
    out = tmp_path / "b"
    proc = _start(out)
    _wait_for_rows(proc, out, 1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines() == ["invdiff: interrupted"], err
        assert store.PID_FILE not in os.listdir(out)  # released in order
    else:
        assert proc.returncode == -signal.SIGKILL
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]  # whole rows only
    assert 1 <= len(rows) < 4 and not (out / "summary.md").exists()
    before = {r["cell_id"] for r in rows}
    assert main([*SLOW_GRID, "--out", str(out)]) == 0  # resumes: the finished cells are not run again
    assert "already done" in capsys.readouterr().out
    complete(out, 4)
    after = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert before <= {r["cell_id"] for r in after}
    assert not [p for p in listing(out) if ".tmp-" in p]
