r"""Train the :class:`~invdiff.priors.ConvAutoencoder` of a latent diffusion prior.

The first stage of latent diffusion (Rombach et al., CVPR 2022): an autoencoder trained for
reconstruction, whose latents a diffusion prior is then trained on (with the EDM trainer,
:mod:`invdiff.train.edm`, on :func:`encode_images` of the same images). The loss is

.. math::

    \mathcal L = \mathbb E_x\big[\ell\big(\mathcal D(\mathcal E(x)) - x\big)\big]
        + \lambda\, \mathbb E_x\big[\|\mathcal E(x)\|^2 / \dim z\big],

with :math:`\ell` the mean absolute (``loss="l1"``, the LDM's reconstruction term) or squared
(``"l2"``) error and a small latent penalty :math:`\lambda` (``latent_weight``; the LDM uses a
KL term of weight 1e-6 to the same end) that keeps the latents at a bounded scale. No
perceptual or adversarial term: at the small sizes invdiff trains, the L1 loss alone gives
sharp reconstructions. Adam, learning rate decayed by a cosine to a tenth, gradient clipping,
random horizontal flips; every random draw (batch order, flips) comes from one
``torch.Generator`` seeded by ``seed``, so a run is reproducible on a given device.

Example::

    >>> import torch
    >>> from invdiff.train.autoencoder import train_autoencoder
    >>> images = torch.rand(32, 1, 16, 16)
    >>> result = train_autoencoder(images, steps=5, width=8, progress=False)
    >>> result.autoencoder.encode(images[:2]).shape
    torch.Size([2, 4, 4, 4])
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..priors.latent import ConvAutoencoder

__all__ = ["AutoencoderResult", "train_autoencoder", "encode_images", "reconstruction_psnr", "ConvAutoencoder"]

LOSSES = ("l1", "l2")


@dataclass
class AutoencoderResult:
    """What :func:`train_autoencoder` returns.

    :ivar autoencoder: the trained :class:`~invdiff.priors.ConvAutoencoder` (eval mode, on the CPU).
    :ivar losses: training loss per step.
    :ivar psnr: reconstruction PSNR (dB, peak 1) on ``heldout`` (the training images when none).
    :ivar latent_mean: mean of the latents of the training images.
    :ivar latent_std: standard deviation of those latents (the latent prior's ``sigma_data``).
    :ivar config: the run's settings (for a model card).
    """

    autoencoder: ConvAutoencoder
    losses: list[float] = field(default_factory=list)
    psnr: float = float("nan")
    latent_mean: float = 0.0
    latent_std: float = 1.0
    config: dict = field(default_factory=dict)


def train_autoencoder(
    images: Tensor,
    steps: int,
    *,
    latent_channels: int = 4,
    width: int = 32,
    levels: int = 2,
    batch: int = 16,
    lr: float = 1e-3,
    loss: str = "l1",
    latent_weight: float = 1e-4,
    grad_clip: float = 1.0,
    hflip: bool = True,
    seed: int = 0,
    device: str | torch.device = "cpu",
    heldout: Tensor | None = None,
    progress: bool = True,
) -> AutoencoderResult:
    """Train a :class:`~invdiff.priors.ConvAutoencoder` on ``images`` for reconstruction.

    :param images: ``(N, C, H, W)`` training images in ``[0, 1]``, ``H`` and ``W`` multiples
        of ``2**levels``.
    :param steps: optimisation steps.
    :param latent_channels: latent channels (default 4).
    :param width: base width of the network.
    :param levels: number of 2x downsamplings (default 2: latents are 4x smaller per side).
    :param batch: images per step.
    :param lr: Adam learning rate (cosine-decayed to ``lr / 10``).
    :param loss: ``"l1"`` or ``"l2"``.
    :param latent_weight: weight of the latent penalty (0 for none).
    :param grad_clip: gradient-norm clipping.
    :param hflip: random horizontal flips.
    :param seed: seed of every random draw and of the initial weights.
    :param device: where to train.
    :param heldout: images to measure the final reconstruction PSNR on.
    :param progress: show a tqdm bar.
    :raises ValueError: bad images or settings (one line, saying what).
    """
    from tqdm.auto import tqdm

    _check_images(images, "images", levels)
    if heldout is not None:
        _check_images(heldout, "heldout", levels)
        if heldout.shape[1] != images.shape[1]:
            raise ValueError(f"heldout has {heldout.shape[1]} channels, images have {images.shape[1]}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be positive, got {steps}, {batch}")
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    if lr <= 0 or latent_weight < 0:
        raise ValueError(f"need lr > 0 and latent_weight >= 0, got {lr}, {latent_weight}")
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the initial weights from the seed, the global RNG untouched
        torch.manual_seed(seed)
        model = ConvAutoencoder(images.shape[1], latent_channels, width, levels)
    model.to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps)))
    data = images.float()
    losses: list[float] = []
    bar = tqdm(range(steps), desc="autoencoder", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        x = data[idx]
        if hflip:
            flip = torch.rand(batch, generator=gen) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        x = x.to(device)
        z = model.encode(x)
        err = model.decode(z) - x
        rec = err.abs().mean() if loss == "l1" else err.square().mean()
        total = rec + latent_weight * z.square().mean()
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        opt.step()
        sched.step()
        losses.append(float(total.detach()))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"autoencoder training diverged at step {len(losses)} (loss {losses[-1]}); lower lr")
        bar.set_postfix(loss=f"{losses[-1]:.4f}", refresh=False)
    model.eval().cpu()
    latents = encode_images(model, data)
    psnr = reconstruction_psnr(model, heldout if heldout is not None else data)
    config = dict(latent_channels=latent_channels, width=width, levels=levels, steps=steps, batch=batch, lr=lr,
                  loss=loss, latent_weight=latent_weight, grad_clip=grad_clip, hflip=hflip, seed=seed,
                  images=list(images.shape))
    return AutoencoderResult(model, losses, psnr, float(latents.mean()), float(latents.std()), config)


@torch.no_grad()
def encode_images(autoencoder: ConvAutoencoder, images: Tensor, batch: int = 64) -> Tensor:
    """Latents ``(N, C', H', W')`` of ``images`` ``(N, C, H, W)``, in batches, on the CPU."""
    device = next(autoencoder.parameters()).device
    return torch.cat([autoencoder.encode(chunk.float().to(device)).cpu() for chunk in images.split(batch)])


@torch.no_grad()
def reconstruction_psnr(autoencoder: ConvAutoencoder, images: Tensor, batch: int = 64) -> float:
    """Mean PSNR (dB, peak 1) of ``decode(encode(x))`` (clamped to ``[0, 1]``) against ``x``."""
    device = next(autoencoder.parameters()).device
    vals = []
    for chunk in images.split(batch):
        x = chunk.float().to(device)
        mse = (autoencoder.decode(autoencoder.encode(x)).clamp(0, 1) - x).square().flatten(1).mean(1)
        vals.append(-10 * torch.log10(mse.clamp_min(1e-12)).cpu())
    return float(torch.cat(vals).mean())


def _check_images(x: Tensor, what: str, levels: int) -> None:
    factor = 2**levels
    if not isinstance(x, Tensor) or x.ndim != 4 or x.shape[0] < 1:
        raise ValueError(f"{what} must be a (N, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise ValueError(f"{what}: height and width must be multiples of {factor} (2**levels), got {tuple(x.shape[-2:])}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{what} has NaN/Inf values")
