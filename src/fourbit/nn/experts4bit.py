"""Mixture-of-experts weights in 4 bits: transformers' fused 3-D expert parameters, each expert's
matrix quantized on its own (NF4 or FP4, with double quantization), dequantized when a batch
routes tokens to that expert.

transformers 5 stores a layer's experts as 3-D parameters of one module (Mixtral, Qwen3-MoE,
GPT-OSS, DeepSeek-style): ``gate_up_proj`` [E, 2I, H] and ``down_proj`` [E, H, I] (or ``up_proj``
without a gate; GPT-OSS transposed, [E, H, 2I], with biases). Its ``use_experts_implementation``
decorator marks such modules (``has_gate``, ``has_bias``, ``is_transposed``, ``_apply_gate``) and
dispatches their forward through the ``ExpertsInterface`` registry, where this file registers
``"fourbit"``:

    for each expert e that the batch routes tokens T_e to, with routing weights w:
        h   = x[T_e] @ W_up(e)^T + b_up(e)            W_up(e) = dequant(4-bit codes of expert e)
        h   = gate(h)  (the module's _apply_gate)     or act(h) without a gate
        y   = h @ W_down(e)^T + b_down(e)
        out[T_e] += w * y

Each expert matrix is stored in the [out, in] orientation (a transposed layout is transposed
once, when quantized), so every product is a frozen 4-bit one: the backward dequantizes again instead
of keeping the dense matrix (nn/frozen_linear.py). Storage per 3-D parameter P: ``P`` becomes the
uint8 codes [E, ceil(n/2), 1] of the E matrices of n values, and ``experts_4bit[P]`` their E
quantization states; a memory report counts them as Linear4bit's (4.127 bits a weight with
double quantization at blocks of 64).

The same forward serves experts that carry LoRA updates (nn/lora_experts.py), 4-bit or left in
16 bits. What it leaves out: saving the 4-bit experts in a folder (bitsandbytes' format has no
3-D weights).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..kernels.dequantize import dequantize_4bit
from ..kernels.matmul_4bit import matmul_4bit, matmul_4bit_grad
from ..quant.four_bit import quantize_4bit
from ..quant.state import QuantState
from .frozen_linear import frozen_product

IMPLEMENTATION = "fourbit"
EXPERT_WEIGHTS = ("gate_up_proj", "up_proj", "down_proj")


def is_experts(module: nn.Module) -> bool:
    """A module of fused expert weights whose forward transformers dispatches by implementation."""
    return hasattr(module, "is_transposed") and hasattr(module, "has_gate") and any(
        isinstance(getattr(module, name, None), torch.Tensor) for name in EXPERT_WEIGHTS)


def is_expert_weight(module: nn.Module, name: str) -> bool:
    return name in EXPERT_WEIGHTS and is_experts(module)


@torch.no_grad()
def quantize_experts_(module: nn.Module, name: str, weight: torch.Tensor, quant_type: str = "nf4",
                      blocksize: int = 64, double_quant: bool = True, compute_dtype: torch.dtype | None = None) -> nn.Parameter:
    """Quantize the 3-D expert weight ``weight`` [E, a, b] into ``module.<name>``, one expert at a
    time; returns the new uint8 parameter."""
    if weight.dim() != 3:
        raise InputError(f"{name}: expert weights are 3-D [experts, rows, columns], got shape {tuple(weight.shape)}")
    packed, states = [], []
    for e in range(weight.shape[0]):
        matrix = weight[e].T if module.is_transposed else weight[e]  # [out, in]
        codes, state = quantize_4bit(matrix.contiguous(), quant_type, blocksize, double_quant, name=f"{name}[{e}]")
        packed.append(codes)
        states.append(state)
    parameter = nn.Parameter(torch.stack(packed), requires_grad=False)
    module._parameters[name] = parameter
    if not hasattr(module, "experts_4bit"):
        module.experts_4bit = {}
    module.experts_4bit[name] = states
    module.experts_compute_dtype = compute_dtype
    return parameter


@torch.no_grad()
def dequantize_experts_(module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    """Put the dense 3-D expert weights back (in their stored orientation), in ``dtype``."""
    for name, states in module.experts_4bit.items():
        codes = module._parameters[name]
        matrices = [dequantize_4bit(codes[e], state, dtype) for e, state in enumerate(states)]
        dense = torch.stack([m.T if module.is_transposed else m for m in matrices])
        module._parameters[name] = nn.Parameter(dense.contiguous(), requires_grad=False)
    del module.experts_4bit, module.experts_compute_dtype


class _ExpertMatrix:
    """One expert's 4-bit matrix, as frozen_product multiplies with it (nn/frozen_linear.py)."""

    def __init__(self, packed: torch.Tensor, state: QuantState):
        self.packed, self.state = packed, state

    def stored(self) -> tuple[torch.Tensor, ...]:
        return (self.packed,)

    def product(self, x, bias, stored):
        return matmul_4bit(x, stored[0], self.state, bias)

    def grad_product(self, grad, stored):
        return matmul_4bit_grad(grad, stored[0], self.state)

    def weight_from(self, stored, dtype):
        return dequantize_4bit(stored[0], self.state, dtype)


def _product(module: nn.Module, name: str, expert: int, x: torch.Tensor) -> torch.Tensor:
    """``x @ W(expert)^T (+ bias)``: W dequantized from its 4 bits in the compute dtype (or the
    dense weight, for experts left in 16 bits), plus the expert's LoRA update where it has one
    (nn/lora_experts.py)."""
    bias = getattr(module, f"{name}_bias", None) if module.has_bias else None
    bias = bias[expert] if bias is not None else None
    states = getattr(module, "experts_4bit", {}).get(name)
    if states is not None:
        dtype = module.experts_compute_dtype or x.dtype
        matrix = _ExpertMatrix(module._parameters[name][expert], states[expert])
        y = frozen_product(matrix, x.to(dtype), bias.to(dtype) if bias is not None else None).to(x.dtype)
    else:
        weight = module._parameters[name][expert]
        y = nn.functional.linear(x, weight.T if module.is_transposed else weight, bias)
    adapters = getattr(module, "experts_lora", None)
    if adapters is not None and name in adapters:
        y = y + adapters[name].update(x, expert).to(y.dtype)
    return y


def experts_forward_4bit(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                         top_k_weights: torch.Tensor) -> torch.Tensor:
    """transformers' experts forward (hidden [tokens, H], top-k expert ids and weights [tokens, k])
    over 4-bit experts (or dense ones with LoRA); see the module docstring."""
    out = torch.zeros_like(hidden_states)
    num_experts = self._parameters["down_proj"].shape[0]
    with torch.no_grad():
        routed = torch.nn.functional.one_hot(top_k_index, num_classes=num_experts + 1).permute(2, 1, 0)  # [E+1, k, T]
        hit = torch.greater(routed.sum(dim=(-1, -2)), 0).nonzero()
    for expert in hit.flatten().tolist():
        if expert >= num_experts:  # transformers' sentinel for a token routed nowhere
            continue
        position, tokens = torch.where(routed[expert])
        x = hidden_states[tokens]
        if self.has_gate:
            h = self._apply_gate(_product(self, "gate_up_proj", expert, x))
        else:
            h = self.act_fn(_product(self, "up_proj", expert, x))
        y = _product(self, "down_proj", expert, h)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, tokens, (y * top_k_weights[tokens, position, None]).to(out.dtype))
    return out


def register() -> None:
    """Make ``"fourbit"`` an experts implementation transformers can dispatch to (once)."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, experts_forward_4bit)
