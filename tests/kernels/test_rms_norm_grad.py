"""The RMS norm's native gradient (kernels/cpu/decode.c rms_norm_backward) and the training node
that uses it (kernels/rms_norm.py) against float64 math and autograd through the plain-torch
twin, in each instruction set this CPU can run."""

import pytest
import torch

from fourbit.kernels.cpu import native
from fourbit.kernels.rms_norm import rms_norm, rms_norm_reference

ISAS = native.runnable_isas()
EPS = 1e-5


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")


def exact_grad(x, w, g):
    """dL/dx of w * x / rms(x) in float64, roundings left out."""
    x64 = x.double().requires_grad_()
    y = w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS))
    y.backward(g.double())
    return x64.grad


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,n", [(1, 1), (3, 17), (64, 576), (5, 100)])
def test_float32_gradient_is_float64_math(isa, rows, n):
    torch.manual_seed(rows * n)
    x, w, g = torch.randn(rows, n), torch.randn(n), torch.randn(rows, n)
    got = native.rms_norm_backward(x, w, g, EPS, isa=isa)
    want = exact_grad(x, w, g)
    # float32 sums over n terms and a few products: 1e-5 of the largest term r |g w| (the two
    # terms cancel where x is one value: n = 1)
    largest = (g * w).abs().max() * torch.rsqrt(x.pow(2).mean(-1) + EPS).max()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * largest.item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows,n", [(3, 17), (64, 576)])
def test_bf16_gradient_rounds_as_autograd_through_the_twin(isa, rows, n):
    torch.manual_seed(rows + n)
    x = torch.randn(rows, n).bfloat16().requires_grad_()
    w, g = torch.randn(n).bfloat16(), torch.randn(rows, n).bfloat16()
    rms_norm_reference(x, w, EPS).backward(g)
    got = native.rms_norm_backward(x.detach(), w, g, EPS, isa=isa)
    # the same bf16 product g * w, then float32 math in another order and one bf16 cast: a bf16
    # ulp (2^-7 relative) apart at most, measured against the row's largest value where terms cancel
    torch.testing.assert_close(got, x.grad, rtol=2**-7, atol=2**-7 * x.grad.abs().max().item())
    assert (got != x.grad).float().mean() < 0.05  # most values are the same bf16 number


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_node_runs_the_kernels_and_matches_the_twin(monkeypatch, dtype):
    calls = []
    for name in ("rms_norm", "rms_norm_backward"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    torch.manual_seed(0)
    x = torch.randn(2, 7, 96).to(dtype).requires_grad_()
    w = torch.randn(96).to(dtype)  # frozen, as in LoRA training
    g = torch.randn(2, 7, 96).to(dtype)
    y = rms_norm(x, w, EPS)
    y.backward(g)
    assert calls == ["rms_norm", "rms_norm_backward"]
    x2 = x.detach().clone().requires_grad_()
    y2 = rms_norm_reference(x2, w, EPS)
    y2.backward(g)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2**-7, atol=2**-7)
    torch.testing.assert_close(y, y2, **tol)  # the forward: float32 sums of squares in another order
    torch.testing.assert_close(x.grad, x2.grad, **{**tol, "atol": tol["atol"] * x2.grad.abs().max().item()})


def test_a_weight_that_trains_takes_the_twin():
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(8, requires_grad=True)
    rms_norm(x, w, EPS).sum().backward()
    assert w.grad is not None  # the native node has no gradient for w: autograd through the twin
