"""compute_dtype "auto": bf16 where the CPU computes it natively, fp32 where it would emulate it."""

import pytest
import torch

from fourbit import precision


def test_the_override_decides_what_auto_means(auto_means):
    auto_means("float32")
    assert precision.resolve_compute_dtype("auto", "cpu") == torch.float32
    auto_means("bfloat16")
    assert precision.resolve_compute_dtype("auto", "cpu") == torch.bfloat16
    assert precision.resolve_compute_dtype("float16", "cpu") == torch.float16  # an explicit dtype is kept


def test_without_the_override_auto_follows_the_cpu_flags(monkeypatch):
    monkeypatch.delenv(precision.CPU_BF16_ENV, raising=False)
    with open("/proc/cpuinfo") as f:  # read here, independently of precision.py's parser
        flags = set(next(line for line in f if line.startswith("flags")).split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    assert precision.native_bf16("cpu") == native
    assert precision.resolve_compute_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    assert precision.cpu_kind() == ("AMX-BF16" if "amx_bf16" in flags else "AVX512-BF16" if native
                                    else "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "other")


def test_a_bad_override_is_refused_by_name(monkeypatch):
    monkeypatch.setenv(precision.CPU_BF16_ENV, "yes")
    with pytest.raises(ValueError, match=r"FOURBIT_CPU_BF16='yes': expected 0 .* or 1"):
        precision.resolve_compute_dtype("auto", "cpu")
