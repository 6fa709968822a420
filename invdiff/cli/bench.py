"""``invdiff bench`` and ``invdiff bench report RESULTS`` (registered through ``invdiff.cli.COMMAND_MODULES``).

Heavy imports happen inside the command functions so that ``invdiff --help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from .options import add_device, add_progress, add_runtime, progress

__all__ = ["register"]

_EXAMPLE = ("example: invdiff bench --tasks ct-sparse-30,mri-4x --samplers dps,reddiff --prior ct-phantom-64 "
            "--images 8 --seeds 1 --steps 50 --out DIR   (multi-GPU: torchrun --nproc-per-node N -m invdiff bench ...)")


def _cmd_bench(args: argparse.Namespace) -> int:
    from ..bench.grid import load_toml
    from ..bench.runner import run

    cfg = load_toml(args.config) if args.config else {}
    flags = {
        "tasks": args.tasks, "samplers": args.samplers, "priors": args.priors, "images": args.images_from,
        "n_images": args.images, "seeds": args.seeds, "steps": args.steps, "out": args.out, "device": args.device,
        "save_recon": args.save_recon, "size": args.size, "depth": args.depth, "figure_images": args.figure_images, "lpips_net": args.lpips_net,
        "dtype": args.dtype, "batch": args.batch,
    }
    cfg.update({k: v for k, v in flags.items() if v is not None})
    for flag in ("rerun_failed", "verbose", "compile"):
        if getattr(args, flag):
            cfg[flag] = True
    if args.no_lpips:
        cfg["lpips"] = False
    for key, flag in (("tasks", "--tasks"), ("samplers", "--samplers"), ("priors", "--prior")):
        if not cfg.get(key):
            raise ValueError(f"bench: {flag} is required (on the command line or in --config)")
    cfg.setdefault("out", "invdiff-bench")
    inputs = [args.config] if args.config else []  # out must keep clear of it (and of the images, priors)
    result = run(**cfg, inputs=inputs, progress=progress(args))
    if int(os.environ.get("RANK", "0")) == 0:
        summary = result.files.get("summary.md")
        if summary is not None:
            print(Path(summary).read_text())
        print(f"invdiff bench: {result.cells} cells ({result.skipped} already done, {result.ran} run here, "
              f"{result.failed} failed); results in {Path(result.out) / 'results.jsonl'}"
              + "".join(f", {p}" for p in result.files.values()))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from ..bench.report import report

    paths = report(args.results, out=args.out, figure_images=args.figure_images)
    print(Path(paths["summary.md"]).read_text())
    print("invdiff bench report: wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``bench`` (with its ``report`` action) to the ``invdiff`` command line."""
    p = subparsers.add_parser(
        "bench", help="benchmark samplers on a grid of tasks x samplers x priors x images x seeds",
        description="Run (or resume) a benchmark grid; every finished cell is appended to DIR/results.jsonl. "
                    + _EXAMPLE,
    )
    p.add_argument("--config", default=None, help="TOML file with run()'s arguments (flags given here override it)")
    p.add_argument("--tasks", default=None, help="comma-separated task names, each NAME[:key=value...]")
    p.add_argument("--samplers", default=None,
                   help="comma-separated sampler names, each NAME[:key=value...]; "
                        "baseline = the operator's A_dagger (FBP, zero-filled, ...)")
    p.add_argument("--prior", "--priors", dest="priors", default=None,
                   help="prior name(s) or path(s), comma-separated (gaussian-<N>: analytic Gaussian prior)")
    p.add_argument("--images-from", default=None,
                   help="image source: ct-phantom, mri-brain, prior, or a folder (default: from the prior)")
    p.add_argument("--images", type=int, default=None, help="number of images (default: all / 8 prior samples)")
    p.add_argument("--seeds", default=None, help="a count S (seeds 0..S-1) or a comma list (default 1)")
    p.add_argument("--steps", type=int, default=None, help="override every sampler's number of steps")
    p.add_argument("--batch", type=int, default=None, metavar="N",
                   help="up to N cells of one prior, task and sampler (the images, seeds) per sampler call, one "
                        "generator per cell: the same rows as one by one (default 1)")
    p.add_argument("--size", default=None,
                   help="image size of the grid, N or HxW (default: a fixed-size prior's own, 256 for a patch prior)")
    p.add_argument("--depth", type=int, default=None,
                   help="a volume grid: volumes of D slices (volume samplers dds-3d, tpdm, diffusion-mbir; 3D metrics)")
    p.add_argument("--out", default=None, help="output folder (default ./invdiff-bench); rerunning resumes")
    add_device(p, from_config=True)
    add_runtime(p)
    p.add_argument("--rerun-failed", action="store_true", help="run again the cells recorded as failed")
    p.add_argument("--save-recon", default=None, choices=["figure", "all", "none"],
                   help="reconstructions to keep (default: those of the figure)")
    p.add_argument("--figure-images", type=int, default=None, help="images shown in grid.png (default 2)")
    p.add_argument("--no-lpips", action="store_true", help="do not compute LPIPS even if its weights are here")
    p.add_argument("--lpips-net", default=None, choices=["alex", "vgg", "squeeze"])
    add_progress(p)
    p.set_defaults(func=_cmd_bench)

    actions = p.add_subparsers(dest="bench_action", metavar="{report}")
    r = actions.add_parser("report", help="rebuild summary.md, summary.csv and grid.png from a results file")
    r.add_argument("results", help="results.jsonl, or the benchmark folder")
    r.add_argument("--out", default=None, help="where to write (default: the results file's folder)")
    r.add_argument("--figure-images", type=int, default=None, help="images shown in grid.png (default: all kept)")
    r.set_defaults(func=_cmd_report)
