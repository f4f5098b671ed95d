"""AWQLinear against a float64 product with the weight its codes represent, and LoRA on top."""

import pytest
import torch

from fourbit.nn.awq_linear import AWQLinear
from fourbit.quant.groupwise import GroupQuant, quantize_rtn


def layer_and_reference(bias=True):
    torch.manual_seed(0)
    quant = quantize_rtn(torch.randn(32, 128) * 0.1, 4, 64, sym=False)
    b = torch.randn(32) if bias else None
    layer = AWQLinear.from_quant(quant, b, group_size=64)
    # the checkpoint keeps float16 scales and bias: the reference uses exactly those values
    stored = GroupQuant(quant.codes, quant.scales.half().float(), quant.zeros, quant.g_idx, 4)
    return layer, stored.dequantize(torch.float64), (b.half().double() if bias else None)


def test_forward_and_input_gradient_match_float64():
    layer, w64, b64 = layer_and_reference()
    x = torch.randn(3, 5, 128, dtype=torch.float32, requires_grad=True)
    y = layer(x)
    ref = x.double() @ w64.T + b64
    # float32 products of 128 terms: relative error ~1e-7; 1e-6 leaves room
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-6
    g = torch.randn_like(y)
    y.backward(g)
    ref_grad = g.double() @ w64
    assert ((x.grad.double() - ref_grad).norm() / ref_grad.norm()) < 1e-6


def test_state_dict_is_the_gemm_layout_and_round_trips():
    layer, _, _ = layer_and_reference()
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "qweight": (torch.int32, (128, 4)), "qzeros": (torch.int32, (2, 4)), "scales": (torch.float16, (2, 32)),
        "bias": (torch.float16, (32,)),
    }
    fresh = AWQLinear(128, 32, group_size=64, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
    assert fresh.to(torch.bfloat16).scales.dtype == torch.float16  # a model cast keeps the stored types


def test_shapes_the_layout_cannot_hold_are_refused():
    with pytest.raises(ValueError, match="group_size 48 does not divide the input dimension 128"):
        AWQLinear(128, 32, group_size=48)
    with pytest.raises(ValueError, match="4-bit codes only"):
        AWQLinear(128, 32, bits=3)


def test_lora_trains_on_an_awq_base(lora_fit):
    # QLoRA on an AWQ base: only A and B learn, the loss falls far below where it starts, the base is untouched.
    layer, _, _ = layer_and_reference(bias=False)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    first, last = lora_fit(layer)
    assert last < 0.1 * first
    assert all(not t.requires_grad for t in layer.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
