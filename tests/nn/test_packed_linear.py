"""GPTQLinear and AWQLinear (both PackedLinear) against a float64 product with the weight their
codes represent, and LoRA on top of each."""

import pytest
import torch

from fourbit.nn import AWQLinear, GPTQLinear
from fourbit.quant.groupwise import GroupQuant, quantize_rtn

LAYERS = [GPTQLinear, AWQLinear]


def layer_and_reference(cls, bias=True):
    torch.manual_seed(0)
    quant = quantize_rtn(torch.randn(32, 128) * 0.1, 4, 64, sym=False)
    b = torch.randn(32) if bias else None
    layer = cls.from_quant(quant, b, group_size=64)
    # the checkpoint keeps float16 scales and bias: the reference uses exactly those values
    stored = GroupQuant(quant.codes, quant.scales.half().float(), quant.zeros, quant.g_idx, 4)
    return layer, stored.dequantize(torch.float64), (b.half().double() if bias else None)


@pytest.mark.parametrize("cls", LAYERS)
def test_forward_and_input_gradient_match_float64(cls):
    layer, w64, b64 = layer_and_reference(cls)
    x = torch.randn(3, 5, 128, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    ref = x.double() @ w64.T + b64
    # float32 products of 128 terms: relative error ~1e-7; 1e-6 leaves room
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-6
    g = torch.randn_like(y)
    y.backward(g)
    ref_grad = g.double() @ w64
    assert ((x.grad.double() - ref_grad).norm() / ref_grad.norm()) < 1e-6


@pytest.mark.parametrize("cls", LAYERS)
def test_lora_trains_on_a_packed_base(cls, lora_fit):
    # QLoRA on a GPTQ or AWQ base: only A and B learn, the loss falls far below where it starts,
    # and the base's stored tensors are untouched.
    layer, _, _ = layer_and_reference(cls, bias=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    first, last = lora_fit(layer)
    assert last < 0.1 * first
    assert not any(t.requires_grad for t in layer.state_dict(keep_vars=True).values())  # (state_dict() detaches)
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


@pytest.mark.parametrize("cls", LAYERS)
def test_a_model_cast_keeps_the_stored_types(cls):
    layer, _, _ = layer_and_reference(cls)
    stored = {name: t.clone() for name, t in layer.state_dict().items()}
    layer.to(torch.bfloat16)
    assert layer.scales.dtype == torch.float16 and layer.bias.dtype == torch.float16
    assert layer.qweight.dtype == torch.int32
    # and the values: float16 scales rounded through bfloat16 would lose mantissa bits
    assert all(torch.equal(stored[name], t) for name, t in layer.state_dict().items())
