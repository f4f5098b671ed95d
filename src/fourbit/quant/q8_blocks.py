"""Float32 weights that are, exactly, 8-bit codes times one scale per block of 32.

For W [n, k], k a multiple of 32, cut along each row into blocks of 32:

    d[n, b]  = max |W[n, c]| over block b / 127          (float32; Q8_0's own choice of scale)
    q[n, c]  = W[n, c] / d[n, b]                          (an integer in [-127, 127], else no form)
    W[n, c] == float32(q[n, c] * d[n, b])                 (every value, as float32 multiplies them)

A weight read from a GGUF file's Q8_0 tensor, its codes times float16 scales dequantized into
float32, has this form (the largest code of a Q8_0 block is +-127, so its largest magnitude over
127 gives the float16 scale back exactly): the embedded SmolLM2's tied embeddings and output head
do. Where every block checks out, the codes and scales are the weight itself in 9 bits a value
instead of 32, and a product that reads them (kernels/cpu/native.py ``matmul_q8``) reads a
quarter of the bytes for the same result. Where one value does not, there is no form: nothing is
ever rounded here. An all-zero block has d = 0 and codes 0.
"""

from __future__ import annotations

import torch

BLOCK = 32
ROWS_AT_ONCE = 4096  # rows checked per step: bounds the check's scratch (a few copies of this many rows)


@torch.no_grad()
def q8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(codes, scales)``: int8 [n, k] and float32 [n, k / 32] whose products are ``weight``'s
    values exactly, or None where the float32 2-D ``weight`` has no such form (another dtype, k
    not a multiple of 32, a value off its block's grid)."""
    if weight.dtype != torch.float32 or weight.dim() != 2 or weight.shape[1] % BLOCK or weight.is_meta:
        return None
    n, k = weight.shape
    codes = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, k // BLOCK, dtype=torch.float32, device=weight.device)
    for start in range(0, n, ROWS_AT_ONCE):
        w = weight[start:start + ROWS_AT_ONCE].reshape(-1, k // BLOCK, BLOCK)
        d = w.abs().amax(-1, keepdim=True) / 127
        q = torch.where(d > 0, w / d, 0.0).round_()  # (a NaN or an infinity fails the check below)
        if not (q * d == w).all():
            return None
        codes[start:start + ROWS_AT_ONCE] = q.reshape(-1, k).to(torch.int8)
        scales[start:start + ROWS_AT_ONCE] = d.reshape(-1, k // BLOCK)
    return codes, scales
