"""GPTQ: quantize a linear layer's weight column by column, each column's rounding error
compensated by the columns not yet quantized (Frantar et al. 2022; docs/formats.md §5).

For a layer y = x W^T with calibration inputs X, GPTQ minimizes ||X W^T - X Q^T||^2 one input
column at a time. With H = (2/N) sum_rows x x^T (N: calibration sequences), the optimal
update after quantizing column j (Optimal Brain Surgeon) moves the remaining columns by

    err_j = (w_j - q_j) / [H^-1]_jj,      W[:, k] -= err_j [H^-1]_jk    for k > j

using the upper Cholesky factor U of H^-1 (U_jj, U_jk stand in for the updated inverse's row,
which is what makes one factorization serve every step). Steps:

    1. dead inputs (H_jj = 0): H_jj = 1, W[:, j] = 0
    2. act_order: columns in order of decreasing H_jj (the most-used inputs first)
    3. damping: H += damp * mean(diag H) * I
    4. U = chol_upper(chol_inverse(chol(H)))
    5. columns in lazy blocks of 128: the update inside a block is applied at once per column,
       the update to the columns after the block once per block (one matmul), which computes
       the same W as the column-by-column rule with far fewer memory passes
    6. groups: each group's grid (groupwise.py) is fitted, when the column loop reaches the
       group's first column, to the *error-updated* weights of that group (all of its columns
       as they stand then; the reference code reads columns inside the current lazy block
       before their in-block updates, which differs only for groups smaller than a block)

If H is not positive definite even after damping (too few or degenerate calibration inputs),
the damping is raised tenfold, at most twice, with a warning naming the new value; then a
ValueError. The result holds codes in the original column order with ``g_idx`` mapping each
column to its group (non-monotonic under act_order), as GPTQ checkpoints store them.
"""

from __future__ import annotations

import logging
import math

import torch

from ..errors import InputError
from .groupwise import GroupQuant, check_grid, grid, quantize

log = logging.getLogger(__name__)
BLOCK = 128


class Hessian:
    """Running H = (2/N) sum x x^T over calibration inputs, N counting sequences (GPTQ's scale)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu"):
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.sequences = 0
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x: [batch, seq, in] (or [tokens, in] as one sequence), the layer's inputs."""
        batch = x.shape[0] if x.dim() == 3 else 1
        x = x.reshape(-1, x.shape[-1]).float()
        self.H *= self.sequences / (self.sequences + batch)
        self.sequences += batch
        self.tokens += x.shape[0]
        x = math.sqrt(2 / self.sequences) * x
        self.H += x.T @ x


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    block: int = BLOCK,
) -> tuple[GroupQuant, float]:
    """(quantized weight, the summed squared error GPTQ minimized) for ``weight`` [out, in]."""
    out_features, in_features = weight.shape
    check_grid(bits, group_size, in_features)
    if hessian.shape != (in_features, in_features):
        raise InputError(f"the Hessian has shape {tuple(hessian.shape)}; this weight needs ({in_features}, {in_features})")
    if not torch.isfinite(hessian).all():
        raise InputError("the Hessian holds NaN/Inf: the calibration inputs of this layer overflowed or were invalid")
    if not 0 <= damp < 1:
        raise InputError(f"damp must be in [0, 1), got {damp!r}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, damp)

    size = in_features if group_size == -1 else group_size
    codes = torch.zeros_like(W)
    scales = torch.zeros(out_features, in_features // size, device=W.device)
    zeros = torch.zeros_like(scales)
    scale = zero = None
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, in_features, block):
        i2 = min(i1 + block, in_features)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            column = i1 + i
            if column % size == 0:  # a new group: its grid from the error-updated weights
                group = W1[:, i : i + size]  # the group's columns: the rest of this block, then beyond it
                if group.shape[1] < size:
                    group = torch.cat([group, W[:, i2 : i2 + size - group.shape[1]]], dim=1)
                scale, zero = grid(group, bits, sym)
                scales[:, column // size], zeros[:, column // size] = scale, zero
            w, d = W1[:, i], U1[i, i]
            q = quantize(w, scale, zero, bits)
            codes[:, column] = q
            err = (w - scale * (q - zero)) / d
            loss += err.square().sum() / 2  # GPTQ's objective: (w - q)^2 / (2 U_jj^2), summed
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]

    g_idx = torch.arange(in_features, device=W.device) // size
    if perm is not None:
        inverse = torch.argsort(perm)
        codes, g_idx = codes[:, inverse], g_idx[inverse]
    quant = GroupQuant(codes.to(torch.uint8), scales, zeros.to(torch.int32), g_idx.to(torch.int32), bits)
    return quant, loss.item()


def _inverse_cholesky(H: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damping)^-1, raising the damping if H is not positive definite."""
    mean_diag = torch.diag(H).mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for value in (damp, damp * 10, damp * 100) if damp > 0 else (0.0, 0.01, 0.1):
        L, info = torch.linalg.cholesky_ex(H + value * mean_diag * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
        if info == 0:
            if value != damp:
                log.warning("GPTQ: the Hessian is not positive definite with damp=%g; used damp=%g", damp, value)
            return U
    raise InputError(f"the Hessian is not positive definite even with damp={value:g}: too few or degenerate "
                     "calibration inputs for this layer; add calibration data or raise damp")
