"""Sparse-view CT with DPS on an analytic prior, checked against the exact posterior.

Runs in a few seconds on a CPU:  python examples/ct_gaussian_prior.py
"""

import torch
from deepinv.loss.metric import PSNR

from invdiff import operators, priors, samplers

shape = (1, 32, 32)
prior = priors.GaussianPrior.stationary(shape, length_scale=3.0, variance=0.02, mean=0.5)
x = prior.sample(1, torch.Generator().manual_seed(0)).float()  # ground truth drawn from the prior

physics = operators.make("ct-sparse-30", img_size=shape, noise_sigma=0.05)  # noise in sinogram units
y = physics(x, seed=1)  # reproducible noisy sinogram

sampler = samplers.make("dps", prior, steps=100, clip=None)
post = sampler.sample(y, physics, n=4, generator=torch.Generator().manual_seed(2))
exact = prior.posterior(y, physics, noise_sigma=0.05)

psnr = PSNR(max_pixel=1.0)
print(f"FBP                   {psnr(physics.A_dagger(y).clamp(0, 1), x).item():6.2f} dB")
print(f"DPS (mean of 4)       {psnr(post.mean.clamp(0, 1), x).item():6.2f} dB   "
      f"{sampler.last_run.nfe} NFE, {sampler.last_run.wall_time:.1f} s")
print(f"exact posterior mean  {psnr(exact.mean.float().clamp(0, 1), x).item():6.2f} dB")
print(f"mean per-pixel std: DPS {post.std.mean():.4f}, exact {exact.std.mean():.4f}")
