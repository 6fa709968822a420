"""Train an :class:`~invdiff.priors.EDMPrior` with the EDM denoising loss.

The loss of Karras et al. (2022, eq. 2 and table 1), on ``[0, 1]`` images:

.. math::

    \\mathcal{L} = \\mathbb{E}_{x_0, \\sigma, n}\\Big[\\lambda(\\sigma)\\,
        \\big\\| D_\\theta(x_0 + \\sigma n, \\sigma) - x_0 \\big\\|^2\\Big], \\qquad
    \\ln \\sigma \\sim \\mathcal{N}(P_\\text{mean}, P_\\text{std}^2), \\qquad
    \\lambda(\\sigma) = \\frac{\\sigma^2 + \\sigma_d^2}{(\\sigma \\sigma_d)^2},

with ``P_mean = -1.2 + ln(1/2)`` and ``P_std = 1.2`` (EDM's values on ``[-1, 1]`` moved
to ``[0, 1]``, where every noise level is halved), Adam with a linear learning-rate
warm-up, gradient clipping, and an exponential moving average of the weights with EDM's
half-life rule (``ema_halflife`` images, ramped up as ``ema_rampup`` x images seen).
Augmentations (random flips, 90-degree rotations, small rotations through kornia) are
drawn from the run's own generator.

**Patch priors** (``patch = P > 0``, PaDIS / Patch Diffusion, see
:class:`~invdiff.priors.PatchDiffusionPrior`): the pool holds full-size images (of every
size in ``sizes``); each step draws one patch size from ``P, P/2, P/4`` with probabilities
``patch_mix`` (the batch grows as ``(P/p)^2``, up to 4x, so a step costs about the same),
crops one patch per image at a uniform position of the image zero-padded by ``patch_pad``
(default ``P/2``) pixels, and gives the network its positional channels. The padding stays
clean (the network input is 0 there, as at sampling time) and the loss counts only pixels
inside the image. The cost per step is that of a ``P x P`` model, whatever the image size.

Every random draw (batch indices, augmentations, noise levels, noise) comes from one
``torch.Generator`` seeded by ``seed`` whose state is saved in each checkpoint, so a run
resumed from a checkpoint continues exactly as if it had not stopped.

On CUDA the network runs under bf16 autocast in ``channels_last`` layout.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..files import atomic_file, atomic_write
from ..priors.adm import GuidedDiffusionUNet
from ..priors.edm import EDMPrior, small_unet_config
from ..priors.patch import PatchDiffusionPrior, PositionalEDMDenoiser, patch_unet_config
from ..priors.loading import save

__all__ = ["TrainConfig", "TrainResult", "train", "training_images", "denoising_psnr", "AUGMENTATIONS"]

#: Augmentations accepted in :attr:`TrainConfig.augment`.
AUGMENTATIONS = ("hflip", "vflip", "rot90", "rotate")

DESCRIPTIONS = {
    "ct-phantom": "procedural anatomical CT slices (invdiff.data.phantoms.ct, seed 0, stream 0), "
                  "HU window [-1000, 1000] -> [0, 1]",
    "mri-brain": "MNI152 T1 template slices shipped by nilearn (axial, coronal, sagittal; "
                 "held-out slices and a 3 mm guard band excluded), 99.5th percentile -> 1",
    "blur-kernels": "seeded blur kernels (invdiff.operators.kernels, seed 0, stream 0): deepinv motion (l=0.3, "
                    "sigma=0.25), diffraction (fc in [0.15, 0.35]) and anisotropic Gaussian (std 0.5-3 px) "
                    "kernels in equal thirds, each shown as k / max(k)",
    "mri-brain-synth": "the mri-brain slices plus domain-randomised MNI152 slices (invdiff.data.mni.randomised, "
                       "seed 0: random oblique planes and fields of view, elastic deformation, random grey/white/"
                       "CSF contrasts, bias field, Rician noise; plane centres keep the 3 mm guard band)",
    "mri-brain-coronal-synth": "the coronal mri-brain slices plus domain-randomised coronal MNI152 planes "
                               "(invdiff.data.mni.randomised(orientations=('coronal',)), seed 0; tilt up to 15 "
                               "degrees, the 3 mm guard band kept): the perpendicular prior of a brain volume",
}


@dataclass
class TrainConfig:
    """Everything that determines a training run (saved in checkpoints and model cards).

    :param data: ``"ct-phantom"``, ``"mri-brain"`` or a folder of images (PNG/TIFF,
        DICOM, NIfTI; read with :func:`invdiff.io.read_image_folder`).
    :param size: image side; folder images are resized (anti-aliased) to it.
    :param channels: image channels.
    :param width: base width of the U-Net (:func:`~invdiff.priors.small_unet_config`).
    :param unshuffle: pixel-unshuffle factor of the network input (see :class:`~invdiff.priors.EDMPrior`).
    :param patch: patch size ``P`` of a patch prior (0: a whole-image prior at ``size``).
    :param sizes: image sizes of the pool of a patch prior (default ``(size,)``): generated
        data is made at each size (``n_images`` split in proportion to ``1/size``), folder
        images are kept at their own size (resized only when larger than ``size``).
    :param patch_pad: zero padding around the images for the patch crops (-1: ``P/2``).
    :param patch_mix: probabilities of the patch sizes ``P, P/2, P/4``.
    :param steps: optimisation steps.
    :param batch: images per step.
    :param lr: Adam learning rate (after ``warmup`` steps of linear warm-up).
    :param ema_halflife: EMA half-life in images (EDM: 500k at batch 512; short runs need
        less).
    :param ema_rampup: EDM's EMA ramp-up ratio (half-life at most ``rampup`` x images seen).
    :param p_mean, p_std: log-normal noise-level distribution.
    :param augment: subset of :data:`AUGMENTATIONS`; ``rotate`` draws angles in
        ``[-rotate_degrees, rotate_degrees]``.
    :param n_images: size of the training pool for generated data (phantoms).
    :param seed: seed of every random draw.
    """

    data: str = "ct-phantom"
    size: int = 64
    channels: int = 1
    width: int = 32
    unshuffle: int = 2
    patch: int = 0
    sizes: tuple[int, ...] = ()
    patch_pad: int = -1
    patch_mix: tuple[float, ...] = (0.5, 0.3, 0.2)
    steps: int = 2000
    batch: int = 16
    lr: float = 5e-4
    warmup: int = 100
    grad_clip: float = 1.0
    ema_halflife: float = 5_000.0
    ema_rampup: float = 0.1
    p_mean: float = -1.2 + math.log(0.5)
    p_std: float = 1.2
    augment: tuple[str, ...] = ("hflip",)
    rotate_degrees: float = 8.0
    n_images: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        self.augment = tuple(self.augment)
        self.sizes = tuple(int(s) for s in self.sizes)
        self.patch_mix = tuple(float(p) for p in self.patch_mix)
        bad = set(self.augment) - set(AUGMENTATIONS)
        if bad:
            raise ValueError(f"unknown augmentations {sorted(bad)}; choose from {', '.join(AUGMENTATIONS)}")
        if self.patch:
            q = self.unshuffle * 4
            if self.patch < 2 * q or self.patch % (4 * q):
                raise ValueError(f"patch must be a multiple of {4 * q} (P/4 patches through a 3-level U-Net on "
                                 f"{self.unshuffle}x{self.unshuffle} unshuffled pixels), got {self.patch}")
            if len(self.patch_mix) != 3 or min(self.patch_mix) < 0 or abs(sum(self.patch_mix) - 1) > 1e-6:
                raise ValueError(f"patch_mix must be 3 probabilities summing to 1, got {self.patch_mix}")
            if set(self.augment) & {"rot90", "rotate"}:
                raise ValueError("patch priors take only the flips (hflip, vflip) as augmentations")
            if min(self.sizes or (self.size,)) < 8:
                raise ValueError(f"image sizes must be >= 8, got {self.sizes or (self.size,)}")
        elif self.size < 8 or self.size & (self.size - 1):
            raise ValueError(f"size must be a power of two >= 8, got {self.size}")
        if self.steps < 1 or self.batch < 1:
            raise ValueError(f"steps and batch must be positive, got {self.steps}, {self.batch}")

    @property
    def image_sizes(self) -> tuple[int, ...]:
        """The sizes of the training images (``sizes``, or ``(size,)``)."""
        return self.sizes or (self.size,)

    @property
    def pad(self) -> int:
        return self.patch // 2 if self.patch_pad < 0 else self.patch_pad

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for key in ("augment", "sizes", "patch_mix"):
            d[key] = list(d[key])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Inverse of :meth:`to_dict` (also reads configs of invdiff <= 0.1, where the
        pixel-unshuffle factor was called ``patch``)."""
        d = dict(d)
        if "unshuffle" not in d and "patch" in d:
            d["unshuffle"] = d.pop("patch")
        return cls(**d)

    def same_run(self, other: "TrainConfig") -> list[str]:
        """Fields (other than ``steps``) in which two configs differ."""
        a, b = self.to_dict(), other.to_dict()
        return [k for k in a if k != "steps" and a[k] != b[k]]


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    prior: EDMPrior
    path: Path | None
    card: dict[str, Any]
    losses: list[float] = field(default_factory=list)


# ----------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------


def training_images(config: TrainConfig) -> Tensor | list[Tensor]:
    """The training pool ``(N, C, size, size)`` in ``[0, 1]`` for ``config.data``; for a patch
    prior a list of ``(C, H, W)`` images of the sizes of ``config.image_sizes``."""
    from .. import data as builtin

    if config.patch:
        return _patch_pool(config)
    if config.data in builtin.DATASETS:
        n = config.n_images if config.data in ("ct-phantom", "blur-kernels") else None
        x = builtin.training(config.data, n, size=config.size)
    else:
        folder = Path(config.data)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"training data {config.data!r} is neither a built-in dataset "
                f"({', '.join(builtin.DATASETS)}) nor a folder"
            )
        from ..io import read_image_folder

        items = read_image_folder(folder)
        if not items:
            raise ValueError(f"{folder}: no readable images")
        resized = []
        for ident, img in items:
            if img.shape[0] != config.channels:
                raise ValueError(f"{folder}/{ident}: {img.shape[0]} channels, expected {config.channels}")
            resized.append(torch.nn.functional.interpolate(img[None].float(), size=(config.size, config.size),
                                                           mode="bilinear", antialias=True, align_corners=False)[0])
        x = torch.stack(resized).clamp(0, 1)
    if x.shape[1] != config.channels:
        raise ValueError(f"{config.data}: images have {x.shape[1]} channels, config says {config.channels}")
    return x.contiguous()


def _patch_pool(config: TrainConfig) -> list[Tensor]:
    """Full-size training images of a patch prior."""
    from .. import data as builtin

    if config.data in builtin.DATASETS:
        sizes = config.image_sizes
        weights = [1 / s for s in sizes]
        counts = [max(1, round(config.n_images * w / sum(weights))) for w in weights]
        pool: list[Tensor] = []
        for size, n in zip(sizes, counts):
            x = builtin.training(config.data, n if config.data != "mri-brain" else None, size=size)
            if x.shape[1] != config.channels:
                raise ValueError(f"{config.data}: images have {x.shape[1]} channels, config says {config.channels}")
            pool.extend(x)
    else:
        folder = Path(config.data)
        if not folder.is_dir():
            raise FileNotFoundError(f"training data {config.data!r} is neither a built-in dataset "
                                    f"({', '.join(builtin.DATASETS)}) nor a folder")
        from ..io import read_image_folder

        pool = []
        for ident, img in read_image_folder(folder):
            if img.shape[0] != config.channels:
                raise ValueError(f"{folder}/{ident}: {img.shape[0]} channels, expected {config.channels}")
            scale = config.size / max(img.shape[-2:])
            if scale < 1:
                img = torch.nn.functional.interpolate(img[None].float(), scale_factor=scale, mode="bilinear",
                                                      antialias=True, align_corners=False)[0]
            pool.append(img.float().clamp(0, 1))
        if not pool:
            raise ValueError(f"{folder}: no readable images")
    return [img.contiguous() for img in pool]


def patch_batch(pool: list[Tensor], config: TrainConfig, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """One step's patches of a patch prior: ``(x0, positions, inside)``, ``(n, C, p, p)``,
    ``(n, 2, p, p)``, ``(n, 1, p, p)``; the patch size ``p`` and ``n`` drawn as described in the
    module doc (``inside`` is 1 on image pixels, 0 on the padding, where ``x0`` is 0)."""
    from ..priors.patch import positions

    k = int(torch.multinomial(torch.tensor(config.patch_mix), 1, generator=g))
    p = config.patch >> k
    n = config.batch * min(4, (config.patch // p) ** 2)
    pad = config.pad
    idx = torch.randint(0, len(pool), (n,), generator=g)
    crops, pos, inside = [], [], []
    for i in idx.tolist():
        img = pool[i]
        h, w = img.shape[-2:]
        top = int(torch.randint(-pad, max(h + pad - p, -pad) + 1, (1,), generator=g))
        left = int(torch.randint(-pad, max(w + pad - p, -pad) + 1, (1,), generator=g))
        rows, cols = torch.arange(top, top + p), torch.arange(left, left + p)
        ok = ((rows >= 0) & (rows < h))[:, None] & ((cols >= 0) & (cols < w))[None, :]
        patch = img.new_zeros(img.shape[0], p, p)
        r0, r1, c0, c1 = max(top, 0), min(top + p, h), max(left, 0), min(left + p, w)
        if r1 > r0 and c1 > c0:
            patch[:, r0 - top:r1 - top, c0 - left:c1 - left] = img[:, r0:r1, c0:c1]
        crops.append(patch)
        pos.append(positions(rows[None], cols[None], h, w)[0])
        inside.append(ok[None].to(img.dtype))
    return torch.stack(crops), torch.stack(pos), torch.stack(inside)


def _augment_patches(x: Tensor, pos: Tensor, inside: Tensor, config: TrainConfig,
                     g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Flips of patches: the patch of the flipped image, so the positions of the flipped axis
    are negated with it (patch priors use only the flips)."""
    b = x.shape[0]
    for name, dim, channel in (("hflip", -1, 0), ("vflip", -2, 1)):
        if name in config.augment:
            flip = (torch.rand(b, generator=g) < 0.5)[:, None, None, None]
            x, inside = torch.where(flip, x.flip(dim), x), torch.where(flip, inside.flip(dim), inside)
            flipped = pos.flip(dim)
            flipped[:, channel] = -flipped[:, channel]
            pos = torch.where(flip, flipped, pos)
    return (x, pos, inside)


def _augment(x: Tensor, config: TrainConfig, g: torch.Generator) -> Tensor:
    b = x.shape[0]
    if "hflip" in config.augment:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if "vflip" in config.augment:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-2), x)
    if "rot90" in config.augment:
        k = torch.randint(0, 4, (b,), generator=g)
        x = torch.stack([torch.rot90(xi, int(ki), dims=(-2, -1)) for xi, ki in zip(x, k)])
    if "rotate" in config.augment:
        from kornia.geometry.transform import rotate

        angle = (torch.rand(b, generator=g) * 2 - 1) * config.rotate_degrees
        x = rotate(x, angle.to(x.dtype), padding_mode="zeros").clamp(0, 1)
    return x


# ----------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------


def _atomic_torch_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, overwrite=True) as tmp:
        torch.save(obj, tmp)


def _load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same message
        raise ValueError(f"{path}: not a readable invdiff training checkpoint ({type(err).__name__}: {err})") from None
    if not isinstance(ckpt, dict) or ckpt.get("kind") != "invdiff-train-checkpoint":
        raise ValueError(f"{path}: not an invdiff training checkpoint")
    return ckpt


# ----------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------


@torch.no_grad()
def denoising_psnr(prior: EDMPrior, images: Tensor, sigma: float, seed: int = 0, batch: int = 32) -> float:
    """Mean PSNR (dB, peak 1) of ``prior.denoise(x + sigma n, sigma)`` against ``x``."""
    g = torch.Generator().manual_seed(seed)
    device = next(prior.parameters()).device
    vals = []
    for chunk in images.split(batch):
        noise = torch.randn(chunk.shape, generator=g)
        out = prior.denoise((chunk + sigma * noise).to(device), sigma).clamp(0, 1).cpu()
        mse = (out - chunk).square().flatten(1).mean(1)
        vals.append(-10 * torch.log10(mse))
    return float(torch.cat(vals).mean())


# ----------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------


def _ema_beta(config: TrainConfig, images_seen: int) -> float:
    halflife = min(config.ema_halflife, images_seen * config.ema_rampup) if config.ema_rampup else config.ema_halflife
    return 0.5 ** (config.batch / max(halflife, 1e-8))


def reproduce_command(config: TrainConfig, out: str | os.PathLike, latent: Any = None) -> str:
    """The ``invdiff train`` command that reproduces ``config``'s weights in one uninterrupted
    run (recorded in the model card): the settings that change the weights, with
    ``{steps}`` standing for the steps actually trained (filled in at the end); how a run was
    split (``--resume``, ``--time-limit``, ``--checkpoint``, ``--threads``) is left out.
    ``latent`` (a :class:`~invdiff.train.latent.LatentTrainConfig`) adds the ``--latent`` flags."""
    flags = dict(data=config.data, size=config.size, channels=config.channels, width=config.width,
                 unshuffle=config.unshuffle)
    if config.patch:
        flags.update(patch=config.patch, sizes=",".join(map(str, config.image_sizes)), patch_pad=config.pad,
                     patch_mix=",".join(f"{q:g}" for q in config.patch_mix))
    flags.update(steps="{steps}", batch=config.batch, lr=config.lr,
                 ema_halflife=config.ema_halflife, augment=",".join(config.augment), n_images=config.n_images,
                 seed=config.seed, out=out)
    head = "invdiff train "
    if latent is not None:
        head += "--latent " + " ".join(f"--{k} {v}" for k, v in (("ae-steps", latent.steps),
                                                                  ("latent-channels", latent.latent_channels),
                                                                  ("ae-width", latent.width))) + " "
    return head + " ".join(f"--{k.replace('_', '-')} {v if k == 'steps' else shlex.quote(str(v))}"
                           for k, v in flags.items())


def train(
    config: TrainConfig,
    out: str | os.PathLike | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    resume: bool = False,
    device: str | torch.device = "cpu",
    time_limit: float | None = None,
    name: str | None = None,
    command: str | None = None,
    progress: bool = True,
    images: Tensor | None = None,
) -> TrainResult:
    """Train an EDM prior; write it to ``out`` (``.safetensors`` + ``.md`` model card).

    :param config: the run (see :class:`TrainConfig`).
    :param out: where to write the trained prior (the EMA weights); ``None`` to only return it.
    :param checkpoint: training checkpoint file (default ``<out>.ckpt``), written every
        ``checkpoint_every`` steps and at the end (``torch.save`` of tensors only, read
        back with ``weights_only=True``).
    :param resume: continue from ``checkpoint``; its config must match ``config`` except
        ``steps`` (an error lists the differing fields).
    :param device: ``"cpu"`` or ``"cuda"``.
    :param time_limit: stop (cleanly, with a checkpoint and an output file) after this
        many minutes; the card records the steps actually done.
    :param name: prior name for the card (default: the file stem).
    :param command: the command line recorded in the card (default: :func:`reproduce_command`); ``{steps}``
        in it is replaced by the number of steps trained.
    :param images: training images to use instead of :func:`training_images` (tests).
    :raises ValueError: mismatched or unreadable checkpoint, bad data.
    """
    out_path = Path(out) if out is not None else None
    if out_path is not None and out_path.suffix != ".safetensors":
        raise ValueError(f"the trained prior is written as .safetensors; got {out_path.name}")
    ckpt_path = Path(checkpoint) if checkpoint is not None else (
        out_path.with_suffix(".ckpt") if out_path is not None else None)
    device = torch.device(device)
    cuda = device.type == "cuda"

    x_all = training_images(config) if images is None else images
    if config.patch:
        if isinstance(x_all, Tensor):
            x_all = list(x_all)
        flat = torch.cat([img.flatten() for img in x_all])
        sigma_data, data_mean = float(flat.std()), float(flat.mean())
        del flat
    else:
        sigma_data, data_mean = float(x_all.std()), float(x_all.mean())
    with torch.random.fork_rng(devices=[]):  # initial weights from the run's seed, global RNG untouched
        torch.manual_seed(config.seed)
        if config.patch:
            net = GuidedDiffusionUNet(patch_unet_config(config.patch, config.channels, config.width, config.unshuffle))
        else:
            net = GuidedDiffusionUNet(small_unet_config(config.size, config.channels, config.width, config.unshuffle))
    if config.patch:
        den = PositionalEDMDenoiser(net, config.channels, sigma_data, data_mean, config.unshuffle)
        prior = PatchDiffusionPrior(den, config.channels, config.patch, sigma_min=0.002, sigma_max=40.0,
                                    sigma_data=sigma_data, trained_sizes=sorted({int(max(i.shape[-2:])) for i in x_all}))
    else:
        prior = EDMPrior(net, (config.channels, config.size, config.size), sigma_data=sigma_data, data_mean=data_mean,
                         sigma_min=0.002, sigma_max=40.0, patch=config.unshuffle)
    prior = prior.to(device)
    ema = copy.deepcopy(prior)
    g = torch.Generator().manual_seed(config.seed)
    ema.requires_grad_(False)
    if cuda:
        prior.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(prior.parameters(), lr=config.lr, betas=(0.9, 0.999), eps=1e-8)
    step, elapsed, losses, loss_avg = 0, 0.0, [], None

    if resume:
        if ckpt_path is None or not ckpt_path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = _load_checkpoint(ckpt_path)
        saved = TrainConfig.from_dict(json.loads(ckpt["config"]))
        diff = saved.same_run(config)
        if diff:
            raise ValueError(f"{ckpt_path}: checkpoint was trained with different {', '.join(diff)}; "
                             f"resume with the same settings (only --steps may change)")
        prior.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["optimizer"])
        g.set_state(ckpt["generator"])
        step, elapsed = int(ckpt["step"]), float(ckpt["elapsed"])
        losses = [float(v) for v in ckpt["losses"].tolist()]
        loss_avg = losses[-1] if losses else None

    def write_checkpoint() -> None:
        if ckpt_path is None:
            return
        _atomic_torch_save({
            "kind": "invdiff-train-checkpoint", "config": json.dumps(config.to_dict()), "step": step,
            "elapsed": elapsed, "model": prior.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "generator": g.get_state(), "losses": torch.tensor(losses, dtype=torch.float64),
        }, ckpt_path)

    from tqdm.auto import tqdm

    bar = tqdm(total=config.steps, initial=step, disable=not progress, desc=f"train {config.data}", unit="step",
               dynamic_ncols=True)
    start, start_step = time.perf_counter(), step
    sd2 = sigma_data**2
    prior.train()
    while step < config.steps:
        if config.patch:
            x0, pos, inside = _augment_patches(*patch_batch(x_all, config, g), config, g)
        else:
            idx = torch.randint(0, x_all.shape[0], (config.batch,), generator=g)
            x0 = _augment(x_all[idx], config, g)
        sigma = (torch.randn(x0.shape[0], 1, 1, 1, generator=g) * config.p_std + config.p_mean).exp()
        noise = torch.randn(x0.shape, generator=g) * sigma
        x0, sigma, noise = x0.to(device), sigma.to(device), noise.to(device)
        if cuda:
            x0, noise = x0.contiguous(memory_format=torch.channels_last), noise.contiguous(memory_format=torch.channels_last)
        for group in opt.param_groups:
            group["lr"] = config.lr * min(1.0, (step + 1) / max(config.warmup, 1))
        weight = (sigma**2 + sd2) / (sigma * sigma_data) ** 2
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=cuda):
            if config.patch:  # clean padding: x = data mean there, the network input 0
                pos, inside = pos.to(device), inside.to(device)
                xn = torch.where(inside > 0, x0 + noise, torch.full_like(x0, data_mean))
                denoised = prior.denoiser(xn, sigma, pos)
            else:
                denoised = prior._denoise(x0 + noise, sigma)
        if config.patch:
            loss = (weight * inside * (denoised.float() - x0).square()).sum() / inside.sum().clamp_min(1) / config.channels
        else:
            loss = (weight * (denoised.float() - x0).square()).mean()
        if not torch.isfinite(loss):
            write_checkpoint()
            raise RuntimeError(f"training diverged at step {step} (loss {loss.item()}); "
                               f"last good state kept in {ckpt_path}; lower --lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(prior.parameters(), config.grad_clip)
        opt.step()
        step += 1
        beta = _ema_beta(config, step * config.batch)
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), prior.parameters()):
                pe.lerp_(pm.detach(), 1 - beta)
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        losses.append(loss_avg)
        now = time.perf_counter()
        rate = (step - start_step) / max(now - start, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_avg:.4f}", steps_per_s=f"{rate:.2f}", refresh=False)
        if step % checkpoint_every == 0:
            write_checkpoint()
        if time_limit is not None and elapsed + (now - start) > time_limit * 60:
            break
    bar.close()
    elapsed += time.perf_counter() - start
    rate = (step - start_step) / max(time.perf_counter() - start, 1e-9)
    write_checkpoint()
    ema.eval()

    card = _model_card(config, ema, step, loss_avg, rate, elapsed, device, name or (out_path.stem if out_path else None),
                       command, len(x_all))
    if out_path is not None:
        save(ema, out_path, card=card)
        write_card_markdown(card, out_path.with_suffix(".md"))
    return TrainResult(prior=ema, path=out_path, card=card, losses=losses)


def _model_card(config: TrainConfig, prior: EDMPrior | PatchDiffusionPrior, step: int, loss: float | None,
                rate: float, elapsed: float, device: torch.device, name: str | None, command: str | None, n_images: int) -> dict[str, Any]:
    from .. import __version__

    network = prior.denoiser.model if config.patch else prior.model
    sizes = "/".join(f"{s}x{s}" for s in prior.trained_sizes) if config.patch else ""
    card: dict[str, Any] = {
        "name": name,
        "description": (f"EDM patch denoiser (PaDIS) on {config.patch}x{config.patch} patches of {config.data} "
                        f"images at {sizes}, used at any size" if config.patch else
                        f"EDM denoiser on {config.data} at {config.size}x{config.size}"),
        "data": config.data,
        "data_description": DESCRIPTIONS.get(config.data, f"images from the folder {config.data}"),
        "training_images": int(n_images),
        "image_size": config.size,
        "channels": config.channels,
        "parameters": int(sum(p.numel() for p in prior.parameters())),
        "network": "GuidedDiffusionUNet " + json.dumps(network.config.to_dict()),
        "steps": int(step),
        "final_loss": None if loss is None else round(float(loss), 5),
        "steps_per_second": round(rate, 3),
        "train_seconds": round(elapsed, 1),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "sigma_data": prior.sigma_data,
        "data_mean": prior.denoiser.data_mean if config.patch else prior.data_mean,
        "config": config.to_dict(),
        "invdiff_version": __version__,
        "torch_version": torch.__version__,
        "command": (command if command is not None else reproduce_command(config, f"{name or 'prior'}.safetensors")
                    ).replace("{steps}", str(step)),
    }
    if config.patch:
        card.update(patch_size=config.patch, patch_pad=config.pad, patch_mix=list(config.patch_mix),
                    trained_sizes=list(prior.trained_sizes), padding="clean (data mean), positional channels")
    if config.data == "ct-phantom":
        card["value_range"] = "HU window [-1000, 1000] mapped to [0, 1]"
    elif config.data == "blur-kernels":
        card["value_range"] = "kernel / its maximum (invdiff.operators.kernels.to_kernel maps back to sum 1)"
    elif config.data in ("mri-brain", "mri-brain-synth", "mri-brain-coronal-synth"):
        card["value_range"] = "template intensity / its 99.5th percentile, clipped to [0, 1]"
    if config.data in ("ct-phantom", "mri-brain", "mri-brain-synth", "mri-brain-coronal-synth", "blur-kernels"):
        from ..data import heldout

        held = heldout(config.data, size=config.size)
        card["heldout_denoising_psnr"] = {f"sigma={s}": round(denoising_psnr(prior, held.to(torch.float32), s), 2)
                                          for s in (0.1, 0.5)}
    return card


def write_card_markdown(card: dict[str, Any], path: Path) -> None:
    lines = [f"# {card.get('name') or 'invdiff prior'}", "", card["description"], "",
             "| field | value |", "|---|---|"]
    for key in ("data_description", "training_images", "image_size", "patch_size", "patch_pad", "patch_mix",
                "trained_sizes", "padding", "channels", "parameters", "steps", "final_loss",
                "steps_per_second", "train_seconds", "device", "cpu_threads", "latent_shape",
                "heldout_reconstruction_psnr", "heldout_denoising_psnr",
                "value_range", "invdiff_version", "torch_version"):
        if key in card:
            lines.append(f"| {key} | {card[key]} |")
    lines += ["", "Reproduce with:", "", "```", card["command"], "```", ""]
    atomic_write(path, "\n".join(lines), fsync=False)
