"""The AWQ "GEMM" checkpoint layout (AutoAWQ's WQLinear_GEMM, which transformers and GPTQModel
read), per layer P, for 4-bit codes and groups of G inputs:

    P.qweight  int32 [in, out / 8]     packed along the OUTPUT dim (transposed against GPTQ):
                                       nibble slot j (bits 4j..4j+3) of word [i, c] holds the code of
                                       output 8c + AWQ_ORDER[j], input i
    P.qzeros   int32 [in / G, out / 8] the zero points, the same interleave, the zero itself (no -1)
    P.scales   float16 [in / G, out]
    W[o, i] = (code[o, i] - zero[i // G, o]) * scales[i // G, o]

    AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   (its inverse, slot of output 8c + k: [0, 4, 1, 5, 2, 6, 3, 7])

(docs/formats.md §6.) There is no g_idx: input i is in group i // G, so act-order codes
cannot be stored. Only 4-bit codes, ``in % G == 0`` and ``out % 8 == 0``. The GEMV, gemv_fast and
llm-awq (TinyChat) layouts interleave differently and are not written or read here. Scales are
stored in float16 as the format says.
"""

from __future__ import annotations

import torch

from ..errors import InputError
from .groupwise import GroupQuant
from .words import pack_words, unpack_words

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
BITS = 4
PER_WORD = 32 // BITS


def check_awq_shape(bits: int, group_size: int, in_features: int, out_features: int) -> None:
    """Clear errors for what the GEMM layout cannot hold."""
    if bits != BITS:
        raise InputError(f"AWQ's GEMM layout stores 4-bit codes only, not {bits}-bit")
    if group_size != -1 and (not isinstance(group_size, int) or group_size <= 0 or in_features % group_size):
        raise InputError(f"AWQ group_size {group_size} does not divide the input dimension {in_features}; "
                         f"use a divisor of {in_features} (or -1: one group per row)")
    if out_features % PER_WORD:
        raise InputError(f"AWQ packs 8 outputs per int32 word: the output dimension {out_features} is not "
                         "divisible by 8")


def pack_awq(quant: GroupQuant) -> dict[str, torch.Tensor]:
    """``quant`` (codes [out, in], groups in order: input i in group i // G) -> qweight, qzeros,
    scales, on the CPU."""
    out_features, in_features = quant.codes.shape
    size = in_features // max(quant.scales.shape[1], 1)
    check_awq_shape(quant.bits, size, in_features, out_features)
    if not torch.equal(quant.g_idx.cpu().long(), torch.arange(in_features) // size):
        raise InputError("AWQ's GEMM layout has no g_idx: input i must be in group i // group_size (no act-order)")
    codes = quant.codes.to("cpu", torch.int64).T  # [in, out]
    zeros = quant.zeros.to("cpu", torch.int64).T  # [groups, out]
    return {
        "qweight": _pack_outputs(codes),
        "qzeros": _pack_outputs(zeros),
        "scales": quant.scales.T.to("cpu", torch.float16).contiguous(),
    }


def unpack_awq(tensors: dict[str, torch.Tensor]) -> GroupQuant:
    """qweight, qzeros, scales -> codes [out, in], float32 scales and int32 zeros [out, groups], g_idx
    (on the tensors' device)."""
    qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
    in_features, groups = qweight.shape[0], scales.shape[0]
    if in_features % groups or qzeros.shape != (groups, qweight.shape[1]) or scales.shape[1] != 8 * qweight.shape[1]:
        raise InputError(f"inconsistent AWQ tensors: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)}")
    codes, zeros = _unpack_outputs(qweight), _unpack_outputs(qzeros)
    g_idx = torch.arange(in_features, device=qweight.device) // (in_features // groups)
    return GroupQuant(codes.T.to(torch.uint8).contiguous(), scales.T.float().contiguous(),
                      zeros.T.to(torch.int32).contiguous(), g_idx.to(torch.int32), BITS)


def _pack_outputs(values: torch.Tensor) -> torch.Tensor:
    """[rows, out] codes -> [rows, out / 8] words, slot j of word c = output 8c + AWQ_ORDER[j]."""
    rows, out_features = values.shape
    return pack_words(values.reshape(rows, out_features // PER_WORD, PER_WORD)[..., list(AWQ_ORDER)], BITS)


def _unpack_outputs(words: torch.Tensor) -> torch.Tensor:
    """[rows, out / 8] words -> [rows, out] codes (int64), output 8c + k from slot AWQ_REVERSE_ORDER[k]."""
    return unpack_words(words, BITS)[..., list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1)
