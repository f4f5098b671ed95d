"""Dense products on a CPU with the weight packed once, for weights that meet many small products.

    y = x @ W^T + b

On a CPU, ``torch.nn.functional.linear`` hands the product to oneDNN or MKL, which first
reorder W into their blocked layout, at every call. When x has a few rows (decoding: one token
per request) that reorder is a large part of the call: SmolLM2's 576 x 1536 weight in bf16 takes
60 us a call at one row with F.linear, 36 prepacked (121 and 97 at sixteen rows). :func:`prepack`
reorders once and :func:`prepacked_linear` multiplies with the packed weight: oneDNN, the same
library, without the repeated reorder. In float32 the smallest weights at one row are slower
prepacked (192 x 576: 41 us against MKL's 17); a whole decode step is faster in both dtypes
(bench/bench_cpu_decode.py, figures in bench/RESULTS.md).

Torch has no public API for this in eager mode; these are its ``mkldnn`` ops that torch.compile's
CPU weight freezing emits (``_reorder_linear_weight``, ``_linear_pointwise``). So :func:`prepack`
first checks, once per dtype, that they exist here and agree with ``F.linear`` (the plain-torch
twin) on a small product, and otherwise returns the weight as it is; :func:`prepacked_linear`
takes either. A packed weight has no autograd: callers that need dL/dx use another path.
"""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


def prepack(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` [out, in] in oneDNN's layout for :func:`prepacked_linear` where that works on this
    machine (a CPU tensor in float32 or bfloat16), else ``weight`` itself."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not _packs(weight.dtype):
        return weight
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def is_prepacked(weight: torch.Tensor) -> bool:
    return weight.layout == torch._mkldnn


def prepacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``weight`` from :func:`prepack` (packed or not); x [..., in]."""
    if not is_prepacked(weight):
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")


@functools.cache
def _packs(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU pack ``dtype`` weights and multiply with them as F.linear does."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False  # no native bf16 here: oneDNN would emulate it
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(24, 40, generator=generator).to(dtype)
    x = torch.randn(3, 40, generator=generator).to(dtype)
    try:
        got = prepacked_linear(x, torch.ops.mkldnn._reorder_linear_weight(w)).double()
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    want = x.double() @ w.double().T
    # the products' own rounding: float32 sums of 40 terms, or bf16's 8-bit mantissa on the output
    tolerance = 1e-4 if dtype == torch.float32 else 4e-2
    return bool(torch.allclose(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item()))
