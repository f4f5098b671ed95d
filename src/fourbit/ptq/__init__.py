"""Post-training quantization of a loaded dense model into a stored format, in one place.

    report = quantize_dense(model, "gptq", calibration=ids, group_size=128)   # in place
    save_quantized(model, tokenizer, out)                                     # io/checkpoint.py

Methods and the format each writes (formats/):

    gptq   GPTQ (ptq/gptq_model.py), calibrated: the GPTQ v1 layout
    rtn    round-to-nearest on GPTQ's grid: the same layout, its config saying ``method: rtn``
    awq    AWQ (ptq/awq_model.py), calibrated: the AWQ GEMM layout, 4-bit with zero points
    int8   LLM.int8() (quant/int8.py): bitsandbytes' 8-bit layout, every linear but lm_head

The model's config gets the format's ``quantization_config``, so the folder says what it holds.
``fourbit quantize`` and ``fourbit compare`` both quantize through here.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..formats import AWQ, GPTQ, INT8
from ..nn.linear8bit import Linear8bit
from ..nn.targets import quantizable_linears
from ..quant.int8 import DEFAULT_THRESHOLD
from .awq_model import quantize_model_awq
from .gptq_model import quantize_model_gptq, quantize_model_rtn

METHODS = ("gptq", "rtn", "awq", "int8")
CALIBRATED = ("gptq", "awq")


def quantize_dense(model: nn.Module, method: str, calibration: torch.Tensor | None = None, bits: int = 4,
                   group_size: int = 128, sym: bool = True, act_order: bool = False, damp: float = 0.01,
                   threshold: float = DEFAULT_THRESHOLD, progress: bool = False) -> str:
    """Quantize ``model``'s linear layers with ``method``, in place; returns a line saying what was done."""
    if method not in METHODS:
        raise InputError(f"unknown post-training method {method!r}; choose from {', '.join(METHODS)}")
    if method in CALIBRATED and calibration is None:
        raise InputError(f"{method} needs calibration token ids [sequences, length]")
    if method == "gptq":
        report = quantize_model_gptq(model, calibration, bits, group_size, sym, act_order, damp, progress=progress)
        model.config.quantization_config = GPTQ.quantization_config(bits, group_size, sym, act_order, damp)
        return f"{report.format()}; {bits}-bit, group {group_size}, {'sym' if sym else 'asym'}"
    if method == "rtn":
        count = quantize_model_rtn(model, bits, group_size, sym)
        model.config.quantization_config = GPTQ.quantization_config(bits, group_size, sym, False, damp=None)
        return f"round-to-nearest: {count} linear layers; {bits}-bit, group {group_size}"
    if method == "awq":
        report = quantize_model_awq(model, calibration, bits, group_size, progress=progress)
        model.config.quantization_config = AWQ.quantization_config(group_size)
        return f"{report.format()}; 4-bit, group {group_size}, asym"
    layers = quantizable_linears(model)
    for name, linear in layers:
        model.set_submodule(name, Linear8bit.from_linear(linear, threshold))
    model.config.quantization_config = INT8.quantization_config(threshold)
    return f"LLM.int8(): {len(layers)} linear layers, outlier threshold {threshold}"
