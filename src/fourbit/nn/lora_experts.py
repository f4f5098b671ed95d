"""LoRA on mixture-of-experts weights: one low-rank update per expert of a fused 3-D expert
weight, in the layout PEFT uses for ``target_parameters``.

A fused expert weight P (nn/experts4bit.py) holds E matrices W_e [out, in] (transformers stores
them [E, out, in], or [E, in, out] where the module ``is_transposed``). LoRA gives each its own
update, applied where the experts forward multiplies by W_e:

    W_e' = W_e + s * B_e @ A_e                 A_e: [r, in], B_e: [out, r], s = alpha / r
    x @ W_e'^T = x @ W_e^T + s * (x @ A_e^T) @ B_e^T

PEFT keeps the E pairs in two linear layers, and so do we (the tensors are PEFT's, unchanged):

    lora_A.weight  [r*E, in]     rows e*r .. e*r + r-1 are A_e                     (expert-major)
    lora_B.weight  [out, r*E]    column k*E + e is column k of B_e                 (rank-major)

A starts Kaiming-uniform over the whole [r*E, in] matrix (bound 1/sqrt(in)) and B at zero, so
the model starts out equal to its base. PEFT refuses dropout and DoRA on such weights (dropout
cannot be factored out of a weight update), and so do we.

File keys: PEFT wraps each targeted parameter of a module in turn, in the order the module
registers its parameters, each wrapper around the previous one; the last wrapped is outermost.
So of n targeted weights of one experts module, the i-th (0-based) is reached through n-1-i
``base_layer`` steps: for Mixtral's experts ``experts.base_layer.lora_A.weight`` is gate_up_proj's
and ``experts.lora_A.weight`` is down_proj's (:func:`peft_key`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..errors import InputError
from .experts4bit import EXPERT_WEIGHTS, IMPLEMENTATION, is_expert_weight, register
from .lora_scaling import lora_scaling


class ExpertLoRA(nn.Module):
    """The LoRA factors of one fused expert weight (E experts, each [out, in])."""

    def __init__(self, num_experts: int, in_features: int, out_features: int, r: int, alpha: float,
                 use_rslora: bool = False, dtype: torch.dtype = torch.float32, device=None, init: str = "kaiming"):
        super().__init__()
        if r <= 0:
            raise InputError(f"LoRA rank r must be a positive integer, got {r}")
        self.num_experts, self.in_features, self.out_features = num_experts, in_features, out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_A = nn.Linear(in_features, r * num_experts, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r * num_experts, out_features, bias=False, device=device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def factors(self, expert: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_e [r, in], B_e [out, r]) of one expert, views into the stored matrices."""
        a = self.lora_A.weight.view(self.num_experts, self.r, self.in_features)[expert]
        b = self.lora_B.weight.view(self.out_features, self.r, self.num_experts)[:, :, expert]
        return a, b

    def update(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        """s * (x @ A_e^T) @ B_e^T, in the adapter's dtype."""
        a, b = self.factors(expert)
        return nn.functional.linear(nn.functional.linear(x.to(a.dtype), a), b) * self.scaling

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * B_e @ A_e for every expert: [E, out, in]."""
        a = self.lora_A.weight.to(dtype).view(self.num_experts, self.r, self.in_features)
        b = self.lora_B.weight.to(dtype).view(self.out_features, self.r, self.num_experts).permute(2, 0, 1)
        return self.scaling * (b @ a)

    def extra_repr(self) -> str:
        rs = ", rslora" if self.use_rslora else ""
        return f"LoRA on {self.num_experts} experts: r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{rs}"


def match_expert_weights(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the expert weights ``targets`` selects, by PEFT's rule for
    ``target_parameters``: a name matches a parameter's full name or its last dotted components
    (``mlp.experts.gate_up_proj`` matches ``model.layers.0.mlp.experts.gate_up_proj``)."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    chosen, refused, available = [], [], set()
    for module_name, module in model.named_modules():
        for name in module._parameters:
            key = f"{module_name}.{name}" if module_name else name
            expert = is_expert_weight(module, name)
            if expert:
                available.add(name)
            if any(key == t or key.endswith("." + t) for t in targets):
                (chosen if expert else refused).append(key)
    if refused:
        raise InputError(
            f"lora_target_parameters selects {refused[:3]}, which are not fused expert weights; LoRA on parameters "
            f"covers the 3-D expert weights of mixture-of-experts modules ({', '.join(EXPERT_WEIGHTS)}), linear "
            "layers take lora_target")
    if not chosen:
        have = f"its expert weights are named {sorted(available)}" if available else "it has no fused expert weights"
        raise InputError(f"lora_target_parameters {targets} matches no expert weight of this model; {have}")
    return chosen


def add_expert_lora(model: nn.Module, names: list[str], r: int, alpha: float, use_rslora: bool = False,
                    dtype: torch.dtype = torch.float32, init: str = "kaiming") -> None:
    """Give each expert weight in ``names`` (full parameter names) its per-expert LoRA factors, and
    route the experts' forward through fourbit's implementation, which applies them."""
    for key in names:
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        experts, out_features, in_features = expert_shape(module, name)
        if not hasattr(module, "experts_lora"):
            module.experts_lora = nn.ModuleDict()
        device = module._parameters[name].device
        module.experts_lora[name] = ExpertLoRA(experts, in_features, out_features, r, alpha, use_rslora, dtype,
                                               device, init)
    register()
    model.set_experts_implementation(IMPLEMENTATION)


def expert_shape(module: nn.Module, name: str) -> tuple[int, int, int]:
    """(experts, out, in) of a fused expert weight, quantized (nn/experts4bit.py) or dense."""
    states = getattr(module, "experts_4bit", {}).get(name)
    if states is not None:
        out_features, in_features = states[0].shape
        return len(states), out_features, in_features
    experts, rows, columns = module._parameters[name].shape
    return (experts, columns, rows) if module.is_transposed else (experts, rows, columns)


def expert_lora_layers(model: nn.Module) -> dict[str, ExpertLoRA]:
    """The expert LoRA factors of ``model`` by full parameter name, each module's in its
    parameter order (PEFT's nesting order, :func:`peft_key`)."""
    found = {}
    for module_name, module in model.named_modules():
        adapters = getattr(module, "experts_lora", None)
        if adapters is None:
            continue
        for name in module._parameters:
            if name in adapters:
                found[f"{module_name}.{name}"] = adapters[name]
    return found


def peft_key(model: nn.Module, key: str) -> str:
    """The module path under which PEFT's file keeps the factors of the expert weight ``key``
    (``model.layers.0.mlp.experts`` for the outermost wrapper, ``...experts.base_layer`` for the one
    inside it, and so on: see the module docstring)."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    targeted = [n for n in module._parameters if n in module.experts_lora]
    return module_name + ".base_layer" * (len(targeted) - 1 - targeted.index(name))
