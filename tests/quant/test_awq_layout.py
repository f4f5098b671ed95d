"""The AWQ GEMM layout against words written out by hand, and a round trip through it."""

import pytest
import torch

from fourbit.formats import AWQ
from fourbit.quant.awq_layout import pack_awq, unpack_awq
from fourbit.quant.gptq_layout import pack_gptq, unpack_gptq
from fourbit.quant.groupwise import GroupQuant, quantize_rtn


def signed(word):
    return word - 2**32 if word >= 2**31 else word


def by_hand_quant():
    """16 outputs x 2 inputs, one group: code[o, i] = (o + 8 i) % 16, zero[o] = 15 - o."""
    o, i = torch.meshgrid(torch.arange(16), torch.arange(2), indexing="ij")
    return GroupQuant(((o + 8 * i) % 16).to(torch.uint8), torch.full((16, 1), 0.25),
                      (15 - torch.arange(16)).view(16, 1).to(torch.int32), torch.zeros(2, dtype=torch.int32), 4)


def test_qweight_and_qzeros_match_words_written_by_hand():
    packed = pack_awq(by_hand_quant())
    # qweight [in, out/8] = [2, 2]. Nibble slot j (lowest first) of word c holds output 8c + [0,2,4,6,1,3,5,7][j].
    # input 0, outputs 0..7 hold codes 0..7: slots 0,2,4,6,1,3,5,7 -> read high nibble first 7531 6420
    # input 0, outputs 8..15 hold codes 8..15: slots 8,10,12,14,9,11,13,15 -> FDB9 ECA8
    # input 1 is shifted by 8 (mod 16): the same two words, swapped
    assert packed["qweight"].tolist() == [[0x75316420, signed(0xFDB9ECA8)], [signed(0xFDB9ECA8), 0x75316420]]
    # qzeros [groups, out/8] = [1, 2], zero 15 - o, the same interleave, stored as is (no -1):
    # outputs 0..7: slots 15,13,11,9,14,12,10,8 -> 8ACE 9BDF; outputs 8..15: 7,5,3,1,6,4,2,0 -> 0246 1357
    assert packed["qzeros"].tolist() == [[signed(0x8ACE9BDF), 0x02461357]]
    assert packed["scales"].dtype == torch.float16 and packed["scales"].tolist() == [[0.25] * 16]
    assert set(packed) == {"qweight", "qzeros", "scales"}  # no g_idx in this layout


def test_unpacking_the_hand_written_words_gives_the_codes_and_weights():
    tensors = {"qweight": torch.tensor([[0x75316420, signed(0xFDB9ECA8)], [signed(0xFDB9ECA8), 0x75316420]],
                                       dtype=torch.int32),
               "qzeros": torch.tensor([[signed(0x8ACE9BDF), 0x02461357]], dtype=torch.int32),
               "scales": torch.full((1, 16), 0.25, dtype=torch.float16)}
    quant = unpack_awq(tensors)
    want = by_hand_quant()
    assert torch.equal(quant.codes, want.codes) and torch.equal(quant.zeros, want.zeros)
    assert quant.g_idx.tolist() == [0, 0]
    # W[o, i] = (code - zero) * scale, computed here from the definitions of the hand example
    o, i = torch.meshgrid(torch.arange(16), torch.arange(2), indexing="ij")
    assert torch.equal(quant.dequantize(), (((o + 8 * i) % 16) - (15 - o)) * 0.25)


def test_round_trip_is_exact_and_decodes_as_gptq_does():
    quant = quantize_rtn(torch.randn(64, 256), 4, 64, sym=False)
    back = unpack_awq(pack_awq(quant))
    assert torch.equal(back.codes, quant.codes) and torch.equal(back.zeros, quant.zeros)
    assert torch.equal(back.g_idx, quant.g_idx)
    assert torch.equal(back.scales, quant.scales.half().float())  # the format keeps float16 scales
    # the same integer codes and zeros as GPTQ's v1 layout, so both decode to the same weight
    assert torch.equal(back.dequantize(), unpack_gptq(pack_gptq(quant), 4).dequantize())


def test_what_the_layout_cannot_hold_is_named():
    with pytest.raises(ValueError, match="4-bit codes only, not 8-bit"):
        pack_awq(quantize_rtn(torch.randn(16, 64), 8, 32, sym=False))
    with pytest.raises(ValueError, match="output dimension 12 is not divisible by 8"):
        pack_awq(quantize_rtn(torch.randn(12, 64), 4, 32, sym=False))
    with pytest.raises(ValueError, match="no g_idx"):
        quant = quantize_rtn(torch.randn(16, 64), 4, 32, sym=False)
        pack_awq(GroupQuant(quant.codes, quant.scales, quant.zeros, quant.g_idx.flip(0), 4))  # act-order groups


def test_config_is_the_transformers_form():
    assert AWQ.quantization_config(128) == {"quant_method": "awq", "zero_point": True, "group_size": 128, "bits": 4,
                                            "version": "gemm", "modules_to_not_convert": None}
