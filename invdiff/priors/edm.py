"""EDM-preconditioned denoiser prior (Karras et al. 2022), the format of invdiff's own priors.

The network ``F`` (a :class:`~invdiff.priors.adm.GuidedDiffusionUNet` with a single output
channel per image channel) is wrapped with EDM's preconditioning on ``[0, 1]`` images:

.. math::

    D(x, \\sigma) = c_\\text{skip}(\\sigma)\\, x + c_\\text{out}(\\sigma)\\,
        F\\big(c_\\text{in}(\\sigma)\\, (x - \\mu),\\; c_\\text{noise}(\\sigma)\\big),

    c_\\text{skip} = \\frac{\\sigma_d^2}{\\sigma^2 + \\sigma_d^2}, \\quad
    c_\\text{out} = \\frac{\\sigma \\sigma_d}{\\sqrt{\\sigma^2 + \\sigma_d^2}}, \\quad
    c_\\text{in} = \\frac{1}{\\sqrt{\\sigma^2 + \\sigma_d^2}}, \\quad
    c_\\text{noise} = 250 \\ln \\sigma,

with ``mu`` the data mean (added back through ``c_skip``: the network sees centred
inputs), so that the network's input and target have unit variance at every noise level.
``c_noise`` is EDM's ``ln(sigma) / 4`` times 1000, the range of DDPM timesteps that the
ADM sinusoidal embedding was designed for. With ``patch = p > 1`` the network sees the
image pixel-unshuffled into ``p x p`` patches (``C p^2`` channels at ``H/p x W/p``) and its
output is shuffled back, as in the patched U-Nets of "simple diffusion" (Hoogeboom et al.
2023): the same receptive field for a quarter of the high-resolution compute.

Karras, Aittala, Aila, Laine, "Elucidating the design space of diffusion-based generative
models", NeurIPS 2022.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .adm import ADMConfig, GuidedDiffusionUNet
from .base import DiffusionPrior
from .loading import PriorFamily, register_family

__all__ = ["EDMPrior", "small_unet_config", "edm_preconditioning", "edm_denoise"]


def small_unet_config(size: int = 64, channels: int = 1, width: int = 32, patch: int = 2,
                      **overrides: Any) -> ADMConfig:
    """The compact U-Net of the shipped priors, run on ``patch x patch`` pixel-unshuffled
    images (see :class:`EDMPrior`): at 64x64 with ``patch=2`` it works on 32x32x4 inputs
    with widths ``width x (1, 2, 2)``, one residual block per level, self-attention at
    16x16 and 8x8 (heads of 32 channels), scale-shift conditioning; 1.24 M parameters at
    ``width=32``. Patching makes a training step 3x cheaper on the CPU than a full
    64x64 U-Net of the same width."""
    if size % patch:
        raise ValueError(f"size {size} is not divisible by patch {patch}")
    size, channels = size // patch, channels * patch * patch
    levels = max(1, min(3, size.bit_length() - 3))  # 32 -> 3 levels, 16 -> 2, 8 -> 1
    mult = ",".join(["1", "2", "2"][:levels])
    att = ",".join(str(r) for r in (16, 8) if r <= size // 2)
    cfg = dict(image_size=size, in_channels=channels, model_channels=width, channel_mult=mult,
               num_res_blocks=1, attention_resolutions=att or "", num_head_channels=32,
               use_scale_shift_norm=True, learn_sigma=False)
    cfg.update(overrides)
    return ADMConfig(**cfg)


def edm_preconditioning(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM's ``(c_skip, c_out, c_in, c_noise)`` (see the module doc) for ``sigma`` of shape (B,1,1,1)."""
    sd2 = sigma_data**2
    c_skip = sd2 / (sigma**2 + sd2)
    c_out = sigma * sigma_data / (sigma**2 + sd2).sqrt()
    c_in = 1 / (sigma**2 + sd2).sqrt()
    c_noise = 250.0 * sigma.log().flatten()
    return c_skip, c_out, c_in, c_noise


def edm_denoise(model: nn.Module, x: Tensor, sigma: Tensor, sigma_data: float, data_mean: float, unshuffle: int = 1,
                extra: Tensor | None = None) -> Tensor:
    """``D(x, sigma)`` of the module doc: the network ``model`` on ``c_in (x - mu)`` (with ``extra``
    channels concatenated, e.g. a patch prior's positions), pixel-unshuffled by ``unshuffle``."""
    c_skip, c_out, c_in, c_noise = edm_preconditioning(sigma.to(x.dtype), sigma_data)
    xc = x - data_mean
    inp = c_in * xc if extra is None else torch.cat([c_in * xc, extra.to(x.dtype)], 1)
    if unshuffle > 1:
        out = nn.functional.pixel_shuffle(model(nn.functional.pixel_unshuffle(inp, unshuffle), c_noise), unshuffle)
    else:
        out = model(inp, c_noise)
    return data_mean + c_skip * xc + c_out * out.to(x.dtype)


class EDMPrior(DiffusionPrior):
    """A denoiser network trained with EDM's preconditioning and loss (see module doc).

    :param model: network ``F(x, c_noise)`` with as many output as input channels.
    :param image_shape: ``(C, H, W)``.
    :param sigma_data: standard deviation of the training images (EDM's ``sigma_d``).
    :param data_mean: mean of the training images (subtracted before the network).
    :param sigma_min: smallest trained noise level.
    :param sigma_max: largest noise level (sampling starts here).
    :param patch: pixel-unshuffle factor of the network's input (1: none).

    Example::

        >>> import torch
        >>> prior = EDMPrior(GuidedDiffusionUNet(small_unet_config(16)), (1, 16, 16), 0.3, 0.4, patch=2)
        >>> prior.denoise(torch.rand(2, 1, 16, 16), 0.5).shape
        torch.Size([2, 1, 16, 16])
    """

    fully_convolutional = True

    def __init__(
        self,
        model: nn.Module,
        image_shape: Sequence[int],
        sigma_data: float = 0.25,
        data_mean: float = 0.0,
        sigma_min: float = 0.002,
        sigma_max: float = 40.0,
        patch: int = 1,
    ) -> None:
        super().__init__(image_shape, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data)
        self.model = model
        self.data_mean = float(data_mean)
        self.patch = int(patch)

    def preconditioning(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for noise levels ``sigma`` of shape (B,1,1,1)."""
        return edm_preconditioning(sigma, self.sigma_data)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        return edm_denoise(self.model, x, sigma, self.sigma_data, self.data_mean, self.patch)

def _edm_build(config: Any, options: dict) -> EDMPrior:
    cfg = config if isinstance(config, ADMConfig) else ADMConfig.from_dict(config)
    options = dict(options)
    patch = int(options.get("patch", 1))
    shape = options.pop("image_shape", None) or (cfg.in_channels // patch**2, cfg.image_size * patch,
                                                  cfg.image_size * patch)
    return EDMPrior(GuidedDiffusionUNet(cfg), shape, **options)


def _edm_describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    assert isinstance(prior, EDMPrior)
    if not isinstance(prior.model, GuidedDiffusionUNet):
        raise ValueError(f"can only save an EDMPrior around a GuidedDiffusionUNet, not {type(prior.model).__name__}")
    options = dict(image_shape=list(prior.image_shape), sigma_data=prior.sigma_data, data_mean=prior.data_mean,
                   sigma_min=prior.sigma_min, sigma_max=prior.sigma_max, patch=prior.patch)
    return prior.model.config.to_dict(), options


register_family(
    PriorFamily(
        name="edm",
        prior_type=EDMPrior,
        build=_edm_build,
        describe=_edm_describe,
        network=lambda prior: prior.model,
        source="invdiff (invdiff/priors/edm.py EDMPrior: EDM preconditioning around a GuidedDiffusionUNet)",
        formats="invdiff .safetensors (priors.save, invdiff train)",
    )
)
