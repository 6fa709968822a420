import subprocess
from pathlib import Path
import sys

from invdiff.cli import main
from invdiff.apps.demo import run_analytic_demo


def test_list_prints_operators_samplers_priors(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("ct-sparse-<N>", "mri-<R>x", "phase-retrieval", "dps", "priors"):
        assert name in out


def test_demo_writes_figure_and_every_sampler_beats_the_baseline(tmp_path):
    from invdiff import samplers

    rows = run_analytic_demo(out=tmp_path, size=16, steps=40, samples=2, tasks=("ct-sparse-30", "inpaint-random-70"))
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "ct-sparse-30" in (tmp_path / "demo.md").read_text()
    assert not list(tmp_path.glob("*.tmp*")) and len(list(tmp_path.iterdir())) == 2
    psnr = {(r["task"], r["sampler"]): r["psnr_ssim"][0] for r in rows}
    for task in ("ct-sparse-30", "inpaint-random-70"):
        for name in samplers.available():
            if samplers.get(name).handles_blind:  # BlindDPS takes only the blind task: not in the demo
                assert all(r["sampler"] != name for r in rows)
                continue
            if (task, name) not in psnr:  # refused: only the SVD samplers, only on CT
                assert getattr(samplers.get(name), "needs_svd", False) and task.startswith("ct-"), (task, name)
                continue
            # every sampler (mean of 2 samples, 40 steps) beats the classical baseline by 5 dB and
            # is within 8 dB of the exact posterior mean (measured: +11.7 dB or more over the
            # baselines; worst gap to the exact mean 7.1 dB, RED-Diff on CT, a point estimate)
            assert psnr[task, name] > psnr[task, "baseline"] + 5.0, (task, name, psnr)
            assert psnr[task, name] > psnr[task, "exact"] - 8.0, (task, name, psnr)
    assert all(r["nfe"] >= 40 for r in rows if r["sampler"] in samplers.available())


def test_bad_arguments_exit_non_zero_with_one_line(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--size", "4"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("invdiff: error:") and "--size" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "d").exists()


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "invdiff", "list", "samplers"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "dps" in proc.stdout


def test_shipped_priors_are_listed_loadable_and_small(capsys):
    from invdiff import priors

    for name, data in (("ct-phantom-64", "ct-phantom"), ("mri-brain-64", "mri-brain")):
        assert name in priors.available()
        card = priors.model_card(name)
        assert card["data"] == data and card["image_size"] == 64 and card["steps"] > 0
        assert card["command"].startswith("invdiff train") and card["steps_per_second"] > 0
        assert set(card["heldout_denoising_psnr"]) == {"sigma=0.1", "sigma=0.5"}
        assert Path(card["file"]).stat().st_size < 20e6
        prior = priors.load(name)
        assert prior.image_shape == (1, 64, 64)
    assert main(["list", "priors"]) == 0
    out = capsys.readouterr().out
    assert "ct-phantom-64" in out and "mri-brain-64" in out


def test_demo_on_shipped_priors_beats_the_baselines_and_resumes(tmp_path, capsys):
    from invdiff.apps.demo import run_demo
    from invdiff.bench import load_results

    stats = run_demo(out=tmp_path, images=2, samples=2, steps=30, sampler_names=("dps",))
    psnr = {(s["task"], s["sampler"]): s["psnr_mean"] for s in stats}
    for task in ("ct-sparse-30", "mri-4x"):
        # DPS with 30 steps, mean of 2 samples, 2 held-out images: well above FBP / zero-filled
        assert psnr[task, "dps"] > psnr[task, "baseline"] + 2.0, psnr
        assert all(s["n"] == 2 and s["n_failed"] == 0 for s in stats)
    md = (tmp_path / "demo.md").read_text()
    assert "| task | prior | baseline (A_dagger) | dps |" in md and "| mri-4x | mri-brain-64 |" in md
    assert f"{psnr['ct-sparse-30', 'dps']:.2f} / " in md and "Seconds (NFE)" in md
    assert (tmp_path / "demo.png").stat().st_size > 1000
    # the demo is a benchmark grid: 2 tasks x (baseline, dps) x 2 images, each the mean of 2 samples
    rows = load_results(tmp_path / "bench")
    assert len(rows) == 8 and {r["samples"] for r in rows} == {2} and {r["lpips"] for r in rows} == {None}
    capsys.readouterr()
    again = run_demo(out=tmp_path, images=2, samples=2, steps=30, sampler_names=("dps",))
    out = capsys.readouterr().out
    assert again == stats and "4 finished cells reused" in out and " dB (" not in out  # nothing ran again
    assert len(load_results(tmp_path / "bench")) == 8
