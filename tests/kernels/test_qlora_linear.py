"""The one-node QLoRA linear against the same function built from separate modules.

The reference is LoRALinear's module path written out (base layer, then lora_A, lora_B, scale,
cast, add) with autograd deriving the gradients, so the hand-written chain rule is checked
against autograd's. Forward: the same operations in the same order, so equal bit for bit.
Gradients: the same products, but autograd's linear backward may order the sum over tokens
differently, so float32 gets 1e-6 relative (float32 rounding over a few hundred terms) and
bf16 compute 1e-2 (bf16 operands, see test_triton_matmul_4bit.py).
"""

import pytest
import torch
from torch import nn

from fourbit.errors import InputError
from fourbit.kernels.lora import qlora_linear
from fourbit.kernels.matmul_4bit import matmul_4bit_grad
from fourbit.nn import Linear4bit
from fourbit.nn.lora import DEFAULT, LoRAAdapter, LoRALinear


def reference(layer: LoRALinear, adapter: LoRAAdapter, x):
    dropped = x.to(adapter.lora_A.weight.dtype)
    update = adapter.lora_B(adapter.lora_A(dropped)) * adapter.scaling
    result = layer.base_layer(x)
    return result + update.to(result.dtype)


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("compute_dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("four_bit", [True, False], ids=["4-bit base", "dense base"])
def test_fused_equals_the_module_path(compute_dtype, tolerance, bias, four_bit):
    torch.manual_seed(0)
    dense = nn.Linear(96, 40, bias=bias)
    if four_bit:
        base = Linear4bit.from_linear(dense, compute_dtype=compute_dtype)
    else:  # 16-bit LoRA: a frozen nn.Linear in the compute dtype
        base = dense.to(compute_dtype).requires_grad_(False)
    layer = LoRALinear(base)
    adapter = layer.add_adapter(DEFAULT, r=8, alpha=16)
    nn.init.normal_(adapter.lora_B.weight)  # B starts at zero; make the update count
    x = torch.randn(3, 5, 96, dtype=compute_dtype, requires_grad=True)

    assert layer._fusable(adapter) if four_bit else layer._fusable_dense(adapter)
    fused = layer(x)
    g = torch.randn_like(fused)
    fused.backward(g)
    grads = [t.grad.clone() for t in (x, adapter.lora_A.weight, adapter.lora_B.weight)]
    for t in (x, adapter.lora_A.weight, adapter.lora_B.weight):
        t.grad = None

    expected = reference(layer, adapter, x)
    expected.backward(g)
    assert torch.equal(fused, expected)
    for got, want in zip(grads, (x.grad, adapter.lora_A.weight.grad, adapter.lora_B.weight.grad)):
        assert got.dtype == want.dtype and relative(got, want) < tolerance


@pytest.mark.parametrize("x_trains", [False, True])
def test_backward_computes_only_the_gradients_asked_for(monkeypatch, x_trains):
    # A frozen A and an input that needs no gradient (the first layer's input) cost nothing in
    # backward: dL/dx is a product with the whole 4-bit weight, the priciest part of the pass, so
    # it is computed only when x requires grad. dL/dB is checked against its formula in float64.
    import fourbit.kernels.lora as lora

    calls = []
    monkeypatch.setattr(lora, "matmul_4bit_grad", lambda *args: calls.append(1) or matmul_4bit_grad(*args))
    torch.manual_seed(0)
    base = Linear4bit.from_linear(nn.Linear(64, 32), compute_dtype=torch.float32)
    a, b = torch.randn(4, 64), torch.randn(32, 4, requires_grad=True)
    x = torch.randn(2, 64, requires_grad=x_trains)
    g = torch.randn(2, 32)
    qlora_linear(x, base.weight, base.quant_state, base.bias, a, b, 2.0).backward(g)
    assert len(calls) == (1 if x_trains else 0)
    expected_b = (2.0 * g.double()).T @ (x.detach().double() @ a.double().T)  # dL/dB = (s g)^T (x A^T)
    assert relative(b.grad, expected_b) < 1e-6  # float32 products of a few dozen terms
    assert a.grad is None and (x.grad is not None) == x_trains


def test_a_dense_base_that_trains_keeps_the_module_path():
    # lora_linear differentiates only the adapter: a base weight or bias that trains (full
    # fine-tuning beside LoRA) goes through the modules, where autograd sees it
    layer = LoRALinear(nn.Linear(16, 8))
    adapter = layer.add_adapter(DEFAULT, r=2, alpha=4)
    assert not layer._fusable_dense(adapter)
    layer.base_layer.requires_grad_(False)
    assert layer._fusable_dense(adapter)
    handle = layer.base_layer.register_forward_hook(lambda *args: None)  # a hook must see the base's forward
    assert not layer._fusable_dense(adapter)
    handle.remove()
    layer.base_layer.bias.requires_grad_(True)
    assert not layer._fusable_dense(adapter)
    from fourbit.kernels.lora import lora_linear
    with pytest.raises(InputError, match="frozen"):
        lora_linear(torch.randn(2, 16), layer.base_layer.weight, layer.base_layer.bias, adapter.lora_A.weight,
                    adapter.lora_B.weight, 2.0)


def test_a_training_bias_is_refused():
    base = Linear4bit.from_linear(nn.Linear(64, 32))
    base.bias.requires_grad_(True)
    with pytest.raises(ValueError, match="bias must not require grad"):
        qlora_linear(torch.randn(2, 64), base.weight, base.quant_state, base.bias, torch.randn(4, 64), torch.randn(32, 4), 1.0)
    layer = LoRALinear(base)
    assert not layer._fusable(layer.add_adapter(r=4, alpha=4))  # the module path takes it instead


def test_dropout_and_dora_keep_the_module_path():
    layer = LoRALinear(Linear4bit.from_linear(nn.Linear(64, 32)))
    assert not layer._fusable(layer.add_adapter("dropout", r=4, alpha=4, dropout=0.1))
    assert not layer._fusable(layer.add_adapter("dora", r=4, alpha=4, use_dora=True))
    dense = LoRALinear(nn.Linear(64, 32))
    assert not dense._fusable(dense.add_adapter(r=4, alpha=4))
