"""llama.cpp's K-quants Q4_K, Q5_K and Q6_K: 256-value super-blocks of 8 or 16 sub-blocks, each
sub-block with its own scale (and min), the scales themselves quantized against one float16
super-scale. gguf-py reads them but has no quantizer for them; this file quantizes into them.

Per super-block of 256 values x (the block layouts, byte for byte, as GGUF stores them):

    Q6_K (210 bytes): 16 sub-blocks of 16, symmetric 6-bit codes q in [0, 63]
        x ~ d * s_j * (q - 32)             d: float16, s_j: int8
        ql[128] low 4 bits, qh[64] high 2 bits, scales[16] int8, d
    Q4_K (144 bytes): 8 sub-blocks of 32, asymmetric 4-bit codes q in [0, 15]
        x ~ d * s_j * q - dmin * m_j       d, dmin: float16; s_j, m_j: 6-bit unsigned
        d, dmin, scales[12] (the 8 s_j and 8 m_j packed in 6 bits), qs[128] 4-bit codes
    Q5_K (176 bytes): as Q4_K with 5-bit codes q in [0, 31]: d, dmin, scales[12], qh[32] (the
        fifth bit), qs[128] (the low 4 bits)

Code layout within a super-block, in chunks of 64 values (Q4_K/Q5_K: 4 chunks; chunk c covers
sub-blocks 2c and 2c+1): qs byte c*32 + l holds value c*64 + l in its low nibble and value
c*64 + 32 + l in its high nibble; Q5_K's qh byte l holds, in bits 2c and 2c+1, the fifth bit of
those same two values. Q6_K in halves of 128 values (h = 0, 1), for l in 0..31: ql byte h*64 + l
holds values h*128 + l (low nibble) and h*128 + 64 + l (high nibble), ql byte h*64 + 32 + l holds
values h*128 + 32 + l and h*128 + 96 + l, and qh byte h*32 + l holds the top two bits of the
four values h*128 + l, +32, +64, +96 in bits 0-1, 2-3, 4-5, 6-7.

The 6-bit packing of Q4_K/Q5_K's scales[12] (s_j, m_j: sub-block j's scale and min codes):
bytes 0-3 hold s_0..s_3 and bytes 4-7 m_0..m_3 in their bits 0-5; bytes 8-11 hold the low four
bits of s_4..s_7 (bits 0-3) and of m_4..m_7 (bits 4-7); the top two bits of s_4..s_7 sit in bits
6-7 of bytes 0-3, those of m_4..m_7 in bits 6-7 of bytes 4-7.

How fourbit picks the numbers (its own method; llama.cpp's reference quantizer minimises an
error weighted toward large values, so the bytes differ; tests/io/test_gguf_export.py compares
the squared errors: ours over llama.cpp's 0.99-1.00 for Q4_K, 1.01-1.02 for Q5_K, 1.04-1.05 for
Q6_K): per sub-block, a few candidate ranges (Q6_K: the signed absmax mapped to -32, shrunk;
Q4_K/Q5_K: [min(x, 0), max(x)] narrowed from either end) each give codes, to which the scale (and
min) are refitted by least squares; the candidate with the least squared error is kept. The
sub-block scales and mins are then rounded to their 6 or 8 bits against the super-block's
largest, and the codes recomputed with the scales as stored.
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256
SHRINK = torch.linspace(0.80, 1.0, 11)  # symmetric: candidate fractions of the absmax scale
TRIM = torch.tensor([0.0, 0.02, 0.05, 0.1, 0.15])  # affine: candidate fractions cut from each end


def _f16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def _best_symmetric(x: torch.Tensor, low: int, high: int) -> torch.Tensor:
    """Per row of x [..., n]: a scale s for x ~ s * clamp(round(x / s), low, high): of the signed
    absmax mapped to ``low`` and shrunk by each SHRINK factor, with the least-squares s refitted
    to each candidate's codes, the one with the least squared error."""
    extreme = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # signed
    best_s, best_err = extreme / low, torch.full_like(extreme, float("inf"))
    for f in SHRINK.tolist():
        s = extreme / low * f
        q = torch.clamp(torch.round(x / _nonzero(s)), low, high)
        s = (x * q).sum(-1, keepdim=True) / _nonzero((q * q).sum(-1, keepdim=True))  # refit to the codes
        q = torch.clamp(torch.round(x / _nonzero(s)), low, high)
        err = ((x - s * q) ** 2).sum(-1, keepdim=True)
        better = err < best_err
        best_s, best_err = torch.where(better, s, best_s), torch.where(better, err, best_err)
    return best_s.squeeze(-1)


def _best_affine(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x [..., n]: (scale, min) with x ~ scale * q + min, q in [0, levels], min <= 0:
    of the range [min(x, 0), max(x)] narrowed from either end by each pair of TRIM fractions,
    with scale and min refitted by least squares to each candidate's codes, the one with the
    least squared error."""
    lo0 = torch.clamp(x.amin(-1, keepdim=True), max=0)
    hi0 = x.amax(-1, keepdim=True)
    width = hi0 - lo0
    n = x.shape[-1]
    best_s, best_lo = width / levels, lo0
    best_err = torch.full_like(lo0, float("inf"))
    for a in TRIM.tolist():
        for b in TRIM.tolist():
            lo = torch.clamp(lo0 + a * width, max=0)  # the format's min is <= 0
            s = (hi0 - b * width - lo) / levels
            q = torch.clamp(torch.round((x - lo) / _nonzero(s)), 0, levels)
            # least squares for x ~ s q + lo over these codes; where that min comes out above 0
            # (the format's min is <= 0), the least-squares scale with the min held at 0
            sq, sx = q.sum(-1, keepdim=True), x.sum(-1, keepdim=True)
            sqq, sqx = (q * q).sum(-1, keepdim=True), (q * x).sum(-1, keepdim=True)
            det = n * sqq - sq * sq
            fit_s = torch.where(det > 0, (n * sqx - sq * sx) / _nonzero(det), s)
            fit_lo = torch.where(det > 0, (sx - fit_s * sq) / n, lo)
            positive = fit_lo > 0
            fit_s = torch.where(positive, sqx / _nonzero(sqq), fit_s).clamp(min=0)
            fit_lo = torch.where(positive, torch.zeros_like(fit_lo), fit_lo)
            for cand_s, cand_lo in ((s, lo), (fit_s, fit_lo)):
                q = torch.clamp(torch.round((x - cand_lo) / _nonzero(cand_s)), 0, levels)
                err = ((x - (cand_s * q + cand_lo)) ** 2).sum(-1, keepdim=True)
                better = err < best_err
                best_s = torch.where(better, cand_s, best_s)
                best_lo = torch.where(better, cand_lo, best_lo)
                best_err = torch.where(better, err, best_err)
    return best_s.squeeze(-1), best_lo.squeeze(-1)


def _nonzero(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t == 0, torch.ones_like(t), t)


def _pack_scales_6bit(s: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """s, m: [B, 8] integers in [0, 63] -> [B, 12] bytes (the module docstring's packing)."""
    out = torch.zeros(s.shape[0], 12, dtype=torch.int32)
    out[:, 0:4] = s[:, 0:4] | ((s[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (s[:, 4:8] & 0xF) | ((m[:, 4:8] & 0xF) << 4)
    return out


def quantize_q6_k(x: torch.Tensor) -> np.ndarray:
    """Rows of x [rows, n] (n a multiple of 256) -> Q6_K blocks, uint8 [rows, n / 256 * 210]."""
    rows, n = x.shape
    blocks = x.float().reshape(-1, QK_K)
    sub = blocks.reshape(-1, 16, 16)
    s = _best_symmetric(sub, -32, 31)  # [B, 16]
    smax_index = s.abs().argmax(-1, keepdim=True)
    smax = s.gather(-1, smax_index)
    d = _f16(smax / -128)  # the largest sub-block scale becomes -128
    safe_d = torch.where(d == 0, torch.ones_like(d), d)
    scales = torch.clamp(torch.round(s / safe_d), -128, 127)
    step = (d * scales).unsqueeze(-1)  # [B, 16, 1]
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = (torch.clamp(torch.round(sub / safe), -32, 31) + 32).to(torch.int32).reshape(-1, 2, 4, 32)  # [B, half, quarter, l]
    ql = torch.zeros(q.shape[0], 2, 64, dtype=torch.int32)
    ql[:, :, 0:32] = (q[:, :, 0] & 0xF) | ((q[:, :, 2] & 0xF) << 4)
    ql[:, :, 32:64] = (q[:, :, 1] & 0xF) | ((q[:, :, 3] & 0xF) << 4)
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    out = np.concatenate([
        ql.reshape(-1, 128).to(torch.uint8).numpy(),
        qh.reshape(-1, 64).to(torch.uint8).numpy(),
        scales.to(torch.int8).numpy().view(np.uint8),
        d.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2),
    ], axis=1)
    return out.reshape(rows, n // QK_K * 210)


def _quantize_affine_k(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, ...]:
    """The shared part of Q4_K and Q5_K: (d, dmin [B], packed scales [B, 12], codes [B, 256])."""
    levels = 2**bits - 1
    sub = x.float().reshape(-1, 8, 32)
    s, lo = _best_affine(sub, levels)  # [B, 8]
    m = -lo  # >= 0
    d = _f16(s.amax(-1, keepdim=True) / 63)
    dmin = _f16(m.amax(-1, keepdim=True) / 63)
    sq = torch.clamp(torch.round(s / torch.where(d == 0, torch.ones_like(d), d)), 0, 63)
    mq = torch.clamp(torch.round(m / torch.where(dmin == 0, torch.ones_like(dmin), dmin)), 0, 63)
    step = (d * sq).unsqueeze(-1)
    offset = (dmin * mq).unsqueeze(-1)
    safe = torch.where(step == 0, torch.ones_like(step), step)
    q = torch.clamp(torch.round((sub + offset) / safe), 0, levels).to(torch.int32).reshape(-1, QK_K)
    packed = _pack_scales_6bit(sq.to(torch.int32), mq.to(torch.int32))
    return d.squeeze(-1), dmin.squeeze(-1), packed, q


def _header(d: torch.Tensor, dmin: torch.Tensor, packed: torch.Tensor) -> list[np.ndarray]:
    return [d.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2),
            dmin.to(torch.float16).numpy().view(np.uint8).reshape(-1, 2),
            packed.to(torch.uint8).numpy()]


def quantize_q4_k(x: torch.Tensor) -> np.ndarray:
    """Rows of x [rows, n] (n a multiple of 256) -> Q4_K blocks, uint8 [rows, n / 256 * 144]."""
    rows, n = x.shape
    d, dmin, packed, q = _quantize_affine_k(x, 4)
    chunks = q.reshape(-1, 4, 2, 32)
    qs = (chunks[:, :, 0] | (chunks[:, :, 1] << 4)).reshape(-1, 128)
    out = np.concatenate([*_header(d, dmin, packed), qs.to(torch.uint8).numpy()], axis=1)
    return out.reshape(rows, n // QK_K * 144)


def quantize_q5_k(x: torch.Tensor) -> np.ndarray:
    """Rows of x [rows, n] (n a multiple of 256) -> Q5_K blocks, uint8 [rows, n / 256 * 176]."""
    rows, n = x.shape
    d, dmin, packed, q = _quantize_affine_k(x, 5)
    chunks = q.reshape(-1, 4, 2, 32)
    qs = ((chunks[:, :, 0] & 0xF) | ((chunks[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    high = chunks >> 4  # [B, 4, 2, 32]
    shifts = (2 * torch.arange(4).view(1, 4, 1, 1) + torch.arange(2).view(1, 1, 2, 1))
    qh = (high << shifts).sum(dim=(1, 2))  # [B, 32]
    out = np.concatenate([*_header(d, dmin, packed), qh.to(torch.uint8).numpy(), qs.to(torch.uint8).numpy()], axis=1)
    return out.reshape(rows, n // QK_K * 176)
