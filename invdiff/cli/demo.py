"""``invdiff demo``: :mod:`invdiff.apps.demo` on the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from .options import add_device, add_progress, add_runtime, add_seed, runtime_options

__all__ = ["register"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..apps.demo import run_analytic_demo, run_demo

    names = tuple(n.strip() for n in args.samplers.split(",") if n.strip()) if args.samplers else None
    runtime = runtime_options(args)
    if args.analytic and (runtime["dtype"] not in (None, "float32") or runtime["compile"]):
        raise ValueError("--analytic uses an analytic prior, which has no network: --dtype and --compile do not apply")
    if args.native:
        from ..apps.native import run_native_demo

        if names is not None and len(names) != 1:
            raise ValueError("--native runs one sampler (--samplers NAME)")
        run_native_demo(out=Path(args.out), steps=args.steps or 25, sampler=names[0] if names else "dds",
                        images=args.images, device=args.device, seed=args.seed, **runtime)
    elif args.analytic:
        run_analytic_demo(out=Path(args.out), size=args.size or 32, steps=args.steps, samples=args.samples or 8,
                          device=args.device, seed=args.seed, verbose=args.verbose, sampler_names=names)
    else:
        run_demo(out=Path(args.out), size=args.size or 64, steps=args.steps or 25, samples=args.samples or 2,
                 images=args.images, device=args.device, seed=args.seed, verbose=args.verbose, sampler_names=names,
                 **runtime)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="reconstruct held-out CT and MRI images with the shipped priors, offline")
    p.add_argument("--out", default="invdiff-demo",
                   help="output folder (default: ./invdiff-demo); the benchmark cells go to OUT/bench, and running "
                        "again with the same settings reuses the finished ones")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; --analytic: 32)")
    p.add_argument("--steps", type=int, default=None,
                   help="every sampler's steps (default 25, for a demo in minutes on a CPU; --analytic: each sampler's own)")
    p.add_argument("--samplers", default=None, help="comma-separated sampler names (default: all)")
    p.add_argument("--samples", type=int, default=None, help="posterior samples per image (default 2; --analytic: 8)")
    p.add_argument("--images", type=int, default=2, help="held-out images per task (default 2)")
    p.add_argument("--analytic", action="store_true",
                   help="use an analytic Gaussian prior and compare with the exact posterior mean")
    p.add_argument("--native", action="store_true",
                   help="reconstruct 256x256 CT and MRI at native size with the patch priors, against the 64x64 "
                        "priors with resizing (one sampler, default dds)")
    add_device(p)
    add_runtime(p)
    add_seed(p)
    add_progress(p)
    p.set_defaults(func=_cmd_demo)
