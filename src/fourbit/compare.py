"""Every quantization method on one model, side by side: perplexity, bits, size, time.

    fourbit compare SRC --methods bf16,nf4,nf4-dq,fp4,int4-rtn,gptq,awq,int8 [--perplexity FILE] [--plot PNG]
                        [--group-size 128] [--calibration FILE] [--calibration-tokens 16384]

For each method the model is built from SRC as that method would ship it (the time this takes,
loading included, is "time to quantize"), written to a temporary folder in its checkpoint
format ("size on disk"), and evaluated with the same sliding-window perplexity
(perplexity.py) on the same text. "bits per parameter" counts the stored bytes of the quantized
linear layers (codes, scales, zero points, absmax constants) per weight they hold; embeddings,
norms and lm_head are the same in every method and left out of it (they are in the size on
disk). Methods:

    bf16      the weights rounded to bf16 (computed in float32 on a CPU without native bf16)
    nf4, fp4  bitsandbytes-style 4-bit, block 64, no double quantization; nf4-dq with it
    int4-rtn  4-bit round-to-nearest on GPTQ's grid, --group-size (the baseline)
    gptq      GPTQ, same bits and groups, calibrated on --calibration-tokens of --calibration
              (default: Python's documentation topics, ptq/calibration.py)
    awq       AWQ, 4-bit with zero points, same groups and calibration (AWQ GEMM layout)
    int8      LLM.int8(), outlier threshold 6.0

The default text scored is English prose: the first 8192 tokens of Python's documentation
topics (reference_text.py), which GPTQ and AWQ's default calibration, read from the other end,
does not include. (The built-in task is a poor yardstick: its conversations repeat one template,
so its perplexity is near 1 and 4-bit noise can even lower it; nor does it calibrate well: GPTQ
calibrated on it scored worse than round-to-nearest on other text.)
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import InputError
from .io.checkpoint import save_quantized
from .io.loader import load_model
from .nn.frozen_linear import FrozenLinear
from .nn.targets import quantizable_linears
from .perplexity import perplexity, read_text_tokens
from .precision import native_bf16
from .ptq import CALIBRATED, quantize_dense
from .ptq.calibration import calibration_tokens
from .reference_text import describe, documentation_topics

METHODS = ("bf16", "nf4", "nf4-dq", "fp4", "int4-rtn", "gptq", "awq", "int8")
PTQ_METHOD = {"int4-rtn": "rtn", "gptq": "gptq", "awq": "awq", "int8": "int8"}  # fourbit.ptq's names


@dataclass
class Row:
    method: str
    perplexity: float
    bits_per_parameter: float
    disk_mib: float
    seconds: float


def compare(source, methods: list[str], text_ids: list[int], group_size: int = 128, context: int = 512,
            calibration: str | os.PathLike | None = None, n_calibration: int = 16384, log=print) -> list[Row]:
    for method in methods:
        if method not in METHODS:
            raise InputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    rows = []
    for method in methods:
        start = time.perf_counter()
        model, tokenizer = _build(source, method, group_size, calibration, n_calibration, log)
        seconds = time.perf_counter() - start
        bits = _bits_per_parameter(model)
        with tempfile.TemporaryDirectory() as tmp:
            _save(model, tokenizer, Path(tmp) / "model", method)
            disk = sum(f.stat().st_size for f in (Path(tmp) / "model").rglob("*") if f.is_file()) / 2**20
        ppl = perplexity(_for_eval(model, method), text_ids, context).perplexity
        rows.append(Row(method, ppl, bits, disk, seconds))
        log(f"{method}: perplexity {ppl:.4f}, {bits:.3f} bits/parameter, {disk:.1f} MiB, {seconds:.1f} s")
    return rows


def format_table(rows: list[Row]) -> str:
    lines = [f"{'method':<10} {'perplexity':>10} {'bits/param':>10} {'disk MiB':>9} {'time s':>7}"]
    lines += [f"{r.method:<10} {r.perplexity:>10.4f} {r.bits_per_parameter:>10.3f} {r.disk_mib:>9.1f} {r.seconds:>7.1f}"
              for r in rows]
    return "\n".join(lines)


def _build(source, method, group_size, calibration, n_tokens, log):
    if method in ("nf4", "nf4-dq", "fp4"):
        return load_model(source, quantization=method.removesuffix("-dq"), double_quant=method.endswith("-dq"),
                          compute_dtype="float32", torch_dtype="float32")
    model, tokenizer = load_model(source, quantization=None, torch_dtype="float32")
    if method == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        return model, tokenizer
    ids = None
    if method in CALIBRATED:
        ids, origin = calibration_tokens(tokenizer, calibration, n_tokens, method=method.upper())
        log(f"{method} calibration: {origin}")
    quantize_dense(model, PTQ_METHOD[method], ids, 4, group_size)
    return model, tokenizer


def _for_eval(model, method):
    if method == "bf16" and not native_bf16("cpu"):
        return model.to(torch.float32)  # the bf16-rounded weights, computed in float32
    return model


def _save(model, tokenizer, folder: Path, method: str) -> None:
    if method == "bf16":
        model.save_pretrained(folder)
    else:
        save_quantized(model, tokenizer, folder)


def _bits_per_parameter(model) -> float:
    stored, weights = 0, 0
    for module in model.modules():
        if isinstance(module, FrozenLinear):
            # per-weight storage only: not the bias, nor the shared code tables or the JSON blob
            tensors = {k: t for k, t in module.state_dict().items()
                       if k != "bias" and "quant_map" not in k and "quant_state." not in k}
            stored += sum(t.numel() * t.element_size() for t in tensors.values())
            weights += module.in_features * module.out_features
    if not weights:  # a dense model: its linear weights' own width
        linears = [m for _, m in quantizable_linears(model)]
        return 8 * linears[0].weight.element_size() if linears else 0.0
    return 8 * stored / weights


DEFAULT_TEXT_TOKENS = 8192


def default_text_ids(tokenizer, n_tokens: int = DEFAULT_TEXT_TOKENS) -> tuple[list[int], str]:
    """The first ``n_tokens`` of Python's documentation topics (reference_text.py)."""
    ids = tokenizer("\n\n".join(documentation_topics()), add_special_tokens=False)["input_ids"][:n_tokens]
    return ids, f"{describe('first keys first')}, first {len(ids)} tokens"


def text_ids(tokenizer, path) -> tuple[list[int], str]:
    if path is None:
        return default_text_ids(tokenizer)
    return read_text_tokens(tokenizer, path), str(path)
