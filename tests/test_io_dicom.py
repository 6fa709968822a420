"""DICOM in and out: HU mapping, sorting, round trips of tags, geometry and values, errors."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from invdiff.io import ValueMap, atomic_dir, headers_from_json, headers_to_json, read_dicom, write_dicom_series
from invdiff.io.dicom import stored_range

DATA = Path(get_testdata_file("CT_small.dcm")).parent
CT_SERIES = DATA / "dicomdirtests" / "98892001" / "CT5N"  # 5 real CT slices, file names in descending z


def _pixel_centre(ds, r, c):
    """Patient coordinates of pixel (row r, column c) by the DICOM definition."""
    ipp = np.asarray(ds.ImagePositionPatient, float)
    iop = np.asarray(ds.ImageOrientationPatient, float)
    ps = np.asarray(ds.PixelSpacing, float)
    return ipp + c * ps[1] * iop[:3] + r * ps[0] * iop[3:]


def test_ct_values_are_hounsfield_units():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct = read_dicom(get_testdata_file("CT_small.dcm"))
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert ct.units == "HU" and ct.modality == "CT"
    np.testing.assert_array_equal(ct.values[0, 0], expected)
    x = ct.to_unit()
    np.testing.assert_allclose(x[0, 0].numpy(), np.clip((expected + 1000) / 2000, 0, 1), atol=1e-6)


def test_series_sorted_by_position_not_file_name():
    series = read_dicom(CT_SERIES)
    z = [float(h.ImagePositionPatient[2]) for h in series.headers]
    assert z == sorted(z) and len(z) == 5
    assert series.identifiers == ["3353", "3023", "2693", "2392", "2062"]  # reverse of the name order
    for name, h, v in zip(series.identifiers, series.headers, series.values):
        ds = pydicom.dcmread(CT_SERIES / name)
        np.testing.assert_array_equal(v[0], ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept))


def _write(tmp_path, values, headers, **kw):
    with atomic_dir(tmp_path / "out") as folder:
        write_dicom_series(folder, values, headers, description="invdiff test", derivation="unit test", **kw)
    return tmp_path / "out"


def test_round_trip_keeps_tags_geometry_and_values(tmp_path):
    src = read_dicom(CT_SERIES)
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1000, 1000, size=src.values[:, 0].shape)  # arbitrary HU, not integers
    out = read_dicom(_write(tmp_path, hu, src.headers))
    assert out.shape == src.shape
    assert np.abs(out.values[:, 0] - hu).max() <= 0.5 + 1e-9  # slope 1: rounding to the stored integer
    for a, b in zip(out.headers, src.headers):
        for tag in ("PatientName", "PatientID", "PatientSex", "StudyInstanceUID", "StudyDate", "AccessionNumber",
                    "FrameOfReferenceUID", "Modality", "SOPClassUID", "ImageOrientationPatient",
                    "PixelSpacing", "SliceThickness", "RescaleSlope", "RescaleIntercept", "BitsStored",
                    "PixelRepresentation"):
            assert a.get(tag) == b.get(tag), tag
        np.testing.assert_allclose(np.asarray(a.ImagePositionPatient, float), np.asarray(b.ImagePositionPatient, float))
        assert a.SeriesInstanceUID != b.SeriesInstanceUID and a.SOPInstanceUID != b.SOPInstanceUID
        assert list(a.ImageType) == ["DERIVED", "SECONDARY"]
        assert a.SeriesDescription == "invdiff test" and a.DerivationDescription == "unit test"
        assert a.SourceImageSequence[0].ReferencedSOPInstanceUID == b.SOPInstanceUID
        assert a.file_meta.MediaStorageSOPInstanceUID == a.SOPInstanceUID
        assert not any(el.tag.is_private for el in a)
    assert len({h.SeriesInstanceUID for h in out.headers}) == 1
    assert len({h.SOPInstanceUID for h in out.headers}) == 5


def test_values_clip_to_the_source_bit_depth(tmp_path):
    src = read_dicom(get_testdata_file("CT_small.dcm"))
    lo, hi, dtype = stored_range(src.headers[0])
    assert (lo, hi, dtype) == (-32768, 32767, np.dtype("<i2"))
    hu = np.full((1, 128, 128), 1e6)
    out = read_dicom(_write(tmp_path, hu, src.headers))
    assert out.values.max() == hi - 1024  # stored max with intercept -1024


def test_resampled_geometry_keeps_pixels_in_place(tmp_path):
    src = read_dicom(get_testdata_file("CT_small.dcm"))
    out = read_dicom(_write(tmp_path, np.zeros((1, 32, 64)), src.headers, factor=(4.0, 2.0)))
    a, b = out.headers[0], src.headers[0]
    assert (a.Rows, a.Columns) == (32, 64)
    np.testing.assert_allclose(np.asarray(a.PixelSpacing, float), np.asarray(b.PixelSpacing, float) * [4, 2], rtol=1e-6)
    # the new pixel (r, c) is the centre of the source block rows 4r..4r+3, columns 2c..2c+1
    for r, c in [(0, 0), (5, 7), (31, 63)]:
        block = np.mean([_pixel_centre(b, 4 * r + i, 2 * c + j) for i in range(4) for j in range(2)], axis=0)
        np.testing.assert_allclose(_pixel_centre(a, r, c), block, atol=1e-4)


def test_mr_without_rescale_round_trips_exactly(tmp_path):
    src = read_dicom(get_testdata_file("MR_small.dcm"))
    assert src.units == "stored" and src.modality == "MR"
    vm = src.value_map()
    assert vm.offset == 0 and vm.scale == pytest.approx(np.percentile(src.values, 99.5))
    back = vm.from_unit(vm.to_unit(src.values))
    out = read_dicom(_write(tmp_path, back[:, 0], src.headers))
    keep = src.values <= vm.scale  # values above the 99.5th percentile are clipped by the map
    np.testing.assert_array_equal(out.values[keep], src.values[keep])


def test_json_headers_round_trip():
    src = read_dicom(CT_SERIES)
    back = headers_from_json(headers_to_json(src.headers))
    for a, b in zip(back, src.headers):
        for tag in ("PatientName", "StudyInstanceUID", "SOPInstanceUID", "ImagePositionPatient", "RescaleIntercept"):
            assert a.get(tag) == b.get(tag)


def test_compressed_lossless_decodes_to_the_same_values():
    plain = read_dicom(get_testdata_file("MR_small.dcm")).values
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm"):
        np.testing.assert_array_equal(read_dicom(get_testdata_file(name)).values, plain)


def test_unsupported_transfer_syntax_names_the_plugins():
    path = DATA / "MR_small_jpeg_ls_lossless.dcm"
    with pytest.raises(RuntimeError) as err:
        read_dicom(path)
    msg = str(err.value)
    assert "\n" not in msg and "JPEG-LS" in msg and "pylibjpeg" in msg and str(path) in msg


@pytest.mark.parametrize("name", ["MR_truncated.dcm", "README.txt", "garbage.dcm", "empty.dcm"])
def test_corrupt_files_give_one_line_errors(tmp_path, name):
    if name in ("garbage.dcm", "empty.dcm"):
        path = tmp_path / name
        path.write_bytes(b"" if name == "empty.dcm" else b"\x00" * 128 + b"DICM" + b"\x07" * 50)
    else:
        path = DATA / name
    with pytest.raises(ValueError) as err:
        read_dicom(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_folder_with_two_series_is_refused(tmp_path):
    import shutil

    for p in list(CT_SERIES.iterdir())[:2]:
        shutil.copy(p, tmp_path / p.name)
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "ct.dcm")
    with pytest.raises(ValueError, match="2 series"):
        read_dicom(tmp_path)
    with pytest.raises(FileNotFoundError):
        read_dicom(tmp_path / "missing")


def test_value_map_inverse():
    vm = ValueMap(-1000.0, 2000.0, "HU")
    hu = np.linspace(-1000, 1000, 11)
    np.testing.assert_allclose(vm.from_unit(vm.to_unit(hu)), hu)
    assert vm.std_from_unit(0.01) == pytest.approx(20.0)
    with pytest.raises(ValueError):
        ValueMap(0.0, 0.0)
