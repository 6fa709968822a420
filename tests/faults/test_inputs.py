"""Faulty inputs: every bad source, parameter, prior or measurement file is refused with one line
(``invdiff: error: ...``, exit 1) before any work, nothing is written at the output path, and the
inputs are byte-identical afterwards. Then a property-based layer (hypothesis) over the readers:
random bytes, random DICOM headers and random ``.h5`` contents give a one-line error or a
result, never a traceback, never a change to the input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pydicom
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from invdiff import operators, priors
from invdiff.cli import main
from invdiff.io import load_measurement, read, save_measurement

nib = pytest.importorskip("nibabel")

PRIOR = "ct-phantom-64"  # a shipped 64x64 CT prior
ONE_LINE_ERRORS = (ValueError, OSError, RuntimeError, ImportError)  # what invdiff.cli.main prints in one line
HYPOTHESIS = settings(max_examples=int(os.environ.get("INVDIFF_FAULT_EXAMPLES", 30)), deadline=None, database=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ----------------------------------------------------------------------------- helpers


def digest(path: Path) -> str:
    """Hash of a file, or of every file under a folder (names and bytes)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(str(p.relative_to(path) if path.is_dir() else p.name).encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def run_cli(capsys, argv: list[str]) -> tuple[int, str, list]:
    """``invdiff.cli.main(argv)``: exit code, stderr, warnings raised."""
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err, [w for w in caught if not issubclass(w.category, DeprecationWarning)]


def assert_refused(capsys, argv, inputs, out, *needles):
    """Exit 1, one stderr line ``invdiff: error: ...`` containing ``needles``, no warning, nothing
    at ``out`` and every input unchanged."""
    before = {p: digest(p) for p in inputs}
    rc, err, caught = run_cli(capsys, argv)
    assert rc == 1, err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("invdiff: error: "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not caught, [str(w.message) for w in caught]
    assert not Path(out).exists()
    assert not list(Path(out).parent.glob(f".{Path(out).name}*")), "a temporary output was left behind"
    assert {p: digest(p) for p in inputs} == before
    return err


def assert_one_line_or_success(fn, *inputs):
    """``fn()`` returns, or raises an exception the CLI prints in one line; inputs unchanged."""
    before = [digest(p) for p in inputs]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except ONE_LINE_ERRORS as err:
        assert "\n" not in str(err) and str(err).strip(), repr(err)
    assert [digest(p) for p in inputs] == before


def nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(np.asarray(data, np.float32), np.eye(4)), str(path))
    return path


def ct_volume(shape=(64, 64, 2), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1000, 1000, shape).astype(np.float32)


def enhanced_ct(path: Path, frames: int = 3, size: int = 64, seed: int = 0, descending: bool = True) -> np.ndarray:
    """An Enhanced CT multi-frame file (functional groups: shared orientation, pixel measures and
    rescale; per-frame positions, stored from the top down); returns the frames' HU in file order."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"  # Enhanced CT Image Storage
    meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta, ds.preamble = meta, b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.SeriesNumber, ds.InstanceNumber = "CT", "Test^Enhanced", "E1", 3, 1
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.NumberOfFrames = frames
    shared, measures, orientation, rescale = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 2.0
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 1, -1024, "HU"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [orientation]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per = []
    for f in range(frames):
        group, position = Dataset(), Dataset()
        position.ImagePositionPatient = [-16.0, -16.0, 2.0 * ((frames - 1 - f) if descending else f)]
        group.PlanePositionSequence = [position]
        per.append(group)
    ds.PerFrameFunctionalGroupsSequence = per
    stored = rng.integers(0, 2048, (frames, size, size)).astype("<i2")
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return stored.astype(np.float64) - 1024


def ct_dicom(path: Path, **changes) -> Path:
    """``CT_small.dcm`` (pydicom's test data, shipped with it) with some attributes changed."""
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    with warnings.catch_warnings():  # pydicom warns on writing an invalid value, which is the point
        warnings.simplefilter("ignore")
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.save_as(path)
    return path


@pytest.fixture(scope="module")
def measurement(tmp_path_factory) -> Path:
    """A valid measurement file (ct-sparse-30 of a 64x64 NIfTI volume of 2 slices)."""
    folder = tmp_path_factory.mktemp("measurement")
    src = nifti(folder / "src.nii.gz", ct_volume())
    out = folder / "m.h5"
    assert main(["simulate", "--input", str(src), "--task", "ct-sparse-30", "--out", str(out)]) == 0
    return out


# ------------------------------------------------------- 1, 2: non-finite sources and parameters


@pytest.mark.parametrize("case", ["one-nan-nifti", "all-nan-nifti", "inf-nifti", "nan-float-tiff"])
def test_non_finite_source_is_refused_before_any_work(tmp_path, capsys, case):
    if case.endswith("tiff"):
        from PIL import Image

        values = np.random.default_rng(0).uniform(0, 1, (64, 64)).astype(np.float32)
        values[3, 3] = np.nan
        src = tmp_path / "img.tif"
        Image.fromarray(values).save(src)
        needle = "1 of 4096 pixel values is NaN/Inf"
    else:
        data = ct_volume((128, 128, 1))
        if case == "one-nan-nifti":
            data[5, 5, 0] = np.nan
            needle = "1 of 16384 voxels is NaN/Inf; invdiff needs finite images"
        elif case == "inf-nifti":
            data[:2, 0, 0] = np.inf
            needle = "2 of 16384 voxels are NaN/Inf"
        else:
            data[:] = np.nan  # numpy's nanmin / percentile would warn "All-NaN slice"
            needle = "16384 of 16384 voxels are NaN/Inf"
        src = nifti(tmp_path / "vol.nii.gz", data)
    out = tmp_path / "m.h5"
    assert_refused(capsys, ["simulate", "--input", src, "--task", "ct-sparse-30", "--out", out], [src], out,
                   str(src), needle)
    rec = tmp_path / "rec"
    assert_refused(capsys, ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", PRIOR, "--resize",
                            "--out", rec], [src], rec, str(src), "NaN/Inf")


def test_all_nan_nifti_in_a_real_process_prints_one_line(tmp_path):
    data = np.full((16, 16, 2), np.nan, np.float32)
    src = nifti(tmp_path / "nan.nii.gz", data)
    out = tmp_path / "m.h5"
    before = digest(src)
    proc = subprocess.run([sys.executable, "-m", "invdiff", "simulate", "--input", str(src), "--task", "ct-sparse-30",
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"})
    assert proc.returncode == 1
    assert proc.stderr == f"invdiff: error: {src}: 512 of 512 voxels are NaN/Inf; invdiff needs finite images\n"
    assert "RuntimeWarning" not in proc.stderr and not out.exists() and digest(src) == before


@pytest.mark.parametrize("flags, needle", [
    (["--noise-sigma", "inf"], "noise_sigma must be a finite number, got inf"),
    (["--noise-sigma", "nan"], "noise_sigma must be a finite number"),
    (["--noise-sigma", "-0.1"], "noise_sigma must be >= 0"),
    (["--param", "n_detectors=nan"], "n_detectors must be a finite number"),
])
def test_non_finite_or_negative_parameters_are_refused(tmp_path, capsys, flags, needle):
    src = nifti(tmp_path / "ok.nii.gz", ct_volume())
    out = tmp_path / "m.h5"
    assert_refused(capsys, ["simulate", "--input", src, "--task", "ct-sparse-30", *flags, "--out", out], [src], out,
                   needle)


def test_operators_make_refuses_non_finite_parameters():
    inf, nan = float("inf"), float("nan")
    for kwargs, needle in [({"noise_sigma": inf}, "noise_sigma must be a finite"),
                           ({"noise_sigma": nan}, "noise_sigma must be a finite"),
                           ({"noise_sigma": -1e-3}, "noise_sigma must be >= 0"),
                           ({"noise": "poisson", "poisson_gain": inf}, "poisson_gain must be a finite"),
                           ({"noise_sigma": "abc"}, "noise_sigma must be a number")]:
        with pytest.raises(ValueError, match=needle):
            operators.make("ct-sparse-30", (1, 32, 32), **kwargs)
    with pytest.raises(ValueError, match="kernel_std must be a finite number"):
        operators.make("deblur-gauss", (1, 32, 32), kernel_std=inf)
    with pytest.raises(ValueError, match="center_fraction must be a finite number"):
        operators.make("mri-4x", (1, 32, 32), center_fraction=nan)
    physics = operators.make("ct-sparse-30", (1, 32, 32), noise_sigma=0.0)  # zero noise is fine
    assert physics.task["noise_sigma"] == 0.0


# ------------------------------------------------------------------ 3, 4: priors, one line, no pickle


class Payload:
    """Unpickling this would create a marker file: proof of code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.parametrize("suffix, how", [(".ckpt", "torch"), (".pt", "torch"), (".ckpt", "pickle")])
def test_malicious_pickle_is_never_executed(tmp_path, capsys, suffix, how):
    marker = tmp_path / "executed"
    path = tmp_path / f"model{suffix}"
    payload = {"state_dict": {"w": torch.zeros(2)}, "payload": Payload(marker)}
    if how == "torch":
        torch.save(payload, path)
    else:  # a plain pickle (protocol 4, as Lightning's .ckpt): torch warns about the protocol
        import pickle

        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(ValueError) as err:
        priors.load(path)
    message = str(err.value)
    assert not marker.exists()
    assert "\n" not in message and str(path) in message
    assert "not a weights-only checkpoint" in message and "never unpickles" in message
    assert "safetensors.torch.save_file" in message and "weights_only` set to `False" not in message
    src = nifti(tmp_path / "ok.nii.gz", ct_volume())
    out = tmp_path / "rec"
    assert_refused(capsys, ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", path, "--out", out],
                   [path, src], out, "not a weights-only checkpoint", "never unpickles")
    assert not marker.exists()


def test_random_bytes_as_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "random.pt"
    path.write_bytes(np.random.default_rng(1).bytes(4000))
    with pytest.raises(ValueError) as err:
        priors.load(path)
    message = str(err.value)
    assert "\n" not in message and "Re-running" not in message and "weights_only` set to `False" not in message
    assert "never unpickles" in message and "safetensors.torch.save_file" in message


def test_wrong_tensor_shapes_are_one_line(tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(priors.loading.WEIGHTS_DIR / f"{PRIOR}.safetensors"), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    keys = list(tensors)
    first = next(k for k in keys if tensors[k].ndim == 1)
    tensors[first] = torch.zeros(3, 3)
    tensors[keys[-1]] = torch.zeros(7)
    path = tmp_path / "wrong.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError) as err:
        priors.load(path)
    message = str(err.value)
    assert "\n" not in message and "2 shape mismatches" in message
    assert f"{first}: file (3, 3) vs model" in message and "config=" in message


# ---------------------------------------------------------------------------- 5: seeds


def test_negative_seed_is_refused_everywhere(tmp_path, capsys, measurement):
    src = nifti(tmp_path / "ok.nii.gz", ct_volume())
    out = tmp_path / "m.h5"
    assert_refused(capsys, ["simulate", "--input", src, "--task", "ct-sparse-30", "--seed", "-1", "--out", out],
                   [src], out, "--seed: must be a non-negative integer, got -1")
    rec = tmp_path / "rec"
    assert_refused(capsys, ["reconstruct", "--measurement", measurement, "--prior", PRIOR, "--seed", "-1",
                            "--out", rec], [measurement], rec, "--seed: must be a non-negative integer")
    assert_refused(capsys, ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", PRIOR, "--seed", "-2",
                            "--out", rec], [src], rec, "--seed: must be a non-negative integer")
    bench = tmp_path / "bench"
    assert_refused(capsys, ["bench", "--tasks", "ct-sparse-30", "--samplers", "dps", "--prior", PRIOR, "--seed", "-1",
                            "--out", bench], [], bench, "seeds must be")  # --seed abbreviates --seeds
    m = load_measurement(measurement)
    m.noise_seed = -1  # the sentinel of acquired data cannot be written for a simulation
    with pytest.raises(ValueError, match="noise_seed must be a non-negative"):
        save_measurement(tmp_path / "neg.h5", m)
    assert not (tmp_path / "neg.h5").exists()
    assert load_measurement(measurement).noise_seed == 0


# --------------------------------------------------------------------- 6: multi-frame DICOM


def test_multiframe_dicom_reads_as_a_volume(tmp_path):
    path = tmp_path / "enhanced.dcm"
    hu = enhanced_ct(path, frames=4)
    stack = read(path, volume=True)
    assert stack.shape == (4, 1, 64, 64) and stack.units == "HU" and stack.modality == "CT"
    np.testing.assert_array_equal(stack.values[:, 0], hu[::-1])  # sorted by position: frames were top-down
    assert stack.identifiers == ["enhanced.dcm:3", "enhanced.dcm:2", "enhanced.dcm:1", "enhanced.dcm:0"]
    assert stack.info["slice_spacing"] == pytest.approx(2.0) and stack.info["multiframe"]
    assert "classic single-frame" in stack.info["note"]
    assert [float(h.ImagePositionPatient[2]) for h in stack.headers] == [0.0, 2.0, 4.0, 6.0]
    assert stack.spacing == (0.5, 0.5)


def test_multiframe_dicom_reconstructs_as_a_volume_into_a_classic_series(tmp_path, capsys):
    src = tmp_path / "enhanced.dcm"
    enhanced_ct(src, frames=3)
    before = digest(src)
    out = tmp_path / "rec"
    rc, err, _ = run_cli(capsys, ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", PRIOR,
                                  "--volume", "--steps", "2", "-q", "--out", out])
    assert rc == 0, err
    assert digest(src) == before
    series = read(out / "mean", volume=True)  # a classic single-frame series, one regular volume
    assert series.shape == (3, 1, 64, 64) and not series.info["multiframe"]
    source = pydicom.dcmread(src, stop_before_pixels=True)
    for k, h in enumerate(series.headers):
        assert h.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" and "NumberOfFrames" not in h  # CT Image Storage
        ref = h.SourceImageSequence[0]
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref.ReferencedSOPClassUID == source.SOPClassUID and int(ref.ReferencedFrameNumber) == 3 - k
        assert "ReferencedFrameNumber" not in h
    record = json.loads((out / "provenance.json").read_text())
    assert "classic single-frame" in record["measurement"]["source"]["info"]["note"]


@pytest.mark.slow
def test_multiframe_dicom_slice_by_slice_writes_a_classic_series(tmp_path, capsys):
    src = tmp_path / "enhanced.dcm"
    enhanced_ct(src, frames=2)
    out = tmp_path / "rec"
    rc, err, _ = run_cli(capsys, ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", PRIOR,
                                  "--steps", "2", "-q", "--out", out])
    assert rc == 0, err
    assert read(out / "mean").shape == (2, 1, 64, 64)


# --------------------------------------------------------------- 7: other broken input classes


def _truncated_dicom(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "truncated.dcm"
    path.write_bytes(data[: len(data) // 2])
    return path


def _truncated_header(tmp_path):
    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    path = tmp_path / "header.dcm"
    path.write_bytes(data[:300])
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.dcm"
    path.write_bytes(b"")
    return path


def _empty_nifti(tmp_path):
    path = tmp_path / "empty.nii.gz"
    path.write_bytes(b"")
    return path


def _structured_report(tmp_path):
    path = tmp_path / "report.dcm"
    path.write_bytes(Path(get_testdata_file("test-SR.dcm")).read_bytes())
    return path


def _no_decoder(tmp_path):
    """CT_small with a JPEG-LS transfer syntax and encapsulated bytes: no installed plugin decodes it."""
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
    ds.PixelData = encapsulate([b"\xff\xd8" + bytes(100) + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "jpegls.dcm"
    ds.save_as(path)
    return path


def _random_nifti(tmp_path):
    path = tmp_path / "random.nii.gz"
    path.write_bytes(np.random.default_rng(2).bytes(3000))
    return path


def _random_dicom(tmp_path):
    path = tmp_path / "random.dcm"
    path.write_bytes(np.random.default_rng(3).bytes(3000))
    return path


def _nan_dicom(tmp_path):
    """A float-pixel DICOM? CT with a NaN rescale slope instead (the values become NaN)."""
    return ct_dicom(tmp_path / "nanslope.dcm", RescaleSlope="NaN")


@pytest.mark.parametrize("make, needle", [
    (_truncated_dicom, "corrupt or incomplete"),
    (_truncated_header, "no pixel data"),
    (_empty, "not a DICOM file"),
    (_empty_nifti, "not a readable NIfTI file"),
    (_structured_report, "no pixel data (Modality SR)"),
    (_no_decoder, "JPEG-LS"),
    (_random_nifti, "not a readable NIfTI file"),
    (_random_dicom, "not a DICOM file"),
    (_nan_dicom, ""),
], ids=lambda v: getattr(v, "__name__", "")[1:])
def test_broken_sources_are_one_line(tmp_path, capsys, make, needle):
    src = make(tmp_path)
    out = tmp_path / "m.h5"
    err = assert_refused(capsys, ["simulate", "--input", src, "--task", "ct-sparse-30", "--out", out], [src], out,
                         str(src), needle)
    if make is _no_decoder and "corrupt" not in err:  # a plugin may be installed; otherwise it is named
        assert "install one of" in err and "pylibjpeg" in err


def _h5_edit(src: Path, dst: Path, edit) -> Path:
    dst.write_bytes(src.read_bytes())
    with h5py.File(dst, "a") as f:
        edit(f)
    return dst


def _set_task(**changes):
    def edit(f):
        task = json.loads(f.attrs["task"])
        task.update(changes)
        f.attrs["task"] = json.dumps(task)
    return edit


MEASUREMENT_EDITS = {
    "missing-y": (lambda f: f.__delitem__("y"), "no 'y' dataset"),
    "no-task": (lambda f: f.attrs.__delitem__("task"), "lacks the 'task' attribute"),
    "task-not-json": (lambda f: f.attrs.__setitem__("task", "{oops"), "'task' is not valid JSON"),
    "task-name": (_set_task(name="ct-sparse-31"), "do not match"),
    "task-unknown": (_set_task(name="warp-drive"), "unknown task"),
    "task-huge": (_set_task(img_size=[1, 100000, 100000]), "implausibly large"),
    "task-sigma-nan": (_set_task(noise_sigma=float("nan")), "noise_sigma must be a finite number"),
    "task-seed-text": (_set_task(seed="abc"), "cannot rebuild the operator"),
    "task-list": (lambda f: f.attrs.__setitem__("task", "[1, 2]"), "must be a dict"),
    "value-map": (lambda f: f.attrs.__setitem__("value_map", "[1]"), "'value_map' must be a JSON object"),
    "noise-seed": (lambda f: f.attrs.__setitem__("noise_seed", "x"), "'noise_seed' must be an integer"),
    "y-text": (lambda f: (f.__delitem__("y"), f.create_dataset("y", data=np.array([b"ab", b"cd"]))), ""),
    "y-nan": (lambda f: f["y"].__setitem__((0, 0, 0, 0), np.nan), "NaN/Inf"),
    "resample": (lambda f: f.attrs.__setitem__("resample", json.dumps({"factor": "big"})), "factor"),
    "headers": (lambda f: (f.__delitem__("nifti_affine"), f.create_dataset("nifti_affine", data=np.zeros(3))),
                "nifti_affine"),
}


@pytest.mark.parametrize("case", list(MEASUREMENT_EDITS) + ["truncated", "empty", "random"])
def test_broken_measurement_files_are_one_line(tmp_path, capsys, measurement, case):
    bad = tmp_path / "bad.h5"
    if case == "truncated":
        data = measurement.read_bytes()
        bad.write_bytes(data[: len(data) * 2 // 3])
        needle = ""
    elif case == "empty":
        bad.write_bytes(b"")
        needle = "not a readable HDF5"
    elif case == "random":
        bad.write_bytes(np.random.default_rng(4).bytes(5000))
        needle = "not a readable HDF5"
    else:
        edit, needle = MEASUREMENT_EDITS[case]
        _h5_edit(measurement, bad, edit)
    before = digest(measurement)
    out = tmp_path / "rec"
    assert_refused(capsys, ["reconstruct", "--measurement", bad, "--prior", PRIOR, "--steps", "2", "-q", "--out", out],
                   [bad], out, str(bad), needle)
    assert digest(measurement) == before


# ---------------------------------------------------------------- property-based: the readers


SUFFIXES = [".dcm", ".nii", ".nii.gz", ".tif", ".png"]


@HYPOTHESIS
@given(data=st.binary(min_size=0, max_size=4096), suffix=st.sampled_from(SUFFIXES))
def test_random_bytes_never_traceback(tmp_path, data, suffix):
    path = tmp_path / f"x{suffix}"
    path.write_bytes(data)
    assert_one_line_or_success(lambda: read(path), path)


@HYPOTHESIS
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=8),
       base=st.sampled_from(["CT_small.dcm", "MR_small.dcm", "nifti", "enhanced"]))
def test_damaged_real_files_never_traceback(tmp_path_factory, cut, flips, base):
    folder = tmp_path_factory.mktemp("damaged")
    if base == "nifti":
        src = nifti(folder / "v.nii", ct_volume((16, 16, 2)))
    elif base == "enhanced":
        enhanced_ct(folder / "e.dcm", frames=2, size=16)
        src = folder / "e.dcm"
    else:
        src = folder / base
        src.write_bytes(Path(get_testdata_file(base)).read_bytes())
    data = bytearray(src.read_bytes())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = folder / f"damaged{''.join(src.suffixes)}"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    assert_one_line_or_success(lambda: read(path, volume=base == "enhanced"), path)


_VALUES = st.one_of(st.none(), st.integers(-70000, 70000), st.floats(allow_nan=True, allow_infinity=True),
                    st.text(max_size=12), st.lists(st.floats(-1e3, 1e3), max_size=7))
_TAGS = ["Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
         "PhotometricInterpretation", "NumberOfFrames", "RescaleSlope", "RescaleIntercept", "ImageOrientationPatient",
         "ImagePositionPatient", "PixelSpacing", "Modality", "SeriesInstanceUID", "InstanceNumber", "PixelData",
         "SOPClassUID", "PlanarConfiguration"]


@HYPOTHESIS
@given(drop=st.lists(st.sampled_from(_TAGS), max_size=4, unique=True),
       change=st.dictionaries(st.sampled_from(_TAGS[:-1]), _VALUES, max_size=4),
       volume=st.booleans())
def test_random_dicom_headers_never_traceback(tmp_path_factory, drop, change, volume):
    folder = tmp_path_factory.mktemp("header")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for key in drop:
        if key in ds:
            delattr(ds, key)
    path = folder / "x.dcm"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for key, value in change.items():
                setattr(ds, key, value)
            ds.save_as(path)
    except Exception:  # pydicom cannot even write this header: nothing to read
        assume(False)
    assert_one_line_or_success(lambda: read(path, volume=volume), path)


_JSONISH = st.one_of(st.none(), st.integers(-2**62, 2**62), st.floats(), st.text(max_size=20),
                     st.lists(st.integers(-5, 5), max_size=5), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3))


@HYPOTHESIS
@given(attrs=st.dictionaries(st.sampled_from(["task", "value_map", "source", "resample", "noise_seed",
                                              "invdiff_format"]), _JSONISH, max_size=3),
       raw=st.booleans(),
       drop=st.lists(st.sampled_from(["y", "nifti_affine", "nifti_header"]), max_size=2, unique=True),
       task=st.dictionaries(st.sampled_from(["name", "img_size", "seed", "noise", "noise_sigma", "n_detectors",
                                             "fbp_filter", "poisson_gain"]), _JSONISH, max_size=2))
def test_random_measurement_contents_never_traceback(tmp_path_factory, measurement, attrs, raw, drop, task):
    path = tmp_path_factory.mktemp("h5") / "m.h5"

    def edit(f):
        for key in drop:
            del f[key]
        record = json.loads(f.attrs["task"])
        record.update(task)
        f.attrs["task"] = json.dumps(record)
        for key, value in attrs.items():
            if value is None:
                del f.attrs[key]
            else:
                f.attrs[key] = value if raw and not isinstance(value, (dict, list)) else json.dumps(value)

    _h5_edit(measurement, path, edit)
    assert_one_line_or_success(lambda: load_measurement(path), path)


@HYPOTHESIS
@given(cut=st.floats(0.0, 1.0), flips=st.lists(st.tuples(st.floats(0.0, 1.0), st.integers(0, 255)), max_size=6))
def test_damaged_measurement_files_never_traceback(tmp_path_factory, measurement, cut, flips):
    data = bytearray(measurement.read_bytes())
    for where, value in flips:
        data[int(where * (len(data) - 1))] = value
    path = tmp_path_factory.mktemp("h5") / "m.h5"
    path.write_bytes(bytes(data[: max(1, int(cut * len(data)))]))
    assert_one_line_or_success(lambda: load_measurement(path), path)
