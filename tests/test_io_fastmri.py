"""fastMRI k-space files: layout, masks, coil maps from the ACS region, measurements."""

import h5py
import numpy as np
import pytest
import torch

from invdiff.io import estimate_coil_maps, read_fastmri, write_fastmri
from invdiff.io.fastmri import acs_columns
from invdiff.operators import birdcage_coil_maps, cartesian_mask
from invdiff.apps.workflows import fastmri_measurement


def fft2c(x):
    """fastMRI's centred orthonormal FFT (fastmri.fft2c)."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(x, axes=(-2, -1)), norm="ortho"), axes=(-2, -1))


def _phantom(H, W, slices=2):
    yy, xx = np.meshgrid(np.linspace(-1, 1, H), np.linspace(-1, 1, W), indexing="ij")
    imgs = []
    for s in range(slices):
        img = (xx**2 / 0.7 + yy**2 / 0.9 < 0.8).astype(float) * (0.6 + 0.1 * s)
        img += 0.4 * ((xx - 0.2) ** 2 + (yy + 0.1) ** 2 < 0.05)
        imgs.append(img * np.exp(1j * 0.3 * xx))  # smooth phase, as in real scans
    return np.stack(imgs)


def _file(tmp_path, multicoil, H=24, W=20, accel=4, with_mask=True):
    imgs = _phantom(H, W)
    mask = cartesian_mask(H, W, accel, 0.2, generator=torch.Generator().manual_seed(0)).numpy()
    if multicoil:
        maps = birdcage_coil_maps(4, H, W).numpy()
        k = fft2c(imgs[:, None] * maps[None])
    else:
        maps, k = None, fft2c(imgs)
    k_meas = k * mask  # an undersampled acquisition: unsampled columns are 0
    path = tmp_path / ("multi.h5" if multicoil else "single.h5")
    write_fastmri(path, k_meas, mask[0] if with_mask else None, attrs={"acquisition": "CORPD_FBK"},
                  reconstructions={"reconstruction_rss" if multicoil else "reconstruction_esc": np.abs(imgs)})
    return path, imgs, mask, maps


@pytest.mark.parametrize("multicoil", [False, True])
def test_fastmri_file_loads_with_shapes_and_mask(tmp_path, multicoil):
    path, imgs, mask, _ = _file(tmp_path, multicoil)
    kd = read_fastmri(path)
    coils = 4 if multicoil else 1
    assert kd.shape == (2, coils, 24, 20) and kd.multicoil is multicoil
    np.testing.assert_array_equal(kd.mask, mask)
    assert kd.mask_source == "file" and kd.attrs["acquisition"] == "CORPD_FBK"
    np.testing.assert_allclose(kd.reference, np.abs(imgs), atol=1e-6)
    with h5py.File(path) as f:  # the raw layout a fastMRI file has
        assert f["kspace"].shape == ((2, 4, 24, 20) if multicoil else (2, 24, 20)) and f["mask"].shape == (20,)


def test_mask_read_off_the_data_when_absent(tmp_path):
    path, _, mask, _ = _file(tmp_path, True, with_mask=False)
    kd = read_fastmri(path)
    assert kd.mask_source == "data"
    np.testing.assert_array_equal(kd.mask, mask)


def test_coil_maps_from_acs_are_exact_for_smooth_coils():
    H, W = 32, 32
    maps = birdcage_coil_maps(4, H, W)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, H), torch.linspace(-1, 1, W), indexing="ij")
    obj = torch.exp(-(xx**2 + yy**2)) * torch.exp(1j * 0.4 * yy)
    k = torch.from_numpy(fft2c((maps * obj).numpy()))
    mask = cartesian_mask(H, W, 4, 0.2, generator=torch.Generator().manual_seed(1))
    lo, hi = acs_columns(mask.numpy())
    assert hi - lo >= 6 and lo <= W // 2 < hi and mask[:, lo:hi].all()
    est = estimate_coil_maps(k * mask, mask)
    np.testing.assert_allclose((est.abs() ** 2).sum(0).numpy(), 1.0, atol=1e-4)
    # the estimate is the true maps times the object's phase (absorbed): S_est * conj(S) summed is a unit phasor
    inner = (est * maps.conj()).sum(0)
    centre = (xx**2 + yy**2) < 0.5
    np.testing.assert_allclose(inner.abs()[centre].numpy(), 1.0, atol=0.05)
    with pytest.raises(ValueError, match="centre column"):
        estimate_coil_maps(k, torch.zeros(H, W))


@pytest.mark.parametrize("multicoil", [False, True])
def test_measurement_operator_reproduces_the_acquired_kspace(tmp_path, multicoil):
    path, imgs, mask, maps = _file(tmp_path, multicoil)
    m = fastmri_measurement(path, (2, 24, 20))  # complex images
    m.check()
    kd = read_fastmri(path)
    scale = m.value_map.scale
    assert m.task["name"] == "acquired-mri" and m.task["coil_maps"] == "acs-lowres"
    assert m.task["acceleration"] == pytest.approx(20 / mask[0].sum())
    assert m.y.shape == (2, 2, 4 if multicoil else 1, 24, 20)
    expected = torch.from_numpy(kd.kspace * mask / scale)
    torch.testing.assert_close(torch.complex(m.y[:, 0], m.y[:, 1]), expected.to(torch.complex64))
    # the estimated maps are normalised (sum_c |S_c|^2 = 1; one coil: a unit phasor)
    torch.testing.assert_close((m.coil_maps.abs() ** 2).sum(1), torch.ones(2, 24, 20), atol=1e-4, rtol=0)
    if multicoil:  # with the true maps in the file, A(x_true / scale) is the acquired k-space
        with h5py.File(path, "a") as f:
            f.create_dataset("sens_maps", data=np.broadcast_to(maps, (2, 4, 24, 20)))
        m = fastmri_measurement(path, (2, 24, 20))
        assert m.task["coil_maps"] == "file"
        x = torch.from_numpy(imgs / m.value_map.scale)
        for s in range(2):
            y = m.physics(s).A(torch.stack([x[s].real, x[s].imag])[None].float())
            torch.testing.assert_close(y, m.y[s : s + 1], atol=1e-5, rtol=1e-4)
    assert m.value_map.units == "intensity" and m.resample["method"] == "none"


def test_size_mismatch_needs_resize_and_crops_kspace(tmp_path):
    path, _, _, _ = _file(tmp_path, True)
    with pytest.raises(ValueError, match="--resize"):
        fastmri_measurement(path, (1, 16, 16))
    m = fastmri_measurement(path, (1, 16, 16), resize=True)
    assert m.y.shape == (2, 2, 4, 16, 16)
    assert m.resample["factor"] == [24 / 16, 20 / 16] and m.resample["method"] == "central k-space crop"
    assert torch.equal(m.mask[:, 8], torch.ones(16))  # the DC column stays at W // 2
    with pytest.raises(ValueError, match="smaller"):
        fastmri_measurement(path, (1, 32, 32), resize=True)


def test_bad_fastmri_files(tmp_path):
    real = tmp_path / "real.h5"
    with h5py.File(real, "w") as f:
        f.create_dataset("kspace", data=np.zeros((1, 8, 8), np.float32))
    with pytest.raises(ValueError, match="complex"):
        read_fastmri(real)
    nok = tmp_path / "nok.h5"
    with h5py.File(nok, "w") as f:
        f.create_dataset("image", data=np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="no 'kspace'"):
        read_fastmri(nok)
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match="not a readable HDF5"):
        read_fastmri(junk)
    mask = tmp_path / "mask.h5"
    write_fastmri(mask, np.ones((1, 8, 8), np.complex64), np.ones(6, bool))
    with pytest.raises(ValueError, match="columns"):
        read_fastmri(mask)
