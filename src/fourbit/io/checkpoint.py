"""Writing a quantized model as a Hugging Face folder: bnb-4bit, GPTQ v1 (quant/gptq_layout.py; then
also AutoGPTQ's quantize_config.json), AWQ GEMM (quant/awq_layout.py) or bitsandbytes 8-bit.

For bnb-4bit, the folder is what transformers + bitsandbytes write with ``save_pretrained`` for a
model loaded with ``BitsAndBytesConfig(load_in_4bit=True, ...)``, so either stack can read it:

    config.json              the model config plus ``quantization_config`` (bitsandbytes 4-bit)
    model.safetensors        per quantized weight P: P.weight (uint8 packed codes), P.weight.absmax,
                             P.weight.quant_map, [P.weight.nested_absmax, P.weight.nested_quant_map,]
                             P.weight.quant_state.bitsandbytes__<type>; everything else unquantized;
                             metadata {"format": "pt"}; a tied lm_head is not stored twice
    generation_config.json   when the model has one
    tokenizer files          when a tokenizer is given

A GPTQ model (GPTQLinear layers, quantization_config from quant/gptq_layout.py) writes the same files, its
layers as P.qweight, P.qzeros, P.scales, P.g_idx (and P.bias); an AWQ model (AWQLinear layers,
quantization_config from quant/awq_layout.py) as P.qweight, P.qzeros, P.scales (and P.bias). The folder is
written next to its destination and renamed into place (io/atomic.py).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import InputError
from .atomic import atomic_dir


def save_quantized(model, tokenizer, output: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write ``model`` (from :func:`fourbit.load_model`) and ``tokenizer`` to ``output``."""
    if getattr(model.config, "quantization_config", None) is None:
        raise InputError("the model holds no quantized layers to save; load it with quantization='nf4' or 'fp4'")
    if any(hasattr(m, "experts_4bit") for m in model.modules()):
        raise InputError("the model's mixture-of-experts weights are in 4 bits, which no checkpoint format holds yet "
                         "(bitsandbytes' has no 3-D weights); load it with quantize_experts=False to save a bnb-4bit "
                         "folder, or merge an adapter into a dense one")
    tensors = _unshared_state_dict(model)
    with atomic_dir(output, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        _config_naming_stored_dtype(model).save_pretrained(tmp)
        if model.config.quantization_config.get("quant_method") == "gptq":  # AutoGPTQ reads its own file
            (tmp / "quantize_config.json").write_text(json.dumps(model.config.quantization_config, indent=2))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(output)


def _config_naming_stored_dtype(model):
    """The model's config with ``dtype`` set to what the unquantized weights are stored in (the
    embeddings'), which transformers reads for ``dtype="auto"``; the model's own is not changed."""
    config = copy.deepcopy(model.config)
    config.dtype = model.get_input_embeddings().weight.dtype
    return config


def _unshared_state_dict(model) -> dict[str, torch.Tensor]:
    """The state dict with tied parameters stored once (the first name wins, as in transformers)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and hash(key) in seen:
            continue
        seen.add(hash(key))
        out[name] = tensor.detach().contiguous().cpu()
    return out
