"""Resolution is a property of the data: patch priors at any size, fixed-size priors' errors.

* :class:`~invdiff.priors.PatchDiffusionPrior`: stitching is exact for an identity denoiser,
  the positional channels are the pixels' image coordinates, the random offsets come from the
  caller's generator only, one patch covering the image is the wrapped prior exactly;
* every registered sampler runs at odd and non-square sizes with a patch prior (shape from the
  operator), reproducibly, and beats the operator's own baseline;
* fixed-size priors keep a one-line size error; a fully convolutional one runs off its size on
  request, with a warning;
* patch training: crops, positions and the padding mask; save / load round trip.
"""

import warnings

import pytest
import torch
from torch import nn

from invdiff import operators, priors, samplers
from invdiff.priors import GaussianPrior, PatchDiffusionPrior, WholeImageDenoiser
from invdiff.priors.patch import positions


class Identity(nn.Module):
    pad_value = 0.0

    def forward(self, x, sigma, pos):
        return x


class Position(nn.Module):
    """Returns the x (column) positional channel: shows where the network thinks each pixel is."""

    pad_value = 0.0

    def forward(self, x, sigma, pos):
        return pos[:, :1].expand_as(x).clone()


class Seams(nn.Module):
    """Depends on where a pixel sits inside its patch: exposes the patch grid (and its offset)."""

    pad_value = 0.0

    def forward(self, x, sigma, pos):
        p = x.shape[-1]
        ramp = torch.arange(p, dtype=x.dtype) / p
        return x + ramp[None, None, None, :]


SIZES = [(1, 13, 10), (1, 9, 17), (1, 5, 6), (1, 24, 16)]


@pytest.mark.parametrize("mode", ["random", "tiles"])
@pytest.mark.parametrize("shape", SIZES)
def test_stitching_is_exact_for_identity(mode, shape):
    prior = PatchDiffusionPrior(Identity(), 1, 8, mode=mode, max_patches=5)
    x = torch.rand(3, *shape)
    out = prior.denoise(x, 0.3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x, atol=1e-6, rtol=0)


@pytest.mark.parametrize("mode", ["random", "tiles"])
def test_positions_are_image_coordinates(mode):
    prior = PatchDiffusionPrior(Position(), 1, 8, mode=mode)
    out = prior.denoise(torch.rand(2, 1, 11, 19), 0.2, generator=torch.Generator().manual_seed(3))
    expected = (2 * (torch.arange(19) + 0.5) / 19 - 1).expand(2, 1, 11, 19)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the positions helper itself: rows/cols outside the image lie outside [-1, 1]
    pos = positions(torch.tensor([[-1, 0, 4]]), torch.tensor([[0, 9]]), 5, 10)
    assert pos.shape == (1, 2, 3, 2)
    assert pos[0, 1, 0, 0] < -1 and pos[0, 1, 2, 0] == pytest.approx(0.8) and pos[0, 0, 0, 1] == pytest.approx(0.9)


def test_random_offsets_come_from_the_generator_only():
    prior = PatchDiffusionPrior(Seams(), 1, 8, mode="random")
    x = torch.rand(2, 1, 20, 14)
    state = torch.get_rng_state()
    a = prior.denoise(x, 0.3, generator=torch.Generator().manual_seed(5))
    b = prior.denoise(x, 0.3, generator=torch.Generator().manual_seed(5))
    c = prior.denoise(x, 0.3, generator=torch.Generator().manual_seed(6))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another seed moves the patch grid
    # one generator per image: image k depends only on its own generator
    gens = [torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]
    both = prior.denoise(x, 0.3, generator=gens)
    alone = prior.denoise(x[1:], 0.3, generator=[torch.Generator().manual_seed(9)])
    assert torch.equal(both[1:], alone)
    # tiles: deterministic whatever the generator
    tiles = prior.with_mode("tiles")
    assert torch.equal(tiles.denoise(x, 0.3, generator=torch.Generator().manual_seed(5)),
                       tiles.denoise(x, 0.3, generator=torch.Generator().manual_seed(6)))


def test_one_patch_covering_the_image_is_the_wrapped_prior():
    whole = GaussianPrior.stationary((1, 12, 12), length_scale=2.0, variance=0.02, mean=0.5)
    prior = PatchDiffusionPrior(WholeImageDenoiser(whole, 0.5), 1, 12, mode="tiles")
    x = torch.rand(3, 1, 12, 12)
    for sigma in (0.05, 0.5, torch.tensor([0.1, 0.2, 0.3])):
        torch.testing.assert_close(prior.denoise(x, sigma), whole.denoise(x, sigma), atol=1e-6, rtol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        PatchDiffusionPrior(Identity(), 1, 8, mode="spiral")
    with pytest.raises(ValueError, match="overlap"):
        PatchDiffusionPrior(Identity(), 1, 8, mode="tiles", overlap=8)
    with pytest.raises(ValueError, match="channel"):
        PatchDiffusionPrior(Identity(), 1, 8).denoise(torch.rand(1, 3, 9, 9), 0.1)


# --- the any-size contract over every sampler ------------------------------------------------

@pytest.fixture(scope="module")
def patch_prior():
    patch = GaussianPrior.stationary((1, 8, 8), length_scale=2.0, variance=0.02, mean=0.5)
    return PatchDiffusionPrior(WholeImageDenoiser(patch, 0.5), 1, 8, mode="random", sigma_max=patch.sigma_max,
                               sigma_min=patch.sigma_min, sigma_data=patch.sigma_data)


@pytest.mark.parametrize("shape", [(1, 13, 10), (1, 9, 17)])
@pytest.mark.parametrize("name", samplers.available())
def test_every_sampler_at_any_size(name, shape, patch_prior):
    truth = GaussianPrior.stationary(shape, length_scale=2.0, variance=0.02, mean=0.5).sample(
        2, torch.Generator().manual_seed(0)).float().clamp(0, 1)
    options = {}
    if samplers.get(name).handles_blind:  # BlindDPS: blind deblurring at that size, an analytic kernel prior
        physics = operators.make("deblur-blind", img_size=shape, noise_sigma=0.02)
        k = physics.kernel_size
        y = physics(truth, seed=1)
        options["kernel_prior"] = GaussianPrior(1 / k, 0.01, image_shape=(1, k, k))
    else:
        physics = operators.make("inpaint-random-50", img_size=shape, noise_sigma=0.02)
        clean = physics.A(truth)
        y = clean + 0.02 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(1))
    # BlindDPS: 50 steps (its default is 500); at 12 the two chains have not met the data (MSE 1.1-1.8x Wiener's)
    steps = 50 if samplers.get(name).handles_blind else 12
    sampler = samplers.make(name, patch_prior, steps=steps, **options)
    out = sampler(y, physics, generator=torch.Generator().manual_seed(2))
    assert out.shape == truth.shape and torch.isfinite(out).all()
    assert sampler.image_shape == shape
    again = sampler(y, physics, generator=torch.Generator().manual_seed(2))
    assert torch.equal(out, again)
    mse = (out.clamp(0, 1) - truth).square().mean()
    baseline = (physics.A_dagger(y).clamp(0, 1) - truth).square().mean()
    # blind: the kernel unknown too, against Wiener with a Gaussian guess (measured 0.21x at both sizes)
    factor = 0.8 if samplers.get(name).handles_blind else 0.5
    assert mse < factor * baseline, (name, float(mse), float(baseline))


def test_shape_from_the_adjoint_when_the_operator_has_no_img_size(patch_prior):
    import deepinv as dinv

    kernel = torch.tensor([[[[0.25, 0.5, 0.25]]]])
    blur = lambda x: torch.nn.functional.conv2d(x, kernel, padding=(0, 1))  # noqa: E731 (symmetric: self-adjoint)
    physics = dinv.physics.LinearPhysics(A=blur, A_adjoint=blur)
    assert getattr(physics, "img_size", None) is None
    y = physics.A(torch.full((1, 1, 11, 14), 0.5))
    sampler = samplers.make("dds", patch_prior, steps=4)
    assert sampler(y, physics, generator=torch.Generator().manual_seed(0)).shape == (1, 1, 11, 14)


# --- fixed-size priors -----------------------------------------------------------------------

def test_fixed_size_prior_size_error():
    prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0)
    physics = operators.make("deblur-gauss", img_size=(1, 12, 12))
    y = physics.A(torch.rand(1, 1, 12, 12))
    with pytest.raises(ValueError, match=r"^dps: this prior is fixed-size 8x8, the images are 12x12") as err:
        samplers.make("dps", prior, steps=3)(y, physics)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="not fully convolutional"):
        prior.at_any_size()
    with pytest.raises(ValueError, match="fixed-size"):
        prior.denoise(torch.rand(1, 1, 12, 12), 0.1)


def test_fully_convolutional_prior_off_its_size_on_request():
    from invdiff.priors import EDMPrior, GuidedDiffusionUNet, small_unet_config

    torch.manual_seed(0)
    prior = EDMPrior(GuidedDiffusionUNet(small_unet_config(16)), (1, 16, 16), 0.3, 0.4, patch=2).eval()
    x = torch.rand(1, 1, 32, 24)
    with pytest.raises(ValueError, match=r"prior\.at_any_size\(\)"):
        prior.denoise(x, 0.5)
    with pytest.warns(UserWarning, match="trained at 16x16"):
        prior.at_any_size()
    assert prior.denoise(x, 0.5).shape == x.shape
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.at_any_size()  # already any size: no second warning


# --- training and files ----------------------------------------------------------------------

def test_patch_batch_positions_and_padding():
    from invdiff.train.edm import TrainConfig, patch_batch

    config = TrainConfig(data="x", size=40, patch=32, batch=6, patch_mix=(1.0, 0.0, 0.0))
    pool = [torch.rand(1, 40, 40), torch.rand(1, 24, 36)]
    x0, pos, inside = patch_batch(pool, config, torch.Generator().manual_seed(0))
    assert x0.shape == (6, 1, 32, 32) and pos.shape == (6, 2, 32, 32) and inside.shape == (6, 1, 32, 32)
    for k in range(6):
        img = pool[0] if abs(pos[k, 0].max() - pos[k, 0].min() - 2 * 31 / 40) < 1e-5 else pool[1]
        h, w = img.shape[-2:]
        rows = ((pos[k, 1, :, 0] + 1) * h / 2 - 0.5).round().long()
        cols = ((pos[k, 0, 0, :] + 1) * w / 2 - 0.5).round().long()
        ok = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None]
        assert torch.equal(inside[k, 0] > 0, ok)
        r, c = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
        torch.testing.assert_close(x0[k, 0][ok], img[0][r][:, c][ok])
        assert (x0[k, 0][~ok] == 0).all()
    with pytest.raises(ValueError, match="multiple of 32"):
        TrainConfig(patch=48)
    with pytest.raises(ValueError, match="flips"):
        TrainConfig(patch=32, augment=("rot90",))


def test_train_save_load_a_patch_prior(tmp_path):
    from invdiff.train.edm import TrainConfig, train

    config = TrainConfig(data="x", size=48, patch=32, batch=2, steps=3, width=32, augment=("hflip", "vflip"))
    images = torch.rand(4, 1, 48, 40)
    result = train(config, tmp_path / "p.safetensors", images=images, progress=False)
    assert result.card["patch_size"] == 32 and result.card["trained_sizes"] == [48]
    from invdiff.files import umask

    # a weights file gets the usual mode (safetensors writes its file private; atomic_file fixes it)
    assert (tmp_path / "p.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask()
    loaded = priors.load(tmp_path / "p.safetensors")
    assert isinstance(loaded, PatchDiffusionPrior) and loaded.any_size and loaded.patch_size == 32
    x = torch.rand(2, 1, 37, 29)
    a = result.prior.denoise(x, 0.4, generator=torch.Generator().manual_seed(0))
    b = loaded.denoise(x, 0.4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(a, b)
    # resume continues the same run
    more = train(TrainConfig(**{**config.to_dict(), "steps": 4}), tmp_path / "p.safetensors", images=images,
                 progress=False, resume=True)
    assert more.card["steps"] == 4


def test_randomised_brain_slices():
    pytest.importorskip("nilearn")
    from invdiff.data import mni

    a, b = mni.randomised(3, 48, seed=1), mni.randomised(3, 48, seed=1)
    assert torch.equal(a, b) and a.shape == (3, 1, 48, 48)
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    assert not torch.equal(a[0], a[1])
    assert (a.flatten(1) > 0.05).float().mean(1).min() > 0.02  # some tissue in every slice


# --- workflows at native size ----------------------------------------------------------------

@pytest.fixture(scope="module")
def patch_prior_path(tmp_path_factory):
    """A patch prior file (32x32 patches, random-ish weights: a 2-step training run)."""
    from invdiff.train.edm import TrainConfig, train

    path = tmp_path_factory.mktemp("patch") / "patch32.safetensors"
    config = TrainConfig(data="x", size=64, patch=32, batch=2, steps=2, width=32)
    train(config, path, images=torch.rand(2, 1, 64, 64), progress=False)
    return str(path)


def test_reconstruct_a_real_scan_at_its_own_size(patch_prior_path, tmp_path, capsys):
    import json

    import pydicom
    from pydicom.data import get_testdata_file

    from invdiff.cli import main
    from invdiff.io import read_dicom

    src = get_testdata_file("CT_small.dcm")
    out = tmp_path / "r"
    args = ["reconstruct", "--input", src, "--task", "ct-sparse-30", "--prior", patch_prior_path, "--out", str(out),
            "--sampler", "dds:cg_iterations=2", "--steps", "2", "-q"]
    assert main(args + ["--resize"]) == 1  # --resize is for fixed-size priors
    assert "works at any size" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0
    assert "128x128" in capsys.readouterr().out
    a, b = read_dicom(out / "mean").headers[0], pydicom.dcmread(src)
    assert (a.Rows, a.Columns) == (128, 128)
    np = pytest.importorskip("numpy")
    np.testing.assert_allclose(np.asarray(a.PixelSpacing, float), np.asarray(b.PixelSpacing, float))
    np.testing.assert_allclose(np.asarray(a.ImagePositionPatient, float), np.asarray(b.ImagePositionPatient, float))
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["measurement"]["resample"]["method"] == "none"
    assert prov["measurement"]["resample"]["factor"] == [1.0, 1.0]


def test_bench_grid_at_any_size(patch_prior_path, tmp_path):
    from invdiff.bench.runner import run

    result = run("inpaint-random-50", "baseline,dds:cg_iterations=2", patch_prior_path, images="ct-phantom",
                 n_images=1, steps=2, size="40x48", out=tmp_path / "b", progress=False, lpips=False)
    rows = [r for r in result.rows if r["status"] == "ok"]
    assert len(rows) == 2 and all(r["task_params"]["img_size"] == [1, 40, 48] for r in rows)
    with pytest.raises(ValueError, match="fixed-size"):
        run("inpaint-random-50", "baseline", "gaussian-16", size=24, out=tmp_path / "c", progress=False)


def test_compare_resolutions_scores_three_paths():
    from invdiff.apps.native import compare_resolutions

    local = GaussianPrior.stationary((1, 8, 8), length_scale=2.0, variance=0.02, mean=0.5)
    patch = PatchDiffusionPrior(WholeImageDenoiser(local, 0.5), 1, 8, sigma_max=local.sigma_max,
                                sigma_min=local.sigma_min, sigma_data=local.sigma_data)
    small = GaussianPrior.stationary((1, 8, 8), length_scale=1.0, variance=0.02, mean=0.5)
    truth = GaussianPrior.stationary((1, 16, 16), length_scale=2.0, variance=0.02, mean=0.5).sample(
        2, torch.Generator().manual_seed(0)).float().clamp(0, 1)
    rows, images = compare_resolutions(truth, "inpaint-random-50", patch, small, "dds", steps=8, noise_sigma=0.02)
    by = {r["method"]: r for r in rows}
    assert set(by) == {"baseline", "resize", "native"}
    assert by["resize"]["reconstructed_at"] == "8x8" and by["native"]["reconstructed_at"] == "16x16"
    assert all(img.shape == truth.shape for img in images.values())
    # the prior at native size sees the real measurement; the resize path loses the fine scale
    assert by["native"]["psnr"] > by["baseline"]["psnr"] + 3 and by["native"]["psnr"] > by["resize"]["psnr"]


def test_reconstruct_any_size_with_a_fully_convolutional_prior(tmp_path, capsys):
    from pydicom.data import get_testdata_file

    from invdiff.cli import main
    from invdiff.io import read_dicom
    from invdiff.priors import ADMConfig, ADMPrior, GuidedDiffusionUNet, save

    cfg = ADMConfig(image_size=16, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult="1,2",
                    attention_resolutions="8", num_head_channels=32, learn_sigma=True)
    path = tmp_path / "adm16.safetensors"
    save(ADMPrior(GuidedDiffusionUNet(cfg).eval()), path)
    args = ["reconstruct", "--input", get_testdata_file("CT_small.dcm"), "--task", "ct-sparse-30", "--prior", str(path),
            "--sampler", "dds:cg_iterations=2", "--steps", "2", "-q"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 1
    assert "pass --resize" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b"), "--any-size"]) == 0
    assert "trained at 16x16" in capsys.readouterr().err
    header = read_dicom(tmp_path / "b" / "mean").headers[0]
    assert (header.Rows, header.Columns) == (128, 128)
