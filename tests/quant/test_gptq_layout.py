"""The GPTQ v1 layout against words written out by hand, and a round trip through it."""

import pytest
import torch

from fourbit.quant.gptq_layout import pack_gptq, unpack_gptq
from fourbit.quant.groupwise import GroupQuant, quantize_rtn


def by_hand_quant(zeros):
    """8 outputs x 8 inputs, one group: code[o, i] = (o + i) % 16."""
    o, i = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
    return GroupQuant(((o + i) % 16).to(torch.uint8), torch.full((8, 1), 0.5), zeros.view(8, 1).to(torch.int32),
                      torch.zeros(8, dtype=torch.int32), 4)


def signed(word):
    return word - 2**32 if word >= 2**31 else word


def test_qweight_and_qzeros_match_words_written_by_hand():
    packed = pack_gptq(by_hand_quant(torch.full((8,), 8)))
    # qweight [in/8, out] = [1, 8]: output o's word holds inputs 0..7, input 0 in the low nibble
    assert packed["qweight"].tolist() == [[signed(w) for w in (
        0x76543210, 0x87654321, 0x98765432, 0xA9876543, 0xBA987654, 0xCBA98765, 0xDCBA9876, 0xEDCBA987)]]
    # symmetric zero 8 stored as 7 in every nibble (v1's zero - 1)
    assert packed["qzeros"].tolist() == [[0x77777777]]
    assert packed["scales"].dtype == torch.float16 and packed["scales"].shape == (1, 8)
    assert packed["g_idx"].tolist() == [0] * 8


def test_asymmetric_zeros_wrap_as_v1_stores_them():
    packed = pack_gptq(by_hand_quant(torch.arange(8)))
    # zeros 0..7 stored as (z - 1) & 15: 15, 0, 1, ..., 6; output 0 in the low nibble
    assert packed["qzeros"].tolist() == [[0x6543210F]]
    assert unpack_gptq(packed, 4).zeros.flatten().tolist() == list(range(8))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
def test_round_trip_is_exact(bits, sym):
    quant = quantize_rtn(torch.randn(64, 256), bits, 64, sym)
    back = unpack_gptq(pack_gptq(quant), bits)
    assert torch.equal(back.codes, quant.codes) and torch.equal(back.zeros, quant.zeros)
    assert torch.equal(back.g_idx, quant.g_idx)
    assert torch.equal(back.scales, quant.scales.half().float())  # the format keeps float16 scales


def test_unpackable_shapes_and_bits_are_named():
    with pytest.raises(ValueError, match="divisible by 8"):
        pack_gptq(quantize_rtn(torch.randn(12, 64), 4, 32))
    with pytest.raises(ValueError, match="not 3-bit"):
        pack_gptq(quantize_rtn(torch.randn(32, 64), 3, 32))
