"""Per-sampler accounting, one table instead of a copy in every sampler's test file: the same
seed gives the same output, another seed another; ``last_run`` counts the network calls (with
and without a backward pass) and steps the method makes; the callback sees every step (and,
where the method's last iterate is its output, that output); a run without a generator
records the seed that reproduces it; ``sample(n)`` batches the samples through the network."""

import pytest
import torch
from conftest import gaussian_inpainting_problem

from invdiff import samplers

#: name -> (options, nfe, nfe_backward, steps, sigma of the last callback (None: not checked),
#:          whether the last callback's x is the output, how many sample stds must be > 0)
TABLE = {
    "dps": (dict(steps=20), 20, 20, 20, "sigma_min", False, "all"),
    "dds": (dict(steps=20), 20, 0, 20, "sigma_min", True, "all"),
    "diffpir": (dict(steps=20), 20, 0, 20, None, True, "all"),
    "reddiff": (dict(steps=20), 20, 0, 20, None, False, "any"),
    "daps": (dict(steps=6, ode_steps=3, langevin_steps=5), 18, 0, 6, 0.01, False, None),
    "ddrm": (dict(steps=20), 20, 0, 20, "sigma_min", True, "all"),
    "ddnm": (dict(steps=20), 20, 0, 20, "sigma_min", True, "all"),
    "pigdm": (dict(steps=20), 20, 20, 20, "sigma_min", True, "all"),
    "pnpdm": (dict(steps=5, diffusion_steps=20), 39, 0, 5, 0.15, False, "all"),
    # a latent sampler on a pixel prior (identity autoencoder): the callback sees the latent, the output is clipped
    "psld": (dict(steps=20), 20, 20, 20, "sigma_min", False, "all"),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_same_seed_same_output_and_nfe_accounting(name):
    options, nfe, backward, steps, last_sigma, last_is_output, spread = TABLE[name]
    prior, physics, x, y = gaussian_inpainting_problem(shape=(1, 8, 8))
    sampler = samplers.make(name, prior, **options)
    calls = []
    a = sampler(y, physics, generator=torch.Generator().manual_seed(7), callback=calls.append)
    info = sampler.last_run
    b = sampler(y, physics, generator=torch.Generator().manual_seed(7))
    c = sampler(y, physics, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (info.nfe, info.nfe_backward, info.steps, info.batch) == (nfe, backward, steps, 1)
    assert info.wall_time > 0 and info.peak_memory is None
    assert [k["i"] for k in calls] == list(range(steps))
    if last_sigma is not None:
        expected = prior.sigma_min if last_sigma == "sigma_min" else last_sigma
        assert calls[-1]["sigma"] == pytest.approx(expected)
    if last_is_output:
        assert torch.equal(calls[-1]["x"], a)
    # without a generator: a fresh seed is recorded, and re-running with it reproduces the output
    d = sampler(y, physics)
    seed = sampler.last_run.seed
    assert seed is not None
    assert torch.equal(d, sampler(y, physics, generator=torch.Generator().manual_seed(seed)))
    if spread is not None:
        out = sampler.sample(y, physics, n=3, generator=torch.Generator().manual_seed(0))
        assert sampler.last_run.nfe == nfe and sampler.last_run.batch == 3
        assert bool(getattr(out.std > 0, spread)())
