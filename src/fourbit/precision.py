"""Choosing the compute dtype: bf16 where the hardware does bf16 math, fp32 where it would emulate it.

A 4-bit weight is dequantized to the compute dtype before each matmul. On GPUs with bf16
support (Ampere and newer) that is bf16. A CPU without native bf16 instructions (AVX512-BF16
or AMX) emulates bf16 matmuls in software; a QLoRA step there was measured 13x slower in bf16
than in fp32, so "auto" picks fp32 on such CPUs.

``FOURBIT_CPU_BF16=0`` (or ``1``) overrides what is read from the CPU, as ``ATEN_CPU_CAPABILITY``
does for torch's kernels: "auto" then behaves as on a CPU without (with) native bf16. The test
suite uses it to run as on the other kind of machine; only the choice of dtype changes, not the
instructions the CPU runs.
"""

from __future__ import annotations

import functools
import os

import torch

from .errors import InputError

DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


def parse_dtype(spec: str | torch.dtype) -> torch.dtype:
    if isinstance(spec, torch.dtype):
        return spec
    try:
        return DTYPES[spec]
    except KeyError:
        raise InputError(f"unknown dtype {spec!r}; expected one of {sorted(DTYPES)} or 'auto'") from None


CPU_BF16_ENV = "FOURBIT_CPU_BF16"


def _cpu_has_native_bf16() -> bool:
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override:
        if override not in ("0", "1"):
            raise InputError(f"{CPU_BF16_ENV}={override!r}: expected 0 (no native bf16) or 1 (native bf16), or unset to detect")
        return override == "1"
    return _cpu_flags_have_bf16()


def _cpu_flags_have_bf16() -> bool:
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            line = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def cpu_kind() -> str:
    """The kind of this CPU as far as results depend on it, for benchmark records: "AMX-BF16" or
    "AVX512-BF16" (native bf16: "auto" means bf16), "AVX-512" or "AVX2" (bf16 emulated: "auto"
    means fp32; bitsandbytes also takes other kernels with AVX-512), else "other"."""
    flags = _cpu_flags()
    for flag, kind in [("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]:
        if flag in flags:
            return kind
    return "other"


def native_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return _cpu_has_native_bf16()
    return True


def resolve_compute_dtype(spec: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """"auto" -> bf16 where ``device`` computes it natively, else fp32; anything else is parsed."""
    if spec == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return parse_dtype(spec)
