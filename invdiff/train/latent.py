r"""Train a latent diffusion prior: a :class:`~invdiff.priors.ConvAutoencoder`, then an EDM
prior on its latents, saved together as one :class:`~invdiff.priors.LatentDiffusionPrior`.

The recipe of latent diffusion (Rombach et al., CVPR 2022), in two stages:

1. the autoencoder :math:`(\mathcal E, \mathcal D)` is trained for reconstruction,
   :math:`\min \|\mathcal D(\mathcal E(x)) - x\|_1 + \lambda \|\mathcal E(x)\|^2`
   (:func:`~invdiff.train.autoencoder.train_autoencoder`; a small latent penalty instead of the
   LDM's KL/VQ regulariser);
2. the training images *and their mirror images* are encoded once, and the EDM trainer of
   :func:`invdiff.train.edm.train` learns a denoiser :math:`D_z(z, \sigma)` on the latents
   (flips are applied in image space before encoding, since a convolutional encoder is only
   approximately flip-equivariant).

The card records the autoencoder's held-out reconstruction PSNR and, per noise level, the
*decoded* denoising PSNR :math:`\mathrm{PSNR}(\mathcal D(D_z(\mathcal E(x) + \sigma\epsilon, \sigma)), x)`
on held-out images, with :math:`\sigma` given relative to the latents' standard deviation.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..priors.latent import LatentDiffusionPrior
from ..priors.loading import save
from .autoencoder import encode_images, train_autoencoder
from .edm import TrainConfig, reproduce_command, train, training_images, write_card_markdown

__all__ = ["LatentTrainConfig", "LatentTrainResult", "train_latent"]


@dataclass
class LatentTrainConfig:
    """The autoencoder stage of a latent run (the latent prior's settings are a :class:`TrainConfig`).

    :param steps: autoencoder optimisation steps.
    :param latent_channels: latent channels.
    :param width: autoencoder base width.
    :param levels: number of 2x downsamplings (latents are ``2**levels`` times smaller per side).
    :param batch: images per step.
    :param lr: Adam learning rate (cosine-decayed).
    :param latent_weight: weight of the latent L2 penalty.
    """

    steps: int = 1500
    latent_channels: int = 4
    width: int = 32
    levels: int = 2
    batch: int = 16
    lr: float = 1e-3
    latent_weight: float = 1e-4


@dataclass
class LatentTrainResult:
    """What :func:`train_latent` returns."""

    prior: LatentDiffusionPrior
    path: Path | None
    card: dict[str, Any]


@torch.no_grad()
def decoded_denoising_psnr(prior: LatentDiffusionPrior, images: Tensor, sigma: float, seed: int = 0) -> float:
    """Mean PSNR (dB, peak 1) of ``decode(D_z(encode(x) + sigma * eps, sigma))`` against ``x``."""
    g = torch.Generator().manual_seed(seed)
    z = prior.encode(images.float())
    noisy = z + sigma * torch.randn(z.shape, generator=g)
    x_hat = prior.decode(prior.latent.denoise(noisy, sigma)).clamp(0, 1)
    mse = (x_hat - images.float()).square().flatten(1).mean(1)
    return float((-10 * torch.log10(mse.clamp_min(1e-12))).mean())


def train_latent(
    config: TrainConfig,
    autoencoder: LatentTrainConfig,
    out: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    time_limit: float | None = None,
    name: str | None = None,
    command: str | None = None,
    progress: bool = True,
    images: Tensor | None = None,
    heldout: Tensor | None = None,
) -> LatentTrainResult:
    """Train the autoencoder, then an EDM prior on its latents; write the latent prior to ``out``.

    :param config: the data (``config.data``, ``size``, ``channels``, ``n_images``, ``seed``)
        and the latent prior's U-Net and optimisation (``width``, ``steps``, ``batch``, ``lr``,
        ``ema_halflife``); ``config.unshuffle``, ``config.patch`` and ``config.augment`` are ignored (the latent
        U-Net runs unpatched; flips are applied before encoding).
    :param autoencoder: the autoencoder stage.
    :param out: ``.safetensors`` file for the :class:`~invdiff.priors.LatentDiffusionPrior`
        (a ``.md`` card beside it); ``None`` to only return it.
    :param checkpoint: the latent stage's training checkpoint (default ``<out>.ckpt``).
    :param time_limit: minutes for the latent stage (stops cleanly; the card records the steps).
    :param images: training images instead of ``config.data``'s (tests).
    :param heldout: held-out images for the card (default: the built-in held-out set when
        ``config.data`` is built in).
    """
    from .. import __version__
    from .. import data as builtin

    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix != ".safetensors":
        raise ValueError(f"the trained prior is written as .safetensors; got {out_path.name}")
    start = time.perf_counter()
    x = training_images(config) if images is None else images.float()
    if heldout is None and config.data in builtin.DATASETS:
        heldout = builtin.heldout(config.data, 16, size=config.size).float()
    ae_result = train_autoencoder(
        x, autoencoder.steps, latent_channels=autoencoder.latent_channels, width=autoencoder.width,
        levels=autoencoder.levels, batch=autoencoder.batch, lr=autoencoder.lr,
        latent_weight=autoencoder.latent_weight, seed=config.seed, heldout=heldout, progress=progress)
    ae_seconds = time.perf_counter() - start
    ae = ae_result.autoencoder
    latents = encode_images(ae, torch.cat([x, x.flip(-1)]))
    factor = 2**autoencoder.levels
    latent_config = dataclasses.replace(config, data=f"{config.data} latents", size=config.size // factor,
                                        channels=autoencoder.latent_channels, unshuffle=1, augment=())
    if out_path is not None and checkpoint is None:
        checkpoint = out_path.with_suffix(".ckpt")
    result = train(latent_config, None, checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                   time_limit=time_limit, progress=progress, images=latents, command="")
    prior = LatentDiffusionPrior(ae, result.prior, image_shape=(config.channels, config.size, config.size)).eval()

    latent_card = result.card
    card: dict[str, Any] = {
        "name": name or (out_path.stem if out_path is not None else None),
        "description": (f"latent diffusion prior on {config.data} at {config.size}x{config.size}: "
                        f"ConvAutoencoder (f{factor}, {autoencoder.latent_channels} latent channels) + "
                        f"EDM denoiser on {latent_config.size}x{latent_config.size}x{latent_config.channels} latents"),
        "data": config.data,
        "data_description": builtin_description(config.data),
        "training_images": int(x.shape[0]),
        "image_size": config.size,
        "channels": config.channels,
        "latent_shape": list(prior.latent_shape),
        "parameters": int(sum(p.numel() for p in prior.parameters())),
        "autoencoder_parameters": int(sum(p.numel() for p in ae.parameters())),
        "autoencoder": dict(ae_result.config, final_loss=round(ae_result.losses[-1], 5), seconds=round(ae_seconds, 1)),
        "heldout_reconstruction_psnr": round(ae_result.psnr, 2),
        "steps": latent_card["steps"],
        "final_loss": latent_card["final_loss"],
        "steps_per_second": latent_card["steps_per_second"],
        "train_seconds": round(ae_seconds + latent_card["train_seconds"], 1),
        "device": latent_card["device"],
        "cpu_threads": torch.get_num_threads(),
        "sigma_data": prior.latent.sigma_data,
        "config": config.to_dict(),
        "autoencoder_config": dataclasses.asdict(autoencoder),
        "invdiff_version": __version__,
        "torch_version": torch.__version__,
        "command": (command if command is not None else reproduce_command(config, out_path or f"{name or 'prior'}.safetensors", autoencoder)).replace(
            "{steps}", str(latent_card["steps"])),
    }
    if config.data == "ct-phantom":
        card["value_range"] = "HU window [-1000, 1000] mapped to [0, 1]"
    elif config.data == "mri-brain":
        card["value_range"] = "template intensity / its 99.5th percentile, clipped to [0, 1]"
    if heldout is not None:
        sd = prior.latent.sigma_data
        card["heldout_denoising_psnr"] = {
            f"sigma={s}*sigma_data": round(decoded_denoising_psnr(prior, heldout, s * sd), 2) for s in (0.1, 0.5)}
    if out_path is not None:
        save(prior, out_path, card=card)
        write_card_markdown(card, out_path.with_suffix(".md"))
    return LatentTrainResult(prior=prior, path=out_path, card=card)


def builtin_description(data: str) -> str:
    from .edm import DESCRIPTIONS

    return DESCRIPTIONS.get(data, f"images from the folder {data}")
