"""load_model: a Hugging Face causal LM with every linear layer but lm_head in 4 bits.

The model is built on the meta device (no memory), its linear layers swapped for empty
:class:`~fourbit.nn.Linear4bit` shells, and then filled one tensor at a time from the source:
a linear weight is quantized as soon as it is read and its dense copy dropped, so peak memory
is the quantized model plus the largest single tensor, never the 16-bit model. Embeddings,
norms and lm_head are kept unquantized, in ``torch_dtype``.

A folder that is already a bnb-4bit checkpoint (config.json ``quantization_config`` with
``quant_method: bitsandbytes, load_in_4bit: true``; written by ``fourbit quantize`` or by
transformers + bitsandbytes) is read as stored: each weight's packed bytes and state tensors
are gathered and adopted without requantizing, and the checkpoint's quantization settings
win over the arguments. So are GPTQ v1 folders (GPTQLinear), AWQ GEMM folders (AWQLinear) and
bitsandbytes 8-bit folders (Linear8bit): their layers are swapped for empty shells of the stored
layout and filled with the stored tensors as they are.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict

import torch
from torch import nn
from tqdm.auto import tqdm

from ..nn.awq_linear import AWQLinear
from ..nn.gptq_linear import GPTQLinear
from ..nn.linear4bit import Linear4bit
from ..nn.linear8bit import Linear8bit, layout_error
from ..nn.packed_linear import PackedLinear
from ..quant.int8 import DEFAULT_THRESHOLD
from .gptq import PACKABLE_BITS
from ..precision import parse_dtype, resolve_compute_dtype
from ..quant.blockwise import check_blocksize
from ..quant.dtypes import check_quant_type
from ..quant.state import QuantState
from .no_remote_code import from_config
from .sources import open_source

log = logging.getLogger(__name__)

SKIP_MODULES = ("lm_head",)


def load_model(
    path_or_id: str | os.PathLike | None = None,
    quantization: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str | torch.dtype = "auto",
    torch_dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    skip_modules: tuple[str, ...] = SKIP_MODULES,
    progress: bool = False,
):
    """Load a causal LM, quantized, and its tokenizer: ``model, tokenizer = load_model(...)``.

    path_or_id: a folder with config.json + safetensors (plain or bnb-4bit), a ``.gguf`` file,
        a hub id, or None for the embedded SmolLM2-135M-Instruct.
    quantization: "nf4", "fp4", "int4", or None to keep every weight dense.
    compute_dtype: dtype of the 4-bit matmuls; "auto" = bf16 where ``device`` computes it
        natively, else fp32 (see precision.py).
    torch_dtype: dtype of the unquantized weights (embeddings, norms, lm_head); "auto" = the
        compute dtype, so that a CPU without bf16 keeps its whole forward in fp32.
    skip_modules: linear layers kept dense, matched by name or by last name component.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    source = open_source(path_or_id)
    compute = resolve_compute_dtype(compute_dtype, device)
    dtype = compute if torch_dtype == "auto" else parse_dtype(torch_dtype)
    gptq = gptq_settings(source.quantization_config)
    awq = awq_settings(source.quantization_config)
    int8 = int8_settings(source.quantization_config)
    shells = gptq is not None or awq is not None or int8 is not None
    stored = None if shells else _bnb_4bit_settings(source.quantization_config)
    if shells:
        quantized = set()  # the quantized layers come as GPTQLinear / AWQLinear / Linear8bit shells below
    elif stored is not None:
        quantization, double_quant = stored
        quantized = set(_expected_quant_keys(source.tensor_names()))
    elif quantization is not None:
        check_quant_type(quantization)
        check_blocksize(blocksize)
        quantized = None  # every linear but skip_modules
    else:
        quantized = set()

    config = source.config
    with torch.device("meta"):
        model = from_config(AutoModelForCausalLM, config, what=source.description, dtype=dtype)
    targets = _swap_linears(model, quantized, skip_modules, quantization or "nf4", blocksize, double_quant, compute)
    if gptq is not None:
        bits, group_size = gptq
        _swap_stored_linears(model, source.tensor_names(), "qweight", "GPTQ", lambda m, bias: GPTQLinear(
            m.in_features, m.out_features, bits, group_size, bias, compute, device="meta"))
    if awq is not None:
        _swap_stored_linears(model, source.tensor_names(), "qweight", "AWQ", lambda m, bias: AWQLinear(
            m.in_features, m.out_features, 4, awq, bias, compute, device="meta"))
    if int8 is not None:
        _swap_stored_linears(model, source.tensor_names(), "SCB", "bitsandbytes 8-bit", lambda m, bias: Linear8bit(
            m.in_features, m.out_features, bias, int8, device="meta"))

    _fill(model, source, targets, stored is not None, device, dtype, progress)
    model.eval()
    if shells:
        model.config.quantization_config = source.quantization_config
    elif quantization is not None:
        model.config.quantization_config = bnb_quantization_config(quantization, double_quant, compute)
    return model, source.tokenizer()


def gptq_settings(qconfig: dict | None) -> tuple[int, int] | None:
    """(bits, group_size) of a GPTQ v1 checkpoint, None for any other."""
    if not qconfig or qconfig.get("quant_method") != "gptq":
        return None
    layout = qconfig.get("checkpoint_format", qconfig.get("format", "gptq"))
    if layout != "gptq":
        raise ValueError(f"GPTQ checkpoint_format {layout!r} is not supported; fourbit reads the 'gptq' (v1) layout")
    bits, group_size = int(qconfig.get("bits", 4)), int(qconfig.get("group_size", -1))
    if bits not in PACKABLE_BITS:
        raise ValueError(f"{bits}-bit GPTQ checkpoints are not supported; fourbit reads {PACKABLE_BITS}-bit ones")
    return bits, group_size


def awq_settings(qconfig: dict | None) -> int | None:
    """The group size of an AWQ GEMM checkpoint (4-bit, zero points), None for any other."""
    if not qconfig or qconfig.get("quant_method") != "awq":
        return None
    version = str(qconfig.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"AWQ version {version!r} is not supported; fourbit reads the 'gemm' layout (GEMV, gemv_fast "
                         "and llm-awq interleave their words differently)")
    bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"{bits}-bit AWQ checkpoints are not supported; the GEMM layout holds 4-bit codes")
    if not qconfig.get("zero_point", True):
        raise ValueError("AWQ checkpoints without zero points (zero_point: false) are not supported")
    return int(qconfig.get("group_size", qconfig.get("q_group_size", 128)))


def _swap_stored_linears(model, tensor_names: list[str], marker: str, what: str, shell) -> None:
    """Replace each linear whose ``<name>.<marker>`` tensor the checkpoint holds with
    ``shell(linear, has_bias)``, an empty quantized layer on the meta device."""
    names = set(tensor_names)
    layers = [n.removesuffix(f".{marker}") for n in tensor_names if n.endswith(f".{marker}")]
    if not layers:
        raise ValueError(f"the checkpoint's config declares {what}, but it holds no '.{marker}' tensors")
    for name in layers:
        module = model.get_submodule(name)
        if not isinstance(module, nn.Linear):
            raise ValueError(f"the checkpoint holds {what} tensors for {name}, which is not a linear layer of this model")
        model.set_submodule(name, shell(module, f"{name}.bias" in names))


def int8_settings(qconfig: dict | None) -> float | None:
    """The outlier threshold of a bitsandbytes 8-bit (LLM.int8()) checkpoint, None for any other."""
    if not qconfig or qconfig.get("quant_method") != "bitsandbytes" or not qconfig.get(
            "load_in_8bit", qconfig.get("_load_in_8bit")):
        return None
    return float(qconfig.get("llm_int8_threshold", DEFAULT_THRESHOLD))


def int8_quantization_config(threshold: float = DEFAULT_THRESHOLD) -> dict:
    """config.json ``quantization_config`` of an 8-bit folder, as transformers' BitsAndBytesConfig writes it."""
    return bnb_quantization_config("nf4", False, torch.float32) | {
        "load_in_4bit": False, "_load_in_4bit": False, "load_in_8bit": True, "_load_in_8bit": True,
        "llm_int8_threshold": threshold,
    }


def _bnb_4bit_settings(qconfig: dict | None) -> tuple[str, bool] | None:
    """(quant_type, double_quant) of a bnb-4bit checkpoint, None for a dense one."""
    if not qconfig:
        return None
    method = qconfig.get("quant_method")
    if method != "bitsandbytes" or not qconfig.get("load_in_4bit", qconfig.get("_load_in_4bit")):
        raise ValueError(
            f"checkpoint quantization {method!r} is not supported by this loader; expected bitsandbytes 4-bit or "
            "8-bit, GPTQ (v1 layout), AWQ (GEMM layout), or an unquantized checkpoint"
        )
    quant_type = qconfig.get("bnb_4bit_quant_type", "fp4")
    check_quant_type(quant_type)
    return quant_type, bool(qconfig.get("bnb_4bit_use_double_quant", False))


def bnb_quantization_config(quant_type: str, double_quant: bool, compute_dtype: torch.dtype) -> dict:
    """config.json ``quantization_config`` as transformers' BitsAndBytesConfig writes it."""
    return {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "load_in_8bit": False,
        "_load_in_4bit": True,
        "_load_in_8bit": False,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_use_double_quant": double_quant,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_threshold": 6.0,
        "llm_int8_skip_modules": None,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
    }


def _swap_linears(model, quantized, skip_modules, quant_type, blocksize, double_quant, compute) -> dict[str, Linear4bit]:
    """Replace target nn.Linear modules with empty Linear4bit shells; returns them by name."""
    targets = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        if quantized is None:
            if name in skip_modules or name.rsplit(".", 1)[-1] in skip_modules:
                continue
        elif name not in quantized:
            continue
        shell = Linear4bit(
            module.in_features, module.out_features, module.bias is not None,
            quant_type, blocksize, double_quant, compute, device="meta",
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, shell)
        targets[name] = shell
    if quantized:
        missing = quantized - set(targets)
        if missing:
            raise ValueError(f"the checkpoint quantizes {sorted(missing)[:5]}, which are not linear layers of this model")
    return targets


def _fill(model, source, targets, prequantized, device, dtype, progress) -> None:
    pending: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # bnb tensors per module
    expected = _expected_quant_keys(source.tensor_names()) if prequantized else {}
    unexpected = []
    stream = source.tensors()
    if progress:
        stream = tqdm(stream, total=len(source.tensor_names()), desc="loading", unit="tensor")
    for name, load in stream:
        module_name, attr = _split_module(name, targets)
        if module_name in targets and attr.startswith("weight"):
            layer = targets[module_name]
            if prequantized:
                pending[module_name][attr.removeprefix("weight").lstrip(".")] = _finite(load(), name, source).to(device)
                if set(pending[module_name]) == expected[module_name]:
                    bucket = pending.pop(module_name)
                    packed = bucket.pop("")
                    where = f"{module_name}.weight"
                    layer.load_quantized(packed, QuantState.from_dict(bucket, where=where), where)
            else:
                layer.quantize_(_finite(load(), name, source).to(device), name=name)
            continue
        try:
            owner = model.get_submodule(module_name)
        except AttributeError:
            unexpected.append(name)
            continue
        if attr not in owner._parameters and attr not in owner._buffers:
            unexpected.append(name)
            continue
        tensor = _finite(load(), name, source)
        if tensor.is_floating_point() and not isinstance(owner, PackedLinear) and attr != "SCB":  # kept as stored
            tensor = tensor.to(dtype)
        _set_tensor(owner, attr, tensor.to(device))
    if pending:
        first = next(iter(pending))
        missing = sorted(expected[first] - set(pending[first]))
        raise ValueError(f"{first}.weight: quantization tensors {['weight.' + m if m else 'weight' for m in missing]} are missing from the checkpoint")
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not have: %s", len(unexpected), unexpected[:5])
    _finish(model, device)


def _finite(tensor: torch.Tensor, name: str, source) -> torch.Tensor:
    """``tensor``, once it is shown to hold no NaN or Inf: a model with one anywhere (a norm, an
    embedding, a scale) computes NaN, and training would only say its loss is not finite."""
    if tensor.is_floating_point():
        bad = int((~torch.isfinite(tensor)).sum())
        if bad:
            raise ValueError(f"{source.description}: tensor {name} holds {bad} NaN or Inf values (of {tensor.numel()}); "
                             "the weights are damaged (a diverged run or a bad conversion); fourbit does not load them")
    return tensor


def _expected_quant_keys(names: list[str]) -> dict[str, set[str]]:
    """Per quantized module, the weight keys (suffixes after 'weight', '' for the bytes) to wait for."""
    keys: dict[str, set[str]] = defaultdict(set)
    for name in names:
        match = re.match(r"(.*)\.weight(?:\.(.*))?$", name)
        if match:
            keys[match.group(1)].add(match.group(2) or "")
    return {module: suffixes for module, suffixes in keys.items() if any(s.startswith("quant_state.") for s in suffixes)}


def _split_module(name: str, targets) -> tuple[str, str]:
    """'a.b.weight.absmax' -> ('a.b', 'weight.absmax') for quantized layers; else ('a.b', 'weight')."""
    head, sep, tail = name.partition(".weight.")
    if sep and head in targets:
        return head, "weight." + tail
    module_name, _, attr = name.rpartition(".")
    return module_name, attr


def _set_tensor(module: nn.Module, attr: str, tensor: torch.Tensor) -> None:
    if attr in module._parameters:
        old = module._parameters[attr]
        if tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor for {attr} has shape {tuple(tensor.shape)}; the model expects {tuple(old.shape)}")
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=old.requires_grad and tensor.is_floating_point())
    else:
        old = module._buffers[attr]
        if old is not None and tuple(old.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor for {attr} has shape {tuple(tensor.shape)}; the model expects {tuple(old.shape)}")
        module._buffers[attr] = tensor


def _finish(model, device) -> None:
    """Tie lm_head to the embeddings where configured, recompute non-persistent buffers
    (rotary frequencies), and refuse a model with weights the checkpoint did not provide."""
    if getattr(model.config, "tie_word_embeddings", False) or getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        model.tie_weights()
    unfilled = [f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, (PackedLinear, Linear8bit))
                for b, t in m._buffers.items() if t is not None and t.is_meta]
    if unfilled:
        raise ValueError(f"the checkpoint lacks {len(unfilled)} quantized-layer tensors the model needs, "
                         f"e.g. {unfilled[:5]}")
    for name, module in model.named_modules():  # tensors are set directly above, not through load_state_dict
        if isinstance(module, Linear8bit) and layout_error(module.weight_format):
            raise ValueError(f"{name}.{layout_error(module.weight_format)}")
    for module in model.modules():
        meta = [n for n, b in module._buffers.items() if b is not None and b.is_meta]
        if meta:
            for n in meta:
                module._buffers[n] = torch.empty_like(module._buffers[n], device=device)
            model._init_weights(module)
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.quant_state is None]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
