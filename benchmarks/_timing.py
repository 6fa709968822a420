"""The bare network loop the overhead and throughput benchmarks compare a sampler with."""

from __future__ import annotations

import time

import torch


def network_loop(prior, x: torch.Tensor, forward: int, backward: int) -> float:
    """Seconds of ``backward`` forward + input-gradient passes (what guidance needs) and then
    ``forward`` forward passes of ``prior``'s denoiser on the batch ``x``, at noise levels
    spread like a schedule. The caller synchronises the device around it if needed."""
    start = time.perf_counter()
    for i in range(forward + backward):
        sigma = 80.0 * 0.8**i + 0.002
        if i < backward:
            xg = x.detach().requires_grad_(True)
            out = prior.denoise(xg, sigma)
            torch.autograd.grad(out, xg, grad_outputs=torch.ones_like(out))
        else:
            with torch.no_grad():
                prior.denoise(x, sigma)
    return time.perf_counter() - start
