"""GPTQLinear against a float64 product with the weight its codes represent, and LoRA on top."""

import torch

from fourbit.nn import GPTQLinear
from fourbit.quant.groupwise import GroupQuant, quantize_rtn


def layer_and_reference(bias=True):
    torch.manual_seed(0)
    quant = quantize_rtn(torch.randn(32, 128) * 0.1, 4, 64, sym=False)
    b = torch.randn(32) if bias else None
    layer = GPTQLinear.from_quant(quant, b, group_size=64)
    # the checkpoint keeps float16 scales and bias: the reference uses exactly those values
    stored = GroupQuant(quant.codes, quant.scales.half().float(), quant.zeros, quant.g_idx, 4)
    w64 = stored.dequantize(torch.float64)
    return layer, w64, (b.half().double() if bias else None)


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


def test_state_dict_is_the_checkpoint_layout_and_round_trips():
    layer, _, _ = layer_and_reference()
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "qweight": (torch.int32, (16, 32)), "qzeros": (torch.int32, (2, 4)), "scales": (torch.float16, (2, 32)),
        "g_idx": (torch.int32, (128,)), "bias": (torch.float16, (32,)),
    }
    fresh = GPTQLinear(128, 32, bits=4, group_size=64, bias=True)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))


def test_lora_trains_on_a_gptq_base(lora_fit):
    # QLoRA on a GPTQ base: only A and B learn, and the loss falls far below where it starts.
    layer, _, _ = layer_and_reference(bias=False)
    first, last = lora_fit(layer)
    assert last < 0.1 * first
    assert all(not t.requires_grad for t in layer.state_dict().values())
