"""Measurement files: the operator record and seed rebuild the exact measurement; bad files are refused."""

from pathlib import Path

import h5py
import json
import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from invdiff import operators
from invdiff.io import load_measurement, read, save_measurement, write_fastmri
from invdiff.operators import birdcage_coil_maps
from invdiff.apps.workflows import simulate

CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"


@pytest.fixture(scope="module")
def ct_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("meas") / "ct.h5"
    m, x = simulate(CT_SERIES, "ct-sparse-20", seed=5, noise_sigma=0.02, params={"fbp_filter": "hann"})
    save_measurement(path, m)
    return path, m, x


def test_record_rebuilds_the_exact_measurement(ct_file):
    path, m, x = ct_file
    loaded = load_measurement(path)
    assert torch.equal(loaded.y, m.y) and loaded.y.shape == (5, 1, *m.y.shape[2:])
    assert loaded.task == m.task and loaded.task["fbp_filter"] == "hann" and loaded.task["noise_sigma"] == 0.02
    assert loaded.noise_seed == 5 and loaded.value_map == m.value_map
    physics = operators.make(**loaded.task)
    torch.testing.assert_close(physics(x, seed=loaded.noise_seed), loaded.y, rtol=0, atol=0)
    assert [h.SOPInstanceUID for h in loaded.headers] == [h.SOPInstanceUID for h in read(CT_SERIES).headers]
    assert loaded.source["identifiers"] == ["3353", "3023", "2693", "2392", "2062"]
    assert loaded.resample == {"factor": [1.0, 1.0], "source_shape": [16, 16], "shape": [16, 16], "method": "none"}
    with h5py.File(path) as f:
        assert "x" not in f and set(f) == {"y", "dicom_headers"}  # no ground truth in the file


def test_resampled_and_multicoil_records(tmp_path):
    maps = birdcage_coil_maps(3, 8, 8)
    m, x = simulate(get_testdata_file("MR_small.dcm"), "mri-multicoil-4x", size=8, seed=2,
                    params={"coil_maps": maps, "mask_type": "equispaced"})
    assert x.shape == (1, 1, 8, 8) and m.resample["factor"] == [8.0, 8.0] and m.task["coil_maps"] == "user"
    save_measurement(tmp_path / "mr.h5", m)
    loaded = load_measurement(tmp_path / "mr.h5")
    physics = loaded.physics(0)
    torch.testing.assert_close(physics.coil_maps[0], maps)
    torch.testing.assert_close(physics(x, seed=2), loaded.y, rtol=0, atol=0)


def _copy_with(src, dst, attrs=None, y=None, drop=()):
    with h5py.File(src) as f, h5py.File(dst, "w") as g:
        for key in f:
            if key not in drop and not (key == "y" and y is not None):
                f.copy(key, g)
        for key, value in f.attrs.items():
            if key not in drop:
                g.attrs[key] = value
        for key, value in (attrs or {}).items():
            g.attrs[key] = value
        if y is not None:
            g.create_dataset("y", data=y)
    return dst


def test_mismatched_records_are_refused(ct_file, tmp_path):
    path, m, _ = ct_file
    task = dict(m.task, img_size=[1, 20, 20])
    bad = _copy_with(path, tmp_path / "size.h5", attrs={"task": json.dumps(task)})
    with pytest.raises(ValueError, match="do not match"):
        load_measurement(bad)
    bad = _copy_with(path, tmp_path / "views.h5", attrs={"task": json.dumps(dict(m.task, name="ct-sparse-30"))})
    with pytest.raises(ValueError, match="do not match"):
        load_measurement(bad)
    bad = _copy_with(path, tmp_path / "y.h5", y=np.zeros((4, 1, 23, 20), np.float32))
    with pytest.raises(ValueError, match="dicom_headers for 4"):
        load_measurement(bad)
    bad = _copy_with(path, tmp_path / "notask.h5", drop=("task",))
    with pytest.raises(ValueError, match="lacks the 'task'"):
        load_measurement(bad)
    bad = _copy_with(path, tmp_path / "json.h5", attrs={"task": "{not json"})
    with pytest.raises(ValueError, match="not valid JSON"):
        load_measurement(bad)
    bad = _copy_with(path, tmp_path / "unknown.h5", attrs={"task": json.dumps(dict(m.task, name="ct-spiral-3"))})
    with pytest.raises(ValueError, match="cannot rebuild the operator"):
        load_measurement(bad)


def test_other_files_are_refused(ct_file, tmp_path):
    path, m, _ = ct_file
    (tmp_path / "junk.h5").write_bytes(b"\x89HDF junk")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        load_measurement(tmp_path / "junk.h5")
    write_fastmri(tmp_path / "k.h5", np.ones((1, 8, 8), np.complex64))
    with pytest.raises(ValueError, match="fastMRI"):
        load_measurement(tmp_path / "k.h5")
    with pytest.raises(FileNotFoundError):
        load_measurement(tmp_path / "missing.h5")
    with pytest.raises(FileExistsError):
        save_measurement(path, m)
    save_measurement(path, m, overwrite=True)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ct.h5"]  # no temporary left behind
