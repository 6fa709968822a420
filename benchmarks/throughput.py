"""Throughput: seconds per slice against batch, network precision and compilation.

DPS, DDS and DiffPIR on the shipped CT prior (``ct64``: ``ct-phantom-64``, a 1.24 M-parameter
EDM U-Net) and on an ADM-size network with random weights (``adm256``: the ``ffhq_10m``
preset of DPS's FFHQ checkpoint, 93.6 M parameters at 256x256; ``admN`` builds it at N x N,
to see the same architecture on a CPU): ``B`` measurements reconstructed in one sampler run
(one network call per evaluation for the whole batch), for ``B`` in ``--batches``, with the
network in float32 and bf16, eager or ``torch.compile``'d (:func:`invdiff.priors.runtime.accelerate`;
the sampler stays float32). For every run the same number of network evaluations
(forward, and forward + input gradient for DPS) is replayed as a bare loop at the same
batch and dtype; ``sampler / bare`` is the sampler's overhead (1.00: it costs exactly its
network calls). Each run is preceded by a one-step warm-up at the same batch (which is
where a compiled network compiles).

Targets (issue 20), checked at the end and printed as PASS / FAIL:

- CPU: seconds per slice at batch 16 <= 0.5 x at batch 1 (every network, sampler, mode);
- CUDA: every sampler <= 1.10 x its bare network loop; bf16 >= 1.5 x faster than fp32 eager
  at the ADM size (at the largest batch that ran).

    python benchmarks/throughput.py                      # CPU: ct64 at 1,4,16 and adm64 at 1,4; fp32, bf16
    python benchmarks/throughput.py --device cuda        # GPU: ct64 and adm256 at 1,4,16,64; fp32, bf16, bf16+compile
    python benchmarks/throughput.py --sizes ct64 --batches 1,16 --steps 5 --modes fp32,bf16 --docs
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when invdiff is not installed
from invdiff import operators, priors, samplers  # noqa: E402
from invdiff.priors.runtime import network_of  # noqa: E402

from _docs import page  # noqa: E402
from _timing import network_loop  # noqa: E402

SAMPLERS = ("dps", "dds", "diffpir")
MODES = {"fp32": ("float32", False), "bf16": ("bf16", False), "fp32+compile": ("float32", True),
         "bf16+compile": ("bf16", True)}
ADM_PRESET = "ffhq_10m"


def make_prior(size: str, mode: str, device: torch.device):
    """The network ``size`` (``ct64`` or ``admN``) on ``device``, run as ``mode``."""
    if size == "ct64":
        prior = priors.load("ct-phantom-64", device=device)
    elif size.startswith("adm") and size[3:].isdigit():
        from invdiff.priors import ADMConfig, ADMPrior, GuidedDiffusionUNet

        with torch.random.fork_rng(devices=[]):  # random weights, the same every run
            torch.manual_seed(0)
            net = GuidedDiffusionUNet(ADMConfig.preset(ADM_PRESET, image_size=int(size[3:])))
        prior = ADMPrior(net.eval()).to(device).requires_grad_(False)
    else:
        raise ValueError(f"unknown size {size!r}: ct64 or adm<N> (adm256, adm64)")
    dtype, compiled = MODES[mode]
    return prior.accelerate(dtype=dtype, compile=compiled)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_loop(prior, x: torch.Tensor, forward: int, backward: int) -> float:
    """Seconds of ``forward`` forward passes and ``backward`` forward + input-gradient passes
    of the network on the batch ``x``, at noise levels spread like a schedule."""
    sync(x.device)
    start = time.perf_counter()
    network_loop(prior, x, forward, backward)
    sync(x.device)
    return time.perf_counter() - start


def measure(prior, name: str, batch: int, steps: int, task: str, device: torch.device, repeats: int = 1) -> dict:
    """Timed sampler runs of ``batch`` slices and their bare network loops, interleaved, after
    a warm-up; the fastest of ``repeats`` of each (the least disturbed by other processes)."""
    shape = prior.image_shape
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, *shape, generator=g)
    physics = operators.make(task, shape, device=device, seed=0)
    y = physics(x.to(device), seed=1)
    samplers.make(name, prior, steps=2)(y, physics, generator=torch.Generator(device).manual_seed(0))  # warm-up
    sampler = samplers.make(name, prior, steps=steps)
    xs = torch.rand(batch, *shape, generator=g).to(device)
    walls, bares = [], []
    for _ in range(repeats):
        sampler(y, physics, generator=torch.Generator(device).manual_seed(0))
        info = sampler.last_run
        walls.append(info.wall_time)
        if not bares:
            bare_loop(prior, xs, 1, 1 if info.nfe_backward else 0)  # warm-up of the loop's shapes and grad modes
        bares.append(bare_loop(prior, xs, info.nfe - info.nfe_backward, info.nfe_backward))
    return dict(wall=min(walls), bare=min(bares), nfe=info.nfe, backward=info.nfe_backward, runtime=info.runtime,
                peak=info.peak_memory)


def parse_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", default=None, help="networks, comma-separated: ct64, adm256, adm64 "
                        "(default: ct64,adm256 on CUDA; ct64,adm64 on the CPU, where adm256 takes ~30 s per call)")
    parser.add_argument("--batches", default=None, help="slices per run (default 1,4,16,64 on CUDA; 1,4,16 on the CPU)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs of each; the fastest counts (default 2)")
    parser.add_argument("--adm-batches", default=None,
                        help="batches for the adm networks (default: --batches on CUDA, 1,4 on the CPU)")
    parser.add_argument("--modes", default=None, help="fp32, bf16, fp32+compile, bf16+compile "
                        "(default: fp32,bf16,bf16+compile on CUDA; fp32,bf16 on the CPU, where inductor "
                        "takes ~100 s per shape to compile the CT U-Net on one thread)")
    parser.add_argument("--samplers", default=",".join(SAMPLERS))
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default 20 on CUDA, 4 on the CPU)")
    parser.add_argument("--adm-steps", type=int, default=None, help="steps for the adm networks (default: --steps on "
                        "CUDA, 2 on the CPU)")
    parser.add_argument("--task", default="inpaint-random-70",
                        help="operator (default inpaint-random-70: a cheap operator, so the ratio is the sampler's own)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    parser.add_argument("--docs", action="store_true", help="write docs/benchmarks/<page>.md")
    parser.add_argument("--page", default="throughput",
                        help="docs page name (default throughput; e.g. throughput-compiled for a --modes run)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("throughput.py: --device cuda but CUDA is not available")
    torch.set_num_threads(args.threads)
    sizes = parse_list(args.sizes or ("ct64,adm256" if cuda else "ct64,adm64"))
    modes = parse_list(args.modes or ("fp32,bf16,bf16+compile" if cuda else "fp32,bf16"))
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"throughput.py: unknown mode {m!r}; choose from {', '.join(MODES)}")
    batches = [int(b) for b in parse_list(args.batches or ("1,4,16,64" if cuda else "1,4,16"))]
    adm_batches = [int(b) for b in parse_list(args.adm_batches)] if args.adm_batches else (batches if cuda else [1, 4])
    steps = args.steps or (20 if cuda else 4)
    adm_steps = args.adm_steps or (steps if cuda else 2)
    names = parse_list(args.samplers)
    where = torch.cuda.get_device_name(device) if cuda else f"CPU x{args.threads} thread(s)"

    rows = []
    start_load = tuple(round(v, 1) for v in os.getloadavg())
    with page(args.page, "Throughput: seconds per slice against batch, precision and compilation", args.docs):
        print(f"{', '.join(names)} on {args.task}; {where}; network sizes {', '.join(sizes)}; modes {', '.join(modes)}; "
              f"ct64: {steps} steps at batches {batches}; adm: {adm_steps} steps at batches {adm_batches}; "
              f"the fastest of {args.repeats} timed runs of each. "
              "s/slice = sampler wall time / batch; bare = the same network evaluations (forward, forward + "
              "input gradient for DPS) in a plain loop at the same batch and dtype; 'vs fp32' = fp32 eager wall "
              "time / this mode's at the same batch.\n", flush=True)
        for size in sizes:
            adm = size.startswith("adm")
            for mode in modes:
                if MODES[mode][1]:
                    torch.compiler.reset()  # every compiled mode starts from an empty cache
                prior = make_prior(size, mode, device)
                params = sum(p.numel() for p in network_of(prior).parameters()) / 1e6
                for name in names:
                    for batch in (adm_batches if adm else batches):
                        try:
                            r = measure(prior, name, batch, adm_steps if adm else steps, args.task, device,
                                        args.repeats)
                        except torch.cuda.OutOfMemoryError:
                            torch.cuda.empty_cache()
                            r = dict(error="out of memory")
                        except Exception as err:  # a failed run is a row, the benchmark goes on
                            r = dict(error=f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]}")
                        rows.append(dict(size=size, params=params, mode=mode, sampler=name, batch=batch, **r))
                        last = rows[-1]
                        print(f"  {size} {mode} {name} batch {batch}: " + (
                            f"{last['wall'] / batch:.4f} s/slice, x{last['wall'] / last['bare']:.2f} of bare"
                            if "wall" in last else last["error"]), file=sys.stderr, flush=True)
                del prior
                if cuda:
                    torch.cuda.empty_cache()
        print_table(rows)
        check_targets(rows, cuda)
        print(f"\nLoad average of this machine (1, 5, 15 min) at the start {start_load} and at the end "
              f"{tuple(round(v, 1) for v in os.getloadavg())}: other processes slow the runs they overlap.")


def _fp32(rows: list[dict], row: dict) -> dict | None:
    return next((r for r in rows if r["mode"] == "fp32" and "wall" in r and
                 (r["size"], r["sampler"], r["batch"]) == (row["size"], row["sampler"], row["batch"])), None)


def print_table(rows: list[dict]) -> None:
    print("| network | sampler | mode | batch | s / slice | NFE (backward) | sampler s | bare loop s | sampler / bare "
          "| vs fp32 | compiled | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        net = f"{r['size']} ({r['params']:.1f} M)"
        if "wall" not in r:
            print(f"| {net} | {r['sampler']} | {r['mode']} | {r['batch']} | {r['error']} | | | | | | | |")
            continue
        ref = _fp32(rows, r)
        speed = f"{ref['wall'] / r['wall']:.2f}x" if ref is not None else "—"
        rt = r["runtime"] or {}
        compiled = "yes" if rt.get("compiled") else ("no: " + rt["fallback_reason"] if rt.get("fallback_reason")
                                                     else "no")
        peak = f"{r['peak'] / 2**20:.0f}" if r.get("peak") else "—"
        print(f"| {net} | {r['sampler']} | {r['mode']} | {r['batch']} | {r['wall'] / r['batch']:.4f} | "
              f"{r['nfe']} ({r['backward']}) | {r['wall']:.2f} | {r['bare']:.2f} | {r['wall'] / r['bare']:.3f} | "
              f"{speed} | {compiled} | {peak} |")


def check_targets(rows: list[dict], cuda: bool) -> None:
    ok = [r for r in rows if "wall" in r]
    print("\nTargets:\n")
    results = []
    if not cuda:
        for key in dict.fromkeys((r["size"], r["sampler"], r["mode"]) for r in ok):
            per = {r["batch"]: r["wall"] / r["batch"] for r in ok if (r["size"], r["sampler"], r["mode"]) == key}
            if 1 in per and 16 in per:
                ratio = per[16] / per[1]
                results.append((ratio <= 0.5, f"{' '.join(key)}: s/slice at batch 16 = {ratio:.2f} x batch 1 "
                                              f"(target <= 0.5)"))
    else:
        for r in ok:
            ratio = r["wall"] / r["bare"]
            results.append((ratio <= 1.10, f"{r['size']} {r['sampler']} {r['mode']} batch {r['batch']}: sampler = "
                                           f"{ratio:.3f} x bare loop (target <= 1.10)"))
        for key in dict.fromkeys((r["size"], r["sampler"]) for r in ok if r["size"].startswith("adm")):
            common = [b for b in sorted({r["batch"] for r in ok}) if all(
                any((r["size"], r["sampler"], r["mode"], r["batch"]) == (*key, m, b) for r in ok) for m in ("fp32", "bf16"))]
            if not common:
                continue
            b = common[-1]
            wall = {m: next(r["wall"] for r in ok if (r["size"], r["sampler"], r["mode"], r["batch"]) == (*key, m, b))
                    for m in ("fp32", "bf16")}
            speed = wall["fp32"] / wall["bf16"]
            results.append((speed >= 1.5, f"{' '.join(key)} batch {b}: bf16 {speed:.2f}x faster than fp32 eager "
                                          f"(target >= 1.5)"))
    for passed, text in results:
        print(f"- {'PASS' if passed else 'FAIL'}: {text}")
    if not results:
        print("- none measured (the targets need batches 1 and 16 on the CPU; fp32 and bf16 on CUDA)")
    failed = sum(not p for p, _ in results)
    print(f"\n{len(results) - failed} of {len(results)} targets met.")


if __name__ == "__main__":
    main()
