"""One contract every sampler in ``samplers.available()`` must pass, over a set of operators.

Each sampler is built with ``samplers.make(name, prior, steps=...)`` (every sampler takes
``steps``). The prior is wrapped so the test counts the real network calls and compares them
with ``last_run``; a prior that starts returning NaN checks the divergence guard.

The kind of prior comes from the sampler class's ``prior_kind`` (``"pixel"`` by default): a
``"latent"`` sampler (ReSample) gets a :class:`~invdiff.priors.LatentDiffusionPrior` with a linear
2x-upsampling decoder over a Gaussian latent prior, and the counting wrapper sits on the latent
prior, whose network calls are the ones ``nfe`` counts.
"""

import math

import deepinv as dinv
import pytest
import torch

from invdiff import operators, samplers
from invdiff.priors import DiffusionPrior, GaussianPrior, LatentDiffusionPrior, LinearAutoencoder
from invdiff.samplers import IncompatibleError, SamplerDivergedError

SHAPE = (1, 16, 16)
LATENT_SHAPE = (1, 8, 8)  # decoded to SHAPE by 2x bilinear upsampling
STEPS = 8
LINEAR_TASKS = ["inpaint-random-70", "deblur-gauss", "ct-sparse-30", "mri-4x"]


class CountingPrior(DiffusionPrior):
    """Delegates to ``inner``; counts calls, calls with a graph, and can turn to NaN."""

    def __init__(self, inner: DiffusionPrior, nan_below: float | None = None):
        super().__init__(inner.image_shape, inner.sigma_min, inner.sigma_max, inner.sigma_data)
        self.inner, self.nan_below = inner, nan_below
        self.calls = self.grad_calls = 0

    def _denoise(self, x, sigma):
        self.calls += 1
        self.grad_calls += int(x.requires_grad)
        out = self.inner._denoise(x, sigma)
        if self.nan_below is not None and float(sigma.max()) < self.nan_below:
            out = out * float("nan")
        return out


@pytest.fixture(scope="module")
def base_prior():
    return GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.02, mean=0.5)


@pytest.fixture(scope="module")
def latent_base():
    return GaussianPrior.stationary(LATENT_SHAPE, length_scale=1.0, variance=0.02, mean=0.0)


def _prior_kind(name: str) -> str:
    return samplers.get(name).prior_kind


def _counted(name, base_prior, latent_base, nan_below=None):
    """``(prior to build the sampler on, the CountingPrior that sees its network calls)``."""
    if _prior_kind(name) == "latent":
        counter = CountingPrior(latent_base, nan_below)
        return LatentDiffusionPrior(LinearAutoencoder.upsampling(LATENT_SHAPE, 2, bias=0.5), counter), counter
    counter = CountingPrior(base_prior, nan_below)
    return counter, counter


@pytest.fixture(scope="module")
def truth(base_prior):
    return base_prior.sample(2, torch.Generator().manual_seed(0)).float().clamp(0, 1)


KERNEL_SHAPE = (1, 4, 4)  # deblur-blind's default kernel at 16x16 (H // 4)


def _blind(name) -> bool:
    return samplers.get(name).handles_blind


def _make(name, prior):
    if _blind(name):  # BlindDPS: a Gaussian kernel prior of the task's kernel size
        kernel_prior = GaussianPrior(0.25, 0.05, image_shape=KERNEL_SHAPE)
        return samplers.make(name, prior, steps=STEPS, kernel_prior=kernel_prior)
    return samplers.make(name, prior, steps=STEPS)


def _task(name, task="inpaint-random-70"):
    """The operator of the single-task contract tests: ``deblur-blind`` for a blind sampler."""
    return "deblur-blind" if _blind(name) else task


def _nonlinear_ok(sampler) -> bool:
    return sampler.supports_nonlinear


@pytest.mark.parametrize("task", LINEAR_TASKS + ["phase-retrieval", "deblur-blind"])
@pytest.mark.parametrize("name", samplers.available())
def test_contract(name, task, base_prior, latent_base, truth):
    built, prior = _counted(name, base_prior, latent_base)
    sampler = _make(name, built)
    physics = operators.make(task, img_size=SHAPE, seed=0)
    y = physics(truth, seed=1)
    if _blind(name) != (task == "deblur-blind"):  # a blind task needs a blind method, and only it
        match = "needs a blind operator" if _blind(name) else "the operator's kernel is unknown"
        with pytest.raises(IncompatibleError, match=rf"{name}: {match}"):
            sampler(y, physics)
        assert prior.calls == 0
        return
    if not isinstance(physics, dinv.physics.LinearPhysics) and not _nonlinear_ok(sampler) and not _blind(name):
        with pytest.raises(TypeError, match=rf"{name}: needs a linear operator"):
            sampler(y, physics)
        return
    if getattr(sampler, "needs_svd", False) and task.startswith("ct-"):  # DDRM, DDNM: no SVD of the Radon transform
        with pytest.raises(IncompatibleError, match=rf"{name}: needs an operator with a known SVD"):
            sampler(y, physics)
        assert prior.calls == 0
        return
    a = sampler(y, physics, generator=torch.Generator().manual_seed(3))
    info = sampler.last_run
    # shape, finiteness, a sane range
    assert a.shape == truth.shape and torch.isfinite(a).all()
    assert a.min() > -1.0 and a.max() < 2.0
    # NFE accounting matches the network calls actually made
    assert info.sampler == name and info.nfe == prior.calls and info.nfe_backward == prior.grad_calls
    assert info.nfe >= 1 and info.steps >= 1 and info.wall_time > 0 and info.batch == truth.shape[0]
    # determinism under a seed
    b = sampler(y, physics, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", samplers.available())
def test_divergence_guard(name, base_prior, latent_base, truth):
    built, _ = _counted(name, base_prior, latent_base, nan_below=1.0)
    sampler = _make(name, built)
    physics = operators.make(_task(name), img_size=SHAPE, seed=0)
    with pytest.raises(SamplerDivergedError, match=rf"{name}: diverged at step \d+ \(sigma="):
        sampler(physics(truth, seed=1), physics, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", samplers.available())
def test_inside_deepinv_test(name, base_prior, latent_base, truth):
    sampler = _make(name, _counted(name, base_prior, latent_base)[0])
    physics = operators.make(_task(name), img_size=SHAPE, seed=0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(truth, torch.zeros(2)), batch_size=2)
    metrics = dinv.test(sampler, loader, physics, metrics=[dinv.metric.PSNR()], online_measurements=True,
                        device="cpu", verbose=False, plot_images=False)
    assert math.isfinite(metrics["PSNR"])


@pytest.mark.parametrize("name", samplers.available())
def test_global_rng_untouched_and_sample_batches(name, base_prior, latent_base, truth):
    built, prior = _counted(name, base_prior, latent_base)
    sampler = _make(name, built)
    physics = operators.make(_task(name), img_size=SHAPE, seed=0)
    y = physics(truth[:1], seed=1)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    post = sampler.sample(y, physics, n=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(state, torch.get_rng_state())
    assert post.samples.shape == (3, 1, *SHAPE) and post.mean.shape == (1, *SHAPE)
    assert torch.allclose(post.mean, post.samples.mean(0)) and (post.std > 0).any()
    # the samples go through the network together: one sample costs as many calls as three
    nfe_three = sampler.last_run.nfe
    assert prior.calls == nfe_three
    sampler.sample(y, physics, n=1, generator=torch.Generator().manual_seed(0))
    assert sampler.last_run.nfe == nfe_three


@pytest.mark.parametrize("name", samplers.available())
def test_prior_kind_is_checked_at_construction(name, base_prior, latent_base):
    """A pixel sampler refuses a latent prior (and names the way out); a latent sampler takes both."""
    latent_prior = LatentDiffusionPrior(LinearAutoencoder.upsampling(LATENT_SHAPE, 2, bias=0.5), latent_base)
    if _prior_kind(name) == "latent":
        assert _make(name, latent_prior).prior is latent_prior
        assert isinstance(_make(name, base_prior).prior, LatentDiffusionPrior)  # identity autoencoder
    else:
        with pytest.raises(TypeError, match="cannot use a LatentDiffusionPrior"):
            _make(name, latent_prior)
    with pytest.raises(TypeError, match="needs an invdiff DiffusionPrior"):
        _make(name, torch.nn.Identity())


@pytest.mark.parametrize("name", samplers.available())
def test_operator_with_per_image_parameters_serves_every_sample_and_particle(name, base_prior, latent_base, truth):
    """A mask with one entry per measurement (deepinv's physics generators) serves the
    measurements repeated into a batch of samples (and, for EnKG and SMC, particles): the
    run equals one on an operator whose masks were repeated by hand, every sample of image
    ``j`` fits image ``j``'s observed pixels far better than the pixels it cannot see, and
    the caller's operator is left unchanged."""
    if _blind(name):
        pytest.skip("a blind sampler takes no inpainting mask; per-image kernels: tests/test_blind_dps.py")
    built, _ = _counted(name, base_prior, latent_base)
    sampler = _make(name, built)
    masks = (torch.rand(2, *SHAPE, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    physics = dinv.physics.Inpainting(SHAPE, mask=masks.clone())
    y = physics(truth)
    out = sampler.sample(y, physics, n=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(physics.mask, masks)
    if type(sampler).sample is samplers.Sampler.sample:  # EnKG and SMC draw samples from one particle system
        by_hand = dinv.physics.Inpainting(SHAPE, mask=masks.repeat(2, 1, 1, 1))
        expected = sampler(y.repeat(2, 1, 1, 1), by_hand, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out.samples.reshape(expected.shape), expected, rtol=1e-5, atol=1e-6)
    for j in range(2):
        for k in range(2):
            err = (out.samples[k, j] - truth[j]).abs()
            seen = (err * masks[j]).norm() / masks[j].sum().sqrt()
            unseen = (err * (1 - masks[j])).norm() / (1 - masks[j]).sum().sqrt()
            assert seen < 0.9 * unseen, (j, k, float(seen), float(unseen))


@pytest.mark.parametrize("name", samplers.available())
def test_hyperparameters_are_serialisable_and_rebuild_the_sampler(name, base_prior, latent_base, truth):
    import json

    built, _ = _counted(name, base_prior, latent_base)
    sampler = _make(name, built)
    params = sampler.hyperparameters()
    assert params["steps"] == STEPS
    assert json.loads(json.dumps(params)) == params  # JSON as is
    objects = {"kernel_prior": sampler.kernel_prior} if _blind(name) else {}  # a second prior is passed again
    rebuilt = type(sampler).from_hyperparameters(built, json.loads(json.dumps(params)), **objects)
    assert rebuilt.hyperparameters() == params
    physics = operators.make(_task(name), img_size=SHAPE, seed=0)
    y = physics(truth, seed=1)
    a = sampler(y, physics, generator=torch.Generator().manual_seed(3))
    b = rebuilt(y, physics, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
