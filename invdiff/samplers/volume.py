r"""Volume samplers: 3D reconstruction ``(B, C, D, H, W)`` from 2D diffusion priors.

A 2D prior sees a volume as a batch of slices (:func:`invdiff.operators.volume.to_slices`):
each diffusion step denoises every slice in as few network calls as the batch budget
``slices_per_call`` allows (one call for the whole volume by default), and the slices are
coupled along z by the data step:

* :class:`DDS3D` — DDS-3D (Chung, Lee & Ye, ICLR 2024, official ``solver_3d.py``): Tweedie
  estimate of every slice, one ADMM iteration of the TV-z regularised data problem (a few
  CG iterations), DDIM re-noising;
* :class:`TPDM` — perpendicular 2D priors (Lee, Chung, Ye et al., "Improving 3D imaging
  with pre-trained perpendicular 2D diffusion models", ICCV 2023): the primary prior on
  axial slices and an auxiliary prior on coronal (or sagittal) slices, used in alternation;
* :class:`DiffusionMBIR` — DiffusionMBIR (Chung, Kim, Kim & Ye, CVPR 2023): a VE
  predictor-corrector step on every slice, then one ADMM iteration of TV along z on the
  whole volume (variables carried across steps).

With no coupling (``tv_weight = rho = 0``; no auxiliary prior) every method is its 2D
version run on each slice (tested: :class:`DDS3D` then equals :class:`~invdiff.samplers.DDS`
on the slice batch of a slice-stacked operator). These samplers are not in the 2D sampler
registry; :func:`make_volume` builds them by name (:data:`VOLUME_SAMPLERS`).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..operators.volume import SliceStack, from_slices, to_slices
from ..priors.base import DiffusionPrior
from .base import Sampler
from .params import Choice, Flag, Instance, Integer, Real
from .steps import ddim_step, gaussian_noise_std, make_sigmas, operator_norm_squared, proximal_weight
from .steps.volume import TVzADMM

__all__ = ["VolumeSampler", "DDS3D", "TPDM", "DiffusionMBIR", "VOLUME_SAMPLERS", "make_volume"]


class VolumeSampler(Sampler):
    """Base class of the volume samplers: the volume's shape, slice-batched denoising and
    noise drawn slice-major (so that a volume's noise equals that of its slices as a 2D
    batch, for the same generator).

    :param prior: the 2D prior of axial slices.
    :param slices_per_call: batch budget: at most this many slices per network call
        (``None``: the whole volume in one call).
    :param verbose: tqdm progress bar over the diffusion steps.
    """

    name = "volume"
    supports_nonlinear = False
    parameter_constraints = {"slices_per_call": Integer(1, none=True), "rho": Real(0), "tv_weight": Real(0)}
    #: the plane of :attr:`perpendicular_prior` (the axial prior is ``self.prior``).
    perpendicular_plane: str = "coronal"

    def __init__(self, prior: DiffusionPrior, slices_per_call: int | None = None, verbose: bool = False) -> None:
        super().__init__(prior, verbose=verbose)
        self.slices_per_call = slices_per_call
        #: the prior of the perpendicular plane's slices, if any (TPDM).
        self.perpendicular_prior: DiffusionPrior | None = None

    def image_shape_for(self, y: Tensor, physics, x_init: Tensor | None = None) -> tuple[int, ...]:
        """``(C, D, H, W)`` from ``x_init`` or ``physics.img_size``; each plane's prior checks its slices."""
        size = tuple(x_init.shape[1:]) if x_init is not None else tuple(getattr(physics, "img_size", None) or ())
        if len(size) != 4:
            raise ValueError(f"{self.name}: needs a volume operator with img_size = (C, D, H, W) "
                             f"(e.g. operators.make('ct-sparse-60', (1, 32, 128, 128))), got img_size {size or None}")
        C, D, H, W = (int(s) for s in size)
        self.prior.check_shape((C, H, W), where=f"{self.name} (axial slices)")
        if self.perpendicular_prior is not None:
            plane = (C, D, W) if self.perpendicular_plane == "coronal" else (C, D, H)
            self.perpendicular_prior.check_shape(plane, where=f"{self.name} ({self.perpendicular_plane} slices)")
        return (C, D, H, W)

    def randn(self, shape, generator, like: Tensor) -> Tensor:
        """Standard normal ``(B, C, D, H, W)``, drawn as ``(B, D, C, H, W)`` (slice-major); also
        the noise of :meth:`initial_noise`."""
        B, C, D, H, W = shape
        return super().randn((B, D, C, H, W), generator, like).permute(0, 2, 1, 3, 4)

    def denoise_volume(self, x: Tensor, sigma: float, plane: str = "axial") -> Tensor:
        """Every slice of ``plane`` denoised by that plane's prior, ``slices_per_call`` per
        network call; counts one ``nfe`` for the volume and each call in
        ``last_run.extra["network_calls"]``."""
        prior = self.prior if plane == "axial" else self.perpendicular_prior
        slices = to_slices(x, plane)
        chunks = slices.split(self.slices_per_call or slices.shape[0])
        self._info.nfe += 1
        self._info.extra["network_calls"] = self._info.extra.get("network_calls", 0) + len(chunks)
        out = torch.cat([prior.denoise(c, sigma, generator=self._generator).to(x.dtype) for c in chunks])
        return from_slices(out, x.shape, plane)

    def set_coupling(self, rho: float, tv_weight: float, cg_iterations: int, cg_tol: float) -> None:
        """Validate and keep the TV-z ADMM settings (``rho``, ``tv_weight`` relative to ``‖A‖²``)."""
        TVzADMM.check(rho, tv_weight)
        self.rho, self.tv_weight = float(rho), float(tv_weight)
        self.cg_iterations, self.cg_tol = int(cg_iterations), float(cg_tol)

    def tv_step(self, physics, y: Tensor) -> TVzADMM:
        """The TV-z ADMM data step of this run: ``rho`` and ``tv_weight`` times ``‖A‖²`` (power
        iteration), per slice when uncoupled on a slice stack."""
        scale = operator_norm_squared(physics, self.image_shape, device=y.device) if self.rho > 0 else 1.0
        per_slice = self.rho == 0 and isinstance(physics, SliceStack)
        return TVzADMM(physics, y, self.rho * scale, self.tv_weight * scale, self.cg_iterations, self.cg_tol,
                       per_slice=per_slice)


class DDS3D(VolumeSampler):
    r"""DDS-3D (Chung, Lee & Ye, ICLR 2024, Section 4 and official ``solver_3d.py``).

    Each of the ``steps`` steps denoises every slice (Tweedie), solves the TV-z regularised
    data problem around the denoised volume with one ADMM iteration of ``cg_iterations`` CG
    steps (:mod:`invdiff.samplers.steps.volume`), and renoises with DDS's DDIM step:

    .. math::

        \hat x_0 = D(x_i, \sigma_i), \quad \hat\epsilon = \frac{x_i - \hat x_0}{\sigma_i}, \quad
        \hat x'_0 = \mathrm{ADMM}_{\rho, \lambda}\big(\min_x \tfrac{1}{2\gamma_i}\|x - \hat x_0\|^2
            + \tfrac12\|Ax - y\|^2 + \lambda\|D_z x\|_1\big), \quad
        x_{i+1} = \hat x'_0 + \sqrt{\sigma_{i+1}^2 - c_i^2}\,\hat\epsilon + c_i z .

    :math:`\gamma_i` is DDS's weight (:class:`~invdiff.samplers.DDS`: scale-aware from the
    measurement noise; no proximal term for noiseless data, as in the paper); :math:`\rho`
    and :math:`\lambda` are given relative to :math:`\|A\|^2` (``rho_abs = rho·‖A‖²``), so the
    same numbers work for CT in pixel units and orthonormal MRI; the soft threshold on the z
    differences is ``tv_weight / rho`` in image units. The official code uses
    :math:`\rho = 10, \lambda = 0.04` in its own operator's units (threshold 0.004); the
    defaults here (``rho = 0.01``, threshold 0.03) were chosen on a phantom volume of
    :func:`invdiff.data.phantoms.ct_volume` (seed 0, 8 views) and are what the volume
    benchmark uses. ``tv_weight = rho = 0`` is DDS on every slice.

    :param prior: 2D prior of the axial slices.
    :param steps: diffusion steps (paper: 50).
    :param eta: DDIM stochasticity (paper: 0.85).
    :param cg_iterations: CG iterations per step (paper: 5).
    :param rho: ADMM penalty, relative to ``‖A‖²``.
    :param tv_weight: TV-z weight :math:`\lambda`, relative to ``‖A‖²``.
    :param gamma, gamma_scale, noise_sigma, schedule, sigmas, clip, cg_tol: as for
        :class:`~invdiff.samplers.DDS`.
    :param slices_per_call: batch budget of the network (``None``: whole volume).

    Example::

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.volume import DDS3D
        >>> prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
        >>> physics = operators.make("ct-sparse-20", (1, 4, 16, 16), noise_sigma=0.05)
        >>> y = physics(torch.full((1, 1, 4, 16, 16), 0.5), seed=0)
        >>> sampler = DDS3D(prior, steps=10)
        >>> x = sampler(y, physics, generator=torch.Generator().manual_seed(0))
        >>> x.shape, sampler.last_run.nfe, sampler.last_run.extra["network_calls"]
        (torch.Size([1, 1, 4, 16, 16]), 10, 10)
    """

    name = "dds-3d"
    parameter_constraints = {"gamma": Real(0, closed="neither", none=True)}

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 50,
        eta: float = 0.85,
        cg_iterations: int = 5,
        rho: float = 0.01,
        tv_weight: float = 3e-4,
        gamma: float | None = None,
        gamma_scale: float = 1.0,
        noise_sigma: float | None = None,
        schedule: str = "karras",
        sigmas: Tensor | None = None,
        clip: tuple[float, float] | None = (0.0, 1.0),
        cg_tol: float = 1e-6,
        slices_per_call: int | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, slices_per_call=slices_per_call, verbose=verbose)
        self.sigmas = make_sigmas(prior, steps, schedule, sigmas)
        self.eta = float(eta)
        self.set_coupling(rho, tv_weight, cg_iterations, cg_tol)
        self.gamma, self.gamma_scale, self.noise_sigma, self.clip = gamma, float(gamma_scale), noise_sigma, clip

    def use_prior(self, i: int) -> str:
        """The plane whose prior denoises at step ``i`` (always axial here)."""
        return "axial"

    def wants_data_step(self, plane: str) -> bool:
        return True

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        noise_sigma = gaussian_noise_std(physics, y, self.noise_sigma)
        data = self.tv_step(physics, y)
        sigmas = self.sigmas.tolist()
        x = self.initial_noise((y.shape[0], *self.image_shape), sigmas[0], x_init, generator, y)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            plane = self.use_prior(i)
            # 1. Tweedie estimate of every slice (of the plane whose prior takes this step)
            x0 = self.denoise_volume(x, sigma, plane)
            if self.clip is not None:
                x0 = x0.clamp(*self.clip)
            eps = (x - x0) / sigma
            # 2. data consistency: one ADMM iteration of the TV-z problem around x0
            if self.wants_data_step(plane):
                gamma = proximal_weight(sigma, noise_sigma, self.prior.sigma_data, self.gamma, self.gamma_scale, ndim=5)
                x0 = data(x0, anchor=x0, mu=0.0 if gamma is None else 1.0 / gamma)
            # 3. DDIM renoising with the network's eps
            noise = self.randn(x.shape, generator, y) if (self.eta > 0 and sigma_next > 0) else None
            x = ddim_step(x, x0, sigma, sigma_next, self.eta, noise, eps=eps)
            self.step_done(i, sigma, x, x0, callback, plane=plane)
        return x


class TPDM(DDS3D):
    r"""Perpendicular 2D priors (TPDM; Lee, Chung, Ye et al., ICCV 2023).

    Two 2D priors share the diffusion: the primary one on axial slices and an auxiliary one
    on perpendicular (coronal by default) slices. With ``alternate = K`` (paper: 2) steps
    ``i`` with ``i mod K = K - 1`` use the auxiliary prior, the others the primary one
    (``tpdm_utils.is_primary_tern``); as in the paper the auxiliary steps are unconditional
    and the primary steps carry the data consistency. The product of the two slice-wise
    priors couples the volume along z without a hand-made regulariser.

    Departures from the paper, exactly: the paper's VE predictor-corrector loop (2000 steps)
    with a DPS gradient is replaced by DDS's step (:class:`DDS3D`, 50 steps, CG data
    consistency, no gradient through the network), which a CPU can afford; the TV-z term is
    off by default (``tv_weight = 0``), the perpendicular prior being the coupling.

    :param prior: primary prior (axial slices).
    :param perpendicular_prior: auxiliary prior of ``perpendicular_plane`` slices.
    :param perpendicular_plane: ``"coronal"`` (slices of fixed ``H``: images ``(D, W)``) or
        ``"sagittal"`` (fixed ``W``: ``(D, H)``).
    :param alternate: :math:`K`.
    :param data_on_auxiliary: also take the data step on the auxiliary steps.
    :param kwargs: as for :class:`DDS3D` (``rho``, ``tv_weight`` default 0).

    Example::

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.volume import TPDM
        >>> axial = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
        >>> coronal = GaussianPrior.stationary((1, 4, 16), length_scale=3.0)
        >>> physics = operators.make("ct-sparse-20", (1, 4, 16, 16), noise_sigma=0.05)
        >>> y = physics(torch.full((1, 1, 4, 16, 16), 0.5), seed=0)
        >>> sampler = TPDM(axial, coronal, steps=10)
        >>> sampler(y, physics, generator=torch.Generator().manual_seed(0)).shape
        torch.Size([1, 1, 4, 16, 16])
    """

    name = "tpdm"
    parameter_constraints = {
        "perpendicular_prior": Instance(DiffusionPrior),
        "perpendicular_plane": Choice("coronal", "sagittal"),
        "alternate": Integer(2),
        "data_on_auxiliary": Flag(),
    }

    def __init__(self, prior: DiffusionPrior, perpendicular_prior: DiffusionPrior,
                 perpendicular_plane: str = "coronal", alternate: int = 2, data_on_auxiliary: bool = False,
                 rho: float = 0.0, tv_weight: float = 0.0, **kwargs) -> None:
        super().__init__(prior, rho=rho, tv_weight=tv_weight, **kwargs)
        self.perpendicular_prior = perpendicular_prior
        self.perpendicular_plane = perpendicular_plane
        self.alternate = int(alternate)
        self.data_on_auxiliary = bool(data_on_auxiliary)

    def use_prior(self, i: int) -> str:
        return self.perpendicular_plane if i % self.alternate == self.alternate - 1 else "axial"

    def wants_data_step(self, plane: str) -> bool:
        return plane == "axial" or self.data_on_auxiliary


class DiffusionMBIR(VolumeSampler):
    r"""DiffusionMBIR (Chung, Kim, Kim & Ye, CVPR 2023, Algorithm 1; official
    ``controllable_generation_TV.get_pc_radon_ADMM_TV_vol``).

    Each step moves every slice one VE predictor step (reverse diffusion) and, with the
    corrector on, one Langevin corrector step; then one ADMM iteration of TV along z runs on
    the whole (noisy) volume, its variables carried from step to step:

    .. math::

        s(x, \sigma) = \frac{D(x, \sigma) - x}{\sigma^2}, \qquad
        x \leftarrow x + (\sigma_i^2 - \sigma_{i+1}^2)\, s(x, \sigma_i) + \sqrt{\sigma_i^2 - \sigma_{i+1}^2}\, z,

    .. math::

        \epsilon = 2 \Big(r \frac{\|z\|}{\|s(x, \sigma_{i+1})\|}\Big)^2, \qquad
        x \leftarrow x + \epsilon\, s(x, \sigma_{i+1}) + \sqrt{2\epsilon}\, z', \qquad
        x \leftarrow \mathrm{ADMM}_{\rho,\lambda}(x)

    (``r`` = ``snr``, paper 0.16, the norms taken per slice; ADMM of :mod:`invdiff.samplers.steps.volume` with no
    proximal term, ``cg_iterations = 1`` as in the paper). The last step (:math:`\sigma_{i+1}
    = 0`) ends on the denoised volume, then the data step.

    Departures, exactly: the schedule is invdiff's (EDM/Karras over the prior's sigma range,
    or ``sigmas``) instead of the geometric VE-SDE grid; the corrector runs at the level the
    predictor reached (:math:`\sigma_{i+1}`; the official code passes :math:`t_i` to both);
    :math:`\rho, \lambda` are relative to :math:`\|A\|^2` as in :class:`DDS3D`. The paper uses
    2000 steps (4000 network evaluations per slice); fewer work with the EDM schedule.

    :param prior: 2D prior of the axial slices.
    :param steps: predictor steps (paper: 2000).
    :param corrector: take the Langevin corrector step (one more network call per step).
    :param snr: the corrector's signal-to-noise ratio :math:`r`.
    :param rho, tv_weight: ADMM penalty and TV-z weight, relative to ``‖A‖²``.
    :param cg_iterations: CG iterations per ADMM iteration (paper: 1).
    :param schedule, sigmas, cg_tol, slices_per_call, verbose: as for :class:`DDS3D`.

    Example::

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.priors import GaussianPrior
        >>> from invdiff.samplers.volume import DiffusionMBIR
        >>> prior = GaussianPrior.stationary((1, 16, 16), length_scale=3.0)
        >>> physics = operators.make("ct-sparse-20", (1, 4, 16, 16), noise_sigma=0.05)
        >>> y = physics(torch.full((1, 1, 4, 16, 16), 0.5), seed=0)
        >>> sampler = DiffusionMBIR(prior, steps=10)
        >>> x = sampler(y, physics, generator=torch.Generator().manual_seed(0))
        >>> x.shape, sampler.last_run.nfe
        (torch.Size([1, 1, 4, 16, 16]), 19)
    """

    name = "diffusion-mbir"
    parameter_constraints = {"corrector": Flag(), "snr": Real(0, closed="neither")}

    def __init__(
        self,
        prior: DiffusionPrior,
        steps: int = 2000,
        corrector: bool = True,
        snr: float = 0.16,
        rho: float = 0.01,
        tv_weight: float = 3e-4,
        cg_iterations: int = 1,
        schedule: str = "karras",
        sigmas: Tensor | None = None,
        cg_tol: float = 1e-6,
        slices_per_call: int | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, slices_per_call=slices_per_call, verbose=verbose)
        self.sigmas = make_sigmas(prior, steps, schedule, sigmas)
        self.corrector, self.snr = bool(corrector), float(snr)
        self.set_coupling(rho, tv_weight, cg_iterations, cg_tol)

    def score(self, x: Tensor, sigma: float) -> tuple[Tensor, Tensor]:
        """:math:`s(x, \\sigma)` and the denoised volume."""
        x0 = self.denoise_volume(x, sigma)
        return (x0 - x) / sigma**2, x0

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        data = self.tv_step(physics, y)
        sigmas = self.sigmas.tolist()
        x = self.initial_noise((y.shape[0], *self.image_shape), sigmas[0], x_init, generator, y)
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            # 1. predictor: reverse diffusion from sigma_i to sigma_{i+1}
            s, x0 = self.score(x, sigma)
            if sigma_next > 0:
                x = x + (sigma**2 - sigma_next**2) * s + math.sqrt(sigma**2 - sigma_next**2) * \
                    self.randn(x.shape, generator, y)
            else:
                x = x0
            # 2. corrector: one Langevin step at sigma_{i+1}
            if self.corrector and sigma_next > 0:
                s, _ = self.score(x, sigma_next)
                z = self.randn(x.shape, generator, y)
                step = 2 * (self.snr * slice_norm(z) / slice_norm(s).clamp_min(1e-12)) ** 2  # per slice
                x = x + step * s + (2 * step).sqrt() * z
            # 3. data consistency: one ADMM iteration of TV-z on the whole volume
            x = data(x)
            self.step_done(i, sigma, x, x0, callback)
        return x


def slice_norm(v: Tensor) -> Tensor:
    """The norm of every axial slice of ``v``, shaped ``(B, 1, D, 1, 1)``."""
    return v.pow(2).sum(dim=(1, 3, 4), keepdim=True).sqrt()


#: the volume samplers by name (not in the 2D registry of :func:`invdiff.samplers.make`).
VOLUME_SAMPLERS: dict[str, type[VolumeSampler]] = {"dds-3d": DDS3D, "tpdm": TPDM, "diffusion-mbir": DiffusionMBIR}


def make_volume(name: str, prior: DiffusionPrior, **overrides) -> VolumeSampler:
    """Build the volume sampler ``name`` (:data:`VOLUME_SAMPLERS`) with keyword overrides.

    >>> from invdiff.priors import GaussianPrior
    >>> make_volume("dds-3d", GaussianPrior.stationary((1, 8, 8)), steps=5).name
    'dds-3d'
    """
    key = name.lower()
    if key not in VOLUME_SAMPLERS:
        raise ValueError(f"unknown volume sampler {name!r}; available: {', '.join(sorted(VOLUME_SAMPLERS))}")
    return VOLUME_SAMPLERS[key](prior, **overrides)
