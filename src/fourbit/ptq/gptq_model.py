"""GPTQ over a whole model, one decoder layer at a time (quant/gptq.py does one weight).

    inputs_0  = what the first decoder layer receives for each calibration sequence
    for each decoder layer L:
        run L on inputs_L, accumulating each linear's Hessian from the inputs it sees
        quantize each linear with GPTQ and put a GPTQLinear in its place
        inputs_{L+1} = L(inputs_L), recomputed with the quantized layer

so every layer is fitted to the inputs the already-quantized layers before it produce, and
only one layer (plus the calibration activations) needs to be on ``device`` at a time: the
others stay where the model is (the CPU, for a model larger than the GPU). Within a layer all
linears see the layer's unquantized inputs in one pass (AutoGPTQ's ``true_sequential=False``).
The embeddings and lm_head are not quantized, nor are mixture-of-experts weights (fused 3-D
parameters, not linear layers: they stay in 16 bits, which the report counts). Works for models
whose decoder layers are ``model.model.layers`` (every architecture of tests/test_architectures.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..nn.gptq_linear import GPTQLinear
from ..quant.gptq import Hessian, gptq_quantize
from ..quant.groupwise import quantize_rtn
from .layerwise import (
    LayerwiseReport,
    check_calibration,
    decoder_layers,
    dense_experts,
    layer_calls,
    one_at_a_time,
    output,
)


@dataclass
class GPTQReport(LayerwiseReport):
    method = "GPTQ"
    losses: dict[str, float] = field(default_factory=dict)  # each linear's GPTQ objective


@torch.no_grad()
def quantize_model_gptq(
    model: nn.Module,
    calibration: torch.Tensor,
    bits: int = 4,
    group_size: int = 128,
    sym: bool = True,
    act_order: bool = False,
    damp: float = 0.01,
    device: torch.device | str | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> GPTQReport:
    """Replace every linear of ``model``'s decoder layers by its GPTQ quantization, in place.

    calibration: token ids [sequences, length]; at least MIN_TOKENS tokens in all.
    """
    check_calibration(calibration, "GPTQ")
    layers = decoder_layers(model, "GPTQ")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    start = time.perf_counter()
    hidden, calls = layer_calls(model, layers, calibration, batch_size, device)
    report = GPTQReport(len(layers), 0, calibration.shape[0], calibration.numel(), 0.0)
    for index, layer in one_at_a_time(layers, device, "GPTQ", progress):
        linears = {n: m for n, m in layer.named_modules() if isinstance(m, nn.Linear)}
        hessians = {n: Hessian(m.in_features, device) for n, m in linears.items()}
        hooks = [m.register_forward_hook(lambda mod, args, out, h=hessians[n]: h.add(args[0]))
                 for n, m in linears.items()]
        for h, (args, kwargs) in zip(hidden, calls[index]):
            layer(h, *args, **kwargs)
        for hook in hooks:
            hook.remove()
        for name, linear in linears.items():
            quant, loss = gptq_quantize(linear.weight, hessians[name].H, bits, group_size, sym, act_order, damp)
            replacement = GPTQLinear.from_quant(quant, linear.bias, group_size, compute_dtype=linear.weight.dtype)
            layer.set_submodule(name, replacement.to(device))
            report.losses[f"layers.{index}.{name}"] = loss
            report.linears += 1
        hidden = [output(layer(h, *args, **kwargs)) for h, (args, kwargs) in zip(hidden, calls[index])]
    report.seconds = time.perf_counter() - start
    report.dense_experts = dense_experts(layers)
    return report


def quantize_model_rtn(model: nn.Module, bits: int = 4, group_size: int = 128, sym: bool = True) -> int:
    """Round-to-nearest on GPTQ's grid for every linear of the decoder layers, in place (the
    baseline, same layout); returns how many layers it quantized."""
    count = 0
    for layer in decoder_layers(model, "round-to-nearest"):
        for name, linear in [(n, m) for n, m in layer.named_modules() if isinstance(m, nn.Linear)]:
            quant = quantize_rtn(linear.weight.detach(), bits, group_size, sym)
            layer.set_submodule(name, GPTQLinear.from_quant(quant, linear.bias, group_size, linear.weight.dtype))
            count += 1
    return count
