"""PNG/TIFF and NIfTI in and out, read_image_folder, and write-then-rename."""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from invdiff.io import (
    atomic_dir,
    atomic_file,
    read,
    read_image,
    read_image_folder,
    read_nifti,
    source_kind,
    value_map_for,
    write_image,
    write_nifti,
)

nib = pytest.importorskip("nibabel")
CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


def _volume(tmp_path, dtype=np.int16, slope=None):
    rng = np.random.default_rng(1)
    data = rng.integers(-1024, 1500, size=(12, 10, 3)).astype(dtype)
    affine = np.array([[0.8, 0, 0, -10], [0, 0.9, 0, 5], [0, 0, 2.5, 30], [0, 0, 0, 1.0]])
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm")
    if slope is not None:
        img.header.set_slope_inter(slope, -3.0)
    path = tmp_path / "vol.nii.gz"
    nib.save(img, str(path))
    return path, np.asarray(nib.load(str(path)).get_fdata()), affine


def test_nifti_slices_and_round_trip(tmp_path):
    path, data, affine = _volume(tmp_path)
    vol = read_nifti(path)
    assert vol.shape == (3, 1, 10, 12) and vol.modality == "CT" and vol.units == "HU"
    np.testing.assert_array_equal(vol.values[1, 0], np.rot90(data[:, :, 1]))
    assert vol.spacing == pytest.approx((0.9, 0.8))
    out = write_nifti(tmp_path / "out.nii.gz", vol.values[:, 0], vol.affine, vol.nifti_header, dtype=vol.info["dtype"])
    back = nib.load(str(out))
    assert back.get_data_dtype() == np.int16 and back.header.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(back.affine, affine)
    np.testing.assert_array_equal(back.get_fdata(), data)  # integers within the source's quantisation: exact


def test_nifti_scaled_source_keeps_its_scaling(tmp_path):
    path, data, _ = _volume(tmp_path, slope=0.5)
    vol = read_nifti(path, modality="MR")
    assert vol.modality == "MR"
    new = vol.values[:, 0] + 0.2  # off the 0.5 grid: rounded to the nearest stored value
    out = nib.load(str(write_nifti(tmp_path / "o.nii", new, vol.affine, vol.nifti_header, dtype=vol.info["dtype"])))
    assert out.get_data_dtype() == np.int16
    written = np.stack([np.rot90(out.get_fdata()[:, :, k]) for k in range(3)])
    # nibabel's choice for these values: slope 1 (the range fits int16), i.e. rounding
    slope = out.dataobj.slope
    assert np.abs(written - new).max() <= slope / 2 + 1e-9


def test_nifti_resampled_affine_keeps_voxels_in_place(tmp_path):
    path, _, affine = _volume(tmp_path)
    vol = read_nifti(path)
    out = nib.load(str(write_nifti(tmp_path / "r.nii.gz", np.zeros((3, 5, 6)), vol.affine, vol.nifti_header,
                                   factor=(2.0, 2.0))))
    assert out.shape == (6, 5, 3)
    # new voxel (i, j) is the centre of source voxels 2i..2i+1, 2j..2j+1
    for i, j in [(0, 0), (5, 4)]:
        centre = np.mean([affine @ [2 * i + a, 2 * j + b, 1, 1] for a in (0, 1) for b in (0, 1)], axis=0)
        np.testing.assert_allclose(out.affine @ [i, j, 1, 1], centre, atol=1e-5)  # float32 on disk


def test_png_and_tiff_round_trip(tmp_path):
    v16 = np.arange(120, dtype=np.float64).reshape(1, 10, 12) * 500
    write_image(tmp_path / "a.png", v16, bits=16)
    img = read_image(tmp_path / "a.png")
    assert img.bits == 16 and img.kind == "png"
    np.testing.assert_array_equal(img.values[0], v16)
    np.testing.assert_allclose(img.to_unit()[0].numpy(), v16 / 65535, atol=1e-7)
    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 7)).astype(float)
    write_image(tmp_path / "c.png", rgb, bits=8)
    np.testing.assert_array_equal(read_image(tmp_path / "c.png").values[0], rgb)
    f = np.random.default_rng(1).normal(size=(1, 6, 4))
    write_image(tmp_path / "f.tif", f, bits=None)
    t = read(tmp_path / "f.tif")
    assert t.kind == "tiff" and t.bits is None
    np.testing.assert_allclose(t.values[0], f, rtol=1e-6)
    with pytest.raises(FileExistsError):
        write_image(tmp_path / "a.png", v16, bits=16)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        read(tmp_path / "bad.png")


def test_read_image_folder_mixes_formats_in_order(tmp_path):
    write_image(tmp_path / "a.png", np.full((1, 4, 6), 255.0), bits=8)
    path, data, _ = _volume(tmp_path)
    shutil.move(path, tmp_path / "m.nii.gz")
    series = tmp_path / "z_series"
    series.mkdir()
    for p in CT_SERIES.iterdir():  # flat: copy the DICOM files into the folder itself
        shutil.copy(p, tmp_path / f"s{p.name}.dcm")
    (tmp_path / "notes.txt").write_text("ignored")
    (tmp_path / "broken.png").write_bytes(b"junk")
    with pytest.warns(UserWarning, match="broken.png"):
        items = read_image_folder(tmp_path)
    names = [n for n, _ in items]
    assert names[0] == "a.png" and names[1:4] == ["m.nii.gz:0", "m.nii.gz:1", "m.nii.gz:2"]
    assert names[4:] == ["s3353.dcm", "s3023.dcm", "s2693.dcm", "s2392.dcm", "s2062.dcm"]  # by position
    for _, x in items:
        assert x.dtype == torch.float32 and x.ndim == 3 and 0 <= x.min() and x.max() <= 1
    hu = read(CT_SERIES).values
    np.testing.assert_allclose(items[4][1].numpy(), np.clip((hu[0] + 1000) / 2000, 0, 1), atol=1e-6)
    np.testing.assert_allclose(items[1][1][0].numpy(), np.clip((np.rot90(data[:, :, 0]) + 1000) / 2000, 0, 1), atol=1e-6)
    with pytest.raises(ValueError, match="no readable images"):
        read_image_folder(series)


def test_value_map_rules():
    assert value_map_for(np.array([0.0]), "CT", window=(-160, 240)).as_dict()["offset"] == -160
    assert value_map_for(np.zeros(3), None, bits=8).scale == 255
    signed = value_map_for(np.linspace(-1, 1, 1001), "MR")
    assert signed.offset == pytest.approx(-0.99) and signed.scale == pytest.approx(1.98)


def test_source_kind(tmp_path):
    assert source_kind(CT_SERIES) == "dicom"
    assert source_kind(get_testdata_file("CT_small.dcm")) == "dicom"
    (tmp_path / "x.h5").write_bytes(b"")
    assert source_kind(tmp_path / "x.h5") == "fastmri"
    (tmp_path / "x.xyz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown image format"):
        source_kind(tmp_path / "x.xyz")


def test_atomic_writes_leave_nothing_on_failure(tmp_path):
    with pytest.raises(RuntimeError):
        with atomic_file(tmp_path / "a.bin") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "old").write_text("old")
    with atomic_dir(tmp_path / "d", overwrite=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["new"]
