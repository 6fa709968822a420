r"""Conventions of published checkpoints, mapped once onto invdiff's denoiser contract.

Every checkpoint family differs from invdiff's contract (:mod:`invdiff.priors.base`:
``x = x0 + sigma n``, ``x0`` in ``[0, 1]``) in two ways, written here once and used by
every adapter:

* **the data range** (:class:`DataRange`): the training images of the checkpoint are an
  affine image of invdiff's, ``x' = shift + scale * x``; so the noise level is
  ``sigma' = scale * sigma`` and a denoiser ``D'`` of the model's scale gives invdiff's as

  .. math::

      D(x, \sigma) = \frac{D'(\text{shift} + \text{scale}\,x,\; \text{scale}\,\sigma) - \text{shift}}{\text{scale}}.

  ``"[-1, 1]"`` (guided-diffusion, EDM, diffusers, score-SDE with ``data.centered``):
  ``scale = 2, shift = -1``. ``"[0, 1]"`` (score-SDE / DiffusionMBIR CT with
  ``data.centered=False``, DDS's AAPM slices): the identity. ``"complex-max"``: complex
  images as (real, imaginary) channel pairs divided by their largest magnitude
  (score-MRI, DDS's fastMRI model). No shift may be applied to a complex value, so the
  channels pass unchanged: the images a sampler reconstructs with such a prior must be
  scaled the same way (the measurement divided by the zero-filled image's largest
  magnitude, as those papers do), which the model card says.

* **the noise parameterisation** of variance-preserving (VP) models: the network sees
  :math:`x_t = \sqrt{\bar\alpha}\, x'_0 + \sqrt{1-\bar\alpha}\,\varepsilon`, which is the
  VE image :math:`x' = x_t / \sqrt{\bar\alpha}` at :math:`\sigma'^2 = (1-\bar\alpha)/\bar\alpha`,
  i.e. :math:`\bar\alpha = 1 / (1 + \sigma'^2)`. What the network predicts
  (:func:`vp_prediction_to_x0`): ``"epsilon"`` (DDPM, ADM), ``"sample"`` (``x0``
  directly) or ``"v_prediction"`` (Salimans & Ho 2022,
  :math:`v = \sqrt{\bar\alpha}\,\varepsilon - \sqrt{1-\bar\alpha}\,x_0`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

__all__ = ["DataRange", "PREDICTION_TYPES", "vp_input", "vp_prediction_to_x0", "vp_timestep"]

#: what a VP network predicts, in diffusers' names (``epsilon``, ``sample``, ``v_prediction``)
PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

_NUMBER = r"\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_INTERVAL = re.compile(r"^\s*[\[(]?" + _NUMBER + "," + _NUMBER + r"[\])]?\s*$")


@dataclass(frozen=True)
class DataRange:
    """The range of a checkpoint's training images: invdiff's ``x`` in ``[0, 1]`` is the
    model's ``shift + scale * x`` (see the module doc).

    Build it with :meth:`parse` from ``"[-1, 1]"``, ``"[0, 1]"``, ``"complex-max"``, a
    pair ``(low, high)`` or another ``DataRange``. Its name (``str(r)``) is what model cards
    and saved files record, and :meth:`parse` reads it back.

    Example::

        >>> import torch
        >>> r = DataRange.parse("[-1, 1]")
        >>> r.scale, r.shift, str(r)
        (2.0, -1.0, '[-1, 1]')
        >>> r.to_model(torch.tensor([0.0, 0.5, 1.0])).tolist()
        [-1.0, 0.0, 1.0]
        >>> DataRange.parse((0, 1)) == DataRange.parse("[0,1]")
        True
    """

    low: float
    high: float
    complex_max: bool = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.high <= self.low:
            raise ValueError(f"data range needs finite low < high, got [{self.low}, {self.high}]")
        if self.complex_max and (self.low, self.high) != (0.0, 1.0):
            raise ValueError("a complex-max data range is the identity map")

    @classmethod
    def parse(cls, value: Union["DataRange", str, Sequence[float]]) -> "DataRange":
        """A :class:`DataRange` from its name, an interval string or a ``(low, high)`` pair
        (one-line :class:`ValueError` naming the accepted forms otherwise)."""
        if isinstance(value, DataRange):
            return value
        if isinstance(value, str):
            text = value.strip().lower()
            if text in ("complex-max", "complex", "complex_max"):
                return cls(0.0, 1.0, complex_max=True)
            if text in ("minus_one_one", "-1,1", "centered", "centred"):
                return cls(-1.0, 1.0)
            if text in ("zero_one", "0,1", "uncentered"):
                return cls(0.0, 1.0)
            match = _INTERVAL.match(text)
            if match:
                return cls(float(match.group(1)), float(match.group(2)))
        elif isinstance(value, Sequence) and len(value) == 2:
            return cls(float(value[0]), float(value[1]))
        raise ValueError(
            f"data_range must be '[-1, 1]', '[0, 1]', 'complex-max' or a pair (low, high), got {value!r}"
        )

    @property
    def scale(self) -> float:
        """``high - low``: the factor on images and on noise levels."""
        return float(self.high - self.low)

    @property
    def shift(self) -> float:
        """``low``: the model's value of invdiff's 0."""
        return float(self.low)

    def to_model(self, x: Tensor) -> Tensor:
        """invdiff image ``x`` on the model's scale: ``shift + scale * x``."""
        return x if self.is_identity else self.shift + self.scale * x

    def from_model(self, x: Tensor) -> Tensor:
        """A model-scale image back on invdiff's scale: ``(x - shift) / scale``."""
        return x if self.is_identity else (x - self.shift) / self.scale

    def sigma_to_model(self, sigma: Tensor | float) -> Tensor | float:
        """Noise level on the model's scale: ``scale * sigma``."""
        return sigma if self.scale == 1 else self.scale * sigma

    def sigma_from_model(self, sigma: Tensor | float) -> Tensor | float:
        """Model-scale noise level on invdiff's scale: ``sigma / scale``."""
        return sigma if self.scale == 1 else sigma / self.scale

    @property
    def is_identity(self) -> bool:
        return self.low == 0.0 and self.high == 1.0

    def __str__(self) -> str:
        if self.complex_max:
            return "complex-max"

        def num(v: float) -> str:
            return str(int(v)) if float(v).is_integer() else repr(float(v))

        return f"[{num(self.low)}, {num(self.high)}]"

    def describe(self) -> str:
        """A sentence for model cards."""
        if self.complex_max:
            return ("complex images as (real, imaginary) channel pairs divided by their largest magnitude; passed "
                    "unchanged, so scale the data the same way (|x| <= 1)")
        if self.is_identity:
            return "images in [0, 1] (invdiff's own range: the identity map)"
        return f"images in {self} (invdiff's x in [0, 1] is {self.shift:g} + {self.scale:g} x; sigma scales by {self.scale:g})"


def vp_input(x_model: Tensor, sigma_model: Tensor) -> Tensor:
    r"""The VP network's input for the VE image ``x'`` at noise ``sigma'`` (model scale):
    :math:`x_t = \sqrt{\bar\alpha}\,x' = x' / \sqrt{1 + \sigma'^2}`."""
    return x_model / torch.sqrt(1 + sigma_model**2)


def vp_prediction_to_x0(out: Tensor, x_model: Tensor, sigma_model: Tensor, prediction_type: str = "epsilon") -> Tensor:
    r"""Tweedie's ``x0`` estimate (model scale) from a VP network's output ``out``, given the
    VE image ``x'`` and its noise level ``sigma'`` (so :math:`\bar\alpha = 1/(1+\sigma'^2)`,
    :math:`x_t = \sqrt{\bar\alpha}\,x'`):

    .. math::

        \text{epsilon:}\ \hat x_0 = x' - \sigma'\hat\varepsilon, \qquad
        \text{sample:}\ \hat x_0 = \text{out}, \qquad
        \text{v\_prediction:}\ \hat x_0 = \sqrt{\bar\alpha}\,x_t - \sqrt{1-\bar\alpha}\,\hat v
            = \frac{x'}{1 + \sigma'^2} - \frac{\sigma'\,\hat v}{\sqrt{1 + \sigma'^2}}.

    The ``epsilon`` form is :math:`(x_t - \sqrt{1-\bar\alpha}\,\hat\varepsilon)/\sqrt{\bar\alpha}`
    rewritten without the division by a vanishing :math:`\sqrt{\bar\alpha}` at large noise.

    >>> import torch
    >>> x0, eps, s = torch.tensor([0.3]), torch.tensor([-1.2]), torch.tensor([2.0])
    >>> x = x0 + s * eps
    >>> ab = 1 / (1 + s**2)
    >>> v = ab.sqrt() * eps - (1 - ab).sqrt() * x0
    >>> [round(float(vp_prediction_to_x0(o, x, s, k)), 5) for o, k in ((eps, "epsilon"), (x0, "sample"), (v, "v_prediction"))]
    [0.3, 0.3, 0.3]
    """
    if prediction_type == "epsilon":
        return x_model - sigma_model * out
    if prediction_type == "sample":
        return out
    if prediction_type == "v_prediction":
        return x_model / (1 + sigma_model**2) - sigma_model * out / torch.sqrt(1 + sigma_model**2)
    raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")


def vp_timestep(log_sigmas: Tensor, sigma_model: Tensor) -> Tensor:
    r"""The continuous timestep ``t`` in ``[0, T-1]`` of a discrete VP schedule at the model-scale
    noise level ``sigma'``: ``log_sigmas[k]`` is :math:`\log\sigma'_k`,
    :math:`\sigma'^2_k = (1-\bar\alpha_k)/\bar\alpha_k`, strictly increasing, and between two
    steps ``t`` is linear in :math:`\log\sigma'` (the k-diffusion ``sigma_to_t`` rule); outside
    the schedule it is clamped to ``0`` or ``T - 1``. Computed in float64 (float32 on MPS).

    >>> import torch
    >>> log_sigmas = torch.log(torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64))
    >>> vp_timestep(log_sigmas, torch.tensor([0.1, 10 ** -0.5, 1.0, 100.0], dtype=torch.float64)).tolist()
    [0.0, 0.5, 1.0, 2.0]
    """
    table_dtype = torch.float32 if sigma_model.device.type == "mps" else torch.float64
    log_table = log_sigmas.to(sigma_model.device, table_dtype)
    log_sigma = torch.log(sigma_model.to(table_dtype)).reshape(-1)
    hi = torch.searchsorted(log_table, log_sigma).clamp(1, len(log_table) - 1)
    lo = hi - 1
    w = ((log_sigma - log_table[lo]) / (log_table[hi] - log_table[lo])).clamp(0, 1)
    return lo + w
