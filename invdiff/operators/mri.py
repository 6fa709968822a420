r"""Accelerated Cartesian MRI: single-coil and multi-coil, real or complex images.

Both classes subclass deepinv's :class:`~deepinv.physics.MRI` and
:class:`~deepinv.physics.MultiCoilMRI` (centred, orthonormal 2D FFT; k-space as
2 real channels) and add

* **real-valued images** (``img_size[0] == 1``, a magnitude prior): ``A`` embeds
  :math:`x \mapsto x + 0i`, ``A_adjoint`` takes the real part of the complex adjoint.
  This is the exact adjoint of the *real*-linear map :math:`\mathbb{R}^{HW} \to \mathbb{C}^{M}`
  with the real inner product :math:`\langle u, v\rangle = \mathrm{Re}\sum \bar u v`.
  With ``img_size[0] == 2`` images are complex (real/imaginary channels), as in deepinv.
* a closed-form ``A_dagger``: zero-filled inverse FFT (single coil) or the adjoint
  coil combination :math:`\sum_c \bar S_c F^{-1} M y_c` (multi coil), whose coil maps
  satisfy :math:`\sum_c |S_c|^2 = 1`; both are exact inverses for a full mask.
  For real images the real part is returned.

Masks come from :class:`deepinv.physics.generator.RandomMaskGenerator` (fastMRI-style:
fully sampled centre, remaining columns uniformly at random) or
:class:`~deepinv.physics.generator.EquispacedMaskGenerator`, seeded; lines are columns
(phase encoding along the width).
"""

from __future__ import annotations


import numpy as np
import torch
from deepinv.physics import MRI, LinearPhysics, MultiCoilMRI
from deepinv.physics.generator import EquispacedMaskGenerator, RandomMaskGenerator
from torch import Tensor

__all__ = ["SingleCoilMRI", "MultiCoilMRIOperator", "cartesian_mask", "birdcage_coil_maps", "normalize_coil_maps"]


def cartesian_mask(
    H: int,
    W: int,
    acceleration: float,
    center_fraction: float | None = None,
    mask_type: str = "random",
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Column (phase-encode) undersampling mask of shape ``(H, W)`` with values in {0, 1}.

    ``center_fraction`` of the columns around the centre (k-space is centred, column
    ``W // 2`` is DC) are always sampled; ``W // acceleration - n_center`` further columns
    are drawn (``"random"``: uniformly without replacement, ``"equispaced"``: equal spacing
    with a random offset), so ``W / n_sampled ≈ acceleration``. Default
    ``center_fraction`` follows fastMRI: 0.08 below 8×, 0.04 from 8× up.
    ``acceleration == 1`` gives a full mask.
    """
    if acceleration < 1:
        raise ValueError(f"cartesian_mask: acceleration must be >= 1, got {acceleration}")
    if center_fraction is None:
        center_fraction = 0.08 if acceleration < 8 else 0.04
    if not 0 <= center_fraction <= 1:
        raise ValueError(f"cartesian_mask: center_fraction must be in [0, 1], got {center_fraction}")
    n_center = int(center_fraction * W)
    if W // acceleration - n_center < 0 and acceleration > 1:
        raise ValueError(
            f"cartesian_mask: center_fraction {center_fraction} samples {n_center} of {W} columns, "
            f"more than the {W // acceleration} allowed at {acceleration}x"
        )
    if acceleration == 1:
        return torch.ones(H, W)
    kinds = {"random": RandomMaskGenerator, "equispaced": EquispacedMaskGenerator}
    if mask_type not in kinds:
        raise ValueError(f"cartesian_mask: mask_type must be one of {sorted(kinds)}, got {mask_type!r}")
    gen = kinds[mask_type]((H, W), acceleration=acceleration, center_fraction=center_fraction, rng=generator)
    return gen.step(batch_size=0)["mask"].reshape(-1, H, W)[0].float()


def birdcage_coil_maps(n_coils: int, H: int, W: int, radius: float = 1.5) -> Tensor:
    r"""Simulated birdcage coil sensitivities, ``(n_coils, H, W)`` complex64.

    The formula of ``sigpy.mri.birdcage_maps`` (which deepinv's ``MultiCoilMRI(coil_maps=int)``
    calls, but needs ``sigpy``): coil :math:`c` sits at angle :math:`2\pi c / N` on a circle
    of radius ``radius`` (in units of the half image size),
    :math:`S_c(\mathbf{r}) = e^{i\phi_c(\mathbf{r})}/\lVert\mathbf{r}-\mathbf{r}_c\rVert`,
    then normalised so :math:`\sum_c |S_c|^2 = 1` at every pixel. Deterministic.
    """
    c, y, x = np.mgrid[:n_coils, :H, :W].astype(np.float64)
    coil_x = radius * np.cos(c * (2 * np.pi / n_coils))
    coil_y = radius * np.sin(c * (2 * np.pi / n_coils))
    coil_phase = -c * (2 * np.pi / n_coils)
    x_co = (x - W / 2.0) / (W / 2.0) - coil_x
    y_co = (y - H / 2.0) / (H / 2.0) - coil_y
    rr = np.sqrt(x_co**2 + y_co**2)
    phi = np.arctan2(x_co, -y_co) + coil_phase
    maps = np.exp(1j * phi) / rr
    return normalize_coil_maps(torch.from_numpy(maps).to(torch.complex64))


def normalize_coil_maps(coil_maps: Tensor, threshold: float = 1e-8) -> Tensor:
    r"""Scale coil maps ``(N, H, W)`` so :math:`\sum_c |S_c|^2 = 1` wherever it is above
    ``threshold`` (inside the object); elsewhere maps are left at 0."""
    rss = coil_maps.abs().square().sum(0, keepdim=True).sqrt()
    return torch.where(rss > threshold, coil_maps / rss.clamp_min(threshold), torch.zeros_like(coil_maps))


class _RealEmbedding:
    """Mixin: optional real-valued images (1 channel) embedded into complex ones."""

    real_input: bool

    def _embed(self, x: Tensor) -> Tensor:
        if self.real_input:
            if x.shape[1] != 1:
                raise ValueError(f"{type(self).__name__}: real images must have 1 channel, got {x.shape[1]}")
            return torch.cat([x, torch.zeros_like(x)], dim=1)
        return x

    def _restrict(self, x: Tensor) -> Tensor:
        return x[:, :1] if self.real_input else x


class SingleCoilMRI(_RealEmbedding, MRI):
    r"""Single-coil Cartesian MRI :math:`y = M F x` (centred orthonormal FFT :math:`F`).

    .. math::

        A x = M F \iota(x), \qquad A^\top y = \rho(F^{-1} M y), \qquad
        A^\dagger y = \rho(F^{-1} M y),

    where :math:`\iota` is the identity for complex images (2 channels) or
    :math:`x \mapsto x + 0i` for real ones (1 channel) and :math:`\rho` is respectively the
    identity or the real part. Measurements are ``(B, 2, H, W)``; unsampled entries are 0
    (noise is added only on sampled entries, as in deepinv).

    :param torch.Tensor mask: ``(H, W)`` binary mask (see :func:`cartesian_mask`).
    :param tuple img_size: ``(1, H, W)`` (real) or ``(2, H, W)`` (complex).

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators import SingleCoilMRI, cartesian_mask
        >>> mask = cartesian_mask(32, 32, 4, generator=torch.Generator().manual_seed(0))
        >>> physics = SingleCoilMRI(mask, img_size=(1, 32, 32))
        >>> x = torch.rand(1, 1, 32, 32)
        >>> physics.A(x).shape
        torch.Size([1, 2, 32, 32])
        >>> full = SingleCoilMRI(torch.ones(32, 32), img_size=(1, 32, 32))
        >>> torch.allclose(full.A_dagger(full.A(x)), x, atol=1e-5)
        True
    """

    def __init__(self, mask: Tensor, img_size: tuple[int, int, int], **kwargs):
        img_size = tuple(int(s) for s in img_size)
        if img_size[0] not in (1, 2):
            raise ValueError(f"SingleCoilMRI: img_size[0] must be 1 (real) or 2 (complex), got {img_size}")
        if tuple(mask.shape[-2:]) != img_size[1:]:
            raise ValueError(f"SingleCoilMRI: mask shape {tuple(mask.shape)} does not match image {img_size[1:]}")
        super().__init__(mask=mask, img_size=img_size, **kwargs)
        self.real_input = img_size[0] == 1
        self.img_size = img_size

    def A(self, x: Tensor, mask: Tensor | None = None, **kwargs) -> Tensor:
        return super().A(self._embed(x), mask=mask, **kwargs)

    def A_adjoint(self, y: Tensor, mask: Tensor | None = None, **kwargs) -> Tensor:
        return self._restrict(super().A_adjoint(y, mask=mask, **kwargs))

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    def A_dagger(self, y: Tensor, mask: Tensor | None = None, **kwargs) -> Tensor:
        """Zero-filled inverse FFT (real part for real images); closed form."""
        return self._restrict(super().A_dagger(y, mask=mask, **kwargs))

    def A_adjoint_A(self, x: Tensor, **kwargs) -> Tensor:
        if self.real_input:
            return self.A_adjoint(self.A(x))
        return super().A_adjoint_A(x, **kwargs)

    def A_A_adjoint(self, y: Tensor, **kwargs) -> Tensor:
        if self.real_input:
            return self.A(self.A_adjoint(y))
        return super().A_A_adjoint(y, **kwargs)

    def prox_l2(self, z: Tensor, y: Tensor, gamma: float, **kwargs) -> Tensor:
        if self.real_input:  # A^T A is not diagonal in Fourier for the real embedding: use CG
            return LinearPhysics.prox_l2(self, z, y, gamma, **kwargs)
        return super().prox_l2(z, y, gamma, **kwargs)


class MultiCoilMRIOperator(_RealEmbedding, MultiCoilMRI):
    r"""Multi-coil Cartesian MRI :math:`y_c = M F S_c x`, :math:`c = 1..N`.

    .. math::

        A^\top y = \rho\Big(\sum_c \overline{S_c}\, F^{-1} M y_c\Big) = A^\dagger y

    (adjoint coil combination; exact inverse for a full mask because
    :math:`\sum_c |S_c|^2 = 1`). :math:`\iota, \rho` as in :class:`SingleCoilMRI`.
    Measurements are ``(B, 2, N, H, W)``.

    :param torch.Tensor mask: ``(H, W)`` binary mask.
    :param torch.Tensor coil_maps: complex ``(N, H, W)`` sensitivities.
    :param tuple img_size: ``(1, H, W)`` (real) or ``(2, H, W)`` (complex).

    |sep|

    :Examples:

        >>> import torch
        >>> from invdiff.operators import MultiCoilMRIOperator, birdcage_coil_maps
        >>> physics = MultiCoilMRIOperator(torch.ones(32, 32), birdcage_coil_maps(4, 32, 32), img_size=(1, 32, 32))
        >>> x = torch.rand(1, 1, 32, 32)
        >>> physics.A(x).shape
        torch.Size([1, 2, 4, 32, 32])
        >>> torch.allclose(physics.A_dagger(physics.A(x)), x, atol=1e-5)
        True
    """

    def __init__(self, mask: Tensor, coil_maps: Tensor, img_size: tuple[int, int, int], **kwargs):
        img_size = tuple(int(s) for s in img_size)
        if img_size[0] not in (1, 2):
            raise ValueError(f"MultiCoilMRIOperator: img_size[0] must be 1 (real) or 2 (complex), got {img_size}")
        if tuple(coil_maps.shape[-2:]) != img_size[1:] or tuple(mask.shape[-2:]) != img_size[1:]:
            raise ValueError(
                f"MultiCoilMRIOperator: mask {tuple(mask.shape)} / coil_maps {tuple(coil_maps.shape)} "
                f"do not match image {img_size[1:]}"
            )
        super().__init__(mask=mask, coil_maps=coil_maps, img_size=img_size, **kwargs)
        self.real_input = img_size[0] == 1
        self.img_size = img_size

    @property
    def n_coils(self) -> int:
        return int(self.coil_maps.shape[1])

    def A(self, x: Tensor, mask: Tensor | None = None, coil_maps: Tensor | None = None, **kwargs) -> Tensor:
        return super().A(self._embed(x), mask=mask, coil_maps=coil_maps, **kwargs)

    def A_adjoint(self, y: Tensor, mask: Tensor | None = None, coil_maps: Tensor | None = None, **kwargs) -> Tensor:
        return self._restrict(super().A_adjoint(y, mask=mask, coil_maps=coil_maps, **kwargs))

    def A_vjp(self, x: Tensor, v: Tensor) -> Tensor:
        return self.A_adjoint(v)

    def A_dagger(self, y: Tensor, mask: Tensor | None = None, coil_maps: Tensor | None = None, **kwargs) -> Tensor:
        """Adjoint coil combination of the zero-filled k-space; closed form."""
        return self.A_adjoint(y, mask=mask, coil_maps=coil_maps)

    def update_parameters(self, *args, **kwargs):
        super().update_parameters(*args, **kwargs)
        if hasattr(self, "real_input"):  # deepinv resets img_size to the mask's (2, H, W)
            self.img_size = ((1,) if self.real_input else (2,)) + tuple(self.mask.shape[-2:])
