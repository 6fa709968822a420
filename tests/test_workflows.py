"""invdiff simulate / reconstruct: DICOM, NIfTI, PNG and fastMRI workflows end to end, and
their errors (one line, exit 1, nothing half-written)."""

import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file

from invdiff.cli import main
from invdiff.io import load_measurement, read, read_dicom, write_fastmri, write_image
from invdiff.priors import ADMConfig, ADMPrior, GuidedDiffusionUNet, save
from invdiff.apps.workflows import load_prior, reconstruct

DATA = Path(get_testdata_file("CT_small.dcm")).parent
CT_SERIES = DATA / "dicomdirtests" / "98892001" / "CT5N"  # 5 real 16x16 CT slices
FAST = ["--sampler", "dds:cg_iterations=3", "--steps", "2", "-q"]


@pytest.fixture(scope="module")
def prior_path(tmp_path_factory):
    """A 16x16 ADM prior with random weights (the workflow, not the image quality, is tested)."""
    cfg = ADMConfig(image_size=16, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult="1,2",
                    attention_resolutions="8", num_head_channels=32, learn_sigma=True)
    net = GuidedDiffusionUNet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    path = tmp_path_factory.mktemp("prior") / "tiny16.safetensors"
    save(ADMPrior(net.eval()), path, card={"data": "none, random weights"})
    return str(path)


@pytest.fixture(scope="module")
def series_run(prior_path, tmp_path_factory):
    """simulate -> reconstruct (K=3, --png) on pydicom's 5-slice CT series."""
    work = tmp_path_factory.mktemp("series")
    meas, out = work / "meas.h5", work / "recon"
    assert main(["simulate", "--task", "ct-sparse-30", "--input", str(CT_SERIES), "--out", str(meas), "--seed", "1"]) == 0
    assert main(["reconstruct", "--measurement", str(meas), "--prior", prior_path, "--samples", "3",
                 "--out", str(out), "--png", *FAST]) == 0
    return meas, out


def test_series_simulate_reconstruct_dicom_tags(series_run, prior_path):
    meas, out = series_run
    src = read(CT_SERIES)
    mean, std = read_dicom(out / "mean"), read_dicom(out / "std")
    assert mean.shape == std.shape == (5, 1, 16, 16)
    assert mean.headers[0].SeriesInstanceUID != std.headers[0].SeriesInstanceUID
    for series, what in ((mean, "mean"), (std, "std")):
        for a, b in zip(series.headers, src.headers):  # sorted by position, one output per source slice
            for tag in ("PatientName", "PatientID", "StudyInstanceUID", "FrameOfReferenceUID", "PixelSpacing",
                        "ImagePositionPatient", "ImageOrientationPatient", "Modality", "RescaleIntercept"):
                assert a.get(tag) == b.get(tag), tag
            assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
            assert list(a.ImageType) == ["DERIVED", "SECONDARY"]
            assert a.SeriesDescription == f"invdiff dds {what} K=3 ct-sparse-30"
            assert f"prior {Path(prior_path)}" in a.DerivationDescription
            assert a.SourceImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
    assert (std.values >= 0).all() and std.values.max() > 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["measurement"]["task"]["name"] == "ct-sparse-30" and prov["measurement"]["noise_seed"] == 1
    assert prov["reconstruction"]["samples"] == 3 and [r["seed"] for r in prov["runs"]] == [0, 1, 2, 3, 4]
    assert prov["reconstruction"]["sampler_options"] == {"cg_iterations": 3, "steps": 2}  # NAME:key=value
    for k in range(1, 6):  # quick looks open as images
        for what in ("mean", "std"):
            with Image.open(out / "png" / f"{what}_{k:04d}.png") as im:
                assert im.size == (16, 16) and im.mode == "L"


def test_written_values_are_the_posterior_mean_in_hu(series_run, prior_path):
    meas, out = series_run
    m = load_measurement(meas)
    rec = reconstruct(m, load_prior(prior_path), "dds", samples=3, steps=2, seed=0,  # the CLI's run
                      options={"cg_iterations": 3})
    hu = m.value_map.from_unit(rec.mean.clamp(0, 1).double().numpy())
    np.testing.assert_allclose(read_dicom(out / "mean").values, hu, atol=0.5 + 1e-6)  # slope 1: rounding only
    std_hu = m.value_map.std_from_unit(rec.std.double().numpy())
    np.testing.assert_allclose(read_dicom(out / "std").values, std_hu, atol=0.5 + 1e-6)


def test_one_go_resize_is_explicit_and_recorded(prior_path, tmp_path, capsys):
    src = get_testdata_file("CT_small.dcm")
    args = ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", prior_path, "--out", str(tmp_path / "r"), *FAST]
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pass --resize" in err and "128x128" in err
    assert not (tmp_path / "r").exists()
    assert main(args + ["--resize"]) == 0
    printed = capsys.readouterr().out
    assert "resampled 128x128 -> 16x16" in printed and "PSNR" in printed
    a, b = read_dicom(tmp_path / "r" / "mean").headers[0], pydicom.dcmread(src)
    assert (a.Rows, a.Columns) == (16, 16) and "std" not in {p.name for p in (tmp_path / "r").iterdir()}
    np.testing.assert_allclose(np.asarray(a.PixelSpacing, float), 8 * np.asarray(b.PixelSpacing, float), rtol=1e-6)
    shift = 3.5 * np.asarray(b.PixelSpacing, float)  # (f - 1) / 2 source pixels along rows and columns
    np.testing.assert_allclose(np.asarray(a.ImagePositionPatient, float),
                               np.asarray(b.ImagePositionPatient, float) + [shift[1], shift[0], 0], atol=1e-4)
    prov = json.loads((tmp_path / "r" / "provenance.json").read_text())
    assert prov["measurement"]["resample"]["factor"] == [8.0, 8.0]
    assert set(prov["metrics"]) == {"baseline", "dds"}


def test_nifti_and_png_sources_round_trip(prior_path, tmp_path):
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(0)
    affine = np.diag([0.7, 0.7, 3.0, 1.0])
    affine[:3, 3] = [-5, 6, 7]
    nib.save(nib.Nifti1Image(rng.integers(-1000, 1000, (16, 16, 2)).astype(np.int16), affine), str(tmp_path / "v.nii.gz"))
    assert main(["reconstruct", "--input", str(tmp_path / "v.nii.gz"), "--task", "ct-limited-90", "--prior", prior_path,
                 "--samples", "2", "--out", str(tmp_path / "nv"), *FAST]) == 0
    mean = nib.load(str(tmp_path / "nv" / "mean.nii.gz"))
    assert mean.shape == (16, 16, 2) and mean.get_data_dtype() == np.int16
    np.testing.assert_allclose(mean.affine, affine)
    assert nib.load(str(tmp_path / "nv" / "std.nii.gz")).get_data_dtype() == np.float32
    write_image(tmp_path / "p.png", rng.integers(0, 256, (1, 16, 16)).astype(float), bits=8)
    assert main(["reconstruct", "--input", str(tmp_path / "p.png"), "--task", "inpaint-random-50", "--prior", prior_path,
                 "--out", str(tmp_path / "np"), *FAST]) == 0
    with Image.open(tmp_path / "np" / "mean_p.png") as im:
        assert im.mode == "L" and im.size == (16, 16)


def test_fastmri_file_reconstructs(prior_path, tmp_path):
    H = W = 20
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    img = (xx**2 + yy**2 < 0.6) * np.exp(1j * 0.2 * xx)
    k = np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(img), norm="ortho"))[None]
    mask = np.zeros(W, bool)
    mask[7:13] = mask[::3] = True
    write_fastmri(tmp_path / "k.h5", k * mask, mask)
    args = ["reconstruct", "--measurement", str(tmp_path / "k.h5"), "--prior", prior_path, "--out", str(tmp_path / "o"), *FAST]
    assert main(args) == 1 and not (tmp_path / "o").exists()  # 20x20 k-space, 16x16 prior: needs --resize
    assert main(args + ["--resize", "--png"]) == 0
    import h5py

    with h5py.File(tmp_path / "o" / "reconstruction.h5") as f:
        assert f["reconstruction"].shape == (1, 16, 16) and "std" not in f
    assert (tmp_path / "o" / "png" / "mean_0001.png").is_file()


def _only_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error: ") and "\n" not in err, err
    return err


def test_errors_are_one_line_and_leave_nothing(prior_path, series_run, tmp_path, capsys):
    meas, _ = series_run
    before = set(tmp_path.iterdir())

    def run(*args):
        code = main(list(args))
        assert code == 1
        assert set(tmp_path.iterdir()) == before  # no output, no temporary left behind
        return _only_line(capsys)

    out = str(tmp_path / "out")
    assert "already exists" in run("simulate", "--task", "ct-sparse-30", "--input", str(CT_SERIES), "--out", str(meas))
    ct = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp_path / "bad.dcm").write_bytes(ct[: len(ct) // 2])  # a truncated transfer
    before = set(tmp_path.iterdir())
    assert "incomplete DICOM pixel data" in run("simulate", "--task", "ct-sparse-30", "--input", str(tmp_path / "bad.dcm"),
                                  "--out", str(tmp_path / "m.h5"))
    msg = run("simulate", "--task", "mri-4x", "--input", str(DATA / "MR_small_jpeg_ls_lossless.dcm"), "--out",
              str(tmp_path / "m.h5"))
    assert "JPEG-LS" in msg and "pylibjpeg" in msg
    assert "unknown task" in run("simulate", "--task", "ct-spiral-9", "--input", str(CT_SERIES), "--out", str(tmp_path / "m.h5"))
    assert "no such" in run("reconstruct", "--measurement", str(tmp_path / "none.h5"), "--prior", prior_path, "--out", out)
    assert "not a readable HDF5" in run("reconstruct", "--measurement", str(tmp_path / "bad.dcm"), "--prior", prior_path,
                                        "--out", out)
    # a measurement for 12x12 images against a 16x16 prior
    assert main(["simulate", "--task", "ct-sparse-30", "--input", str(CT_SERIES), "--out", str(tmp_path / "m12.h5"),
                 "--size", "12"]) == 0
    capsys.readouterr()
    before = set(tmp_path.iterdir())
    assert "prior takes (1, 16, 16)" in run("reconstruct", "--measurement", str(tmp_path / "m12.h5"), "--prior",
                                            prior_path, "--out", out, *FAST)
    assert "--task is for --input" in run("reconstruct", "--measurement", str(meas), "--task", "ct-sparse-30",
                                          "--prior", prior_path, "--out", out)
    assert "already exists" in run("reconstruct", "--measurement", str(meas), "--prior", prior_path, "--out",
                                   str(tmp_path), *FAST)
    assert "no checkpoint at" in run("reconstruct", "--measurement", str(meas), "--prior",
                                       str(tmp_path / "nope.safetensors"), "--out", out)


def test_failure_while_writing_leaves_no_partial_series(prior_path, tmp_path, monkeypatch, capsys):
    import invdiff.apps.workflows as wf

    real = wf.write_dicom_series

    def fail_on_std(folder, values, headers, **kw):
        if Path(folder).name == "std":
            raise RuntimeError("disk full")
        return real(folder, values, headers, **kw)

    monkeypatch.setattr(wf, "write_dicom_series", fail_on_std)
    out = tmp_path / "recon"
    assert main(["reconstruct", "--input", get_testdata_file("CT_small.dcm"), "--task", "ct-sparse-30", "--resize",
                 "--prior", prior_path, "--samples", "2", "--out", str(out), *FAST]) == 1
    assert "disk full" in _only_line(capsys)
    assert list(tmp_path.iterdir()) == []  # the mean series written before the failure is gone too


def test_output_formats_map_values_exactly(tmp_path):
    from invdiff.apps.workflows import Reconstruction, simulate, write_reconstruction

    m, x = simulate(CT_SERIES, "ct-sparse-30", seed=0)
    g = torch.Generator().manual_seed(0)
    mean, std = torch.rand(5, 1, 16, 16, generator=g), 0.05 * torch.rand(5, 1, 16, 16, generator=g)
    rec = Reconstruction(mean, std, mean, runs=[], info={"sampler": "test", "sampler_options": {}, "samples": 2,
                                                         "seed": 0, "prior": "none"})
    hu = -1000 + 2000 * mean.double().numpy()
    write_reconstruction(tmp_path / "d", rec, m)
    np.testing.assert_allclose(read_dicom(tmp_path / "d" / "mean").values, hu, atol=0.5 + 1e-9)
    np.testing.assert_allclose(read_dicom(tmp_path / "d" / "std").values, 2000 * std.double().numpy(), atol=0.5 + 1e-9)
    write_reconstruction(tmp_path / "p", rec, m, fmt="png")  # HU do not fit a PNG: the window as 16 bits
    with Image.open(tmp_path / "p" / "mean_3353.png") as im:
        np.testing.assert_array_equal(np.asarray(im), np.rint(mean[0, 0].double().numpy() * 65535))
    write_reconstruction(tmp_path / "t", rec, m, fmt="tiff")  # float TIFF in HU
    np.testing.assert_allclose(read(tmp_path / "t" / "mean_2062.tif").values[0, 0], hu[4, 0], rtol=1e-6, atol=1e-3)
    write_reconstruction(tmp_path / "h", rec, m, fmt="h5")
    import h5py

    with h5py.File(tmp_path / "h" / "reconstruction.h5") as f:
        np.testing.assert_allclose(f["reconstruction"][()], hu[:, 0], rtol=1e-6, atol=1e-3)
    with pytest.raises(ValueError, match="NIfTI output needs a NIfTI source"):
        write_reconstruction(tmp_path / "n", rec, m, fmt="nifti")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "h", "p", "t"]
