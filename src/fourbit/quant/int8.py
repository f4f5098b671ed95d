"""LLM.int8(): 8-bit weights and activations, with the outlier input features kept out of int8
(Dettmers et al. 2022; docs/formats.md §3).

    weights, once:   SCB_o = max_i |W_oi|,            CB_oi = round(127 W_oi / SCB_o)      int8
    activations:     outliers = input features i with |x_ti| >= threshold for any token t
                     x' = x with the outlier features zeroed
                     SCA_t = max_i |x'_ti|,            CA_ti = round(127 x'_ti / SCA_t)    int8
    y = (CA @ CB^T) * SCA_t * SCB_o / 127^2          the int8 product, accumulated in int32
      + x[:, outliers] @ (CB[:, outliers] * SCB / 127)^T     in floating point
      + b

The outlier features are few but large (they would dominate each token's absmax and crush the
other features to a few int8 levels), so they are multiplied in floating point, with the
int8-dequantized weight columns, as bitsandbytes does once the fp16 weights are gone. A
threshold of 0 turns the decomposition off. The int8 product runs as integers (torch._int_mm)
on a GPU, else in float32 over slices short enough to be exact (see ``_int_product``).
"""

from __future__ import annotations

import torch

DEFAULT_THRESHOLD = 6.0


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(CB int8 [out, in], SCB float32 [out]): row-wise absmax quantization."""
    w = weight.detach().float()
    scb = w.abs().amax(dim=1)
    cb = torch.round(w * (127 / torch.where(scb == 0, 1.0, scb))[:, None])
    return cb.to(torch.int8), scb


def dequantize_weight_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (cb.float() * (scb[:, None] / 127)).to(dtype)


def outlier_features(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices of the input features where some token's |x| reaches ``threshold`` (none if 0)."""
    if threshold <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return (x.abs() >= threshold).any(dim=0).nonzero().flatten()


def int8_matmul(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> torch.Tensor:
    """y = x @ W^T + b for ``x`` [..., in] with the int8 weight (CB, SCB); float32 result."""
    shape = x.shape
    x = x.reshape(-1, shape[-1]).float()
    outliers = outlier_features(x, threshold)
    inliers = x.clone()
    inliers[:, outliers] = 0
    sca = inliers.abs().amax(dim=1)
    ca = torch.round(inliers * (127 / torch.where(sca == 0, 1.0, sca))[:, None]).to(torch.int8)
    y = _int_product(ca, cb).float() * (sca[:, None] * scb[None, :] / 127**2)
    if outliers.numel():
        y += x[:, outliers] @ dequantize_weight_int8(cb[:, outliers], scb).T
    if bias is not None:
        y += bias.float()
    return y.view(*shape[:-1], cb.shape[0])


EXACT_FP32_TERMS = 1024  # 1024 * 127^2 < 2^24: sums of this many int8 products are exact in float32


def _int_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """int8 [m, k] @ int8 [n, k]^T, exactly: int32 through torch._int_mm on a GPU (m > 16, k and n
    multiples of 8); elsewhere (the CPU's int8 kernel is far slower than its float BLAS) float32
    products over slices of at most EXACT_FP32_TERMS columns, each exact, summed in float64."""
    if a.is_cuda and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0:  # the shapes it takes
        return torch._int_mm(a, b.T)  # the transposed view is the column-major layout cuBLAS reads: no copy
    total = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64, device=a.device)
    for start in range(0, a.shape[1], EXACT_FP32_TERMS):
        part = slice(start, start + EXACT_FP32_TERMS)
        total += (a[:, part].float() @ b[:, part].float().T).double()
    return total
