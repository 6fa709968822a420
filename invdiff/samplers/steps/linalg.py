"""Linear algebra on operators: CG, CGLS, proximal least squares, projections, norms, starts.

Only ``physics.A`` and ``physics.A_adjoint`` are called; inner products are per batch element
and conjugate, so complex MRI data are handled.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["conjugate_gradient", "cgls", "proximal_least_squares", "project_measurements", "operator_norm_squared",
           "initial_estimate"]


def row_sums(t: Tensor) -> Tensor:
    """The sum of each batch element of ``t``, shape ``(B,)``, each summed alone as a
    contiguous vector: torch's summation order depends on the memory layout (a strided row of
    a transposed operator output, a ``(B, N)`` reduction) and CG on an ill-conditioned
    operator (sparse-view CT) amplifies that last-bit difference, so that an element's CG
    would otherwise depend on the rest of its batch."""
    return torch.stack([row.contiguous().sum() for row in t.reshape(t.shape[0], -1)])


def conjugate_gradient(
    apply: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None = None, iterations: int = 10, tol: float = 1e-5
) -> Tensor:
    """Solve ``apply(x) = b`` for a symmetric positive-definite ``apply``, batch-wise.

    Inner products are per batch element and conjugate (``Re <a, b>`` over real views of
    complex data), so complex MRI data is handled. An element stops (its iterate frozen) as
    soon as its relative residual is below ``tol``, and the loop when every element has: each
    element's result is the one it gets alone, whatever else is in the batch.
    """
    def dot(a, c):
        return row_sums((a.conj() * c).real).reshape(-1, *([1] * (a.ndim - 1)))

    if not torch.isfinite(b).all():  # let the caller's divergence check see it
        return torch.full_like(b, float("nan"))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - apply(x) if x0 is not None else b.clone()
    p = r.clone()
    rs = dot(r, r)
    b2 = dot(b, b).clamp_min(torch.finfo(b.real.dtype).tiny)
    tiny = torch.finfo(b.real.dtype).tiny
    for _ in range(iterations):
        active = rs > tol**2 * b2
        if not active.any():
            break
        ap = apply(p)
        alpha = rs / dot(p, ap).clamp_min(tiny)
        if active.all():
            x = x + alpha * p
            r = r - alpha * ap
            rs_new = dot(r, r)
            p = r + (rs_new / rs.clamp_min(tiny)) * p
            rs = rs_new
            continue
        # converged elements keep their iterate (what they return alone), the others go on
        x = torch.where(active, x + alpha * p, x)
        r = torch.where(active, r - alpha * ap, r)
        rs_new = dot(r, r)
        p = torch.where(active, r + (rs_new / rs.clamp_min(tiny)) * p, p)
        rs = torch.where(active, rs_new, rs)
    return x


def cgls(
    physics, y: Tensor, x0: Tensor, iterations: int, stop_residual: Tensor | float = 0.0, tol: float = 1e-6
) -> tuple[Tensor, Tensor]:
    """Least squares :math:`\\min_x \\|y - A x\\|^2` by CGLS from ``x0``, stopped early per batch element.

    Conjugate gradients on the normal equations :math:`A^\\top A x = A^\\top y` written on the
    residual (CGLS, Björck 1996, Alg. 7.4.1), started at ``x0``: the iterates stay in
    :math:`x_0 + \\operatorname{range}(A^\\top)`, so run to convergence it returns the
    least-squares solution closest to ``x0`` (the limit of gradient descent from ``x0``).
    An element stops as soon as :math:`\\|y - A x\\|^2 \\le` ``stop_residual`` (a number or one
    value per batch element; the discrepancy principle when it is the expected noise energy,
    Morozov 1966), when its normal-equation residual fell by ``tol``, or after ``iterations``.
    One ``A`` and one ``A_adjoint`` per iteration; complex data are handled (conjugate inner
    products). Returns ``(x, ||y - A x||^2)`` (the latter per element, shape ``(B,)``).
    """
    def dot(a: Tensor, c: Tensor) -> Tensor:
        return row_sums((a.conj() * c).real)

    def col(v: Tensor, like: Tensor) -> Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    x = x0.clone()
    r = y - physics.A(x)
    s = physics.A_adjoint(r).to(x.dtype)
    p = s.clone()
    gamma = dot(s, s)
    gamma0 = gamma.clamp_min(torch.finfo(gamma.dtype).tiny)
    res = dot(r, r)
    limit = torch.as_tensor(stop_residual, dtype=res.dtype, device=res.device).reshape(-1)
    tiny = torch.finfo(res.dtype).tiny
    for _ in range(iterations):
        active = (res > limit) & (gamma > tol**2 * gamma0)
        if not active.any():
            break
        q = physics.A(p)
        alpha = torch.where(active, gamma / dot(q, q).clamp_min(tiny), torch.zeros_like(gamma))
        x = x + col(alpha, x) * p
        r = r - col(alpha, r).to(r.dtype) * q
        s = physics.A_adjoint(r).to(x.dtype)
        gamma_new = dot(s, s)
        beta = torch.where(active, gamma_new / gamma.clamp_min(tiny), torch.zeros_like(gamma))
        p = torch.where(col(active, p), s + col(beta, p) * p, p)
        gamma = torch.where(active, gamma_new, gamma)
        res = dot(r, r)
    return x, res


def proximal_least_squares(
    physics, z: Tensor, y: Tensor, gamma: float | None, iterations: int, tol: float = 1e-6
) -> Tensor:
    """A few warm-started CG steps on the proximal least-squares problem around ``z``.

    .. math::

        \\gamma < \\infty:\\quad (I + \\gamma A^\\top A)\\, x = z + \\gamma A^\\top y, \\qquad
        \\gamma = \\infty \\;(\\text{``None``}):\\quad A^\\top A\\, x = A^\\top y,

    both started from :math:`x = z`, so that few iterations stay close to ``z`` (the
    Krylov subspace acts as the regulariser, DDS Sec. 3.2). Only ``A`` and ``A_adjoint``
    are called (one each per iteration); a non-finite right-hand side gives NaN (so the
    sampler's divergence check names the step); complex data are handled by
    :func:`conjugate_gradient`. Used by DDS and DiffPIR.
    """
    if gamma is None:
        def apply(v: Tensor) -> Tensor:
            return physics.A_adjoint(physics.A(v))

        rhs = physics.A_adjoint(y)
    else:
        def apply(v: Tensor) -> Tensor:
            return v + gamma * physics.A_adjoint(physics.A(v))

        rhs = z + gamma * physics.A_adjoint(y)
    return conjugate_gradient(apply, rhs.to(z.dtype), x0=z, iterations=iterations, tol=tol)


def project_measurements(
    physics, x: Tensor, y: Tensor, weight: float | Tensor | None, iterations: int, tol: float = 1e-4
) -> Tensor:
    """Move ``x`` onto (or towards) the measurement-consistent set ``{A x = y}`` with CG.

    .. math::

        \\text{weight } W = \\text{None}:\\quad x + A^{+}(y - A x), \\qquad
        W:\\quad x + (I + A^\\top W A)^{-1} A^\\top W (y - A x)
              = x + A^\\top (A A^\\top + W^{-1})^{-1} (y - A x).

    ``None`` is the orthogonal, minimum-norm projection for any linear ``A`` (onto the
    least-squares solutions when ``{Ax = y}`` is empty): CG on the normal equations
    :math:`A^\\top A\\,\\delta = A^\\top (y - Ax)` from :math:`\\delta = 0` stays in the range
    of :math:`A^\\top` and converges to :math:`A^{+}(y - Ax)`. A weight (a number or a
    tensor shaped like ``y``, e.g. ``sigma^2 / noise variance``) gives the Tikhonov /
    Kalman-relaxed projection. Only ``A`` and ``A_adjoint`` are called (one each per
    iteration); complex data are handled by :func:`conjugate_gradient`; the CG stops at
    relative residual ``tol`` or after ``iterations`` (fewer iterations = a projection
    restricted to a Krylov subspace, i.e. regularised).
    """
    r = y - physics.A(x)
    if weight is None:
        def apply(v: Tensor) -> Tensor:
            return physics.A_adjoint(physics.A(v))

        rhs = physics.A_adjoint(r)
    else:
        def apply(v: Tensor) -> Tensor:
            return v + physics.A_adjoint(weight * physics.A(v))

        rhs = physics.A_adjoint(weight * r)
    return x + conjugate_gradient(apply, rhs.to(x.dtype), iterations=iterations, tol=tol)


def operator_norm_squared(physics, image_shape: Sequence[int], device=None, dtype=torch.float32,
                          iterations: int = 30, generator: torch.Generator | None = None) -> float:
    """Largest eigenvalue of ``A^T A`` by power iteration (with ``A_vjp`` / adjoint).

    For a nonlinear operator, the Jacobian at the origin is not meaningful, so 1 is
    returned (the scale of an orthonormal transform); pass your own value where it matters.
    """
    from deepinv.physics import LinearPhysics

    if not isinstance(physics, LinearPhysics):
        return 1.0
    gen = generator if generator is not None else torch.Generator(device=device or "cpu").manual_seed(0)
    x = torch.randn(1, *image_shape, generator=gen, device=device, dtype=dtype)
    x = x / x.norm()
    lam = 0.0
    for _ in range(iterations):
        z = physics.A_adjoint(physics.A(x))
        new = float((z * x).sum())
        x = z / z.norm().clamp_min(1e-30)
        if abs(new - lam) <= 1e-4 * abs(new):
            lam = new
            break
        lam = new
    return max(lam, 1e-12)


def initial_estimate(physics, y: Tensor, shape: Sequence[int], prior_mean: Callable[[], Tensor],
                     data_range: tuple[float, float] = (0.0, 1.0), iterations: int = 10) -> tuple[Tensor, str]:
    """A starting image that is safe for every operator, and what it was:

    1. ``"A_dagger"``: ``physics.A_dagger(y)`` when it is in range, i.e. its energy outside
       ``data_range`` is below a quarter of its energy inside (invdiff's FBP, zero-filling,
       Wiener; deepinv's exact ``BlurFFT`` pseudo-inverse of noisy data, values of
       :math:`\\pm 10^3`, is not);
    2. ``"cg"``: for a linear operator, ``iterations`` CG steps on the normal equations
       :math:`A^\\top A x = A^\\top y` from the prior mean (regularised by early stopping,
       :func:`proximal_least_squares`);
    3. ``"prior"``: the prior mean ``prior_mean()`` (a nonlinear operator whose ``A_dagger``
       fails or is out of range).

    The estimate is clamped to ``data_range``. The choice is made per batch element (an
    element's start does not depend on the others); the second value names it, or lists the
    choices in batch order when they differ.
    """
    from deepinv.physics import LinearPhysics

    lo, hi = data_range

    def in_range(a: Tensor) -> Tensor:  # (B,) bools
        inside = a.clamp(lo, hi)
        excess = (a - inside).reshape(a.shape[0], -1).norm(dim=1)
        finite = torch.isfinite(a).reshape(a.shape[0], -1).all(1)
        return finite & (excess <= 0.25 * inside.reshape(a.shape[0], -1).norm(dim=1))

    def col(v: Tensor, like: Tensor) -> Tensor:
        return v.reshape(-1, *([1] * (like.ndim - 1)))

    try:
        start = physics.A_dagger(y).real.reshape(shape)
    except Exception:  # a nonlinear deepinv physics without a pseudo-inverse of its own
        start = None
    batch = int(shape[0])
    kinds = ["prior"] * batch
    ok = in_range(start) if start is not None else torch.zeros(batch, dtype=torch.bool, device=y.device)
    if bool(ok.all()):
        return start.clamp(lo, hi), "A_dagger"
    mean = prior_mean().reshape(shape)
    out = mean
    if isinstance(physics, LinearPhysics):
        cg = proximal_least_squares(physics, mean.to(y.real.dtype), y, None, iterations)
        finite = torch.isfinite(cg).reshape(batch, -1).all(1)
        out = torch.where(col(finite, cg), cg, mean.to(cg.dtype))
        kinds = ["cg" if bool(f) else "prior" for f in finite]
    if start is not None:
        out = torch.where(col(ok, out), start.to(out.dtype), out)
        kinds = ["A_dagger" if bool(o) else k for o, k in zip(ok, kinds)]
    kind = kinds[0] if len(set(kinds)) == 1 else ",".join(kinds)
    return out.clamp(lo, hi), kind
