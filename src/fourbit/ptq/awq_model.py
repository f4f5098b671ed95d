"""AWQ over a whole model, one decoder layer at a time (quant/awq.py does one group of linears).

    calls_L = what decoder layer L is called with for each calibration batch (layerwise.py)
    for each decoder layer L:
        find its scale groups: the linears that read one tensor, and the module that made it
        run L in full precision on its inputs, keeping each linear's inputs and each group's
        block's call arguments; its outputs are the next layer's inputs
        search the scales of each group on the full-precision layer
        fold every group's scales (the kept inputs divided by s, as the folded layer computes them)
        clip (not q/k) and quantize each linear on its kept inputs: an AWQLinear in its place

The groups are found by tracing the layer on one batch, not from a table of names, so every
architecture gets the groups its own forward has. A group is the linears whose input is the
same tensor, and its "prev" is the module that produced it:

    a norm scaling by its weight (RMSNorm: Llama, Qwen, Mistral...)       folds x / s into its weight
    a norm scaling by 1 + weight (Gemma's)                                 folds into w' = (1 + w)/s - 1
    v_proj, for o_proj (attention mixes whole value channels)             folds into v's output rows
    up_proj, for down_proj (act(gate) * up is linear in up)               folds into up's output rows

and the block whose output the scale search compares is the smallest module holding the group
(self_attn for q, k, v; mlp for gate and up). A group is left unscaled (clipped and quantized
only), and the report says why, when no fold keeps the layer's function: its input is the
layer's input itself (OLMo 2's post-norm layers), or comes from a fused linear (Phi-3's
qkv_proj and gate_up_proj), or from a norm that other modules read too (a MoE router), or v_proj
gives fewer channels than o_proj takes (grouped-query attention, as AutoAWQ skips it). The next
layer's inputs come from the full-precision layer, as in AutoAWQ (GPTQ feeds the quantized
layer's outputs forward instead). Only one layer and the calibration activations need to be on
``device``. The embeddings, lm_head and mixture-of-experts weights (3-D parameters, not linear
layers) are not quantized.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.awq_linear import AWQLinear
from ..quant.awq import N_GRID, clip_and_quantize, fold_scales, search_scale
from ..quant.awq_layout import check_awq_shape
from .layerwise import (
    LayerwiseReport,
    check_calibration,
    decoder_layers,
    dense_experts,
    layer_calls,
    one_at_a_time,
    output,
)

NO_CLIP = ("q_proj", "k_proj", "qkv_proj")  # attention scores are sensitive to q and k
# inputs computed by the layer's arithmetic from one linear's output, channel for channel
CHANNEL_PRODUCERS = {"o_proj": "v_proj", "down_proj": "up_proj"}
FUSED_PRODUCERS = {"o_proj": "qkv_proj", "down_proj": "gate_up_proj"}  # Phi-3's: no fold


@dataclass(frozen=True)
class ScaleGroup:
    prev: str  # the module whose output is the targets' input: a norm or a linear
    targets: tuple[str, ...]
    block: str  # the module whose output the scale search compares
    unit_offset: bool = False  # prev is a (1 + weight) norm


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
        for linear in _linears(layer).values():
            check_awq_shape(bits, group_size, linear.in_features, linear.out_features)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    hidden, calls = layer_calls(model, layers, calibration, batch_size, device)
    report = AWQReport(len(layers), 0, calibration.shape[0], calibration.numel(), 0.0)
    for index, layer in one_at_a_time(layers, device, "AWQ", progress):
        linears = _linears(layer)
        chosen, skipped = groups(layer, hidden[0], *calls[index][0])
        report.skipped += [f"layers.{index}.{why}" for why in skipped]
        watched = set(linears) | {g.block for g in chosen}
        kept, outputs = _run_keeping_calls(layer, hidden, calls[index], watched)
        scales = [(g, _search(layer, g, kept, group_size, n_grid)) for g in chosen]
        x = {name: [args[0] for args, _ in kept[name]] for name in linears}
        for group, (s, ratio) in scales:
            fold_scales(layer.get_submodule(group.prev), [linears[t] for t in group.targets], s, group.unit_offset)
            scaled = [a / s.to(a.dtype) for a in x[group.targets[0]]]
            x.update(dict.fromkeys(group.targets, scaled))
            report.ratios[f"layers.{index}.{'+'.join(t.rsplit('.', 1)[-1] for t in group.targets)}"] = ratio
        for name, linear in linears.items():
            clip = name.rsplit(".", 1)[-1] not in NO_CLIP
            tokens = torch.cat([a.reshape(-1, a.shape[-1]) for a in x[name]]) if clip else None
            quant = clip_and_quantize(linear.weight, tokens, group_size)
            layer.set_submodule(name, AWQLinear.from_quant(quant, linear.bias, group_size, linear.weight.dtype))
            report.linears += 1
        hidden = outputs
    report.seconds = time.perf_counter() - start
    report.dense_experts = dense_experts(layers)
    return report


def groups(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> tuple[list[ScaleGroup], list[str]]:
    """The layer's foldable scale groups, and a line for each group that is not (see the module
    docstring), found by running ``layer`` once on (``hidden``, ``args``, ``kwargs``)."""
    names = {m: n for n, m in layer.named_modules()}
    produced: dict[int, str] = {}  # id of an output tensor -> the module that returned it
    readers: dict[int, list[str]] = {}  # id of an input tensor -> the modules that read it
    alive = []  # every traced tensor, kept alive so that ids are not reused during the trace

    def read(module, inputs):
        if inputs and isinstance(inputs[0], torch.Tensor):
            alive.append(inputs[0])
            readers.setdefault(id(inputs[0]), []).append(names[module])

    def made(module, inputs, result):
        if isinstance(result, torch.Tensor):
            alive.append(result)
            produced.setdefault(id(result), names[module])

    hooks = [m.register_forward_pre_hook(read) for m in names if m is not layer]
    hooks += [m.register_forward_hook(made) for m in names if m is not layer]
    try:
        layer(hidden, *args, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    linears = _linears(layer)
    by_input: dict[int, list[str]] = {}
    for tensor_id, modules in readers.items():
        targets = [m for m in modules if m in linears]
        if targets:
            by_input[tensor_id] = targets
    chosen, skipped = [], []
    for tensor_id, targets in by_input.items():
        prev, why = _producer(layer, tensor_id, targets, produced, readers, linears)
        if why:
            skipped.append(f"{'+'.join(targets)} ({why})")
            continue
        unit_offset = False
        if prev not in linears:
            unit_offset, why = _norm_form(layer.get_submodule(prev), prev)
            if why:
                skipped.append(f"{'+'.join(targets)} ({why})")
                continue
        chosen.append(ScaleGroup(prev, tuple(targets), _block(targets), unit_offset))
    return chosen, skipped


def _producer(layer, tensor_id, targets, produced, readers, linears) -> tuple[str | None, str]:
    """(the module whose output channels the targets read, "") or (None, why there is none)."""
    prev = produced.get(tensor_id)
    if prev is None:
        leaf = targets[0].rsplit(".", 1)
        partner = CHANNEL_PRODUCERS.get(leaf[-1])
        source = f"{leaf[0]}.{partner}" if len(leaf) == 2 and partner else partner
        if len(targets) == 1 and source in linears:
            first = layer.get_submodule(targets[0])
            if linears[source].out_features == first.in_features:
                return source, ""
            return None, (f"{source} gives {linears[source].out_features} channels, {targets[0]} takes "
                          f"{first.in_features}: grouped-query attention")
        fused = FUSED_PRODUCERS.get(leaf[-1])
        fused = f"{leaf[0]}.{fused}" if len(leaf) == 2 and fused else fused
        if len(targets) == 1 and fused in linears:
            return None, f"its input comes from the fused {fused}, of which it reads one part: no per-channel fold"
        return None, "its input is the layer's input, made by no module of the layer: nothing to fold into"
    others = [m for m in readers.get(tensor_id, []) if m not in targets and not any(t.startswith(m + ".") for t in targets)]
    if others:
        return None, f"{prev}'s output is also read by {others[0]}, which a fold would change"
    return prev, ""


def _norm_form(norm: nn.Module, name: str) -> tuple[bool, str]:
    """(True for a (1 + weight) norm, False for one that scales by its weight, ""), or why it folds neither way."""
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 1:
        return False, f"{name} ({type(norm).__name__}) has no per-channel weight to fold into"
    probe = torch.randn(2, weight.shape[0], device=weight.device, dtype=weight.dtype)
    before, saved = norm(probe), weight.data
    try:
        weight.data = saved * 2
        if torch.allclose(norm(probe), 2 * before, rtol=1e-2, atol=1e-3):  # 2x exactly in any float format
            return False, ""
        weight.data = 2 * (1 + saved) - 1
        if torch.allclose(norm(probe), 2 * before, rtol=1e-2, atol=1e-3):
            return True, ""
    finally:
        weight.data = saved
    return False, f"{name} ({type(norm).__name__}): its output is neither its weight nor 1 + its weight times the input"


def _block(targets: list[str]) -> str:
    """The smallest module holding every target (the target itself when it is alone)."""
    if len(targets) == 1:
        return targets[0]
    parts = [t.split(".") for t in targets]
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}


def _run_keeping_calls(layer, hidden, calls, watched: set[str]):
    """Run ``layer`` on each batch; returns ({module: [(args, kwargs) per batch]}, [output per batch])."""
    kept: dict[str, list] = {name: [] for name in watched}
    hooks = [layer.get_submodule(name).register_forward_pre_hook(
        lambda mod, args, kwargs, into=kept[name]: into.append((args, kwargs)), with_kwargs=True) for name in watched]
    try:
        outputs = [output(layer(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls)]
    finally:
        for hook in hooks:
            hook.remove()
    return kept, outputs


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
