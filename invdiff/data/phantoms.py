"""Procedural anatomical CT phantoms: randomised thorax and abdomen slices in Hounsfield units.

No public CT dataset can be downloaded on the build machines, so the shipped CT prior is
trained on slices drawn by :func:`ct`. Each slice is built from geometric primitives with
anatomical layout and typical attenuation values (HU, at 120 kVp):

==========================  ================  =========================================
structure                   HU                randomised
==========================  ================  =========================================
air (outside, bowel gas)    -1000             gas bubbles: count, size, position
lung parenchyma             -870 ± 40         shape, size, vessel tree density
subcutaneous fat            -100 ± 15         layer thickness 3-9 % of body width
muscle / body wall          +45 ± 10          thickness, texture
liver, spleen, kidneys      +55…+65, +45      shape, size, position, presence
heart / blood pool          +40, +160 (contrast phase)
aorta, vessels              +40…+200          radius, contrast
vertebral body (cancellous) +250 ± 50         size; cortical rim +900
ribs (cortical bone)        +700…+1000        count, radius, arc position
lesions (nodules, cysts,    -20…+90           count, size, contrast
metastases)
==========================  ================  =========================================

Soft tissue carries smooth Gaussian-random-field texture (standard deviation 8-20 HU),
outlines are perturbed by low-frequency Fourier series so that no two bodies are alike,
and every slice is rendered on a 2x finer grid and area-averaged (anti-aliased edges).
HU are mapped to ``[0, 1]`` with the window ``[-1000, 1000]`` (:data:`HU_WINDOW`):
``x = (HU + 1000) / 2000`` clipped to ``[0, 1]``, so air is 0, water 0.5 and dense bone 1.

Slice ``k`` of seed ``s`` depends only on ``(s, k)`` — not on how many slices are drawn —
so training sets and held-out sets are reproducible and can be made disjoint by seed.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

__all__ = ["ct", "ct_hu", "ct_volume", "SmoothDraws", "HU_WINDOW", "hu_to_unit", "unit_to_hu"]

#: The HU window ``(low, high)`` mapped to ``[0, 1]`` by :func:`hu_to_unit`.
HU_WINDOW: tuple[float, float] = (-1000.0, 1000.0)


def hu_to_unit(hu: np.ndarray | torch.Tensor, window: tuple[float, float] = HU_WINDOW):
    """Map Hounsfield units to ``[0, 1]``: ``(hu - low) / (high - low)``, clipped."""
    low, high = window
    out = (hu - low) / (high - low)
    return out.clip(0, 1) if isinstance(out, np.ndarray) else out.clamp(0, 1)


def unit_to_hu(x: np.ndarray | torch.Tensor, window: tuple[float, float] = HU_WINDOW):
    """Inverse of :func:`hu_to_unit` (within the window)."""
    low, high = window
    return x * (high - low) + low


# ----------------------------------------------------------------------------------
# primitives on a [-1, 1]^2 grid (x to the patient's left on screen right, y down)
# ----------------------------------------------------------------------------------


def _ellipse(X, Y, cx, cy, ax, ay, angle=0.0, wobble=None):
    """Boolean mask of a rotated ellipse; ``wobble`` = (amplitudes, phases) perturbs the
    radius by a low-order Fourier series in the polar angle."""
    c, s = np.cos(angle), np.sin(angle)
    u = ((X - cx) * c + (Y - cy) * s) / ax
    v = (-(X - cx) * s + (Y - cy) * c) / ay
    r = np.hypot(u, v)
    if wobble is not None:
        amps, phases = wobble
        theta = np.arctan2(v, u)
        bound = 1.0 + sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amps, phases)))
        return r <= bound
    return r <= 1.0


def _field(rng: np.random.Generator, shape, corr: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth Gaussian random field (correlation ``corr`` pixels)."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), corr, mode="wrap")
    return f / (f.std() + 1e-8)


def _wobble(rng, scale):
    return rng.uniform(0, scale, 4) / np.arange(1, 5), rng.uniform(0, 2 * np.pi, 4)


def ct_hu(size: int, rng: np.random.Generator) -> np.ndarray:
    """One random anatomical slice in HU, ``(size, size)`` float64 (see the module doc)."""
    n = 2 * size  # supersampled grid
    lin = (np.arange(n) + 0.5) / n * 2 - 1
    X, Y = np.meshgrid(lin, lin)
    img = np.full((n, n), -1000.0)
    tex = _field(rng, (n, n), corr=n / 40)
    fine = _field(rng, (n, n), corr=n / 120)

    # --- body outline, fat layer, muscle wall -------------------------------------
    bw, bh = rng.uniform(0.78, 0.94), rng.uniform(0.56, 0.76)
    cy0 = rng.uniform(-0.04, 0.06)
    wob = _wobble(rng, 0.08)
    body = _ellipse(X, Y, 0, cy0, bw, bh, wobble=wob)
    fat_t = rng.uniform(0.03, 0.09)
    inner = _ellipse(X, Y, 0, cy0, bw - fat_t, bh - fat_t * 0.9, wobble=wob)
    wall_t = rng.uniform(0.03, 0.06)
    cavity = _ellipse(X, Y, 0, cy0 + 0.01, bw - fat_t - wall_t, bh - fat_t - wall_t, wobble=wob)
    img[body] = 40.0  # skin
    img[_ellipse(X, Y, 0, cy0, bw - 0.012, bh - 0.012, wobble=wob)] = rng.uniform(-115, -85)
    img[inner] = rng.uniform(35, 55)  # muscle
    img[cavity] = rng.uniform(-60, 10)  # visceral fat / mixed background
    thorax = rng.random() < 0.5

    # --- spine: vertebral body, canal, posterior elements ------------------------
    vy = cy0 + bh - fat_t - wall_t - rng.uniform(0.16, 0.22)
    vr = rng.uniform(0.09, 0.12)
    img[_ellipse(X, Y, 0, vy + 0.1, 0.2, 0.1)] = rng.uniform(40, 60)  # paraspinal muscle
    img[_ellipse(X, Y, 0, vy, vr, vr * 0.9)] = rng.uniform(700, 1000)
    img[_ellipse(X, Y, 0, vy, vr * 0.8, vr * 0.72)] = rng.uniform(180, 320)
    img[_ellipse(X, Y, 0, vy + vr * 1.35, vr * 0.28, vr * 0.22, wobble=None)] = 10.0  # canal (CSF)
    for side in (-1, 1):  # pedicles / transverse processes
        img[_ellipse(X, Y, side * vr * 0.75, vy + vr * 1.2, vr * 0.5, vr * 0.16, angle=side * 0.6)] = 650.0
    img[_ellipse(X, Y, 0, vy + vr * 1.9, vr * 0.15, vr * 0.5)] = 600.0  # spinous process

    # --- aorta (left-anterior of the spine) ---------------------------------------
    ar = rng.uniform(0.045, 0.07)
    contrast = rng.random() < 0.6
    blood = rng.uniform(140, 220) if contrast else rng.uniform(35, 50)
    img[_ellipse(X, Y, rng.uniform(0.04, 0.1), vy - vr - ar - 0.01, ar, ar)] = blood

    organs = []
    if thorax:
        # lungs with vessel tree, heart, ribs
        lw, lh = rng.uniform(0.26, 0.36), rng.uniform(0.36, 0.52)
        ly = cy0 - rng.uniform(0.0, 0.08)
        for side in (-1, 1):
            lung = _ellipse(X, Y, side * rng.uniform(0.33, 0.42), ly, lw, lh, angle=side * rng.uniform(-0.2, 0.2),
                            wobble=_wobble(rng, 0.12)) & cavity
            lung &= ~_ellipse(X, Y, 0, vy, vr * 1.6, vr * 1.6)
            img[lung] = rng.uniform(-900, -830) + 25 * fine[lung]
            vessels = (fine > rng.uniform(1.6, 2.2)) & lung
            img[vessels] = rng.uniform(-300, 40)
            organs.append(("lung", lung))
        hx, hy = rng.uniform(-0.12, 0.02), cy0 - rng.uniform(0.05, 0.18)
        heart = _ellipse(X, Y, hx, hy, rng.uniform(0.2, 0.28), rng.uniform(0.17, 0.24), angle=rng.uniform(-0.6, 0.2))
        img[heart] = 40.0
        img[_ellipse(X, Y, hx + 0.03, hy, 0.12, 0.1, angle=0.3) & heart] = blood
        organs.append(("soft", heart))
        n_ribs = rng.integers(4, 8)
        for k in range(n_ribs):
            t = np.pi * (0.15 + 0.7 * k / max(n_ribs - 1, 1)) + rng.normal(0, 0.05)
            for side in (-1, 1):
                rx = side * (bw - fat_t - wall_t * 0.5) * np.cos(t - np.pi / 2 + np.pi / 2) * 0.98
                ry = cy0 + (bh - fat_t - wall_t * 0.5) * np.sin(t) * 0.98
                if ry < cy0 - 0.1 and abs(rx) < 0.15:
                    continue  # no ribs over the sternum gap
                img[_ellipse(X, Y, rx, ry, 0.03, 0.022, angle=t)] = rng.uniform(700, 1000)
                img[_ellipse(X, Y, rx, ry, 0.016, 0.011, angle=t)] = rng.uniform(200, 400)
    else:
        # liver (patient's right = image left), spleen, kidneys, bowel gas, stomach
        liver = _ellipse(X, Y, -rng.uniform(0.25, 0.35), cy0 - rng.uniform(0.0, 0.1), rng.uniform(0.32, 0.45),
                         rng.uniform(0.3, 0.42), angle=rng.uniform(-0.4, 0.1), wobble=_wobble(rng, 0.15)) & cavity
        img[liver] = rng.uniform(50, 70)
        organs.append(("soft", liver))
        if rng.random() < 0.7:
            spleen = _ellipse(X, Y, rng.uniform(0.4, 0.52), vy - rng.uniform(0.0, 0.12), rng.uniform(0.1, 0.16),
                              rng.uniform(0.13, 0.2), angle=rng.uniform(-0.8, -0.2)) & cavity
            img[spleen] = rng.uniform(40, 55)
            organs.append(("soft", spleen))
        for side in (-1, 1):
            if rng.random() < 0.85:
                kx, ky = side * rng.uniform(0.24, 0.32), vy - rng.uniform(-0.02, 0.06)
                kid = _ellipse(X, Y, kx, ky, rng.uniform(0.08, 0.11), rng.uniform(0.12, 0.16), angle=side * 0.5)
                img[kid] = rng.uniform(140, 200) if contrast else rng.uniform(30, 40)
                img[_ellipse(X, Y, kx - side * 0.02, ky, 0.035, 0.06, angle=side * 0.5)] = rng.uniform(0, 20)
                organs.append(("soft", kid))
        for _ in range(rng.integers(2, 8)):  # bowel loops with gas/fluid
            gx, gy = rng.uniform(-0.4, 0.45), cy0 - rng.uniform(0.05, bh * 0.7)
            loop = _ellipse(X, Y, gx, gy, rng.uniform(0.05, 0.1), rng.uniform(0.04, 0.08), angle=rng.uniform(0, np.pi))
            loop &= cavity & (img < 100)
            img[loop] = rng.uniform(20, 40)
            gas = _ellipse(X, Y, gx, gy, rng.uniform(0.02, 0.06), rng.uniform(0.02, 0.05)) & loop
            img[gas] = -1000.0 if rng.random() < 0.6 else 5.0

    # --- texture on soft tissue, lesions ------------------------------------------
    soft = body & (img > -200) & (img < 300)
    img[soft] += rng.uniform(8, 20) * tex[soft]
    for kind, organ in organs:
        ys, xs = np.nonzero(organ)
        if len(ys) == 0:
            continue
        for _ in range(rng.poisson(0.8)):
            i = rng.integers(len(ys))
            r = rng.uniform(0.015, 0.06)
            lesion = _ellipse(X, Y, lin[xs[i]], lin[ys[i]], r, r * rng.uniform(0.7, 1.3), angle=rng.uniform(0, np.pi))
            lesion &= organ
            img[lesion] = rng.uniform(-20, 60) if kind == "lung" else img[lesion] + rng.choice([-1, 1]) * rng.uniform(20, 60)

    # --- anti-alias: 2x2 area average --------------------------------------------
    return img.reshape(size, 2, size, 2).mean(axis=(1, 3))


def _rngs(seed: int, stream: int, n: int, start: int = 0) -> list[np.random.Generator]:
    return [np.random.default_rng([seed, stream, start + k]) for k in range(n)]


def ct(
    n: int,
    size: int = 64,
    generator: torch.Generator | int | None = 0,
    *,
    stream: int = 0,
    start: int = 0,
    window: tuple[float, float] = HU_WINDOW,
) -> torch.Tensor:
    """``n`` random anatomical CT slices, ``(n, 1, size, size)`` float32 in ``[0, 1]``.

    :param n: number of slices.
    :param size: image side in pixels.
    :param generator: a seed (int) or a ``torch.Generator`` (its ``initial_seed()`` is
        used, so the result does not depend on its current state).
    :param stream: independent stream of slices for the same seed; invdiff trains on
        stream 0 and holds out stream 1 (:func:`invdiff.data.heldout`).
    :param start: index of the first slice: slice ``k`` depends only on
        ``(seed, stream, start + k)``.
    :param window: HU window mapped to ``[0, 1]`` (default ``[-1000, 1000]``).

    >>> x = ct(2, size=32, generator=0)
    >>> x.shape, bool(torch.equal(x, ct(2, size=32, generator=0)))
    (torch.Size([2, 1, 32, 32]), True)
    >>> bool(torch.equal(x[1], ct(1, size=32, generator=0, start=1)[0]))
    True
    """
    if n < 0 or size < 8:
        raise ValueError(f"ct phantoms need n >= 0 and size >= 8, got n={n}, size={size}")
    seed = generator.initial_seed() if isinstance(generator, torch.Generator) else int(generator or 0)
    slices = [hu_to_unit(ct_hu(size, rng), window) for rng in _rngs(seed, stream, n, start)]
    if not slices:
        return torch.zeros(0, 1, size, size)
    return torch.from_numpy(np.stack(slices)[:, None].astype(np.float32))


# ----------------------------------------------------------------------------------
# volumes: anatomy that varies smoothly along z
# ----------------------------------------------------------------------------------


class SmoothDraws:
    r"""A stand-in for :class:`numpy.random.Generator` whose draws vary smoothly with a
    position :math:`t \in [0, 1]` along z, so that :func:`ct_hu` called once per slice gives
    a volume whose anatomy changes continuously between slices.

    The ``k``-th call (and each element of it) gets its own Gaussian process along z,

    .. math::

        g_k(t) = \frac{c_k + s\, h_k(t)}{\sqrt{1 + s^2}}, \qquad c_k \sim \mathcal N(0, 1), \qquad
        h_k(t) = \sqrt{2/J} \sum_{j=1}^{J} \cos(\omega_{kj} t + \phi_{kj}),\;
        \omega_{kj} \sim \mathcal N(0, \ell^{-2}),

    a unit-variance process with squared-exponential correlation of length :math:`\ell`
    (random Fourier features, :math:`J = 16`), so that every draw has its usual marginal
    distribution at every ``t``: ``uniform`` returns :math:`a + (b - a)\,\Phi(g_k(t))`,
    ``normal`` :math:`\mu + \sigma g_k(t)`, ``standard_normal`` (texture fields) the rotation
    :math:`\cos\theta_k(t)\, F_1 + \sin\theta_k(t)\, F_2` of two fixed white-noise fields with
    :math:`\theta_k = \tfrac{\pi}{2} s\, h_k(t)`. The discrete draws (``random``,
    ``integers``, ``poisson``, ``choice``) are taken at :math:`c_k` alone and do not vary,
    so every slice makes the same sequence of calls (same organs present, same lesion
    count) and call ``k`` means the same thing in every slice.

    :param seed: volume seed; draw ``k`` depends only on ``(seed, k)``.
    :param t: position along z in ``[0, 1]``.
    :param variation: :math:`s`, how much a draw moves over the volume (0: every slice equal).
    :param length: :math:`\ell`, the correlation length along z, as a fraction of the depth.
    """

    def __init__(self, seed: tuple[int, ...], t: float, variation: float = 0.6, length: float = 0.35) -> None:
        self.seed, self.t, self.s, self.length = tuple(seed), float(t), float(variation), float(length)
        self.k = 0

    def _process(self, size) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
        rng = np.random.default_rng([*self.seed, self.k])
        self.k += 1
        shape = () if size is None else ((size,) if np.isscalar(size) else tuple(size))
        c = rng.standard_normal(shape)
        omega = rng.standard_normal((*shape, 16)) / self.length
        phi = rng.uniform(0, 2 * np.pi, (*shape, 16))
        h = np.sqrt(2 / 16) * np.cos(omega * self.t + phi).sum(-1)
        return c, h, rng

    def _gauss(self, size) -> tuple[np.ndarray, np.random.Generator]:
        c, h, rng = self._process(size)
        return (c + self.s * h) / np.sqrt(1 + self.s**2), rng

    def uniform(self, low=0.0, high=1.0, size=None):
        from scipy.special import ndtr

        g, _ = self._gauss(size)
        out = low + (high - low) * ndtr(g)
        return float(out) if size is None else out

    def normal(self, loc=0.0, scale=1.0, size=None):
        g, _ = self._gauss(size)
        out = loc + scale * g
        return float(out) if size is None else out

    def standard_normal(self, size=None):
        c, h, rng = self._process(None)
        theta = 0.5 * np.pi * self.s * float(h)
        shape = () if size is None else ((size,) if np.isscalar(size) else tuple(size))
        return np.cos(theta) * rng.standard_normal(shape) + np.sin(theta) * rng.standard_normal(shape)

    def _constant(self) -> float:
        from scipy.special import ndtr

        c, _, _ = self._process(None)
        return float(ndtr(c))  # a uniform number, the same in every slice

    def random(self, size=None):
        if size is not None:
            return np.array([self._constant() for _ in range(int(np.prod(size)))]).reshape(size)
        return self._constant()

    def integers(self, low, high=None, size=None):
        low, high = (0, low) if high is None else (low, high)
        return int(low + min(int(self._constant() * (high - low)), high - low - 1))

    def poisson(self, lam=1.0, size=None):
        from scipy.stats import poisson

        return int(poisson.ppf(self._constant(), lam))

    def choice(self, a, size=None):
        return a[self.integers(len(a))]


def ct_volume(
    depth: int,
    size: int = 128,
    seed: int = 0,
    *,
    stream: int = 1,
    variation: float = 0.6,
    length: float = 0.35,
    window: tuple[float, float] = HU_WINDOW,
) -> torch.Tensor:
    """A CT phantom volume ``(1, 1, depth, size, size)`` float32 in ``[0, 1]`` whose anatomy
    varies smoothly along z: slice ``d`` is :func:`ct_hu` drawn from :class:`SmoothDraws` at
    ``t = d / (depth - 1)``, so organ outlines, sizes, positions, intensities and textures
    move continuously from slice to slice (the ground truth that z-coupled reconstruction is
    measured against), while which organs are present stays fixed.

    :param depth: number of slices.
    :param size: slice side in pixels.
    :param seed: volume seed; stream 1 (the default) is the held-out stream of the shipped
        CT priors (their training slices come from :func:`ct` stream 0).
    :param variation: how much each draw moves over the volume (0: ``depth`` equal slices).
    :param length: correlation length along z, as a fraction of the depth (smaller: faster change).
    :param window: HU window mapped to ``[0, 1]``.

    >>> v = ct_volume(4, size=32)
    >>> v.shape, bool(torch.equal(v, ct_volume(4, size=32)))
    (torch.Size([1, 1, 4, 32, 32]), True)
    """
    if depth < 1 or size < 8:
        raise ValueError(f"ct volumes need depth >= 1 and size >= 8, got depth={depth}, size={size}")
    ts = np.linspace(0, 1, depth) if depth > 1 else np.zeros(1)
    slices = [hu_to_unit(ct_hu(size, SmoothDraws((int(seed), int(stream), 3), t, variation, length)), window)
              for t in ts]
    return torch.from_numpy(np.stack(slices)[None, None].astype(np.float32))
