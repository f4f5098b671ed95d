"""LoRA: a trainable low-rank update beside a frozen linear layer, which it wraps.

    y = base(x) + s * B(A(dropout(x)))         A: [r, in], B: [out, r]
    s = alpha / r        (rsLoRA: alpha / sqrt(r), which keeps the update's scale as r grows)

A starts Kaiming-uniform (bound 1/sqrt(in), as nn.Linear's default) and B at zero, so the wrapped
model starts out exactly equal to the base. The base is any module computing ``x @ W^T + b``:
``nn.Linear``, :class:`~fourbit.nn.Linear4bit`, :class:`~fourbit.nn.GPTQLinear`,
:class:`~fourbit.nn.AWQLinear`, :class:`~fourbit.nn.Linear8bit`. It is
wrapped, never subclassed, and stays frozen; the adapter is kept in its own (higher) precision
and the input is cast to it. The gradient flows to A and B through autograd; through a 4-bit
base it needs only dL/dx = dL/dy @ W, which Linear4bit computes from its packed bytes.

DoRA (weight-decomposed LoRA, as PEFT defines it) splits the adapted weight into a direction
and a learned per-output-row magnitude m (initialised to the row norms of W):

    W' = m * (W + s B A) / ||W + s B A||_row
    y  = (m / n - 1) * (x W^T) + (m / n) * s * B A x + b,     n = ||W + s B A||_row, detached

(the norm is treated as a constant in backward, as in the DoRA paper §4.3, to save memory).

Names follow PEFT's on-disk layout (``base_layer``, ``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector``), so io/peft.py maps our state dict to PEFT's keys by a prefix.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import InputError
from ..kernels.lora import qlora_linear
from .frozen_linear import FrozenLinear
from .linear4bit import Linear4bit
from .lora_experts import add_expert_lora, expert_lora_layers, match_expert_weights
from .lora_scaling import lora_scaling
from .targets import KEEP_DENSE, kept_dense

LINEAR_TYPES = (nn.Linear, FrozenLinear)  # what LoRA wraps: dense linears and every quantized one
ALL_LINEAR = ("all-linear", "all")


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight a base layer represents, dequantized if it is quantized."""
    if hasattr(base, "dequantize"):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


class LoRALinear(nn.Module):
    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        dtype: torch.dtype = torch.float32,
        init: str = "kaiming",
    ):
        super().__init__()
        if r <= 0:
            raise InputError(f"LoRA rank r must be a positive integer, got {r}")
        if not 0 <= dropout < 1:
            raise InputError(f"lora_dropout must be in [0, 1), got {dropout}")
        if init not in ("kaiming", "gaussian"):
            raise InputError(f"unknown LoRA init {init!r}; expected 'kaiming' or 'gaussian'")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.alpha, self.use_rslora, self.use_dora = r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        # the weight, or a quantized layer's packed tensors (parameters or buffers)
        device = next(itertools.chain(base_layer.parameters(), base_layer.buffers())).device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:
            with torch.no_grad():
                norm = dense_weight(base_layer, torch.float32).norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * B @ A, the [out, in] update this adapter adds (before DoRA's rescaling)."""
        return self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fusable():  # the same function in one autograd node (kernels/lora.py)
            base = self.base_layer
            return qlora_linear(x, base.weight, base.quant_state, base.bias, self.lora_A.weight, self.lora_B.weight,
                                self.scaling, base.compute_dtype)
        result = self.base_layer(x)
        dropped = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        update = self.lora_B(self.lora_A(dropped)) * self.scaling
        if not self.use_dora:
            return result + update.to(result.dtype)
        return self._dora(dropped, result, update)

    def _fusable(self) -> bool:
        base = self.base_layer
        return (
            not self.use_dora
            and isinstance(self.lora_dropout, nn.Identity)
            and isinstance(base, Linear4bit)
            and base.quant_state is not None
            and base.dense_copy is None  # inside dense_weights(): the module path reuses the dense copy
            and (base.bias is None or not base.bias.requires_grad)
        )

    def _dora(self, dropped, result, update):
        weight = dense_weight(self.base_layer, self.lora_A.weight.dtype)
        norm = (weight + self.delta_weight(weight.dtype)).norm(dim=1).detach()
        scale = self.lora_magnitude_vector / norm
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(self.lora_dropout, nn.Identity):
            base_out = result - bias if bias is not None else result  # x W^T, without the bias
        else:
            base_out = nn.functional.linear(dropped, weight)
        out = (scale - 1) * base_out.to(scale.dtype) + scale * update
        return result + out.to(result.dtype)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        rs = ", rslora" if self.use_rslora else ""
        return f"{kind}: r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{rs}"


def match_targets(model: nn.Module, target: str | Iterable[str], exclude: Iterable[str] = KEEP_DENSE) -> list[str]:
    """Names of the linear modules that ``target`` selects, PEFT's rules:

    "all-linear" / "all": every linear layer except the output layer (``exclude``);
    a string: a regular expression that must match the whole module path;
    a list: names matched exactly or as the last dotted components (``q_proj`` matches
    ``model.layers.0.self_attn.q_proj``).
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES) and not _inside_lora(model, n)]
    return select_targets(linears, target, exclude)


def select_targets(linears: list[str], target: str | Iterable[str], exclude: Iterable[str] = KEEP_DENSE) -> list[str]:
    """:func:`match_targets`' rules applied to a list of linear module names."""
    excluded = set(exclude)
    if isinstance(target, str) and target in ALL_LINEAR:
        chosen = [n for n in linears if not kept_dense(n, excluded)]
    elif isinstance(target, str):
        try:
            pattern = re.compile(target)
        except re.error as e:
            raise InputError(f"lora_target {target!r} is not a valid regular expression: {e}") from None
        chosen = [n for n in linears if pattern.fullmatch(n)]
    else:
        names = list(target)
        chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in names)]
    if not chosen:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise InputError(
            f"lora_target {target!r} matches no linear module; this model's linear modules are named {leaves} "
            f"(or use 'all-linear')"
        )
    return chosen


def _inside_lora(model: nn.Module, name: str) -> bool:
    parts = name.split(".")
    return "lora_A" in parts or "lora_B" in parts or "base_layer" in parts


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def add_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float = 32,
    target: str | Iterable[str] = "all-linear",
    dropout: float = 0.0,
    use_rslora: bool = False,
    use_dora: bool = False,
    dtype: torch.dtype = torch.float32,
    init: str = "kaiming",
    exclude: Iterable[str] = KEEP_DENSE,
    verbose: bool = True,
    target_parameters: str | Iterable[str] | None = None,
) -> nn.Module:
    """Freeze ``model`` and wrap the targeted linear layers with LoRA adapters (in place).

    ``target_parameters``: fused mixture-of-experts weights to adapt too, one update per expert
    (PEFT's ``target_parameters``, e.g. ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``;
    nn/lora_experts.py); ``target=[]`` adapts those alone. Returns the model; prints trainable /
    total parameters when ``verbose``.
    """
    if lora_layers(model) or expert_lora_layers(model):
        raise InputError("this model already has LoRA adapters; load or merge them instead of adding a second set")
    target = target if isinstance(target, str) else list(target)
    names = match_targets(model, target, exclude) if target != [] else []
    experts = match_expert_weights(model, target_parameters) if target_parameters else []
    if not names and not experts:
        raise InputError("lora_target selects no module and no lora_target_parameters are given: nothing to adapt")
    if experts and (dropout or use_dora):
        raise InputError(f"LoRA on expert weights ({experts[0]}, ...) works without dropout and DoRA (as in PEFT, "
                         f"which cannot save them): got lora_dropout={dropout}, use_dora={use_dora}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, LoRALinear(getattr(owner, child), r, alpha, dropout, use_rslora, use_dora, dtype, init))
    if experts:
        add_expert_lora(model, experts, r, alpha, use_rslora, dtype, init)
    if verbose:
        trainable, total = count_parameters(model)
        where = f"{len(names)} modules" + (f" and {len(experts)} expert weights" if experts else "")
        print(f"LoRA r={r} alpha={alpha} on {where}: trainable {trainable:,} / {total:,} "
              f"parameters ({100 * trainable / total:.3f}%)")
    return model


@dataclass(frozen=True)
class LoRASettings:
    """What a model's LoRA adapters are, as an adapter_config.json states it."""

    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    use_dora: bool
    modules: list[str]  # the wrapped linear layers, by module path
    parameters: list[str]  # the adapted expert weights, by parameter path


def lora_settings(model: nn.Module) -> LoRASettings:
    """Read from the model's own LoRA layers (add_lora gives them all one setting); an InputError
    where it has none, or layers that disagree (a model no one adapter file describes)."""
    layers, experts = lora_layers(model), expert_lora_layers(model)
    adapters = [*layers.values(), *experts.values()]
    if not adapters:
        raise InputError("the model has no LoRA adapters (add_lora or load_adapter adds them)")
    shared = {(a.r, a.alpha, a.use_rslora) for a in adapters}
    dropouts = {a.lora_dropout.p if isinstance(a.lora_dropout, nn.Dropout) else 0.0 for a in layers.values()}
    dora = {a.use_dora for a in layers.values()}
    if len(shared) > 1 or len(dropouts) > 1 or len(dora) > 1:
        raise InputError("the model's LoRA layers have different ranks, alphas, dropouts or DoRA settings; "
                         "one adapter file describes one setting")
    (r, alpha, use_rslora), = shared
    return LoRASettings(r, alpha, next(iter(dropouts), 0.0), use_rslora, next(iter(dora), False),
                        list(layers), list(experts))


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a 4-bit weight (linear or experts) counts its original element count."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total, seen = 0, set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied weights count once
                continue
            seen.add(id(p))
            if isinstance(module, Linear4bit) and name == "weight" and module.quant_state is not None:
                total += module.quant_state.numel
            elif name in getattr(module, "experts_4bit", {}):  # 4-bit MoE experts
                total += sum(state.numel for state in module.experts_4bit[name])
            else:
                total += p.numel()
    return trainable, total
