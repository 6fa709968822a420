"""Sampler overhead: wall time / (the same network calls in a bare loop), every sampler.

Batch 1 (one measurement), CPU, the shipped ``ct-phantom-64`` prior (an EDM-preconditioned
1.24 M-parameter U-Net at 64x64), on inpainting and on sparse-view CT (where DPS's default rule adds a CG
solve and DDS / DiffPIR / MCG their CG steps). For each sampler the run's own accounting
(``last_run``: ``nfe``, ``nfe_backward``, images per call) is replayed right before the
run as a bare loop of the same number of forward passes and forward+backward passes, at
the same batch, at noise levels spread like a schedule; the ratio is

    wall time of the sampler / wall time of that bare loop

so 1.00 means the sampler costs exactly its network calls (DESIGN.md's target: <= 1.10 for
DPS and MCG). A sampler with no backward pass (DDS, DiffPIR, RED-Diff, DAPS, EnKG) is
compared with forward passes only; EnKG's calls are batches of the whole ensemble (in chunks
of ``max_batch``); SMC's are batches of its particles. deepinv's ``DPS`` on the same network is
measured beside invdiff's.

    python benchmarks/overhead.py [--steps 30] [--repeats 3] [--samplers dps,dps:weighting=paper,mcg,...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import deepinv as dinv
import torch

from _timing import network_loop
from invdiff import operators, priors, samplers
from invdiff.bench.grid import parse_spec

#: overrides that keep the CPU run short (the ratio does not depend on them)
SMALL = {"enkg": dict(ensemble_size=16, max_batch=None), "smc": dict(particles=8), "daps": dict(),
         "resample": dict(consistency_every=10)}


class Counting(dinv.models.Denoiser):
    """Counts the calls of a denoiser (for deepinv's sampler, which does not report NFE)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, sigma, *args, **kwargs):
        self.calls += 1
        return self.inner(x, sigma)


def network_time(prior, shape, batch: int, forward: int, backward: int) -> float:
    """Seconds of a bare loop of ``forward`` forward passes and ``backward`` forward+backward
    passes (gradient w.r.t. the input, what guidance needs) of ``batch`` images each."""
    g = torch.Generator().manual_seed(0)
    return network_loop(prior, torch.randn(batch, *shape, generator=g), forward, backward)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samplers", default=",".join(samplers.available()) + ",dps:weighting=paper",
                        help="NAME[:key=value...], comma-separated")
    parser.add_argument("--tasks", default="inpaint-random-70,ct-sparse-30")
    parser.add_argument("--no-deepinv", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # a trained network: samplers on random weights diverge (guidance through a random
    # Jacobian at sigma = 80 explodes), which says nothing about their overhead
    prior = priors.load("ct-phantom-64")
    shape = prior.image_shape
    x_true = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    problems = {name: operators.make(name, shape, seed=0) for name in args.tasks.split(",") if name}
    measurements = {name: p(x_true, seed=1) for name, p in problems.items()}
    specs = [parse_spec(n) for n in args.samplers.split(",") if n]  # NAME[:key=value...]

    network_time(prior, shape, 1, 3, 3)  # warm-up
    rows = []
    for rep in range(args.repeats):
        for task, physics in problems.items():
            y = measurements[task]
            for name, options in specs:
                label = name + "".join(f":{k}={v}" for k, v in options.items())
                sampler = samplers.make(name, prior, steps=args.steps, **{**SMALL.get(name, {}), **options})
                sampler(y, physics, generator=torch.Generator().manual_seed(rep))  # learn its accounting
                info = sampler.last_run
                per_call = info.batch if name not in ("enkg", "smc") else info.batch * (
                    sampler.ensemble_size if name == "enkg" else sampler.particles)
                bare = network_time(prior, shape, per_call, info.nfe - info.nfe_backward, info.nfe_backward)
                sampler(y, physics, generator=torch.Generator().manual_seed(rep))
                info = sampler.last_run
                rows.append((task, f"invdiff {label}", info.nfe, info.nfe_backward, per_call, info.wall_time, bare))
            if not args.no_deepinv:
                counting = Counting(prior)
                theirs = dinv.sampling.DPS(counting, num_steps=args.steps, dtype=torch.float32)
                start = time.perf_counter()
                theirs(y, physics, seed=rep)
                wall = time.perf_counter() - start
                bare = network_time(prior, shape, 1, 0, counting.calls)
                rows.append((task, "deepinv DPS", counting.calls, counting.calls, 1, wall, bare))
        print(f"repeat {rep + 1}/{args.repeats} done", flush=True)

    print(f"\nSampler overhead, {args.steps} steps, one measurement, CPU x{args.threads}, prior ct-phantom-64 "
          f"({sum(p.numel() for p in prior.parameters()) / 1e6:.2f} M params); median over {args.repeats} repeats; "
          f"ensemble / particles: {SMALL['enkg']['ensemble_size']} / {SMALL['smc']['particles']}")
    print("| task | sampler | NFE | of which backward | images per call | wall s | bare network loop s "
          "| wall / bare |\n|---|---|---|---|---|---|---|---|")
    for task, label in dict.fromkeys((r[0], r[1]) for r in rows):
        sel = [r for r in rows if r[0] == task and r[1] == label]
        ratio = statistics.median(r[5] / r[6] for r in sel)
        print(f"| {task} | {label} | {sel[0][2]} | {sel[0][3]} | {sel[0][4]} | "
              f"{statistics.median(r[5] for r in sel):.2f} | {statistics.median(r[6] for r in sel):.2f} "
              f"| {ratio:.3f} |")


if __name__ == "__main__":
    main()
