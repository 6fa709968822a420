"""Sampler overhead: wall time / (NFE x one forward+backward of the same network).

Batch 1, CPU, a fixed small guided-diffusion U-Net (64x64, 1 channel), measured side by
side in one run for invdiff's DPS (both step-size rules, on inpainting and on sparse-view
CT where the default rule adds a CG solve) and deepinv's ``DPS`` on the same network.
Target (DESIGN.md): ratio <= 1.10.

    python benchmarks/overhead.py [--steps 50] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import deepinv as dinv
import torch

from invdiff import operators
from invdiff.priors.adm import ADMConfig, ADMPrior, GuidedDiffusionUNet
from invdiff.samplers import DPS


class Counting(dinv.models.Denoiser):
    """Counts the calls of a denoiser (for deepinv's sampler, which does not report NFE)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x, sigma, *args, **kwargs):
        self.calls += 1
        return self.inner(x, sigma)


def forward_backward_time(prior, shape, calls: int) -> float:
    """Seconds per call of a bare loop of ``calls`` denoiser forward + backward passes w.r.t.
    the input (exactly what DPS needs per step), at noise levels spread like a schedule.
    Timed right before each sampler run so both see the same machine state."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *shape, generator=g)
    start = time.perf_counter()
    for i in range(calls):
        xg = x.detach().requires_grad_(True)
        out = prior.denoise(xg, 80.0 * 0.8**i + 0.002)
        (grad,) = torch.autograd.grad(out, xg, grad_outputs=torch.ones_like(out))
    return (time.perf_counter() - start) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = ADMConfig(image_size=64, in_channels=1, model_channels=32, num_res_blocks=1, channel_mult="1,2,2",
                    attention_resolutions="16", num_head_channels=32, learn_sigma=True)
    torch.manual_seed(0)  # benchmark script, not library code: random network weights
    prior = ADMPrior(GuidedDiffusionUNet(cfg)).eval().requires_grad_(False)
    shape = prior.image_shape
    x_true = torch.rand(1, *shape, generator=torch.Generator().manual_seed(1))
    problems = {name: operators.make(name, shape, seed=0) for name in ("inpaint-random-70", "ct-sparse-30")}
    measurements = {name: p(x_true, seed=1) for name, p in problems.items()}

    forward_backward_time(prior, shape, 5)  # warm-up
    rows = []
    for rep in range(args.repeats):
        for name, physics in problems.items():
            y = measurements[name]
            for label, sampler in [
                ("invdiff DPS (likelihood, default)", DPS(prior, steps=args.steps)),
                ("invdiff DPS (paper rule)", DPS(prior, steps=args.steps, weighting="paper")),
            ]:
                t_fb = forward_backward_time(prior, shape, args.steps)
                sampler(y, physics, generator=torch.Generator().manual_seed(rep))
                info = sampler.last_run
                rows.append((name, label, info.wall_time / (info.nfe * t_fb), info.nfe, info.wall_time, t_fb))
            counting = Counting(prior)
            theirs = dinv.sampling.DPS(counting, num_steps=args.steps, dtype=torch.float32)
            t_fb = forward_backward_time(prior, shape, args.steps)
            start = time.perf_counter()
            theirs(y, physics, seed=rep)
            wall = time.perf_counter() - start
            rows.append((name, "deepinv DPS", wall / (counting.calls * t_fb), counting.calls, wall, t_fb))
        print(f"repeat {rep + 1}/{args.repeats}: one forward+backward = {1000 * t_fb:.1f} ms", flush=True)

    print(f"\nDPS overhead, {args.steps} steps, batch 1, CPU x{args.threads}, ADM U-Net 64x64 "
          f"({sum(p.numel() for p in prior.parameters()) / 1e6:.2f} M params); median over {args.repeats} repeats")
    print("| task | sampler | NFE | wall s | fwd+bwd ms | wall / (NFE x fwd+bwd) |\n|---|---|---|---|---|---|")
    keys = dict.fromkeys((r[0], r[1]) for r in rows)
    for task, label in keys:
        sel = [r for r in rows if r[0] == task and r[1] == label]
        ratio = statistics.median(r[2] for r in sel)
        print(f"| {task} | {label} | {sel[0][3]} | {statistics.median(r[4] for r in sel):.2f} "
              f"| {1000 * statistics.median(r[5] for r in sel):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()
