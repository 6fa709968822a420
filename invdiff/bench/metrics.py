r"""Image-quality metrics of the benchmark: deepinv's PSNR and SSIM, and LPIPS when its
weights are on this machine.

For a reconstruction :math:`\hat x` of a ground truth :math:`x` (one image, ``(1, C, H, W)``):

.. math::

    \mathrm{PSNR} = 10 \log_{10} \frac{(M - m)^2}{\tfrac{1}{n}\|\mathrm{clip}(\hat x) - x\|^2},

with :math:`[m, M] = [0, 1]` for every task except MRI, where :math:`m = 0` and
:math:`M = \max x`, the ground truth's own peak, as fastMRI's evaluation does
(``data_range = gt.max()``); SSIM (torchmetrics' Gaussian-window SSIM through deepinv) uses
the same data range. ``clip`` clamps the reconstruction to [0, 1] (deepinv's
``norm_inputs="clip"``; the ground truth is already there). 2-channel (complex) MRI images
are compared as magnitudes (``complex_abs=True``).

:func:`deepinv_metrics` returns exactly these metric objects, so ``deepinv.test(...,
metrics=deepinv_metrics(task))`` computes the same numbers as the benchmark.

**LPIPS** (``deepinv.loss.metric.LPIPS``: torchmetrics' LPIPS, AlexNet by default) is
computed only if the torchvision backbone's weights are already in the torch hub cache
(``$TORCH_HOME/hub/checkpoints``); nothing is downloaded. Otherwise ``lpips`` is ``None``
and the row's ``notes`` say why. Grey and complex images are fed as 3 equal channels of the
(magnitude) image; images smaller than the network's receptive field give ``None`` with a note.
"""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from torch import Tensor

__all__ = ["deepinv_metrics", "image_metrics", "volume_metrics", "z_gradient_error", "kernel_error", "mean_psnr_ssim",
           "lpips_weights_path", "LPIPS_BACKBONES"]

#: torchvision backbone of each LPIPS network type
LPIPS_BACKBONES = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def deepinv_metrics(family: str, channels: int = 1) -> list:
    """deepinv ``[PSNR, SSIM]`` metric objects of the benchmark for a task ``family``
    (``"mri"`` or ``"image"``, see :attr:`invdiff.bench.grid.TaskSpec.family`)."""
    from deepinv.loss.metric import PSNR, SSIM

    complex_abs = family == "mri" and channels == 2
    peak = None if family == "mri" else 1.0  # None: the ground truth's max (fastMRI)
    kw = dict(max_pixel=peak, min_pixel=0.0, norm_inputs="clip", complex_abs=complex_abs)
    return [PSNR(**kw), SSIM(**kw)]


def lpips_weights_path(net: str = "alex") -> str | None:
    """Where torchvision keeps the LPIPS backbone weights, if they are there; else ``None``."""
    if net not in LPIPS_BACKBONES:
        raise ValueError(f"lpips_net must be one of {sorted(LPIPS_BACKBONES)}, got {net!r}")
    try:
        import torchvision
    except ImportError:
        return None
    url = getattr(torchvision.models, LPIPS_BACKBONES[net]).DEFAULT.url
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    return path if os.path.isfile(path) else None


@lru_cache(maxsize=4)
def _lpips_metric(net: str, path: str):
    from deepinv.loss.metric import LPIPS

    # the weights file exists (checked by the caller), so torchvision loads it from the cache
    return LPIPS(net_type=net, device="cpu").eval()


def _lpips(x_hat: Tensor, x: Tensor, net: str) -> tuple[float | None, str]:
    path = lpips_weights_path(net)
    if path is None:
        return None, f"lpips: skipped, no local {net} weights in {os.path.join(torch.hub.get_dir(), 'checkpoints')}"
    metric = _lpips_metric(net, path)
    if x.shape[1] == 2:  # complex MRI: compare magnitudes
        x_hat, x = x_hat.norm(dim=1, keepdim=True), x.norm(dim=1, keepdim=True)
    if x.shape[1] == 1:
        x_hat, x = x_hat.repeat(1, 3, 1, 1), x.repeat(1, 3, 1, 1)
    try:
        with torch.no_grad():
            value = metric(x_hat.clamp(0, 1), x.clamp(0, 1))
    except (RuntimeError, ValueError) as err:  # e.g. images smaller than the receptive field
        return None, f"lpips: failed ({str(err).splitlines()[0]})"
    return float(value.reshape(-1)[0]), ""


def image_metrics(x_hat: Tensor, x: Tensor, family: str, lpips: bool = True, lpips_net: str = "alex") -> dict:
    """PSNR, SSIM and LPIPS of one reconstruction ``x_hat`` against ``x`` (both ``(1, C, H, W)``).

    :returns: ``dict(psnr, ssim, lpips, psnr_range, notes)``; ``psnr_range`` is ``"1"``
        or ``"gt-max"`` (MRI).
    """
    x_hat = x_hat.detach().cpu().float()
    x = x.detach().cpu().float()
    if x.ndim == 5:  # a volume (1, C, D, H, W): 3D scores, no LPIPS
        v = volume_metrics(x_hat, x, family)
        return {"psnr": v["psnr"], "ssim": v["ssim"], "lpips": None, "psnr_range": v["psnr_range"],
                "z_error": v["z_error"], "notes": f"3D PSNR/SSIM (window {v.get('ssim_window')})"}
    psnr, ssim = deepinv_metrics(family, x.shape[1])
    out = {
        "psnr": float(psnr(x_hat, x).reshape(-1)[0]),
        "ssim": float(ssim(x_hat, x).reshape(-1)[0]),
        "lpips": None,
        "psnr_range": "gt-max" if family == "mri" else "1",
        "notes": "",
    }
    if lpips:
        out["lpips"], out["notes"] = _lpips(x_hat, x, lpips_net)
    return out


def kernel_error(kernel_hat: Tensor, kernel: Tensor) -> float:
    """Relative error :math:`\\|\\hat k - k\\|_2 / \\|k\\|_2` of an estimated blur kernel (both
    normalised to sum 1), the mean over a batch; no shift is forgiven.

    >>> k = torch.zeros(1, 1, 3, 3); k[..., 1, 1] = 1
    >>> kernel_error(k, k), kernel_error(torch.full_like(k, 1 / 9), k)
    (0.0, 0.9428090415820634)
    """
    k_hat = kernel_hat.double().reshape(kernel_hat.shape[0], -1)
    k = kernel.double().reshape(kernel.shape[0], -1)
    return float(((k_hat - k).norm(dim=1) / k.norm(dim=1)).mean())


def z_gradient_error(x_hat: Tensor, x: Tensor) -> float:
    """Slice-to-slice consistency of a volume ``(..., D, H, W)``: the relative error of its
    z-gradient, :math:`\\|D_z \\hat x - D_z x\\| / \\|D_z x\\|` (:math:`D_z` the difference of
    neighbouring slices)."""
    from ..samplers.steps.volume import z_difference

    def dz(v: Tensor) -> Tensor:
        return z_difference(v.double().reshape(-1, 1, *v.shape[-3:]))

    ref = dz(x)
    return float((dz(x_hat) - ref).norm() / ref.norm().clamp_min(1e-12))


def volume_metrics(x_hat: Tensor, x: Tensor, family: str = "image") -> dict:
    """3D scores of a volume ``x_hat`` against ``x`` (``(D, H, W)``, ``(C, D, H, W)`` or
    ``(1, C, D, H, W)``; the first channel, or the magnitude of a complex pair):

    * ``psnr`` over the whole volume, peak 1 (``psnr_range = "1"``; MRI: the reference's
      maximum, ``"gt-max"``, as for 2D images);
    * ``ssim``: :func:`skimage.metrics.structural_similarity` on the ``(D, H, W)`` volume
      (3D Gaussian-free 7-voxel window, the largest odd one that fits; ``None`` below 3
      voxels along an axis; ``ssim_window`` records it), data range as for PSNR;
    * ``z_error``: :func:`z_gradient_error`.

    deepinv's SSIM is 2D only, so the 3D SSIM is scikit-image's.
    """
    import numpy as np
    from skimage.metrics import structural_similarity

    def volume(v: Tensor) -> np.ndarray:
        v = v.detach().cpu().double()
        v = v.reshape(-1, *v.shape[-4:])[0] if v.ndim >= 4 else v[None]
        return (v.norm(dim=0) if v.shape[0] == 2 else v[0]).numpy()

    est, ref = volume(x_hat), volume(x)
    peak = float(ref.max()) if family == "mri" else 1.0
    mse = float(np.mean((est - ref) ** 2))
    out = {"psnr": float(10 * np.log10(peak**2 / max(mse, 1e-20))), "ssim": None,
           "psnr_range": "gt-max" if family == "mri" else "1", "z_error": None}
    window = min(7, *ref.shape)
    window -= 1 - window % 2
    if window >= 3:
        out["ssim"] = float(structural_similarity(est, ref, data_range=peak, win_size=window))
        out["ssim_window"] = int(window)
    if ref.shape[0] > 1:
        out["z_error"] = z_gradient_error(torch.from_numpy(est), torch.from_numpy(ref))
    return out


#: SSIM's Gaussian window (11 pixels): smaller images have no SSIM
SSIM_MIN_SIZE = 11


def mean_psnr_ssim(x_hat: Tensor, x: Tensor, family: str = "image") -> tuple[float, float | None]:
    """Mean over a batch of the benchmark's PSNR and SSIM (:func:`deepinv_metrics`), as the
    demo and ``invdiff reconstruct`` report them; SSIM is ``None`` for images smaller than
    its window."""
    x_hat, x = x_hat.detach().float(), x.detach().float()
    psnr, ssim = deepinv_metrics(family, x.shape[1])
    mean_ssim = float(ssim(x_hat, x).mean()) if min(x.shape[-2:]) >= SSIM_MIN_SIZE else None
    return float(psnr(x_hat, x).mean()), mean_ssim
