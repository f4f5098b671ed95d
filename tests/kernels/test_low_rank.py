"""A LoRA adapter's rank-r products in C (kernels/cpu/low_rank.c) against float64 math and their
plain-torch twins, in each instruction set this CPU can run, and the one-node QLoRA linear
(kernels/lora.py) through them against the module path.

Bounds, all from float64 references: a float32 sum of n products (in any order, FMA or not) is
within (n + 1) u sum |x_i y_i| of the exact sum, u = 2^-24 (the standard gamma_n bound with room
for the scale's multiply); add in bf16 rounds twice (the update, then the sum), each at most half
a bf16 ulp, 2^-9 of the value, so the bound is 2^-8 (|update| + |result|) plus the float32
sum's own error twice.
"""

import math

import pytest
import torch
from torch import nn

from fourbit.errors import InputError
from fourbit.kernels.cpu import native
from fourbit.nn import Linear4bit
from fourbit.nn.lora import DEFAULT, LoRALinear

ISAS = native.runnable_isas()
U = 2.0 ** -24  # float32 unit roundoff
SHAPES = [(1, 1, 1), (7, 33, 3), (9, 100, 17), (130, 48, 16), (64, 576, 16), (5, 20, 64)]  # (m, k, r)


@pytest.fixture(autouse=True)
def kernels_on(monkeypatch):
    monkeypatch.setenv(native.ENV, "1")


def sum_bound(x, y, terms):
    """How far a float32 sum of ``terms`` products may sit from the exact one: (terms + 1) u |x| |y|."""
    return (terms + 1) * U * (x.double().abs() @ y.double().abs())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,r", SHAPES)
def test_project_is_the_scaled_product(isa, dtype, m, k, r):
    torch.manual_seed(m * k + r)
    x, b, s = torch.randn(m, k).to(dtype), torch.randn(k, r), 0.37
    got = native.low_rank_project(x, b, s, isa=isa)
    exact = (x.double() @ b.double()) * s
    bound = sum_bound(x, b, k) * s
    assert got.dtype == torch.float32 and got.shape == (m, r)
    assert ((got.double() - exact).abs() <= bound).all()
    twin = (x.float() @ b) * s
    assert ((twin.double() - exact).abs() <= bound).all()  # the bound is one both meet


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,r", SHAPES)
def test_grad_is_the_transposed_product(isa, dtype, m, k, r):
    torch.manual_seed(m + k * r)
    u, x = torch.randn(m, r), torch.randn(m, k).to(dtype)
    got = native.low_rank_grad(u, x, isa=isa)
    exact = u.double().T @ x.double()
    assert got.shape == (r, k)
    assert ((got.double() - exact).abs() <= sum_bound(u.T, x, m)).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,k,r", SHAPES)
def test_add_rounds_as_the_twin(isa, dtype, m, k, r):
    torch.manual_seed(m * r + k)
    y, u, v = torch.randn(m, k).to(dtype), torch.randn(m, r), torch.randn(r, k)
    twin = y + (u @ v).to(dtype)
    got = native.low_rank_add_(y.clone(), u, v, isa=isa)
    update = u.double() @ v.double()
    exact = y.double() + update
    err = sum_bound(u, v, r)
    if dtype == torch.float32:  # one float32 sum, then one float32 add
        bound = err + U * exact.abs() * 2
    else:
        bound = 2 * err + 2.0 ** -8 * (update.abs() + exact.abs())
    for out in (got, twin):
        assert ((out.double() - exact).abs() <= bound).all()
    # in float32 the two differ only by their sums' orders; in bf16 they rarely differ at all
    if dtype == torch.bfloat16:
        assert (got != twin).float().mean() < 0.01


@pytest.mark.parametrize("isa", ISAS)
def test_add_keeps_nan_and_writes_only_y(isa):
    # y is the front of a longer buffer: its last row's 40 columns end in a partial vector of 8,
    # and the values past y must stay as they were
    buffer = torch.full((4 * 40 + 16,), 7.0, dtype=torch.bfloat16)
    y = buffer[:160].view(4, 40)
    y.copy_(torch.randn(4, 40))
    y[1, 3] = math.nan
    u, v = torch.randn(4, 2), torch.randn(2, 40)
    native.low_rank_add_(y, u, v, isa=isa)
    assert torch.isnan(y[1, 3]) and not torch.isnan(y[0]).any()
    assert buffer[160:].eq(7.0).all()
    with pytest.raises(InputError, match="contiguous"):
        native.low_rank_add_(y.T, u.T[:, :2].contiguous(), v)


def test_supports_low_rank_names_what_it_takes():
    x, a, b = torch.randn(3, 8), torch.randn(4, 8), torch.randn(6, 4)
    assert native.supports_low_rank(x, a, b)
    assert not native.supports_low_rank(x.half(), a, b)  # x float32 or bf16
    assert not native.supports_low_rank(x, a.bfloat16(), b)  # adapters float32
    big = native.MAX_RANK + 1
    assert not native.supports_low_rank(x, torch.randn(big, 8), torch.randn(6, big))  # past the rank measured


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("four_bit", [True, False], ids=["4-bit base", "dense base"])
def test_lora_node_through_the_kernels_matches_the_module_path(monkeypatch, compute_dtype, bias, four_bit):
    """The node's native path against LoRALinear's modules (autograd's gradients). Forward: the
    update's sums in another order can move a bf16 output by one ulp (eps relative), and a
    float32 one by float32 rounding of sums of ~100 terms (1e-5 of the largest output);
    gradients: 1e-6 relative in float32 (sums of a few dozen terms in
    other orders), 1e-2 in bf16 (bf16 operands), as tests/kernels/test_qlora_linear.py."""
    import fourbit.kernels.lora as lora

    calls = []
    for name in ("low_rank_project", "low_rank_grad", "low_rank_add_"):
        real = getattr(native, name)
        monkeypatch.setattr(lora.cpu_native, name, lambda *a, _real=real, _name=name, **k: calls.append(_name)
                            or _real(*a, **k))
    torch.manual_seed(0)
    dense = nn.Linear(96, 40, bias=bias)
    if four_bit:
        base = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
    else:
        base = dense.to(compute_dtype).requires_grad_(False)
    layer = LoRALinear(base)
    adapter = layer.add_adapter(DEFAULT, r=8, alpha=16)
    nn.init.normal_(adapter.lora_B.weight)
    x = torch.randn(3, 5, 96, dtype=compute_dtype, requires_grad=True)
    fused = layer(x)
    g = torch.randn_like(fused)
    fused.backward(g)
    params = (x, adapter.lora_A.weight, adapter.lora_B.weight)
    grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    assert sorted(set(calls)) == ["low_rank_add_", "low_rank_grad", "low_rank_project"]  # the kernels ran

    dropped = x.to(adapter.lora_A.weight.dtype)
    result = base(x)
    expected = result + (adapter.lora_B(adapter.lora_A(dropped)) * adapter.scaling).to(result.dtype)
    expected.backward(g)
    if compute_dtype == torch.bfloat16:
        torch.testing.assert_close(fused, expected, rtol=torch.finfo(compute_dtype).eps, atol=0)
    else:
        torch.testing.assert_close(fused, expected, rtol=0, atol=1e-5 * expected.abs().max().item())
    tolerance = 1e-6 if compute_dtype == torch.float32 else 1e-2
    for got, want in zip(grads, (t.grad for t in params)):
        assert got.dtype == want.dtype and got.shape == want.shape and relative(got, want) < tolerance
