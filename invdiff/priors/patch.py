"""Patch diffusion priors: a denoiser trained on ``P x P`` patches, used on images of any size.

After PaDIS (Hu, Song, Fessler et al., "Learning Image Priors through Patch-based Diffusion
Models for Solving Inverse Problems", NeurIPS 2024; code jasonhu4/PaDIS), itself built on
Patch Diffusion (Wang et al., "Patch Diffusion: Faster and More Data-Efficient Training of
Diffusion Models", NeurIPS 2023). The network sees a noisy patch and two *positional
channels*, the coordinates of its pixels in the whole image, so one small network learns
where in the image (centre of the body, edge of the field of view) a patch sits:

.. math::

    D_\\theta(x_p, \\sigma, u_p) \\approx \\mathbb{E}[x_{0,p} \\mid x_p], \\qquad
    u_p = \\Big(\\tfrac{2 (j + 1/2)}{W} - 1,\\; \\tfrac{2 (i + 1/2)}{H} - 1\\Big),

(``u`` spans ``[-1, 1]`` over the image in each axis, so a patch means the same place at
128² and at 512²). The whole-image denoiser is assembled from patch denoisers in one of two
ways (``mode``):

* ``"random"`` (PaDIS, Algorithm 1): the ``H x W`` image is zero-padded into a canvas of
  ``(ceil(H/P)+1) x (ceil(W/P)+1)`` patches at a random offset ``(o_i, o_j)`` and cut into
  non-overlapping patches; every patch is denoised in one batched network call and the
  canvas is stitched and cropped. Each call moves the patch grid, so the seams move and
  average out along the diffusion; the offsets come from the ``generator`` of
  :meth:`~invdiff.priors.DiffusionPrior.denoise` (the sampler's: same seed, same result;
  the global RNG is untouched). The denoiser is random: samplers that need a deterministic
  one (a fixed-point or an ODE step evaluated twice) should use ``"tiles"``.
* ``"tiles"`` (deterministic): overlapping tiles at stride ``P - overlap`` (the last tile
  aligned with the image's end, as in sliding-window inference), blended with a separable
  window :math:`w(t) = \\sin^2(\\pi (t + 1/2) / P)` normalised by :math:`\\sum w`. When one
  patch covers the whole image it is exactly the network on the image.

The padding (outside the image) holds the data mean: the network input is zero there and the
positional channels tell the network it is outside (PaDIS noises the padding; we keep it
clean, which makes both modes match the training crops exactly). Patches are denoised in
chunks of ``max_patches`` per network call, to bound memory at large sizes. unfold / fold
(torch) do the cutting and stitching.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .adm import ADMConfig, GuidedDiffusionUNet
from .base import DiffusionPrior

__all__ = ["PatchDiffusionPrior", "PositionalEDMDenoiser", "WholeImageDenoiser", "positions", "patch_unet_config",
           "MODES"]

#: Assembly modes of :class:`PatchDiffusionPrior`.
MODES = ("random", "tiles")


def positions(rows: Tensor, cols: Tensor, height: int, width: int) -> Tensor:
    """Positional channels ``(B, 2, h, w)`` (x = column, y = row, PaDIS's order) of pixels at
    image rows ``rows (B, h)`` and columns ``cols (B, w)`` of an ``height x width`` image:
    ``2 (k + 1/2) / n - 1``, so the image spans ``[-1, 1]`` and padding lies outside."""
    u = (2 * (cols.to(torch.float32) + 0.5) / width - 1)[:, None, :].expand(-1, rows.shape[1], -1)
    v = (2 * (rows.to(torch.float32) + 0.5) / height - 1)[:, :, None].expand(-1, -1, cols.shape[1])
    return torch.stack([u, v], 1)


def patch_unet_config(patch: int = 64, channels: int = 1, width: int = 32, unshuffle: int = 2,
                      **overrides: Any) -> ADMConfig:
    """The compact U-Net of the shipped patch priors: :func:`~invdiff.priors.small_unet_config`
    at ``patch x patch`` with two more input channels (the positions) and ``channels`` outputs."""
    from .edm import small_unet_config

    base = small_unet_config(patch, channels + 2, width, unshuffle, **overrides)
    return ADMConfig(**{**base.to_dict(), "out_channels": channels * unshuffle * unshuffle})


class PositionalEDMDenoiser(nn.Module):
    """EDM's preconditioning (see :class:`~invdiff.priors.EDMPrior`) around a network that also
    takes the positional channels: ``D = c_skip x + c_out F([c_in (x - mu), u], c_noise)``.

    :param model: network on ``C + 2`` channels (pixel-unshuffled by ``unshuffle``) with ``C``
        outputs per unshuffled pixel.
    :param channels: image channels ``C``.
    :param sigma_data, data_mean: EDM's ``sigma_d`` and the data mean ``mu``.
    :param unshuffle: pixel-unshuffle factor of the network input (1: none).
    """

    def __init__(self, model: nn.Module, channels: int, sigma_data: float, data_mean: float, unshuffle: int = 1):
        super().__init__()
        self.model = model
        self.channels = int(channels)
        self.sigma_data = float(sigma_data)
        self.data_mean = float(data_mean)
        self.unshuffle = int(unshuffle)

    @property
    def pad_value(self) -> float:
        """Value of ``x`` outside the image (the network input there is 0)."""
        return self.data_mean

    def forward(self, x: Tensor, sigma: Tensor, pos: Tensor) -> Tensor:
        from .edm import edm_denoise

        return edm_denoise(self.model, x, sigma, self.sigma_data, self.data_mean, self.unshuffle, extra=pos)

class WholeImageDenoiser(nn.Module):
    """A whole-image prior as a patch denoiser (positions ignored): its patches are images of its
    own size. Used to test the assembly, and to tile a fully convolutional prior."""

    def __init__(self, prior: DiffusionPrior, pad_value: float = 0.0):
        super().__init__()
        self.prior = prior
        self.pad_value = float(pad_value)

    def forward(self, x: Tensor, sigma: Tensor, pos: Tensor) -> Tensor:
        return self.prior.denoise(x, sigma)


class PatchDiffusionPrior(DiffusionPrior):
    """A prior at any image size from a denoiser of ``P x P`` patches (see the module doc).

    :param denoiser: ``denoiser(x_patches, sigma, positions) -> D`` on ``(N, C, P, P)``
        patches with ``sigma (N, 1, 1, 1)`` and positions ``(N, 2, P, P)``, with a
        ``pad_value`` attribute (a :class:`PositionalEDMDenoiser`, or a
        :class:`WholeImageDenoiser`).
    :param channels: image channels.
    :param patch_size: ``P``.
    :param mode: ``"random"`` (PaDIS's random-offset non-overlapping patches) or
        ``"tiles"`` (overlapping blended tiles, deterministic).
    :param overlap: tile overlap in pixels for ``"tiles"`` (default ``P // 2``).
    :param max_patches: patches per network call (the memory budget).
    :param sigma_min, sigma_max, sigma_data: as for every prior.
    :param trained_sizes: image sizes the patches were cut from in training (model card).

    Example::

        >>> import torch
        >>> from invdiff.priors import GaussianPrior, PatchDiffusionPrior, WholeImageDenoiser
        >>> whole = GaussianPrior(0.5, 0.2, image_shape=(1, 8, 8))
        >>> prior = PatchDiffusionPrior(WholeImageDenoiser(whole, 0.5), 1, 8, mode="tiles")
        >>> prior.denoise(torch.rand(1, 1, 21, 13), 0.3).shape    # any size
        torch.Size([1, 1, 21, 13])
    """

    def __init__(
        self,
        denoiser: nn.Module,
        channels: int,
        patch_size: int,
        mode: str = "random",
        overlap: int | None = None,
        max_patches: int = 128,
        sigma_min: float = 0.002,
        sigma_max: float = 40.0,
        sigma_data: float = 0.25,
        trained_sizes: Sequence[int] = (),
    ) -> None:
        super().__init__((channels, patch_size, patch_size), sigma_min, sigma_max, sigma_data, any_size=True)
        if mode not in MODES:
            raise ValueError(f"PatchDiffusionPrior: mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.denoiser = denoiser
        self.patch_size = int(patch_size)
        self.mode = mode
        self.overlap = self.patch_size // 2 if overlap is None else int(overlap)
        if not 0 <= self.overlap < self.patch_size:
            raise ValueError(f"PatchDiffusionPrior: overlap must be in [0, {self.patch_size}), got {self.overlap}")
        if max_patches < 1:
            raise ValueError(f"PatchDiffusionPrior: max_patches must be >= 1, got {max_patches}")
        self.max_patches = int(max_patches)
        self.trained_sizes = tuple(int(s) for s in trained_sizes)
        self._own_generator = torch.Generator().manual_seed(0)

    @property
    def uses_generator(self) -> bool:  # type: ignore[override]
        return self.mode == "random"

    def with_mode(self, mode: str, overlap: int | None = None) -> "PatchDiffusionPrior":
        """The same network assembled another way (shares the weights)."""
        other = PatchDiffusionPrior(self.denoiser, self.channels, self.patch_size, mode, overlap, self.max_patches,
                                    self.sigma_min, self.sigma_max, self.sigma_data, self.trained_sizes)
        return other.train(self.training)

    # --- assembly -------------------------------------------------------------------
    def _offsets(self, batch: int, span: int, generator) -> Tensor:
        """Random offsets in ``[0, span]``, one per image, from the caller's generator(s)."""
        if generator is None:
            generator = self._own_generator
        if isinstance(generator, (list, tuple)):
            return torch.cat([torch.randint(0, span + 1, (1,), generator=generator[b % len(generator)],
                                            device=generator[b % len(generator)].device).cpu() for b in range(batch)])
        return torch.randint(0, span + 1, (batch,), generator=generator, device=generator.device).cpu()

    def _grid(self, n: int) -> tuple[list[int], int]:
        """Tile starts (image coordinates) covering ``[0, n)`` at stride ``P - overlap``, and
        the canvas length; an image shorter than ``P`` is padded after its end."""
        p = self.patch_size
        if n <= p:
            return [0], p
        stride = p - self.overlap
        count = math.ceil((n - p) / stride) + 1
        starts = [min(k * stride, n - p) for k in range(count)]
        return starts, n

    def _window(self, n: int, device, dtype) -> Tensor:
        t = torch.arange(n, device=device, dtype=dtype)
        return torch.sin(math.pi * (t + 0.5) / n) ** 2

    def _denoise_patches(self, patches: Tensor, sigma: Tensor, pos: Tensor) -> Tensor:
        out = []
        for xs, ss, ps in zip(patches.split(self.max_patches), sigma.split(self.max_patches),
                              pos.split(self.max_patches)):
            out.append(self.denoiser(xs, ss, ps))
        return torch.cat(out)

    def _denoise(self, x: Tensor, sigma: Tensor, generator=None) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        pad = float(getattr(self.denoiser, "pad_value", 0.0))
        if self.mode == "tiles":
            ys, ch = self._grid(h)
            xs, cw = self._grid(w)
            canvas = x.new_full((b, c, ch, cw), pad)
            canvas[:, :, :h, :w] = x
            pos = positions(torch.arange(ch)[None], torch.arange(cw)[None], h, w).to(x).expand(b, -1, -1, -1)
            return self._tiles(canvas, pos, sigma, ys, xs)[:, :, :h, :w]
        # PaDIS: the image at a random offset in a canvas of whole patches, cut without overlap
        ch, cw = (math.ceil(h / p) + 1) * p, (math.ceil(w / p) + 1) * p
        oy, ox = self._offsets(b, ch - h, generator), self._offsets(b, cw - w, generator)
        canvas = x.new_full((b, c, ch, cw), pad)
        for k in range(b):
            canvas[k, :, oy[k]:oy[k] + h, ox[k]:ox[k] + w] = x[k]
        pos = positions(torch.arange(ch)[None] - oy[:, None], torch.arange(cw)[None] - ox[:, None], h, w).to(x)
        patches, pos_p = self._cut(canvas, p), self._cut(pos, p)
        den = self._denoise_patches(patches, sigma.repeat_interleave(patches.shape[0] // b, 0), pos_p)
        out = self._stitch(den, b, (ch, cw), p)
        return torch.stack([out[k, :, oy[k]:oy[k] + h, ox[k]:ox[k] + w] for k in range(b)])

    @staticmethod
    def _cut(canvas: Tensor, p: int) -> Tensor:
        """``(B, C, Hc, Wc)`` -> non-overlapping patches ``(B * L, C, p, p)``, row-major per image."""
        b, c = canvas.shape[:2]
        cols = nn.functional.unfold(canvas, p, stride=p)  # (B, C p p, L)
        return cols.transpose(1, 2).reshape(b * cols.shape[-1], c, p, p)

    @staticmethod
    def _stitch(patches: Tensor, b: int, size, p: int) -> Tensor:
        """Inverse of :meth:`_cut`."""
        n, c = patches.shape[0] // b, patches.shape[1]
        return nn.functional.fold(patches.reshape(b, n, c * p * p).transpose(1, 2), size, p, stride=p)

    def _tiles(self, canvas: Tensor, pos: Tensor, sigma: Tensor, ys: list[int], xs: list[int]) -> Tensor:
        """Overlapping tiles at the starts ``ys x xs``, blended by the window (deterministic)."""
        b, c, ch, cw = canvas.shape
        p = self.patch_size
        tiles = torch.stack([canvas[:, :, y:y + p, x:x + p] for y in ys for x in xs], 1).flatten(0, 1)
        pos_t = torch.stack([pos[:, :, y:y + p, x:x + p] for y in ys for x in xs], 1).flatten(0, 1)
        den = self._denoise_patches(tiles, sigma.repeat_interleave(len(ys) * len(xs), 0), pos_t)
        den = den.reshape(b, len(ys) * len(xs), c, p, p)
        win = self._window(p, canvas.device, canvas.dtype)
        weight = win[:, None] * win[None, :]
        out = canvas.new_zeros(b, c, ch, cw)
        total = canvas.new_zeros(1, 1, ch, cw)
        k = 0
        for y in ys:
            for x in xs:
                out[:, :, y:y + p, x:x + p] += weight * den[:, k]
                total[:, :, y:y + p, x:x + p] += weight
                k += 1
        return out / total

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, mode={self.mode!r}, " + super().extra_repr()


def _patch_build(config: Any, options: dict) -> PatchDiffusionPrior:
    cfg = config if isinstance(config, ADMConfig) else ADMConfig.from_dict(config)
    o = dict(options)
    o.pop("image_shape", None)
    channels, unshuffle = int(o.pop("channels")), int(o.pop("unshuffle", 1))
    den = PositionalEDMDenoiser(GuidedDiffusionUNet(cfg), channels, o.pop("sigma_data"), o.pop("data_mean"), unshuffle)
    return PatchDiffusionPrior(den, channels, sigma_data=den.sigma_data, **o)


def _patch_describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    assert isinstance(prior, PatchDiffusionPrior)
    den = prior.denoiser
    if not isinstance(den, PositionalEDMDenoiser) or not isinstance(den.model, GuidedDiffusionUNet):
        raise ValueError("can only save a PatchDiffusionPrior around a PositionalEDMDenoiser with a GuidedDiffusionUNet")
    options = dict(channels=prior.channels, patch_size=prior.patch_size, mode=prior.mode, overlap=prior.overlap,
                   max_patches=prior.max_patches, sigma_min=prior.sigma_min, sigma_max=prior.sigma_max,
                   sigma_data=den.sigma_data, data_mean=den.data_mean, unshuffle=den.unshuffle,
                   trained_sizes=list(prior.trained_sizes))
    return den.model.config.to_dict(), options


def _register() -> None:
    from .loading import PriorFamily, register_family

    register_family(PriorFamily(name="edm-patch", prior_type=PatchDiffusionPrior, build=_patch_build,
                                describe=_patch_describe, network=lambda prior: prior.denoiser.model,
                                source="invdiff (invdiff/priors/patch.py: PaDIS patch prior)",
                                formats="invdiff .safetensors (invdiff train --patch)"))


_register()
