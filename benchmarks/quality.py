"""Quality table: every invdiff sampler beside deepinv's DPS and DiffPIR, same prior, same images.

Tasks and priors (64x64, held-out images that no prior was trained on):

* ``ct-sparse-30`` and ``deblur-gauss`` on held-out anatomical phantoms, prior ``ct-phantom-64``;
* ``mri-4x`` and ``inpaint-box`` on the 16 held-out MNI152 slices, prior ``mri-brain-64``;
* ``deblur-blind`` on held-out phantoms, each blurred by its own held-out kernel (measurement
  seed ``1 + i``), prior ``ct-phantom-64``: only the blind sampler (BlindDPS, with the shipped
  kernel prior) and the baseline (Wiener with a Gaussian guess) take it; the comparison with
  non-blind DPS given the true or a wrong kernel is ``benchmarks/blind_deblur.py``.

Every method reconstructs the same measurements (noise drawn from a fixed seed per task);
invdiff samplers run at their defaults (or ``--steps``; ``--cpu-budget`` shrinks EnKG's
ensemble and SMC's particle systems to CPU size, and adds a row of EnKG with its static probes),
one posterior sample per image, all images
of a task batched; ReSample uses the latent prior trained on the same data
(``ct-phantom-latent-64``) where one ships, else the pixel prior through the identity
autoencoder. deepinv's ``DPS`` (``num_steps`` = ``--deepinv-steps``,
default 200; its default of 1000 is 5x slower here) and ``DiffPIR`` (its defaults, with
the task's noise level) use the same prior as their denoiser. Reported: PSNR (dB, peak 1)
and SSIM averaged over the images, the baseline ``A_dagger`` (FBP, zero-filled,
pseudo-inverse), NFE, and seconds per image.

    python benchmarks/quality.py [--images 8] [--tasks ct-sparse-30,mri-4x] [--samplers dps,dds]
"""

from __future__ import annotations

import argparse
import time

import deepinv as dinv
import torch
from _docs import page

from invdiff import data, operators, priors, samplers

#: latent priors trained on the same data, used by the latent samplers (ReSample); a task whose
#: prior has none runs them on the pixel prior through the identity autoencoder
LATENT = {"ct-phantom-64": "ct-phantom-latent-64"}
#: ``--cpu-budget`` overrides: ensembles / particle systems that fit a CPU run (the defaults,
#: 1024 EnKG particles, 32 SMC particles per image, PnP-DM's 100-level prior step and FPS's 1000
#: steps of 5 particles, are GPU-sized)
CPU_BUDGET = {"enkg": dict(ensemble_size=128), "smc": dict(particles=4), "pnpdm": dict(diffusion_steps=20),
              "fps": dict(steps=200)}
#: further rows under ``--cpu-budget``: EnKG with the static probes, its lever for CPU-sized ensembles
CPU_VARIANTS = {"enkg": [("enkg, 32 particles, 50 steps, 512 probes", dict(ensemble_size=32, steps=50, probes=512))]}

TASKS = {
    "ct-sparse-30": ("ct-phantom-64", "ct-phantom"),
    "mri-4x": ("mri-brain-64", "mri-brain"),
    "inpaint-box": ("mri-brain-64", "mri-brain"),
    "deblur-gauss": ("ct-phantom-64", "ct-phantom"),
    "deblur-blind": ("ct-phantom-64", "ct-phantom"),
}


def metrics(x_hat: torch.Tensor, x: torch.Tensor) -> tuple[float, float]:
    x_hat = x_hat.float().clamp(0, 1)
    psnr = dinv.loss.metric.PSNR(max_pixel=1.0)(x_hat, x).mean()
    ssim = dinv.loss.metric.SSIM(max_pixel=1.0)(x_hat, x).mean()
    return float(psnr), float(ssim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--samplers", default=",".join(samplers.available()))
    parser.add_argument("--steps", type=int, default=None, help="override every invdiff sampler's steps")
    parser.add_argument("--deepinv-steps", type=int, default=200)
    parser.add_argument("--no-deepinv", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-budget", action="store_true",
                        help=f"smaller ensembles / particle systems: {CPU_BUDGET}")
    parser.add_argument("--docs", action="store_true", help="also write the output to docs/benchmarks/quality.md")
    args = parser.parse_args()
    with page("quality", "Quality on the shipped priors", args.docs):
        torch.set_num_threads(args.threads)
        dev = torch.device(args.device)
        names = [n for n in args.samplers.split(",") if n]
        overrides = {} if args.steps is None else {"steps": args.steps}

        rows, refused = [], []
        for task in [t for t in args.tasks.split(",") if t]:
            prior_name, dataset = TASKS[task]
            prior = priors.load(prior_name, device=dev)
            x = data.heldout(dataset, args.images, size=64)
            physics = operators.make(task, img_size=(1, 64, 64), seed=0)
            blind = getattr(physics, "blind", False)  # each image its own kernel, drawn by its seed
            y = torch.cat([physics(x[i : i + 1], seed=1 + i) for i in range(len(x))]) if blind else physics(x, seed=1)
            noise_sigma = float(getattr(physics.noise_model, "sigma", 0.0))
            start = time.perf_counter()
            base = physics.A_dagger(y)
            rows.append((task, "baseline (A_dagger)", *metrics(base, x), 0, (time.perf_counter() - start) / len(x)))
            physics, y = physics.to(dev), y.to(dev)
            latent = priors.load(LATENT[prior_name], device=dev) if prior_name in LATENT else None
            runs = [(name, name, CPU_BUDGET.get(name, {}) if args.cpu_budget else {}) for name in names]
            if args.cpu_budget:
                runs += [(name, label, kw) for name in names for label, kw in CPU_VARIANTS.get(name, [])]
            for name, label, extra in runs:
                if blind != samplers.get(name).handles_blind:  # a blind task takes blind samplers only
                    continue
                kind = getattr(samplers.get(name), "prior_kind", "pixel")
                sampler = samplers.make(name, latent if (kind == "latent" and latent is not None) else prior,
                                        **overrides, **extra)
                try:
                    out = sampler(y, physics, generator=torch.Generator(dev).manual_seed(2))
                except samplers.IncompatibleError as err:  # e.g. DDRM on an operator without an SVD: no row
                    refused.append(f"{label} on {task} ({str(err).splitlines()[0].split(': ', 1)[-1]})")
                    continue
                rows.append((task, f"invdiff {label}", *metrics(out.cpu(), x), sampler.last_run.nfe,
                             sampler.last_run.wall_time / len(x)))
                print(f"{task} {rows[-1][1]}: {rows[-1][2]:.2f} dB", flush=True)
            if not args.no_deepinv and not blind:  # deepinv's samplers need the kernel
                theirs = (
                    (f"deepinv DPS ({args.deepinv_steps} steps)",
                     dinv.sampling.DPS(prior, num_steps=args.deepinv_steps, device=dev, dtype=torch.float32),
                     args.deepinv_steps),
                    ("deepinv DiffPIR (defaults)",
                     dinv.sampling.DiffPIR(prior, dinv.optim.L2(), sigma=max(noise_sigma, 1e-3), device=dev), 100),
                )
                for label, model, nfe in theirs:
                    start = time.perf_counter()
                    out = model(y, physics, seed=3)  # deepinv seeds the global RNG itself
                    rows.append((task, label, *metrics(out.cpu(), x), nfe, (time.perf_counter() - start) / len(x)))
                    print(f"{task} {label}: {rows[-1][2]:.2f} dB", flush=True)

        print(f"\nQuality on {args.images} held-out 64x64 images per task (PSNR dB / SSIM, mean over images); "
              f"steps: {args.steps or 'defaults'}; {'CPU budget ' + str(CPU_BUDGET) if args.cpu_budget else ''}")
        print("| task | method | PSNR | SSIM | NFE | s / image |\n|---|---|---|---|---|---|")
        for task, method, psnr, ssim, nfe, sec in rows:
            print(f"| {task} | {method} | {psnr:.2f} | {ssim:.3f} | {nfe} | {sec:.2f} |")
        if refused:
            print("\nNot applicable (the sampler refuses the operator): " + "; ".join(refused) + ".")


if __name__ == "__main__":
    main()
