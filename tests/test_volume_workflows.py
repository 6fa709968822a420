"""invdiff reconstruct --volume: a slice-stacked measurement of a DICOM series (or NIfTI
volume) reconstructed jointly as one volume, its outputs and provenance; volume tasks
(mri3d-, zsr-) simulated as one measurement; series that are not one regular volume
refused with one line naming the files (exit 1, nothing written)."""

import copy
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from invdiff import operators
from invdiff.apps.workflows import reconstruct, simulate, write_reconstruction
from invdiff.cli import main
from invdiff.io import check_volume_geometry, load_measurement, read, read_dicom, save_measurement
from invdiff.priors import GaussianPrior

PRIOR = "ct-phantom-patch-64"  # a patch prior: works at 16x16
FAST = ["--steps", "3", "-q"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread for these small volumes (thread start-up dominates at 16x16: a run
    takes several times longer with two threads when a core is busy); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_series(folder: Path, n: int = 4, size: int = 16, spacing: float = 2.5, *, z=None, orientations=None,
                 sizes=None, seed: int = 0) -> Path:
    """A CT series of ``n`` axial slices (``IM0001.dcm``, ...) built from pydicom's CT_small
    header: a disc that shrinks along z in air, HU; ``z`` positions (default evenly spaced),
    per-slice ``orientations`` and ``sizes`` override the regular grid."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del template.PixelData
    folder.mkdir(parents=True, exist_ok=True)
    series, rng = generate_uid(), np.random.default_rng(seed)
    z = [k * spacing for k in range(n)] if z is None else z
    for k in range(n):
        rows = cols = size if sizes is None else sizes[k]
        yy, xx = np.mgrid[:rows, :cols]
        r = np.hypot(yy - rows / 2 + 0.5, xx - cols / 2 + 0.5) / (rows / 2)
        hu = np.where(r < 0.8 - 0.08 * k, 40.0, -1000.0) + rng.normal(0, 5, (rows, cols))
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SeriesInstanceUID, ds.InstanceNumber = series, k + 1
        ds.Rows, ds.Columns, ds.PixelSpacing = rows, cols, [1.0, 1.0]
        ds.SliceThickness = spacing
        ds.ImageOrientationPatient = list(orientations[k]) if orientations is not None else [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-8.0, -8.0, float(z[k])]
        ds.PixelData = np.rint(hu - float(ds.RescaleIntercept)).astype("<i2").tobytes()
        ds["PixelData"].VR = "OW"
        ds.save_as(folder / f"IM{k + 1:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """A 4-slice 16x16 series and its ct-sparse-30 measurement (one 2D measurement per slice)."""
    work = tmp_path_factory.mktemp("vol")
    series = write_series(work / "series")
    meas = work / "meas.h5"
    assert main(["simulate", "--task", "ct-sparse-30", "--input", str(series), "--out", str(meas), "--seed", "1",
                 "--noise-sigma", "0.02"]) == 0
    return series, meas


def _only_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------ the joint run


def test_volume_cli_writes_a_series_with_the_source_geometry_and_std(measured, tmp_path, capsys):
    series, meas = measured
    out = tmp_path / "vol"
    assert main(["reconstruct", "--measurement", str(meas), "--prior", PRIOR, "--volume", "--samples", "2",
                 "--out", str(out), "--seed", "3", *FAST]) == 0
    printed = capsys.readouterr().out
    assert "jointly as one volume" in printed and "sampler dds-3d" in printed
    src, mean, std = read_dicom(series), read_dicom(out / "mean", volume=True), read_dicom(out / "std", volume=True)
    assert mean.shape == std.shape == (4, 1, 16, 16)
    assert mean.info["slice_spacing"] == pytest.approx(2.5)
    for a, b in zip(mean.headers, src.headers):
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
                    "StudyInstanceUID", "FrameOfReferenceUID"):
            assert a.get(tag) == b.get(tag), tag
        assert a.SourceImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
        assert "joint 3D reconstruction of 4 slices" in a.DerivationDescription
        assert "sampler seed 3 (one for the volume)" in a.DerivationDescription
    assert (std.values >= 0).all() and std.values.max() > 0
    prov = json.loads((out / "provenance.json").read_text())
    info = prov["reconstruction"]
    assert info["joint"] is True and info["sampler"] == "dds-3d" and info["seed"] == 3 and info["samples"] == 2
    assert info["volume_shape"] == [1, 4, 16, 16] and info["volume_operator"] == "SliceStack"
    assert info["slice_spacing"] == pytest.approx(2.5) and info["prior"] == PRIOR
    assert info["sampler_options"] == {"steps": 3}
    assert len(prov["runs"]) == 1 and prov["runs"][0]["slices"] == 4 and prov["runs"][0]["nfe"] == 3
    assert set(prov["files"]) == {"mean", "std"} and len(prov["files"]["mean"]) == 4


def test_volume_run_is_joint_deterministic_and_differs_from_slices(measured):
    _, meas = measured
    m = load_measurement(meas)
    physics = m.volume_physics()
    assert physics.img_size == (1, 4, 16, 16) and m.volume_y().shape == (1, *m.y.shape)
    again = operators.make(**physics.task)  # the record rebuilds the volume operator
    x = torch.rand(1, 1, 4, 16, 16)
    assert torch.allclose(again.A(x), physics.A(x))
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0, variance=0.05, mean=0.5)
    run = dict(steps=3, seed=5)
    a = reconstruct(m, prior, volume=True, **run)
    b = reconstruct(m, prior, volume=True, **run)
    assert a.info["joint"] and a.info["sampler"] == "dds-3d" and a.mean.shape == (4, 1, 16, 16)
    assert torch.equal(a.mean, b.mean)  # same seed, same volume
    assert not torch.equal(a.mean, reconstruct(m, prior, volume=True, steps=3, seed=6).mean)
    slices = reconstruct(m, prior, "dds", **run)  # DDS on every slice, one generator per slice
    assert not slices.info["joint"] and (a.mean - slices.mean).abs().max() > 1e-3
    uncoupled = reconstruct(m, prior, "dds-3d", volume=True, options={"rho": 0.0, "tv_weight": 0.0}, **run)
    assert (a.mean - uncoupled.mean).abs().max() > 1e-4  # the TV-z coupling acts across slices


def test_cli_volume_outputs_are_deterministic_and_differ_from_slice_by_slice(measured, tmp_path):
    _, meas = measured
    outs = {}
    for name, extra in (("v1", ["--volume"]), ("v2", ["--volume"]), ("s", ["--sampler", "dds"])):
        assert main(["reconstruct", "--measurement", str(meas), "--prior", PRIOR, "--out", str(tmp_path / name),
                     *extra, *FAST]) == 0
        outs[name] = read_dicom(tmp_path / name / "mean").values
    np.testing.assert_array_equal(outs["v1"], outs["v2"])
    assert np.abs(outs["v1"] - outs["s"]).max() > 0
    prov = json.loads((tmp_path / "s" / "provenance.json").read_text())
    assert prov["reconstruction"]["joint"] is False and len(prov["runs"]) == 4


def test_one_go_input_volume_reports_3d_metrics(tmp_path, capsys):
    series = write_series(tmp_path / "series", n=5)
    out = tmp_path / "r"
    assert main(["reconstruct", "--input", str(series), "--task", "ct-sparse-30", "--volume", "--prior", PRIOR,
                 "--sampler", "diffusion-mbir:corrector=false", "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    assert "vs the input (3D)" in printed and "SSIM" in printed
    prov = json.loads((out / "provenance.json").read_text())
    metrics = prov["metrics"]
    assert set(metrics) == {"baseline", "diffusion-mbir"}
    assert all(v["dims"] == 3 and v["ssim_window"] == 5 for v in metrics.values())
    assert prov["reconstruction"]["sampler_options"] == {"corrector": False, "steps": 3}
    assert read_dicom(out / "mean").shape == (5, 1, 16, 16)


def test_tpdm_needs_and_records_the_perpendicular_prior(measured, tmp_path, capsys):
    _, meas = measured
    out = str(tmp_path / "t")
    assert main(["reconstruct", "--measurement", str(meas), "--prior", PRIOR, "--volume", "--sampler", "tpdm",
                 "--out", out, *FAST]) == 1
    assert "--perpendicular-prior" in _only_line(capsys) and not Path(out).exists()
    assert main(["reconstruct", "--measurement", str(meas), "--prior", PRIOR, "--volume", "--sampler", "tpdm",
                 "--perpendicular-prior", PRIOR, "--out", out, *FAST]) == 0
    info = json.loads((Path(out) / "provenance.json").read_text())["reconstruction"]
    assert info["sampler"] == "tpdm" and info["perpendicular_prior"] == PRIOR and info["perpendicular_plane"] == "coronal"


def test_progress_bar_runs_over_the_diffusion_steps(measured, capsys):
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0, variance=0.05, mean=0.5)
    reconstruct(load_measurement(measured[1]), prior, volume=True, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "dds-3d:" in err and "/3 [" in err and "slice" not in err  # tqdm over the 3 steps
    reconstruct(load_measurement(measured[1]), prior, volume=True, steps=3, progress=False)
    assert capsys.readouterr().err == ""


def test_nifti_volume_keeps_the_affine(tmp_path):
    nib = pytest.importorskip("nibabel")
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    affine[:3, 3] = [-6, 5, 3]
    data = np.random.default_rng(0).integers(-1000, 1000, (16, 16, 4)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "v.nii.gz"))
    m, reference = simulate(tmp_path / "v.nii.gz", "ct-sparse-30", seed=0)
    prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0, variance=0.05, mean=0.5)
    rec = reconstruct(m, prior, volume=True, samples=2, steps=3, reference=reference)
    assert rec.info["slice_spacing"] == pytest.approx(2.0) and rec.metrics["dds-3d"]["dims"] == 3
    write_reconstruction(tmp_path / "out", rec, m)
    for name in ("mean", "std"):
        img = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert img.shape == (16, 16, 4)
        np.testing.assert_allclose(img.affine, affine)


# -------------------------------------------------------------------------- volume tasks


@pytest.mark.parametrize("task, y_shape", [("zsr-2x", (1, 1, 2, 16, 16)), ("mri3d-2x", (1, 2, 4, 16, 16))])
def test_volume_tasks_simulate_one_measurement_and_reconstruct(task, y_shape, tmp_path, capsys):
    series = write_series(tmp_path / "series")
    meas = tmp_path / "m.h5"
    assert main(["simulate", "--task", task, "--input", str(series), "--out", str(meas)]) == 0
    assert "4x16x16 volume" in capsys.readouterr().out
    m = load_measurement(meas)
    assert m.volume and m.n_slices == 4 and tuple(m.y.shape) == y_shape and m.img_size == (1, 4, 16, 16)
    out = tmp_path / "r"  # a volume measurement is reconstructed as one volume without --volume
    assert main(["reconstruct", "--measurement", str(meas), "--prior", PRIOR, "--out", str(out), *FAST]) == 0
    assert read_dicom(out / "mean").shape == (4, 1, 16, 16)
    assert json.loads((out / "provenance.json").read_text())["reconstruction"]["joint"] is True


def test_volume_measurement_round_trips_and_is_checked(tmp_path):
    x = torch.rand(3, 1, 8, 8)
    from invdiff.io import ImageStack

    stack = ImageStack(values=x.double().numpy() * 100, kind="png", source="mem", identifiers=["a", "b", "c"],
                       modality="MR", units="intensity")
    with pytest.raises(ValueError, match="not divisible by 2"):
        simulate(stack, "zsr-2x")
    m, _ = simulate(stack, "mri3d-2x")
    save_measurement(tmp_path / "m.h5", m)
    back = load_measurement(tmp_path / "m.h5")
    assert back.volume and torch.equal(back.y, m.y) and back.volume_y() is back.y
    m.y = torch.cat([m.y, m.y])
    with pytest.raises(ValueError, match="holds one measurement"):
        m.check()


# ------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("kind", ["gap", "orientation", "size", "duplicate"])
def test_series_that_is_not_one_volume_is_refused(kind, tmp_path, capsys):
    spec = {
        "gap": dict(z=[0.0, 2.5, 7.5, 10.0]),  # IM0003 follows a missing slice
        "orientation": dict(orientations=[[1, 0, 0, 0, 1, 0]] * 3 + [[1, 0, 0, 0, 0, -1]]),
        "size": dict(sizes=[16, 16, 16, 12]),
        "duplicate": dict(z=[0.0, 2.5, 2.5, 5.0]),
    }[kind]
    expected = {"gap": ("uneven slice spacing", "IM0002.dcm -> IM0003.dcm is 5 mm"),
                "orientation": ("mixed orientations", "IM0004.dcm"),
                "size": ("different sizes", "IM0004.dcm"),
                "duplicate": ("same position", "IM0002.dcm and IM0003.dcm")}[kind]
    series = write_series(tmp_path / "series", **spec)
    before = set(tmp_path.iterdir())
    out = tmp_path / "out"
    assert main(["reconstruct", "--input", str(series), "--task", "ct-sparse-30", "--volume", "--prior", PRIOR,
                 "--out", str(out), *FAST]) == 1
    msg = _only_line(capsys)
    assert all(text in msg for text in expected), msg
    assert str(series) in msg and not out.exists() and set(tmp_path.iterdir()) == before
    if kind == "size":  # never one series, with or without --volume
        return
    # the measurement simulated slice by slice is fine; --volume on it is refused the same way
    meas = tmp_path / "m.h5"
    assert main(["simulate", "--task", "ct-sparse-30", "--input", str(series), "--out", str(meas)]) == 0
    capsys.readouterr()
    assert main(["reconstruct", "--measurement", str(meas), "--volume", "--prior", PRIOR, "--out", str(out),
                 *FAST]) == 1
    msg = _only_line(capsys)
    assert all(text in msg for text in expected) and not out.exists()
    assert main(["simulate", "--task", "zsr-2x", "--input", str(series), "--out", str(tmp_path / "z.h5")]) == 1
    assert expected[0] in _only_line(capsys) and not (tmp_path / "z.h5").exists()


def test_geometry_check_directly():
    series_headers = read(get_testdata_file("CT_small.dcm")).headers
    assert check_volume_geometry(series_headers, ["one.dcm"]) is None  # one slice
    h = [copy.deepcopy(series_headers[0]) for _ in range(3)]
    for k, ds in enumerate(h):
        ds.SOPInstanceUID = generate_uid()
        ds.ImagePositionPatient = [0, 0, 1.5 * k]
    assert check_volume_geometry(h, ["a", "b", "c"]) == pytest.approx(1.5)
    del h[1].ImagePositionPatient
    with pytest.raises(ValueError, match="b lack ImageOrientationPatient/ImagePositionPatient"):
        check_volume_geometry(h, ["a", "b", "c"], "series")


def test_sampler_and_mode_mismatches_are_one_line(measured, tmp_path, capsys):
    _, meas = measured
    out = tmp_path / "o"
    cases = [
        (["--volume", "--sampler", "dps"], "needs a volume sampler"),
        (["--sampler", "dds-3d"], "is a volume sampler"),
        (["--volume", "--perpendicular-prior", PRIOR], "is for --sampler tpdm"),
        (["--volume", "--sampler", "dds-3d:nonsense=1"], "nonsense"),
        (["--volume", "--sampler", "nope-3d"], "unknown sampler"),
    ]
    for extra, text in cases:
        assert main(["reconstruct", "--measurement", str(meas), "--prior", PRIOR, "--out", str(out), *extra,
                     *FAST]) == 1
        assert text in _only_line(capsys), extra
        assert not out.exists()
