"""The operators on every available device: sparse-view, limited-angle and fan-beam CT, FFT MRI
(single- and multi-coil) and blur, with the exactness of ``tests/test_operators.py``.

Per device: every buffer of the operator lives on it (nothing left on the CPU); adjointness
and ``A_vjp`` against autograd in float64; ``A``, ``A_adjoint`` and ``A_dagger`` agree with the
CPU operator (the CPU runs scipy / numpy kernels, other devices torch's sparse CSR and FFTs:
agreement within float64 rounding, or float32 for ``A_dagger``); a seeded measurement is drawn
on the device from the device's generator. CUDA is skipped, with the reason, on a machine
without it; on the CPU the same checks run (the CPU against itself, and the torch code path
of the CT operator that other devices take, forced on the CPU).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from invdiff import operators

TASKS = ["ct-sparse-30", "ct-limited-90", "ct-fan-90", "mri-4x", "mri-multicoil-8x", "deblur-gauss", "deblur-motion"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                                 reason="no CUDA device on this machine"))]


def _size(name: str) -> tuple[int, int, int]:
    return (1, 37, 31) if name.startswith(("ct-", "mri-")) else (3, 37, 31)


def _inner(a, b):
    return (a * b).sum()


@pytest.fixture(scope="module")
def cpu_ops():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = operators.make(name, _size(name), seed=0)
        return cache[name]

    return get


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", TASKS)
def test_operator_on_device(name, device, cpu_ops):
    physics = operators.make(name, _size(name), seed=0, device=device)
    reference = cpu_ops(name)
    dev = torch.device(device)
    for what, t in list(physics.named_buffers()) + list(physics.named_parameters()):
        assert t.device.type == dev.type, f"{name}: {what} is on {t.device}, not {device}"
    g = torch.Generator().manual_seed(0)
    x = torch.rand((2, *_size(name)), generator=g, dtype=torch.float64)
    xd = x.to(dev)
    y = physics.A(xd)
    assert y.device.type == dev.type
    # adjointness
    v = torch.randn(y.shape, generator=g, dtype=torch.float64).to(dev)
    lhs, rhs = _inner(y, v), _inner(xd, physics.A_adjoint(v))
    assert abs(float(lhs - rhs)) / abs(float(lhs)) < 1e-10
    # A_vjp against autograd
    xg = xd.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(_inner(physics.A(xg), v), xg)
    torch.testing.assert_close(physics.A_vjp(xd, v), grad, rtol=1e-9, atol=1e-10 * float(grad.abs().max()))
    # the CPU operator's results
    torch.testing.assert_close(y.cpu(), reference.A(x), rtol=1e-9, atol=1e-10 * float(y.abs().max()))
    torch.testing.assert_close(physics.A_adjoint(v).cpu(), reference.A_adjoint(v.cpu()), rtol=1e-9,
                               atol=1e-10 * float(physics.A_adjoint(v).abs().max()))
    y32 = reference.A(x.float())
    ours = physics.A_dagger(y32.to(dev)).cpu()
    torch.testing.assert_close(ours, reference.A_dagger(y32), rtol=1e-4, atol=1e-5 * float(ours.abs().max()))
    # a seeded measurement, drawn on the device
    m1, m2 = physics(xd.float(), seed=3), physics(xd.float(), seed=3)
    assert m1.device.type == dev.type and torch.equal(m1, m2)
    noise = (m1 - physics.A(xd.float())).float()
    sigma = float(physics.noise_model.sigma)
    if name.startswith("mri-"):  # noise only on the sampled k-space entries
        noise = noise[physics.A(torch.ones_like(xd.float())) != 0]
    assert abs(float(noise.std()) - sigma) < 0.15 * sigma


@pytest.mark.parametrize("name", ["ct-sparse-30", "ct-fan-90"])
def test_ct_device_code_path_on_the_cpu(name, monkeypatch, cpu_ops):
    """The CT operator's torch code path (what CUDA runs: torch CSR products, the torch FBP
    loop), forced on the CPU, equals the scipy / numpy path."""
    reference = cpu_ops(name)
    physics = operators.make(name, _size(name), seed=0)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((2, *_size(name)), generator=g, dtype=torch.float64)
    y = reference.A(x)
    cls = type(physics)

    def torch_spmm(self, x2d, transpose):
        return torch.sparse.mm(self._torch_matrix(transpose, x2d.dtype), x2d)

    monkeypatch.setattr(cls, "_spmm", torch_spmm)
    monkeypatch.setattr(cls, "_fbp_numpy_on_cpu", False)
    torch.testing.assert_close(physics.A(x), y, rtol=1e-12, atol=1e-12 * float(y.abs().max()))
    torch.testing.assert_close(physics.A_adjoint(y), reference.A_adjoint(y), rtol=1e-12,
                               atol=1e-12 * float(reference.A_adjoint(y).abs().max()))
    fbp = reference.A_dagger(y)
    torch.testing.assert_close(physics.A_dagger(y), fbp, rtol=1e-9, atol=1e-9 * float(fbp.abs().max()))
    assert np.isfinite(physics.A_dagger(y.float()).numpy()).all()
