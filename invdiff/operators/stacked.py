r"""A deepinv stacked physics as one operator on one measurement tensor.

deepinv's :class:`~deepinv.physics.StackedPhysics` measures ``x`` with several operators at
once and returns a :class:`~deepinv.utils.TensorList` ``[y_1, ..., y_n]``, each with its own
noise model. invdiff's samplers work on one tensor with one Gaussian noise level, so a
stack is reduced to that form exactly by whitening:

.. math::

    \tilde y = \big[\, y_1 / s_1,\; \dots,\; y_n / s_n \,\big], \qquad
    \tilde A x = \big[\, A_1 x / s_1,\; \dots,\; A_n x / s_n \,\big], \qquad
    \tilde y = \tilde A x + e,\; e \sim \mathcal N(0, I),

with :math:`s_i` the std of component ``i``'s Gaussian noise (each component flattened to
``(B, m_i)`` and concatenated). The Gaussian log-likelihood is unchanged,
:math:`\sum_i \|y_i - A_i x\|^2 / (2 s_i^2) = \|\tilde y - \tilde A x\|^2 / 2`, so every
sampler's data step sees the stack's exact likelihood. deepinv has no such flattening:
it is written here.
"""

from __future__ import annotations

import math

import torch
from deepinv.physics import GaussianNoise, LinearPhysics, Physics, StackedPhysics
from deepinv.utils import TensorList
from torch import Tensor

from .noise import measurement_noise

__all__ = ["WhitenedStack", "whitened_stack"]


def _noise_std(physics: Physics, index: int) -> float:
    """The one Gaussian noise level of component ``index`` (:func:`.noise.measurement_noise`)."""
    try:
        kind, sigma = measurement_noise(physics)
    except ValueError:
        kind, sigma = type(getattr(physics, "noise_model", None)).__name__, None
    if kind != "gaussian" or not isinstance(sigma, float) or not sigma > 0:
        model = getattr(physics, "noise_model", None)
        raise ValueError(
            f"stacked physics: component {index} ({type(physics).__name__}) has noise "
            f"{type(model).__name__}{'' if sigma is None else f'(level={sigma if isinstance(sigma, float) else sigma.tolist()})'}; "
            "whitening a stack needs Gaussian noise with one level > 0 on every component"
        )
    return sigma


class WhitenedStack(Physics):
    """The whitened stack of the module doc: ``A(x)`` is ``(B, m_1 + ... + m_n)``, the noise
    model is unit Gaussian. Build it with :func:`whitened_stack` (the linear variant has
    ``A_adjoint`` and a CG ``A_dagger``).

    :param stacked: a :class:`deepinv.physics.StackedPhysics`.
    """

    def __init__(self, stacked: StackedPhysics) -> None:
        super().__init__(noise_model=GaussianNoise(1.0))
        self.components = torch.nn.ModuleList(stacked.physics_list)
        self.scales = [1.0 / _noise_std(p, i) for i, p in enumerate(self.components)]
        self._shapes: list[tuple[int, ...]] | None = None  # per-image shape of each component's output

    def whiten(self, y: TensorList) -> Tensor:
        """``[y_1, ..., y_n]`` -> ``(B, m)``: each component scaled by ``1 / s_i`` and flattened."""
        if len(y) != len(self.components):
            raise ValueError(f"the measurement has {len(y)} parts, the stack {len(self.components)} operators")
        self._shapes = [tuple(part.shape[1:]) for part in y]
        return self._flatten(list(y))

    def _flatten(self, parts: list[Tensor]) -> Tensor:
        if any(p.is_complex() for p in parts):
            raise ValueError("stacked physics: complex-valued components are not supported; use 2 real channels")
        return torch.cat([(p * w).reshape(p.shape[0], -1) for p, w in zip(parts, self.scales)], 1)

    def split(self, v: Tensor) -> list[Tensor]:
        """The inverse of the flattening (without the whitening scale)."""
        if self._shapes is None:
            raise RuntimeError("WhitenedStack.split before the output shapes are known")
        sizes = [math.prod(s) for s in self._shapes]
        return [part.reshape(v.shape[0], *shape) for part, shape in zip(v.split(sizes, 1), self._shapes)]

    def A(self, x: Tensor, **kwargs) -> Tensor:
        parts = [p.A(x) for p in self.components]
        self._shapes = [tuple(part.shape[1:]) for part in parts]
        return self._flatten(parts)

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return sum(p.A_vjp(x, part * w) for p, part, w in zip(self.components, self.split(v), self.scales))


class WhitenedLinearStack(WhitenedStack, LinearPhysics):
    """:class:`WhitenedStack` of linear operators: ``A_adjoint`` is the sum of the components'
    scaled adjoints (exact), ``A_dagger`` deepinv's least-squares CG."""

    def A_adjoint(self, v: Tensor, **kwargs) -> Tensor:
        return sum(p.A_adjoint(part * w) for p, part, w in zip(self.components, self.split(v), self.scales))

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)


def whitened_stack(stacked: StackedPhysics) -> WhitenedStack:
    """The whitened single-tensor form of a deepinv stack (linear when every component is).

    Example::

        >>> import torch, deepinv as dinv
        >>> stack = dinv.physics.StackedLinearPhysics([
        ...     dinv.physics.Inpainting((1, 8, 8), mask=0.5, noise_model=dinv.physics.GaussianNoise(0.05)),
        ...     dinv.physics.Denoising(noise_model=dinv.physics.GaussianNoise(0.2))])
        >>> flat = whitened_stack(stack)
        >>> flat.A(torch.rand(2, 1, 8, 8)).shape
        torch.Size([2, 128])
    """
    if not isinstance(stacked, StackedPhysics):
        raise TypeError(f"expected a deepinv StackedPhysics, got {type(stacked).__name__}")
    if all(isinstance(p, LinearPhysics) for p in stacked.physics_list):
        return WhitenedLinearStack(stacked)
    return WhitenedStack(stacked)
