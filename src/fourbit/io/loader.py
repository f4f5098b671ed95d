"""load_model: a Hugging Face causal LM with every linear layer but lm_head in 4 bits.

transformers loads the model (``AutoModelForCausalLM.from_pretrained``) with fourbit's
quantizer plugged in (io/hf_quantizer.py): the model is built on the meta device, its linear
layers become empty 4-bit layers, and each linear weight is quantized as soon as it is read
and its dense copy dropped, so peak memory is the quantized model plus the largest tensor,
never the 16-bit model. Everything else an architecture needs (renamed keys, fused MoE expert
tensors, tied and scaled embeddings, non-persistent buffers) is transformers' own loading.
Embeddings, norms and lm_head are kept unquantized, in ``torch_dtype``.

A folder that is already quantized (config.json ``quantization_config``) is read as stored, in
the format it declares (formats/: bnb-4bit, written by ``fourbit quantize`` or transformers +
bitsandbytes; int8; GPTQ v1; AWQ GEMM), into fourbit's layer for that format, whose settings
win over the arguments. A GGUF file is converted once into a safetensors folder in fourbit's
cache (io/gguf.py), then loaded the same way.

After loading, every tensor is checked: a missing one, one of the wrong shape, or one holding
NaN or Inf is an error that names it (transformers itself only warns and initializes missing
weights at random).
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from ..errors import InputError
from ..formats import BNB_4BIT, stored_format
from ..nn.dense_linear import DenseLinear
from ..nn.linear4bit import Linear4bit
from ..nn.linear8bit import Linear8bit, layout_error
from ..nn.targets import KEEP_DENSE
from ..precision import parse_dtype, resolve_compute_dtype
from ..quant.blockwise import check_blocksize
from ..quant.dtypes import check_quant_type
from .hf_quantizer import FourbitConfig, check_finite, conversion_errors
from .no_remote_code import from_pretrained
from .sources import open_source

log = logging.getLogger(__name__)


def load_model(
    path_or_id: str | os.PathLike | None = None,
    quantization: str | None = "nf4",
    double_quant: bool = True,
    blocksize: int = 64,
    compute_dtype: str | torch.dtype = "auto",
    torch_dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    skip_modules: tuple[str, ...] = KEEP_DENSE,
    progress: bool = False,
    quantize_experts: bool = True,
):
    """Load a causal LM, quantized, and its tokenizer: ``model, tokenizer = load_model(...)``.

    path_or_id: a folder with config.json + safetensors (plain or quantized), a ``.gguf`` file,
        a hub id, or None for the embedded SmolLM2-135M-Instruct.
    quantization: "nf4", "fp4", "int4", or None to keep every weight dense.
    compute_dtype: dtype of the 4-bit matmuls; "auto" = bf16 where ``device`` computes it
        natively, else fp32 (see precision.py).
    torch_dtype: dtype of the unquantized weights (embeddings, norms, lm_head); "auto" = the
        compute dtype, so that a CPU without bf16 keeps its whole forward in fp32.
    skip_modules: linear layers kept dense, matched by name or by last name component.
    quantize_experts: mixture-of-experts weights in 4 bits too (nn/experts4bit.py); False keeps
        them in ``torch_dtype``, as bitsandbytes does.
    """
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    source = open_source(path_or_id)
    compute = resolve_compute_dtype(compute_dtype, device)
    dtype = compute if torch_dtype == "auto" else parse_dtype(torch_dtype)
    stored = stored_format(source.quantization_config)
    if stored is None and quantization is not None:
        check_quant_type(quantization)
        check_blocksize(blocksize)
    folder = source.hf_folder()
    config = source.config
    if stored is not None:  # read as stored (pre-quantized), into fourbit's layers: the config says so
        config.quantization_config = _stored_config(source, stored, compute).to_dict()
        quantizer_config = None
    else:
        quantizer_config = None if quantization is None else FourbitConfig(
            quantization, double_quant, blocksize, compute, skip_modules, experts=quantize_experts)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
    with conversion_errors() as errors, _quiet(progress):
        try:
            model, info = from_pretrained(
                AutoModelForCausalLM, folder, what=source.description, config=config, dtype=dtype,
                quantization_config=quantizer_config, device_map={"": device} if device.type != "cpu" else None,
                output_loading_info=True,
            )
        except RuntimeError:
            if errors:  # transformers reported a conversion's failure; say what it was
                raise errors[0] from None
            raise
    if errors:
        raise errors[0]
    _check_loaded(model, info, source)
    model.eval()
    if device.type == "cpu":
        _head_reads_in_place(model)
    if stored is not None:
        model.config.quantization_config = source.quantization_config
    elif quantization is not None:
        model.config.quantization_config = BNB_4BIT.quantization_config(quantization, double_quant, compute)
    elif hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, source.tokenizer()


def _head_reads_in_place(model: nn.Module) -> None:
    """The output head as a DenseLinear (nn/dense_linear.py): its decoding products on a CPU read
    the 16-bit weight where it lies instead of oneDNN reordering it per token. The same
    parameters (a tied head stays tied), the same state_dict."""
    head = model.get_output_embeddings()
    if type(head) is nn.Linear:
        model.set_output_embeddings(DenseLinear.from_linear(head))


def _stored_config(source, stored, compute: torch.dtype) -> FourbitConfig:
    """The quantizer's config for a pre-quantized checkpoint: its format, settings and layers."""
    fmt, settings = stored.format, stored.settings
    names = source.tensor_names()
    marker = "." + fmt.marker
    modules = sorted({n.partition(marker)[0] for n in names if marker in n})
    if not modules:
        raise InputError(f"the checkpoint's config declares {_declared(fmt.name)}, but it holds no '{marker.rstrip('_')}' "
                         "tensors")
    extra = {"quant_type": settings["quant_type"], "double_quant": settings["double_quant"]} if fmt is BNB_4BIT else {}
    return FourbitConfig(compute_dtype=compute, stored=fmt.name, stored_settings=settings, stored_modules=modules, **extra)


def _declared(name: str) -> str:
    return {"bnb-4bit": "bitsandbytes 4-bit", "int8": "bitsandbytes 8-bit", "gptq": "GPTQ", "awq": "AWQ"}[name]


def _check_loaded(model: nn.Module, info: dict, source) -> None:
    """Every tensor the model needs came from the checkpoint, in its shape, and holds numbers."""
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        name, got, want = next(iter(mismatched))
        raise InputError(f"checkpoint tensor {name} has shape {tuple(got)}; the model expects {tuple(want)}")
    missing = sorted(info.get("missing_keys") or [])
    missing += [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, Linear4bit) and m.quant_state is None]
    if missing:
        raise InputError(f"the checkpoint lacks {len(missing)} tensors the model needs, e.g. {missing[:5]}")
    unexpected = sorted(info.get("unexpected_keys") or [])
    if unexpected:
        log.warning("ignored %d checkpoint tensors the model does not have: %s", len(unexpected), unexpected[:5])
    for name, module in model.named_modules():
        if isinstance(module, Linear8bit) and layout_error(module.weight_format):
            raise InputError(f"{name}.{layout_error(module.weight_format)}")
    # Norms, embeddings, lm_head, biases: what no quantizer looked at (the linear weights and stored
    # constants were checked as they arrived). Parameters and buffers only: a state_dict would
    # build every layer's quantization constants anew.
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            check_finite(name, tensor)


@contextlib.contextmanager
def _quiet(progress: bool):
    """transformers' own progress bar and loading report only when ``progress`` is asked for."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()
