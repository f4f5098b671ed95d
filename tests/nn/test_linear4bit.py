"""Linear4bit against a dense nn.Linear holding the dequantized weight."""

import dataclasses

import pytest
import torch
from torch import nn

from fourbit.nn import Linear4bit
from fourbit.quant import dequantize_4bit_reference


def make_pair(in_features=96, out_features=40, bias=True, quant_type="nf4", compute_dtype=None, seed=0):
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    layer = Linear4bit.from_linear(dense, quant_type=quant_type, blocksize=64, compute_dtype=compute_dtype)
    reference = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():  # the dense twin holds exactly what the 4-bit layer represents
        reference.weight.copy_(dequantize_4bit_reference(layer.weight, layer.quant_state, torch.float32))
        if bias:
            reference.bias.copy_(dense.bias)
    return layer, reference.requires_grad_(False)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4", "int4"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_layer_on_dequantized_weight(quant_type, bias):
    layer, reference = make_pair(bias=bias, quant_type=quant_type)
    x = torch.randn(3, 5, 96)
    # Same fp32 weight, same F.linear: bit-identical.
    assert torch.equal(layer(x), reference(x))


def float_tensors_held_by(obj) -> list[torch.Tensor]:
    """Every floating-point tensor among ``obj``'s attributes, looking one level into quantization
    states and containers: where a dense copy of a weight could hide."""
    found, todo = [], list(vars(obj).values())
    while todo:
        value = todo.pop()
        if isinstance(value, torch.Tensor):
            found += [value] if value.is_floating_point() else []
        elif isinstance(value, dict):
            todo += value.values()
        elif isinstance(value, (list, tuple)):
            todo += value
        elif dataclasses.is_dataclass(value):
            todo += [getattr(value, f.name) for f in dataclasses.fields(value)]
    return found


def test_a_layer_built_empty_and_quantized_has_a_zero_bias():
    # quantize_ sets the weight only: the bias of a layer built empty must not be whatever memory
    # torch.empty found (it once was, and a test comparing two products of it failed on its NaNs)
    torch.manual_seed(0)
    w = torch.randn(40, 128)
    layer = Linear4bit(128, 40, bias=True, compute_dtype=torch.float32).quantize_(w)
    assert torch.equal(layer.bias, torch.zeros(40))
    x = torch.randn(3, 128)
    torch.testing.assert_close(layer(x), x @ layer.dequantize(torch.float32).T, rtol=0, atol=1e-4)  # 128 terms


def test_weight_is_frozen_uint8_and_no_float_copy_is_kept():
    layer, _ = make_pair()
    layer(torch.randn(2, 96))  # a forward pass must not leave a dense copy behind either
    assert layer.weight.dtype == torch.uint8 and not layer.weight.requires_grad
    assert layer.weight.shape == ((96 * 40 + 1) // 2, 1)
    assert [p for p in layer.parameters() if p.requires_grad] == []
    # Floats held anywhere in the layer: the bias (40), absmax (60 blocks) and the code tables
    # (16 and 256): never anything near the 40 x 96 weight.
    held = list(layer.parameters()) + list(layer.buffers()) + float_tensors_held_by(layer)
    assert max(t.numel() for t in held if t.is_floating_point()) <= 256


@pytest.mark.parametrize("bias", [True, False])
def test_input_gradient_equals_dense_layer(bias):
    layer, reference = make_pair(bias=bias)
    x = torch.randn(4, 7, 96, dtype=torch.float64).float()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad_out = torch.randn(4, 7, 40)
    layer(x1).backward(grad_out)
    reference(x2).backward(grad_out)
    # grad_x = grad_out @ W in both, summed in possibly different order: fp32 rounding only.
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def test_trainable_bias_gets_its_gradient():
    layer, reference = make_pair()
    layer.bias.requires_grad_(True)
    reference.bias.requires_grad_(True)
    x = torch.randn(6, 96)
    layer(x).square().sum().backward()
    reference(x).square().sum().backward()
    torch.testing.assert_close(layer.bias.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)


def test_backward_saves_only_the_packed_weight():
    layer, _ = make_pair(in_features=128, out_features=64, bias=False)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(2, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert saved and all(t.dtype == torch.uint8 for t in saved)
    assert all(t.numel() <= 128 * 64 // 2 for t in saved)  # never a dense [64, 128] copy
    # nor one kept beside save_for_backward, as an attribute of the backward node (its ctx)
    assert all(t.numel() < 64 * 128 for t in float_tensors_held_by(y.grad_fn))
    y.sum().backward()
    assert x.grad is not None


def test_compute_dtype_bf16_matches_dense_bf16_and_returns_input_dtype():
    layer, reference = make_pair(compute_dtype=torch.bfloat16)
    x = torch.randn(8, 96)
    out = layer(x)
    assert out.dtype == torch.float32
    in_float32 = reference(x)
    expected = reference.to(torch.bfloat16)(x.to(torch.bfloat16)).float()
    # Both compute the same bf16 matmul (one F.linear) on the same bf16 weight, the dequantized
    # values rounded to bf16: bit for bit. And the bf16 compute shows: in float32 the result
    # differs (by bf16's rounding of the inputs, ~1e-2 relative).
    assert torch.equal(out, expected)
    assert not torch.equal(out, in_float32)


def test_state_dict_round_trip_is_bit_identical_and_in_bitsandbytes_layout():
    layer, _ = make_pair()
    state = layer.state_dict()
    assert set(state) == {
        "weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4",
    }
    fresh = Linear4bit(96, 40, bias=True, device="meta")
    fresh.load_state_dict(state, assign=True)
    x = torch.randn(5, 96)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.weight, layer.weight)


def test_loading_a_dense_weight_quantizes_it():
    torch.manual_seed(1)
    dense = nn.Linear(64, 32)
    layer = Linear4bit(64, 32, bias=True, device="meta")
    layer.load_state_dict(dense.state_dict(), assign=True)
    expected = Linear4bit.from_linear(dense)
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), expected(x))


def test_mismatched_checkpoint_tensors_are_refused():
    layer, _ = make_pair()
    state = layer.state_dict()
    shell = Linear4bit(96, 48, bias=True, device="meta")
    with pytest.raises(RuntimeError, match=r"weight was quantized with shape \(40, 96\); this layer expects \(48, 96\)"):
        shell.load_state_dict({k: v for k, v in state.items() if k != "bias"}, strict=False)
    broken = dict(state)
    del broken["weight.nested_absmax"]
    with pytest.raises(RuntimeError, match=r"weight.nested_absmax is missing"):
        Linear4bit(96, 40, device="meta").load_state_dict(broken, assign=True)
    broken = dict(state, **{"weight.absmax": state["weight.absmax"][:-1]})
    with pytest.raises(RuntimeError, match=r"weight.absmax has dtype torch.uint8 and shape \(59,\); "
                                           r"expected torch.uint8 and \(60,\)"):
        Linear4bit(96, 40, device="meta").load_state_dict(broken, assign=True)


def test_half_and_device_moves_keep_codes_and_float32_state():
    layer, _ = make_pair()
    x = torch.randn(2, 96)
    expected = layer(x)
    moved = layer.to("cpu").half()
    assert moved.weight.dtype == torch.uint8
    assert moved.quant_state.nested.absmax.dtype == torch.float32 and moved.bias.dtype == torch.float16
    out = moved(x.half())
    torch.testing.assert_close(out.float(), expected, rtol=1e-2, atol=1e-2)  # fp16 compute


def test_empty_layer_says_what_is_missing():
    with pytest.raises(RuntimeError, match="holds no weight yet"):
        Linear4bit(8, 8, device="cpu")(torch.randn(1, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernels of the 4-bit ops")
@pytest.mark.parametrize("rows", [1, 16, 200])
def test_cuda_forward_and_backward_match_float64(rows):
    # Few rows go through the fused 4-bit matmul, many through dequantize + cuBLAS; both must
    # compute x @ W^T + b, and backward dL/dx = g @ W. bf16 operands: 1e-2 relative (see
    # tests/kernels/test_triton_matmul_4bit.py for where that bound comes from).
    layer = Linear4bit.from_linear(nn.Linear(256, 96), compute_dtype=torch.bfloat16).cuda()
    w64 = layer.dequantize(torch.float64)
    x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    ref = x.double() @ w64.T + layer.bias.double()
    assert ((y.double() - ref).norm() / ref.norm()) < 1e-2
    g = torch.randn_like(y)
    y.backward(g)
    ref_grad = g.double() @ w64
    assert ((x.grad.double() - ref_grad).norm() / ref_grad.norm()) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decoding_product_is_the_layers_own_product_or_declines(monkeypatch, dtype):
    from fourbit.kernels.cpu import native
    from fourbit.nn.linear4bit import dense_weights

    monkeypatch.setenv(native.ENV, "1")  # the native kernel, which both paths take here
    layer, reference = make_pair(in_features=128, out_features=48, bias=True)
    layer.bias.data = layer.bias.data.to(dtype)
    x = torch.randn(2, 1, 128).to(dtype)
    with torch.no_grad():
        assert native.takes_rows(x)
        y = layer.decoding_product(x)
        assert y is not None and torch.equal(y, layer(x))  # the same kernel and arguments: bit-identical
        exact = x.double() @ reference.weight.double().T + layer.bias.double()
        # float32: float32 sums (1e-5 relative); bf16: each weight rounded to bf16 (2^-9 of its
        # term) and the output rounded (2^-9 of the value), so bounded by the terms' magnitudes
        magnitude = x.double().abs() @ reference.weight.double().abs().T + layer.bias.double().abs()
        bound = 1e-5 * magnitude if dtype == torch.float32 else 2 ** -8 * (magnitude + exact.abs())
        assert ((y.double() - exact).abs() <= bound).all()
        with dense_weights(layer):  # a dense copy in use: the layer's own forward serves
            assert layer.decoding_product(x) is None
        handle = layer.register_forward_hook(lambda *args: None)  # hooks must run: the layer's call
        assert layer.decoding_product(x) is None
        handle.remove()
        layer.compute_dtype = torch.float16 if dtype == torch.float32 else torch.float32  # a cast: the layer's call
        assert layer.decoding_product(x) is None
