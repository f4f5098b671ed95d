"""LoRA: named low-rank updates beside a frozen linear layer, which it wraps.

    y = base(x) + sum_a w_a * B_a (s_a A_a dropout_a(x))       A_a: [r_a, in], B_a: [out, r_a]
    s_a = alpha_a / r_a        (rsLoRA: alpha_a / sqrt(r_a), which keeps the update's scale as r grows)

One layer for training and serving. Training adds one adapter, named "default" as PEFT names
it, and computes with it at weight 1. Serving loads any number side by side
(serve/adapters.py) and chooses through ``route``, for the whole batch or a list with one per
row: a mixture ``{}`` (the base alone), ``{"a": 1.0}`` or ``{"a": 0.5, "b": 0.3}``, the weighted
sum of the updates (PEFT's "cat" combination, exact for any ranks, not its "linear" one that
mixes A and B themselves). A row's update is computed on that row's inputs alone, so a mixed
batch gives every row what it would get on its own, up to float rounding of the batched base
product. ``route = None`` is every adapter at weight 1: what merging them computes. A name
the layer does not hold adds nothing (an adapter may target only some layers). Serving's frozen
adapters are stacked side by side along the rank, so that a batch with a route per row costs two
products a layer whatever its mix (:meth:`LoRALinear._stack`).

A starts Kaiming-uniform (bound 1/sqrt(in), as nn.Linear's default) and B at zero, so the wrapped
model starts out exactly equal to the base. The base is any module computing ``x @ W^T + b``:
``nn.Linear``, :class:`~fourbit.nn.Linear4bit`, :class:`~fourbit.nn.GPTQLinear`,
:class:`~fourbit.nn.AWQLinear`, :class:`~fourbit.nn.Linear8bit`. It is wrapped, never
subclassed, and stays frozen; each adapter is kept in its own (higher) precision and the input is
cast to it. The gradient flows to A and B through autograd; through a 4-bit base it needs only
dL/dx = dL/dy @ W, which Linear4bit computes from its packed bytes. One adapter at weight 1 on a
Linear4bit, without dropout or DoRA (training's usual case, and serving one adapter), runs as
a single autograd node computing the same function (kernels/lora.py).

DoRA (weight-decomposed LoRA, as PEFT defines it) splits the adapted weight into a direction
and a learned per-output-row magnitude m (initialised to the row norms of W):

    W' = m * (W + s B A) / ||W + s B A||_row
    y  = (m / n - 1) * (x W^T) + (m / n) * s * B A x + b,     n = ||W + s B A||_row, detached

(the norm is treated as a constant in backward, as in the DoRA paper §4.3, to save memory). It
rescales the whole adapted weight, so a DoRA adapter computes alone, never in a mixture.

Names follow PEFT's: ``base_layer``, and per adapter ``lora_A.weight``, ``lora_B.weight``,
``lora_magnitude_vector`` under ``adapters.<name>``; io/peft.py writes them under PEFT's
file keys, which drop the adapter's name.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InputError
from ..kernels.lora import lora_linear, qlora_linear
from .linear4bit import Linear4bit
from .lora_experts import add_expert_lora, expert_lora_layers, match_expert_weights
from .lora_scaling import lora_scaling
from .targets import KEEP_DENSE, match_targets

DEFAULT = "default"  # the adapter add_lora trains and load_adapter loads, as PEFT names it
Mixture = dict[str, float]
Route = Mixture | list[Mixture] | None


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks watch ``module`` (calibration's, a user's): the one-node path would skip its forward."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def dense_weight(base: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] weight a base layer represents, dequantized if it is quantized."""
    if hasattr(base, "dequantize"):
        return base.dequantize(dtype)
    return base.weight.to(dtype)


class LoRAAdapter(nn.Module):
    """One adapter's part of one layer: A, B, the scale s, the dropout and (DoRA) the magnitude."""

    def __init__(self, name: str, in_features: int, out_features: int, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, use_dora: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | None = None, init: str = "kaiming"):
        super().__init__()
        if r <= 0:
            raise InputError(f"LoRA rank r must be a positive integer, got {r}")
        if not 0 <= dropout < 1:
            raise InputError(f"lora_dropout must be in [0, 1), got {dropout}")
        if init not in ("kaiming", "gaussian"):
            raise InputError(f"unknown LoRA init {init!r}; expected 'kaiming' or 'gaussian'")
        self.name, self.r, self.alpha, self.use_rslora, self.use_dora = name, r, alpha, use_rslora, use_dora
        self.scaling = lora_scaling(r, alpha, use_rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, out_features, bias=False, device=device, dtype=dtype)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if use_dora:  # set to ||W||_row by the layer, which holds W
            self.lora_magnitude_vector = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))

    @property
    def dropout(self) -> float:
        return self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """s * B @ A, the [out, in] update this adapter adds (before DoRA's rescaling)."""
        return self.scaling * (self.lora_B.weight.to(dtype) @ self.lora_A.weight.to(dtype))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        """s * B A dropout(x), in the adapter's dtype."""
        return self.lora_B(self.lora_A(self.lora_dropout(x).to(self.lora_A.weight.dtype)) * self.scaling)

    def extra_repr(self) -> str:
        kind = "DoRA" if self.use_dora else "LoRA"
        rs = ", rslora" if self.use_rslora else ""
        return f"{self.name!r}, {kind}: r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{rs}"


class LoRALinear(nn.Module):
    """A frozen linear layer with named LoRA adapters; ``route`` chooses what they add."""

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.adapters = nn.ModuleDict()  # by name, '.' escaped (ModuleDict keys cannot hold one)
        self.route: Route = None
        self._stacked: tuple | bool | None = None  # see _stack

    @property
    def names(self) -> list[str]:
        return [adapter.name for adapter in self.adapters.values()]

    def adapter(self, name: str = DEFAULT) -> LoRAAdapter:
        return self.adapters[_key(name)]

    def add_adapter(self, name: str = DEFAULT, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    use_rslora: bool = False, use_dora: bool = False, dtype: torch.dtype = torch.float32,
                    init: str = "kaiming") -> LoRAAdapter:
        """A new adapter on this layer, B = 0 (the layer computes as before until it trains)."""
        if _key(name) in self.adapters:
            raise InputError(f"this layer already has an adapter named {name!r}")
        # the weight, or a quantized layer's packed tensors (parameters or buffers)
        device = next(itertools.chain(self.base_layer.parameters(), self.base_layer.buffers())).device
        adapter = LoRAAdapter(name, self.in_features, self.out_features, r, alpha, dropout, use_rslora, use_dora, dtype,
                              device, init)
        if use_dora:
            with torch.no_grad():
                adapter.lora_magnitude_vector.copy_(dense_weight(self.base_layer, torch.float32).norm(dim=1))
        self.adapters[_key(name)] = adapter
        self._stacked = None
        return adapter

    def remove_adapter(self, name: str) -> None:
        del self.adapters[_key(name)]
        self._stacked = None

    def _apply(self, fn, recurse=True):
        self._stacked = None  # built again from the adapters where .to() and the like put them
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        route = self.route
        if isinstance(route, list):
            return self._per_row(x, route)
        chosen = self._chosen(route)
        if len(chosen) == 1 and chosen[0][1] == 1:
            return self._alone(x, chosen[0][0])
        y = self.base_layer(x)
        for adapter, weight in chosen:
            _refuse_dora_in_mixture(adapter)
            y = y + (weight * adapter.update(x)).to(y.dtype)
        return y

    def _chosen(self, mixture: Mixture | None) -> list[tuple[LoRAAdapter, float]]:
        """(adapter, weight) for each adapter of ``mixture`` this layer holds (None: all, weight 1)."""
        if mixture is None:
            return [(adapter, 1.0) for adapter in self.adapters.values()]
        return [(self.adapters[_key(name)], weight) for name, weight in mixture.items()
                if weight != 0 and _key(name) in self.adapters]

    def _alone(self, x: torch.Tensor, adapter: LoRAAdapter) -> torch.Tensor:
        base = self.base_layer
        if self._fusable(adapter):  # the same function in one autograd node (kernels/lora.py)
            return qlora_linear(x, base.weight, base.quant_state, base.bias, adapter.lora_A.weight,
                                adapter.lora_B.weight, adapter.scaling, base.compute_dtype, base.keep_weight_for_backward)
        if self._fusable_dense(adapter) and x.dtype == base.weight.dtype:  # else F.linear's own dtype error
            return lora_linear(x, base.weight, base.bias, adapter.lora_A.weight, adapter.lora_B.weight, adapter.scaling)
        result = self.base_layer(x)
        dropped = adapter.lora_dropout(x).to(adapter.lora_A.weight.dtype)
        update = adapter.lora_B(adapter.lora_A(dropped) * adapter.scaling)  # s on the r side: r values a token, not out
        if not adapter.use_dora:
            return result + update.to(result.dtype)
        return self._dora(adapter, dropped, result, update)

    def _fusable(self, adapter: LoRAAdapter) -> bool:
        base = self.base_layer
        return (
            self._one_node_takes(adapter)
            and isinstance(base, Linear4bit)
            and base.quant_state is not None
            and base.dense_copy is None  # inside dense_weights(): the module path reuses the dense copy
        )

    def _fusable_dense(self, adapter: LoRAAdapter) -> bool:
        base = self.base_layer
        # a plain nn.Linear only: subclasses may compute otherwise
        return self._one_node_takes(adapter) and type(base) is nn.Linear and not base.weight.requires_grad

    def _one_node_takes(self, adapter: LoRAAdapter) -> bool:
        """What both one-node paths (kernels/lora.py) ask: a plain adapter, a frozen bias, no hooks on the base."""
        bias = getattr(self.base_layer, "bias", None)
        return (not adapter.use_dora and isinstance(adapter.lora_dropout, nn.Identity)
                and (bias is None or not bias.requires_grad) and not _hooked(self.base_layer))

    def _dora(self, adapter: LoRAAdapter, dropped, result, update):
        weight = dense_weight(self.base_layer, adapter.lora_A.weight.dtype)
        norm = (weight + adapter.delta_weight(weight.dtype)).norm(dim=1).detach()
        scale = adapter.lora_magnitude_vector / norm
        bias = getattr(self.base_layer, "bias", None)
        if isinstance(adapter.lora_dropout, nn.Identity):
            base_out = result - bias if bias is not None else result  # x W^T, without the bias
        else:
            base_out = nn.functional.linear(dropped, weight)
        out = (scale - 1) * base_out.to(scale.dtype) + scale * update
        return result + out.to(result.dtype)

    def _per_row(self, x: torch.Tensor, route: list[Mixture]) -> torch.Tensor:
        if len(route) != x.shape[0]:
            raise ValueError(f"a route per row: {len(route)} mixtures for a batch of {x.shape[0]} rows")
        y = self.base_layer(x)
        stack = self._stack()
        if stack is not None:
            return self._stacked_update(x, y, route, *stack)
        for name in dict.fromkeys(n for mixture in route for n in mixture):
            if _key(name) not in self.adapters:
                continue
            adapter = self.adapters[_key(name)]
            _refuse_dora_in_mixture(adapter)
            weights = torch.tensor([mixture.get(name, 0.0) for mixture in route], device=x.device)
            rows = weights.nonzero().flatten()
            update = adapter.update(x[rows]) * weights[rows].view(-1, *[1] * (x.dim() - 1))
            y = y.index_add(0, rows, update.to(y.dtype))
        return y

    def _stacked_update(self, x: torch.Tensor, y: torch.Tensor, route: list[Mixture], names: dict[str, int],
                        a: torch.Tensor, b: torch.Tensor, rank: int) -> torch.Tensor:
        """Every row's mixture at once: x times every adapter's A (one product), each row's
        columns scaled by its weight for that adapter (0 for the others), times every s * B (one
        product). Two products a layer whatever the mix; the adapters' rank columns cost what
        one adapter of their summed rank would."""
        weights = [[0.0] * len(names) for _ in route]
        for row, mixture in enumerate(route):
            for name, weight in mixture.items():
                if name in names:
                    weights[row][names[name]] = weight
        if not any(any(w) for w in weights):
            return y
        scale = torch.tensor(weights, dtype=a.dtype, device=x.device).repeat_interleave(rank, dim=1)  # [rows, n * r]
        scale = scale.view(x.shape[0], *[1] * (x.dim() - 2), -1)
        update = F.linear(F.linear(x.to(a.dtype), a) * scale, b)
        return y + update.to(y.dtype)

    def _stack(self) -> tuple[dict[str, int], torch.Tensor, torch.Tensor, int] | None:
        """({name: index}, A [n * r, in], s * B [out, n * r], r): this layer's adapters side by side
        along the rank, each padded to the largest rank r with zeros (which add nothing); None
        unless they are all frozen, plain LoRA and of one dtype (serving's). Built once per set of
        adapters: adding or removing one drops it; the weights are taken as constant meanwhile."""
        if self._stacked is None:
            adapters = list(self.adapters.values())
            like = adapters[0].lora_A.weight if adapters else None
            if not adapters or any(a.use_dora or not isinstance(a.lora_dropout, nn.Identity)
                                   or a.lora_A.weight.requires_grad or a.lora_B.weight.requires_grad
                                   or a.lora_A.weight.dtype != like.dtype for a in adapters):
                self._stacked = False
                return None
            rank = max(a.r for a in adapters)
            a_stack = like.new_zeros(len(adapters) * rank, self.in_features)
            b_stack = like.new_zeros(self.out_features, len(adapters) * rank)
            for i, adapter in enumerate(adapters):
                a_stack[i * rank:i * rank + adapter.r] = adapter.lora_A.weight
                b_stack[:, i * rank:i * rank + adapter.r] = adapter.lora_B.weight * adapter.scaling
            self._stacked = ({adapter.name: i for i, adapter in enumerate(adapters)}, a_stack, b_stack, rank)
        return self._stacked or None


def _refuse_dora_in_mixture(adapter: LoRAAdapter) -> None:
    if adapter.use_dora:
        raise InputError(f"adapter {adapter.name!r} is DoRA, which rescales the whole adapted weight: it computes "
                         "alone (weight 1, the same for every row), never in a mixture")


def _key(name: str) -> str:
    return name.replace(".", "\u2024")  # ONE DOT LEADER: looks like '.', is not one


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_adapters(model: nn.Module, name: str = DEFAULT) -> dict[str, LoRAAdapter]:
    """The adapter ``name`` of each LoRA layer that has it, by the layer's module path."""
    return {path: layer.adapter(name) for path, layer in lora_layers(model).items() if name in layer.names}


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
    """Freeze ``model`` and give the targeted linear layers a LoRA adapter named "default" (in place).

    ``target`` follows PEFT's rules (nn/targets.py). ``target_parameters``: fused
    mixture-of-experts weights to adapt too, one update per expert (PEFT's ``target_parameters``,
    e.g. ``["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]``; nn/lora_experts.py);
    ``target=[]`` adapts those alone. Returns the model; prints trainable / total parameters
    when ``verbose``.
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
        layer = LoRALinear(model.get_submodule(name))
        layer.add_adapter(DEFAULT, r, alpha, dropout, use_rslora, use_dora, dtype, init)
        model.set_submodule(name, layer)
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
    modules: list[str]  # the adapted linear layers, by module path
    parameters: list[str]  # the adapted expert weights, by parameter path


def lora_settings(model: nn.Module) -> LoRASettings:
    """Read from the model's "default" adapter (add_lora gives all its parts one setting); an
    InputError where it has none, or parts that disagree (a model no one adapter file describes)."""
    layers, experts = lora_adapters(model), expert_lora_layers(model)
    adapters = [*layers.values(), *experts.values()]
    if not adapters:
        raise InputError("the model has no LoRA adapters (add_lora or load_adapter adds them)")
    shared = {(a.r, a.alpha, a.use_rslora) for a in adapters}
    dropouts = {a.dropout for a in layers.values()}
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
