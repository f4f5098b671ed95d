"""The Triton dequantize kernel against the plain-torch reference.

On a GPU the kernel runs compiled, with Llama-sized weights added to the cases; without one it
runs through Triton's CPU interpreter on small ones. Inputs are drawn fresh each run, the output
is poisoned with NaN before the launch (every element must be written), and the shapes include
odd sizes, partial last blocks and single-block tensors.
"""

import pytest
import torch

from fourbit.kernels import dequantize_4bit
from fourbit.kernels.dequantize import state_args
from fourbit.quant import dequantize_4bit_reference, quantize_4bit

ON_GPU = torch.cuda.is_available()
triton_dequantize = pytest.importorskip("fourbit.kernels.triton.dequantize")

SHAPES = [(33, 70), (7, 9), (1, 5), (3, 1001), (64, 256)] + ([(4096, 4096), (14336, 4096), (11, 4097)] if ON_GPU else [])


def launch(packed, state, dtype):
    out = torch.full(tuple(state.shape), float("nan"), dtype=dtype, device=packed.device)
    result = triton_dequantize.dequantize_4bit(packed, *state_args(state), dtype, out=out)
    assert result.data_ptr() == out.data_ptr()
    return out


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 32), ("int4", 128), ("nf4", 4096)])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_kernel_matches_reference(device, rounding_bound, shape, quant_type, blocksize, double_quant, dtype):
    packed, state = quantize_4bit(torch.randn(*shape, device=device), quant_type, blocksize, double_quant)
    out = launch(packed, state, dtype)
    ref32 = dequantize_4bit_reference(packed, state, torch.float32)
    assert not out.isnan().any(), "an output element was never written"
    assert ((out.float() - ref32).abs() <= rounding_bound(ref32, dtype)).all()


def test_kernel_handles_scales_far_from_one(device, rounding_bound):
    # Rows scaled from 1e-3 to 1e3: the scales, not the code values, carry the magnitude.
    w = torch.randn(16, 128, device=device) * torch.logspace(-3, 3, 16, device=device)[:, None]
    packed, state = quantize_4bit(w, "nf4", 64, True)
    ref32 = dequantize_4bit_reference(packed, state, torch.float32)
    out = launch(packed, state, torch.bfloat16)
    assert ((out.float() - ref32).abs() <= rounding_bound(ref32, torch.bfloat16)).all()


@pytest.mark.skipif(not ON_GPU, reason="dispatch to the Triton kernel happens for CUDA tensors")
def test_the_op_dispatches_cuda_tensors_to_the_kernel(rounding_bound):
    packed, state = quantize_4bit(torch.randn(300, 1000, device="cuda"))
    ref32 = dequantize_4bit_reference(packed, state, torch.float32)
    out = dequantize_4bit(packed, state, torch.bfloat16)
    assert out.is_cuda and ((out.float() - ref32).abs() <= rounding_bound(ref32, torch.bfloat16)).all()
