"""LLM.int8() against float references, with and without outlier features."""

import pytest
import torch
from torch import nn

from fourbit.nn import Linear8bit
from fourbit.quant.int8 import dequantize_weight_int8, int8_matmul, outlier_features, quantize_weight_int8


def relative(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_weight_codes_by_hand():
    w = torch.tensor([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0], [2.0, 1.0, -0.5]])
    cb, scb = quantize_weight_int8(w)
    assert scb.tolist() == [1.0, 0.0, 2.0]
    # 127 * w / absmax, rounded half to even: 63.5 -> 64, 31.75 -> 32; -31.75 -> -32
    assert cb.tolist() == [[64, -127, 32], [0, 0, 0], [127, 64, -32]]
    assert torch.equal(dequantize_weight_int8(cb, scb)[1], torch.zeros(3))


def test_the_integer_product_is_exact():
    # The same int8 codes multiplied in float64 by this test: the kernel's int32 sums must agree to
    # float32 output rounding (the scaling is done in float32).
    x, w = torch.randn(24, 96), torch.randn(40, 96)
    cb, scb = quantize_weight_int8(w)
    sca = x.abs().amax(dim=1)
    ca = torch.round(x * (127 / sca)[:, None])
    want = (ca.double() @ cb.double().T) * (sca.double()[:, None] * scb.double()[None, :] / 127**2)
    assert relative(int8_matmul(x, cb, scb, threshold=0.0), want) < 1e-6


def test_int8_without_outliers_is_close_to_the_float_product():
    x, w, b = torch.randn(32, 128), torch.randn(64, 128) * 0.05, torch.randn(64)
    cb, scb = quantize_weight_int8(w)
    # each operand rounded to 1/254 of its row's absmax: about 0.5% relative error in RMS; 2e-2 bounds it
    assert relative(int8_matmul(x, cb, scb, b, threshold=0.0), x.double() @ w.double().T + b.double()) < 2e-2


def test_outlier_features_go_through_floating_point():
    torch.manual_seed(0)
    x, w = torch.randn(32, 128), torch.randn(64, 128) * 0.05
    x[:, [3, 77]] *= 40  # two outlier features, as large models grow
    cb, scb = quantize_weight_int8(w)
    assert outlier_features(x, 6.0).tolist() == [3, 77]
    want = x.double() @ w.double().T
    with_split = relative(int8_matmul(x, cb, scb, threshold=6.0), want)
    without = relative(int8_matmul(x, cb, scb, threshold=0.0), want)
    assert with_split < 2e-2 and with_split < 0.5 * without, (with_split, without)
    # the outlier columns use the int8-dequantized weight: exact for those columns' contribution
    only = torch.zeros_like(x)
    only[:, [3, 77]] = x[:, [3, 77]]
    assert relative(int8_matmul(only, cb, scb, threshold=6.0), only.double() @ dequantize_weight_int8(cb, scb).double().T) < 1e-6


def test_linear8bit_layout_round_trip_and_lora():
    torch.manual_seed(1)
    layer = Linear8bit.from_linear(nn.Linear(128, 32))
    state = layer.state_dict()
    assert {k: (v.dtype, tuple(v.shape)) for k, v in state.items()} == {
        "weight": (torch.int8, (32, 128)), "SCB": (torch.float32, (32,)), "weight_format": (torch.uint8, ()),
        "bias": (torch.float32, (32,))}
    fresh = Linear8bit(128, 32)
    fresh.load_state_dict(state)
    x = torch.randn(4, 128)
    assert torch.equal(fresh(x), layer(x))
    scb = layer.SCB.clone()
    assert layer.to(torch.bfloat16).SCB.dtype == torch.float32  # dtype casts keep the row scales,
    assert torch.equal(layer.SCB, scb)  # values included (not rounded through bfloat16)
    bad = dict(state, weight_format=torch.tensor(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="only the row layout"):
        Linear8bit(128, 32).load_state_dict(bad)


def test_lora_trains_on_an_int8_base(lora_fit):
    torch.manual_seed(2)
    first, last = lora_fit(Linear8bit.from_linear(nn.Linear(128, 32, bias=False)))
    assert last < 0.1 * first  # a rank-4 change an r=8 adapter can represent


def test_an_8bit_folder_round_trips_through_load_model(make_tiny_llama, tmp_path):
    import json

    import fourbit
    from fourbit.formats import INT8

    model = make_tiny_llama(tmp_path / "m", seed=4)
    for name, module in list(model.model.layers.named_modules()):
        if isinstance(module, nn.Linear):
            model.model.layers.set_submodule(name, Linear8bit.from_linear(module))
    model.config.quantization_config = INT8.quantization_config()
    fourbit.save_quantized(model, None, tmp_path / "int8")
    config = json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]
    assert config["load_in_8bit"] is True and config["llm_int8_threshold"] == 6.0
    loaded, _ = fourbit.load_model(tmp_path / "int8", torch_dtype="float32", compute_dtype="float32")
    assert sum(isinstance(m, Linear8bit) for m in loaded.modules()) == 14
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)

    # a layout other than rows (load_model sets tensors directly, not through load_state_dict)
    from safetensors.torch import load_file, save_file

    path = next((tmp_path / "int8").glob("*.safetensors"))
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith("weight_format"))
    tensors[key] = torch.tensor(1, dtype=torch.uint8)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"weight_format is 1; only the row layout \(0\) is read"):
        fourbit.load_model(tmp_path / "int8", torch_dtype="float32", compute_dtype="float32")


def test_the_cpu_product_is_exact_beyond_float32s_integer_range():
    # 3000 products of 127 * 127 sum to 48,387,000 > 2^24: a single float32 sum would round it
    from fourbit.quant.int8 import _int_product

    a = torch.full((3, 3000), 127, dtype=torch.int8)
    b = torch.full((2, 3000), -127, dtype=torch.int8)
    b[1, ::7] = 5
    want = a.long() @ b.long().T
    assert torch.equal(_int_product(a, b).long(), want)
