"""The GPTQ "v1" checkpoint layout (AutoGPTQ's, which GPTQModel and transformers read), per layer P:

    P.qweight  int32 [in * bits / 32, out]   packed along the input dim: word [r, o] holds the
                                             codes of inputs r * (32/bits) + j at bits
                                             [bits * j, bits * j + bits), least significant first
    P.qzeros   int32 [groups, out * bits / 32]  the zero points, packed the same way along the
                                             output dim, each stored as (zero - 1) & maxq (v1's
                                             quirk; "gptq_v2" stores the zero itself)
    P.scales   float16 [groups, out]
    P.g_idx    int32 [in]                     the group of each input column
    W[o, i] = scales[g_idx[i], o] * (code[o, i] - zero[g_idx[i], o])

(docs/formats.md §5.) 2-, 4- and 8-bit codes pack whole into 32-bit words; 3-bit codes
straddle words in a layout of their own, not written here. The scales are stored in float16 as
the format says, so the values a reader computes differ from the float32 grid GPTQ found by
float16's rounding of each scale (relative 2^-11).
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .groupwise import GroupQuant
from .words import pack_words, unpack_words

PACKABLE_BITS = (2, 4, 8)


def pack_gptq(quant: GroupQuant) -> dict[str, torch.Tensor]:
    """``quant`` (codes [out, in]) -> the four v1 tensors, on the CPU."""
    bits = quant.bits
    if bits not in PACKABLE_BITS:
        raise InputError(f"the GPTQ v1 layout is written for {PACKABLE_BITS}-bit codes, not {bits}-bit")
    per_word = 32 // bits
    out_features, in_features = quant.codes.shape
    if in_features % per_word or out_features % per_word:
        raise InputError(f"GPTQ packing needs both dimensions divisible by {per_word} ({bits}-bit codes); "
                         f"the weight is [{out_features}, {in_features}]")
    maxq = 2**bits - 1
    codes = quant.codes.to("cpu", torch.int64)
    zeros = (quant.zeros.to("cpu", torch.int64) - 1) & maxq  # v1 stores zero - 1
    return {
        "qweight": pack_words(codes.T.reshape(in_features // per_word, per_word, out_features).transpose(1, 2), bits),
        "qzeros": pack_words(zeros.T.reshape(zeros.shape[1], out_features // per_word, per_word), bits),
        "scales": quant.scales.T.to("cpu", torch.float16).contiguous(),
        "g_idx": quant.g_idx.to("cpu", torch.int32).contiguous(),
    }


def unpack_gptq(tensors: dict[str, torch.Tensor], bits: int) -> GroupQuant:
    """The four v1 tensors -> codes [out, in], float32 scales and zeros [out, groups], g_idx
    (on the tensors' device)."""
    if bits not in PACKABLE_BITS:
        raise InputError(f"the GPTQ v1 layout is read for {PACKABLE_BITS}-bit codes, not {bits}-bit")
    maxq = 2**bits - 1
    qweight, qzeros = tensors["qweight"], tensors["qzeros"]
    codes = unpack_words(qweight, bits)  # [in / per_word, out, per_word]
    codes = codes.transpose(1, 2).reshape(-1, qweight.shape[1]).T  # [out, in]
    zeros = (unpack_words(qzeros, bits).reshape(qzeros.shape[0], -1) + 1) & maxq  # [groups, out]
    return GroupQuant(codes.to(torch.uint8).contiguous(), tensors["scales"].T.float().contiguous(),
                      zeros.T.to(torch.int32).contiguous(), tensors["g_idx"].to(torch.int32), bits)
