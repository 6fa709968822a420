"""Faults at the outputs of ``invdiff simulate`` / ``invdiff reconstruct``: an output that is,
contains or sits inside an input; ``--overwrite`` of something invdiff did not write; a full
disk; interrupted and killed runs; the mode of what is written.

Every test checks the exit code, the one stderr line, what is left on disk and that the inputs
are byte-identical afterwards. The data are pydicom's test files (one 128x128 CT slice, a
5-slice 16x16 CT series) and the shipped 64x64 prior ``ct-phantom-64`` with 3 DDS steps.
"""

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from pydicom.data import get_testdata_file

from invdiff import files
from invdiff.cli import main

DATA = Path(get_testdata_file("CT_small.dcm")).parent
PRIOR = "ct-phantom-64"
FAST = ["--prior", PRIOR, "--sampler", "dds", "--steps", "3", "-q"]
SIM = ["simulate", "--task", "ct-sparse-30"]


def digest(path: Path) -> dict:
    """SHA-256 of every file at or under ``path`` (relative names), for byte-identity checks."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def listing(folder: Path) -> list[str]:
    """Everything under ``folder``, hidden temporaries included."""
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error: ") and "\n" not in err, err
    return err


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A folder with ``scan.dcm`` (128x128), ``study/`` (5 slices) and ``m.h5`` (a 64x64
    measurement of scan.dcm); the current directory."""
    shutil.copy(DATA / "CT_small.dcm", tmp_path / "scan.dcm")
    shutil.copytree(DATA / "dicomdirtests" / "98892001" / "CT5N", tmp_path / "study")
    monkeypatch.chdir(tmp_path)
    assert main([*SIM, "--input", "scan.dcm", "--size", "64", "--out", "m.h5"]) == 0
    return tmp_path


# ------------------------------------------------------------------ outputs are never inputs


@pytest.mark.parametrize("argv, inputs, words", [
    (["reconstruct", "--input", "scan.dcm", "--task", "ct-sparse-30", "--resize", "--out", "scan.dcm", "--overwrite"],
     ["scan.dcm"], "--out scan.dcm is the input scan.dcm"),
    (["reconstruct", "--input", "study", "--task", "ct-sparse-30", "--resize", "--out", "study", "--overwrite"],
     ["study"], "--out study is the input study"),
    (["reconstruct", "--input", "study", "--task", "ct-sparse-30", "--resize", "--out", "study/rec"],
     ["study"], "--out study/rec is inside the input study"),
    (["reconstruct", "--input", "study/2062", "--task", "ct-sparse-30", "--resize", "--out", "study", "--overwrite"],
     ["study"], "--out study contains the input study/2062"),
    (["reconstruct", "--measurement", "m.h5", "--out", "m.h5", "--overwrite"], ["m.h5"], "--out m.h5 is the input m.h5"),
    (["reconstruct", "--measurement", "m.h5", "--out", "link.h5", "--overwrite"], ["m.h5"],
     "--out link.h5 is the input m.h5"),
], ids=["recon-dicom-file", "recon-series", "recon-inside-series", "recon-around-input", "recon-measurement",
        "recon-symlink"])
def test_reconstruct_never_writes_over_an_input(work, capsys, argv, inputs, words):
    (work / "link.h5").symlink_to("m.h5")
    before = {name: digest(work / name) for name in inputs}
    names = listing(work)
    assert main([*argv, *FAST[:2]]) == 1  # refused before the prior is loaded
    assert words in one_line(capsys)
    assert {name: digest(work / name) for name in inputs} == before
    assert listing(work) == names


@pytest.mark.parametrize("out", ["scan.dcm", "link.dcm", "study"])
def test_simulate_never_writes_over_its_input(work, capsys, out):
    (work / "link.dcm").symlink_to("scan.dcm")
    source = "study" if out == "study" else "scan.dcm"
    before, names = digest(work / source), listing(work)
    assert main([*SIM, "--input", source, "--out", out, "--overwrite"]) == 1
    assert f"--out {out} is the input {source}" in one_line(capsys)
    assert digest(work / source) == before and listing(work) == names
    assert (work / "link.dcm").is_symlink()


def test_python_api_has_the_same_rules(work):
    from invdiff.apps.workflows import Reconstruction, load_measurement, simulate_to_file, write_reconstruction

    before = digest(work / "scan.dcm"), digest(work / "m.h5")
    with pytest.raises(ValueError, match="is the input"):
        simulate_to_file(work / "scan.dcm", "ct-sparse-30", work / "scan.dcm", overwrite=True)
    m = load_measurement(work / "m.h5")
    import torch

    rec = Reconstruction(mean=torch.full((1, 1, 64, 64), 0.5), std=None, baseline=None, runs=[],
                         info={"samples": 1, "sampler": "dds", "sampler_options": {}, "prior": PRIOR, "seed": 0})
    for out in (work / "m.h5", work):  # the measurement itself; a folder holding it (and its source scan)
        with pytest.raises(ValueError, match="is the input|contains the input"):
            write_reconstruction(out, rec, m, overwrite=True)
    assert (digest(work / "scan.dcm"), digest(work / "m.h5")) == before
    write_reconstruction(work / "rec", rec, m)  # elsewhere: fine
    with pytest.raises(FileExistsError, match="already exists"):
        write_reconstruction(work / "rec", rec, m)
    write_reconstruction(work / "rec", rec, m, overwrite=True)  # its own output: replaced
    assert (work / "rec" / "provenance.json").is_file()


# ------------------------------------------------------------ --overwrite replaces only invdiff's


def test_overwrite_refuses_a_folder_invdiff_did_not_write(work, capsys):
    (work / "notes").mkdir()
    (work / "notes" / "notes.txt").write_text("mine")
    before = digest(work / "notes"), digest(work / "m.h5")
    assert main(["reconstruct", "--measurement", "m.h5", "--out", "notes", "--overwrite", *FAST]) == 1
    assert one_line(capsys) == ("invdiff: error: --out notes exists and was not written by invdiff "
                                "(no provenance.json); refusing to replace it")
    assert (digest(work / "notes"), digest(work / "m.h5")) == before


def test_overwrite_replaces_its_own_folder_but_not_added_files(work, capsys):
    args = ["reconstruct", "--measurement", "m.h5", "--out", "rec", *FAST]
    assert main(args) == 0
    first = digest(work / "rec")
    assert "provenance.json" in first and any(k.startswith("mean/") for k in first)
    capsys.readouterr()
    assert main(args) == 1 and "already exists" in one_line(capsys)
    measurement = digest(work / "m.h5")
    assert main(args + ["--overwrite", "--seed", "1"]) == 0  # invdiff's own folder: replaced
    capsys.readouterr()
    assert sorted(digest(work / "rec")) == sorted(first) and digest(work / "rec") != first
    (work / "rec" / "mean" / "my-notes.txt").write_text("a note the user added")
    kept = digest(work / "rec")
    assert main(args + ["--overwrite"]) == 1
    assert one_line(capsys) == ("invdiff: error: --out rec exists and was not written by invdiff (it holds "
                                "mean/my-notes.txt, which invdiff did not write); refusing to replace it")
    assert digest(work / "rec") == kept and digest(work / "m.h5") == measurement
    assert not [p for p in listing(work) if ".tmp-" in p or ".old-" in p]


def test_simulate_overwrite_replaces_only_an_invdiff_measurement(work, capsys):
    with h5py.File(work / "other.h5", "w") as f:  # e.g. a fastMRI file
        f.create_dataset("kspace", data=np.zeros((1, 4, 4), np.complex64))
    before, scan = digest(work / "other.h5"), digest(work / "scan.dcm")
    assert main([*SIM, "--input", "scan.dcm", "--out", "other.h5", "--overwrite"]) == 1
    assert one_line(capsys) == ("invdiff: error: --out other.h5 exists and was not written by invdiff "
                                "(an HDF5 file without invdiff's attributes); refusing to replace it")
    assert digest(work / "other.h5") == before
    (work / "notes.txt").write_text("not HDF5")
    assert main([*SIM, "--input", "scan.dcm", "--out", "notes.txt", "--overwrite"]) == 1
    assert "(not an HDF5 file)" in one_line(capsys) and (work / "notes.txt").read_text() == "not HDF5"
    assert main([*SIM, "--input", "scan.dcm", "--out", "m.h5", "--overwrite", "--seed", "3"]) == 0  # its own
    capsys.readouterr()
    with h5py.File(work / "m.h5") as f:
        assert int(f.attrs["noise_seed"]) == 3
    assert digest(work / "scan.dcm") == scan


# ------------------------------------------------------------------------------- full disk


def test_disk_full_while_simulating_is_one_line(work, capsys, monkeypatch):
    """ENOSPC in the middle of writing the measurement (simulated: half the bytes, then the error)."""
    real = Path.write_bytes

    def full(self, data):
        real(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    scan, names = digest(work / "scan.dcm"), listing(work)
    assert main([*SIM, "--input", "scan.dcm", "--out", "new.h5"]) == 1
    assert one_line(capsys) == ("invdiff: error: [Errno 28] cannot write new.h5: no space left on device "
                                "(nothing was written)")
    assert listing(work) == names and digest(work / "scan.dcm") == scan  # no output, no temporary


def test_disk_full_while_writing_a_reconstruction_leaves_nothing(work, capsys, monkeypatch):
    from invdiff.apps import workflows as wf

    real = wf.write_dicom_series

    def full(folder, *args, **kwargs):
        real(folder, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(wf, "write_dicom_series", full)
    names = listing(work)
    assert main(["reconstruct", "--measurement", "m.h5", "--out", "rec", *FAST]) == 1
    assert one_line(capsys) == "invdiff: error: [Errno 28] cannot write rec: no space left on device (nothing was written)"
    assert listing(work) == names


def _tmpfs(tmp_path: Path) -> Path:
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("a small tmpfs needs root (mount -t tmpfs)")
    where = tmp_path / "small"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(where)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    return where


@pytest.mark.slow
def test_disk_full_on_a_real_small_file_system(work):
    """A 64 KiB tmpfs: h5py used to print 24 lines of tracebacks and then segfault (exit 139)."""
    small = _tmpfs(work)
    try:
        scan = digest(work / "scan.dcm")
        done = subprocess.run([sys.executable, "-m", "invdiff", *SIM[:2], "ct-sparse-180", "--input", "scan.dcm",
                               "--out", str(small / "m.h5")], capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0] == (f"invdiff: error: [Errno 28] cannot write {small / 'm.h5'}: no space "
                                                f"left on device (nothing was written)")
        assert os.listdir(small) == [] and digest(work / "scan.dcm") == scan
    finally:
        subprocess.run(["umount", str(small)], check=False)


# ----------------------------------------------------------------------- modes and temporaries


def test_outputs_get_the_users_umask(work, capsys):
    old = os.umask(0o027)
    try:
        assert files.umask() == 0o027
        assert main([*SIM, "--input", "scan.dcm", "--size", "64", "--out", "u.h5"]) == 0
        assert main(["reconstruct", "--measurement", "u.h5", "--out", "rec", "--png", *FAST]) == 0
    finally:
        os.umask(old)
    capsys.readouterr()
    assert (work / "u.h5").stat().st_mode & 0o777 == 0o640
    paths = [work / "rec", *(work / "rec").rglob("*")]
    assert len(paths) > 4
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o750 if p.is_dir() else 0o640), p


def test_a_killed_writers_temporary_is_removed_by_the_next_write(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = files._host()
    stale_dir = tmp_path / f".rec.tmp-{dead.pid}@{host}-abc123"
    stale_dir.mkdir()
    (stale_dir / "half.dcm").write_bytes(b"half")
    stale_file = tmp_path / f".m.h5.tmp-{dead.pid}@{host}-xyz.h5"
    stale_file.write_bytes(b"half")
    alive = tmp_path / f".m.h5.tmp-{os.getpid()}@{host}-live.h5"  # a running writer's: kept
    alive.write_bytes(b"in progress")
    other_host = tmp_path / f".m.h5.tmp-{dead.pid}@ffffff-xyz.h5"  # another machine's: kept
    other_host.write_bytes(b"?")
    with files.atomic_dir(tmp_path / "rec") as tmp:
        (tmp / "a").write_text("a")
    files.atomic_write(tmp_path / "m.h5", b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["rec", "m.h5", alive.name, other_host.name])


# ------------------------------------------------------------------- interrupted and killed runs


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "invdiff", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def _wait_for_line(proc: subprocess.Popen, prefix: str, timeout: float = 90) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {prefix!r}: {proc.stderr.read()}")
    raise AssertionError(f"no {prefix!r} within {timeout} s")


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_signal_mid_reconstruct_leaves_nothing_and_a_rerun_succeeds(work, capsys, sig):
    inputs = digest(work / "m.h5")
    proc = _start(["reconstruct", "--measurement", "m.h5", "--out", "rec", *FAST[:-3], "--steps", "2000", "-q"], work)
    _wait_for_line(proc, "invdiff reconstruct:")  # printed just before the sampler starts
    time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and err.strip().splitlines() == ["invdiff: interrupted"], err
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (work / "rec").exists()
    assert not [p for p in listing(work) if p.startswith(".rec")]
    assert digest(work / "m.h5") == inputs
    assert main(["reconstruct", "--measurement", "m.h5", "--out", "rec", *FAST]) == 0  # the re-run
    assert not capsys.readouterr().err
    import json

    record = json.loads((work / "rec" / "provenance.json").read_text())
    assert all((work / "rec" / name).is_file() for names in record["files"].values() for name in names)
    assert not [p for p in listing(work) if p.startswith(".rec")]
