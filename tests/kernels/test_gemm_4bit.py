"""The float32 training products of a 4-bit weight that dequantize inside themselves
(kernels/cpu/gemm_4bit.c: ``Weight4bit.linear`` and ``linear_grad``, through
``matmul_4bit`` / ``matmul_4bit_grad`` and Linear4bit) against float64 math on the reference
dequantization and against their plain-torch twins (dequantize, then matmul). The suite turns the
run-time-compiled kernels off elsewhere (tests/conftest.py); here they are on."""

import pytest
import torch
from torch import nn

from fourbit.kernels.cpu import native
from fourbit.kernels.dequantize import state_args
from fourbit.kernels.matmul_4bit import matmul_4bit, matmul_4bit_grad
from fourbit.nn.linear4bit import Linear4bit
from fourbit.quant import dequantize_4bit_reference, quantize_4bit

# the builds this CPU runs that have the products: AVX-512 and AVX2 (plain C leaves them to the twins)
ISAS = [isa for isa in native.runnable_isas() if isa != "generic"]


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    if not native.supports_training(torch.zeros(64, 64), 64, 256, 64):
        pytest.skip("the in-product dequantization is built for AVX-512 and AVX2 (elsewhere the twins serve)")


def weight(n, k, quant_type="nf4", blocksize=64, double_quant=True, seed=0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed, state = quantize_4bit(w, quant_type, blocksize, double_quant)
    return packed, state, dequantize_4bit_reference(packed, state, torch.float32).double()


def check(got, want64, twin):
    """float32 sums in another order than the twin's (ours: one running sum over the depth; torch's
    BLAS: blocked partial sums). ``want64`` = (the float64 value, the sum of |terms|, the depth).
    Each value within the classical bound for a float32 sum of that depth in any order (depth x
    eps x the sum of |terms|); the whole, and its distance to the twin, within the statistical
    size of depth roundings (sqrt(depth) x eps x the sum of |terms|, in norm; ours measured
    0.006-0.04 of it), while one dropped term per sum lands hundreds of times outside it."""
    want, magnitude, depth = want64
    eps = torch.finfo(torch.float32).eps
    err = (got.double() - want).abs()
    assert (err <= depth * eps * magnitude + 1e-30).all()
    statistical = depth ** 0.5 * eps * magnitude.norm()
    assert err.norm() <= statistical
    assert (got.double() - twin.double()).norm() <= 2 * statistical


# rows past a block of 12 (AVX2: 6) and past 32; outputs past a panel of 32 (AVX2: 16); depths of
# one block to several; blocks of 32, 64, 128; NF4 and FP4; with and without double quantization
CASES = [
    (33, 32, 64, "nf4", 64, True),
    (47, 40, 128, "fp4", 64, False),
    (100, 100, 64, "nf4", 32, True),
    (517, 576, 576, "nf4", 64, True),
    (64, 1536, 576, "nf4", 64, True),
    (45, 64, 1536, "nf4", 128, True),
    (37, 33, 256, "fp4", 128, True),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("m, n, k, quant_type, blocksize, double_quant", CASES)
def test_forward_and_its_gradient_compute_the_dequantized_products(isa, m, n, k, quant_type, blocksize, double_quant):
    packed, state, w64 = weight(n, k, quant_type, blocksize, double_quant)
    gen = torch.Generator().manual_seed(1)
    x, g, bias = torch.randn(m, k, generator=gen), torch.randn(m, n, generator=gen), torch.randn(n, generator=gen)
    w = native.Weight4bit(packed, *state_args(state))
    assert w.trains(x, isa)

    y = w.linear(x, bias, isa)
    twin = nn.functional.linear(x, w64.float(), bias)
    check(y, (x.double() @ w64.T + bias.double(), x.double().abs() @ w64.abs().T + bias.double().abs(), k + 1), twin)

    dx = w.linear_grad(g, isa)
    twin = g @ w64.float()
    check(dx, (g.double() @ w64, g.double().abs() @ w64.abs(), n), twin)
    assert y.shape == (m, n) and dx.shape == (m, k) and y.dtype == dx.dtype == torch.float32


@pytest.mark.parametrize("threads", [1, 3])
def test_any_number_of_threads_gives_the_same_values(threads):
    # each 32-wide panel or slab is one thread's whole unit of work, so the sums do not depend on
    # how many threads share them: bit for bit
    packed, state, _ = weight(100, 128)
    x, g = torch.randn(70, 128), torch.randn(70, 100)
    before = torch.get_num_threads()
    want = (matmul_4bit(x, packed, state), matmul_4bit_grad(g, packed, state))
    torch.set_num_threads(threads)
    try:
        got = (matmul_4bit(x, packed, state), matmul_4bit_grad(g, packed, state))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_batched_inputs_keep_their_leading_dimensions():
    # through the ops the layers call (matmul_4bit, matmul_4bit_grad), which choose this build
    packed, state, w64 = weight(64, 64)
    x, g = torch.randn(3, 20, 64), torch.randn(3, 20, 64)
    y, dx = matmul_4bit(x, packed, state), matmul_4bit_grad(g, packed, state)
    assert y.shape == (3, 20, 64) and dx.shape == (3, 20, 64)
    torch.testing.assert_close(y.double(), x.double() @ w64.T, rtol=0, atol=1e-4)  # 64 terms of ~|8|
    torch.testing.assert_close(dx.double(), g.double() @ w64, rtol=0, atol=1e-4)


def test_only_float32_with_many_rows_and_whole_blocks_take_it():
    packed, state, _ = weight(64, 64)
    w = native.Weight4bit(packed, *state_args(state))
    assert w.trains(torch.zeros(33, 64))
    assert not w.trains(torch.zeros(native.MAX_ROWS, 64))  # few rows: the few-row matmul's
    assert not w.trains(torch.zeros(64, 64, dtype=torch.bfloat16))  # bf16: oneDNN's bf16 product
    odd_packed, odd_state, _ = weight(10, 96)  # rows of 96: not whole 64-blocks
    assert not native.Weight4bit(odd_packed, *state_args(odd_state)).trains(torch.zeros(64, 96))
    assert not native._trains(torch.zeros(64, 64), "generic")  # plain C leaves it to the twins


def test_a_linear4bit_trains_through_it_as_through_the_twin(monkeypatch):
    torch.manual_seed(0)
    layer = Linear4bit.from_linear(nn.Linear(128, 96), compute_dtype=torch.float32)
    x = torch.randn(2, 40, 128, requires_grad=True)
    g = torch.randn(2, 40, 96)
    layer(x).backward(g)
    fused_grad = x.grad.clone()
    fused = layer(x.detach())
    monkeypatch.setenv(native.ENV, "0")  # the twin: dequantize, then matmul
    x.grad = None
    layer(x).backward(g)
    w64 = layer.dequantize(torch.float32).double()
    want = x.detach().double() @ w64.T + layer.bias.detach().double()
    check(fused, (want, x.detach().double().abs() @ w64.abs().T + layer.bias.detach().double().abs(), 129),
          layer(x.detach()))
    check(fused_grad, (g.double() @ w64, g.double().abs() @ w64.abs(), 96), x.grad)
