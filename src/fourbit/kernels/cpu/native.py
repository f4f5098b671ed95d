"""CPU kernels in C: the 4-bit table lookup in vector registers, for the two 4-bit ops, and the
dense product of a few rows.

    matmul_4bit:     y[m, n] = sum_b sum_{k in block b} (code4[W4[n, k]] * scale[n, b]) * x[m, k]
                     for a few rows of x (decoding), the codes read once, the sums float32
    dequantize_4bit: W[v] = float32(code4[W4[v]] * scale[v // blocksize]), in float32 or bf16:
                     bit-identical to the reference
    matmul_dense:    y[m, n] = sum_k W[n, k] * x[m, k] for a 16-bit or float32 W read in place
                     (the output head while decoding: nn/dense_linear.py), the sums float32;
    matmul_q8:       the same for a float32 W that is exactly int8 codes times a scale per 32
                     (quant/q8_blocks.py), read as those: bit-identical, a quarter of the bytes
    rms_norm, rotate_, decode_attention: the small per-layer steps of decoding a token
                     (serve/decode_step.py), each one call (decode.c; their twins in
                     kernels/rms_norm.py, rotary.py, decode_attention.py)
    DecodeLayer:     a decoder layer of 4-bit products strung from those kernels in C
                     (decode_layer.c), two calls a layer a token; its twin is the decode step
                     op by op
    low_rank_project, low_rank_grad, low_rank_add_: a LoRA adapter's rank-r products in
                     training (low_rank.c), reading 16-bit activations in place; their twins
                     are kernels/lora.py's torch path
    Weight4bit.linear, linear_grad: y = x W^T + b and dL/dx = g W in float32 for many rows
                     (training), W dequantized inside the product (gemm_4bit.c); their twins
                     are dequantize-then-matmul (kernels/matmul_4bit.py)

The code is native.c, decode.c, decode_layer.c, low_rank.c and gemm_4bit.c beside this file (the math and the
instruction choices at their tops, bf16.h the conversions, kernels.h what they share), built into one library
at first use for this machine's instruction set with the system's C compiler and OpenMP, cached
under ``<fourbit cache>/kernels`` by a hash of the sources, the flags, the compiler and the CPU's
flags, and called through ctypes (which releases the GIL). Its OpenMP
runtime (libgomp.so.1) resolves to the one torch has already loaded: one thread pool, sized per
call by ``torch.get_num_threads()``. The plain-torch twins are the reference dequantization
(quant/four_bit.py), dequantize-then-``F.linear`` (kernels/matmul_4bit.py) and ``F.linear``; the
kernels are tested against them and against float64 math (tests/kernels/test_cpu_native.py).

Why kernels of our own: decoding reads every weight once per token, so from the dense cache the
bytes are 16 bits a weight, and from the 4-bit codes through dequantize-then-matmul each product
first writes and reads a dense copy. torch.compile's CPU code for the fused product measured 4x
(a tree of selects for the lookup) to 30x (a gather) slower than the dense bf16 product, and its
dequantization (kernels/cpu/dequantize.py) gathers one value at a time, 5-6x slower than this
one (bench/RESULTS.md, issue 20); no torch op takes a non-uniform 4-bit table.

When they are used: the matmul (``supports``) on a CPU for at most ``max_rows`` rows of x (32;
16 in bf16 on AVX512-BF16, where oneDNN's bf16 matmul is fast; past that, one dequantization
shared by all rows and oneDNN's matmul are faster: bench/bench_cpu_matmul_4bit.py), the dequantization
(``supports_dequantize``) for whole blocks into float32 or bf16; both for block sizes that are
multiples of 32 (every one of the format's, 32 to 4096); the dense product (``supports_dense``) for
at most ``MAX_ROWS_DENSE`` rows of x; the training products (``supports_training``) for float32
x of more than ``MAX_ROWS`` rows in the AVX-512 and AVX2 builds. ``FOURBIT_CPU_COMPILE=0`` turns them off
with the other kernels compiled at run time (kernels/cpu/dequantize.py). Where compiling or
loading fails the reason is logged once and the twins serve every call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch.nn import functional as F

from ...errors import InputError
from .dequantize import ENV

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).with_name(name)  # one library
                for name in ("native.c", "decode.c", "decode_layer.c", "low_rank.c", "gemm_4bit.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("bf16.h", "kernels.h"))
MAX_ROWS = 32  # float32 FMAs: 1.5-2x dequantize + matmul at 32 rows (bench/bench_cpu_matmul_4bit.py)
MAX_ROWS_DOT_BF16 = 16  # vdpbf16ps: 1.2-2.2x the C dequantize + matmul at 16 rows, behind it from 24 on the big shapes
MAX_ROWS_DENSE = 8  # against F.linear (which reorders W per call) on SmolLM2's 49152 x 576 head: 2.8x (bf16)
# and 3.5x (float32) at 1 row, 1.2-1.8x at 8, behind or even at 16 (bench_cpu_matmul_4bit.py --head)
ISA_FLAGS = {  # "native": what this machine has; the others let tests run each code path
    "native": ["-march=native"],
    "avx2": ["-mavx2", "-mfma"],
    "generic": [],
}
_lock = threading.Lock()
_failed: set[str] = set()
_loaded: dict[str, ctypes.CDLL] = {}


def enabled() -> bool:
    """``FOURBIT_CPU_COMPILE`` (kernels/cpu/dequantize.py) is not 0."""
    value = os.environ.get(ENV)
    if value is None or value == "1":  # asked at every decoding product: the common answers first
        return True
    value = value.strip()
    if value not in ("0", "1"):
        raise InputError(f"{ENV}={value!r}: expected 1 (compile the CPU kernels, the default) or 0 (don't)")
    return value == "1"


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return platform.processor()


def runnable_isas() -> list[str]:
    """The builds this CPU can run: its own ("native"), plain C, and AVX2 where it has AVX2 and FMA
    (tests run each)."""
    flags = set(_cpu_flags().partition(":")[2].split())
    return ["native", "generic"] + (["avx2"] if {"avx2", "fma"} <= flags else [])


def _cache_dir() -> Path:  # io/default_model.cache_dir()'s folder (kernels/ sits below io/)
    configured = os.environ.get("FOURBIT_CACHE")
    return (Path(configured) if configured else Path.home() / ".cache" / "fourbit") / "kernels"


def _build(isa: str, compiler: str) -> Path:
    """Compile the kernel for ``isa`` (once per source, flags, compiler and CPU) and return the library's path."""
    flags = ["-O3", "-std=c11", "-ffp-contract=off", "-shared", "-fPIC", "-fopenmp", *ISA_FLAGS[isa]]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\0".join([*texts, *flags, compiler, version, _cpu_flags()]).encode()).hexdigest()
    target = _cache_dir() / f"native-{isa}-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # built aside, renamed into place whole
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *flags, *map(str, SOURCES), "-lm", "-o", str(built)], capture_output=True,
                              text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


@functools.cache
def _library(isa: str) -> ctypes.CDLL:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC, or install cc/gcc)")
    lib = ctypes.CDLL(str(_build(isa, compiler)))
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.fourbit_matmul_4bit.argtypes = [p, p, p, i32, i64, i32]
    lib.fourbit_matmul_4bit.restype = i32
    lib.fourbit_matmul_4bit_many.argtypes = [p, i32, p, p, i32, i64, i32]
    lib.fourbit_matmul_4bit_many.restype = i32
    lib.fourbit_dequantize_4bit.argtypes = [p, p, i32, i32]
    lib.fourbit_dequantize_4bit.restype = i32
    lib.fourbit_matmul_dense.argtypes = [p, p, p, p, i32, i64, i64, i64, i32]
    lib.fourbit_matmul_dense.restype = i32
    f32 = ctypes.c_float
    lib.fourbit_rms_norm.argtypes = [p, p, p, i64, i64, f32, i32]
    lib.fourbit_rms_norm.restype = None
    lib.fourbit_rms_norm_backward.argtypes = [p, p, p, p, i64, i64, f32, i32, i32]
    lib.fourbit_rms_norm_backward.restype = i32
    lib.fourbit_rotate.argtypes = [p, p, p, p, i64, i64, i64, i64, i32]
    lib.fourbit_rotate.restype = None
    lib.fourbit_decode_attention.argtypes = [p, p, p, p, p, *[i64] * 11, f32, i32, i32]
    lib.fourbit_decode_attention.restype = i32
    lib.fourbit_layer_in.argtypes = [p, p, p, p, p, i64, i32, i32]
    lib.fourbit_layer_in.restype = i32
    lib.fourbit_layer_out.argtypes = [p, p, p, p, p, p, *[i64] * 8, i32, i32]
    lib.fourbit_layer_out.restype = i32
    lib.fourbit_low_rank_project.argtypes = [p, p, p, i64, i64, i64, i64, f32, i32, i32]
    lib.fourbit_low_rank_project.restype = i32
    lib.fourbit_low_rank_grad.argtypes = [p, p, p, i64, i64, i64, i32, i32]
    lib.fourbit_low_rank_grad.restype = None
    lib.fourbit_low_rank_add.argtypes = [p, p, p, i64, i64, i64, i32, i32]
    lib.fourbit_low_rank_add.restype = None
    lib.fourbit_linear_4bit.argtypes = [p, p, p, p, i64, i32]
    lib.fourbit_linear_4bit.restype = i32
    lib.fourbit_linear_4bit_grad.argtypes = [p, p, p, i64, i32]
    lib.fourbit_linear_4bit_grad.restype = i32
    lib.fourbit_gemm_4bit_built.restype = i32
    lib.fourbit_isa.restype = ctypes.c_char_p
    lib.dot_bf16 = lib.fourbit_isa() == b"avx512-bf16"
    return lib


class _Weight4bitStruct(ctypes.Structure):  # native.c's weight_4bit, field for field
    _fields_ = [("packed", ctypes.c_void_p), ("absmax", ctypes.c_void_p), ("absmax8", ctypes.c_void_p),
                ("nested_code", ctypes.c_void_p), ("nested_absmax", ctypes.c_void_p), ("offset", ctypes.c_float),
                ("nested_shift", ctypes.c_int), ("code", ctypes.c_void_p), ("n", ctypes.c_int64),
                ("k", ctypes.c_int64), ("blocksize", ctypes.c_int64)]


def library(isa: str = "native") -> ctypes.CDLL | None:
    """The compiled kernel for ``isa``, or None where it cannot be built or loaded (said once)."""
    if isa not in ISA_FLAGS:
        raise InputError(f"isa {isa!r}: expected one of {', '.join(ISA_FLAGS)}")
    lib = _loaded.get(isa)  # asked at every decoding product: no lock once loaded
    if lib is not None:
        return lib
    if isa in _failed:
        return None
    with _lock:
        try:
            lib = _loaded[isa] = _library(isa)
            return lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            _failed.add(isa)
            log.warning("fourbit: the native CPU kernels (%s) are unavailable, their plain-torch twins "
                        "(dequantize + matmul, ...) serve instead: %s", isa, e)
            return None


def max_rows(dtype: torch.dtype) -> int:
    """The most rows of x this machine's build takes in ``dtype`` (where it beats dequantize + matmul)."""
    lib = library()
    if lib is None:
        return 0
    return MAX_ROWS_DOT_BF16 if dtype == torch.bfloat16 and lib.dot_bf16 else MAX_ROWS


class Weight4bit:
    """One 4-bit weight as the C functions take it: the codes contiguous, the scales' tensors in
    float32, and the pointers into them, prepared once and kept alive with them.

    A decoded token calls the matmul about 200 times (SmolLM2: 7 products x 30 layers); preparing
    the arguments at every call cost a sixth of the token in Python (bench/RESULTS.md, issue 20),
    so a layer that decodes keeps one of these (Linear4bit does) and only x and y change per call.
    """

    def __init__(self, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                 shape):
        self.packed = packed.contiguous()
        if nested_absmax is not None:
            self._keep = (None, absmax.contiguous(), nested_code.to(torch.float32).contiguous(),
                          nested_absmax.to(torch.float32).contiguous())
            offset = float(nested_offset)
        else:
            self._keep = (absmax.to(torch.float32).contiguous(), None, None, None)
            offset = 0.0
        self._code = code.to(torch.float32).contiguous()
        absmax32, absmax8, nested_code32, nested_absmax32 = (t.data_ptr() if t is not None else None for t in self._keep)
        self.n, self.k = shape
        self.blocksize = blocksize
        self._struct = _Weight4bitStruct(self.packed.data_ptr(), absmax32, absmax8, nested_code32, nested_absmax32,
                                         offset, max(nested_blocksize, 1).bit_length() - 1, self._code.data_ptr(),
                                         self.n, self.k, blocksize)
        self._address = ctypes.addressof(self._struct)
        # what does not depend on x (supports() checks the rest per call)
        self.fits = blocksize % 32 == 0 and self.k % blocksize == 0 and nested_blocksize & (nested_blocksize - 1) == 0

    def takes(self, x: torch.Tensor) -> bool:
        """Whether the matmul serves ``x`` (else: dequantize, then matmul); see :func:`supports`."""
        return self.fits and _takes(x, self.k)

    def dequantizes(self, dtype: torch.dtype) -> bool:
        """Whether ``dequantize`` serves ``dtype``; see :func:`supports_dequantize`."""
        return self.fits and dtype in (torch.float32, torch.bfloat16) and enabled() and library() is not None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, isa: str = "native") -> torch.Tensor:
        """``x @ dequant(W)^T + bias`` in x's dtype."""
        lib = library(isa)
        if lib is None:
            raise RuntimeError(f"the native CPU 4-bit matmul ({isa}) is unavailable; check supports() first")
        given = x.dtype
        if given not in (torch.float32, torch.bfloat16):
            x = x.float()
        x = x.contiguous()
        out = torch.empty((*x.shape[:-1], self.n), dtype=x.dtype)  # [..., n]: rows as x has them
        rows = x.numel() // self.k
        if lib.fourbit_matmul_4bit(self._address, x.data_ptr(), out.data_ptr(), x.dtype == torch.bfloat16, rows,
                                   torch.get_num_threads()):
            raise MemoryError(f"the native CPU 4-bit matmul could not allocate its scratch for {rows} x {self.k} inputs")
        if bias is not None:
            out += bias
        return out if given == out.dtype else out.to(given)

    def trains(self, x: torch.Tensor, isa: str = "native") -> bool:
        """Whether ``linear`` serves ``x`` [..., k] (``linear_grad``: dL/dy [..., n]): float32 on a
        CPU, more rows than the few-row matmul takes, a build with the blocked product (gemm_4bit.c)."""
        return self.fits and _trains(x, isa)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None, isa: str = "native") -> torch.Tensor:
        """``x @ dequant(W)^T + bias`` (float32), W dequantized inside the product; see ``trains``."""
        x = x.contiguous()
        rows = x.numel() // self.k
        out = torch.empty((*x.shape[:-1], self.n), dtype=torch.float32)
        bias = None if bias is None else bias.to(torch.float32).contiguous()
        if library(isa).fourbit_linear_4bit(self._address, x.data_ptr(), None if bias is None else bias.data_ptr(),
                                            out.data_ptr(), rows, torch.get_num_threads()):
            raise MemoryError(f"the native CPU 4-bit product could not allocate its scratch for a {self.n} x {self.k} "
                              "weight")
        return out

    def linear_grad(self, grad: torch.Tensor, isa: str = "native") -> torch.Tensor:
        """``grad @ dequant(W)`` (float32): dL/dx of ``linear``, W dequantized inside the product."""
        grad = grad.contiguous()
        rows = grad.numel() // self.n
        out = torch.empty((*grad.shape[:-1], self.k), dtype=torch.float32)
        if library(isa).fourbit_linear_4bit_grad(self._address, grad.data_ptr(), out.data_ptr(), rows,
                                                 torch.get_num_threads()):
            raise MemoryError(f"the native CPU 4-bit product could not allocate its scratch for a {self.n} x {self.k} "
                              "weight")
        return out

    def dequantize(self, dtype: torch.dtype, isa: str = "native") -> torch.Tensor:
        """The dense weight [n, k] in ``dtype`` (float32 or bf16), bit-identical to the reference."""
        lib = library(isa)
        if lib is None:
            raise RuntimeError(f"the native CPU 4-bit kernels ({isa}) are unavailable; check supports_dequantize() "
                               "first")
        out = torch.empty(self.n, self.k, dtype=dtype)
        lib.fourbit_dequantize_4bit(self._address, out.data_ptr(), dtype == torch.bfloat16, torch.get_num_threads())
        return out


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_LITTLE_ENDIAN = sys.byteorder == "little"


def _takes(x: torch.Tensor, k: int) -> bool:
    return (_LITTLE_ENDIAN and x.dtype in _DTYPES and x.device.type == "cpu" and x.shape[-1] == k
            and 0 < x.numel() <= k * max_rows(x.dtype) and enabled())


class Weight4bitGroup:
    """Weights that share their input (a layer's q, k and v projections), for one native call:
    ``matmul(x)`` -> [x @ W_i^T for each]. Holds the weights (and so their prepared arguments)."""

    def __init__(self, weights: tuple[Weight4bit, ...]):
        if len({w.k for w in weights}) != 1 or not all(w.fits for w in weights):
            raise InputError("a Weight4bitGroup's weights must take the same input width, in a layout the kernel takes")
        self.weights, self.k = weights, weights[0].k
        self.sizes = [w.n for w in weights]
        self.starts = [sum(self.sizes[:i]) for i in range(len(weights) + 1)]
        self._array = (ctypes.c_void_p * len(weights))(*(w._address for w in weights))

    def matmul(self, x: torch.Tensor, isa: str = "native") -> list[torch.Tensor]:
        """Each weight's ``x @ W^T`` in x's dtype (float32 or bf16; see ``takes_rows``)."""
        x = x.contiguous()
        rows, starts = x.numel() // self.k, self.starts
        out = torch.empty(rows * starts[-1], dtype=x.dtype)
        if library(isa).fourbit_matmul_4bit_many(self._array, len(self.weights), x.data_ptr(), out.data_ptr(),
                                                 x.dtype == torch.bfloat16, rows, torch.get_num_threads()):
            raise MemoryError(f"the native CPU 4-bit matmul could not allocate its scratch for {rows} x {self.k} inputs")
        shape = x.shape[:-1]
        return [out[rows * starts[i]:rows * starts[i + 1]].view(*shape, n) for i, n in enumerate(self.sizes)]


def _trains(x: torch.Tensor, isa: str = "native") -> bool:
    if x.dtype != torch.float32 or x.device.type != "cpu" or x.numel() <= x.shape[-1] * MAX_ROWS:
        return False
    lib = library(isa) if _LITTLE_ENDIAN and enabled() else None
    return lib is not None and lib.fourbit_gemm_4bit_built() == 1


def supports_training(x: torch.Tensor, blocksize: int, nested_blocksize: int, k: int) -> bool:
    """Whether ``Weight4bit.linear`` / ``linear_grad`` take x (or dL/dy) for a weight of ``k``
    columns in this layout: float32 on a CPU, more than ``MAX_ROWS`` rows, an AVX-512 or AVX2 build."""
    return blocksize % 32 == 0 and k % blocksize == 0 and nested_blocksize & (nested_blocksize - 1) == 0 and _trains(x)


def takes_rows(x: torch.Tensor) -> bool:
    """Whether the 4-bit matmul takes x's dtype, device and number of rows (for any weight of
    x.shape[-1] columns whose layout it takes: ``Weight4bit.fits``)."""
    return _takes(x, x.shape[-1])


def supports(x: torch.Tensor, blocksize: int, nested_blocksize: int, k: int) -> bool:
    """Whether this product goes to the native kernel (else: dequantize, then matmul)."""
    return blocksize % 32 == 0 and k % blocksize == 0 and nested_blocksize & (nested_blocksize - 1) == 0 and _takes(x, k)


def matmul_4bit(x, packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize, shape,
                bias, isa: str = "native") -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` in x's dtype, for the op's arguments (kernels/matmul_4bit.py)."""
    weight = Weight4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                        shape)
    return weight.matmul(x, bias, isa)


def supports_dense(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``matmul_dense`` takes this product: a CPU weight [n, k] in x's dtype (float32 or
    bf16), at most ``MAX_ROWS_DENSE`` rows of x."""
    return (x.device.type == "cpu" and weight.device.type == "cpu" and x.dtype == weight.dtype
            and x.dtype in (torch.float32, torch.bfloat16) and weight.dim() == 2 and x.shape[-1] == weight.shape[1]
            and 0 < x.numel() // max(weight.shape[1], 1) <= MAX_ROWS_DENSE and _LITTLE_ENDIAN
            and enabled() and library() is not None)


DENSE_F32, DENSE_BF16, DENSE_Q8 = 0, 1, 2  # native.c's forms of W for fourbit_matmul_dense


def matmul_dense(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 isa: str = "native") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` read straight from ``weight`` (no reorder), float32 sums; see ``supports_dense``."""
    n, k = weight.shape
    form = DENSE_BF16 if x.dtype == torch.bfloat16 else DENSE_F32
    return _matmul_dense(x, weight.contiguous(), None, form, n, k, bias, isa)


def matmul_q8(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None,
              isa: str = "native") -> torch.Tensor:
    """``F.linear(x, W, bias)`` for the float32 W [n, k] whose values are ``codes`` [n, k] (int8)
    times ``scales`` [n, k / 32] (float32), one per block of 32 (quant/q8_blocks.py), read in that
    form: a quarter of W's bytes. Bit-identical to ``matmul_dense`` on W. x float32, at most
    ``MAX_ROWS_DENSE`` rows (``supports_dense`` on x and W)."""
    n, k = codes.shape
    if codes.dtype != torch.int8 or scales.dtype != torch.float32 or k % 32 or scales.shape != (n, k // 32):
        raise InputError(f"matmul_q8 takes int8 codes [n, k] (k a multiple of 32) and float32 scales [n, k / 32]; "
                         f"got {codes.dtype} {tuple(codes.shape)} and {scales.dtype} {tuple(scales.shape)}")
    if x.dtype != torch.float32:
        raise InputError(f"matmul_q8 takes float32 x, got {x.dtype}")
    return _matmul_dense(x, codes.contiguous(), scales.contiguous(), DENSE_Q8, n, k, bias, isa)


def _matmul_dense(x, weight, scales, form, n, k, bias, isa) -> torch.Tensor:
    lib = library(isa)
    if lib is None:
        raise RuntimeError(f"the native CPU kernels ({isa}) are unavailable; check supports_dense() first")
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty(x2.shape[0], n, dtype=x.dtype)
    if lib.fourbit_matmul_dense(weight.data_ptr(), None if scales is None else scales.data_ptr(), x2.data_ptr(),
                                out.data_ptr(), form, x2.shape[0], n, k, torch.get_num_threads()):
        raise MemoryError(f"the native CPU dense matmul could not allocate its scratch for {x2.shape[0]} x {n} outputs")
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], n)


def supports_dequantize(numel: int, blocksize: int, nested_blocksize: int, dtype: torch.dtype) -> bool:
    """Whether ``dequantize_4bit`` takes this weight: whole blocks (of the format's sizes), float32 or bf16 out."""
    return (dtype in (torch.float32, torch.bfloat16) and blocksize % 32 == 0 and numel % blocksize == 0
            and numel > 0 and nested_blocksize & (nested_blocksize - 1) == 0 and sys.byteorder == "little"
            and enabled() and library() is not None)


def dequantize_4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                    shape, dtype, isa: str = "native") -> torch.Tensor:
    """The dense weight for the dequantize op's arguments (kernels/dequantize.py), bit-identical to the reference."""
    weight = Weight4bit(packed, absmax, code, nested_absmax, nested_code, nested_offset, blocksize, nested_blocksize,
                        (math.prod(shape) // shape[-1], shape[-1]))
    return weight.dequantize(dtype, isa).reshape(shape)


def supports_decode(*tensors: torch.Tensor) -> bool:
    """Whether the decoding kernels (decode.c: rms_norm, rotate, decode_attention) take these
    tensors: on a CPU, one dtype, float32 or bf16, the kernels built."""
    dtype = tensors[0].dtype  # asked a few times a layer of a decoded token: no generator, cheap checks first
    if dtype is not torch.float32 and dtype is not torch.bfloat16:
        return False
    for t in tensors:
        if t.dtype is not dtype or t.device.type != "cpu":
            return False
    return _LITTLE_ENDIAN and enabled() and library() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, isa: str = "native") -> torch.Tensor:
    """kernels/rms_norm.py's norm over x's last dimension; see ``supports_decode``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    library(isa).fourbit_rms_norm(x.data_ptr(), weight.contiguous().data_ptr(), out.data_ptr(), x.numel() // n, n, eps,
                                  x.dtype == torch.bfloat16)
    return out


def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, eps: float,
                      isa: str = "native") -> torch.Tensor:
    """dL/dx of ``rms_norm(x, weight, eps)`` given dL/dy (``grad``), weight frozen; see ``supports_decode``."""
    x, grad = x.contiguous(), grad.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    if library(isa).fourbit_rms_norm_backward(x.data_ptr(), weight.contiguous().data_ptr(), grad.data_ptr(),
                                              out.data_ptr(), x.numel() // n, n, eps, x.dtype == torch.bfloat16,
                                              torch.get_num_threads()):
        raise MemoryError(f"the native CPU RMS norm's gradient could not allocate its scratch for {n} values")
    return out


def rotate_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, isa: str = "native") -> None:
    """kernels/rotary.py's rotation of q [rows, q_heads, d] and k [rows, k_heads, d] (contiguous),
    in place, by cos and sin (rows x d values each, any shape); see ``supports_decode``."""
    rows, q_heads, d = q.shape
    if not (cos.is_contiguous() and sin.is_contiguous()):
        cos, sin = cos.contiguous(), sin.contiguous()
    library(isa).fourbit_rotate(q.data_ptr(), k.data_ptr(), cos.data_ptr(), sin.data_ptr(), rows, q_heads, k.shape[1], d,
                                q.dtype == torch.bfloat16)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
                     isa: str = "native") -> torch.Tensor:
    """kernels/decode_attention.py's attention of one new token per row: q [rows, q_heads, d]
    (contiguous), keys and values [rows, kv_heads, length, d] (head_dim contiguous), mask
    [rows, length] (nonzero: kept) or None; out [rows, q_heads, d]. See ``supports_decode``."""
    rows, q_heads, d = q.shape
    _, kv_heads, length, _ = keys.shape
    mask = mask.to(torch.int64).contiguous() if mask is not None else None
    out = torch.empty_like(q)
    if library(isa).fourbit_decode_attention(q.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                             mask.data_ptr() if mask is not None else None, out.data_ptr(), rows,
                                             q_heads, kv_heads, length, d, *keys.stride()[:3], *values.stride()[:3],
                                             scale, q.dtype == torch.bfloat16, torch.get_num_threads()):
        raise MemoryError(f"the native CPU decode attention could not allocate its scratch for {length} positions")
    return out


MAX_RANK = 64  # low_rank.c against torch's float32 GEMMs: faster at 16 and 64 (bench/bench_low_rank.py); past
# that a GEMM's cache blocking should win, and none was measured


def supports_low_rank(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> bool:
    """Whether the rank-r products (low_rank.c) take an activation ``x`` (float32 or bf16) with an
    adapter's A [r, in] and B [out, r] (float32, r <= MAX_RANK), all on a CPU."""
    if x.dtype is not torch.float32 and x.dtype is not torch.bfloat16 or x.device.type != "cpu":
        return False
    for f in (lora_a, lora_b):
        if f.dtype is not torch.float32 or f.device.type != "cpu" or f.dim() != 2:
            return False
    return (lora_a.shape[0] == lora_b.shape[1] <= MAX_RANK and _LITTLE_ENDIAN and enabled()
            and library() is not None)


def low_rank_project(x: torch.Tensor, b: torch.Tensor, scale: float, isa: str = "native") -> torch.Tensor:
    """``(x.float() @ b) * scale`` (float32 [..., r]) for x [..., k] and b [k, r], x read in its
    own dtype; see ``supports_low_rank``."""
    k, r = b.shape
    padded = -r % 16  # the kernel reads b in whole vectors of 16 columns
    b = F.pad(b, (0, padded)) if padded else b.contiguous()
    x2 = x.reshape(-1, k).contiguous()
    out = torch.empty(*x.shape[:-1], r, dtype=torch.float32)
    if library(isa).fourbit_low_rank_project(x2.data_ptr(), b.data_ptr(), out.data_ptr(), x2.shape[0], k, r, r + padded,
                                             scale, x.dtype == torch.bfloat16, torch.get_num_threads()):
        raise MemoryError(f"the native CPU low-rank projection could not allocate its scratch for {k} columns")
    return out


def low_rank_grad(u: torch.Tensor, x: torch.Tensor, isa: str = "native") -> torch.Tensor:
    """``u^T @ x.float()`` (float32 [r, k]) for u [..., r] float32 and x [..., k] over the same
    rows, x read in its own dtype; see ``supports_low_rank``."""
    r, k = u.shape[-1], x.shape[-1]
    u2, x2 = u.reshape(-1, r).contiguous(), x.reshape(-1, k).contiguous()
    out = torch.empty(r, k, dtype=torch.float32)
    library(isa).fourbit_low_rank_grad(u2.data_ptr(), x2.data_ptr(), out.data_ptr(), x2.shape[0], k, r,
                                       x.dtype == torch.bfloat16, torch.get_num_threads())
    return out


def low_rank_add_(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, isa: str = "native") -> torch.Tensor:
    """``y + (u @ v).to(y.dtype)`` into y (contiguous, float32 or bf16, [..., n]) for u [..., r]
    float32 and v [r, n] float32; returns y. See ``supports_low_rank``."""
    r, n = v.shape
    if not y.is_contiguous():
        raise InputError("low_rank_add_ writes into y in place: y must be contiguous")
    u2 = u.reshape(-1, r).contiguous()
    library(isa).fourbit_low_rank_add(y.data_ptr(), u2.data_ptr(), v.contiguous().data_ptr(), u2.shape[0], n, r,
                                      y.dtype == torch.bfloat16, torch.get_num_threads())
    return y


PRODUCTS = ("q", "k", "v", "o", "gate", "up", "down")  # a decoder layer's 4-bit products, decode_layer.c's order


class _DecodeLayerStruct(ctypes.Structure):  # decode_layer.c's decode_layer, field for field
    _fields_ = ([(name, ctypes.c_void_p) for name in PRODUCTS] + [(f"{name}_bias", ctypes.c_void_p) for name in PRODUCTS]
                + [(name, ctypes.c_void_p) for name in ("in_norm", "post_norm", "q_norm", "k_norm")]
                + [(name, ctypes.c_float) for name in ("in_eps", "post_eps", "q_eps", "k_eps", "scaling")]
                + [(name, ctypes.c_int64) for name in ("heads", "kv_heads", "head_dim", "hidden", "intermediate")])


class DecodeLayer:
    """A decoder layer whose seven products are 4-bit, as decode_layer.c takes it: one new token
    per row in two calls (``layer_in`` before the cache's append, ``layer_out`` after), the
    pointers prepared once. Holds every tensor it points into.

    ``weights``: the prepared Weight4bit of each of PRODUCTS; ``biases``: each product's bias or
    None; ``norms``: (weight, eps) of the input and post-attention norms, then of q's and k's
    per-head norms or None; every tensor in the one dtype the layer computes in (float32 or bf16).
    """

    def __init__(self, weights: dict, biases: dict, norms: tuple, heads: int, kv_heads: int, head_dim: int,
                 scaling: float, dtype: torch.dtype):
        (in_norm, in_eps), (post_norm, post_eps), q_norm, k_norm = norms
        q_norm, q_eps = q_norm if q_norm is not None else (None, 0.0)
        k_norm, k_eps = k_norm if k_norm is not None else (None, 0.0)
        tensors = {**{f"{name}_bias": biases.get(name) for name in PRODUCTS}, "in_norm": in_norm,
                   "post_norm": post_norm, "q_norm": q_norm, "k_norm": k_norm}
        if any(t is not None and (t.dtype != dtype or t.device.type != "cpu") for t in tensors.values()):
            raise InputError(f"a DecodeLayer's biases and norms must all be {dtype} CPU tensors")
        self._keep = {name: t.contiguous() for name, t in tensors.items() if t is not None}
        self.weights = tuple(weights[name] for name in PRODUCTS)
        hidden, intermediate = weights["o"].n, weights["gate"].n
        self.dtype, self.heads, self.kv_heads, self.head_dim = dtype, heads, kv_heads, head_dim
        self._struct = _DecodeLayerStruct(
            *(w._address for w in self.weights),
            *(self._keep[f"{name}_bias"].data_ptr() if f"{name}_bias" in self._keep else None for name in PRODUCTS),
            *(self._keep[name].data_ptr() if name in self._keep else None
              for name in ("in_norm", "post_norm", "q_norm", "k_norm")),
            in_eps, post_eps, q_eps, k_eps, scaling, heads, kv_heads, head_dim, hidden, intermediate)
        self._address = ctypes.addressof(self._struct)
        self._bf16 = dtype == torch.bfloat16

    def layer_in(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, isa: str = "native"):
        """q [rows, heads, d], k and v [rows, kv_heads, 1, d] of x [rows, 1, hidden] (contiguous),
        q and k rotated by cos, sin [rows, d] (contiguous)."""
        rows, d = x.shape[0], self.head_dim
        nq, nk = self.heads * d, self.kv_heads * d
        qkv = torch.empty(rows * (nq + 2 * nk), dtype=self.dtype)
        if library(isa).fourbit_layer_in(self._address, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), qkv.data_ptr(),
                                         rows, self._bf16, torch.get_num_threads()):
            raise MemoryError(f"the native CPU decoder layer could not allocate its scratch for {rows} rows")
        q = qkv[:rows * nq].view(rows, self.heads, d)
        k = qkv[rows * nq:rows * (nq + nk)].view(rows, self.kv_heads, 1, d)
        return q, k, qkv[rows * (nq + nk):].view(rows, self.kv_heads, 1, d)

    def layer_out(self, x: torch.Tensor, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                  mask: torch.Tensor | None, isa: str = "native") -> None:
        """x [rows, 1, hidden] (contiguous) advanced through attention over keys and values
        [rows, kv_heads, length, d] (head_dim contiguous; mask as decode_attention takes it) and the
        MLP, in place."""
        rows, length = x.shape[0], keys.shape[2]
        if mask is not None:
            mask = mask.to(torch.int64).contiguous()
        if library(isa).fourbit_layer_out(self._address, x.data_ptr(), q.data_ptr(), keys.data_ptr(), values.data_ptr(),
                                          mask.data_ptr() if mask is not None else None, length, *keys.stride()[:3],
                                          *values.stride()[:3], rows, self._bf16, torch.get_num_threads()):
            raise MemoryError(f"the native CPU decoder layer could not allocate its scratch for {length} positions")


__all__ = ["runnable_isas", "ENV", "MAX_ROWS", "MAX_ROWS_DOT_BF16", "Weight4bit", "enabled", "library", "matmul_4bit",
           "max_rows", "supports", "supports_dequantize", "dequantize_4bit", "MAX_ROWS_DENSE", "matmul_dense",
           "supports_dense", "supports_decode", "rms_norm", "rms_norm_backward", "rotate_", "decode_attention", "takes_rows",
           "Weight4bitGroup", "DecodeLayer", "PRODUCTS", "MAX_RANK", "supports_low_rank", "low_rank_project",
           "low_rank_grad", "low_rank_add_"]
