"""Walking a decoder-only model one layer at a time, as the post-training methods (GPTQ, AWQ) do:

    inputs_0 = what the first decoder layer receives for each batch of calibration sequences
               (positional and keyword arguments: hidden states, position embeddings, mask)
    for each decoder layer L: fit L's linears on inputs_L; inputs_{L+1} = L(inputs_L)

The model runs until its first decoder layer is called, and that call's arguments are kept; only
the embeddings and rotary tables need to be on ``device`` for it, and they go back afterwards (the
layers stay where they are, so a model larger than the GPU is walked one layer on the GPU at a
time, and the model ends on the device it started on). Works for models whose
decoder layers are ``model.model.layers`` (Llama, Mistral, Qwen2 and the like in transformers).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

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

    def format(self) -> str:
        return (f"{self.method}: {self.linears} linear layers in {self.layers} decoder layers, calibrated on "
                f"{self.sequences} sequences ({self.tokens} tokens), {self.seconds:.1f} s")


class _Captured(Exception):
    pass


def check_calibration(calibration: torch.Tensor, method: str) -> None:
    if calibration.dim() != 2 or calibration.numel() < MIN_TOKENS:
        raise ValueError(f"{method} needs calibration token ids [sequences, length] with at least {MIN_TOKENS} "
                         f"tokens, got shape {tuple(calibration.shape)}")


def decoder_layers(model: nn.Module, method: str) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers):
        raise ValueError(f"{type(model).__name__} has no model.layers: {method} runs on decoder-only models laid out "
                         "like Llama (model.model.layers)")
    return layers


def one_at_a_time(layers: nn.ModuleList, device: torch.device, desc: str, progress: bool = False):
    """Each (index, layer), the layer on ``device`` while the caller works on it and then back where it was."""
    for index, layer in enumerate(tqdm(layers, desc=desc, unit="layer", disable=not progress)):
        home = next(layer.parameters()).device
        layer.to(device)
        yield index, layer
        layer.to(home)


def first_layer_inputs(model, first, calibration, batch_size, device) -> list[tuple[tuple, dict]]:
    """What the first decoder layer is called with, per batch of sequences (positional, keyword)."""
    captured = []

    def catch(module, args, kwargs):
        captured.append((args, kwargs))
        raise _Captured

    hook = first.register_forward_pre_hook(catch, with_kwargs=True)
    home = next(model.parameters()).device
    try:
        _embedding_parts_to(model, device)
        for batch in calibration.split(batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Captured:
                pass
    finally:
        hook.remove()
        _embedding_parts_to(model, home)  # the model ends where it was, wherever its layers ran
    return captured


def _embedding_parts_to(model, device) -> None:
    """What runs before the first layer (embeddings, rotary tables) onto ``device``."""
    inner = model.model
    for name in ("embed_tokens", "rotary_emb"):
        if hasattr(inner, name):
            getattr(inner, name).to(device)


def output(result):
    """A layer's hidden states, whether it returns them alone or first in a tuple."""
    return result[0] if isinstance(result, tuple) else result
