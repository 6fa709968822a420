"""How a prior's network runs (``invdiff.priors.runtime``): half precision around a float32
sampler, channels_last and torch.compile with its eager fallback.

Tolerances, measured on the CPU (see the comments at each bound): a bf16 network moves a
5-step reconstruction with the shipped CT prior (50 % inpainting, noise 0.05) by 0.16 % (DDS),
0.18 % (DiffPIR) and 2.0 % (DPS, whose guidance gradient goes through the bf16 network),
relative L2; on the Gaussian exactness problems the mean error and std ratio move by < 0.001
and stay inside the float32 bounds of ``tests/test_exactness.py``.
"""

import sys
import warnings
from pathlib import Path

import deepinv as dinv
import pytest
import torch
from torch import nn

from invdiff import priors, samplers
from invdiff.priors import DiffusionPrior, GaussianPrior
from invdiff.priors.runtime import accelerate, compile_unavailable, network_of

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from exactness import problems, sampler_scores  # noqa: E402
from test_exactness import MEASURED, PROBLEMS  # noqa: E402

SAMPLERS = ("dps", "dds", "diffpir")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (channels_last and autocast are CUDA paths)")


# ----------------------------------------------------------------------------- helpers


class EigenNetwork(nn.Module):
    """The Gaussian prior's denoiser as a network with weights: ``V diag(l / (l + s^2)) V^T``
    on centred images, the products in the weights' dtype (so a bf16 cast rounds them)."""

    def __init__(self, eigenvectors: torch.Tensor, eigenvalues: torch.Tensor) -> None:
        super().__init__()
        self.basis = nn.Parameter(eigenvectors.float(), requires_grad=False)
        self.register_buffer("eigenvalues", eigenvalues.float())

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        z = x.to(self.basis.dtype) @ self.basis
        lam = self.eigenvalues.float()
        shrink = lam / (lam + sigma.float().reshape(-1, 1) ** 2)  # the conditioning in float32
        return (z * shrink.to(z.dtype)) @ self.basis.T


class GaussianNetworkPrior(DiffusionPrior):
    """A Gaussian prior whose denoiser is an :class:`EigenNetwork` (a network prior with an
    exact posterior): the exactness problems with a network that can run in bf16."""

    def __init__(self, gauss: GaussianPrior) -> None:
        super().__init__(gauss.image_shape, gauss.sigma_min, gauss.sigma_max, gauss.sigma_data)
        self.gauss = gauss
        self.model = EigenNetwork(gauss.eigenvectors[0], gauss.eigenvalues[0])
        self.weights, self.means = gauss.weights, gauss.means

    def _denoise(self, x, sigma):
        mu = self.means[0].to(x.dtype)
        out = self.model(x.reshape(x.shape[0], -1) - mu, sigma)
        return (mu + out.to(x.dtype)).reshape(x.shape)

    def posterior(self, y, physics, noise_sigma):
        return self.gauss.posterior(y, physics, noise_sigma)


@pytest.fixture(scope="module")
def ct_problem():
    """50 % inpainting of a held-out 64x64 CT slice, noise 0.05."""
    from invdiff.data import heldout

    x = heldout("ct-phantom", 1, 64)
    mask = (torch.rand(1, 64, 64, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    physics = dinv.physics.Inpainting((1, 64, 64), mask=mask, noise_model=dinv.physics.GaussianNoise(
        0.05, rng=torch.Generator().manual_seed(1)))
    return physics, physics(x)


def _run(prior, name, physics, y, steps=5, callback=None):
    sampler = samplers.make(name, prior, steps=steps)
    out = sampler(y, physics, generator=torch.Generator().manual_seed(3), callback=callback)
    return out, sampler.last_run


# ----------------------------------------------------------------------------- precision


@pytest.mark.parametrize("name", SAMPLERS)
def test_bf16_network_agrees_with_float32_and_the_sampler_stays_float32(name, ct_problem):
    physics, y = ct_problem
    ref, info32 = _run(priors.load("ct-phantom-64"), name, physics, y)
    half = priors.load("ct-phantom-64").accelerate(dtype="bf16")
    seen_in, seen_iterates = set(), set()
    network_of(half).register_forward_pre_hook(lambda m, args: seen_in.add(args[0].dtype))

    def check(info):
        seen_iterates.update({info["x"].dtype, info["x0"].dtype})

    out, info = _run(half, name, physics, y, callback=check)
    assert out.dtype == torch.float32 and seen_iterates == {torch.float32}
    assert seen_in == {torch.float32}  # the network's own input cast (to bf16) is inside it ...
    assert network_of(half).dtype == torch.bfloat16  # ... to its weights' dtype
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 0.05, rel  # measured 0.0016 (DDS), 0.0018 (DiffPIR), 0.020 (DPS)
    assert (out - ref).abs().max() > 0  # the bf16 network did run
    assert info.runtime["dtype"] == "bfloat16" and info32.runtime["dtype"] == "float32"
    assert info.nfe == info32.nfe


@pytest.mark.parametrize("name", SAMPLERS)
def test_exactness_bounds_hold_with_a_bf16_network(name):
    """The closed-form problems of tests/test_exactness.py with the Gaussian prior as a network
    (EigenNetwork): float32 and bf16 weights both inside the float32 bounds, and close."""
    errs, ratio_range = MEASURED[name]
    for label, measured in zip(PROBLEMS, errs):
        if not label.startswith("gaussian"):
            continue
        gauss, physics, y = next((p, ph, yy) for lab, p, ph, yy in problems() if lab == label)
        scores = {}
        for dtype in ("float32", "bf16"):
            prior = GaussianNetworkPrior(gauss).accelerate(dtype=dtype)
            err, ratio, _, _ = sampler_scores(name, prior, physics, y, n=32)
            assert err < 1.4 * measured + 0.03, (name, label, dtype, err, measured)
            assert ratio_range[0] < ratio < ratio_range[1], (name, label, dtype, ratio)
            scores[dtype] = (err, ratio)
        assert abs(scores["bf16"][0] - scores["float32"][0]) < 0.01, scores  # measured <= 0.0009
        assert abs(scores["bf16"][1] - scores["float32"][1]) < 0.01, scores  # measured <= 0.0010


def test_fp16_and_autocast_run_the_network_in_half_and_return_float32():
    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = priors.load("ct-phantom-64").denoise(x, 0.5)
    for kw, dtype in ((dict(dtype="fp16"), "float16"), (dict(dtype="bf16", autocast=True), "bfloat16")):
        prior = priors.load("ct-phantom-64").accelerate(**kw)
        out = prior.denoise(x, 0.5)
        assert out.dtype == torch.float32 and prior.runtime["dtype"] == dtype
        assert prior.runtime["autocast"] == kw.get("autocast", False)
        assert 0 < (out - ref).abs().max() < 0.05  # measured 0.001 (fp16), 0.008 (bf16 autocast)
    with pytest.raises(ValueError, match="autocast needs"):
        priors.load("ct-phantom-64").accelerate(autocast=True)


def test_runtime_of_a_plain_prior_and_of_one_without_a_network():
    assert priors.load("ct-phantom-64").runtime == dict(dtype="float32", autocast=False, channels_last=False,
                                                        compile=None, compiled=False, fallback_reason=None)
    gauss = GaussianPrior.stationary((1, 8, 8))
    assert gauss.runtime["dtype"] is None
    with pytest.warns(RuntimeWarning, match="has no network"):
        assert gauss.accelerate(dtype="bf16") is gauss
    assert gauss.eigenvectors.dtype == torch.float64


def test_accelerate_again_replaces_the_settings():
    prior = priors.load("ct-phantom-64").accelerate(dtype="bf16", compile="aot_eager")
    prior.accelerate(dtype="float32")
    assert prior.runtime["dtype"] == "float32" and prior.runtime["compile"] is None
    assert "forward" not in network_of(prior).__dict__


# ----------------------------------------------------------------------------- compilation


def _counting_backend(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def test_compiled_network_equals_eager_and_does_not_recompile_when_requires_grad_toggles(ct_problem):
    """DPS differentiates through the compiled network (a graph input that requires grad) and
    samples without grad: two graphs, reused at every later step."""
    reason = compile_unavailable("cpu", "eager")
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    physics, y = ct_problem
    graphs: list = []
    prior = priors.load("ct-phantom-64").accelerate(compile=_counting_backend(graphs))
    assert prior.runtime["compile"] == "backend"  # a callable backend, by name
    ref, _ = _run(priors.load("ct-phantom-64"), "dps", physics, y, steps=4)
    out, info = _run(prior, "dps", physics, y, steps=4)
    assert info.runtime["compiled"] and info.runtime["fallback_reason"] is None
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    out2, _ = _run(prior, "dds", physics, y, steps=4)  # without grad
    out3, _ = _run(prior, "dps", physics, y, steps=4)  # with grad again
    torch.testing.assert_close(out3, out, rtol=0, atol=0)
    assert 1 <= len(graphs) <= 2, len(graphs)  # one graph per grad mode (the first DPS step may need both)
    torch._dynamo.reset()


def test_a_failing_compiler_falls_back_to_eager_with_one_line():
    torch._dynamo.reset()

    def broken(gm, example_inputs):
        raise RuntimeError("no compiler here\nsecond line")

    x = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    ref = priors.load("ct-phantom-64").denoise(x, 0.5)
    prior = priors.load("ct-phantom-64").accelerate(compile=broken)
    with pytest.warns(RuntimeWarning) as caught:
        out = prior.denoise(x, 0.5)
    message = str(caught[0].message)
    assert "\n" not in message and "no compiler here" in message and "runs eager" in message
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    rt = prior.runtime
    assert rt["compiled"] is False and "no compiler here" in rt["fallback_reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prior.denoise(x, 0.5)  # eager from now on, no second warning
    torch._dynamo.reset()


def test_no_cpp_compiler_is_said_before_the_first_call(monkeypatch):
    import invdiff.priors.runtime as runtime

    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    assert "no C++ compiler" in compile_unavailable("cpu")
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
        prior = priors.load("ct-phantom-64").accelerate(compile=True)
    assert "no C++ compiler" in prior.runtime["fallback_reason"]
    x = torch.rand(1, 1, 64, 64)
    torch.testing.assert_close(prior.denoise(x, 1.0), priors.load("ct-phantom-64").denoise(x, 1.0), rtol=0, atol=0)


@pytest.mark.slow
def test_inductor_compiled_sampler_equals_eager(ct_problem):
    """The real compiler (inductor; about 100 s to compile the CT U-Net on one CPU thread)."""
    reason = compile_unavailable("cpu", "inductor")
    if reason:
        pytest.skip(reason)
    torch._dynamo.reset()
    physics, y = ct_problem
    ref, _ = _run(priors.load("ct-phantom-64"), "dds", physics, y, steps=3)
    out, info = _run(priors.load("ct-phantom-64").accelerate(compile=True), "dds", physics, y, steps=3)
    if info.runtime["fallback_reason"]:
        pytest.skip(f"torch.compile does not work here: {info.runtime['fallback_reason']}")
    assert info.runtime["compiled"]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- CUDA


@CUDA
def test_channels_last_and_bf16_on_cuda(ct_problem):
    physics, y = ct_problem
    ref, _ = _run(priors.load("ct-phantom-64"), "dds", physics, y)
    prior = priors.load("ct-phantom-64", device="cuda").accelerate(dtype="bf16")
    rt = prior.runtime
    assert rt["channels_last"] and rt["dtype"] == "bfloat16"
    conv = next(m for m in network_of(prior).modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    cuda_physics = dinv.physics.Inpainting((1, 64, 64), mask=physics.mask.cuda(), device="cuda",
                                           noise_model=dinv.physics.GaussianNoise(0.05))
    out, info = _run(prior, "dds", cuda_physics, y.cuda())
    assert out.dtype == torch.float32 and info.runtime["channels_last"]
    assert ((out.cpu() - ref).norm() / ref.norm()).item() < 0.05


@CUDA
def test_autocast_on_cuda_keeps_float32_weights():
    prior = priors.load("ct-phantom-64", device="cuda").accelerate(dtype="bf16", autocast=True)
    assert next(network_of(prior).parameters()).dtype == torch.float32
    x = torch.rand(4, 1, 64, 64, device="cuda")
    out = prior.denoise(x, 0.3)
    ref = priors.load("ct-phantom-64", device="cuda").denoise(x, 0.3)
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.05
    assert prior.runtime["autocast"] and prior.runtime["channels_last"]


# ----------------------------------------------------------------------------- commands and records


def test_bench_records_the_dtype_and_a_bf16_cell_is_another_cell(tmp_path):
    from invdiff import bench

    grid = dict(tasks="inpaint-random-70", samplers="dds", priors="ct-phantom-64", n_images=1, steps=2,
                out=tmp_path / "b", lpips=False, progress=False, report=False, save_recon="none")
    first = bench.run(**grid)
    half = bench.run(**grid, dtype="bf16")
    again = bench.run(**grid, dtype="bfloat16")
    assert (half.ran, half.skipped) == (1, 0) and (again.ran, again.skipped) == (0, 1)
    row32, = first.rows
    row16, = half.rows
    assert row32["cell_id"] != row16["cell_id"]
    assert row32["dtype"] == "float32" and row32["runtime"]["dtype"] == "float32"
    assert row16["dtype"] == "bfloat16" and row16["runtime"]["dtype"] == "bfloat16"
    assert row16["status"] == "ok" and abs(row16["psnr"] - row32["psnr"]) < 0.5
    with pytest.raises(ValueError, match="dtype must be one of"):
        bench.run(**grid, dtype="int8")


def test_reconstruct_records_the_runtime_in_the_provenance(tmp_path):
    import json

    from invdiff.cli import main

    src = tmp_path / "slice.png"
    from PIL import Image
    import numpy as np

    Image.fromarray((np.linspace(0, 255, 64 * 64).reshape(64, 64)).astype(np.uint8)).save(src)
    out = tmp_path / "r"
    assert main(["reconstruct", "--input", str(src), "--task", "inpaint-random-70", "--prior", "ct-phantom-64",
                 "--sampler", "dds", "--steps", "2", "--dtype", "bf16", "--out", str(out), "-q"]) == 0
    text = (out / "provenance.json").read_text()
    found = []

    def walk(node):
        if isinstance(node, dict):
            if "runtime" in node:
                found.append(node["runtime"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(json.loads(text))
    assert found and all(r["dtype"] == "bfloat16" for r in found), found


def test_dtype_and_compile_are_refused_where_there_is_no_network(tmp_path, capsys):
    from invdiff.cli import main

    assert main(["demo", "--analytic", "--dtype", "bf16", "--out", str(tmp_path / "d")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no network" in err
    assert not (tmp_path / "d").exists()
