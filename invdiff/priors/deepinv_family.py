r"""deepinv's denoisers as invdiff priors, family ``"deepinv"``.

A state dict of a :class:`deepinv.models.Denoiser` (``torch.save(model.state_dict())`` or
safetensors) loads with ``family="deepinv"`` and ``config={"class": "NCSNpp", "kwargs":
{...}}``: the class is looked up in :mod:`deepinv.models`, built with ``pretrained=None``
(invdiff never downloads) and the keyword arguments of the config (JSON; a keyword whose
value is itself ``{"class": ..., "kwargs": ...}`` is built the same way, e.g. the ``model``
of :class:`deepinv.models.EDMPrecond`). The adapter is deepinv's own ``forward(x, sigma)``,
which already is invdiff's contract (:class:`~invdiff.priors.adapters.DenoiserPrior`):

.. math::

    D(x, \sigma) = \frac{\mathrm{model}(\text{shift} + \text{scale}\,x,\ \text{scale}\,\sigma)
        - \text{shift}}{\text{scale}},

with the identity map for deepinv's own convention, ``data_range="[0, 1]"`` (the default:
deepinv's diffusion denoisers take ``[0, 1]`` images and rescale to their training range
inside ``forward``, e.g. ``NCSNpp(_was_trained_on_minus_one_one=True)``).

Without ``config=``, the class is read from the key layout where that is unambiguous:
EDM's SongUNet keys -> :class:`~deepinv.models.NCSNpp` (``model_type`` ``"ddpm"`` or
``"ncsn"``), EDM's DhariwalUNet keys -> :class:`~deepinv.models.ADMUNet` (both with
``pixel_std=0.5`` and ``_was_trained_on_minus_one_one=True``, how deepinv loads its EDM
weight files), guided-diffusion keys -> :class:`~deepinv.models.DiffUNet` (``large_model``
from the width). A file of ``EDMPrecond(model)`` holds the ``model``'s keys under
``model.``; the prefix is dropped on reading and the weights go into the inner network.
(deepinv 0.5's ``EDMPrecond`` calls ``model(c_in x, c_noise, class_labels=...)``: it needs a
raw network; around ``NCSNpp`` / ``ADMUNet``, whose ``forward`` takes a noise level and
preconditions itself, it computes ``log`` of a negative ``c_noise``. For EDM checkpoints use
the ``"nvlabs-edm"`` family, :mod:`invdiff.priors.edm_official`.)

Source: deepinv (https://github.com/deepinv/deepinv, ``deepinv/models/``), BSD-3-Clause.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from .adapters import DenoiserPrior
from .conventions import DataRange
from .loading import PriorFamily, register_family

__all__ = ["DeepinvPrior", "build_deepinv", "infer_deepinv_config"]

# noise ranges on invdiff's [0, 1] scale of the diffusion denoisers (others: pass sigma_min / sigma_max)
_SIGMAS = {
    "NCSNpp": (0.001, 40.0),  # EDM's (0.002, 80) on [-1, 1]
    "ADMUNet": (0.001, 40.0),
    "EDMPrecond": (0.001, 40.0),
    "DiffUNet": (0.005, 78.0),  # guided-diffusion's linear betas: sigma' in (0.01, 157) on [-1, 1]
}
_WRAPPER_ATTRS = ("model", "net", "module")


def _check_spec(spec: Any, where: str = "config") -> tuple[str, dict]:
    if not isinstance(spec, Mapping) or "class" not in spec:
        raise ValueError(f"deepinv {where} must be a dict {{'class': name, 'kwargs': {{...}}}}, got {spec!r}")
    extra = set(spec) - {"class", "kwargs"}
    if extra:
        raise ValueError(f"unknown deepinv {where} fields {sorted(extra)}; known: class, kwargs")
    kwargs = spec.get("kwargs") or {}
    if not isinstance(kwargs, Mapping):
        raise ValueError(f"deepinv {where} kwargs must be a dict, got {type(kwargs).__name__}")
    return str(spec["class"]), dict(kwargs)


def _denoiser_class(name: str) -> type:
    import deepinv

    cls = getattr(deepinv.models, name, None)
    if not (isinstance(cls, type) and issubclass(cls, deepinv.models.Denoiser)):
        raise ValueError(f"deepinv.models has no Denoiser class {name!r}")
    return cls


def build_deepinv(spec: Mapping[str, Any]) -> nn.Module:
    """The deepinv denoiser ``spec = {"class": name, "kwargs": {...}}`` with random weights
    (``pretrained=None``; nested ``{"class", "kwargs"}`` values are built too).

    >>> net = build_deepinv({"class": "DRUNet", "kwargs": {"in_channels": 1, "out_channels": 1,
    ...                                                    "nc": [8, 8, 8, 8], "nb": 1}})
    >>> type(net).__name__
    'DRUNet'
    """
    name, kwargs = _check_spec(spec)
    cls = _denoiser_class(name)
    params = inspect.signature(cls.__init__).parameters
    if kwargs.get("pretrained") is not None:
        raise ValueError(f"deepinv {name}: pretrained={kwargs['pretrained']!r} would download or unpickle weights; "
                         f"invdiff builds it with pretrained=None and loads the weights file itself")
    if "pretrained" in params:
        kwargs["pretrained"] = None
    if kwargs.get("device") is not None:
        raise ValueError(f"deepinv {name}: pass device= to priors.load, not in the config")
    kwargs.pop("device", None)
    named = {n for n, p in params.items() if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(kwargs) - named)
    if unknown:  # several deepinv classes take **kwargs and ignore them: a typo would pass silently
        raise ValueError(f"deepinv {name}: unknown keyword(s) {unknown}; it takes {sorted(named)}")
    for key, value in list(kwargs.items()):
        if isinstance(value, Mapping) and "class" in value:
            kwargs[key] = build_deepinv(value)
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"deepinv {name}({', '.join(sorted(kwargs))}): {' '.join(str(err).split())}") from None


def _weights_module(module: nn.Module) -> nn.Module:
    """The module whose state dict a file holds: wrappers whose every key sits under one
    child (``EDMPrecond.model``) are descended, as the loader strips such a shared prefix."""
    while True:
        keys = list(module.state_dict())
        child = next((a for a in _WRAPPER_ATTRS if keys and isinstance(getattr(module, a, None), nn.Module)
                      and all(k.startswith(a + ".") for k in keys)), None)
        if child is None:
            return module
        module = getattr(module, child)


class DeepinvPrior(DenoiserPrior):
    r"""A deepinv denoiser built from a config (family ``"deepinv"``), with its data range.

    ``D(x, sigma)`` is the model's own ``forward(x, sigma)`` (see the module doc; with a
    non-identity ``data_range`` it is applied on the model's scale).

    :param model: the deepinv denoiser.
    :param image_shape: ``(C, H, W)``.
    :param sigma_min: smallest noise level (invdiff's scale).
    :param sigma_max: largest noise level (invdiff's scale).
    :param sigma_data: standard deviation of the training images.
    :param data_range: range ``forward`` expects (default ``"[0, 1]"``, deepinv's convention).
    :param spec: the ``{"class", "kwargs"}`` config it was built from (for saving).

    Example::

        >>> import torch
        >>> spec = {"class": "DRUNet", "kwargs": {"in_channels": 1, "out_channels": 1, "nc": [8, 8, 8, 8], "nb": 1}}
        >>> prior = DeepinvPrior(build_deepinv(spec), (1, 16, 16), 0.01, 0.5, spec=spec)
        >>> str(prior.data_range), prior.denoise(torch.rand(2, 1, 16, 16), 0.1).shape
        ('[0, 1]', torch.Size([2, 1, 16, 16]))
    """

    def __init__(
        self,
        model: nn.Module,
        image_shape: Sequence[int],
        sigma_min: float,
        sigma_max: float,
        sigma_data: float = 0.5,
        data_range: str | DataRange | Sequence[float] = "[0, 1]",
        spec: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, image_shape, sigma_min, sigma_max, sigma_data)
        self.set_data_range(data_range)
        self.spec = dict(spec or {"class": type(model).__name__, "kwargs": {}})

    @property
    def parameterisation(self) -> str:  # type: ignore[override]
        return (f"deepinv {self.spec.get('class')} forward(x, sigma): a VE denoiser of [0, 1] images "
                f"(deepinv's convention; the network's own preconditioning inside)")

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        if self.data_range.is_identity:
            return super()._denoise(x, sigma)
        out = super()._denoise(self.data_range.to_model(x), self.data_range.sigma_to_model(sigma))
        return self.data_range.from_model(out)


# ----------------------------------------------------------------------------------
# the family
# ----------------------------------------------------------------------------------

_OPTIONS = {"image_shape", "sigma_min", "sigma_max", "sigma_data", "data_range"}


def _default_shape(spec: Mapping[str, Any]) -> tuple[int, int, int] | None:
    name, kw = _check_spec(spec)
    if name == "EDMPrecond" and isinstance(kw.get("model"), Mapping):
        return _default_shape(kw["model"])
    if "img_resolution" in kw and "in_channels" in kw:
        return int(kw["in_channels"]), int(kw["img_resolution"]), int(kw["img_resolution"])
    return None


def _build(config: Any, options: dict) -> DeepinvPrior:
    name, _ = _check_spec(config)
    _denoiser_class(name)
    options = dict(options)
    unknown = set(options) - _OPTIONS
    if unknown:
        raise ValueError(f"unknown deepinv options {sorted(unknown)}; known: {sorted(_OPTIONS)}")
    shape = options.pop("image_shape", None) or _default_shape(config)
    if shape is None:
        raise ValueError(f"deepinv {name}: pass image_shape=(C, H, W) (not in its config)")
    lo, hi = _SIGMAS.get(name, (None, None))
    lo, hi = options.pop("sigma_min", lo), options.pop("sigma_max", hi)
    if lo is None or hi is None:
        raise ValueError(f"deepinv {name}: pass sigma_min= and sigma_max=, the noise levels it was trained for")
    return DeepinvPrior(build_deepinv(config), shape, float(lo), float(hi), spec=config, **options)


def _describe(prior) -> tuple[dict, dict]:
    assert isinstance(prior, DeepinvPrior)
    return prior.spec, dict(image_shape=list(prior.image_shape), sigma_min=prior.sigma_min, sigma_max=prior.sigma_max,
                            sigma_data=prior.sigma_data, data_range=str(prior.data_range))


def infer_deepinv_config(state: Mapping[str, Tensor], options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A ``{"class", "kwargs"}`` config read from a deepinv state dict's keys and shapes
    (see the module doc); ``ValueError`` where the layout is not one of those."""
    from . import edm_official as eo

    state = eo._bare(state)
    if eo._network_kind(state) is not None:
        network, kw = eo.infer_network_kwargs(state)
        kwargs = {k: kw[k] for k in ("img_resolution", "in_channels", "out_channels", "label_dim", "augment_dim",
                                     "model_channels", "channel_mult", "channel_mult_emb", "num_blocks",
                                     "attn_resolutions")}
        kwargs.update(pixel_std=0.5, _was_trained_on_minus_one_one=True)
        if network == "DhariwalUNet":
            return {"class": "ADMUNet", "kwargs": kwargs}
        arch = {k: kw[k] for k in eo._SONG_VARIANTS["ddpm"]}
        variant = next((n for n, v in eo._SONG_VARIANTS.items() if v == arch), None)
        if variant is None:
            raise ValueError(f"SongUNet {arch} is not one of deepinv NCSNpp's model types")
        return {"class": "NCSNpp", "kwargs": {"model_type": variant, **kwargs}}
    if "input_blocks.0.0.weight" in state and "out.2.weight" in state:
        width, in_ch = state["input_blocks.0.0.weight"].shape[:2]
        out = int(state["out.2.weight"].shape[0])
        if int(width) not in (128, 256):
            raise ValueError(f"a guided-diffusion U-Net of width {int(width)}: not one of DiffUNet's (128, 256); "
                             f"use family='adm'")
        return {"class": "DiffUNet", "kwargs": {"in_channels": int(in_ch), "out_channels": 3 if out == 6 else out,
                                                "large_model": int(width) == 256}}
    raise ValueError("the class cannot be read from these keys; pass config={'class': ..., 'kwargs': {...}}")


register_family(
    PriorFamily(
        name="deepinv",
        prior_type=DeepinvPrior,
        build=_build,
        describe=_describe,
        network=lambda prior: _weights_module(prior.model),
        infer_config=lambda state, options: infer_deepinv_config(state, options),
        source="deepinv (github.com/deepinv/deepinv) deepinv/models/: the state dict of the named Denoiser class",
        formats="state dicts (.safetensors, weights-only .pt) of a deepinv.models.Denoiser, with family='deepinv' "
                "and config={'class': ..., 'kwargs': {...}}",
    )
)
