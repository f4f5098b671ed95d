"""AWQ over a whole model, one decoder layer at a time (quant/awq.py does one group of linears).

    inputs_0 = what the first decoder layer receives for each calibration batch (layerwise.py)
    for each decoder layer L:
        run L in full precision on inputs_L, keeping each linear's inputs and the attention's and
        the MLP's call arguments; its outputs are inputs_{L+1}
        search the scales of each group on the full-precision layer:
            prev                        targets            block whose output is compared
            input_layernorm             q, k, v            self_attn
            self_attn.v_proj            o_proj             o_proj
            post_attention_layernorm    gate, up           mlp
            mlp.up_proj                 down_proj          down_proj
        fold every group's scales (the kept inputs divided by s, as the folded layer computes them)
        clip (not q/k) and quantize each linear on its kept inputs: an AWQLinear in its place

v_proj -> o_proj is scaled only when v_proj's outputs are o_proj's inputs channel for channel
(v_proj.out_features == o_proj.in_features); with grouped-query attention each value channel feeds
several heads, no per-channel fold exists, and the group is skipped (as AutoAWQ does), which the
report says. The next layer's inputs come from the full-precision layer, as in AutoAWQ (GPTQ here
feeds the quantized layer's outputs forward instead). Only one layer and the calibration
activations need to be on ``device``. Norms must scale by their weight (Llama's RMSNorm; not
Gemma's 1 + w, which is refused). The embeddings and lm_head are not quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..io.awq import check_awq_shape
from ..nn.awq_linear import AWQLinear
from .awq import N_GRID, clip_and_quantize, fold_scales, search_scale
from .layerwise import (
    LayerwiseReport,
    check_calibration,
    decoder_layers,
    first_layer_inputs,
    one_at_a_time,
    output,
)

NO_CLIP = ("q_proj", "k_proj")


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # the module whose output is the targets' input: a norm or a linear
    targets: tuple[str, ...]
    block: str  # the module whose output the scale search compares


LLAMA_GROUPS = (
    ScaleGroup("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
    ScaleGroup("self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj"),
    ScaleGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp"),
    ScaleGroup("mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass
class AWQReport(LayerwiseReport):
    method = "AWQ"
    ratios: dict[str, float] = field(default_factory=dict)  # the α each group chose
    skipped: list[str] = field(default_factory=list)  # the groups that could not be folded, and why

    def format(self) -> str:
        more = f" and {len(self.skipped) - 1} more" if len(self.skipped) > 1 else ""
        return super().format() + (f"; not scaled: {self.skipped[0]}{more}" if self.skipped else "")


@torch.no_grad()
def quantize_model_awq(
    model: nn.Module,
    calibration: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    n_grid: int = N_GRID,
    progress: bool = False,
) -> AWQReport:
    """Replace every linear of ``model``'s decoder layers by its AWQ quantization, in place (the
    scales folded into the norms and linears before them).

    calibration: token ids [sequences, length]; at least MIN_TOKENS tokens in all.
    """
    check_calibration(calibration, "AWQ")
    layers = decoder_layers(model, "AWQ")
    for layer in layers:  # every refusal before any work
        groups(layer)
        for linear in _linears(layer).values():
            check_awq_shape(bits, group_size, linear.in_features, linear.out_features)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    inputs = first_layer_inputs(model, layers[0], calibration, batch_size, device)
    report = AWQReport(len(layers), 0, calibration.shape[0], calibration.numel(), 0.0)
    for index, layer in one_at_a_time(layers, device, "AWQ", progress):
        linears = _linears(layer)
        chosen = groups(layer)
        report.skipped += [f"layers.{index}.{g.prev} -> {g.targets[0]} ({_why_not(layer, g)})"
                           for g in LLAMA_GROUPS if g not in chosen]
        watched = set(linears) | {g.block for g in chosen}
        calls, outputs = _run_keeping_calls(layer, inputs, watched)
        scales = [(g, _search(layer, g, calls, group_size, n_grid)) for g in chosen]
        x = {name: [args[0] for args, _ in calls[name]] for name in linears}
        for group, (s, ratio) in scales:
            fold_scales(layer.get_submodule(group.prev), [linears[t] for t in group.targets], s)
            scaled = [a / s.to(a.dtype) for a in x[group.targets[0]]]
            x.update(dict.fromkeys(group.targets, scaled))
            report.ratios[f"layers.{index}.{'+'.join(t.rsplit('.', 1)[-1] for t in group.targets)}"] = ratio
        for name, linear in linears.items():
            clip = name.rsplit(".", 1)[-1] not in NO_CLIP
            tokens = torch.cat([a.reshape(-1, a.shape[-1]) for a in x[name]]) if clip else None
            quant = clip_and_quantize(linear.weight, tokens, group_size)
            layer.set_submodule(name, AWQLinear.from_quant(quant, linear.bias, group_size, linear.weight.dtype))
            report.linears += 1
        inputs = [((out,) + args[1:], kwargs) for out, (args, kwargs) in zip(outputs, inputs)]
    report.seconds = time.perf_counter() - start
    return report


def groups(layer: nn.Module) -> list[ScaleGroup]:
    """The scale groups of a Llama-layout decoder layer that can be folded (see the module docstring)."""
    names = dict(layer.named_modules())
    missing = sorted({n for g in LLAMA_GROUPS for n in (g.prev, g.block, *g.targets)} - set(names))
    if missing:
        raise ValueError("AWQ knows decoder layers laid out like Llama (input_layernorm, self_attn.q/k/v/o_proj, "
                         "post_attention_layernorm, mlp.gate/up/down_proj); "
                         f"this {type(layer).__name__} lacks {missing}")
    for norm in ("input_layernorm", "post_attention_layernorm"):
        _check_scales_with_weight(names[norm], norm)
    return [g for g in LLAMA_GROUPS if not _why_not(layer, g)]


def _why_not(layer, group: ScaleGroup) -> str:
    """Why ``group``'s scales cannot be folded into its prev ("" when they can)."""
    prev, first = layer.get_submodule(group.prev), layer.get_submodule(group.targets[0])
    channels = prev.out_features if isinstance(prev, nn.Linear) else prev.weight.shape[0]
    if channels == first.in_features:
        return ""
    return f"{group.prev} gives {channels} channels, {group.targets[0]} takes {first.in_features}: grouped-query attention"


def _check_scales_with_weight(norm: nn.Module, name: str) -> None:
    """Refuse a norm whose output is not proportional to its weight: dividing it by s would not divide x."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        raise ValueError(f"AWQ folds scales into {name}'s weight, but {type(norm).__name__} has no per-channel weight")
    probe = torch.randn(2, weight.shape[0], device=weight.device, dtype=weight.dtype)
    before = norm(probe)
    saved = weight.data
    weight.data = saved * 2
    try:
        after = norm(probe)
    finally:
        weight.data = saved
    if not torch.allclose(after, 2 * before, rtol=1e-2, atol=1e-3):  # 2x exactly in any float format, up to rounding
        raise ValueError(f"AWQ cannot fold scales into {name} ({type(norm).__name__}): its output is not its weight "
                         "times the normalized input (as Gemma's 1 + weight)")


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _run_keeping_calls(layer, inputs, watched: set[str]):
    """Run ``layer`` on each batch; returns ({module: [(args, kwargs) per batch]}, [output per batch])."""
    calls: dict[str, list] = {name: [] for name in watched}
    hooks = [layer.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, kwargs, kept=calls[name]: kept.append((args, kwargs)), with_kwargs=True) for name in watched]
    try:
        outputs = [output(layer(*args, **kwargs)) for args, kwargs in inputs]
    finally:
        for hook in hooks:
            hook.remove()
    return calls, outputs


def _search(layer, group: ScaleGroup, calls, group_size: int, n_grid: int) -> tuple[torch.Tensor, float]:
    """(s, α) for ``group``: its block's output error against the full-precision block's."""
    block = layer.get_submodule(group.block)
    batches = calls[group.block]
    reference = [output(block(*args, **kwargs)) for args, kwargs in batches]

    def block_error() -> float:
        total, count = 0.0, 0
        for (args, kwargs), want in zip(batches, reference):
            diff = output(block(*args, **kwargs)).float() - want.float()
            total, count = total + diff.square().sum().item(), count + diff.numel()
        return total / count

    x = [args[0] for args, _ in calls[group.targets[0]]]
    x_mean = sum(a.abs().float().reshape(-1, a.shape[-1]).sum(dim=0) for a in x) / sum(a[..., 0].numel() for a in x)
    targets = [layer.get_submodule(t) for t in group.targets]
    s, ratio, _ = search_scale(targets, x_mean, block_error, group_size, n_grid)
    return s, ratio
