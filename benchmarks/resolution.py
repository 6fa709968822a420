"""Native resolution against the resize path, side by side in one run.

For sparse-view CT (``ct-sparse-60``, sigma = 0.01) at 64², 128², 256² and 512² on held-out
phantoms, for 4x MRI (``mri-4x``) at 64² and 256² on held-out MNI slices (at 64² the resize
path is the 64x64 whole-image prior at its own size), and for pydicom's real
scans ``CT_small.dcm`` (128², ``ct-sparse-60``) and ``MR_small.dcm`` (64², ``mri-4x``) at
their own size, three reconstructions scored at the native size
(:func:`invdiff.apps.native.compare_resolutions`):

* ``baseline``: FBP / zero-filled IFFT of the native measurement;
* ``resize``: the 64x64 prior, the image resized down, measured and reconstructed there,
  and resized back up;
* ``native``: the patch prior on the native measurement.

Each case runs in its own process, so its peak memory (``ru_maxrss``) is its own. The real
scans are also run through the command line (``invdiff simulate`` then ``invdiff
reconstruct``) and scored again from the written DICOM files.

    python benchmarks/resolution.py [--steps 100] [--sampler dds] [--threads 2] [--quick] [--docs]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `import invdiff`

PRIORS = {"ct": ("ct-phantom-patch-64", "ct-phantom-64"), "mri": ("mri-brain-patch-64", "mri-brain-64")}


def cases(quick: bool) -> list[dict]:
    n = 1 if quick else 2
    # at 64² the "resize" path is the 64x64 whole-image prior at its own size: what the patch prior gains or
    # loses against it there
    out = [dict(label=f"phantoms {s}²", family="ct", task="ct-sparse-60", size=s, images=n if s < 512 else 1)
           for s in ((64, 128, 256) if quick else (64, 128, 256, 512))]
    out += [dict(label=f"MNI held-out {s}²", family="mri", task="mri-4x", size=s, images=n) for s in (64, 256)]
    out.append(dict(label="CT_small.dcm 128²", family="ct", task="ct-sparse-60", file="CT_small.dcm"))
    out.append(dict(label="MR_small.dcm 64²", family="mri", task="mri-4x", file="MR_small.dcm"))
    return out


def _truth(case: dict) -> torch.Tensor:
    from invdiff import data

    if "file" in case:
        from pydicom.data import get_testdata_file

        from invdiff.io import read
        from invdiff.io.intensity import HU_WINDOW

        stack = read(get_testdata_file(case["file"]))
        return stack.to_unit(stack.value_map(HU_WINDOW)).float()
    dataset = "ct-phantom" if case["family"] == "ct" else "mri-brain"
    return data.heldout(dataset, case["images"], size=case["size"])


def run_case(case: dict, sampler: str, steps: int, threads: int) -> list[dict]:
    torch.set_num_threads(threads)
    from invdiff import priors
    from invdiff.apps.native import compare_resolutions

    truth = _truth(case)
    patch_name, small_name = PRIORS[case["family"]]
    patch, small = priors.load(patch_name), priors.load(small_name)
    patch.name, small.name = patch_name, small_name
    rows = []
    # at 64x64 (MR_small.dcm) the "resize" path is the 64x64 prior at native size
    for method in ("baseline", "resize", "native"):  # one at a time: the peak memory of each is reported
        r, _ = compare_resolutions(truth, case["task"], patch, small, sampler, steps=steps, seed=0,
                                   noise_sigma=0.01 if case["family"] == "ct" else None, methods=(method,))
        r[0]["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r[0]["case"] = case["label"]
        rows += r
    return rows


def via_files(case: dict, sampler: str, steps: int, threads: int) -> dict:
    """The real scan through ``invdiff simulate`` + ``invdiff reconstruct`` (patch prior), PSNR
    recomputed from the written DICOM against the input file, and of FBP / zero-filling of the
    written measurement."""
    from pydicom.data import get_testdata_file

    from invdiff.apps.workflows import open_measurement
    from invdiff.bench.metrics import mean_psnr_ssim
    from invdiff.cli import main
    from invdiff.io import read
    from invdiff.io.intensity import HU_WINDOW

    torch.set_num_threads(threads)
    src = get_testdata_file(case["file"])
    patch_name = PRIORS[case["family"]][0]
    with tempfile.TemporaryDirectory() as tmp:
        m_path, out = Path(tmp) / "m.h5", Path(tmp) / "rec"
        noise = ["--noise-sigma", "0.01"] if case["family"] == "ct" else []
        assert main(["simulate", "--input", src, "--task", case["task"], "--out", str(m_path), "--seed", "0",
                     *noise]) == 0
        assert main(["reconstruct", "--measurement", str(m_path), "--prior", patch_name, "--sampler", sampler,
                     "--steps", str(steps), "--out", str(out), "--seed", "2", "-q"]) == 0
        provenance = json.loads((out / "provenance.json").read_text())
        source, written = read(src), read(next((out / "mean").iterdir()))
        vm = source.value_map(HU_WINDOW)
        truth, rec = source.to_unit(vm).float(), written.to_unit(vm).float()
        m = open_measurement(m_path)
        with torch.no_grad():
            base = m.physics(0, "cpu").A_dagger(m.y[:1])
        base = base if base.shape[1] == 1 else base.square().sum(1, keepdim=True).sqrt()
        return dict(case=case["label"], size=f"{truth.shape[-2]}x{truth.shape[-1]}",
                    geometry_unchanged=written.shape == source.shape,
                    resample=provenance.get("measurement", {}).get("resample", {}).get("method"),
                    native_psnr_ssim=mean_psnr_ssim(rec.clamp(0, 1), truth),
                    baseline_psnr_ssim=mean_psnr_ssim(base.clamp(0, 1), truth))


MODE_SAMPLERS = ("dds", "diffpir", "reddiff", "dps")


def modes(threads: int, steps: int) -> list[dict]:
    """Random offsets (PaDIS) against blended tiles, per sampler, on 256² CT (2 phantoms)."""
    torch.set_num_threads(threads)
    from invdiff import data, priors
    from invdiff.apps.native import compare_resolutions

    patch = priors.load(PRIORS["ct"][0])
    truth = data.heldout("ct-phantom", 2, size=256)
    rows = []
    for name in MODE_SAMPLERS:
        for mode in ("random", "tiles"):
            r, _ = compare_resolutions(truth, "ct-sparse-60", patch.with_mode(mode), None, name, steps=steps,
                                       noise_sigma=0.01, methods=("native",))
            rows.append(dict(sampler=name, mode=mode, psnr=r[0]["psnr"], ssim=r[0]["ssim"],
                             seconds=r[0]["seconds_per_image"], nfe=r[0]["nfe"]))
    return rows


def _child(args) -> int:
    case = json.loads(args.case)
    if case.get("modes"):
        rows = modes(args.threads, case["steps"])
    else:
        rows = via_files(case, args.sampler, args.steps, args.threads) if args.files else \
            run_case(case, args.sampler, args.steps, args.threads)
    print("ROWS " + json.dumps(rows))
    return 0


def _spawn(case: dict, args, files: bool = False):
    cmd = [sys.executable, __file__, "--case", json.dumps(case), "--sampler", args.sampler, "--steps",
           str(args.steps), "--threads", str(args.threads)] + (["--files"] if files else [])
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['label']} failed:\n{proc.stderr[-3000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROWS "))
    return json.loads(line[5:]), time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sampler", default="dds")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="fewer images, no 512²")
    p.add_argument("--docs", action="store_true", help="write docs/benchmarks/resolution.md")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--files", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        return _child(args)
    from _docs import page

    with page("resolution", "Native resolution: patch priors at native size against the resize path", args.docs):
        print(f"Sampler {args.sampler}, {args.steps} steps (network calls) for every prior path; "
              f"σ = 0.01 on CT, the task's default noise on MRI; PSNR (dB) / SSIM at the native size; "
              f"seconds per image; peak resident memory of the process that ran the method.\n")
        print("| case | task | method | prior | reconstructed at | PSNR / SSIM | s / image | peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        gains = []
        for case in cases(args.quick):
            rows, _ = _spawn(case, args)
            by = {r["method"]: r for r in rows}
            for r in rows:
                print(f"| {case['label']} | {r['task']} | {r['method']} | {r['prior'] or '—'} | {r['reconstructed_at']} "
                      f"| {r['psnr']:.2f} / {r['ssim']:.3f} | {r['seconds_per_image']:.1f} | {r['peak_rss_mb']:.0f} |",
                      flush=True)
            gains.append((case["label"], by["native"]["psnr"] - by["baseline"]["psnr"],
                          by["native"]["psnr"] - by["resize"]["psnr"]))
        print("\nGain of the patch prior at native size (dB):\n")
        print("| case | over the baseline | over the resize path |")
        print("|---|---|---|")
        for label, over_base, over_resize in gains:
            print(f"| {label} | {over_base:+.2f} | {over_resize:+.2f} |")
        print("\nReal scans through the command line (`invdiff simulate`, `invdiff reconstruct` with the patch prior), "
              "scored from the written files:\n")
        print("| scan | size | geometry unchanged | resampling recorded | baseline PSNR / SSIM | patch prior PSNR / SSIM |")
        print("|---|---|---|---|---|---|")
        for case in cases(args.quick):
            if "file" not in case:
                continue
            r, _ = _spawn(case, args, files=True)
            b, n = r["baseline_psnr_ssim"], r["native_psnr_ssim"]
            print(f"| {r['case']} | {r['size']} | {r['geometry_unchanged']} | {r['resample']} | "
                  f"{b[0]:.2f} / {b[1]:.3f} | {n[0]:.2f} / {n[1]:.3f} |", flush=True)
        if not args.quick:
            steps = 50
            rows, _ = _spawn(dict(label="modes", modes=True, steps=steps), args)
            print(f"\nAssembly of the patch prior, per sampler: random offsets (PaDIS) against blended tiles "
                  f"(deterministic), ct-sparse-60 at 256², 2 held-out phantoms, {steps} steps:\n")
            print("| sampler | random: PSNR / SSIM | tiles: PSNR / SSIM | random s / image | tiles s / image | NFE |")
            print("|---|---|---|---|---|---|")
            for name in MODE_SAMPLERS:
                a, b = [next(r for r in rows if r["sampler"] == name and r["mode"] == m) for m in ("random", "tiles")]
                print(f"| {name} | {a['psnr']:.2f} / {a['ssim']:.3f} | {b['psnr']:.2f} / {b['ssim']:.3f} | "
                      f"{a['seconds']:.1f} | {b['seconds']:.1f} | {a['nfe']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
