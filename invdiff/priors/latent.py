r"""Latent diffusion priors: an autoencoder and a diffusion prior over its latents.

A :class:`LatentDiffusionPrior` holds an autoencoder (``encode(x) -> z``, ``decode(z) -> x``,
both :class:`torch.nn.Module` methods) and a :class:`~invdiff.priors.DiffusionPrior` over the
latents ``z`` (the *latent prior*, in the same variance-exploding convention,
``z = z0 + sigma n``, on whatever scale the encoder produces). The image prior it defines is
the push-forward :math:`x = \mathrm{Dec}(z_0)`, :math:`z_0 \sim p(z_0)` (Rombach et al.,
"High-resolution image synthesis with latent diffusion models", CVPR 2022).

Latent samplers (:class:`~invdiff.samplers.ReSample`) work with :attr:`~LatentDiffusionPrior.latent`,
:meth:`~LatentDiffusionPrior.encode` and :meth:`~LatentDiffusionPrior.decode`. The pixel-space
contract ``denoise(x, sigma) = E[x0 | x0 + sigma n = x]`` has no tractable form for a
nonlinear decoder (the image prior lives on the decoder's manifold), so
:meth:`~LatentDiffusionPrior.denoise` on images raises :class:`NotImplementedError`: pixel-space
samplers need a pixel prior. Everything else of the contract holds: ``image_shape`` (the
decoder's output), ``sigma_min`` / ``sigma_max`` / ``sigma_data`` (the latent prior's), use as
a module (``.to``, ``state_dict``), :func:`~invdiff.priors.save` / :func:`~invdiff.priors.load`
(family ``"latent"``, when the latent prior's own family is registered, e.g. ``"edm"``).

**The analytic case.** A linear decoder :math:`x = W z + b` (:class:`LinearAutoencoder`) with a
Gaussian (mixture) latent prior :math:`\mathcal N(\mu, \Sigma)` is a Gaussian (mixture) image
prior :math:`\mathcal N(W\mu + b, W \Sigma W^\top)` of rank ``dim z``, and a linear measurement
:math:`y = A x + e` is a linear measurement of the latent,
:math:`y - Ab = (AW) z + e`. :meth:`LatentDiffusionPrior.posterior` computes the exact latent
posterior with the latent prior's :meth:`~invdiff.priors.GaussianMixturePrior.posterior` on the
composed operator :math:`AW` and pushes it through the decoder (:class:`LatentGaussianPosterior`):
the yardstick of latent samplers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .analytic import GaussianMixturePosterior, GaussianMixturePrior, stationary_covariance
from .base import DiffusionPrior
from .loading import PriorFamily, families, family_of, get_family, register_family

__all__ = [
    "LatentDiffusionPrior",
    "LatentGaussianPosterior",
    "LinearAutoencoder",
    "IdentityAutoencoder",
    "ConvAutoencoder",
    "AUTOENCODERS",
]


# ----------------------------------------------------------------------------------
# autoencoders
# ----------------------------------------------------------------------------------


class LinearAutoencoder(nn.Module):
    r"""Linear decoder :math:`\mathrm{Dec}(z) = W z + b` with the least-squares encoder
    :math:`\mathrm{Enc}(x) = W^{+}(x - b)` (exact on the decoder's range).

    :param weight: ``(d_x, d_z)`` matrix :math:`W`, ``d_x = prod(image_shape)``, ``d_z = prod(latent_shape)``.
    :param bias: image :math:`b` (``image_shape``) or a number.
    :param image_shape: ``(C, H, W)`` of the images.
    :param latent_shape: ``(C', H', W')`` of the latents.

    The matrices are float64 buffers (part of ``state_dict``); inputs keep their dtype and
    autograd flows through both maps.

    Example::

        >>> ae = LinearAutoencoder.upsampling((1, 4, 4), factor=2, bias=0.5)
        >>> z = torch.randn(2, 1, 4, 4)
        >>> torch.allclose(ae.encode(ae.decode(z)), z, atol=1e-5)
        True
    """

    def __init__(
        self, weight: Tensor, bias: Tensor | float, image_shape: Sequence[int], latent_shape: Sequence[int]
    ) -> None:
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.latent_shape = tuple(int(s) for s in latent_shape)
        d_x, d_z = math.prod(self.image_shape), math.prod(self.latent_shape)
        weight = torch.as_tensor(weight, dtype=torch.float64)
        if weight.shape != (d_x, d_z):
            raise ValueError(f"weight must be ({d_x}, {d_z}) for images {self.image_shape} and latents "
                             f"{self.latent_shape}, got {tuple(weight.shape)}")
        bias = torch.as_tensor(bias, dtype=torch.float64)
        bias = bias.expand(self.image_shape).clone() if bias.ndim == 0 else bias.reshape(self.image_shape)
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.register_buffer("encoder", torch.linalg.pinv(weight) if weight.device.type != "meta"
                             else torch.empty(d_z, d_x, dtype=torch.float64, device="meta"))

    @classmethod
    def upsampling(
        cls, latent_shape: Sequence[int], factor: int = 2, bias: float | Tensor = 0.5, mode: str = "bilinear"
    ) -> "LinearAutoencoder":
        """Decoder = ``factor``-times upsampling (``torch.nn.functional.interpolate``) plus ``bias``."""
        c, h, w = latent_shape
        image_shape = (c, h * factor, w * factor)

        def up(z: Tensor) -> Tensor:
            kw = {} if mode == "nearest" else {"align_corners": False}
            return nn.functional.interpolate(z, scale_factor=factor, mode=mode, **kw)

        return cls(_dense(up, latent_shape, image_shape), bias, image_shape, latent_shape)

    def decode(self, z: Tensor) -> Tensor:
        """:math:`W z + b`, ``(B, *latent_shape) -> (B, *image_shape)``."""
        zf = z.reshape(z.shape[0], -1).to(self.weight.dtype)
        x = zf @ self.weight.T + self.bias.reshape(1, -1)
        return x.to(z.dtype).reshape(z.shape[0], *self.image_shape)

    def encode(self, x: Tensor) -> Tensor:
        """:math:`W^{+}(x - b)`, ``(B, *image_shape) -> (B, *latent_shape)``."""
        xf = (x.reshape(x.shape[0], -1).to(self.weight.dtype) - self.bias.reshape(1, -1))
        return (xf @ self.encoder.T).to(x.dtype).reshape(x.shape[0], *self.latent_shape)

    def config(self) -> dict:
        return dict(image_shape=list(self.image_shape), latent_shape=list(self.latent_shape))

    @classmethod
    def from_config(cls, config: dict) -> "LinearAutoencoder":
        image_shape, latent_shape = config["image_shape"], config["latent_shape"]
        d_x, d_z = math.prod(image_shape), math.prod(latent_shape)
        return cls(torch.zeros(d_x, d_z, dtype=torch.float64), 0.0, image_shape, latent_shape)


class IdentityAutoencoder(nn.Module):
    """``encode`` and ``decode`` are the identity: a pixel-space prior seen as a latent one."""

    def __init__(self, image_shape: Sequence[int]) -> None:
        super().__init__()
        self.image_shape = self.latent_shape = tuple(int(s) for s in image_shape)

    def encode(self, x: Tensor) -> Tensor:
        return x

    def decode(self, z: Tensor) -> Tensor:
        return z

    def config(self) -> dict:
        return dict(image_shape=list(self.image_shape))

    @classmethod
    def from_config(cls, config: dict) -> "IdentityAutoencoder":
        return cls(config["image_shape"])


class _ResBlock(nn.Module):
    """``x + conv(silu(conv(silu(x))))`` with 3x3 convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(nn.functional.silu(self.conv1(nn.functional.silu(x))))


class ConvAutoencoder(nn.Module):
    """A small convolutional autoencoder: ``2**levels``-times downsampling to ``latent_channels``.

    Encoder: a 3x3 conv to ``width`` channels; per level a residual block (two 3x3 convs, SiLU)
    and a stride-2 4x4 conv (to ``2 * width`` channels after the first level); a residual block
    and a 1x1 conv to ``latent_channels``. The decoder mirrors it with nearest-neighbour
    upsampling. Images are mapped to ``[-1, 1]`` inside (``2x - 1``) and back, and there is no
    output non-linearity. With the defaults (``levels=2``, 4 latent channels) a ``(1, 64, 64)``
    image becomes a ``(4, 16, 16)`` latent (the VQ-f4 geometry of the LDM used by ReSample,
    smaller). Trained by :func:`invdiff.train.autoencoder.train_autoencoder`.

    :param channels: image channels.
    :param latent_channels: latent channels.
    :param width: base number of feature channels.
    :param levels: number of 2x downsamplings.

    Example::

        >>> ae = ConvAutoencoder(channels=1, latent_channels=4, width=8)
        >>> ae.encode(torch.rand(2, 1, 32, 32)).shape
        torch.Size([2, 4, 8, 8])
    """

    def __init__(self, channels: int = 1, latent_channels: int = 4, width: int = 32, levels: int = 2) -> None:
        super().__init__()
        if min(channels, latent_channels, width, levels) < 1:
            raise ValueError("channels, latent_channels, width and levels must be >= 1")
        self.channels, self.latent_channels, self.width, self.levels = channels, latent_channels, width, levels
        widths = [width] + [2 * width] * levels
        enc: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1)]
        for i in range(levels):
            enc += [_ResBlock(widths[i]), nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1)]
        enc += [_ResBlock(widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], latent_channels, 1)]
        dec: list[nn.Module] = [nn.Conv2d(latent_channels, widths[-1], 3, padding=1), _ResBlock(widths[-1])]
        for i in reversed(range(levels)):
            dec += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(widths[i + 1], widths[i], 3, padding=1),
                    _ResBlock(widths[i])]
        dec += [nn.SiLU(), nn.Conv2d(width, channels, 3, padding=1)]
        self.encoder, self.decoder = nn.Sequential(*enc), nn.Sequential(*dec)

    @property
    def factor(self) -> int:
        """Downsampling factor ``2**levels``."""
        return 2**self.levels

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, int, int]:
        """Latent shape of images of ``image_shape``."""
        c, h, w = image_shape
        return (self.latent_channels, h // self.factor, w // self.factor)

    def encode(self, x: Tensor) -> Tensor:
        """Latents ``(B, latent_channels, H / 2**levels, W / 2**levels)`` of images ``(B, C, H, W)``."""
        if x.ndim != 4 or x.shape[1] != self.channels or x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"ConvAutoencoder.encode: expected (B, {self.channels}, H, W) with H and W multiples "
                             f"of {self.factor}, got {tuple(x.shape)}")
        return self.encoder(2 * x - 1)

    def decode(self, z: Tensor) -> Tensor:
        """Images ``(B, C, H, W)`` (on ``[0, 1]``, unclamped) of latents ``z``."""
        if z.ndim != 4 or z.shape[1] != self.latent_channels:
            raise ValueError(f"ConvAutoencoder.decode: expected (B, {self.latent_channels}, h, w), got {tuple(z.shape)}")
        return (self.decoder(z) + 1) / 2

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction ``decode(encode(x))``."""
        return self.decode(self.encode(x))

    def config(self) -> dict:
        return dict(channels=self.channels, latent_channels=self.latent_channels, width=self.width,
                    levels=self.levels)

    @classmethod
    def from_config(cls, config: dict) -> "ConvAutoencoder":
        return cls(**config)


#: Autoencoder classes :func:`~invdiff.priors.load` can rebuild (by class name).
AUTOENCODERS: dict[str, type[nn.Module]] = {
    "ConvAutoencoder": ConvAutoencoder,
    "LinearAutoencoder": LinearAutoencoder,
    "IdentityAutoencoder": IdentityAutoencoder,
}


def _dense(fn: Callable[[Tensor], Tensor], in_shape: Sequence[int], out_shape: Sequence[int]) -> Tensor:
    """Matrix ``(prod(out_shape), prod(in_shape))`` of a linear map, applied to the standard basis."""
    d = math.prod(in_shape)
    basis = torch.eye(d, dtype=torch.float64).reshape(d, *in_shape)
    return fn(basis).reshape(d, math.prod(out_shape)).T.contiguous()


# ----------------------------------------------------------------------------------
# the prior
# ----------------------------------------------------------------------------------


@dataclass
class LatentGaussianPosterior:
    """Exact posterior of a linear-decoder latent Gaussian (mixture) prior: the latent posterior
    ``sum_k w_k N(m_k, C_k)`` pushed through ``x = W z + b``.

    :ivar latent: the latent posterior (:class:`~invdiff.priors.GaussianMixturePosterior`).
    :ivar autoencoder: the :class:`LinearAutoencoder`.
    """

    latent: GaussianMixturePosterior
    autoencoder: LinearAutoencoder

    @property
    def image_shape(self) -> tuple:
        return self.autoencoder.image_shape

    @property
    def mean(self) -> Tensor:
        """Posterior mean ``(B, C, H, W)`` (float64)."""
        return self.autoencoder.decode(self.latent.mean.to(torch.float64))

    @property
    def covariance(self) -> Tensor:
        """Posterior covariance ``(B, d, d)``: :math:`W C_z W^\\top`."""
        w = self.autoencoder.weight
        return w @ self.latent.covariance @ w.T

    @property
    def std(self) -> Tensor:
        """Per-pixel posterior standard deviation ``(B, C, H, W)``."""
        var = torch.diagonal(self.covariance, dim1=1, dim2=2).clamp_min(0)
        return var.sqrt().reshape(-1, *self.image_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact posterior samples per measurement, ``(n, B, C, H, W)`` (float64)."""
        z = self.latent.sample(n, generator)
        return self.autoencoder.decode(z.reshape(-1, *z.shape[2:])).reshape(n, -1, *self.image_shape)


class _LatentOperator:
    """``z -> A(W z)``: the measurement operator seen from the latent (bias removed), for
    :func:`~invdiff.priors.analytic.operator_matrix`."""

    def __init__(self, physics, autoencoder: LinearAutoencoder) -> None:
        self.physics, self.autoencoder = physics, autoencoder

    def A(self, z: Tensor) -> Tensor:  # noqa: N802 - deepinv's name
        w = self.autoencoder.weight
        x = (z.reshape(z.shape[0], -1).to(w.dtype) @ w.T).reshape(z.shape[0], *self.autoencoder.image_shape)
        return self.physics.A(x)


class LatentDiffusionPrior(DiffusionPrior):
    """A diffusion prior over the latents of an autoencoder (see the module docstring).

    :param autoencoder: an :class:`torch.nn.Module` with ``encode(x) -> z`` and ``decode(z) -> x``.
    :param latent: the :class:`DiffusionPrior` over latents of shape ``latent.image_shape``.
    :param image_shape: ``(C, H, W)`` of decoded images; inferred by decoding a zero latent when ``None``.

    ``sigma_min``, ``sigma_max`` and ``sigma_data`` are the latent prior's. ``denoise`` on images
    raises :class:`NotImplementedError` (use a latent sampler, or ``prior.latent`` to denoise latents).

    Example::

        >>> from invdiff.priors import GaussianPrior
        >>> latent = GaussianPrior.stationary((1, 4, 4), length_scale=1.0, variance=0.05, mean=0.0)
        >>> prior = LatentDiffusionPrior(LinearAutoencoder.upsampling((1, 4, 4), factor=2, bias=0.5), latent)
        >>> prior.image_shape, prior.latent_shape
        ((1, 8, 8), (1, 4, 4))
        >>> prior.decode(prior.latent.sample(3).float()).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(self, autoencoder: nn.Module, latent: DiffusionPrior,
                 image_shape: Sequence[int] | None = None) -> None:
        if not (callable(getattr(autoencoder, "encode", None)) and callable(getattr(autoencoder, "decode", None))):
            raise TypeError(f"the autoencoder must have encode() and decode() methods, got {type(autoencoder).__name__}")
        if not isinstance(latent, DiffusionPrior):
            raise TypeError(f"the latent prior must be an invdiff DiffusionPrior, got {type(latent).__name__}")
        if image_shape is None:
            with torch.no_grad():
                probe = torch.zeros(1, *latent.image_shape, device=_device_of(autoencoder, latent))
                image_shape = tuple(autoencoder.decode(probe).shape[1:])
        super().__init__(image_shape, sigma_min=latent.sigma_min, sigma_max=latent.sigma_max,
                         sigma_data=latent.sigma_data)
        self.autoencoder = autoencoder
        self.latent = latent

    @classmethod
    def of(cls, prior: DiffusionPrior) -> "LatentDiffusionPrior":
        """``prior`` itself when it is a latent prior, else the pixel prior seen as one through
        the :class:`IdentityAutoencoder` (at any size when the prior works at any size): how
        latent samplers (ReSample, PSLD) take a pixel prior. Anything else is returned as it
        is, for the sampler's own type check."""
        if not isinstance(prior, DiffusionPrior) or isinstance(prior, cls):
            return prior
        latent = cls(IdentityAutoencoder(prior.image_shape), prior, prior.image_shape)
        latent.any_size = prior.any_size  # a pixel prior of any size: identity autoencoder of the run's shape
        return latent

    @classmethod
    def linear_gaussian(
        cls,
        latent_shape: Sequence[int] = (1, 8, 8),
        factor: int = 2,
        length_scale: float = 1.0,
        variance: float = 0.05,
        bias: float = 0.5,
        **kwargs: Any,
    ) -> "LatentDiffusionPrior":
        """The analytic test case: a stationary Gaussian latent prior (mean 0) and a linear
        ``factor``-times bilinear upsampling decoder plus ``bias`` (exact posterior known)."""
        cov = stationary_covariance(latent_shape, length_scale, variance)
        from .analytic import GaussianPrior

        latent = GaussianPrior(0.0, cov, image_shape=latent_shape, **kwargs)
        return cls(LinearAutoencoder.upsampling(latent_shape, factor, bias), latent)

    @property
    def latent_shape(self) -> tuple:
        """Shape ``(C', H', W')`` of the latents (the autoencoder's, when it has a fixed one)."""
        shape = getattr(self.autoencoder, "latent_shape", None)
        return tuple(shape) if isinstance(shape, (tuple, list)) else self.latent.image_shape

    def encode(self, x: Tensor) -> Tensor:
        """Latents of images ``x`` ``(B, *image_shape)``."""
        return self.autoencoder.encode(x)

    def decode(self, z: Tensor) -> Tensor:
        """Images of latents ``z`` ``(B, *latent_shape)``."""
        return self.autoencoder.decode(z)

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        raise NotImplementedError(
            "a LatentDiffusionPrior has no pixel-space denoiser, so pixel-space samplers (deepinv's DPS, "
            "DiffPIR, DDRM; invdiff's DPS, DDS, ...) cannot use it: sample with the latent sampler "
            "invdiff.samplers.ReSample, or denoise latents with prior.latent.denoise"
        )

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact prior samples (decoded latent samples), for a latent prior with ``sample`` (analytic)."""
        if not hasattr(self.latent, "sample"):
            raise NotImplementedError(f"{type(self.latent).__name__} cannot sample directly; use a sampler")
        z = self.latent.sample(n, generator)
        return self.decode(z)

    def posterior(self, y: Tensor, physics, noise_sigma: float) -> LatentGaussianPosterior:
        """Exact posterior of ``y = physics.A(x0) + noise_sigma * e`` for the analytic case
        (a :class:`LinearAutoencoder` and a Gaussian (mixture) latent prior, linear ``physics``)."""
        if not isinstance(self.autoencoder, LinearAutoencoder) or not isinstance(self.latent, GaussianMixturePrior):
            raise ValueError("the closed-form posterior needs a LinearAutoencoder and a Gaussian (mixture) latent "
                             f"prior, got {type(self.autoencoder).__name__} and {type(self.latent).__name__}")
        ae = self.autoencoder
        bias = ae.bias.reshape(1, *ae.image_shape)
        y_latent = y.to(torch.float64) - physics.A(bias.to(y.dtype)).to(torch.float64)  # y - A b
        latent_post = self.latent.posterior(y_latent, _LatentOperator(physics, ae), noise_sigma)
        return LatentGaussianPosterior(latent_post, ae)

    def extra_repr(self) -> str:
        return f"image_shape={self.image_shape}, latent_shape={self.latent_shape}"


def _device_of(*modules: nn.Module) -> torch.device:
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            return t.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------------
# saving and loading: the "latent" family
# ----------------------------------------------------------------------------------


def _latent_family_of(prior: DiffusionPrior) -> PriorFamily:
    fam = family_of(prior, exclude=("latent",))
    if fam is None:
        names = ", ".join(n for n in families() if n != "latent")
        raise ValueError(f"cannot save a latent prior of type {type(prior).__name__}: no registered family saves it "
                         f"(families: {names})")
    return fam


def _latent_describe(prior: DiffusionPrior) -> tuple[dict, dict]:
    assert isinstance(prior, LatentDiffusionPrior)
    ae = prior.autoencoder
    name = type(ae).__name__
    if name not in AUTOENCODERS or not isinstance(ae, AUTOENCODERS[name]):
        raise ValueError(f"cannot save an autoencoder of type {name}; savable: {', '.join(AUTOENCODERS)}")
    fam = _latent_family_of(prior.latent)
    latent_config, latent_options = fam.describe(prior.latent)
    config = dict(autoencoder=name, autoencoder_config=ae.config(), latent_family=fam.name,
                  latent_config=latent_config, latent_options=latent_options)
    return config, dict(image_shape=list(prior.image_shape))


def _latent_build(config: Any, options: dict) -> LatentDiffusionPrior:
    if not isinstance(config, dict) or "autoencoder" not in config or "latent_family" not in config:
        raise ValueError("a latent prior's config must name its autoencoder and latent_family")
    if config["autoencoder"] not in AUTOENCODERS:
        raise ValueError(f"unknown autoencoder {config['autoencoder']!r}; known: {', '.join(AUTOENCODERS)}")
    unknown = set(options) - {"image_shape"}
    if unknown:
        raise TypeError(f"unknown LatentDiffusionPrior options {sorted(unknown)}; known: ['image_shape']")
    ae = AUTOENCODERS[config["autoencoder"]].from_config(config["autoencoder_config"])
    latent_options = dict(config.get("latent_options") or {})
    if latent_options.get("image_shape") is not None:
        latent_options["image_shape"] = tuple(latent_options["image_shape"])
    latent = get_family(config["latent_family"]).build(config["latent_config"], latent_options)
    shape = options.get("image_shape")
    return LatentDiffusionPrior(ae, latent, tuple(shape) if shape is not None else None)


def _latent_network(prior: DiffusionPrior) -> nn.Module:
    assert isinstance(prior, LatentDiffusionPrior)
    return nn.ModuleDict(dict(autoencoder=prior.autoencoder,
                              latent=_latent_family_of(prior.latent).network(prior.latent)))


register_family(
    PriorFamily(
        name="latent",
        prior_type=LatentDiffusionPrior,
        build=_latent_build,
        describe=_latent_describe,
        network=_latent_network,
        source="invdiff (invdiff/priors/latent.py: autoencoder + latent EDM denoiser)",
        formats="invdiff .safetensors (invdiff train --latent)",
    )
)
