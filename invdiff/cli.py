"""The ``invdiff`` command line: ``invdiff demo``, ``invdiff list``.

Every command exits non-zero with a one-line ``invdiff: error: ...`` message on bad input.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]

#: Modules that add their own subcommands: each defines ``register(subparsers)``, which adds
#: its parsers with ``set_defaults(func=...)``. Keep their top-level imports light (import
#: torch-heavy code inside the command functions) so ``invdiff --help`` stays fast.
COMMAND_MODULES: tuple[str, ...] = ("invdiff.train.cli", "invdiff.bench.cli", "invdiff.io.cli")


def _summary(doc: str | None) -> str:
    """The first sentence of a docstring's first paragraph, without reST roles."""
    import re

    para = " ".join((doc or "").strip().split("\n\n")[0].split())
    para = re.sub(r":\w+:`~?(?:[\w.]+\.)?([\w]+)`", r"\1", para).replace("``", "")
    for stop in (": ", ". "):
        if stop in para:
            para = para.split(stop)[0]
    return para.rstrip(".")


def _cmd_list(args: argparse.Namespace) -> int:
    from . import operators, priors, samplers

    what = args.what
    if what in ("operators", "all"):
        print("operators (invdiff.operators.make):")
        for name in operators.available():
            print(f"  {operators.describe(name)}")
    if what in ("samplers", "all"):
        print("samplers (invdiff.samplers.make):")
        for name in samplers.available():
            print(f"  {name}: {_summary(samplers.get(name).__doc__)}")
    if what in ("priors", "all"):
        print("priors (invdiff.priors.load):")
        shipped = priors.available()
        if not shipped:
            print("  (no shipped weights yet; analytic priors: GaussianPrior, GaussianMixturePrior)")
        for name in shipped:
            card = priors.model_card(name)
            print(f"  {name}: {card.get('description', '') if isinstance(card, dict) else card}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_analytic_demo, run_demo

    names = tuple(n.strip() for n in args.samplers.split(",") if n.strip()) if args.samplers else None
    if args.analytic:
        run_analytic_demo(out=Path(args.out), size=args.size or 32, steps=args.steps, samples=args.samples or 8,
                          device=args.device, seed=args.seed, verbose=args.verbose, sampler_names=names)
    else:
        run_demo(out=Path(args.out), size=args.size or 64, steps=args.steps or 25, samples=args.samples or 2,
                 images=args.images, device=args.device, seed=args.seed, verbose=args.verbose, sampler_names=names)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="invdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="reconstruct held-out CT and MRI images with the shipped priors, offline")
    p.add_argument("--out", default="invdiff-demo", help="output folder (default: ./invdiff-demo)")
    p.add_argument("--size", type=int, default=None, help="image side (default 64; --analytic: 32)")
    p.add_argument("--steps", type=int, default=None,
                   help="every sampler's steps (default 25, for a demo in minutes on a CPU; --analytic: each sampler's own)")
    p.add_argument("--samplers", default=None, help="comma-separated sampler names (default: all)")
    p.add_argument("--samples", type=int, default=None, help="posterior samples per image (default 2; --analytic: 8)")
    p.add_argument("--images", type=int, default=2, help="held-out images per task (default 2)")
    p.add_argument("--analytic", action="store_true",
                   help="use an analytic Gaussian prior and compare with the exact posterior mean")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-v", "--verbose", action="store_true", help="show the sampler's progress bar")
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("list", help="list operators, samplers and priors")
    p.add_argument("what", nargs="?", default="all", choices=["all", "operators", "samplers", "priors"])
    p.set_defaults(func=_cmd_list)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded by commands that log provenance
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError, ImportError) as err:
        # ImportError: an optional extra is missing; its message names the pip command
        print(f"invdiff: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("invdiff: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
