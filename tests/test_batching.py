"""Batches of images with one generator each give the images' own results.

* every registered sampler: a batch of 3 measurements with 3 generators (a list, one per
  image; and ``sample(n=2)``, 2 samples of each) equals the 3 images run one by one, each
  with its own generator. **Bit-identical** on the CPU: every step that reduces over an image
  (norms, CG inner products, the start's choice, particles' resampling, EnKG's ensembles)
  works per image and in a layout-independent order (``steps.linalg.row_sums``). A sampler
  that cannot promise it says why in ``batch_coupling`` (ReSample: the decoder's Jacobian
  norm is the largest over the batch) and ``reconstruct`` runs it one slice per call;
* ``reconstruct(batch=B)`` equals ``batch=1`` on a real 5-slice CT series with a U-Net prior
  (random weights), samples and std included, ``batch="auto"`` too: within 1e-5 (absolute,
  on [0, 1] images), because the U-Net itself is not bit-identical across batch sizes on the
  CPU (its convolutions block the batch differently: 3e-6 measured on one call), while the
  operator's ``A_dagger`` baseline is bit-identical;
* the bench: a group of cells (one prior, task and sampler; several images) batched through
  the sampler gives the one-by-one rows (``bench.run(batch=...)``);
* ``torchrun`` sharding: two gloo processes (spawned) give the one-process result bit for bit
  (the same slices one per call, one thread in every process);
* the process group helpers (``invdiff.bench.distributed``) in one process;
* CUDA: the automatic batch from the free memory (skipped without CUDA).
"""

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file

from invdiff import operators, samplers
from invdiff.apps.workflows import parse_batch, reconstruct, simulate
from invdiff.bench.distributed import ProcessGroup, init_distributed
from invdiff.io import read
from invdiff.priors import (ADMConfig, ADMPrior, GaussianPrior, GuidedDiffusionUNet, LatentDiffusionPrior,
                            LinearAutoencoder)

SHAPE = (1, 16, 16)
LATENT_SHAPE = (1, 8, 8)
CT_SERIES = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests" / "98892001" / "CT5N"
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def priors():
    pixel = GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.02, mean=0.5)
    latent = LatentDiffusionPrior(LinearAutoencoder.upsampling(LATENT_SHAPE, 2, bias=0.5),
                                  GaussianPrior.stationary(LATENT_SHAPE, length_scale=1.0, variance=0.02, mean=0.0))
    return {"pixel": pixel, "latent": latent}


#: Smaller inner loops for the test's speed (the steps they repeat are the same per image).
LIGHT = {"enkg": {"ensemble_size": 8, "max_batch": 4}, "smc": {"particles": 4, "max_batch": 8},
         "pnpdm": {"diffusion_steps": 10, "langevin_steps": 10, "cg_iterations": 10}}


def _task(name: str) -> str:
    """CT (CG on an ill-conditioned operator) where the sampler takes it, else inpainting (SVD
    samplers) or blind deblurring (a blind sampler)."""
    cls = samplers.get(name)
    if getattr(cls, "handles_blind", False):
        return "deblur-blind"
    return "inpaint-random-70" if cls.needs_svd else "ct-sparse-30"


def _build(name, priors):
    extra = {}
    if getattr(samplers.get(name), "handles_blind", False):  # an analytic kernel prior of the task's kernel size
        k = operators.make("deblur-blind", img_size=SHAPE, seed=0).kernel_size
        extra["kernel_prior"] = GaussianPrior.stationary((1, k, k), length_scale=1.0, variance=0.01, mean=1 / k**2)
    extra.update(LIGHT.get(name, {}))
    try:
        return samplers.make(name, priors[samplers.get(name).prior_kind], steps=4, **extra)
    except (OSError, ValueError) as err:  # a sampler whose own shipped parts are missing here
        pytest.skip(f"{name} cannot be built here: {err}")


@pytest.mark.parametrize("name", samplers.available())
def test_batch_equals_one_by_one(name, priors):
    sampler = _build(name, priors)
    if sampler.batch_coupling:  # declared coupled: reconstruct runs it one slice per call (tested below)
        assert isinstance(sampler.batch_coupling, str) and "batch" in sampler.batch_coupling
        return
    physics = operators.make(_task(name), img_size=SHAPE, seed=0)
    truth = priors["pixel"].sample(3, torch.Generator().manual_seed(0)).float().clamp(0, 1)
    y = physics(truth, seed=1)
    for n in (1, 2):
        alone = torch.cat([sampler.sample(y[k : k + 1], physics, n=n,
                                          generator=torch.Generator().manual_seed(10 + k)).samples
                           for k in range(3)], 1)
        together = sampler.sample(y, physics, n=n,
                                  generator=[torch.Generator().manual_seed(10 + k) for k in range(3)]).samples
        assert together.shape == alone.shape == (n, 3, *SHAPE)
        assert torch.equal(together, alone), (name, n, float((together - alone).abs().max()))
    # not a vacuous equality: other generators give other samples
    other = sampler.sample(y, physics, n=1, generator=[torch.Generator().manual_seed(20 + k) for k in range(3)])
    assert not torch.equal(other.samples, together[:1])


def test_generator_list_layout():
    """A list of G generators for n * G rows: generator j draws image j's n rows (rows s * G + j)
    as one block, what it draws alone; image-major with ``interleave`` (EnKG)."""
    from invdiff.samplers.steps import randn_like

    like = torch.zeros(6, 2, 3)
    out = randn_like(like, [torch.Generator().manual_seed(k) for k in range(3)])
    for j in range(3):
        assert torch.equal(out[j::3], torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(j)))
    inter = randn_like(like, [torch.Generator().manual_seed(k) for k in range(3)], interleave=True)
    for j in range(3):
        assert torch.equal(inter[2 * j : 2 * j + 2], torch.randn(2, 2, 3, generator=torch.Generator().manual_seed(j)))
    with pytest.raises(ValueError, match="got 4 generators for a batch of 6"):
        randn_like(like, [torch.Generator()] * 4)


def test_cg_element_is_independent_of_its_batch():
    """CG on sparse-view CT: each element's solution is the one it gets alone (bit for bit),
    also when the elements converge at different iterations (frozen, not iterated on)."""
    from invdiff.samplers.steps import conjugate_gradient

    physics = operators.make("ct-sparse-30", img_size=SHAPE, seed=0)
    x = torch.rand(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    x[1] = 0.0  # converged at once

    def apply(v):
        return physics.A_adjoint(physics.A(v))

    b = apply(x)  # a transposed (strided) operator output, as in the samplers
    for tol in (0.0, 1e-3):
        alone = torch.cat([conjugate_gradient(apply, b[k : k + 1], iterations=8, tol=tol) for k in range(3)])
        assert torch.equal(conjugate_gradient(apply, b, iterations=8, tol=tol), alone)


# ------------------------------------------------------------------------------ reconstruct


def _unet() -> ADMPrior:
    """A 16x16 ADM U-Net with seeded random weights (the batching, not the image quality, is tested)."""
    cfg = ADMConfig(image_size=16, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult="1,2",
                    attention_resolutions="8", num_head_channels=32, learn_sigma=True)
    torch.manual_seed(0)  # the initialisation (the test's own process; the ranks build the same network)
    net = GuidedDiffusionUNet(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ADMPrior(net.eval())


@pytest.fixture(scope="module")
def unet_prior():
    return _unet()


@pytest.fixture(scope="module")
def series():
    return simulate(read(CT_SERIES), "ct-sparse-30", size=(16, 16), seed=1)


def _same(a, b):
    torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=1e-5)  # the U-Net's batch-size rounding
    assert torch.equal(a.baseline, b.baseline)
    assert (a.std is None and b.std is None) or torch.allclose(a.std, b.std, rtol=0, atol=1e-5)
    assert [r["seed"] for r in a.runs] == [r["seed"] for r in b.runs] == list(range(len(a.runs)))


def test_reconstruct_batched_equals_slice_by_slice(series, unet_prior):
    m, _ = series
    kw = dict(steps=3, samples=2, options={"cg_iterations": 3})
    one = reconstruct(m, unet_prior, "dds", batch=1, **kw)
    three = reconstruct(m, unet_prior, "dds", batch=3, **kw)  # 3 + 2 slices
    auto = reconstruct(m, unet_prior, "dds", batch="auto", **kw)
    _same(three, one)
    _same(auto, one)
    assert one.info["batch"]["slices_per_call"] == 1 and three.info["batch"]["slices_per_call"] == 3
    assert [r["call_slices"] for r in three.runs] == [3, 3, 3, 2, 2]
    assert three.runs[0]["nfe"] == one.runs[0]["nfe"] == 3 and three.runs[0]["batch"] == 6  # 3 slices x 2 samples
    assert auto.info["batch"] == {"slices_per_call": 5, "requested": "auto", "rule": "automatic: 16 rows on the CPU"}
    assert one.std is not None and (one.std > 0).any()


def test_reconstruct_runs_a_coupled_sampler_one_slice_per_call(series, monkeypatch):
    m, _ = series
    prior = GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.02, mean=0.5)
    monkeypatch.setattr(samplers.get("dps"), "batch_coupling", "a test's coupling")
    rec = reconstruct(m, prior, "dps", batch=4, steps=2)
    assert rec.info["batch"]["slices_per_call"] == 1
    assert "couples the images of a batch (a test's coupling)" in rec.info["batch"]["rule"]


def test_poisson_data_run_one_slice_per_call():
    """Poisson data: the Gaussian-equivalent level of the samplers is the batch's mean |y|, so
    reconstruct takes one slice per call there (the reason recorded)."""
    from invdiff.samplers.steps.likelihood import noise_batch_coupling

    m, _ = simulate(read(CT_SERIES), "ct-sparse-30", size=(16, 16), seed=1, noise="poisson")
    assert "Poisson data" in noise_batch_coupling(m.physics(0))
    assert noise_batch_coupling(operators.make("ct-sparse-30", img_size=SHAPE)) is None
    prior = GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.02, mean=0.5)
    rec = reconstruct(m, prior, "dds", batch=4, steps=2)
    assert rec.info["batch"]["slices_per_call"] == 1 and "Poisson data" in rec.info["batch"]["rule"]


@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5"])
def test_batch_option_errors(value):
    with pytest.raises(ValueError, match="batch must be a positive integer or 'auto'"):
        parse_batch(value)
    assert parse_batch("AUTO") is None and parse_batch(4) == 4


def test_cli_batch_option_is_checked_before_any_work(tmp_path, capsys):
    from invdiff.cli import main

    assert main(["reconstruct", "--measurement", str(tmp_path / "none.h5"), "--prior", "ct-phantom-64",
                 "--out", str(tmp_path / "r"), "--batch", "zero", "-q"]) == 1
    assert "batch must be a positive integer or 'auto', got 'zero'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_bench_group_batched_equals_one_by_one(tmp_path):
    """``bench.run(batch=3)``: the 4 images of each (task, sampler) go through the sampler 3 + 1
    per call, one generator per cell; the rows' numbers equal the one-by-one run's bit for bit."""
    from invdiff.bench import run

    grid = dict(tasks="ct-sparse-30", samplers="dds,smc:particles=2", priors="gaussian-16", n_images=4, steps=4,
                progress=False, report=False)
    one = run(out=tmp_path / "one", **grid)
    three = run(out=tmp_path / "three", batch=3, **grid)
    assert [r["batched"] for r in one.rows] == [1] * 8
    assert [r["batched"] for r in three.rows] == [3] * 6 + [1] * 2  # in grid order: images outer, samplers inner
    for a, b in zip(one.rows, three.rows):
        assert a["cell_id"] == b["cell_id"] and a["status"] == b["status"] == "ok"
        assert (a["psnr"], a["ssim"], a["steps"], a["sampler_seed"]) == (b["psnr"], b["ssim"], b["steps"], b["sampler_seed"])
    with pytest.raises(ValueError, match="batch must be >= 1"):
        run(out=tmp_path / "bad", batch=0, **grid)


# ------------------------------------------------------------------------------ torchrun


def test_process_group_alone():
    group = init_distributed("cpu")
    assert group == ProcessGroup() and group.device("cuda") == "cuda"
    t = torch.arange(6.0).reshape(3, 2)
    assert group.gather(t) is t and group.gather_json([{"a": 1}]) == [{"a": 1}]
    shares = [list(ProcessGroup(rank=r, world=3).share(8)) for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert ProcessGroup(rank=1, world=2, local_rank=1).device("cuda") == "cuda:1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, out: str) -> None:
    """One torchrun-like rank: the environment torchrun sets, then reconstruct; rank 0 saves."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    m, _ = simulate(read(CT_SERIES), "ct-sparse-30", size=(16, 16), seed=1)
    prior = _unet()
    rec = reconstruct(m, prior, "dds", batch=1, steps=3, samples=2, options={"cg_iterations": 3})
    if rec.rank == 0:
        np.save(Path(out) / "mean.npy", rec.mean.numpy())
        np.save(Path(out) / "std.npy", rec.std.numpy())
        (Path(out) / "info.json").write_text(json.dumps({"info": rec.info, "runs": rec.runs}, default=str))


@pytest.mark.slow
def test_torchrun_sharding_equals_one_process(series, unet_prior, tmp_path):
    """Two gloo processes (torch.multiprocessing, torchrun's environment) share the 5 slices
    (3 + 2) and give the one-process result bit for bit; the runs come back in slice order."""
    import torch.multiprocessing as mp

    mp.start_processes(_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    m, _ = series
    torch.set_num_threads(1)
    try:
        one = reconstruct(m, unet_prior, "dds", batch=1, steps=3, samples=2, options={"cg_iterations": 3})
    finally:
        torch.set_num_threads(2)
    assert np.array_equal(np.load(tmp_path / "mean.npy"), one.mean.numpy())
    assert np.array_equal(np.load(tmp_path / "std.npy"), one.std.numpy())
    got = json.loads((tmp_path / "info.json").read_text())
    assert [r["slice"] for r in got["runs"]] == [0, 1, 2, 3, 4]
    assert got["info"]["world_size"] == 2 and got["info"]["backend"] == "gloo"


# ------------------------------------------------------------------------------ CUDA


@CUDA
def test_cuda_automatic_batch_from_free_memory(series, unet_prior):
    """On CUDA the first slice is the probe, the rest go in batches sized from the free
    memory; the samples equal a batch-1 run on the same device (within float32 kernel
    rounding: cuDNN may pick other algorithms at other batch sizes)."""
    m, _ = series
    kw = dict(steps=3, samples=2, options={"cg_iterations": 3}, device="cuda")
    auto = reconstruct(m, unet_prior, "dds", batch="auto", **kw)
    one = reconstruct(m, unet_prior, "dds", batch=1, **kw)
    assert auto.runs[0]["call_slices"] == 1 and auto.runs[1]["call_slices"] == 4  # the probe, then the rest
    assert auto.info["batch"]["rule"].startswith("automatic: from the free CUDA memory")
    torch.testing.assert_close(auto.mean, one.mean, rtol=1e-4, atol=1e-4)
