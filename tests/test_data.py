"""Built-in data: the CT phantom generator and the MNI152 slices (train / held-out split)."""

import numpy as np
import pytest
import torch

from invdiff.data import heldout, mni, phantoms, training


def test_phantoms_are_seeded_deterministic_and_index_stable():
    a = phantoms.ct(3, size=32, generator=7)
    assert a.shape == (3, 1, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, phantoms.ct(3, size=32, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(a[2], phantoms.ct(1, size=32, generator=7, start=2)[0])  # slice k depends on (seed, k) only
    b = phantoms.ct(3, size=32, generator=8)
    assert not torch.equal(a, b)
    # no two slices alike
    d = torch.cdist(a.flatten(1), a.flatten(1)) + torch.eye(3) * 1e9
    assert d.min() > 1.0


def test_phantom_anatomy_in_hounsfield_units():
    rng = np.random.default_rng(0)
    for _ in range(4):
        hu = phantoms.ct_hu(64, rng)
        assert hu.min() >= -1000 and hu.max() <= 1100
        assert np.allclose(hu[:2, :2], -1000)  # air outside the body
        body = hu > -950
        assert 0.25 < body.mean() < 0.85
        assert ((hu > 500) & body).sum() > 10  # bone: vertebra, ribs
        assert ((hu > -150) & (hu < -60)).sum() > 20  # subcutaneous fat layer
        assert ((hu > 20) & (hu < 90)).sum() > 200  # soft tissue
    x = phantoms.ct(1, 32, 0)
    assert x.min() >= 0 and x.max() <= 1
    assert torch.allclose(phantoms.hu_to_unit(torch.tensor([-1000.0, 0.0, 1000.0])), torch.tensor([0.0, 0.5, 1.0]))


def test_heldout_phantoms_are_a_disjoint_stream():
    held = heldout("ct-phantom", 8, size=32)
    train = training("ct-phantom", 64, size=32)
    assert torch.equal(held, heldout("ct-phantom", 8, size=32))
    assert torch.cdist(held.flatten(1), train.flatten(1)).min() > 1.0


def test_mni_heldout_slices_are_disjoint_from_training_with_guard_band():
    pytest.importorskip("nilearn")
    train_idx, held_idx = mni.slice_indices("train"), mni.slice_indices("heldout")
    n_sag = mni.load_template().shape[0]
    for orient in mni.ORIENTATIONS:
        held = np.asarray(held_idx[orient])
        if orient == "sagittal":  # the template is symmetric: mirrors count as duplicates
            held = np.concatenate([held, n_sag - 1 - held])
        dist = np.abs(np.asarray(train_idx[orient])[:, None] - held[None]).min(1)
        assert dist.min() > mni.GUARD, orient
        assert len(train_idx[orient]) > 40
    held_img = heldout("mri-brain", 16, size=32)
    train_img = training("mri-brain", size=32)
    assert held_img.shape == (16, 1, 32, 32) and len(train_img) > 200
    assert 0 <= held_img.min() and held_img.max() <= 1
    both = torch.cat([train_img, train_img.flip(-1)]).flatten(1)
    assert torch.cdist(held_img.flatten(1), both).min() > 0.5  # no near-copy, even flipped
    with pytest.raises(ValueError, match="16 held-out slices"):
        heldout("mri-brain", 17)
    with pytest.raises(ValueError, match="unknown dataset"):
        heldout("xray", 2)


def test_shipped_mni_heldout_slices_equal_the_template():
    """``mni_heldout.npz`` is exactly what :func:`mni.heldout_from_template` computes from
    nilearn's template (uint8 voxels and scale), so shipped and template slices agree bit for bit."""
    pytest.importorskip("nilearn")
    expected = mni.heldout_from_template()
    with np.load(mni.HELDOUT_FILE, allow_pickle=False) as shipped:
        assert sorted(shipped.files) == sorted(expected)
        for key, value in expected.items():
            assert shipped[key].dtype == value.dtype and np.array_equal(shipped[key], value), key
    vol = mni.load_template()
    rendered = np.stack([mni._render(np.moveaxis(vol, mni._AXIS[o], 0)[i], 48)
                         for o in mni.ORIENTATIONS for i in mni.HELDOUT[o]])
    assert np.array_equal(mni.slices("heldout", 48)[:, 0].numpy(), rendered)


@pytest.fixture
def without_extras(monkeypatch):
    """Make the optional extras (nibabel, nilearn) unimportable, as on a plain install."""
    import sys

    for name in list(sys.modules):
        if name.split(".")[0] in ("nibabel", "nilearn"):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nibabel", None)
    monkeypatch.setitem(sys.modules, "nilearn", None)
    mni._raw_template.cache_clear()
    mni.load_template.cache_clear()
    yield
    mni._raw_template.cache_clear()
    mni.load_template.cache_clear()


def test_heldout_brain_slices_need_no_extra(without_extras):
    x = heldout("mri-brain", 16, size=40)
    assert x.shape == (16, 1, 40, 40) and 0 <= x.min() and 0.9 < x.max() <= 1.0
    assert torch.cdist(x.flatten(1), x.flatten(1)).add(torch.eye(16) * 1e9).min() > 0.5  # 16 distinct slices
    with pytest.raises(ImportError, match=r"pip install 'invdiff\[train\]'"):
        training("mri-brain", size=32)


def test_cli_names_the_extra_in_one_line(without_extras, tmp_path, capsys):
    from invdiff.cli import main

    rc = main(["train", "--data", "mri-brain", "--out", str(tmp_path / "p.safetensors"), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert "invdiff[train]" in err and "Traceback" not in err


def test_blur_kernels_are_seeded_normalised_and_cover_three_families():
    from invdiff.operators import kernels as K

    k = K.kernels(9, 16, seed=0, stream=0)
    assert k.shape == (9, 1, 16, 16)
    assert torch.equal(k, K.kernels(9, 16, seed=0, stream=0))
    assert not torch.equal(k, K.kernels(9, 16, seed=0, stream=1))
    assert (k >= 0).all() and torch.allclose(k.sum((-2, -1)), torch.ones(9, 1), atol=1e-6)
    # the families are interleaved: a Gaussian kernel is smooth and symmetric under a half turn
    g = k[2::3, 0]
    assert torch.allclose(g, g.flip(-1).flip(-2), atol=1e-5)
    motion = k[0::3, 0]  # camera-shake trajectories are not point-symmetric
    assert (motion - motion.flip(-1).flip(-2)).abs().amax() > 1e-2
    # image <-> kernel round trip
    img = K.to_image(k)
    assert torch.allclose(img.amax((-2, -1)), torch.ones(9, 1))
    assert torch.allclose(K.to_kernel(img), k, atol=1e-6)
    with pytest.raises(ValueError, match="unknown kernel families"):
        K.kernels(3, families=("box",))


def test_blur_kernel_pools_are_disjoint_streams():
    from invdiff.data import heldout, training

    train, held = training("blur-kernels", 6, size=16), heldout("blur-kernels", 6, size=16)
    assert train.shape == held.shape == (6, 1, 16, 16)
    assert float(train.amax()) == pytest.approx(1.0) and float(train.amin()) >= 0
    assert (train[:, None] - held[None]).abs().flatten(2).amax(-1).min() > 1e-3
