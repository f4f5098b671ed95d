"""The dequantize op against its plain-torch reference (the only kernel on CPU today)."""

import pytest
import torch

from fourbit.kernels import dequantize_4bit
from fourbit.quant import dequantize_4bit_reference, quantize_4bit


@pytest.mark.parametrize("shape", [(33, 70), (7, 9), (1, 5), (3, 1001), (256, 128)])
@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 32), ("int4", 128)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_op_equals_reference(shape, quant_type, blocksize, double_quant, dtype):
    # Fresh random input each run; the CPU kernel's output is compared with the reference
    # bit for bit (same float32 products), on odd sizes and partial last blocks.
    x = torch.randn(*shape)
    packed, state = quantize_4bit(x, quant_type, blocksize, double_quant)
    out = dequantize_4bit(packed, state, dtype)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, dequantize_4bit_reference(packed, state, dtype))


def test_op_reports_a_size_mismatch():
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="holds 255 bytes"):
        dequantize_4bit(packed[:-1], state)


def test_op_defaults_to_the_original_dtype():
    packed, state = quantize_4bit(torch.randn(8, 64, dtype=torch.bfloat16))
    assert dequantize_4bit(packed, state).dtype == torch.bfloat16


def test_op_traces_under_torch_compile_without_graph_breaks():
    packed, state = quantize_4bit(torch.randn(64, 96))
    x = torch.randn(4, 96)
    compiled = torch.compile(lambda x, p: x @ dequantize_4bit(p, state, x.dtype).T, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x, packed), x @ dequantize_4bit_reference(packed, state, x.dtype).T)
