"""``invdiff bench``: the grid, resuming after a kill, failed cells, torch.distributed with gloo,
agreement with ``deepinv.test``, the summary and the command line.

The grid is tiny (16x16 analytic Gaussian prior, 2 tasks x 2 samplers x 2 images, 8 steps)
so the whole file runs in about half a minute, most of it the 2-process run.
"""

import json
import math
import os
import statistics
import subprocess
import sys

import deepinv as dinv
import pytest
import torch

from invdiff import operators, samplers
from invdiff.bench import SeededSampler, deepinv_metrics, resolve_priors, run, store
from invdiff.bench.grid import parse_seeds, parse_spec, task_specs
from invdiff.bench.images import load_images, prior_images
from invdiff.bench.report import summarize
from invdiff.cli import main
from invdiff.operators import task_info
from invdiff.priors import DiffusionPrior

TASKS = "ct-sparse-30,mri-4x"
SAMPLERS = "dds,reddiff"
PRIOR = "gaussian-16"  # GaussianPrior.stationary((1, 16, 16), length_scale=2, variance=0.02, mean=0.5)
STEPS = 8
GRID = dict(tasks=TASKS, samplers=SAMPLERS, priors=PRIOR, n_images=2, steps=STEPS, progress=False)
NUMBERS = ("psnr", "ssim", "nfe", "nfe_backward", "steps", "measurement_seed", "sampler_seed", "status")


def _numbers(row):
    return {k: row[k] for k in NUMBERS}


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The tiny grid, run once without interruption."""
    out = tmp_path_factory.mktemp("full")
    return run(out=out, **GRID)


def test_tiny_grid_rows_summary_and_figure(full):
    rows = full.rows
    assert full.cells == len(rows) == 8 and full.ran == 8 and full.failed == 0
    assert len({r["cell_id"] for r in rows}) == 8
    assert {(r["task"], r["sampler"]) for r in rows} == {(t, s) for t in TASKS.split(",") for s in SAMPLERS.split(",")}
    prior = resolve_priors(PRIOR)[0].prior
    for r in rows:
        assert r["status"] == "ok" and r["nfe"] == STEPS and r["sampler_params"]["steps"] == STEPS
        assert r["versions"]["torch"] == torch.__version__ and r["wall_time"] > 0 and r["prior_source"] == "analytic"
        # the task record rebuilds the operator; the recorded seeds re-run the cell alone, to the bit
        physics = operators.make(**r["task_params"])
        assert physics.task == r["task_params"]
        from safetensors.torch import load_file

        saved = load_file(str(full.out / r["recon"]))
        x = saved["x"]
        assert x.shape == (1, 1, 16, 16) and r["image"].startswith("prior/")
        y = physics(x, seed=r["measurement_seed"])
        sampler = SeededSampler(samplers.make(r["sampler_name"], prior, steps=STEPS), r["sampler_seed"])
        x_hat = sampler(y, physics)
        assert torch.equal(x_hat, saved["x_hat"])
        # PSNR from its definition: peak 1 (CT) or the ground truth's max (MRI, fastMRI)
        peak = 1.0 if task_info(r["task_name"]).metric_range == "unit" else float(x.max())
        mse = float(((x_hat.clamp(0, 1) - x) ** 2).mean())
        assert r["psnr"] == pytest.approx(-10 * math.log10(mse / peak**2 + 1e-8), abs=1e-4)  # deepinv's +1e-8
        assert r["psnr_range"] == ("gt-max" if r["task"] == "mri-4x" else "1")
    # measurements are shared by the samplers of a task/image/seed, and differ between images
    seeds = {(r["task"], r["image"]): set() for r in rows}
    for r in rows:
        seeds[r["task"], r["image"]].add(r["measurement_seed"])
    assert all(len(s) == 1 for s in seeds.values()) and len({min(s) for s in seeds.values()}) == 4

    # summary.csv: mean and sample std per task x sampler over the 2 images; best per task flagged
    import csv

    table = list(csv.DictReader((full.out / "summary.csv").open()))
    assert len(table) == 4
    for line in table:
        values = [r["psnr"] for r in rows if r["task"] == line["task"] and r["sampler"] == line["sampler"]]
        assert int(line["n"]) == 2 and int(line["n_failed"]) == 0
        assert float(line["psnr_mean"]) == pytest.approx(statistics.fmean(values), abs=1e-9)
        assert float(line["psnr_std"]) == pytest.approx(statistics.stdev(values), abs=1e-9)
    for task in TASKS.split(","):
        mine = [line for line in table if line["task"] == task]
        best = max(mine, key=lambda line: float(line["psnr_mean"]))
        assert [line["best_psnr"] for line in mine].count("True") == 1 and best["best_psnr"] == "True"
    md = (full.out / "summary.md").read_text()
    assert "| sampler | ct-sparse-30 | mri-4x |" in md and md.count("**") >= 2 * 2 * 2
    assert (full.out / "grid.png").stat().st_size > 5000
    assert sorted(p.name for p in full.out.iterdir()) == ["grid.png", "recon", "results.jsonl", "summary.csv",
                                                          "summary.md"]
    assert not list(full.out.rglob("*.tmp"))


def test_killed_run_resumes_without_duplicates(full, tmp_path):
    out = tmp_path / "killed"
    k = 3

    def kill_after_k(row, count=[0]):
        count[0] += 1
        if count[0] == k:
            raise KeyboardInterrupt  # as a kill right after the k-th cell was written

    with pytest.raises(KeyboardInterrupt):
        run(out=out, on_cell=kill_after_k, **GRID)
    first = store.read_rows(out / "results.jsonl")
    assert len(first) == k
    with open(out / "results.jsonl", "ab") as f:  # a kill in the middle of writing the next line
        f.write(b'{"cell_id": "half-written')
    result = run(out=out, **GRID)
    assert (result.ran, result.skipped) == (8 - k, k)
    lines = (out / "results.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]  # every line is JSON again
    assert len(rows) == 8 and len({r["cell_id"] for r in rows}) == 8
    before = {r["cell_id"]: _numbers(r) for r in first}
    after = {r["cell_id"]: _numbers(r) for r in rows}
    reference = {r["cell_id"]: _numbers(r) for r in full.rows}
    assert all(after[c] == before[c] for c in before)  # finished cells kept, not re-run
    assert after == reference  # and the whole grid equals the uninterrupted run's
    # a third run has nothing to do and leaves the results untouched
    text = (out / "results.jsonl").read_bytes()
    again = run(out=out, report=False, **GRID)
    assert (again.ran, again.skipped) == (0, 8) and (out / "results.jsonl").read_bytes() == text


class FlakyPrior(DiffusionPrior):
    """The Gaussian prior, returning NaN while ``broken`` (a Python flag, not part of the hash)."""

    def __init__(self, inner):
        super().__init__(inner.image_shape, inner.sigma_min, inner.sigma_max, inner.sigma_data)
        self.inner, self.broken = inner, True

    def _denoise(self, x, sigma):
        out = self.inner._denoise(x, sigma)
        return out * float("nan") if self.broken else out


def test_failed_cells_are_recorded_and_rerun(tmp_path):
    prior = FlakyPrior(resolve_priors(PRIOR)[0].prior)
    grid = dict(tasks="inpaint-random-70,phase-retrieval", samplers="dds", priors={"flaky": prior},
                images=prior_images(prior.inner, 1), steps=4, progress=False, out=tmp_path)
    result = run(**grid)
    errors = {r["task"]: r["error"] for r in result.rows}
    status = {r["task"]: r["status"] for r in result.rows}
    assert status == {"inpaint-random-70": "failed", "phase-retrieval": "incompatible"} and result.failed == 1
    assert errors["inpaint-random-70"].startswith("SamplerDivergedError: dds: diverged at step 0")
    assert errors["phase-retrieval"].startswith("IncompatibleError: dds: needs a linear operator")
    summary = (tmp_path / "summary.md").read_text()
    assert "failed (1)" in summary and "Not applicable" in summary and "- dds / phase-retrieval: Incompat" in summary
    # without --rerun-failed a failed cell counts as done; with it, it runs again (an incompatible one never)
    prior.broken = False
    assert run(**grid).ran == 0
    result = run(rerun_failed=True, **grid)
    status = {r["task"]: r["status"] for r in result.rows}
    assert result.ran == 1 and status == {"inpaint-random-70": "ok", "phase-retrieval": "incompatible"}
    rows = store.read_rows(tmp_path / "results.jsonl")
    assert len(rows) == 2 and len({r["cell_id"] for r in rows}) == 2  # one line per cell after the merge


def test_two_process_gloo_run_equals_one_process_run(full, tmp_path):
    out = tmp_path / "dist"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "invdiff", "bench", "--tasks", TASKS, "--samplers", SAMPLERS, "--prior", PRIOR,
           "--images", "2", "--steps", str(STEPS), "--out", str(out), "-q"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "invdiff bench: 8 cells" in proc.stdout and proc.stdout.count("# invdiff bench summary") == 1
    assert not store.rank_files(out)  # rank 0 merged the per-rank files
    rows = store.read_rows(out / "results.jsonl")
    assert [r["cell_id"] for r in rows] == [r["cell_id"] for r in full.rows]  # merged in grid order
    assert {r["rank"] for r in rows} == {0, 1} and {r["world_size"] for r in rows} == {2}
    for a, b in zip(rows, full.rows):
        # measured: identical to the last bit although the thread counts differ (1 vs 2)
        assert a["psnr"] == pytest.approx(b["psnr"], abs=1e-6) and a["ssim"] == pytest.approx(b["ssim"], abs=1e-7)
        assert {k: a[k] for k in NUMBERS if k not in ("psnr", "ssim")} == \
               {k: b[k] for k in NUMBERS if k not in ("psnr", "ssim")}


@pytest.mark.parametrize("task", TASKS.split(","))
def test_deepinv_test_gives_the_bench_psnr(full, task):
    """``deepinv.test`` on the bench's images and measurements (offline: the dataset holds
    ``(x, y)`` with ``y = physics(x, seed=measurement_seed)``, so the noise is identical),
    with the sampler seeded as the bench seeds it, reports the bench's mean PSNR and SSIM."""
    rows = [r for r in full.rows if r["task"] == task and r["sampler"] == "reddiff"]
    prior = resolve_priors(PRIOR)[0].prior
    physics = operators.make(**rows[0]["task_params"])
    images = {im.id: im.x for im in load_images("prior", 2, prior, PRIOR)}
    x = torch.stack([images[r["image"]] for r in rows])
    y = torch.cat([physics(x[i : i + 1], seed=r["measurement_seed"]) for i, r in enumerate(rows)])
    assert len({r["sampler_seed"] for r in rows}) == 1
    model = SeededSampler(samplers.make("reddiff", prior, steps=STEPS), rows[0]["sampler_seed"])
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=1)
    metrics = dinv.test(model, loader, physics, metrics=deepinv_metrics("mri" if task_info(task).family == "mri" else "image"),
                        online_measurements=False, compare_no_learning=False, verbose=False,
                        show_progress_bar=False)
    psnr = [r["psnr"] for r in rows]
    ssim = [r["ssim"] for r in rows]
    assert metrics["PSNR"] == pytest.approx(statistics.fmean(psnr), abs=1e-5)
    assert metrics["SSIM"] == pytest.approx(statistics.fmean(ssim), abs=1e-6)
    assert abs(psnr[0] - psnr[1]) > 0.01  # two distinct images: the mean alone is not a coincidence
    assert metrics["PSNR_std"] == pytest.approx(statistics.pstdev(psnr), rel=1e-3) or \
        metrics["PSNR_std"] == pytest.approx(statistics.stdev(psnr), rel=1e-3)


def test_toml_config_cli_and_report(tmp_path, capsys):
    config = tmp_path / "grid.toml"
    config.write_text(
        'prior = "gaussian-16"\nn_images = 1\nseeds = [3]\nsteps = 4\nout = "res"\nsave_recon = "all"\n'
        '[[tasks]]\nname = "inpaint-random-70"\nnoise_sigma = 0.05\nlabel = "inpaint-noisy"\n'
        '[[samplers]]\nname = "reddiff"\nlam = 0.1\n'
        '[[samplers]]\nname = "dds"\nsteps = 6\n'
    )
    assert main(["bench", "--config", str(config), "-q"]) == 0
    out = tmp_path / "res"
    rows = store.read_rows(out / "results.jsonl")
    assert {r["sampler"] for r in rows} == {"reddiff:lam=0.1", "dds:steps=6"}
    assert all(r["task"] == "inpaint-noisy" and r["task_params"]["noise_sigma"] == 0.05 and r["seed"] == 3
               for r in rows)
    nfe = {r["sampler_name"]: r["nfe"] for r in rows}
    assert nfe == {"reddiff": 4, "dds": 6}  # --steps (here: steps = 4) loses to a sampler's own steps
    summary = (out / "summary.md").read_text()
    # `bench report` rebuilds the same summary from the results file alone
    (out / "summary.md").unlink()
    assert main(["bench", "report", str(out / "results.jsonl")]) == 0
    assert (out / "summary.md").read_text() == summary and "inpaint-noisy" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "nope-3", "--samplers", "dps"], "unknown task 'nope-3'"),
    (["--tasks", "mri-4x", "--samplers", "dps:foo=1"], "dps: unknown option 'foo'"),
    (["--tasks", "mri-4x:img_size=[1,8,8]", "--samplers", "dps"], "set by the benchmark"),
    (["--samplers", "dps"], "--tasks is required"),
    (["--tasks", "mri-4x", "--samplers", "dps", "--images-from", "/no/such/folder"], "no image folder at"),
    (["--tasks", "mri-4x", "--samplers", "dps", "--seeds", "0"], "seeds must be >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "never"
    argv = ["bench", *argv, "--out", str(out), "-q"]
    if "--prior" not in argv:
        argv += ["--prior", PRIOR]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error:") and message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_images_from_a_deepinv_dataset_are_conformed(tmp_path):
    import kornia
    import numpy as np
    import torchvision
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    dataset = dinv.datasets.ImageFolder(tmp_path, transform=torchvision.transforms.ToTensor())
    prior = resolve_priors(PRIOR)[0].prior
    images = load_images(dataset, 2, prior, PRIOR)
    assert [im.id for im in images] == ["ImageFolder/0", "ImageFolder/1"]
    expected = kornia.geometry.transform.resize(kornia.color.rgb_to_grayscale(dataset[1][None]), (16, 16),
                                                antialias=True)[0]
    assert torch.allclose(images[1].x, expected.clamp(0, 1)) and images[1].note == "rgb->grey, resized from 20x24"
    with pytest.raises(ValueError, match="expects images in \\[0, 1\\]"):
        load_images(torch.full((1, 1, 16, 16), 3.0), None, prior, PRIOR)


def test_images_from_a_folder(tmp_path):
    pytest.importorskip("invdiff.io")
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((16, 16), 128, dtype=np.uint8)).save(tmp_path / "a.png")
    images = load_images(tmp_path, None, resolve_priors(PRIOR)[0].prior, PRIOR)
    assert len(images) == 1 and torch.allclose(images[0].x, torch.full((1, 16, 16), 128 / 255), atol=1e-6)


def test_lpips_only_with_local_weights(tmp_path, monkeypatch):
    import torchvision

    from invdiff.bench.metrics import image_metrics

    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    x = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    x_hat = torch.rand(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    m = image_metrics(x_hat, x, "image", lpips_net="squeeze")
    assert m["lpips"] is None and "no local squeeze weights" in m["notes"] and str(hub) in m["notes"]
    # weights "in the cache" (random ones: this checks the plumbing, not the network)
    (hub / "checkpoints").mkdir(parents=True)
    net = torchvision.models.squeezenet1_1()
    url = torchvision.models.SqueezeNet1_1_Weights.DEFAULT.url
    torch.save(net.state_dict(), hub / "checkpoints" / url.rsplit("/", 1)[1])
    assert image_metrics(x, x, "image", lpips_net="squeeze")["lpips"] == 0.0
    assert image_metrics(x_hat, x, "image", lpips_net="squeeze")["lpips"] > 0.0


def test_store_dedupes_and_merges_rank_files(tmp_path):
    store.append_row(tmp_path / "results.rank1.jsonl", {"cell_id": "b", "status": "failed"})
    store.append_row(tmp_path / "results.rank0.jsonl", {"cell_id": "a", "status": "ok", "psnr": 1.0})
    store.append_row(tmp_path / "results.rank1.jsonl", {"cell_id": "b", "status": "ok", "psnr": 2.0})
    store.append_row(tmp_path / "results.rank1.jsonl", {"cell_id": "c", "status": "failed", "error": "x"})
    with open(tmp_path / "results.rank0.jsonl", "ab") as f:
        f.write(b'{"cell_id": "d", "sta')  # killed mid-line: as if d never finished
    rows = store.merge(tmp_path, order=["c", "b", "a"])
    assert [(r["cell_id"], r["status"]) for r in rows] == [("c", "failed"), ("b", "ok"), ("a", "ok")]
    assert store.rank_files(tmp_path) == [] and len(store.read_rows(tmp_path / "results.jsonl")) == 3
    assert store.load_results(tmp_path) == rows


def test_summary_statistics_and_label_variants():
    base = dict(prior="p", prior_hash="h" * 64, task="mri-4x", task_params={"a": 1}, image="i", seed=0)
    rows = [
        {**base, "cell_id": "1", "status": "ok", "sampler": "dps", "sampler_params": {"steps": 10}, "psnr": 20.0,
         "ssim": 0.5, "lpips": None, "wall_time": 1.0, "nfe": 10, "nfe_backward": 10, "peak_memory": None},
        {**base, "cell_id": "2", "status": "ok", "sampler": "dps", "sampler_params": {"steps": 10}, "psnr": 24.0,
         "ssim": 0.7, "lpips": None, "wall_time": 3.0, "nfe": 10, "nfe_backward": 10, "peak_memory": None},
        {**base, "cell_id": "3", "status": "ok", "sampler": "dps", "sampler_params": {"steps": 50}, "psnr": 30.0,
         "ssim": 0.9, "lpips": None, "wall_time": 5.0, "nfe": 50, "nfe_backward": 50, "peak_memory": None},
        {**base, "cell_id": "4", "status": "failed", "sampler": "dps", "sampler_params": {"steps": 50}},
    ]
    stats = {s["sampler"]: s for s in summarize(rows)}
    assert set(stats) == {"dps[steps=10]", "dps[steps=50]"}
    s10, s50 = stats["dps[steps=10]"], stats["dps[steps=50]"]
    assert (s10["psnr_mean"], s10["psnr_std"], s10["n"], s10["n_failed"]) == (22.0, pytest.approx(2 ** 1.5), 2, 0)
    assert (s50["psnr_mean"], s50["psnr_std"], s50["n"], s50["n_failed"]) == (30.0, 0.0, 1, 1)
    assert s50["best_psnr"] and not s10["best_psnr"] and s10["wall_time_mean"] == 2.0


def test_spec_parsing():
    assert parse_spec("mri-8x:mask_type=equispaced:center_fraction=0.04") == \
        ("mri-8x", {"mask_type": "equispaced", "center_fraction": 0.04})
    assert [t.label for t in task_specs(["ct-sparse-30", {"name": "mri-4x", "noise": "none"}])] == \
        ["ct-sparse-30", "mri-4x:noise=none"]
    assert parse_seeds("3") == [0, 1, 2] and parse_seeds("4,7") == [4, 7] and parse_seeds([5]) == [5]
    with pytest.raises(ValueError, match="given twice"):
        task_specs("mri-4x,mri-4x")


def test_baseline_row_is_the_operators_own_reconstruction(tmp_path):
    result = run(tasks="ct-sparse-30", samplers="baseline,dds", priors=PRIOR, n_images=2, steps=STEPS,
                 progress=False, out=tmp_path)
    rows = {(r["sampler"], r["image"]): r for r in result.rows}
    assert result.failed == 0 and len(rows) == 4
    prior = resolve_priors(PRIOR)[0].prior
    images = load_images(None, 2, prior, PRIOR)
    for r in result.rows:
        if r["sampler"] != "baseline":
            continue
        assert r["nfe"] == 0 and "steps" not in r["sampler_params"]  # --steps is not applied to it
        physics = operators.make(**r["task_params"])
        x = next(im.x for im in images if im.id == r["image"])[None]
        fbp = physics.A_dagger(physics(x, seed=r["measurement_seed"])).clamp(0, 1)
        assert r["psnr"] == pytest.approx(float(dinv.metric.PSNR()(fbp, x)), abs=1e-4)
        assert rows["dds", r["image"]]["psnr"] > r["psnr"]  # the prior helps
    assert "| baseline |" in (tmp_path / "summary.md").read_text()


def test_samples_cell_scores_the_mean_of_k_samples(tmp_path):
    from safetensors.torch import load_file

    from invdiff.bench.metrics import image_metrics

    one = run(tasks="ct-sparse-30", samplers="dds", priors=PRIOR, n_images=1, steps=STEPS, progress=False, out=tmp_path)
    three = run(tasks="ct-sparse-30", samplers="dds", priors=PRIOR, n_images=1, steps=STEPS, samples=3,
                progress=False, out=tmp_path)
    a, b = one.rows[0], three.rows[0]
    # K is part of the cell's id (a resume never mixes K), and K = 1 keeps the ids of earlier grids
    assert three.ran == 1 and a["cell_id"] != b["cell_id"] and (a["samples"], b["samples"]) == (1, 3)
    from invdiff.bench.grid import Cell, SamplerSpec

    cell = Cell("p", "h", task_specs("ct-sparse-30")[0], {}, SamplerSpec("dds"), {}, "i", 0, "ih", 0)
    assert "samples" not in cell.key and "sampler_prior_hash" not in cell.key
    prior = resolve_priors(PRIOR)[0].prior
    x = load_images(None, 1, prior, PRIOR)[0].x[None]
    physics = operators.make(**b["task_params"])
    y = physics(x, seed=b["measurement_seed"])
    post = samplers.make("dds", prior, steps=STEPS).sample(y, physics, n=3,
                                                           generator=torch.Generator().manual_seed(b["sampler_seed"]))
    assert b["psnr"] == pytest.approx(image_metrics(post.mean, x, "image", lpips=False)["psnr"], abs=1e-5)
    assert b["nfe"] == STEPS  # the K samples are one batched run
    kept = load_file(str(tmp_path / b["recon"]))
    assert torch.allclose(kept["x_hat"], post.mean) and torch.allclose(kept["std"], post.std)
    assert "std" not in load_file(str(tmp_path / a["recon"]))
    with pytest.raises(ValueError, match="samples"):
        run(tasks="ct-sparse-30", samplers="dds", priors=PRIOR, samples=0, progress=False, out=tmp_path / "bad")


def test_a_sampler_runs_on_its_own_prior(tmp_path):
    from invdiff.bench import prior_hash
    from invdiff.priors import GaussianPrior

    own = GaussianPrior.stationary((1, 16, 16), length_scale=4, variance=0.03, mean=0.4)
    result = run(tasks="ct-sparse-30", samplers=["dds", {"name": "dds", "label": "dds-own", "prior": own}],
                 priors=PRIOR, n_images=1, steps=STEPS, progress=False, out=tmp_path)
    rows = {r["sampler"]: r for r in result.rows}
    assert rows["dds"]["sampler_prior"] is None and rows["dds"]["sampler_prior_hash"] is None
    r = rows["dds-own"]
    # the grid's prior still gives the images and the measurement; the cell records both priors
    assert r["prior"] == PRIOR and r["sampler_prior_hash"] == prior_hash(own) and r["sampler_prior"].startswith("Gauss")
    assert r["measurement_seed"] == rows["dds"]["measurement_seed"] and r["cell_id"] != rows["dds"]["cell_id"]
    x = load_images(None, 1, resolve_priors(PRIOR)[0].prior, PRIOR)[0].x[None]
    physics = operators.make(**r["task_params"])
    x_hat = SeededSampler(samplers.make("dds", own, steps=STEPS), r["sampler_seed"])(
        physics(x, seed=r["measurement_seed"]), physics)
    assert r["psnr"] == pytest.approx(float(dinv.metric.PSNR()(x_hat, x)), abs=1e-4)
    # the spec form NAME:prior=P parses into the sampler's prior, not a sampler option
    from invdiff.bench.grid import sampler_specs

    spec = sampler_specs("resample:prior=ct-phantom-latent-64")[0]
    assert spec.prior == "ct-phantom-latent-64" and spec.overrides == {}


def test_task_table_pivots_the_summary():
    from invdiff.bench.report import task_table

    base = dict(prior="p", prior_hash="h" * 64, status="ok", task_params={}, sampler_params={}, seed=0)
    rows = [dict(base, task=t, sampler=s, image=str(i), psnr=v + i, ssim=0.5)
            for t, s, v in (("a", "x", 10.0), ("a", "y", 20.0), ("b", "x", 30.0)) for i in (0, 1)]
    text = task_table(summarize(rows), ["y", "x"], labels={"x": "X (classical)"})
    assert text.splitlines() == ["| task | prior | y | X (classical) |", "|---|---|---|---|",
                                 "| a | p | 20.50 / 0.500 | 10.50 / 0.500 |", "| b | p | n/a | 30.50 / 0.500 |"]


def test_blind_task_records_the_kernel_error_and_shows_the_kernels(tmp_path):
    """``deblur-blind``: only the blind sampler and the baseline take it (the others are
    ``incompatible``); each cell's kernel is nature's of its measurement seed, and the row's
    kernel error is BlindDPS's estimate against it; the recon file keeps both kernels."""
    from safetensors.torch import load_file

    from invdiff.bench.metrics import kernel_error

    result = run(tasks="deblur-blind", samplers="baseline,dps,blind-dps:kernel_prior=gaussian-4", priors=PRIOR,
                 n_images=2, steps=STEPS, progress=False, out=tmp_path)
    rows = {(r["sampler"], r["image"]): r for r in result.rows}
    assert result.failed == 0 and len(rows) == 6
    assert all(r["status"] == "incompatible" and "kernel is unknown" in r["error"]
               for (s, _), r in rows.items() if s == "dps")
    blind = [r for (s, _), r in rows.items() if s.startswith("blind-dps")]
    assert len(blind) == 2 and all(r["status"] == "ok" for r in blind)
    physics = operators.make(**blind[0]["task_params"])
    seeds = {r["measurement_seed"] for r in blind}
    assert len(seeds) == 2  # two images, two kernels
    for r in blind:
        kept = load_file(str(tmp_path / r["recon"]))
        assert torch.equal(kept["kernel"], physics.kernel(r["measurement_seed"]))
        assert r["kernel_error"] == pytest.approx(kernel_error(kept["kernel_hat"], kept["kernel"]), abs=1e-6)
        assert 0 < r["kernel_error"] < 2
    assert all(r["kernel_error"] is None for (s, _), r in rows.items() if s == "baseline")
    summary = (tmp_path / "summary.md").read_text()
    assert "kernel error" in summary and "Not applicable" in summary
    assert (tmp_path / "grid.png").stat().st_size > 1000
