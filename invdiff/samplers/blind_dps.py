r"""BlindDPS: blind deblurring by two diffusion posterior-sampling chains, one for the image and
one for the kernel.

Chung, Kim, Kim, Ye, "Parallel Diffusion Models of Operator and Image for Blind Inverse
Problems", CVPR 2023 (arXiv:2211.10656); official code BlindDPS/blind-dps
(``guided_diffusion/gaussian_diffusion.py``: ``BlindDPS.p_sample_loop``;
``guided_diffusion/blind_condition_methods.py``: the joint gradient with the kernel's
:math:`\ell_1` penalty).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..operators.kernels import centre, centroid, to_kernel
from ..operators.natural import circular_blur, fourier_shift, kernel_spectrum
from ..priors.base import DiffusionPrior
from .base import IncompatibleError, Sampler
from .dps import DPS
from .params import Flag, Instance, Real
from .steps import batch_norm, ddim_step, denoiser_error_variance, likelihood_variance, randn_like

__all__ = ["BlindDPS", "SHIPPED_KERNEL_PRIOR"]

#: The kernel prior shipped with invdiff (16x16 kernels of :mod:`invdiff.operators.kernels`).
SHIPPED_KERNEL_PRIOR = "blur-kernel-16"


def normalised_kernel(u: Tensor) -> Tensor:
    """BlindDPS's kernel estimate from the kernel chain's denoised image ``u`` (``k / max k``
    in ``[0, 1]``): ``u`` divided by its sum, per kernel (the official code maps ``[-1, 1]`` to
    ``[0, 1]`` and divides by the sum, without clamping; negative mass is what the
    :math:`\\ell_1` penalty acts on)."""
    s = u.sum(dim=(-2, -1), keepdim=True)
    return u / torch.where(s.abs() < 1e-6, torch.full_like(s, 1e-6), s)


def kernel_error_spectrum(kernel_hat: Tensor, support_hat: Tensor, rho2: Tensor) -> Tensor:
    r""":math:`\mathbb E|\widehat{\delta k}(\omega)|^2`, the variance of the normalised kernel's
    error at each frequency (unnormalised DFT on the image grid), when the kernel denoiser's
    error :math:`e` on :math:`\hat u_0` is white with variance :math:`r_k^2` per pixel of the
    :math:`n_k`-pixel support :math:`S` and ``rho2`` :math:`= r_k^2 / (\sum \hat u_0)^2`.
    Linearising :math:`k = u / \sum u`: :math:`\delta k = (e - \hat k_0 \sum e) / \sum \hat u_0`, so

    .. math::

        \mathbb E|\widehat{\delta k}|^2 = \rho^2 \big(n_k (1 + |\hat k_0|^2)
        - 2\,\mathrm{Re}(\overline{\hat k_0}\,\hat S)\big),

    zero at :math:`\omega = 0` (a kernel that sums to 1 has no error there) and about
    :math:`\rho^2 n_k` at high frequencies. ``support_hat`` is :math:`\hat S`, the spectrum of
    the all-ones kernel placed as the kernel is (:func:`~invdiff.operators.natural.kernel_spectrum`),
    whose value at :math:`\omega = 0` is :math:`n_k`."""
    n_k = support_hat[..., :1, :1].real
    return (rho2 * (n_k * (1 + kernel_hat.abs() ** 2) - 2 * (kernel_hat.conj() * support_hat).real)).clamp_min(0)


def centring_shift(u: Tensor) -> Tensor:
    """Per kernel image ``u`` ``(B, 1, k, k)``, the integer shift ``(dy, dx)`` that moves the
    centroid of ``max(u, 0)`` nearest the centre ``(k - 1) / 2`` (within half a pixel of it)."""
    return torch.round(-centroid(u)).long()


def roll_each(x: Tensor, shift: Tensor) -> Tensor:
    """``x[b]`` circularly shifted by ``shift[b] = (dy, dx)`` over its last two axes."""
    if not bool(shift.any()):
        return x
    return torch.stack([torch.roll(x[b], (int(s[0]), int(s[1])), (-2, -1)) for b, s in enumerate(shift)])


class BlindDPS(DPS):
    """BlindDPS (Chung et al., CVPR 2023, Algorithm 1): image :math:`x` and kernel
    :math:`\\kappa` are sampled by two reverse diffusions run in parallel on the same noise
    schedule, each with its own prior, coupled by the gradient of one data term:

    .. math::

        \\hat x_0 = D(x_i, \\sigma_i), \\quad \\hat u_0 = D_k(\\kappa_i, \\sigma_i), \\quad
        \\hat k_0 = \\hat u_0 / \\textstyle\\sum \\hat u_0, \\qquad
        \\mathcal L = \\ell\\big(y - \\hat k_0 * \\hat x_0\\big) + \\lambda \\|\\hat k_0\\|_1,

        x_{i+1} = x'_{i+1} - \\gamma_i \\nabla_{x_i} \\mathcal L, \\qquad
        \\kappa_{i+1} = \\kappa'_{i+1} - \\gamma^k_i \\nabla_{\\kappa_i} \\mathcal L,

    where :math:`x'`, :math:`\\kappa'` are each prior's ancestral step (as in :class:`DPS`)
    and both gradients are one backward pass through both networks (the partial derivatives
    of the bilinear model :math:`k * x`, :func:`~invdiff.operators.natural.circular_blur`).
    The kernel prior denoises kernels shown as images :math:`k / \\max k` (the shipped
    ``blur-kernel-16``, trained on :mod:`invdiff.operators.kernels`); the returned kernel is the
    last :math:`\\hat u_0` clamped at 0 and normalised to sum 1 (:attr:`kernel`).

    The step rules are :class:`DPS`'s, on the joint data term:

    ``weighting="likelihood"`` (default): :math:`\\ell(r) = \\tfrac12 r^\\top \\Sigma_i^{-1} r`,
    the Gaussian likelihood with both denoisers' errors pushed through the bilinear model,
    :math:`r \\approx \\hat k_0 * \\delta x + \\delta k * \\hat x_0 + n`: the covariance is
    diagonal in Fourier,

    .. math::

        \\Sigma_i(\\omega) = s^2 + r_i^2 |\\hat k_0(\\omega)|^2
        + \\tfrac1N\\,\\mathbb E|\\widehat{\\delta k}_i(\\omega)|^2\\, |\\hat x_0(\\omega)|^2,

    with :math:`r_i^2`, :math:`r_{k,i}^2` the image and kernel denoisers' error variances
    (ΠGDM's model, each with its prior's :math:`\\sigma_d`), held fixed in the gradient, and
    :math:`\\mathbb E|\\widehat{\\delta k}_i|^2` the error spectrum of the *normalised* kernel
    (:func:`kernel_error_spectrum`; :math:`N` image pixels): white error on :math:`\\hat u_0`
    divided by its sum, zero at :math:`\\omega = 0` (the normalised kernel sums to 1 whatever
    the error) and about :math:`n_k r_{k,i}^2 / (\\sum \\hat u_0)^2` elsewhere (:math:`n_k`
    kernel pixels). Without the kernel term the kernel chain's step scales with
    :math:`|\\hat x_0|^2` (about 10^6 at the zero frequency of a 64x64 image) and the kernel is
    pushed far off in the first steps; with the kernel's error taken as white at every
    frequency (the first version) the term was :math:`N / n_k` times too large away from 0 and
    damped the one frequency that carries no kernel error, so the joint fit stopped well above
    the noise level (``docs/benchmarks/blind.md`` has the current numbers). The steps are :math:`\\gamma_i = \\zeta(\\sigma_i^2 - \\sigma_{i+1}^2)` and
    :math:`\\gamma^k_i = \\zeta_k(\\sigma_i^2 - \\sigma_{i+1}^2)`; the :math:`\\ell_1` weight is
    relative to the data term's size at the start (``kernel_l1`` x the likelihood's value per
    measurement entry), so that it keeps its meaning whatever the noise level.

    ``weighting="paper"``: the official rule, :math:`\\ell(r) = \\|r\\|_2` (the norm), with
    the official constant step ``zeta`` (0.3 in the official configs) times
    :class:`DPS`'s VP-to-VE scale on both chains, and :math:`\\lambda` = ``kernel_l1``
    (``--reg_ord 1 --reg_scale 1.0`` in the official ``run_deblur.sh``).

    **Translation gauge** (``center_kernel``, default on; not in the paper): the data fit cannot
    tell :math:`(k, x)` from :math:`(k(\\cdot - s), x(\\cdot + s))`, and an estimate that drifts by
    a pixel loses many dB of PSNR against the truth while fitting ``y`` as well. After every
    step the kernel chain is shifted (circularly, by whole pixels) so that the centroid of
    :math:`\\max(\\hat u_0, 0)` sits within half a pixel of the kernel's centre, and the image
    chain by the opposite shift, which leaves :math:`\\hat k_0 * \\hat x_0` unchanged. At the end
    the pair is moved by the remaining sub-pixel offset of the kernel's centroid: the image by
    the exact Fourier shift (:func:`~invdiff.operators.natural.fourier_shift`), the kernel by
    :func:`~invdiff.operators.kernels.centre`. The returned kernel's centroid is the centre: the
    convention of :mod:`invdiff.operators.kernels` (every kernel of the ``deblur-blind`` task is
    centred so) and of the classical methods' ``adjust_psf_center``. The gauge assumes a kernel
    prior that moves with its input (a trained one does); with the image known it is not needed
    (the image fixes the translation).

    Not reproduced: the official code's gradually increasing scale
    :math:`\\zeta\\sqrt{\\bar\\alpha_t}` (the paper reports the constant one).

    The operator must be blind: :class:`~invdiff.operators.natural.BlindBlur` (task
    ``deblur-blind``), whose ``A(x, filter=k)`` takes the kernel; its kernel size must be the
    kernel prior's. Cost per step: one forward and one backward pass of each network.

    ``steps=500`` by default (half the official 1000 DDPM steps; DPS's default is 200): the
    kernel chain needs the fine schedule, a thin motion kernel most (the kernel error with the
    image known, by steps, is in ``docs/benchmarks/blind.md``). ``zeta_kernel=1`` is set for
    the joint problem, where the image's own error term damps the kernel step; with the image
    known exactly (that table) it overshoots thin motion kernels, and a smaller ``zeta_kernel``
    recovers them there but loses in the joint problem.

    :param prior: the image prior.
    :param kernel_prior: the kernel prior (default: the shipped ``blur-kernel-16``).
    :param zeta: image step multiplier.
    :param zeta_kernel: kernel step multiplier.
    :param kernel_l1: :math:`\\lambda` of the kernel's :math:`\\ell_1` penalty (see the rules).
    :param center_kernel: fix the translation gauge (see below).

    Other options are :class:`DPS`'s.

    Example::

        >>> import torch
        >>> from invdiff import operators
        >>> from invdiff.priors import GaussianPrior
        >>> physics = operators.make("deblur-blind", (1, 16, 16), kernel_size=4)
        >>> x = torch.full((1, 1, 16, 16), 0.5)
        >>> y = physics(x, seed=0)
        >>> kernel_prior = GaussianPrior(0.2, 0.2, image_shape=(1, 4, 4))
        >>> sampler = BlindDPS(GaussianPrior(0.5, 0.1, image_shape=(1, 16, 16)), kernel_prior, steps=10)
        >>> x_hat = sampler(y, physics, generator=torch.Generator().manual_seed(0))
        >>> x_hat.shape, sampler.kernel.shape
        (torch.Size([1, 1, 16, 16]), torch.Size([1, 1, 4, 4]))
    """

    name = "blind-dps"
    handles_blind = True
    supports_nonlinear = False  # bilinear blur only (check_physics)
    parameter_constraints = {"kernel_prior": Instance(DiffusionPrior, none=True), "zeta_kernel": Real(0),
                             "kernel_l1": Real(0), "center_kernel": Flag()}

    def __init__(
        self,
        prior: DiffusionPrior,
        kernel_prior: DiffusionPrior | None = None,
        steps: int = 500,
        zeta: float = 1.0,
        zeta_kernel: float = 1.0,
        kernel_l1: float = 1.0,
        center_kernel: bool = True,
        weighting: str = "likelihood",
        schedule: str = "karras",
        sigmas: Tensor | None = None,
        eta: float = 1.0,
        clip: tuple[float, float] | None = (0.0, 1.0),
        noise_sigma: float | None = None,
        verbose: bool = False,
    ) -> None:
        super().__init__(prior, steps=steps, zeta=zeta, weighting=weighting, schedule=schedule, sigmas=sigmas,
                         eta=eta, clip=clip, noise_sigma=noise_sigma, verbose=verbose)
        if kernel_prior is None:
            from ..priors import load

            kernel_prior = load(SHIPPED_KERNEL_PRIOR)
        self.kernel_prior = kernel_prior
        self.zeta_kernel = float(zeta_kernel)
        self.kernel_l1 = float(kernel_l1)
        self.center_kernel = bool(center_kernel)
        #: the kernels ``(B, 1, k, k)`` estimated by the last run (non-negative, sum 1).
        self.kernel: Tensor | None = None

    # --- checks -----------------------------------------------------------------------
    def check_physics(self, physics) -> None:
        if not getattr(physics, "blind", False):
            raise IncompatibleError(f"{self.name}: needs a blind operator whose A(x, filter=k) takes the kernel "
                                    f"(task deblur-blind), got {type(physics).__name__}")
        ks = int(physics.kernel_size)
        if tuple(self.kernel_prior.image_shape)[-2:] != (ks, ks):
            raise IncompatibleError(f"{self.name}: the kernel prior takes {tuple(self.kernel_prior.image_shape)} "
                                    f"kernels but the operator's are {ks}x{ks}; pass a kernel_prior of that size")

    # --- the algorithm ----------------------------------------------------------------
    def denoise_kernel(self, u: Tensor, sigma: float) -> Tensor:
        """The kernel prior's denoiser (counted in ``last_run.extra["kernel_nfe"]``)."""
        extra = self._info.extra
        extra["kernel_nfe"] = extra.get("kernel_nfe", 0) + 1
        return self.kernel_prior.denoise(u, sigma).to(u.dtype)

    def _data_term(self, y: Tensor, x0: Tensor, k0: Tensor, noise_var, r2: float, rk2: Tensor,
                   support_hat: Tensor) -> Tensor:
        """Per-image data term :math:`\\ell(y - \\hat k_0 * \\hat x_0)` of the module doc."""
        if self.weighting == "paper":
            return batch_norm(y - circular_blur(x0, k0))
        n = y.shape[-1] * y.shape[-2]
        kernel_hat = kernel_spectrum(k0.to(x0.dtype), y.shape[-2:])
        image_hat = torch.fft.fft2(x0)
        r_hat = torch.fft.fft2(y) - image_hat * kernel_hat  # the residual's spectrum (circular_blur's product)
        # the covariance of both denoisers' errors through the bilinear model, diagonal in Fourier
        kernel_hat, image_hat = kernel_hat.detach(), image_hat.detach()
        weight = 1.0 / (noise_var + r2 * kernel_hat.abs() ** 2
                        + kernel_error_spectrum(kernel_hat, support_hat, rk2) * image_hat.abs() ** 2 / n)
        return 0.5 * (weight * r_hat.abs() ** 2).flatten(1).sum(1) / n

    def _run(self, y: Tensor, physics, x_init: Tensor | None, generator, callback: Callable | None) -> Tensor:
        sigmas = self.sigmas.tolist()
        b = y.shape[0]
        self.kernel_prior.to(y.device)
        ks = int(physics.kernel_size)
        kernel_shape = (b, *self.kernel_prior.image_shape[:-2], ks, ks)
        # the spectrum of the kernel's support, for the kernel's error model (once per run)
        support_hat = kernel_spectrum(torch.ones(1, 1, ks, ks, dtype=y.real.dtype, device=y.device), y.shape[-2:])
        kind, noise_var = likelihood_variance(physics, y, "gaussian", self.noise_sigma, None)
        scale = self._paper_scale() if self.weighting == "paper" else None
        x = self.initial_noise((b, *self.image_shape), sigmas[0], x_init, generator, y)
        kappa = self.initial_noise(kernel_shape, sigmas[0], None, generator, y)
        l1_weight = self.kernel_l1
        u0 = kappa
        for i in self.progress(range(len(sigmas) - 1)):
            sigma, sigma_next = sigmas[i], sigmas[i + 1]
            r2 = denoiser_error_variance(sigma, self.prior.sigma_data)
            r2_kernel = denoiser_error_variance(sigma, self.kernel_prior.sigma_data)
            # Alg. 1 lines 3-6: both chains denoise, and one backward pass of the joint data term
            with torch.enable_grad():
                xg, kg = x.detach().requires_grad_(True), kappa.detach().requires_grad_(True)
                x0 = self.denoise(xg, sigma)
                u0 = self.denoise_kernel(kg, sigma)
                x0c = x0.clamp(*self.clip) if self.clip is not None else x0
                k0 = normalised_kernel(u0)
                # the kernel denoiser's error on k0 = u0 / sum(u0): its error on u0 over the sum
                rk2 = r2_kernel / u0.detach().sum(dim=(-2, -1), keepdim=True).abs().clamp_min(1e-3) ** 2
                data = self._data_term(y, x0c, k0, noise_var, r2, rk2, support_hat)
                if i == 0 and self.weighting == "likelihood":  # lambda relative to the data term's size
                    l1_weight = self.kernel_l1 * data.detach() / y[0].numel()  # per image: batch-independent
                loss = data + l1_weight * k0.abs().flatten(1).sum(1)
                gx, gk = torch.autograd.grad(loss.sum(), (xg, kg), allow_unused=True)  # None: a point-mass prior
                gx = torch.zeros_like(x) if gx is None else gx
                gk = torch.zeros_like(kappa) if gk is None else gk
            x0, u0 = x0c.detach(), u0.detach()
            step = scale[i] if scale is not None else sigma**2 - sigma_next**2
            # Alg. 1 lines 7-10: each chain's ancestral step, then its guidance
            last = sigma_next == 0
            noise_x = randn_like(x, generator) if (self.eta > 0 and not last) else None
            noise_k = randn_like(kappa, generator) if (self.eta > 0 and not last) else None
            x = ddim_step(x, x0, sigma, sigma_next, self.eta, noise_x) - self.zeta * step * gx
            kappa = ddim_step(kappa, u0, sigma, sigma_next, self.eta, noise_k) - self.zeta_kernel * step * gk
            if self.center_kernel:  # the translation gauge: kernel centred, image shifted back
                shift = centring_shift(u0)
                kappa, u0 = roll_each(kappa, shift), roll_each(u0, shift)
                x, x0 = roll_each(x, -shift), roll_each(x0, -shift)
            self.check_finite(kappa, i, sigma)
            self.step_done(i, sigma, x, x0, callback, kernel=u0)
        kernel = to_kernel(u0)
        if self.center_kernel:  # the sub-pixel gauge: the kernel's centroid at the centre exactly
            x = fourier_shift(x, centroid(kernel))
            kernel = centre(kernel)
        self.kernel = kernel
        self._info.extra["kernel_shape"] = list(self.kernel.shape[1:])
        return x
