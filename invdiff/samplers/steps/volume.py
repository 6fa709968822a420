r"""Shared steps of the volume samplers: the z finite difference and the ADMM step of the
TV-z regularised data problem (DiffusionMBIR, DDS-3D).

With :math:`D_z` the forward difference between neighbouring slices
(:math:`(D_z x)_d = x_{d+1} - x_d`, ``D - 1`` differences, no wrap-around), one ADMM
iteration on

.. math::

    \min_x\; \tfrac{\mu}{2}\|x - \hat x\|^2 + \tfrac12\|Ax - y\|^2 + \lambda \|D_z x\|_1,
    \qquad \text{split } z = D_z x,

is (Chung et al., DiffusionMBIR, CVPR 2023, eqs. 12-14; DDS-3D ``solver_3d.py``)

.. math::

    x &\leftarrow \mathrm{CG}_M\big(\mu I + A^\top A + \rho D_z^\top D_z,\;
        \mu \hat x + A^\top y + \rho D_z^\top (z - u);\; x\big), \\
    z &\leftarrow \mathcal S_{\lambda/\rho}(D_z x + u), \qquad
    u \leftarrow u + D_z x - z,

with :math:`\mathcal S_\tau` the soft threshold. ``z`` and ``u`` are carried from one
diffusion step to the next (the official codes keep them as closure variables). The
official :math:`D_z` wraps the last slice onto the first; here it does not (a volume's two
ends are not neighbours).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ...operators.volume import from_slices, to_slices
from .linalg import conjugate_gradient

__all__ = ["z_difference", "z_difference_adjoint", "soft_threshold", "TVzADMM"]


def z_difference(x: Tensor) -> Tensor:
    """:math:`D_z x`: ``(B, C, D, H, W) -> (B, C, D - 1, H, W)``, slice ``d+1`` minus slice ``d``."""
    return x[:, :, 1:] - x[:, :, :-1]


def z_difference_adjoint(v: Tensor) -> Tensor:
    """:math:`D_z^\\top v`: ``(B, C, D - 1, H, W) -> (B, C, D, H, W)``; slice ``d`` gets
    ``v[d - 1] - v[d]`` (zero outside)."""
    pad = torch.zeros_like(v[:, :, :1])
    return torch.cat([pad, v], dim=2) - torch.cat([v, pad], dim=2)


def soft_threshold(v: Tensor, tau: float) -> Tensor:
    """:math:`\\mathcal S_\\tau(v) = \\mathrm{sign}(v) \\max(|v| - \\tau, 0)` (the prox of
    :math:`\\tau\\|\\cdot\\|_1`)."""
    return torch.sign(v) * (v.abs() - tau).clamp_min(0)


class TVzADMM:
    """The ADMM step of the module doc, for one measurement ``y`` of ``physics``.

    :param physics: the volume operator.
    :param y: the measurements.
    :param rho: :math:`\\rho`, the ADMM penalty (the weight of the z coupling in the CG).
    :param tv_weight: :math:`\\lambda`; the soft threshold is :math:`\\lambda / \\rho`.
    :param cg_iterations: :math:`M`, CG iterations per ADMM iteration.
    :param cg_tol: relative residual at which CG stops.
    :param per_slice: solve each slice's CG on its own (inner products per slice). Exact
        only when ``rho == 0`` and the operator acts slice by slice (a
        :class:`~invdiff.operators.volume.SliceStack`): then the problem separates and this
        is the 2D method on every slice.
    """

    def __init__(self, physics, y: Tensor, rho: float, tv_weight: float, cg_iterations: int,
                 cg_tol: float = 1e-6, per_slice: bool = False) -> None:
        self.check(rho, tv_weight)
        self.physics, self.rho, self.tv_weight = physics, float(rho), float(tv_weight)
        self.cg_iterations, self.cg_tol, self.per_slice = int(cg_iterations), float(cg_tol), per_slice
        self.aty = physics.A_adjoint(y)
        self.z: Tensor | None = None
        self.u: Tensor | None = None

    @staticmethod
    def check(rho: float, tv_weight: float) -> None:
        """``rho >= 0``, ``tv_weight >= 0``, and ``rho > 0`` when ``tv_weight > 0`` (the threshold is
        ``tv_weight / rho``); else ``ValueError``."""
        if rho < 0 or tv_weight < 0:
            raise ValueError(f"TV-z ADMM needs rho >= 0 and tv_weight >= 0, got {rho}, {tv_weight}")
        if tv_weight > 0 and rho == 0:
            raise ValueError("TV-z ADMM: tv_weight > 0 needs rho > 0 (the threshold is tv_weight / rho)")

    def __call__(self, x: Tensor, anchor: Tensor | None = None, mu: float | Tensor = 0.0) -> Tensor:
        """One ADMM iteration started at ``x``; ``anchor`` is :math:`\\hat x` (weight ``mu``)."""
        A, rho = self.physics, self.rho
        if self.z is None:
            self.z = torch.zeros_like(z_difference(x))
            self.u = torch.zeros_like(self.z)
        proximal = anchor is not None and not (isinstance(mu, float) and mu == 0.0)
        rhs = self.aty.to(x.dtype)
        if proximal:
            rhs = rhs + mu * anchor
        if rho > 0:
            rhs = rhs + rho * z_difference_adjoint(self.z - self.u)

        def apply(v: Tensor) -> Tensor:
            out = A.A_adjoint(A.A(v))
            if proximal:
                out = out + mu * v
            if rho > 0:
                out = out + rho * z_difference_adjoint(z_difference(v))
            return out

        if self.per_slice:
            shape = x.shape
            x = from_slices(conjugate_gradient(lambda s: to_slices(apply(from_slices(s, shape))), to_slices(rhs),
                                               x0=to_slices(x), iterations=self.cg_iterations, tol=self.cg_tol),
                            shape)
        else:
            x = conjugate_gradient(apply, rhs, x0=x, iterations=self.cg_iterations, tol=self.cg_tol)
        if rho > 0:
            dz = z_difference(x)
            self.z = soft_threshold(dz + self.u, self.tv_weight / rho)
            self.u = self.u + dz - self.z
        return x
