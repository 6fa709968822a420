"""Guidance: the gradient of the data misfit through the denoiser, and the Gaussian
likelihood of ΠGDM's error model that DPS, MCG, SMC's twist and ReSample share.

* :func:`guidance_gradient` — ``grad_x`` of ``||y - A(D(x, sigma))||`` (DPS, Chung et al.
  2023, Alg. 1) or of a weighted squared misfit;
* :class:`GaussianGuidance` — the precision
  :math:`(s^2 I + r_t^2 A A^\\top)^{-1}` of :math:`p(y \\mid x_t)`, by warm-started CG
  for linear operators or the scalar bound with :math:`\\|A\\|^2`;
* :func:`jacobian_norm_squared` — the squared spectral norm of a map's Jacobian (a latent
  prior's decoder), which moves that error model from the latent to the image (ReSample, PSLD).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .linalg import conjugate_gradient

__all__ = ["batch_norm", "guidance_gradient", "GaussianGuidance", "jacobian_norm_squared"]


def batch_norm(r: Tensor) -> Tensor:
    """Euclidean norm of each batch element, shape ``(B, 1, ..., 1)``."""
    return r.reshape(r.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (r.ndim - 1)))


def guidance_gradient(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigma: float,
    y: Tensor,
    physics,
    misfit: str = "norm",
    weight: Tensor | float | Callable[[Tensor], Tensor] | None = None,
    clip: tuple[float, float] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Denoise ``x`` and differentiate the data misfit through the denoiser (DPS, Alg. 1).

    With ``x0 = D(x, sigma)``, ``r = y - A(x0)`` and ``W = weight`` (1 when ``None``;
    a number or a tensor broadcastable against ``r``), returns ``(x0, grad, ||r||)``:

    * ``misfit="norm"``:    ``grad = grad_x ||sqrt(W) r||_2`` (the official DPS code uses the
      norm, not its square; ``W = 1/|y|`` gives the norm of the Pearson residual, used for
      Poisson noise);
    * ``misfit="squared"``: ``grad = grad_x ||sqrt(W) r||_2^2 / 2`` (a Gaussian log-likelihood
      with precision ``W``); ``weight`` may also be a callable ``r -> W r`` applying a
      symmetric positive-definite precision (e.g. a CG solve), held fixed in the gradient.

    The vector-Jacobian product of the operator goes through ``physics.A_vjp`` (the adjoint
    for linear operators); only the denoiser is differentiated by autograd, so no graph is
    built through ``A``. Norms are per batch element. ``clip`` clamps ``x0`` before the
    misfit (the reference code clips ``x0`` to the data range); its gradient is zero
    outside the range. When the caller runs with autograd on (a differentiable sampler run),
    ``x0`` is returned attached to the network's graph (the gradient itself is a constant).
    """
    if misfit not in ("norm", "squared"):
        raise ValueError(f"unknown misfit {misfit!r}: use 'norm' or 'squared'")
    keep_graph = torch.is_grad_enabled()  # a differentiable run: x0 stays attached to the network
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        x0 = denoise(xg, sigma)
        x0c = x0.clamp(*clip) if clip is not None else x0
        x0d = x0c.detach()
        r = y - physics.A(x0d)
        if callable(weight):
            if misfit != "squared":
                raise ValueError("a callable weight needs misfit='squared'")
            wr = weight(r)
        else:
            wr = r if weight is None else r * weight
        norm = batch_norm(r)
        if misfit == "norm":
            wnorm = norm if weight is None else batch_norm(r * torch.sqrt(torch.as_tensor(weight)))
            v = wr / wnorm.clamp_min(torch.finfo(r.dtype).tiny)
        else:
            v = wr
        g0 = -physics.A_vjp(x0d, v)  # d misfit / d x0
        (grad,) = torch.autograd.grad(x0c, xg, grad_outputs=g0.to(x0c.dtype), retain_graph=keep_graph)
    return (x0c if keep_graph else x0c.detach()), grad.detach(), norm.detach()


class GaussianGuidance:
    """The Gaussian likelihood :math:`p(y \\mid x_t) \\approx \\mathcal N(y;\\, A \\hat x_0,\\,
    v I + r^2 A A^\\top)` (ΠGDM's error model) as the weight of :func:`guidance_gradient`.

    :param physics: the operator.
    :param noise_var: :math:`v`, a number or a tensor that broadcasts against ``y``
        (:func:`~invdiff.samplers.steps.likelihood.likelihood_variance`).
    :param norm_a: :math:`\\|A\\|^2`. When given (nonlinear operators, or no CG), the
        precision is the scalar :math:`1 / (v + r^2 \\|A\\|^2)`; else CG on
        :math:`v\\,u + r^2 A A^\\top u = r`.
    :param cg_iterations: CG iterations per solve.
    :param cg_tol: CG relative tolerance.
    :param warm_start: start each solve from the previous solution (successive steps of one
        chain); off for batches that change between calls (SMC's particle chunks).
    """

    def __init__(self, physics, noise_var: float | Tensor, norm_a: float | None, cg_iterations: int = 5,
                 cg_tol: float = 1e-3, warm_start: bool = True) -> None:
        self.physics, self.noise_var, self.norm_a = physics, noise_var, norm_a
        self.cg_iterations, self.cg_tol, self.warm_start = int(cg_iterations), float(cg_tol), warm_start
        self._warm: Tensor | None = None

    def precision(self, r2: float) -> Callable[[Tensor], Tensor] | float | Tensor:
        """``r -> (v I + r2 A A^T)^{-1} r`` for denoiser-error variance ``r2`` (a callable),
        or the scalar precision when ``norm_a`` is set."""
        if self.norm_a is not None:
            return 1.0 / (self.noise_var + r2 * self.norm_a)
        physics, nv = self.physics, self.noise_var

        def solve(r: Tensor) -> Tensor:
            def apply(v: Tensor) -> Tensor:
                return nv * v + r2 * physics.A(physics.A_adjoint(v))

            out = conjugate_gradient(apply, r, x0=self._warm if self.warm_start else None,
                                     iterations=self.cg_iterations, tol=self.cg_tol)
            if self.warm_start:
                self._warm = out
            return out

        return solve


def jacobian_norm_squared(fn: Callable[[Tensor], Tensor], z: Tensor, iterations: int = 10) -> float:
    """Largest squared singular value of the Jacobian :math:`J` of ``fn`` at ``z`` (the largest
    over the batch): power iteration on :math:`J^\\top J` with one pass of ``fn``; :math:`Jv`
    is the derivative of the (linear in ``u``) vector-Jacobian product :math:`J^\\top u`."""
    gen = torch.Generator(device=z.device).manual_seed(0)
    v = torch.randn(z.shape, generator=gen, device=z.device, dtype=z.dtype)
    lam = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    with torch.enable_grad():
        zg = z.detach().requires_grad_(True)
        x = fn(zg)
        u = torch.zeros_like(x, requires_grad=True)
        (jt_u,) = torch.autograd.grad(x, zg, u, create_graph=True)
        for _ in range(iterations):
            v = v / v.reshape(z.shape[0], -1).norm(dim=1).clamp_min(1e-30).reshape(-1, *([1] * (z.ndim - 1)))
            (jv,) = torch.autograd.grad(jt_u, u, v, retain_graph=True)
            (v,) = torch.autograd.grad(x, zg, jv, retain_graph=True)
            lam = v.reshape(z.shape[0], -1).norm(dim=1)  # ||J^T J v|| for a unit v
    return max(float(lam.max()), 1e-12)
