"""The fused 4-bit gemv kernel against a float64 product with the reference dequantization.

GPU: compiled, Llama-sized shapes added. CPU: Triton's interpreter, small shapes. Fresh random
inputs each run; the output is poisoned with NaN before each launch. Tolerances are on
||out - ref|| / ||ref||, with ref = x @ dequant(W)^T + b in float64:
- bf16 output: 1e-2; fp16: 2e-3. Rounding the output to the dtype alone gives a relative error
  of about eps / sqrt(12) in RMS (bf16 eps 2^-7: 2.3e-3; fp16 2^-10: 2.8e-4; doubled under the
  interpreter, which truncates to bf16); the kernel computes in float32 otherwise. Both bounds
  leave a margin of ~3x over those estimates while staying well under what a wrong index would
  produce (O(1)).
"""

import pytest
import torch

from fourbit.kernels import matmul_4bit
from fourbit.kernels.dequantize import state_args
from fourbit.quant import dequantize_4bit_reference, quantize_4bit

fused = pytest.importorskip("fourbit.kernels.triton.matmul_4bit")

ON_GPU = torch.cuda.is_available()
TOLERANCE = {torch.bfloat16: 1e-2, torch.float16: 2e-3}

SMALL = [(1, 33, 256, 64), (3, 20, 192, 64), (5, 70, 128, 32), (17, 16, 96, 32), (64, 40, 512, 128)]
FULL = [(1, 4096, 4096, 64), (1, 14336, 4096, 64), (1, 4096, 14336, 64), (16, 14336, 4096, 64), (64, 4096, 14336, 64)]
SHAPES = SMALL + (FULL if ON_GPU else [])


def problem(m, n, k, blocksize, dtype, device, bias=True, double_quant=True, quant_type="nf4"):
    x = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    packed, state = quantize_4bit(torch.randn(n, k, device=device), quant_type, blocksize, double_quant)
    w64 = dequantize_4bit_reference(packed, state, torch.float64)
    ref = x.double() @ w64.T + (b.double() if bias else 0)
    return x, b, packed, state, ref


def run(x, b, packed, state, config):
    out = torch.full((x.shape[0], state.shape[0]), float("nan"), dtype=x.dtype, device=x.device)
    result = fused.matmul_4bit(x, packed, *state_args(state), b, config=config, out=out)
    assert result.data_ptr() == out.data_ptr()
    assert not out.isnan().any(), "an output element was never written"
    return out


def relative_error(out, ref):
    return ((out.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("m,n,k,blocksize", SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_gemv_matches_float64(device, m, n, k, blocksize, dtype, double_quant):
    x, b, packed, state, ref = problem(m, n, k, blocksize, dtype, device, double_quant=double_quant)
    out = run(x, b, packed, state, fused.Config(block_n=16, nb=4))  # K split as the default picks
    assert relative_error(out, ref) < TOLERANCE[dtype]


@pytest.mark.parametrize("config", [
    fused.Config(block_n=8, nb=1, num_warps=2, split_k=1),
    fused.Config(block_n=32, nb=4, num_warps=8, split_k=2),  # 6 blocks: splits of 4 and 2
    fused.Config(block_n=16, nb=2, split_k=6),
    fused.GEMV,
])
def test_every_launch_shape_is_correct(device, config):
    # Row counts that are not multiples of the tiles, K split into uneven slices, with a bias
    # (which the first slice alone must add).
    x, b, packed, state, ref = problem(37, 45, 384, 64, torch.float16, device)
    assert relative_error(run(x, b, packed, state, config), ref) < TOLERANCE[torch.float16]


def test_fp4s_unsorted_table_with_its_minus_zero(device):
    # The code table is data to the kernel (16 values read through global memory), the same code
    # path for every data type; FP4's (in bit-pattern order, -0 at code 8) is checked on one
    # launch shape, NF4 on every shape above.
    x, b, packed, state, ref = problem(37, 45, 384, 64, torch.float16, device, quant_type="fp4")
    assert relative_error(run(x, b, packed, state, fused.Config(block_n=32, nb=4, split_k=2)), ref) < TOLERANCE[torch.float16]


def test_supports_only_rows_tiled_by_blocks_and_half_precision():
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    assert fused.supports(x, 64, 128)
    assert not fused.supports(x, 256, 128)  # a block would straddle two rows
    assert not fused.supports(x.float(), 64, 128)


@pytest.mark.parametrize("rows", [1, 7, 64, 65, 300])
@pytest.mark.parametrize("k,blocksize", [(256, 64), (96, 64)])
def test_the_op_matches_float64_on_any_device(device, rows, k, blocksize):
    # The op picks the fused kernel (CUDA, few rows, blocks tiling the rows) or dequantize +
    # matmul; whichever it picks must compute the same function. Leading dims are kept.
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    x, b, packed, state, ref = problem(rows, 48, k, blocksize, dtype, device)
    out = matmul_4bit(x.view(1, rows, k), packed, state, b)
    assert out.shape == (1, rows, 48) and out.dtype == dtype
    assert relative_error(out[0], ref) < (TOLERANCE[dtype] if dtype in TOLERANCE else 1e-6)  # fp32: float32 rounding


def test_the_op_rejects_a_mismatched_input():
    packed, state = quantize_4bit(torch.randn(8, 64))
    with pytest.raises(ValueError, match="input has 32 features; the 4-bit weight .8, 64. expects 64"):
        matmul_4bit(torch.randn(2, 32), packed, state)
