"""Byte compatibility with bitsandbytes (test-only peer, its CPU backend).

Both directions: our dequantization of bitsandbytes' bytes gives exactly its values, and
bitsandbytes dequantizes ours exactly as we do; and our quantizer picks the same codes.
"""

import itertools
import json

import bitsandbytes.functional as F  # test-only peer
import pytest
import torch

from fourbit.quant import QuantState, dequantize_4bit_reference, quantize_4bit
from fourbit.quant.blockwise import BLOCKSIZES, unpack_4bit
from fourbit.quant.dtypes import dynamic_map

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CASES = list(itertools.product(["nf4", "fp4"], BLOCKSIZES, DTYPES, [False, True]))


def ours_and_theirs(quant_type, blocksize, dtype, double_quant, seed=0):
    x = torch.randn(191, 131, generator=torch.Generator().manual_seed(seed)).to(dtype)  # odd numel
    theirs = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant)
    ours = quantize_4bit(x, quant_type, blocksize, double_quant)
    return x, ours, theirs


def without_zero_sign(codes: torch.Tensor, quant_type: str) -> torch.Tensor:
    # FP4 has +0 (0b0000) and -0 (0b1000). bitsandbytes' CPU backend picks between them by
    # sort order (tiny positive values get -0); we keep the input's sign as its CUDA kernel
    # does. Both decode to exactly 0, so compare with -0 folded into +0.
    if quant_type == "fp4":
        return torch.where(codes == 0b1000, torch.zeros_like(codes), codes)
    return codes


@pytest.mark.parametrize("quant_type,blocksize,dtype,double_quant", CASES)
def test_same_4bit_codes_as_bitsandbytes(quant_type, blocksize, dtype, double_quant):
    x, (packed, state), (their_packed, their_state) = ours_and_theirs(quant_type, blocksize, dtype, double_quant)
    assert packed.shape == their_packed.shape and packed.dtype == their_packed.dtype
    n = x.numel()
    assert torch.equal(
        without_zero_sign(unpack_4bit(packed, n), quant_type), without_zero_sign(unpack_4bit(their_packed, n), quant_type)
    )
    if quant_type == "nf4":
        assert torch.equal(packed, their_packed)  # byte for byte, padding nibble included
    if not double_quant:
        assert torch.equal(state.absmax, their_state.absmax)


@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_double_quant_constants_match_bitsandbytes(blocksize):
    small = torch.randn(190, 131, generator=torch.Generator().manual_seed(blocksize))
    large = torch.randn(1024, 512, generator=torch.Generator().manual_seed(blocksize))
    for weight in (small, large):
        _, state = quantize_4bit(weight, "nf4", blocksize, True)
        _, their_state = F.quantize_4bit(weight, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
        assert torch.equal(state.nested.offset, their_state.offset)
        assert torch.equal(state.nested.absmax, their_state.state2.absmax)
        assert torch.equal(state.nested.code, their_state.state2.code)
        # The 8-bit codes agree except where bitsandbytes' native CPU kernel is not exactly
        # nearest (measured ~0.1-1% of values, all within 1e-5 of a midpoint): there ours must
        # be the nearer level, judged in float64.
        ours, theirs = state.absmax.long(), their_state.absmax.long()
        differ = ours != theirs
        assert differ.sum() <= max(2, 0.02 * len(ours))
        if differ.any():
            _, plain_state = quantize_4bit(weight, "nf4", blocksize, False)
            target = (plain_state.absmax.double() - state.nested.offset.double())[differ]
            scale = state.nested.absmax.double().repeat_interleave(256)[: len(ours)][differ]
            code = dynamic_map().double()
            assert ((code[ours[differ]] * scale - target).abs() <= (code[theirs[differ]] * scale - target).abs()).all()


@pytest.mark.parametrize("quant_type,blocksize,dtype,double_quant", CASES)
def test_dequantizing_bitsandbytes_bytes_gives_its_values(quant_type, blocksize, dtype, double_quant):
    _, _, (their_packed, their_state) = ours_and_theirs(quant_type, blocksize, dtype, double_quant)
    state = QuantState.from_dict(their_state.as_dict(packed=True))
    assert torch.equal(dequantize_4bit_reference(their_packed, state), F.dequantize_4bit(their_packed, their_state))


@pytest.mark.parametrize("quant_type,blocksize,dtype,double_quant", CASES)
def test_bitsandbytes_reads_our_state_dict(quant_type, blocksize, dtype, double_quant):
    _, (packed, state), _ = ours_and_theirs(quant_type, blocksize, dtype, double_quant)
    their_state = F.QuantState.from_dict(state.to_dict(), device=torch.device("cpu"))
    assert torch.equal(F.dequantize_4bit(packed, their_state), dequantize_4bit_reference(packed, state))


@pytest.mark.parametrize("double_quant", [False, True])
def test_serialized_layout_matches_bitsandbytes(double_quant):
    _, (_, state), (_, their_state) = ours_and_theirs("nf4", 64, torch.float16, double_quant)
    ours, theirs = state.to_dict(), their_state.as_dict(packed=True)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype and ours[key].shape == theirs[key].shape, key
    key = "quant_state.bitsandbytes__nf4"
    decode = lambda t: json.loads(bytes(t.tolist()))  # noqa: E731
    assert decode(ours[key]) == decode(theirs[key])


@pytest.mark.parametrize("blocksize", [64, 4096])
def test_tensors_larger_than_one_chunk_match_bitsandbytes(blocksize):
    # Quantization works in chunks of CHUNK elements; cross chunk boundaries with an odd size.
    from fourbit.quant.blockwise import CHUNK

    x = torch.randn(2 * CHUNK // 1001 + 8, 1001, generator=torch.Generator().manual_seed(3))
    assert x.numel() > 2 * CHUNK and x.numel() % 2
    packed, state = quantize_4bit(x, "nf4", blocksize, double_quant=False)
    their_packed, their_state = F.quantize_4bit(x, blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    assert torch.equal(packed, their_packed) and torch.equal(state.absmax, their_state.absmax)
    assert torch.equal(dequantize_4bit_reference(packed, state), F.dequantize_4bit(their_packed, their_state))
