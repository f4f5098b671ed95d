"""The native decoding kernels (kernels/cpu/decode.c: rms_norm, rotate, decode_attention) against
float64 math and their plain-torch twins, in each instruction set this CPU can run, and the
dispatch of kernels/rms_norm.py, rotary.py and decode_attention.py."""

import pytest
import torch

from fourbit.kernels.cpu import native
from fourbit.kernels.decode_attention import decode_attention, decode_attention_reference
from fourbit.kernels.rms_norm import rms_norm, rms_norm_reference
from fourbit.kernels.rotary import rotate_, rotated_reference

ISAS = native.runnable_isas()  # this machine's own build, plain C, and AVX2 where it runs
DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their dtype lie between a and b (same signs here)."""
    bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return (a.view(bits).long() - b.view(bits).long()).abs()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 576), (3, 100), (2, 4, 7)])
def test_rms_norm_is_the_twin_up_to_the_order_of_its_sum(isa, dtype, shape):
    x = randn(*shape, dtype=dtype) * 3
    w = (1 + 0.3 * randn(shape[-1], seed=1)).to(dtype)
    ours = native.rms_norm(x, w, 1e-5, isa=isa)
    twin = rms_norm_reference(x, w, 1e-5)
    # the differences: the order of the float32 sum of squares and the rounding of the reciprocal
    # root (1 / sqrtf against torch.rsqrt), each at most an ulp of the factor: two ulps of the output
    assert ulps_apart(ours, twin).max() <= 2
    x64 = x.double()
    exact = w.double() * x64 / (x64.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    half_ulps = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8}[dtype]  # two roundings in bf16: ~2 half ulps
    assert ((ours.double() - exact).abs() <= 2 * half_ulps * exact.abs() + 1e-6).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,q_heads,k_heads,d", [(1, 9, 3, 64), (3, 4, 4, 16), (2, 2, 1, 6)])
def test_rotate_rounds_exactly_as_the_twin(isa, dtype, rows, q_heads, k_heads, d):
    q, k = randn(rows, q_heads, d, dtype=dtype), randn(rows, k_heads, d, dtype=dtype, seed=1)
    angles = randn(rows, d // 2, seed=2) * 10
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    want_q, want_k = rotated_reference(q, cos[:, None], sin[:, None]), rotated_reference(k, cos[:, None], sin[:, None])
    native.rotate_(q, k, cos, sin, isa=isa)
    # the same roundings in the same places (each product, then the sum), no fused multiply-add
    assert torch.equal(q, want_q) and torch.equal(k, want_k)


def attention64(q, keys, values, mask, scale):
    group = q.shape[1] // keys.shape[1]
    k64 = keys.double().repeat_interleave(group, 1)
    v64 = values.double().repeat_interleave(group, 1)
    scores = torch.einsum("rhd,rhtd->rht", q.double(), k64) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask.bool()[:, None, :], float("-inf"))
    return torch.einsum("rht,rhtd->rhd", scores.softmax(-1), v64)


CASES = [(1, 9, 3, 70, 64), (3, 4, 2, 33, 20), (2, 4, 4, 1, 16), (2, 8, 1, 300, 64)]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,q_heads,kv_heads,length,d", CASES)
@pytest.mark.parametrize("padded", [False, True])
def test_decode_attention_against_float64(isa, dtype, rows, q_heads, kv_heads, length, d, padded):
    q = randn(rows, q_heads, d, dtype=dtype)
    keys = randn(rows, length, kv_heads, d, dtype=dtype, seed=1).transpose(1, 2)  # strided, as a cache may be
    values = randn(rows, kv_heads, length, d, dtype=dtype, seed=2)
    mask = None
    if padded:
        mask = torch.ones(rows, length, dtype=torch.long)
        mask[0, :length // 2] = 0  # row 0 left-padded
    scale = d ** -0.5
    ours = native.decode_attention(q, keys, values, mask, scale, isa=isa)
    exact = attention64(q, keys, values, mask, scale)
    # float32 throughout, one rounding to the output dtype at the end: half an ulp of the output
    # (at most 2^-8 of the value in bf16, 2^-23 in float32), plus float32 accumulation noise
    # against the largest value
    half_ulp = {torch.float32: 2 ** -23, torch.bfloat16: 2 ** -8}[dtype]
    noise = 1e-5 * exact.abs().max()
    assert ((ours.double() - exact).abs() <= half_ulp * exact.abs() + noise).all()
    if dtype == torch.bfloat16:  # no worse than torch's own bf16 attention, which rounds more often
        theirs = decode_attention_reference(q, keys, values, mask, scale)
        assert (ours.double() - exact).abs().max() <= (theirs.double() - exact).abs().max() + noise


def test_the_dispatch_takes_the_kernels_for_decoding_only():
    x, w = randn(1, 1, 64, dtype=torch.bfloat16), randn(64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert native.supports_decode(x, w)
        assert not native.supports_decode(x, w.float())  # mixed dtypes: the twin
        assert not native.supports_decode(x.half(), w.half())  # float16: the twin
    q, k = randn(1, 4, 16), randn(1, 2, 16)
    cos, sin = torch.ones(1, 16), torch.zeros(1, 16)
    with torch.no_grad():
        assert rotate_(q, k, cos, sin)[0] is q  # in place through the kernel
    assert rotate_(q, k, cos, sin)[0] is not q  # with gradients on: the twin, a new tensor
    xr = x.float().requires_grad_()
    y = rms_norm(xr, w.float(), 1e-5)  # the twin, differentiable
    y.sum().backward()
    assert xr.grad is not None


def test_the_kernels_serve_only_when_enabled(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    x, w = randn(2, 64), randn(64)
    assert not native.supports_decode(x, w)
    with torch.no_grad():
        assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
        q, keys = randn(1, 4, 16, dtype=torch.bfloat16), randn(1, 2, 5, 16, dtype=torch.bfloat16)
        assert torch.equal(decode_attention(q, keys, keys, None, 0.25), decode_attention_reference(q, keys, keys, None, 0.25))
