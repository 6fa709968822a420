"""``invdiff simulate`` and ``invdiff reconstruct``: the medical workflows of
:mod:`invdiff.apps.workflows` on the command line. Torch-heavy imports happen inside the
command functions so ``invdiff --help`` stays fast."""

from __future__ import annotations

import argparse
import sys

from .options import (add_device, add_params, add_progress, add_runtime, add_seed, command_line, parse_key_values,
                      parse_spec, progress, runtime_options)
from .options import device as resolve_device

__all__ = ["register"]


def _window(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH in HU (e.g. --window=-1000,1000), got {text!r}") from None
    if not high > low:
        raise argparse.ArgumentTypeError(f"window high must exceed low, got {text!r}")
    return low, high


def _common(p: argparse.ArgumentParser, seed_help: str, sigma_help: str) -> None:
    add_seed(p, seed_help)
    p.add_argument("--noise", default="gaussian", choices=["gaussian", "poisson", "none"], help="measurement noise")
    p.add_argument("--noise-sigma", type=float, default=None, help=sigma_help)
    p.add_argument("--window", type=_window, default=None, metavar="LOW,HIGH",
                   help="CT: HU window mapped to [0, 1] (default -1000,1000; write --window=-1000,1000)")
    p.add_argument("--modality", default="auto", choices=["auto", "CT", "MR"], help="NIfTI sources only (default: guess)")
    add_params(p, "task parameter override, e.g. --param fbp_filter=hann (repeatable; TOML values)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output that invdiff wrote (a measurement file; a reconstruction folder "
                        "with its provenance.json and only its files); never an input")


def _grid(m) -> str:
    """``HxW`` of the slices, ``DxHxW`` for a volume measurement."""
    size = m.img_size
    return f"{size[1]}x{size[2]}x{size[3]} volume" if m.volume else f"{size[1]}x{size[2]}"


def _cmd_simulate(args: argparse.Namespace) -> int:
    from ..io.intensity import HU_WINDOW
    from ..apps.workflows import check_measurement_out, simulate_to_file

    check_measurement_out(args.out, [args.input], args.overwrite, flag="--out")  # before any work
    m = simulate_to_file(
        args.input, args.task, args.out, overwrite=args.overwrite, size=args.size, seed=args.seed, noise=args.noise,
        noise_sigma=args.noise_sigma, window=args.window or HU_WINDOW, modality=args.modality, params=parse_key_values(args.param),
    )
    rs = m.resample
    resized = f", resampled {rs['source_shape'][0]}x{rs['source_shape'][1]} -> {rs['shape'][0]}x{rs['shape'][1]}" \
        if rs.get("method") != "none" else ""
    print(f"invdiff simulate: {m.n_slices} slice(s) of {args.input} ({m.source.get('kind')}, {m.source.get('modality')}), "
          f"{m.task['name']} on {_grid(m)}{resized}, noise {m.task['noise']} "
          f"sigma {m.task['noise_sigma']:g}, seed {args.seed}; values: {m.value_map.rule}")
    print(f"wrote {args.out}: y {tuple(m.y.shape)} with the operator record and seed")
    return 0


def _cmd_reconstruct(args: argparse.Namespace) -> int:
    from ..apps.workflows import check_reconstruction_out, parse_batch
    from ..bench.distributed import init_distributed

    if (args.measurement is None) == (args.input is None):
        raise ValueError("give either --measurement FILE or --input SCAN with --task NAME")
    if args.input is not None and not args.task:
        raise ValueError("--input needs --task (the operator to simulate), e.g. --task ct-sparse-60")
    if args.measurement is not None and args.task:
        raise ValueError("--task is for --input; a measurement file records its own operator")
    if args.samples < 1:
        raise ValueError(f"--samples must be >= 1, got {args.samples}")
    batch = parse_batch(args.batch)
    from .. import operators, samplers
    from ..samplers.volume import VOLUME_SAMPLERS

    volume = args.volume or bool(args.task and operators.task_info(args.task).volume)  # mri3d-, zsr-: volumes
    # no --sampler: dps, or dds-3d for a volume (known once the measurement is read)
    sampler_name, sampler_options = parse_spec(args.sampler) if args.sampler else (None, {})
    key = (sampler_name or "").lower()
    if sampler_name is not None and key not in VOLUME_SAMPLERS and key not in samplers.available():
        raise ValueError(f"unknown sampler {sampler_name!r}; available: {', '.join(samplers.available())}; "
                         f"with --volume: {', '.join(VOLUME_SAMPLERS)}")  # before any work
    if sampler_name is not None:  # unknown or out-of-range options: one line, before any work
        cls = VOLUME_SAMPLERS[key] if key in VOLUME_SAMPLERS else samplers.get(key)
        cls.Params.check({**sampler_options, **({"steps": args.steps} if args.steps is not None else {})})
    if key == "tpdm" and not args.perpendicular_prior:
        raise ValueError("--sampler tpdm needs --perpendicular-prior NAME_OR_PATH (a 2D prior of coronal slices)")
    if args.perpendicular_prior and key != "tpdm":
        raise ValueError(f"--perpendicular-prior is for --sampler tpdm, not {sampler_name or 'the default sampler'}")
    # the output is never an input (the scan, the measurement, a prior file) nor inside or around one;
    # --overwrite replaces only a reconstruction folder invdiff wrote
    check_reconstruction_out(args.out, [args.input, args.measurement, args.prior, args.perpendicular_prior],
                             args.overwrite, flag="--out")
    device = resolve_device(args.device)
    group = init_distributed(device)  # under torchrun: one process per GPU, each its share of the slices
    try:
        return _reconstruct_in(args, group, group.device(device), batch, volume, sampler_name, sampler_options)
    finally:
        group.close()


def _reconstruct_in(args: argparse.Namespace, group, device, batch: int | None, volume: bool, sampler_name,
                    sampler_options: dict) -> int:
    """The reconstruction of ``_cmd_reconstruct`` in this process (``group``: torchrun's ranks)."""
    from ..apps.workflows import load_prior, open_measurement, reconstruct, simulate, write_reconstruction
    from ..io import read
    from ..io.intensity import HU_WINDOW

    say = print if group.rank == 0 else (lambda *a, **k: None)  # rank 0 speaks and writes
    prior = load_prior(args.prior, device)
    perpendicular = load_prior(args.perpendicular_prior, device) if args.perpendicular_prior else None
    if args.any_size:
        import warnings

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prior.at_any_size()
        for w in caught:
            say(f"invdiff reconstruct: warning: {w.message}", file=sys.stderr)
    shape = tuple(int(s) for s in prior.image_shape)
    native = prior.any_size
    if native and args.resize:
        raise ValueError(f"{args.prior} works at any size: it reconstructs at the data's own size; "
                         f"--resize is only for fixed-size priors")
    reference = None
    if args.input is not None:
        stack = read(args.input, args.modality, volume=volume)  # a volume: one orientation, even spacing
        H, W = stack.shape[-2:]
        if (H, W) != shape[1:] and not args.resize and not native:
            raise ValueError(
                f"{args.input}: images are {H}x{W} but the prior takes {shape[1]}x{shape[2]}; pass --resize to "
                f"resample them by {H / shape[1]:.4g}x{W / shape[2]:.4g} (recorded in the output's geometry), "
                f"or use a patch prior (any size)"
            )
        if stack.shape[1] != shape[0]:
            raise ValueError(f"{args.input}: images have {stack.shape[1]} channel(s), the prior takes {shape[0]}")
        m, reference = simulate(stack, args.task, size=None if native else shape[1:], seed=args.seed,
                                noise=args.noise, noise_sigma=args.noise_sigma, window=args.window or HU_WINDOW,
                                params=parse_key_values(args.param))
        origin = f"{args.input} ({stack.kind}, {stack.modality}) simulated with {args.task}"
    else:
        m = open_measurement(args.measurement, (shape[0], None, None) if native else shape, resize=args.resize,
                             noise_sigma=args.noise_sigma)
        origin = f"{args.measurement} ({m.task['name']}, {m.source.get('kind')} source)"
    rs = m.resample
    resized = (f"; resampled {rs['source_shape'][0]}x{rs['source_shape'][1]} -> {rs['shape'][0]}x{rs['shape'][1]} "
               f"({rs['method']})") if rs.get("method", "none") != "none" else ""
    volume = volume or m.volume
    sampler_name = sampler_name or ("dds-3d" if volume else "dps")
    mode = "jointly as one volume" if volume else "slice by slice"
    per = "volume" if volume else "slice"
    ranks = f", {group.world} processes ({group.backend})" if group.world > 1 else ""
    say(f"invdiff reconstruct: {m.n_slices} slice(s) {_grid(m)} from {origin}{resized}, {mode}{ranks}; "
          f"sampler {sampler_name}{' ' + str(sampler_options) if sampler_options else ''}, {args.samples} "
          f"sample(s)/{per}, prior {args.prior}"
          f"{f', perpendicular prior {args.perpendicular_prior}' if perpendicular is not None else ''}, "
          f"device {device}, seed {args.seed}")
    rec = reconstruct(m, prior, sampler_name, volume=volume, perpendicular_prior=perpendicular, samples=args.samples,
                      seed=args.seed, device=device, steps=args.steps, options=sampler_options,
                      progress=progress(args), reference=reference, prior_name=str(args.prior),
                      perpendicular_prior_name=str(args.perpendicular_prior) if perpendicular is not None else None,
                      batch=batch, **runtime_options(args))
    if group.rank != 0:  # the other ranks' slices are in rank 0's result: it writes once
        return 0
    record = write_reconstruction(args.out, rec, m, fmt=args.format, png=args.png, overwrite=args.overwrite,
                                  extra={"command": command_line(args)})
    calls = {r.get("call"): r for r in rec.runs}.values()  # slices sampled together share their call's cost
    nfe = sum(r["nfe"] for r in calls)
    secs = sum(r["wall_time"] for r in calls)
    per_call = rec.info.get("batch", {}).get("slices_per_call")
    batched = f" ({per_call} slice(s) per call)" if per_call else ""
    print(f"{rec.info['sampler']}: {nfe} network calls{batched}, {secs:.1f} s in the sampler")
    for name, values in rec.metrics.items():
        label = "baseline (A_dagger)" if name == "baseline" else f"{name} mean"
        ssim = f", SSIM {values['ssim']:.3f}" if "ssim" in values else ""
        dims = " (3D)" if values.get("dims") == 3 else ""
        print(f"  vs the input{dims}: {label}: PSNR {values['psnr']:.2f} dB{ssim}")
    listing = ", ".join(f"{what} ({len(files)} file{'s' if len(files) > 1 else ''})"
                        for what, files in record["files"].items())
    print(f"wrote {args.out} ({record['format']}): {listing}, provenance.json")
    return 0


def register(subparsers) -> None:
    """Add ``simulate`` and ``reconstruct`` to the ``invdiff`` command."""
    p = subparsers.add_parser(
        "simulate", help="retrospective measurements of a clean scan (DICOM, NIfTI, PNG/TIFF) -> .h5",
        description="Measure a clean image or series with a named operator; the .h5 keeps the operator's "
                    "full record, the seed and the source header (never the clean image).",
    )
    p.add_argument("--task", required=True, help="operator, e.g. ct-sparse-60, ct-limited-90, mri-4x (invdiff list operators)")
    p.add_argument("--input", required=True, help="DICOM file or series folder, NIfTI volume, PNG or TIFF")
    p.add_argument("--out", required=True, help="measurement file to write (.h5; must not exist)")
    p.add_argument("--size", default=None, help="resample the slices to N or HxW first (factor recorded)")
    _common(p, "seed of the operator's random parts (mask, ...) and of the noise (default 0)",
            "noise std on the [0, 1] image scale (default: the task's)")
    p.set_defaults(func=_cmd_simulate)

    p = subparsers.add_parser(
        "reconstruct", help="reconstruct a measurement (or simulate+reconstruct a scan), slice by slice or as a volume",
        description="Posterior sampling with a diffusion prior, written in the source's format "
                    "(DICOM series, NIfTI, PNG, fastMRI .h5) with provenance.json; --samples K adds a std map. "
                    "--volume reconstructs all slices jointly as one volume with a volume sampler.",
    )
    p.add_argument("--measurement", default=None, help="invdiff measurement .h5, or a fastMRI k-space .h5")
    p.add_argument("--input", default=None, help="a clean scan to simulate (with --task) and reconstruct in one go")
    p.add_argument("--task", default=None, help="operator for --input")
    p.add_argument("--prior", required=True, help="shipped prior name (invdiff list priors) or a .safetensors/.pt path")
    p.add_argument("--sampler", default=None,
                   help="NAME[:key=value...], a sampler of `invdiff list samplers` with options, e.g. "
                        "dps:zeta=0.5 or enkg:ensemble_size=256 (default dps); with --volume a volume sampler: "
                        "dds-3d (default), tpdm, diffusion-mbir, e.g. dds-3d:rho=0.02")
    p.add_argument("--volume", action="store_true",
                   help="reconstruct the series as ONE volume (slices coupled along z) with a volume sampler, from "
                        "the slices' common 2D operator; the series must be evenly spaced with one orientation "
                        "(automatic for the volume tasks mri3d-<R>x, zsr-<k>x)")
    p.add_argument("--perpendicular-prior", default=None, metavar="NAME_OR_PATH",
                   help="--sampler tpdm: the 2D prior of coronal slices (C, D, W) (a shipped name or a checkpoint)")
    p.add_argument("--out", required=True, help="output folder (must not exist)")
    p.add_argument("--samples", type=int, default=1,
                   help="posterior samples per slice (per volume with --volume); K > 1 writes the std map")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sampler's)")
    p.add_argument("--batch", default="auto", metavar="N|auto",
                   help="slices per sampler call, slice by slice (default auto: 16 rows on the CPU; on CUDA from "
                        "the free memory after a one-slice probe); every slice keeps its own generator, so the "
                        "result does not depend on it. Under torchrun --nproc-per-node N each process "
                        "reconstructs its share of the slices and rank 0 writes")
    add_device(p)
    add_runtime(p)
    p.add_argument("--resize", action="store_true",
                   help="fixed-size priors: allow resampling images (or cropping k-space) to the prior's size; the factor is "
                        "recorded (a patch prior reconstructs at the data's own size)")
    p.add_argument("--any-size", action="store_true",
                   help="use a fully convolutional fixed-size prior (a U-Net) at the data's own size (warned: it "
                        "was trained at one size)")
    p.add_argument("--format", default="auto", choices=["auto", "dicom", "nifti", "png", "tiff", "h5"],
                   help="output format (default: the source's)")
    p.add_argument("--png", action="store_true", help="also write quick-look PNGs (png/mean_0001.png, png/std_0001.png)")
    add_progress(p, verbose="(no extra bars; the bar is over slices, or over the diffusion steps with --volume)")
    _common(p, "sampler seed, slice k uses seed + k (default 0; --volume: one generator seeded with it); with --input "
               "also the operator's and noise seed",
            "noise std on the [0, 1] image scale: simulated with --input (default: the task's); "
            "assumed for a fastMRI file (default: estimated from the outer k-space rows)")
    p.set_defaults(func=_cmd_reconstruct)
