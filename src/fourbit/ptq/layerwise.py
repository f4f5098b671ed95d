"""Walking a decoder-only model one layer at a time, as the post-training methods (GPTQ, AWQ) do:

    calls_L  = what decoder layer L is called with for each batch of calibration sequences, all
               but the hidden states (position embeddings, its attention mask), and the first
               layer's hidden states
    for each decoder layer L: fit L's linears on its inputs; hidden_{L+1} = L(hidden_L, calls_L)

Each layer keeps its own call arguments: models that alternate attention types (sliding and
full: Mistral, Gemma 2/3, GPT-OSS) give each layer the mask of its type. They are recorded in
one forward of the model over the calibration batches, each layer moved to ``device`` for its
call and back after it, stopping after the last layer (the final norm and lm_head do not run).
So a model larger than the GPU is walked one layer on the GPU at a time, and the model ends on
the device it started on. Works for models whose decoder layers are ``model.model.layers``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import InputError

MIN_TOKENS = 128


@dataclass
class LayerwiseReport:
    """What a layer-by-layer quantization did; each method's report names itself and adds its findings."""

    method = "layer-by-layer quantization"
    layers: int
    linears: int
    sequences: int
    tokens: int
    seconds: float

    dense_experts: int = 0  # mixture-of-experts 3-D weights, which these methods leave in 16 bits

    def format(self) -> str:
        experts = f"; {self.dense_experts} expert weight tensors left in 16 bits" if self.dense_experts else ""
        return (f"{self.method}: {self.linears} linear layers in {self.layers} decoder layers, calibrated on "
                f"{self.sequences} sequences ({self.tokens} tokens), {self.seconds:.1f} s{experts}")


def dense_experts(layers: nn.ModuleList) -> int:
    """How many fused 3-D expert weights the layers hold (not linear layers: GPTQ and AWQ skip them)."""
    return sum(1 for layer in layers for p in layer.parameters() if p.dim() == 3)


class _Captured(Exception):
    pass


def check_calibration(calibration: torch.Tensor, method: str) -> None:
    if calibration.dim() != 2 or calibration.numel() < MIN_TOKENS:
        raise InputError(f"{method} needs calibration token ids [sequences, length] with at least {MIN_TOKENS} "
                         f"tokens, got shape {tuple(calibration.shape)}")


def decoder_layers(model: nn.Module, method: str) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise InputError(f"{type(model).__name__} has no model.layers: {method} runs on decoder-only models laid out "
                         "like Llama (model.model.layers)")
    return layers


def one_at_a_time(layers: nn.ModuleList, device: torch.device, desc: str, progress: bool = False):
    """Each (index, layer), the layer on ``device`` while the caller works on it and then back where it was."""
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress)):
        home = next(layer.parameters()).device
        layer.to(device)
        yield index, layer
        layer.to(home)


def layer_calls(model, layers: nn.ModuleList, calibration: torch.Tensor, batch_size: int,
                device) -> tuple[list[torch.Tensor], list[list[tuple[tuple, dict]]]]:
    """(the first layer's hidden states per batch, per layer the (other args, kwargs) per batch)."""
    first_hidden: list[torch.Tensor] = []
    rest: list[list[tuple[tuple, dict]]] = [[] for _ in layers]
    hooks = []
    for index, layer in enumerate(layers):
        def before(module, args, kwargs, index=index):
            module.to(device)
            if index == 0:
                first_hidden.append(args[0])
            rest[index].append((args[1:], kwargs))

        home = next(layer.parameters()).device

        def after(module, args, result, index=index, home=home):
            module.to(home)
            if index == len(layers) - 1:
                raise _Captured  # the final norm and lm_head are not needed

        hooks += [layer.register_forward_pre_hook(before, with_kwargs=True), layer.register_forward_hook(after)]
    home = next(model.parameters()).device
    try:
        _embedding_parts_to(model, device)
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        for hook in hooks:
            hook.remove()
        _embedding_parts_to(model, home)  # the model ends where it was, wherever its layers ran
    return first_hidden, rest


def _embedding_parts_to(model, device) -> None:
    """What the decoder runs besides its layers (embeddings, rotary tables, the final norm) onto ``device``."""
    for name, child in model.model.named_children():
        if name != "layers":
            child.to(device)


def output(result):
    """A layer's hidden states, whether it returns them alone or first in a tuple."""
    return result[0] if isinstance(result, tuple) else result
