"""AWQ: activation-aware weight quantization of linear layers that share an input (Lin et al.
2023; AutoAWQ; docs/formats.md §6). ptq/awq_model.py runs it over a whole model.

A scale s_i > 0 per input channel changes nothing in exact arithmetic,

    x W^T = (x / s) (W · s)^T          W · s: column i of W times s_i,

and the division is free: it is folded into whatever produced x (a norm's weight, or the output
rows of the previous linear). Quantizing W · s instead of W gives the columns of the inputs that
carry large activations more of the grid: their rounding error, seen through x_i / s_i, shrinks.
AWQ picks s per group of linears W_1..W_k that read the same x:

    x̄_i = mean over calibration tokens of |x_i|                       ("x_max" in llm-awq; a mean)
    w̄_i = mean over the rows o of all k weights of |W[o, i]| / max_{j in i's group} |W[o, j]|
    for α in {0, 1/20, ..., 19/20}                                     (n_grid = 20; α = 1 not tried)
        s = x̄^α / (w̄^(1-α) + 1e-4),  clamped to >= 1e-4,  then  s /= sqrt(max(s) · min(s))
        err(α) = mean squared difference of block(x) with the W_j and with Q(W_j · s) / s
    keep the s of the smallest err

This is AutoAWQ's ``duo_scaling=True`` formula (its default); llm-awq's original is s = x̄^α.
"block" is the module the group feeds, given the same calibration inputs: the attention for
q/k/v, the MLP for gate/up, the linear itself for o_proj and down_proj. Q is the asymmetric
4-bit group grid of groupwise.py. Then the fold: prev ← prev / s (a norm's weight and bias, or a
previous linear's output rows and bias), W_j ← W_j · s.

Clip search (AutoAWQ skips q/k, whose errors pass through the softmax): per output row o and
group g of the scaled W, with m0 = max |W[o, g]|,

    m = m0 · (1 - i/20),  i = 0..9                                    (max_shrink 0.5)
    err(m) = mean over <= 512 calibration tokens t of
             (Σ_{j in g} x_tj W[o, j] - Σ_{j in g} x_tj Q(clamp(W, -m, m))[o, j])²
    W[o, g] ← clamp(W[o, g], -m*, m*)    with m* the bound of the smallest err

and last the clipped W is quantized on the asymmetric group grid, the codes AWQ's GEMM layout
stores (quant/awq_layout.py). Left out or different: the tokens for the clip search are every
ceil(n/512)-th calibration token (AutoAWQ strides by floor(n/512), which can keep up to 1023);
the grid keeps 0 inside each group's range (groupwise.py, GPTQ's rule) where AutoAWQ uses the
group's min..max with the zero point clamped to [0, 15]: the same grid whenever a group has
weights of both signs, as groups of 32 or more trained or random weights all but always do.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from ..errors import InputError
from .groupwise import GroupQuant, check_grid, quantize_rtn

BITS = 4
N_GRID = 20
MAX_SHRINK = 0.5
CLIP_TOKENS = 512
CLIP_ROWS = 1024  # output rows per step of the clip search: bounds its memory to rows x 512 tokens x groups


def fake_quantize(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """Q(W): ``weight`` [out, in] rounded to its asymmetric 4-bit group grid, in its own dtype."""
    return quantize_rtn(weight, BITS, group_size, sym=False).dequantize(weight.dtype)


def weight_mean(weights: list[torch.Tensor], group_size: int) -> torch.Tensor:
    """w̄ [in]: per input channel, the mean over all rows of |W| relative to its group's max |W|."""
    w = torch.cat([w.float() for w in weights]).abs()
    rows, n = w.shape
    size = n if group_size == -1 else group_size
    groups = w.view(rows, n // size, size)
    return (groups / (groups.amax(dim=-1, keepdim=True) + 1e-6)).view(rows, n).mean(dim=0)


def candidate_scales(x_mean: torch.Tensor, w_mean: torch.Tensor, n_grid: int = N_GRID):
    """(α, s) for α = 0, 1/n_grid, ..., (n_grid - 1)/n_grid: AutoAWQ's duo-scaling candidates."""
    for k in range(n_grid):
        ratio = k / n_grid
        s = (x_mean.float().pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
        yield ratio, s / (s.max() * s.min()).sqrt()


@torch.no_grad()
def search_scale(linears: list[nn.Linear], x_mean: torch.Tensor, block_error: Callable[[], float],
                 group_size: int, n_grid: int = N_GRID) -> tuple[torch.Tensor, float, float]:
    """(s, α, err) of the candidate whose fake-quantized weights Q(W·s)/s give the smallest
    ``block_error()`` (which runs the block with the linears' weights as they are when called).
    The weights are restored before returning."""
    originals = [m.weight.data for m in linears]
    w_mean = weight_mean(originals, group_size)
    best = None
    try:
        for ratio, s in candidate_scales(x_mean, w_mean, n_grid):
            for m, w in zip(linears, originals):
                m.weight.data = (fake_quantize(w.float() * s, group_size) / s).to(w.dtype)
            err = block_error()
            if math.isfinite(err) and (best is None or err < best[2]):
                best = (s, ratio, err)
    finally:
        for m, w in zip(linears, originals):
            m.weight.data = w
    if best is None:
        raise InputError("AWQ: the block's output error is NaN/Inf for every candidate scale; the calibration "
                         "inputs or the weights of this layer are not finite")
    return best


@torch.no_grad()
def fold_scales(prev: nn.Module, linears: list[nn.Linear], s: torch.Tensor, unit_offset: bool = False) -> None:
    """x / s into ``prev`` (a norm scaling by its weight, or the linear whose output is x), W · s
    into ``linears``: in exact arithmetic the outputs of ``linears`` do not change.

    unit_offset: ``prev`` is a norm that scales by (1 + weight) (Gemma's): its weight becomes
    (1 + w) / s - 1, so that 1 + w' = (1 + w) / s."""
    if prev.weight.shape[0] != s.numel():
        raise InputError(f"AWQ: {type(prev).__name__} gives {prev.weight.shape[0]} channels, the scales {s.numel()}")
    if unit_offset:
        wide = torch.promote_types(prev.weight.dtype, torch.float32)
        prev.weight.data = ((1 + prev.weight.data.to(wide)) / s.to(wide) - 1).to(prev.weight.dtype)
    else:
        for tensor in (prev.weight, getattr(prev, "bias", None)):
            if tensor is not None:  # a linear's output rows, or a norm's (or bias's) channels
                _rescale(tensor, 1 / s.view(-1, 1) if tensor.dim() == 2 else 1 / s)
    for m in linears:
        _rescale(m.weight, s)


def _rescale(tensor: torch.Tensor, factor: torch.Tensor) -> None:
    """tensor *= factor, computed in at least float32 (float64 stays float64), stored in its dtype."""
    wide = torch.promote_types(tensor.dtype, torch.float32)
    tensor.data = (tensor.data.to(wide) * factor.to(wide)).to(tensor.dtype)


@torch.no_grad()
def search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int, n_grid: int = N_GRID,
                max_shrink: float = MAX_SHRINK, tokens: int = CLIP_TOKENS) -> torch.Tensor:
    """m* [out, groups]: per output row and group, the max |w| bound whose quantized group-wise
    dot products with <= ``tokens`` of the inputs ``x`` [..., in] are closest to the unclipped ones."""
    in_features = weight.shape[1]
    size = in_features if group_size == -1 else group_size
    x = x.reshape(-1, in_features)
    x = x[:: math.ceil(x.shape[0] / tokens)].float().view(-1, in_features // size, size)  # [t, groups, size]
    bounds = []
    for rows in weight.float().split(CLIP_ROWS):
        w = rows.view(rows.shape[0], -1, size)
        reference = torch.einsum("tgk,ogk->otg", x, w)
        m0 = w.abs().amax(dim=-1)  # [rows, groups]
        best, best_err = m0.clone(), torch.full_like(m0, math.inf)
        for i in range(int(max_shrink * n_grid)):
            m = (m0 * (1 - i / n_grid)).unsqueeze(-1)
            q = fake_quantize(torch.clamp(w, -m, m).view(rows.shape[0], -1), group_size).view_as(w)
            err = (torch.einsum("tgk,ogk->otg", x, q) - reference).square().mean(dim=1)
            better = err < best_err
            best, best_err = torch.where(better, m.squeeze(-1), best), torch.where(better, err, best_err)
        bounds.append(best)
    return torch.cat(bounds)


def clip_and_quantize(weight: torch.Tensor, x: torch.Tensor | None, group_size: int) -> GroupQuant:
    """The codes of ``weight`` (already scaled) after the clip search on inputs ``x`` (None: no clip)."""
    w = weight.detach().float()
    if x is not None:
        size = w.shape[1] if group_size == -1 else group_size
        m = search_clip(w, x, group_size).repeat_interleave(size, dim=1)
        w = torch.clamp(w, -m, m)
    return quantize_rtn(w, BITS, group_size, sym=False)


def awq_quantize(weight: torch.Tensor, x: torch.Tensor, group_size: int = 128, clip: bool = True,
                 n_grid: int = N_GRID) -> tuple[GroupQuant, torch.Tensor]:
    """AWQ for one linear on its own, its block the linear itself: (codes of the clipped W · s, s).

    The codes represent W · s, so the layer they make computes y ≈ (x / s) @ W^T: the caller folds
    1/s into whatever produces x. x: calibration inputs [..., in].
    """
    out_features, in_features = weight.shape
    check_grid(BITS, group_size, in_features)
    x = x.reshape(-1, in_features).float()
    linear = nn.Linear(in_features, out_features, bias=False, device=weight.device)
    linear.weight.data = weight.detach().float().clone()
    with torch.no_grad():
        reference = linear(x)
    s, _, _ = search_scale([linear], x.abs().mean(dim=0), lambda: (linear(x) - reference).square().mean().item(),
                           group_size, n_grid)
    return clip_and_quantize(linear.weight * s, x / s if clip else None, group_size), s
