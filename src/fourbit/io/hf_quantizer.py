"""fourbit as a transformers quantizer: its layers filled while transformers loads the model.

    from transformers import AutoModelForCausalLM
    import fourbit

    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=fourbit.NF4Config())

transformers does the loading, as for any model it reads: it builds the model on the meta
device, maps the checkpoint's names onto the model's (renames, per-expert tensors fused into
3-D parameters, tied and scaled embeddings, non-persistent buffers), and streams the tensors in
one at a time. This quantizer, registered through transformers' public ``register_quantizer``
and ``register_quantization_config``, does three things in that flow:

1. Before loading (``_process_model_before_weight_loading``): every linear layer but the skipped
   ones (``lm_head``, the model's ``_keep_in_fp32_modules``) becomes an empty layer of the format
   (formats/): a Linear4bit, or for a stored GPTQ, AWQ or int8 checkpoint that format's layer.
2. Quantize on load (``get_quantize_ops``): each linear weight of a dense checkpoint is quantized
   to 4 bits the moment it is read, so the dense model is never held, only one tensor of it.
3. A stored bnb-4bit weight's tensors (the packed bytes, absmax, code tables, nested constants)
   are gathered into its Linear4bit (``get_weight_conversions``). GPTQ, AWQ and int8 tensors are
   their layers' own parameters and buffers, and load as they are.

An error inside a conversion is collected (transformers turns it into a report and a RuntimeError
of its own); fourbit.load_model raises the first one instead, with its message.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import (
    HfQuantizer,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.quantizers_utils import get_module_from_name
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..errors import InputError
from ..formats import BNB_4BIT, FORMATS
from ..nn.experts4bit import IMPLEMENTATION as EXPERTS_IMPLEMENTATION
from ..nn.experts4bit import is_expert_weight, quantize_experts_
from ..nn.experts4bit import register as register_experts_implementation
from ..nn.linear4bit import Linear4bit
from ..nn.targets import KEEP_DENSE
from ..quant.blockwise import check_blocksize
from ..quant.dtypes import check_quant_type
from ..quant.state import QuantState

METHOD = "fourbit"
register_experts_implementation()
_FORMATS = {fmt.name: fmt for fmt in FORMATS}


@register_quantization_config(METHOD)
class FourbitConfig(QuantizationConfigMixin):
    """How fourbit quantizes a model while transformers loads it.

    quant_type, double_quant, blocksize: the 4-bit format for a dense checkpoint ("nf4", "fp4"
        or "int4"; bitsandbytes' layout). compute_dtype: what the 4-bit matmuls compute in.
    skip_modules: linear layers kept dense, by name or last name component.
    experts: quantize mixture-of-experts weights (transformers' fused 3-D expert parameters) too,
        each expert's matrix on its own (nn/experts4bit.py); False keeps them in 16 bits.
    stored: the format a pre-quantized checkpoint is in ("bnb-4bit", "int8", "gptq", "awq"),
        with its settings and the names of its quantized layers (fourbit.load_model fills these
        in from the checkpoint); None for a dense checkpoint.
    """

    def __init__(self, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64,
                 compute_dtype: str = "float32", skip_modules: list[str] | tuple[str, ...] = KEEP_DENSE,
                 experts: bool = True, stored: str | None = None, stored_settings: dict | None = None,
                 stored_modules: list[str] | None = None,
                 **kwargs: Any):
        check_quant_type(quant_type)
        check_blocksize(blocksize)
        if stored is not None and stored not in _FORMATS:
            raise InputError(f"stored format {stored!r} is not one of {sorted(_FORMATS)}")
        self.quant_method = METHOD
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
        self.compute_dtype = str(compute_dtype).removeprefix("torch.")
        self.skip_modules = list(skip_modules)
        self.experts = experts
        self.stored, self.stored_settings, self.stored_modules = stored, stored_settings or {}, stored_modules


def NF4Config(double_quant: bool = True, blocksize: int = 64, compute_dtype: str = "float32", **kwargs) -> FourbitConfig:
    """QLoRA's format: NormalFloat 4-bit, blocks of 64, double quantization of their constants."""
    return FourbitConfig("nf4", double_quant, blocksize, compute_dtype, **kwargs)


@register_quantizer(METHOD)
class FourbitQuantizer(HfQuantizer):
    requires_calibration = False
    quantization_config: FourbitConfig

    def _process_model_before_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        compute = getattr(torch, config.compute_dtype)
        if config.stored is None:
            skip = self.get_modules_to_not_convert(model, config.skip_modules, getattr(model, "_keep_in_fp32_modules", None))
            for name, module in list(model.named_modules()):
                if isinstance(module, nn.Linear) and not _named(name, skip):
                    layer = BNB_4BIT.layer(module, {"quant_type": config.quant_type, "double_quant": config.double_quant,
                                                     "blocksize": config.blocksize}, compute)
                    # until it is quantized the weight stands as the dense one it will be made from
                    layer.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)
                    model.set_submodule(name, layer)
            return model
        fmt = _FORMATS[config.stored]
        for name in config.stored_modules or []:
            module = model.get_submodule(name)
            if not isinstance(module, nn.Linear):
                raise InputError(f"the checkpoint holds {fmt.name} tensors for {name}, which is not a linear layer of "
                                 "this model")
            model.set_submodule(name, fmt.layer(module, config.stored_settings, compute))
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        module, attr = get_module_from_name(model, param_name)
        if isinstance(module, Linear4bit):
            return attr == "weight"
        config = self.quantization_config
        return config.stored is None and config.experts and is_expert_weight(module, attr)

    def get_quantize_ops(self):
        return _QuantizeOnLoad(self)

    def get_weight_conversions(self):
        if self.quantization_config.stored != BNB_4BIT.name:
            return []
        suffixes = ["absmax", "quant_map", "nested_absmax", "nested_quant_map",
                    "quant_state.bitsandbytes__nf4", "quant_state.bitsandbytes__fp4", "quant_state.bitsandbytes__int4"]
        return [WeightConverter(source_patterns=[*(f"weight.{s}" for s in suffixes), "weight"],
                                target_patterns="weight", operations=[_GatherStored(self)])]

    def _process_model_after_weight_loading(self, model, **kwargs):
        config = self.quantization_config
        if any(hasattr(m, "experts_4bit") for m in model.modules()):
            model.set_experts_implementation(EXPERTS_IMPLEMENTATION)  # their forward dequantizes per expert
        if config.stored is None:  # the model now holds bnb-4bit layers: the config says so, for save_pretrained
            config.stored = BNB_4BIT.name
            config.stored_settings = {"quant_type": config.quant_type, "double_quant": config.double_quant}
            config.stored_modules = sorted(n for n, m in model.named_modules() if isinstance(m, Linear4bit))
        return model

    def is_serializable(self, *args, **kwargs) -> bool:
        return True  # bnb-4bit layers; 4-bit MoE experts are refused by save_quantized (no format holds them)

    @property
    def is_trainable(self) -> bool:
        return True


class _QuantizeOnLoad(ConversionOps):
    """A dense linear weight, quantized into its Linear4bit as it arrives."""

    def __init__(self, quantizer: FourbitQuantizer):
        self.hf_quantizer = quantizer  # the name transformers looks for: tensors for it are not cast

    def convert(self, input_dict: dict, full_layer_name: str | None = None, model=None, **kwargs) -> dict:
        config = self.hf_quantizer.quantization_config
        result = {}
        for name, value in input_dict.items():
            value = value[0] if isinstance(value, list) else value
            module, attr = get_module_from_name(model, name)
            with _kept(self.hf_quantizer):
                check_finite(name, value)
                if isinstance(module, Linear4bit):
                    module.quantize_(value, name=name)
                    result[name] = module.weight
                else:  # a fused 3-D expert weight
                    result[name] = quantize_experts_(module, attr, value, config.quant_type, config.blocksize,
                                                     config.double_quant, getattr(torch, config.compute_dtype))
        return result


class _GatherStored(ConversionOps):
    """A stored bnb-4bit weight's tensors (bytes, constants, quant-state blob) into its Linear4bit."""

    def __init__(self, quantizer: FourbitQuantizer):
        self.hf_quantizer = quantizer  # the name transformers looks for: tensors for it are not cast

    def convert(self, input_dict: dict, model=None, full_layer_name: str | None = None, **kwargs) -> dict:
        tensors = {key: value[0] if isinstance(value, list) else value for key, value in input_dict.items()}
        module, _ = get_module_from_name(model, full_layer_name)
        if not isinstance(module, Linear4bit):  # the pattern also matches every dense weight: passed on as it is
            return input_dict
        with _kept(self.hf_quantizer):
            packed = tensors.pop("weight")
            for key, tensor in tensors.items():
                check_finite(f"{full_layer_name}.{key.removeprefix('weight.')}", tensor)
            state = QuantState.from_dict({k.removeprefix("weight."): v for k, v in tensors.items()}, where=full_layer_name)
            module.load_quantized(packed, state, full_layer_name)
        return {"weight": module.weight}


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor holding NaN or Inf, by name: a model with one anywhere computes NaN. Read
    in slices of 2^22 values, so the check itself holds a few MiB, not a copy of the tensor."""
    if tensor.is_floating_point():
        flat = tensor.detach().reshape(-1)
        if all(bool(torch.isfinite(part).all()) for part in flat.split(1 << 22)):
            return
        bad = sum(int((~torch.isfinite(part)).sum()) for part in flat.split(1 << 22))
        if bad:
            raise InputError(f"tensor {name} holds {bad} NaN or Inf values (of {tensor.numel()}); the weights are "
                             "damaged (a diverged run or a bad conversion); fourbit does not load them")


_collected: list[Exception] | None = None  # errors of the conversions of the load in progress
_collecting = threading.Lock()


@contextlib.contextmanager
def conversion_errors():
    """``with conversion_errors() as errors:`` around a load collects what its conversions raised
    (transformers reports those as one RuntimeError; fourbit.load_model re-raises the first)."""
    global _collected
    with _collecting:
        _collected = errors = []
        try:
            yield errors
        finally:
            _collected = None


@contextlib.contextmanager
def _kept(quantizer: FourbitQuantizer):
    """Keep an error raised inside a conversion for :func:`conversion_errors`, then let it go on."""
    try:
        yield
    except Exception as error:
        if _collected is not None:  # read once: loads in other threads wait on the lock
            _collected.append(error)
        raise


def _named(name: str, patterns) -> bool:
    return any(name == p or name.endswith("." + p) or name.rsplit(".", 1)[-1] == p for p in patterns)
