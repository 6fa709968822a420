"""Volumes: z-coupled reconstruction from 2D priors against slice-by-slice, side by side in one run.

Two volumes, each reconstructed by every method in its own process (so the peak resident
memory of a method is its own):

* **CT**: a phantom volume of :func:`invdiff.data.phantoms.ct_volume` (held-out stream 1,
  anatomy varying smoothly along z), 32 slices of 128², sparse-view parallel-beam CT per
  slice (``ct-sparse-<N>``, σ = 0.01) with 30 views (the issue's setting) and 8 (the DDS-3D
  and DiffusionMBIR papers' sparsest), prior ``ct-phantom-patch-64``;
* **brain**: the MNI152 head of :func:`invdiff.data.mni.volume` (80³, about 2.5 mm voxels, a
  domain-randomised contrast, seed 0), 3D Cartesian MRI undersampling the two phase-encode
  directions 8x (``mri3d-8x``), prior ``mri-brain-patch-64`` on axial slices and, for TPDM,
  ``mri-brain-coronal-patch-64`` on coronal slices, both in blended-tiles mode (at 80² four
  tiles per slice against nine random-offset patches: 2.7x faster, the same quality within
  0.1 dB on 2D, ``docs/benchmarks/resolution.md``).

Methods: the operator's baseline (FBP per slice / zero-filled 3D IFFT); **slice-by-slice**,
DDS with the 2D prior on every slice and no z coupling (``DDS3D(rho=0, tv_weight=0)``, which
equals DDS run slice by slice, tested); **DDS-3D** (TV-z ADMM, 50 steps); **TPDM** (the two
perpendicular priors alternating, K = 2; brain only: there is no perpendicular CT prior);
**DiffusionMBIR** (VE predictor-corrector + TV-z ADMM, 50 predictor steps, so 99 network
evaluations). Scores: 3D PSNR (peak 1), 3D SSIM (scikit-image on the volume, data range 1),
the relative error of the z-gradient ``‖Dz x̂ − Dz x‖ / ‖Dz x‖`` (slice-to-slice
consistency), seconds per volume and the peak RSS of the process. The coronal view of
every reconstruction is written as a PNG (``docs/benchmarks/volumes_<case>.png`` with
``--docs``, else into ``--out``).

    python benchmarks/volumes.py [--steps 50] [--views 30,8] [--mbir-steps N] [--threads 2] [--quick] [--docs] [--out DIR]
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

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, for `import invdiff`

CT_PRIOR, BRAIN_PRIOR, CORONAL_PRIOR = "ct-phantom-patch-64", "mri-brain-patch-64", "mri-brain-coronal-patch-64"


def cases(quick: bool, views: tuple[int, ...]) -> list[dict]:
    depth, size, brain = (8, 64, 48) if quick else (32, 128, 80)
    out = [dict(label=f"CT phantom volume {depth}x{size}², {n} views", key=f"ct{n}", family="ct",
                task=f"ct-sparse-{n}", depth=depth, size=size, noise_sigma=0.01,
                methods=["baseline", "slice-by-slice", "dds-3d", "diffusion-mbir"]) for n in views]
    out.append(dict(label=f"MNI brain {brain}³, 3D 8x", key="brain", family="brain", task="mri3d-8x", size=brain,
                    noise_sigma=0.01, mode="tiles",
                    methods=["baseline", "slice-by-slice", "dds-3d", "tpdm", "diffusion-mbir"]))
    return out


def truth(case: dict) -> torch.Tensor:
    if case["family"] == "ct":
        from invdiff.data.phantoms import ct_volume

        return ct_volume(case["depth"], case["size"], seed=0, stream=1)
    from invdiff.data import mni

    return mni.volume(case["size"], seed=0)


def _load(name: str, mode: str | None = None):
    from invdiff import priors

    prior = priors.load(name)
    return prior if mode is None else prior.with_mode(mode)


def run_method(case: dict, method: str, steps: int, threads: int, out: str) -> dict:
    torch.set_num_threads(threads)
    from invdiff import operators
    from invdiff.bench.metrics import volume_metrics
    from invdiff.samplers.volume import DDS3D, TPDM, DiffusionMBIR

    x = truth(case)
    physics = operators.make(case["task"], tuple(x.shape[1:]), noise_sigma=case["noise_sigma"])
    y = physics(x, seed=0)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    info = {}
    if method == "baseline":
        est = physics.A_dagger(y)
    else:
        prior = _load(CT_PRIOR if case["family"] == "ct" else BRAIN_PRIOR, case.get("mode"))
        if method == "slice-by-slice":
            sampler = DDS3D(prior, steps=steps, rho=0.0, tv_weight=0.0)
        elif method == "dds-3d":
            sampler = DDS3D(prior, steps=steps)
        elif method == "tpdm":
            sampler = TPDM(prior, _load(CORONAL_PRIOR, case.get("mode")), steps=steps)
        elif method == "diffusion-mbir":
            sampler = DiffusionMBIR(prior, steps=steps)
        elif method.startswith("diffusion-mbir-"):  # diffusion-mbir-<N>: N predictor steps
            sampler = DiffusionMBIR(prior, steps=int(method.rsplit("-", 1)[1]))
        else:
            raise ValueError(method)
        est = sampler(y, physics, generator=g)
        info = dict(nfe=sampler.last_run.nfe, network_calls=sampler.last_run.extra.get("network_calls"))
    seconds = time.perf_counter() - start
    est = est.clamp(0, 1)
    if out:
        np.save(Path(out) / f"{case['key']}_{method}.npy", est[0, 0, :, est.shape[3] // 2, :].numpy())
        if method == "baseline":
            np.save(Path(out) / f"{case['key']}_truth.npy", x[0, 0, :, x.shape[3] // 2, :].numpy())
    return dict(method=method, seconds=seconds, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                **{k: v for k, v in volume_metrics(est, x).items() if k in ("psnr", "ssim", "z_error")}, **info)


def figure(case: dict, folder: Path, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["truth"] + case["methods"]
    fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names), 2.9))
    for ax, name in zip(axes, names):
        img = np.load(folder / f"{case['key']}_{name}.npy")
        ax.imshow(img, cmap="gray", vmin=0, vmax=1, aspect="auto" if case["family"] == "ct" else "equal")
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(f"{case['label']}: coronal view (z down)", fontsize=10)
    fig.tight_layout()
    tmp = target.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, target)


def _spawn(case: dict, method: str, args, out: str) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps(case), "--method", method, "--steps", str(args.steps),
           "--threads", str(args.threads), "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{case['label']} / {method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("ROW "))[4:])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--views", default="30,8", help="CT views per slice, one CT volume per entry")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small volumes (8x64² CT, 48³ brain)")
    p.add_argument("--mbir-steps", type=int, default=0,
                   help="also run DiffusionMBIR with this many predictor steps on the brain (0: not)")
    p.add_argument("--docs", action="store_true", help="write docs/benchmarks/volumes.md and its PNGs")
    p.add_argument("--out", default=None, help="folder of the coronal PNGs (default: a temporary folder)")
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print("ROW " + json.dumps(run_method(json.loads(args.case), args.method, args.steps, args.threads, args.out)))
        return 0
    from _docs import DOCS, page

    target = DOCS if args.docs else Path(args.out or tempfile.mkdtemp(prefix="invdiff-volumes-"))
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, \
            page("volumes", "Volumes: z-coupled 3D reconstruction from 2D priors against slice-by-slice", args.docs):
        print(f"{args.steps} diffusion steps for every sampler (DiffusionMBIR: {args.steps} predictor + "
              f"{args.steps - 1} corrector network evaluations); every slice of a volume goes through the 2D network "
              f"in one batched call per evaluation; {args.threads} CPU threads. 3D PSNR (dB) / SSIM against the "
              "truth; z-gradient error = ‖Dz x̂ − Dz x‖ / ‖Dz x‖; peak resident memory of the process that ran "
              "the method.\n")
        print("| volume | task | method | 3D PSNR / SSIM | z-gradient error | s / volume | NFE | peak RSS (MB) |")
        print("|---|---|---|---|---|---|---|---|")
        summary = []
        for case in cases(args.quick, tuple(int(v) for v in args.views.split(","))):
            if args.mbir_steps and case["family"] == "brain":
                case["methods"].append(f"diffusion-mbir-{args.mbir_steps}")
            rows = {}
            for method in case["methods"]:
                r = _spawn(case, method, args, scratch)
                rows[method] = r
                print(f"| {case['label']} | {case['task']} | {method} | {r['psnr']:.2f} / {r['ssim']:.3f} | "
                      f"{r['z_error']:.3f} | {r['seconds']:.1f} | {r.get('nfe', '—')} | {r['peak_rss_mb']:.0f} |",
                      flush=True)
            figure(case, Path(scratch), target / f"volumes_{case['key']}.png")
            summary.append((case, rows))
        print("\nAgainst slice-by-slice (target: ≥ +1 dB 3D PSNR and at most half its z-gradient error):\n")
        print("| volume | method | Δ 3D PSNR (dB) | z-gradient error / slice-by-slice's |")
        print("|---|---|---|---|")
        for case, rows in summary:
            ref = rows["slice-by-slice"]
            for method in case["methods"]:
                if method in ("baseline", "slice-by-slice"):
                    continue
                r = rows[method]
                print(f"| {case['label']} | {method} | {r['psnr'] - ref['psnr']:+.2f} | "
                      f"{r['z_error'] / ref['z_error']:.2f} |")
        print("\nCoronal views: " + ", ".join(f"`volumes_{c['key']}.png`" for c, _ in summary)
              + (" (next to this page)" if args.docs else f" in {target}") + ".\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
