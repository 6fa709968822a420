"""invdiff inside deepinv pipelines: deepinv's own physics through every invdiff sampler,
invdiff priors inside deepinv's samplers and unrolled networks, ``dinv.test`` and
``Trainer.test`` / ``Trainer.train`` end to end.

Quality is measured against the exact posterior of an analytic Gaussian prior (16x16):
``progress = rel_err(estimate, exact posterior mean, prior mean)`` is 0 for the exact
answer and 1 for an estimate no better than the prior mean.
"""

import deepinv as dinv
import pytest
import torch
from conftest import rel_err

from invdiff import priors, samplers
from invdiff.priors import GaussianPrior

SHAPE = (1, 16, 16)
NOISE = 0.05
#: CPU-sized settings (the defaults of EnKG and SMC are GPU-sized)
CHEAP = {"enkg": dict(ensemble_size=64), "smc": dict(particles=4), "resample": dict(steps=100), "fps": dict(steps=200),
         "pnpdm": dict(diffusion_steps=20),
         # BlindDPS refuses every known operator here; a small analytic kernel prior instead of the shipped one
         "blind-dps": dict(kernel_prior=GaussianPrior(0.25, 0.05, image_shape=(1, 4, 4)))}


@pytest.fixture(scope="module")
def prior():
    return GaussianPrior.stationary(SHAPE, length_scale=2.0, variance=0.05, mean=0.5)


def _gaussian(seed=1, sigma=NOISE):
    return dinv.physics.GaussianNoise(sigma, rng=torch.Generator().manual_seed(seed))


def _rng(seed):
    return torch.Generator().manual_seed(seed)


def _applies(sampler, physics) -> bool:
    """Whether ``sampler`` can use ``physics``; a refusal is one line, and only the SVD samplers
    (DDRM, DDNM) refuse a linear operator (one without a known SVD)."""
    try:
        sampler.check_physics(physics)
    except samplers.IncompatibleError as err:
        assert "\n" not in str(err)
        assert getattr(sampler, "needs_svd", False) or not sampler.supports_nonlinear, str(err)
        return False
    return True


#: deepinv's own linear physics on (1, 16, 16) images, each with seeded Gaussian noise
DEEPINV_PHYSICS = {
    "Inpainting": lambda: dinv.physics.Inpainting(SHAPE, mask=0.5, noise_model=_gaussian(), rng=_rng(0)),
    "BlurFFT": lambda: dinv.physics.BlurFFT(SHAPE, filter=dinv.physics.blur.gaussian_blur(1.0),
                                            noise_model=_gaussian()),
    "Blur": lambda: dinv.physics.Blur(filter=dinv.physics.blur.gaussian_blur(1.0), padding="circular",
                                      noise_model=_gaussian()),
    "Downsampling": lambda: dinv.physics.Downsampling(SHAPE, filter="bicubic", factor=2, padding="circular",
                                                      noise_model=_gaussian()),
    "Tomography": lambda: dinv.physics.Tomography(angles=24, img_width=16, circle=False, noise_model=_gaussian()),
    "CompressedSensing": lambda: dinv.physics.CompressedSensing(m=128, img_size=SHAPE, noise_model=_gaussian(),
                                                                rng=_rng(0)),
    "Denoising": lambda: dinv.physics.Denoising(noise_model=_gaussian(sigma=0.1)),
}


def _make(name, prior, **kw):
    return samplers.make(name, prior, **{**CHEAP.get(name, {}), **kw})


class _Images(torch.utils.data.Dataset):
    """Images only (deepinv's datasets return ``x``; a TensorDataset returns a 1-tuple)."""

    def __init__(self, x):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i]


def _loader(x, batch_size=2):
    return torch.utils.data.DataLoader(_Images(x), batch_size=batch_size)


def _progress(prior, physics, y, estimate, noise_sigma):
    exact = prior.posterior(y, physics, noise_sigma).mean.float()
    return rel_err(estimate, exact, torch.full_like(exact, 0.5))


@pytest.fixture(scope="module")
def truth(prior):
    return prior.sample(2, _rng(3)).float()


@pytest.mark.parametrize("physics_name", sorted(DEEPINV_PHYSICS))
@pytest.mark.parametrize("name", samplers.available())
def test_every_sampler_on_deepinv_physics_approaches_the_exact_posterior(name, physics_name, prior, truth):
    """deepinv's own operators through every registered sampler at its defaults (EnKG/SMC
    CPU-sized): the mean of 2 samples recovers most of the way from the prior mean to the
    exact posterior mean (the shipped samplers reach 0.1-0.4 on these problems)."""
    physics = DEEPINV_PHYSICS[physics_name]()
    y = physics(truth)
    sampler = _make(name, prior)
    if not _applies(sampler, physics):
        assert sampler.handles_blind or physics_name in ("Blur", "Tomography", "CompressedSensing", "Downsampling"), \
            physics_name
        return
    est = sampler.sample(y, physics, n=2, generator=_rng(0)).mean
    sigma = float(physics.noise_model.sigma)
    assert _progress(prior, physics, y, est, sigma) < 0.6


def test_mri_and_multicoil_mri_from_deepinv(truth):
    """deepinv's (single- and multi-coil) MRI on complex images: 2-channel Gaussian prior."""
    prior2 = GaussianPrior.stationary((2, 16, 16), length_scale=2.0, variance=0.05, mean=0.25)
    x = prior2.sample(1, _rng(5)).float()
    mask = torch.zeros(1, 16, 16)
    mask[..., ::2] = 1
    mask[..., 6:10] = 1
    ramp = torch.linspace(0, 1, 16)
    coils = torch.stack([(1.5 - ramp)[None, :] * torch.exp(1j * ramp[:, None]),
                         (0.5 + ramp)[None, :] * torch.exp(-1j * ramp[:, None])])
    coils = (coils / coils.abs().pow(2).sum(0, keepdim=True).sqrt())[None].to(torch.complex64)
    for physics in (dinv.physics.MRI(mask=mask, img_size=(2, 16, 16), noise_model=_gaussian()),
                    dinv.physics.MultiCoilMRI(mask=mask, coil_maps=coils, img_size=(2, 16, 16),
                                              noise_model=_gaussian())):
        y = physics(x)
        exact = prior2.posterior(y, physics, NOISE).mean.float()
        for name in ("dps", "dds", "diffpir", "daps"):
            est = samplers.make(name, prior2, clip=None).sample(y, physics, n=2, generator=_rng(0)).mean
            assert rel_err(est, exact, torch.full_like(exact, 0.25)) < 0.6, (type(physics).__name__, name)


def test_poisson_data_need_no_noise_sigma(prior, truth):
    """deepinv's PoissonNoise: every sampler reads it (the Gaussian-likelihood samplers use
    the mean Poisson variance), and beats the adjoint baseline."""
    physics = dinv.physics.Inpainting(SHAPE, mask=0.5, rng=_rng(0),
                                      noise_model=dinv.physics.PoissonNoise(gain=1 / 400, clip_positive=True, rng=_rng(1)))
    y = physics(truth)
    for name in samplers.available():
        sampler = _make(name, prior)
        if not _applies(sampler, physics):
            continue
        est = sampler.sample(y, physics, n=2, generator=_rng(0)).mean
        assert rel_err(est, truth, physics.A_adjoint(y)) < 0.6, name


def test_a_nonlinear_deepinv_physics_works_with_every_nonlinear_sampler(prior, truth):
    """A nonlinear deepinv ``Physics`` (no ``A_adjoint``): the samplers that take any operator
    run on it and approach the truth; RED-Diff starts from the prior instead of crashing.
    (Its Jacobian norm is at most 1 on [0, 1], the scale step sizes assume for a nonlinear
    operator; give ``operator_norm=`` for a larger one.)"""
    physics = dinv.physics.Physics(A=lambda x: x - 0.25 * x**2, noise_model=_gaussian())
    y = physics(truth)
    for name in samplers.available():
        sampler = _make(name, prior)
        if sampler.handles_blind:  # BlindDPS: only a blind blur
            with pytest.raises(TypeError, match="needs a blind operator"):
                sampler(y, physics, generator=_rng(0))
            continue
        if not sampler.supports_nonlinear:
            with pytest.raises(TypeError, match="needs a linear operator"):
                sampler(y, physics, generator=_rng(0))
            continue
        est = sampler.sample(y, physics, n=2, generator=_rng(0)).mean
        assert rel_err(est, truth, torch.full_like(truth, 0.5)) < 0.7, name
    reddiff = _make("reddiff", prior)
    reddiff(y, physics, generator=_rng(0))
    assert reddiff.last_run.extra["start"] == "prior"


def test_reddiff_start_is_safe_on_an_unregularised_pseudo_inverse(prior, truth):
    """deepinv's BlurFFT ``A_dagger`` of noisy data is an exact inverse (values of +-100s):
    RED-Diff starts from a CG-regularised solution instead and lands near the posterior."""
    physics = dinv.physics.BlurFFT(SHAPE, filter=dinv.physics.blur.gaussian_blur(2.0), noise_model=_gaussian())
    y = physics(truth)
    assert physics.A_dagger(y).abs().max() > 10  # the unsafe start
    sampler = _make("reddiff", prior)
    est = sampler(y, physics, generator=_rng(0))
    assert sampler.last_run.extra["start"] == "cg"
    assert _progress(prior, physics, y, est, NOISE) < 0.5


def test_physics_generators_per_image_masks_kernels_and_noise_levels(prior, truth):
    """deepinv's physics generators give one mask / kernel / noise level per image: every
    sampler serves them (``sample(n)``, EnKG ensembles, SMC particles), each image against
    its own exact posterior."""
    noise = dinv.physics.GaussianNoise(torch.tensor([0.02, 0.1]), rng=_rng(1))
    masks = (torch.rand(2, *SHAPE, generator=_rng(2)) > 0.5).float()
    kernels = dinv.physics.generator.DiffractionBlurGenerator((5, 5), rng=_rng(4)).step(batch_size=2)["filter"]
    cases = ((dinv.physics.Inpainting, "mask", masks), (dinv.physics.BlurFFT, "filter", kernels))
    for make_physics, key, per_image in cases:
        physics = make_physics(SHAPE, **{key: per_image}, noise_model=noise)
        y = physics(truth)
        for name in samplers.available():
            sampler = _make(name, prior)
            if not _applies(sampler, physics):
                continue
            est = sampler.sample(y, physics, n=2, generator=_rng(0)).mean
            for j, s in enumerate((0.02, 0.1)):
                single = make_physics(SHAPE, **{key: per_image[j:j + 1]})
                exact = prior.posterior(y[j:j + 1], single, s).mean.float()
                assert rel_err(est[j:j + 1], exact, torch.full_like(exact, 0.5)) < 0.6, (name, type(physics).__name__, j)


def test_sigma_generator_in_dinv_test(prior):
    """``dinv.test`` with a ``SigmaGenerator`` (a new noise level per batch, one per image)
    and an invdiff sampler: PSNR above the no-learning column."""
    data = prior.sample(4, _rng(7)).float().clamp(0, 1)
    loader = _loader(data)
    physics = dinv.physics.Inpainting(SHAPE, mask=0.6, rng=_rng(0), noise_model=dinv.physics.GaussianNoise(0.05))
    generator = dinv.physics.generator.SigmaGenerator(0.01, 0.1, rng=_rng(8))
    out = dinv.test(_make("dds", prior), loader, physics, physics_generator=generator, online_measurements=True,
                    no_learning_method="A_dagger", show_progress_bar=False, verbose=False)
    assert out["PSNR"] > out["PSNR no learning"] + 3


def test_trainer_test_with_convergence_metrics(prior, tmp_path, monkeypatch):
    """``Trainer.test(plot_convergence_metrics=True)`` passes ``x_gt`` and ``compute_metrics``:
    the sampler returns deepinv's per-image, per-step metrics."""
    data = prior.sample(2, _rng(7)).float().clamp(0, 1)
    physics = dinv.physics.Inpainting(SHAPE, mask=0.6, rng=_rng(0), noise_model=_gaussian())
    sampler = _make("dps", prior, steps=20)
    x_hat, metrics = sampler(physics(data), physics, x_gt=data, compute_metrics=True, seed=0)
    assert len(metrics["psnr"]) == 2 and len(metrics["psnr"][0]) == 20 and len(metrics["residual"][0]) == 19
    assert metrics["psnr"][0][-1] > metrics["psnr"][0][0] + 3  # the estimate improves along the run
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.chdir(tmp_path)  # deepinv writes the curves under "<save_folder_im>/", relative to the cwd
    loader = _loader(data)
    trainer = dinv.Trainer(sampler, physics=physics, train_dataloader=loader, online_measurements=True,
                           plot_convergence_metrics=True, save_path=str(tmp_path), show_progress_bar=False,
                           verbose=False, device="cpu", optimizer=None, epochs=0, compare_no_learning=True,
                           no_learning_method="A_dagger")
    out = trainer.test(loader)
    # the Trainer calls the sampler without a seed, so this is one posterior sample drawn from the OS seed:
    # 20-step DPS samples score 21-26 dB here (19 dB seen once), the pseudo-inverse 9 dB
    assert out["PSNR"] > out["PSNR no learning"] + 6


def test_seed_keyword_is_deepinvs_convention(prior, truth):
    physics = DEEPINV_PHYSICS["Inpainting"]()
    y = physics(truth)
    sampler = _make("dds", prior)
    a = sampler(y, physics, seed=3)
    assert sampler.last_run.seed == 3
    assert torch.equal(a, sampler(y, physics, generator=_rng(3)))
    assert not torch.equal(a, sampler(y, physics, seed=4))


def test_deepinv_samplers_with_every_invdiff_prior(prior, truth):
    """deepinv's DPS, DiffPIR and DDRM (whose schedule ends at sigma = 0) with an invdiff
    prior: finite, and near the exact posterior on the analytic prior."""
    physics = dinv.physics.Inpainting(SHAPE, mask=0.5, noise_model=_gaussian(), rng=_rng(0))
    y = physics(truth[:1])
    exact = prior.posterior(y, physics, NOISE).mean.float()
    ddrm = dinv.sampling.DDRM(prior, sigmas=torch.linspace(1, 0, 50).numpy())
    diffpir = dinv.sampling.DiffPIR(prior, data_fidelity=dinv.optim.L2(), max_iter=50, sigma=NOISE, verbose=False)
    for method in (ddrm, diffpir):
        out = method(y, physics, seed=0)
        assert torch.isfinite(out).all()
        assert rel_err(out, exact, torch.full_like(exact, 0.5)) < 0.7, type(method).__name__
    dps = dinv.sampling.DPS(prior, num_steps=50, verbose=False, dtype=torch.float32)
    assert torch.isfinite(dps(y, physics, seed=0)).all()


def test_shipped_priors_in_deepinv_ddrm_and_unrolled_hqs():
    """The shipped EDM prior in deepinv's DDRM (sigma = 0 at the end, once NaN) and as the
    denoiser of an unrolled HQS network; a trainable load trains through it."""
    prior = priors.load("ct-phantom-64")
    from invdiff.data import heldout

    x = heldout("ct-phantom", 1, size=64)
    physics = dinv.physics.Inpainting((1, 64, 64), mask=0.5, rng=_rng(0), noise_model=_gaussian(sigma=0.02))
    y = physics(x)
    baseline = (physics.A_adjoint(y) - x).norm()
    out = dinv.sampling.DDRM(prior, sigmas=torch.linspace(1, 0, 10).numpy())(y, physics, seed=0)
    assert torch.isfinite(out).all() and (out - x).norm() < 0.5 * baseline
    model = dinv.unfolded.unfolded_builder("HQS", params_algo={"stepsize": 1.0, "g_param": 0.05}, trainable_params=[],
                                           data_fidelity=dinv.optim.L2(), max_iter=3,
                                           prior=dinv.optim.PnP(denoiser=priors.load("ct-phantom-64", trainable=True)))
    loss = ((model(y, physics) - x) ** 2).mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert not any(p.requires_grad for p in prior.parameters())  # the default load is frozen


@pytest.mark.parametrize("make_prior", [
    lambda: GaussianPrior.stationary((1, 8, 8), length_scale=2.0),
    lambda: priors.GaussianMixturePrior(torch.tensor([0.5, 0.5]), torch.stack([torch.full((1, 8, 8), 0.3),
                                        torch.full((1, 8, 8), 0.7)]), torch.tensor([0.01, 0.02])),
    lambda: priors.EDMPrior(priors.GuidedDiffusionUNet(priors.small_unet_config(8)), (1, 8, 8), 0.3, 0.4, patch=2),
    lambda: priors.DenoiserPrior(dinv.models.DRUNet(1, 1, nc=(8, 8, 8, 8), nb=1, pretrained=None), (1, 8, 8),
                                 0.01, 0.5),
    lambda: priors.load("ct-phantom-64"),
], ids=["gaussian", "mixture", "edm", "deepinv-denoiser", "shipped"])
def test_every_prior_is_the_identity_at_sigma_zero_and_takes_deepinv_sigma_shapes(make_prior):
    prior = make_prior()
    x = torch.rand(3, *prior.image_shape, generator=_rng(0))
    with torch.no_grad():
        torch.testing.assert_close(prior(x, 0.0), x, rtol=0, atol=0)
        mixed = prior(x, torch.tensor([0.0, 0.2, 0.5]))
        assert torch.equal(mixed[0], x[0]) and torch.isfinite(mixed).all()
        torch.testing.assert_close(mixed[1:], prior(x[1:], torch.tensor([0.2, 0.5])), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(prior(x, torch.tensor([0.0, 0.2, 0.5]).reshape(3, 1, 1, 1)), mixed)
    with pytest.raises(ValueError, match="sigma must be >= 0"):
        prior(x, torch.tensor([0.0, -0.1, 0.2]))


def test_latent_prior_in_a_deepinv_sampler_names_resample():
    latent = GaussianPrior.stationary((1, 4, 4), length_scale=1.0, variance=0.05, mean=0.0)
    prior = priors.LatentDiffusionPrior(priors.LinearAutoencoder.upsampling((1, 4, 4), factor=2, bias=0.5), latent)
    physics = dinv.physics.Inpainting((1, 8, 8), mask=0.5, rng=_rng(0))
    with pytest.raises(NotImplementedError, match="samplers.ReSample"):
        dinv.sampling.DDRM(prior, sigmas=torch.linspace(1, 0, 5).numpy())(physics(torch.rand(1, 1, 8, 8)), physics)


def test_trainer_trains_a_prior_through_a_differentiable_sampler(tmp_path):
    """``Trainer.train`` with an invdiff sampler over a trainable prior: with
    ``sampler.differentiable = True`` the loss reaches the network and the weights move."""
    prior = priors.EDMPrior(priors.GuidedDiffusionUNet(priors.small_unet_config(16)), (1, 16, 16), 0.3, 0.4,
                            patch=2, sigma_max=5.0)
    sampler = samplers.make("dds", prior, steps=4)
    sampler.differentiable = True
    before = [p.detach().clone() for p in prior.parameters()]
    data = torch.rand(4, 1, 16, 16, generator=_rng(0))
    loader = _loader(data)
    physics = dinv.physics.Inpainting((1, 16, 16), mask=0.5, rng=_rng(0), noise_model=_gaussian())
    trainer = dinv.Trainer(sampler, physics=physics, train_dataloader=loader, epochs=1, online_measurements=True,
                           optimizer=torch.optim.Adam(prior.parameters(), lr=1e-3), losses=dinv.loss.SupLoss(),
                           save_path=str(tmp_path), show_progress_bar=False, verbose=False, device="cpu",
                           plot_images=False, check_grad=False)
    trainer.train()
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, prior.parameters()))
    sampler.differentiable = False
    assert not sampler(physics(data[:1]), physics, seed=0).requires_grad  # the default keeps no graph


def test_no_learning_column_on_invdiff_ct_needs_a_dagger(prior):
    """invdiff's CT adjoint is the unnormalised back-projection (the exact transpose): deepinv's
    default no-learning column (``A_adjoint``) is meaningless on it, ``A_dagger`` (FBP) is the
    baseline; the README's deepinv section says so."""
    from invdiff import operators

    physics = operators.make("ct-sparse-30", img_size=SHAPE, noise_sigma=0.01)
    data = prior.sample(2, _rng(7)).float().clamp(0, 1)
    loader = _loader(data)
    kw = dict(online_measurements=True, show_progress_bar=False, verbose=False)
    adjoint = dinv.test(_make("dds", prior), loader, physics, **kw)
    dagger = dinv.test(_make("dds", prior), loader, physics, no_learning_method="A_dagger", **kw)
    assert adjoint["PSNR no learning"] < 0 < dagger["PSNR no learning"] - 20
    assert dagger["PSNR"] > dagger["PSNR no learning"] + 3


def test_stacked_physics_through_every_sampler(prior, truth):
    """deepinv's ``StackedLinearPhysics`` (``TensorList`` measurements, a noise level per
    component) through every sampler: the stack is whitened into one operator with the same
    likelihood, and every sampler approaches the exact posterior of the two measurements."""
    from invdiff.operators import whitened_stack

    stack = dinv.physics.StackedLinearPhysics([
        dinv.physics.Inpainting(SHAPE, mask=0.5, rng=_rng(0), noise_model=_gaussian(1, 0.05)),
        dinv.physics.BlurFFT(SHAPE, filter=dinv.physics.blur.gaussian_blur(1.0), noise_model=_gaussian(2, 0.1)),
    ])
    y = stack(truth)
    flat = whitened_stack(stack)
    y_flat = flat.whiten(y)
    # the whitened operator: exact adjoint, and the likelihood of the two parts
    x, v = torch.rand(2, *SHAPE, generator=_rng(5)), torch.randn(y_flat.shape, generator=_rng(6))
    torch.testing.assert_close((flat.A(x) * v).sum(), (x * flat.A_adjoint(v)).sum(), rtol=1e-5, atol=1e-5)
    parts = stack.A(x)
    nll = sum(((y[i] - parts[i]) ** 2).sum() / (2 * s**2) for i, s in enumerate((0.05, 0.1)))
    torch.testing.assert_close(((y_flat - flat.A(x)) ** 2).sum() / 2, nll, rtol=1e-5, atol=1e-3)
    exact = prior.posterior(y_flat, flat, 1.0).mean.float()
    for name in samplers.available():
        sampler = _make(name, prior)
        if not _applies(sampler, stack):
            continue
        est = sampler.sample(y, stack, n=2, generator=_rng(0)).mean
        assert rel_err(est, exact, torch.full_like(exact, 0.5)) < 0.6, name
    with pytest.raises(ValueError, match="component 1 .*Gaussian noise with one level > 0"):
        whitened_stack(dinv.physics.StackedLinearPhysics([stack.physics_list[0],
                                                            dinv.physics.Denoising(noise_model=dinv.physics.ZeroNoise())]))


@pytest.mark.parametrize("name", ["enkg", "smc", "dps"])
def test_dinv_test_with_a_mask_generator(name, prior):
    """``dinv.test(..., physics_generator=...)`` with a new random mask per image (deepinv's
    ``BernoulliSplittingMaskGenerator``): the particle samplers serve it too."""
    data = prior.sample(4, _rng(7)).float().clamp(0, 1)
    physics = dinv.physics.Inpainting(SHAPE, mask=0.5, rng=_rng(0), noise_model=_gaussian())
    masks = dinv.physics.generator.BernoulliSplittingMaskGenerator(SHAPE, split_ratio=0.6, rng=_rng(9))
    out = dinv.test(_make(name, prior), _loader(data), physics, physics_generator=masks, online_measurements=True,
                    no_learning_method="A_dagger", show_progress_bar=False, verbose=False)
    assert out["PSNR"] > out["PSNR no learning"] + 3
