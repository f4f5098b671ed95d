"""The dequantize op against its plain-torch reference (the only kernel on CPU today)."""

import pytest
import torch

from fourbit.kernels import dequantize_4bit
from fourbit.quant import dequantize_4bit_reference, quantize_4bit


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_equals_reference(double_quant, dtype):
    x = torch.randn(33, 70)
    packed, state = quantize_4bit(x, "nf4", 64, double_quant)
    out = dequantize_4bit(packed, state, dtype)
    assert out.dtype == dtype and out.shape == (33, 70)
    assert torch.equal(out, dequantize_4bit_reference(packed, state, dtype))


def test_op_defaults_to_the_original_dtype():
    packed, state = quantize_4bit(torch.randn(8, 64, dtype=torch.bfloat16))
    assert dequantize_4bit(packed, state).dtype == torch.bfloat16


def test_op_traces_under_torch_compile_without_graph_breaks():
    packed, state = quantize_4bit(torch.randn(64, 96))
    x = torch.randn(4, 96)
    compiled = torch.compile(lambda x, p: x @ dequantize_4bit(p, state, x.dtype).T, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, packed), x @ dequantize_4bit_reference(packed, state, x.dtype).T)
