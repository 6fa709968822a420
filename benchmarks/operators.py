"""Benchmark invdiff's CT operator against scikit-image and deepinv (CPU, 2 threads).

Run: ``python benchmarks/operators.py [--size 256] [--views 60] [--repeat 5]``.
Prints median wall times (ms) of the forward projection, the adjoint/back-projection
and FBP for invdiff ``ParallelBeamCT``, ``skimage.transform.radon``/``iradon`` and
``deepinv.physics.Tomography`` (its ``A_dagger`` is an iterative least-squares solve;
its FBP is ``A_dagger``'s analogue ``fbp``), ratios, build times and adjointness errors.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch


def timeit(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def adjoint_error(A, AT, x, y):
    lhs = float((A(x) * y).sum())
    rhs = float((x * AT(y)).sum())
    return abs(lhs - rhs) / abs(lhs)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--views", type=int, default=60)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    from deepinv.physics import Tomography
    from skimage.data import shepp_logan_phantom
    from skimage.transform import iradon, radon, resize

    from invdiff.operators import ParallelBeamCT

    n, views = args.size, args.views
    theta = np.linspace(0, 180, views, endpoint=False)
    phantom = resize(shepp_logan_phantom(), (n, n), anti_aliasing=True)
    x = torch.from_numpy(phantom).float()[None, None]
    rows = {}

    t = time.perf_counter()
    ours = ParallelBeamCT((1, n, n), theta)
    build = time.perf_counter() - t
    y = ours.A(x)
    g = torch.Generator().manual_seed(0)
    rows["invdiff"] = dict(
        A=timeit(lambda: ours.A(x), args.repeat),
        AT=timeit(lambda: ours.A_adjoint(y), args.repeat),
        FBP=timeit(lambda: ours.A_dagger(y), args.repeat),
        adj=adjoint_error(ours.A, ours.A_adjoint, torch.randn(x.shape, generator=g), torch.randn(y.shape, generator=g)),
        build=build,
    )

    sino = radon(phantom, theta, circle=False)
    rows["skimage"] = dict(
        A=timeit(lambda: radon(phantom, theta, circle=False), args.repeat),
        AT=timeit(lambda: iradon(sino, theta, circle=False, filter_name=None), args.repeat),
        FBP=timeit(lambda: iradon(sino, theta, circle=False, filter_name="ramp"), args.repeat),
        adj=float("nan"),
        build=0.0,
    )

    t = time.perf_counter()
    dinv_ct = Tomography(angles=torch.from_numpy(theta).float(), img_width=n, circle=False, normalize=False)
    build = time.perf_counter() - t
    yd = dinv_ct.A(x)
    rows["deepinv"] = dict(
        A=timeit(lambda: dinv_ct.A(x), args.repeat),
        AT=timeit(lambda: dinv_ct.A_adjoint(yd), args.repeat),
        FBP=timeit(lambda: dinv_ct.fbp(yd), args.repeat) if hasattr(dinv_ct, "fbp") else float("nan"),
        adj=adjoint_error(dinv_ct.A, dinv_ct.A_adjoint, torch.randn(x.shape, generator=g), torch.randn(yd.shape, generator=g)),
        build=build,
    )
    t = time.perf_counter()
    dinv_ct.A_dagger(yd)
    dagger_deepinv = 1e3 * (time.perf_counter() - t)

    def quality(img):
        return 10 * np.log10(1 / np.mean((np.clip(img, 0, 1) - phantom) ** 2))

    psnr = {
        "invdiff": quality(ours.A_dagger(y)[0, 0].numpy()),
        "skimage": quality(iradon(sino, theta, circle=False)),
        "deepinv": quality(dinv_ct.fbp(yd)[0, 0].numpy()) if hasattr(dinv_ct, "fbp") else float("nan"),
    }

    print(f"CT parallel beam, {n}x{n}, {views} views, torch threads = {args.threads}, median of {args.repeat}")
    print(f"{'':10s}{'A (ms)':>10s}{'A^T (ms)':>10s}{'A+A^T':>10s}{'FBP (ms)':>10s}{'FBP PSNR':>10s}{'adj err':>10s}{'build s':>9s}")
    for name, r in rows.items():
        print(
            f"{name:10s}{r['A']:10.1f}{r['AT']:10.1f}{r['A'] + r['AT']:10.1f}{r['FBP']:10.1f}"
            f"{psnr[name]:10.2f}{r['adj']:10.1e}{r['build']:9.2f}"
        )
    ref = rows["skimage"]["A"]
    ours_r = rows["invdiff"]
    print(f"invdiff (A + A^T) / skimage radon      = {(ours_r['A'] + ours_r['AT']) / ref:.3f}   (target <= 2)")
    print(f"invdiff FBP                            = {ours_r['FBP']:.1f} ms   (target < 50 ms)")
    print(f"skimage iradon (FBP) / invdiff FBP     = {rows['skimage']['FBP'] / ours_r['FBP']:.1f}x")
    print(f"deepinv (A + A^T) / invdiff (A + A^T)  = {(rows['deepinv']['A'] + rows['deepinv']['AT']) / (ours_r['A'] + ours_r['AT']):.1f}x")
    print(f"deepinv Tomography.A_dagger (iterative) = {dagger_deepinv:.0f} ms (one call)")
    print(f"invdiff sparse matrix nnz = {ours.nnz():,} (one stored matrix; A reads it transposed)")


if __name__ == "__main__":
    main()
