"""Analytic priors with exact answers: Gaussian and Gaussian-mixture image priors.

For these priors the denoiser is known in closed form at every noise level, and so is the
posterior of a linear measurement ``y = A x0 + e``, ``e ~ N(0, s^2 I)``. They are the
yardstick of every sampler in invdiff: a sampler's output is compared with the exact
posterior mean and covariance instead of "it runs".

Gaussian component :math:`\\mathcal N(\\mu, \\Sigma)` with :math:`\\Sigma = U \\Lambda U^\\top`:

.. math::

    D(x, \\sigma) = \\mu + \\Sigma (\\Sigma + \\sigma^2 I)^{-1} (x - \\mu)
                 = \\mu + U \\operatorname{diag}\\Big(\\frac{\\lambda_j}{\\lambda_j + \\sigma^2}\\Big) U^\\top (x - \\mu).

Mixture :math:`\\sum_k \\pi_k \\mathcal N(\\mu_k, \\Sigma_k)`: the denoiser is the
responsibility-weighted sum of the component denoisers, with responsibilities
:math:`w_k(x) \\propto \\pi_k \\mathcal N(x; \\mu_k, \\Sigma_k + \\sigma^2 I)`.

Posterior of :math:`y = A x_0 + e`: each component becomes

.. math::

    m_k = \\mu_k + \\Sigma_k A^\\top (A \\Sigma_k A^\\top + s^2 I)^{-1} (y - A\\mu_k), \\qquad
    C_k = \\Sigma_k - \\Sigma_k A^\\top (A \\Sigma_k A^\\top + s^2 I)^{-1} A \\Sigma_k,

with weights :math:`\\propto \\pi_k \\mathcal N(y; A\\mu_k, A\\Sigma_k A^\\top + s^2 I)`.
Everything is computed in float64 with dense matrices, so keep ``C*H*W`` to a few thousand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from .base import DiffusionPrior

__all__ = [
    "GaussianMixturePrior",
    "GaussianPrior",
    "GaussianMixturePosterior",
    "operator_matrix",
    "stationary_covariance",
]


def operator_matrix(physics, image_shape: Sequence[int], dtype=torch.float64, chunk: int = 1024) -> Tensor:
    """Dense matrix of a linear ``physics.A`` acting on images of ``image_shape``.

    Columns are ``A`` applied to the standard basis (in chunks of ``chunk`` images), so the
    result has shape ``(m, d)`` with ``d = prod(image_shape)`` and ``m`` the number of
    (real) measurement entries. Only for small problems. An operator that cannot take
    ``dtype`` inputs (float32 parameters) is applied in float32.
    """
    d = math.prod(image_shape)
    cols = []
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        basis = torch.zeros(stop - start, d, dtype=dtype)
        basis[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
        images = basis.reshape(stop - start, *image_shape)
        try:
            out = physics.A(images)
        except RuntimeError:  # an operator with float32 parameters (deepinv's Blur, Tomography, ...)
            out = physics.A(images.float())
        cols.append(out.reshape(stop - start, -1).to(dtype))
    return torch.cat(cols).T.contiguous()


def stationary_covariance(
    image_shape: Sequence[int], length_scale: float, variance: float = 0.05, jitter: float = 1e-4
) -> Tensor:
    """Squared-exponential covariance on the pixel grid (channels independent).

    .. math:: k(p, q) = v \\exp\\big(-\\|p - q\\|^2 / (2 \\ell^2)\\big) + \\text{jitter}\\,\\delta_{pq}
    """
    c, h, w = image_shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    pts = torch.stack([yy.flatten(), xx.flatten()], 1)
    k = variance * torch.exp(-torch.cdist(pts, pts) ** 2 / (2 * length_scale**2))
    k = k + jitter * torch.eye(h * w, dtype=torch.float64)
    return torch.block_diag(*([k] * c))


@dataclass
class GaussianMixturePosterior:
    """Exact posterior ``sum_k w_k N(m_k, C_k)`` of a Gaussian-mixture prior (one per measurement).

    :ivar weights: ``(B, K)`` posterior component weights.
    :ivar means: ``(B, K, d)`` component means.
    :ivar covariances: ``(K, d, d)`` component covariances (they do not depend on ``y``).
    :ivar image_shape: ``(C, H, W)``.
    """

    weights: Tensor
    means: Tensor
    covariances: Tensor
    image_shape: tuple

    @property
    def mean(self) -> Tensor:
        """Posterior mean ``(B, C, H, W)``."""
        m = torch.einsum("bk,bkd->bd", self.weights, self.means)
        return m.reshape(-1, *self.image_shape)

    @property
    def covariance(self) -> Tensor:
        """Posterior covariance ``(B, d, d)`` (law of total covariance)."""
        m = torch.einsum("bk,bkd->bd", self.weights, self.means)
        within = torch.einsum("bk,kde->bde", self.weights, self.covariances)
        dev = self.means - m[:, None]
        between = torch.einsum("bk,bkd,bke->bde", self.weights, dev, dev)
        return within + between

    @property
    def std(self) -> Tensor:
        """Per-pixel posterior standard deviation ``(B, C, H, W)``."""
        return torch.diagonal(self.covariance, dim1=1, dim2=2).clamp_min(0).sqrt().reshape(-1, *self.image_shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact posterior samples per measurement, shape ``(n, B, C, H, W)``."""
        b, k, d = self.means.shape
        chol = torch.linalg.cholesky(self.covariances + 1e-12 * torch.eye(d, dtype=self.covariances.dtype))
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)  # (B, n)
        z = torch.randn(b, n, d, generator=generator, dtype=self.means.dtype)
        mean = torch.gather(self.means, 1, comp[..., None].expand(b, n, d))
        out = mean + torch.einsum("bnde,bne->bnd", chol[comp], z)
        return out.transpose(0, 1).reshape(n, b, *self.image_shape)


class GaussianMixturePrior(DiffusionPrior):
    """Gaussian-mixture image prior with a closed-form denoiser and posterior.

    :param weights: ``(K,)`` mixture weights (normalised here).
    :param means: ``(K, C, H, W)`` component means.
    :param covariances: ``(K, d, d)`` covariances with ``d = C*H*W``; a ``(K,)`` tensor of
        variances gives isotropic components.

    The denoiser and the posterior are exact (see the module docstring). The state is kept
    in float64; outputs follow the input dtype.

    Example::

        >>> import torch
        >>> from invdiff.priors import GaussianMixturePrior
        >>> prior = GaussianMixturePrior(torch.tensor([0.5, 0.5]), torch.stack([torch.full((1, 4, 4), 0.3),
        ...     torch.full((1, 4, 4), 0.7)]), torch.tensor([0.01, 0.01]))
        >>> prior.denoise(torch.full((1, 1, 4, 4), 0.7), 0.1).mean().item() > 0.65
        True
    """

    def __init__(
        self,
        weights: Tensor,
        means: Tensor,
        covariances: Tensor,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 4:
            raise ValueError(f"means must be (K, C, H, W), got {tuple(means.shape)}")
        k, d = means.shape[0], math.prod(means.shape[1:])
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.shape[0] != k or (weights < 0).any() or weights.sum() <= 0:
            raise ValueError(f"weights must be {k} non-negative numbers with a positive sum")
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if covariances.ndim == 1:
            covariances = covariances[:, None, None] * torch.eye(d, dtype=torch.float64)
        if covariances.shape != (k, d, d):
            raise ValueError(f"covariances must be ({k}, {d}, {d}) or ({k},), got {tuple(covariances.shape)}")
        covariances = 0.5 * (covariances + covariances.transpose(1, 2))
        evals, evecs = torch.linalg.eigh(covariances)
        if (evals < -1e-10 * evals.abs().max()).any():
            raise ValueError("covariances must be positive semi-definite")
        data_var = float((torch.einsum("k,kii->", weights / weights.sum(), covariances) / d).item())
        super().__init__(means.shape[1:], sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=math.sqrt(data_var))
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means.reshape(k, d))
        self.register_buffer("covariances", covariances)
        self.register_buffer("eigenvalues", evals.clamp_min(0))
        self.register_buffer("eigenvectors", evecs)

    @property
    def n_components(self) -> int:
        return self.weights.shape[0]

    def _denoise(self, x: Tensor, sigma: Tensor) -> Tensor:
        b = x.shape[0]
        xf = x.reshape(b, -1).to(torch.float64)
        s2 = sigma.reshape(b, 1, 1).to(torch.float64) ** 2  # (B,1,1)
        z = torch.einsum("bd,kde->bke", xf, self.eigenvectors) - torch.einsum(
            "kd,kde->ke", self.means, self.eigenvectors
        )  # coordinates of x - mu_k in each component's eigenbasis, (B, K, d)
        lam = self.eigenvalues[None]  # (1, K, d)
        comp = self.means[None] + torch.einsum("bke,kde->bkd", z * lam / (lam + s2), self.eigenvectors)
        if self.n_components == 1:
            out = comp[:, 0]
        else:
            loglik = -0.5 * ((z**2) / (lam + s2) + torch.log(lam + s2)).sum(-1)  # (B, K)
            resp = torch.softmax(loglik + torch.log(self.weights)[None], dim=1)
            out = torch.einsum("bk,bkd->bd", resp, comp)
        return out.to(x.dtype).reshape(x.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` exact prior samples, shape ``(n, C, H, W)``."""
        d = self.means.shape[1]
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, d, generator=generator, dtype=torch.float64)
        scale = self.eigenvectors[comp] * self.eigenvalues[comp].sqrt()[:, None, :]
        x = self.means[comp] + torch.einsum("nde,ne->nd", scale, z)
        return x.reshape(n, *self.image_shape)

    def posterior(self, y: Tensor, physics, noise_sigma: float) -> GaussianMixturePosterior:
        """Exact posterior of ``y = physics.A(x0) + noise_sigma * e`` for a linear ``physics``.

        :param y: measurements ``(B, ...)``.
        :param physics: a linear operator (``physics.A`` is applied to basis images).
        :param noise_sigma: standard deviation of the Gaussian measurement noise (> 0).
        """
        if noise_sigma <= 0:
            raise ValueError("noise_sigma must be > 0 for the closed-form posterior")
        a = operator_matrix(physics, self.image_shape)  # (m, d)
        yf = y.reshape(y.shape[0], -1).to(torch.float64)
        if yf.shape[1] != a.shape[0]:
            raise ValueError(f"y has {yf.shape[1]} entries per image, the operator gives {a.shape[0]}")
        m = a.shape[0]
        eye = torch.eye(m, dtype=torch.float64)
        means, covs, logw = [], [], []
        for k in range(self.n_components):
            cov = self.covariances[k]
            s = a @ cov @ a.T + noise_sigma**2 * eye  # (m, m)
            chol = torch.linalg.cholesky(0.5 * (s + s.T))
            gain = torch.cholesky_solve(a @ cov, chol).T  # Sigma A^T S^{-1}, (d, m)
            resid = yf - (a @ self.means[k])[None]  # (B, m)
            means.append(self.means[k][None] + resid @ gain.T)
            covs.append(cov - gain @ a @ cov)
            alpha = torch.cholesky_solve(resid.T, chol)  # (m, B)
            logdet = 2 * torch.log(torch.diagonal(chol)).sum()
            logw.append(math.log(self.weights[k]) - 0.5 * ((resid.T * alpha).sum(0) + logdet))
        weights = torch.softmax(torch.stack(logw, 1), dim=1)
        covs_t = torch.stack(covs)
        covs_t = 0.5 * (covs_t + covs_t.transpose(1, 2))
        return GaussianMixturePosterior(weights, torch.stack(means, 1), covs_t, self.image_shape)


class GaussianPrior(GaussianMixturePrior):
    """Gaussian image prior ``N(mean, covariance)``: the one-component mixture.

    :param mean: ``(C, H, W)`` mean image (or a number, with ``image_shape`` given).
    :param covariance: ``(d, d)`` covariance, or a number for ``variance * I``.

    Example::

        >>> from invdiff.priors import GaussianPrior
        >>> prior = GaussianPrior.stationary((1, 8, 8), length_scale=2.0, variance=0.05, mean=0.5)
        >>> prior.sample(3).shape
        torch.Size([3, 1, 8, 8])
    """

    def __init__(
        self,
        mean: Tensor | float,
        covariance: Tensor | float,
        image_shape: Sequence[int] | None = None,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        mean = torch.as_tensor(mean, dtype=torch.float64)
        if mean.ndim == 0:
            if image_shape is None:
                raise ValueError("give image_shape when mean is a number")
            mean = mean * torch.ones(tuple(image_shape), dtype=torch.float64)
        covariance = torch.as_tensor(covariance, dtype=torch.float64)
        cov = covariance.reshape(1) if covariance.ndim == 0 else covariance[None]
        super().__init__(torch.ones(1), mean[None], cov, sigma_min=sigma_min, sigma_max=sigma_max)

    @classmethod
    def stationary(
        cls,
        image_shape: Sequence[int],
        length_scale: float = 2.0,
        variance: float = 0.05,
        mean: float = 0.5,
        **kwargs,
    ) -> "GaussianPrior":
        """Smooth stationary Gaussian prior (squared-exponential kernel, see :func:`stationary_covariance`)."""
        cov = stationary_covariance(image_shape, length_scale, variance)
        return cls(mean, cov, image_shape=image_shape, **kwargs)
