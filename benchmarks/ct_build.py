"""Build cost and speed of invdiff's CT (and MRI) operators at clinical sizes (CPU).

Run: ``python benchmarks/ct_build.py [--threads 2] [--repeat 5] [--cases ct-sparse-60:512,...] [--docs]``
(``--docs`` writes ``docs/benchmarks/ct_build.md``).

Each case runs in its own subprocess (so peak memory is the build's alone) and reports

* ``build s``: wall time of ``operators.make(name, img_size=(1, n, n))``,
* ``peak MB``: increase of the process's peak resident set size (``ru_maxrss``) during
  the build, measured from just before it (after imports),
* ``A ms`` / ``A_adjoint ms``: median wall time of one call on a batch of one image,
* ``FBP 1st ms``: the first ``A_dagger`` call on a fresh operator (any lazily built
  state included), ``FBP ms``: the median of later calls,
* ``adjoint err``: :math:`|\\langle A x, y\\rangle - \\langle x, A^\\top y\\rangle| / |\\langle A x, y\\rangle|`
  for standard normal ``x, y``, products in float32 (inner products in float64), the median
  of 5 draws (a single draw scatters over an order of magnitude: the float32 rounding of
  ``A x`` relative to an inner product of random signs),
* ``nnz``: the system matrix's number of non-zeros.

``--threads`` sets ``torch.set_num_threads`` (and ``OMP_NUM_THREADS`` of the subprocesses).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository, for `import invdiff`
DEFAULT_CASES = ("ct-sparse-60:256,ct-limited-90:256,ct-fan-90:256,ct-sparse-60:512,ct-limited-90:512,"
                 "mri-4x:320,mri-multicoil-4x:320")


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def _median_ms(fn, repeat: int) -> float:
    import statistics

    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def run_case(name: str, size: int, threads: int, repeat: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    sys.path.insert(0, ROOT)
    from invdiff import operators

    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 1, size, size, generator=g)
    rss0 = _peak_rss_mb()
    t = time.perf_counter()
    physics = operators.make(name, img_size=(1, size, size))
    build = time.perf_counter() - t
    peak = _peak_rss_mb() - rss0

    with torch.no_grad():
        y = physics.A(x)
        t = time.perf_counter()
        physics.A_dagger(y)
        fbp_first = 1e3 * (time.perf_counter() - t)
        physics.A_adjoint(y)
        row = {
            "case": f"{name} {size}x{size}",
            "views": int(getattr(physics, "n_views", 0)),
            "n_det": int(getattr(physics, "n_detectors", 0)),
            "build_s": build,
            "peak_mb": peak,
            "A_ms": _median_ms(lambda: physics.A(x), repeat),
            "AT_ms": _median_ms(lambda: physics.A_adjoint(y), repeat),
            "fbp_first_ms": fbp_first,
            "fbp_ms": _median_ms(lambda: physics.A_dagger(y), repeat),
        }
        errors = []
        for _ in range(5):
            xr = torch.randn(x.shape, generator=g)
            yr = torch.randn(y.shape, generator=g)
            lhs = float((physics.A(xr).double() * yr.double()).sum())
            rhs = float((xr.double() * physics.A_adjoint(yr).double()).sum())
            errors.append(abs(lhs - rhs) / abs(lhs))
        row["adj_err"] = sorted(errors)[2]
    nnz = getattr(physics, "nnz", None)
    row["nnz"] = int(nnz()) if callable(nnz) else -1
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per median (default 5)")
    parser.add_argument("--cases", default=DEFAULT_CASES, help=f"comma-separated name:size (default {DEFAULT_CASES})")
    parser.add_argument("--docs", action="store_true", help="also write docs/benchmarks/ct_build.md")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()

    if args.one is not None:
        name, size = args.one.rsplit(":", 1)
        print(json.dumps(run_case(name, int(size), args.threads, args.repeat)))
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _docs import page

    with page("ct_build", "CT and MRI operators at clinical sizes: build, memory, speed, adjointness", args.docs):
        _table(args)


def _table(args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    print(f"threads={args.threads}, repeat={args.repeat}, CPU\n")
    print("| case | views | n_det | nnz | build s | peak MB | A ms | A_adjoint ms | A_dagger 1st ms | A_dagger ms | adjoint err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        cmd = [sys.executable, os.path.abspath(__file__), "--one", case, "--threads", str(args.threads),
               "--repeat", str(args.repeat)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            print(f"| {case} | failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        views, n_det = (r["views"], r["n_det"]) if r["views"] else ("—", "—")
        nnz = f"{r['nnz'] / 1e6:.1f} M" if r["nnz"] >= 0 else "—"
        print(
            f"| {r['case']} | {views} | {n_det} | {nnz} | {r['build_s']:.2f} | {r['peak_mb']:.0f} "
            f"| {r['A_ms']:.1f} | {r['AT_ms']:.1f} | {r['fbp_first_ms']:.1f} | {r['fbp_ms']:.1f} | {r['adj_err']:.1e} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
