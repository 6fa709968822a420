"""Harness overhead of ``invdiff bench``: its wall time against the samplers' own time on the same grid.

The same grid is run twice, side by side in one process, alternating ``--repeats`` times:

* **bench**: ``invdiff.bench.run(...)`` into a fresh folder, timed as a whole — prior, image
  and operator set-up, measurement, metrics (PSNR, SSIM), one fsynced JSON line per cell,
  the kept reconstructions, the final merge, ``summary.md``/``.csv`` and ``grid.png``;
* **bare**: a plain loop over the same cells that only calls each sampler on the same
  measurement with the same generator (the samplers' own time, timed around the loop).

Overhead = bench / bare - 1, and also against the sum of the ``wall_time`` the samplers
recorded inside the bench. Target: under 5 %.

The prior is a shipped one when given (``--prior ct-phantom-64``); by default, until the
shipped priors exist, a stand-in with their cost: a 1.2 M-parameter guided-diffusion
U-Net at 64x64 with random weights (the network of ``benchmarks/overhead.py``).

    python benchmarks/harness_overhead.py [--prior ct-phantom-64] [--steps 30] [--images 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from invdiff import operators, priors, samplers
from invdiff.bench import run
from invdiff.bench.images import load_images
from invdiff.bench.runner import SeededSampler
from invdiff.bench.grid import derive_seed


def stand_in_prior():
    from invdiff.priors.adm import ADMConfig, ADMPrior, GuidedDiffusionUNet

    cfg = ADMConfig(image_size=64, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                    attention_resolutions="16", num_head_channels=32, learn_sigma=True)
    torch.manual_seed(0)  # benchmark script, not library code: random network weights
    return ADMPrior(GuidedDiffusionUNet(cfg)).eval().requires_grad_(False)


def bare(prior, tasks, names, images, seeds, steps) -> float:
    """Seconds of the samplers alone on the bench's cells (same measurements and generators)."""
    built = {n: samplers.make(n, prior, steps=steps) for n in names}
    total = 0.0
    for task in tasks:
        physics = operators.make(task, img_size=prior.image_shape)
        for image in images:
            for seed in seeds:
                y = physics(image.x[None], seed=derive_seed("measurement", physics.task, image.id, seed))
                for n in names:
                    start = time.perf_counter()
                    SeededSampler(built[n], derive_seed("sampler", seed))(y, physics)
                    total += time.perf_counter() - start
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default=None, help="shipped prior or checkpoint (default: the stand-in network)")
    parser.add_argument("--images-from", default="ct-phantom")
    parser.add_argument("--tasks", default="ct-sparse-30,mri-4x")
    parser.add_argument("--samplers", default="dds,reddiff,dps")
    parser.add_argument("--images", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    prior = priors.load(args.prior) if args.prior else stand_in_prior()
    label = args.prior or "stand-in ADM U-Net 64x64, 1.2 M parameters, random weights"
    tasks, names = args.tasks.split(","), args.samplers.split(",")
    images = load_images(args.images_from, args.images, prior, label)
    seeds = [0]
    cells = len(tasks) * len(names) * len(images) * len(seeds)
    print(f"grid: {len(tasks)} tasks x {len(names)} samplers x {len(images)} images x {len(seeds)} seed "
          f"= {cells} cells, {args.steps} steps, prior {label}, {args.threads} threads")

    bare(prior, tasks[:1], names[:1], images[:1], seeds, 2)  # warm-up
    results = []
    for rep in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="invdiff-harness-"))
        try:
            start = time.perf_counter()
            result = run(args.tasks, args.samplers, {label: prior}, images=args.images_from, n_images=args.images,
                         seeds=1, steps=args.steps, out=out, progress=False)
            t_bench = time.perf_counter() - start
            assert result.failed == 0, [r["error"] for r in result.rows if r["status"] != "ok"]
            t_recorded = sum(r["wall_time"] for r in result.rows)
            t_cells = sum(r["cell_time"] for r in result.rows)
        finally:
            shutil.rmtree(out)
        t_bare = bare(prior, tasks, names, images, seeds, args.steps)
        results.append((t_bench, t_bare, t_recorded, t_cells))
        print(f"repeat {rep}: bench {t_bench:.2f} s (cells {t_cells:.2f} s), bare samplers {t_bare:.2f} s, "
              f"samplers' recorded wall_time {t_recorded:.2f} s")

    over_bare = statistics.median(b / s - 1 for b, s, _, _ in results)
    over_rec = statistics.median(b / r - 1 for b, _, r, _ in results)
    over_cells = statistics.median(c / r - 1 for _, _, r, c in results)
    fixed = statistics.median(b - c for b, _, _, c in results)
    print(f"harness overhead (median of {args.repeats}): bench / bare samplers - 1 = {100 * over_bare:+.1f} %; "
          f"bench / recorded sampler time - 1 = {100 * over_rec:+.1f} %; "
          f"per-cell harness only = {100 * over_cells:+.1f} % (target < 5 %); "
          f"fixed per grid (set-up, summary, figure) {fixed:.2f} s")


if __name__ == "__main__":
    main()
