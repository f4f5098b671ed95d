"""Merging a LoRA adapter into its base: a plain Hugging Face model folder, or a 4-bit one.

For each adapted linear layer, in float32:

    W' = dequant(W4) + s * B @ A                               (LoRA, rsLoRA: s as trained)
    W' = m * (W + s B A) / ||W + s B A||_row                   (DoRA, m the learned magnitudes)

and for each expert e of an adapted MoE expert weight W_e' = dequant(W4_e) + s * B_e @ A_e
(nn/lora_experts.py).

W4 is the base as the adapter saw it in training: quantized the same way and dequantized, so the
merged model computes what base + adapter computed, up to the rounding of W' to the output dtype.
How the base was quantized is read from the adapter's training_base.json (io/peft.py), which
``fourbit train`` writes; an adapter without one (made by PEFT, or an older fourbit) is taken to
have been trained as ``fourbit train`` trains by default (NF4, double quantization, blocks of
64), and the report says so. Arguments override the record, and the report says that too: an
adapter merged into another base than its own computes something else. Every other 4-bit layer
is dequantized too; the result holds no fourbit types and loads in transformers alone (``AutoModelForCausalLM.from_pretrained``).

``requantize`` writes W' back in 4 bits instead (a bnb-4bit folder, io/checkpoint.py). That
adds a second quantization error on top of training's, so it is never done silently: the
report carries how far the requantized model's logits move from the unmerged adapter's on a
probe text, next to the same figure for the plain merge.

The adapter is checked before anything is written (io/peft.py): tensors that do not fit the
base's layers (an adapter made for another base) or hold NaN/Inf are refused with the name of
the first bad tensor. Output folders appear whole or not at all (io/atomic.py). The merge holds
the whole model in float32 in memory (4 bytes a parameter).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..chat_templates import end_of_turn_ids
from ..errors import InputError
from ..formats import BNB_4BIT
from ..nn.experts4bit import IMPLEMENTATION as EXPERTS_IMPLEMENTATION
from ..nn.experts4bit import dequantize_experts_
from ..nn.frozen_linear import FrozenLinear
from ..nn.linear4bit import Linear4bit
from ..nn.lora import LoRALinear, dense_weight, lora_layers
from ..nn.lora_experts import expert_lora_layers
from ..nn.targets import quantizable_linears
from ..precision import DTYPES, parse_dtype
from .atomic import atomic_dir, check_output_apart
from .checkpoint import save_quantized
from .loader import load_model
from .peft import load_adapter, read_adapter_config, read_training_base

OUTPUT_DTYPES = ("bfloat16", "float16", "float32")  # or bf16, fp16, fp32
PROBE_TEXT = "The quick brown fox jumps over the lazy dog. Merging must not change what the model says."


RECORDED = "recorded"  # base_quantization: as the adapter's training_base.json says
INTO = ("dequantized", "original")  # what the update is added to
TRAIN_DEFAULT = {"quantization": "nf4", "double_quant": True, "blocksize": 64}  # fourbit train's


@dataclass
class MergeReport:
    output: Path
    base: str  # the base the adapter was merged into, and why that one
    layers_merged: int
    dtype: torch.dtype
    requantized: str | None
    probe_tokens: int
    merged_error: float  # max |logit - unmerged logit| / max |unmerged logit|, merged in `dtype`
    requantized_error: float | None  # the same for the requantized model

    def format(self) -> str:
        lines = [f"merged {self.layers_merged} LoRA layers into {self.output} ({self.dtype_name})", f"  base: {self.base}"]
        weights = "float32" if self.requantized else self.dtype_name  # requantizing starts from the float32 merge
        lines.append(f"  logits vs the unmerged adapter on a {self.probe_tokens}-token probe: "
                     f"max relative difference {self.merged_error:.2e} ({weights} weights)")
        if self.requantized:
            lines.append(f"  requantized to {self.requantized}: max relative difference {self.requantized_error:.2e} "
                         "from the unmerged adapter (the error requantizing adds)")
        return "\n".join(lines)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def merge_adapter(
    base: str | os.PathLike | None,
    adapter: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str | torch.dtype = "bfloat16",
    base_quantization: str | None = RECORDED,
    double_quant: bool | None = None,
    blocksize: int | None = None,
    requantize: str | None = None,
    overwrite: bool = False,
    into: str = "dequantized",
) -> MergeReport:
    """Merge the PEFT adapter at ``adapter`` into ``base`` and write the result to ``output``.

    base: what ``fourbit.load_model`` takes (folder, .gguf, hub id, None for the embedded model);
        a bnb-4bit, GPTQ, AWQ or int8 folder keeps its own quantization. base_quantization,
        double_quant, blocksize: how the adapter's base was quantized in training ("nf4", "fp4",
        "int4", or None for a 16-bit LoRA base); by default what the adapter records.
    dtype: dtype of the merged weights (and of every unquantized one). requantize: "nf4" or
        "fp4" to write a 4-bit folder instead of a dense one.
    into: "dequantized" (the base as the adapter saw it in training, dequantized: the merged
        model computes what base + adapter computed) or "original" (the base's own 16-bit
        weights, without the quantization error the adapter learned around; the same as
        base_quantization=None). bench/RESULTS.md measures both on the main job.
    """
    if into not in INTO:
        raise InputError(f"into must be one of {INTO}, got {into!r}")
    if into == "original":
        base_quantization = None
    out_dtype = parse_dtype(dtype) if dtype in DTYPES or isinstance(dtype, torch.dtype) else None
    if out_dtype not in {parse_dtype(d) for d in OUTPUT_DTYPES}:
        raise InputError(f"merge dtype must be one of {OUTPUT_DTYPES}, got {dtype!r}")
    if requantize not in (None, "nf4", "fp4"):
        raise InputError(f"requantize must be 'nf4' or 'fp4' (or None for a dense folder), got {requantize!r}")
    check_output_apart(output, base, adapter)
    if Path(output).exists() and not overwrite:  # before the work, not after it (atomic_dir checks again)
        raise FileExistsError(f"{output} already exists; choose another output folder or pass overwrite")
    read_adapter_config(adapter)  # a missing or unsupported adapter fails before the base loads
    trained_on, base_note = _training_base(adapter, base_quantization, double_quant, blocksize)
    quantization = trained_on["quantization"] if trained_on["quantization"] in ("nf4", "fp4", "int4") else None
    double_quant, blocksize = bool(trained_on["double_quant"]), int(trained_on["blocksize"] or 64)
    model, tokenizer = load_model(
        base, quantization=quantization, double_quant=double_quant, blocksize=blocksize,
        compute_dtype="float32", torch_dtype="float32",
    )
    load_adapter(model, adapter, dtype=torch.float32)
    probe = probe_ids(tokenizer, model.config.vocab_size)
    reference = _logits(model, probe)

    layers, experts = lora_layers(model), expert_lora_layers(model)
    for name, layer in layers.items():
        model.set_submodule(name, _merged_linear(layer))
    _dequantize_layers(model)
    for key, adapter in experts.items():
        _merge_experts(model, key, adapter)
    _drop_fourbit_attributes(model)
    _set_generation_eos(model, tokenizer)

    if requantize is None:
        model.to(out_dtype)
        merged_error = _relative_error(_logits(model.float(), probe), reference)  # W' as stored, computed in fp32
        model.to(out_dtype)
        requantized_error = None
        with atomic_dir(output, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp, max_shard_size="2GB")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    else:
        merged_error = _relative_error(_logits(model, probe), reference)
        _requantize(model, requantize, double_quant, blocksize)  # from the float32 W'
        requantized_error = _relative_error(_logits(model, probe), reference)
        model.to(out_dtype)  # the unquantized weights; the 4-bit layers keep their bytes
        model.config.quantization_config = BNB_4BIT.quantization_config(requantize, double_quant, out_dtype)
        save_quantized(model, tokenizer, output, overwrite=overwrite)
    return MergeReport(Path(output), base_note, len(layers) + len(experts), out_dtype, requantize, probe.shape[1], merged_error,
                       requantized_error)


def _training_base(adapter, quantization, double_quant, blocksize) -> tuple[dict, str]:
    """The base to merge into ({"quantization", "double_quant", "blocksize"}) and a line saying why."""
    record = read_training_base(adapter)
    chosen = dict(record or TRAIN_DEFAULT)
    if quantization != RECORDED:
        chosen["quantization"] = quantization or "none"
    chosen.update({k: v for k, v in (("double_quant", double_quant), ("blocksize", blocksize)) if v is not None})
    if chosen["quantization"] in ("nf4", "fp4", "int4"):
        chosen["double_quant"] = True if chosen.get("double_quant") is None else chosen["double_quant"]
        chosen["blocksize"] = chosen.get("blocksize") or 64
    described = _describe(chosen)
    if record is None:
        why = "the adapter records no training base (training_base.json): taken as fourbit train's default"
        if chosen != TRAIN_DEFAULT:
            why = "as asked; the adapter records no training base"
    elif _describe(record) == described:
        why = "as the adapter was trained (training_base.json)"
    else:
        why = (f"as asked, but the adapter was trained on {_describe(record)} (training_base.json): the merged model "
               "computes something else than what was trained")
    return chosen, f"{described}, {why}"


def _describe(base: dict) -> str:
    kind = base["quantization"]
    if kind in ("nf4", "fp4", "int4"):
        return f"{kind}{' + double quant' if base.get('double_quant') else ''}, block {base.get('blocksize') or 64}"
    return {"none": "16-bit (no quantization)"}.get(kind, f"{kind} (as stored in the base folder)")


def _merged_linear(layer: LoRALinear) -> nn.Linear:
    adapter = layer.adapter()  # the one load_adapter loaded
    weight = dense_weight(layer.base_layer, torch.float32) + adapter.delta_weight(torch.float32)
    if adapter.use_dora:
        weight = adapter.lora_magnitude_vector.float()[:, None] * weight / weight.norm(dim=1, keepdim=True)
    return _dense_linear(weight, getattr(layer.base_layer, "bias", None))


@torch.no_grad()
def _merge_experts(model: nn.Module, key: str, adapter) -> None:
    """W_e' = W_e + s * B_e @ A_e for every expert of the (dense by now) expert weight ``key``."""
    module_name, _, name = key.rpartition(".")
    module = model.get_submodule(module_name)
    weight = module._parameters[name]
    delta = adapter.delta_weight(torch.float32)  # [E, out, in]
    weight.copy_(weight.float() + (delta.transpose(1, 2) if module.is_transposed else delta))
    del module.experts_lora[name]
    if not len(module.experts_lora):
        del module.experts_lora


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    linear.weight = nn.Parameter(weight.detach().float(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().float(), requires_grad=False)
    return linear


def dequantize_model(model: nn.Module) -> nn.Module:
    """Every quantized layer of ``model`` (and 4-bit MoE experts) back to dense float32 weights, and
    the model a plain transformers one again (in place)."""
    _dequantize_layers(model)
    _drop_fourbit_attributes(model)
    return model


def _dequantize_layers(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, FrozenLinear):
            model.set_submodule(name, _dense_linear(module.dequantize(torch.float32), module.bias))
        elif hasattr(module, "experts_4bit"):  # 4-bit MoE experts: their dense 3-D weights again
            dequantize_experts_(module, torch.float32)


def _drop_fourbit_attributes(model: nn.Module) -> None:
    """What load_model/add_lora (and transformers, for a quantized load) put on the model that a
    plain transformers model has not: the merged model is a dense one."""
    if getattr(model.config, "_experts_implementation", None) == EXPERTS_IMPLEMENTATION:
        model.set_experts_implementation("eager")  # the dense experts' own forward
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # transformers' own undoing of a quantized load
    model.config._is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _requantize(model, quant_type: str, double_quant: bool, blocksize: int) -> None:
    """Every linear layer but those load_model keeps dense (lm_head) back to 4 bits."""
    for name, module in quantizable_linears(model):
        model.set_submodule(name, Linear4bit.from_linear(module.float(), quant_type, blocksize, double_quant))


def _set_generation_eos(model, tokenizer) -> None:
    """EOS for generation: the tokenizer's, plus the chat template's end-of-turn token."""
    if tokenizer is None:
        return
    ids = end_of_turn_ids(tokenizer)
    if ids:
        model.generation_config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if tokenizer.pad_token_id is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id


def probe_ids(tokenizer, vocab_size: int) -> torch.Tensor:
    if tokenizer is not None:
        return tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    return torch.randint(0, vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits.float()


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).abs().max() / reference.abs().max()).item()
