"""The memory report against byte counts computed from the layer shapes alone."""

import math

import pytest

from fourbit import load_model
from fourbit.memory import memory_report


def expected_bytes(shapes, blocksize, double_quant):
    """Bytes per component from the format's definition (quant/double_quant.py docstring)."""
    codes = absmax = nested = 0
    for out_features, in_features in shapes:
        n = out_features * in_features
        blocks = math.ceil(n / blocksize)
        codes += (n + 1) // 2
        absmax += blocks * (1 if double_quant else 4)
        nested += (4 * math.ceil(blocks / 256) + 4) if double_quant else 0
    return codes, absmax, nested


def linear_shapes(c):
    """[out, in] of every quantized linear of a Llama config: q, k, v, o, gate, up, down per layer."""
    h, kv = c.hidden_size, c.num_key_value_heads * (c.hidden_size // c.num_attention_heads)
    per_layer = [(h, h), (kv, h), (kv, h), (h, h), (c.intermediate_size, h), (c.intermediate_size, h), (h, c.intermediate_size)]
    return per_layer * c.num_hidden_layers


@pytest.mark.parametrize("blocksize,double_quant", [(64, True), (64, False), (256, True)])
def test_report_counts_the_actual_bytes(tiny_llama, blocksize, double_quant):
    folder, dense = tiny_llama
    model, _ = load_model(folder, blocksize=blocksize, double_quant=double_quant, torch_dtype="bfloat16")
    report = memory_report(model)
    shapes = linear_shapes(dense.config)
    codes, absmax, nested = expected_bytes(shapes, blocksize, double_quant)
    assert report.rows["4-bit codes"] == codes
    assert report.rows["absmax"] == absmax
    assert report.rows.get("nested absmax + offset", 0) == nested
    dense_params = sum(p.numel() for n, p in dense.named_parameters() if "_proj" not in n)
    assert report.other_params == dense_params and report.other_dtypes == {"bfloat16"}
    assert report.quantized_params == sum(o * i for o, i in shapes)


def test_nf4_double_quant_costs_4_127_bits_per_parameter(tiny_llama):
    folder, dense = tiny_llama
    model, _ = load_model(folder, torch_dtype="bfloat16")
    bits = memory_report(model).bits_per_quantized_param()
    shapes = linear_shapes(dense.config)
    stored = sum(expected_bytes(shapes, 64, True))  # codes + absmax codes + nested absmax and offsets
    assert bits == 8 * stored / sum(o * i for o, i in shapes)  # the same integers divided: exactly equal
    # Large layers tend to 4 + 8/64 + 32/(64 * 256) = 4.127; these tiny ones pay for a whole
    # nested block and an offset per weight matrix (+0.008 here).
    assert 4.127 < bits < 4.14


def test_report_prints_every_component(tiny_llama):
    folder, _ = tiny_llama
    model, _ = load_model(folder, torch_dtype="bfloat16")
    text = memory_report(model).format("tiny")
    for row in ("4-bit codes", "absmax", "nested absmax + offset", "code tables", "unquantized", "total", "bits each"):
        assert row in text
