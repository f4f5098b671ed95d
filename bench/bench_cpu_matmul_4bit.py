"""The 4-bit matmul on a CPU at decoding sizes: the native kernel against dequantize + matmul and the dense cache.

    python bench/bench_cpu_matmul_4bit.py [--rows 1,8,16,32,48,64,128] [--dtype bfloat16|float32] [--threads 2]
    python bench/bench_cpu_matmul_4bit.py --head [--rows 1,4,8,16] [--dtype ...]   # float32: with the 8-bit form

Question: for y = x @ W^T with W in NF4 + double quantization (blocks of 64) and x of 1 to 128
rows, how fast is the native kernel (kernels/cpu/native.c) next to what the op does past
``max_rows`` (dequantize, then F.linear; the dequantization itself is the C kernel since commit
2451489, the Inductor one before) and next to a product with the
dense weight prepacked for oneDNN (the serving engine's dense cache, nn/linear4bit.py
``dense_weights``)? Where is the crossover that sets ``MAX_ROWS`` / ``MAX_ROWS_DOT_BF16``?

Method: SmolLM2-135M's linear shapes (q/o 576x576, k/v 192x576, gate/up 1536x576, down
576x1536), W randn; x randn in --dtype. Each method is checked against float64 math first
(relative error printed; bf16 lands near 2e-3). Timing: the best of 10 rounds of 20 calls after 5
warm-up calls (the best, not the median: this shared 2-core VM's neighbours only ever add time);
all weights here fit in the caches, so the dense product is at its best, as in a loop over one
layer, not as in a model whose weights stream from memory. Table: microseconds per call. The
native kernel is timed as Linear4bit calls it, its arguments prepared once (native.Weight4bit).

--head: the 16-bit output head instead (SmolLM2's 49152 x 576, tied to the embeddings, never
quantized): the dense native kernel (``matmul_dense``, nn/dense_linear.py's DenseLinear) against
``F.linear`` (oneDNN reorders W at every call) and against W prepacked for oneDNN once (a second
copy of the head, which fourbit does not keep); 56 MB per call, so it streams from memory.
Where is the crossover that sets ``MAX_ROWS_DENSE``? W is made as a Q8_0 tensor reads (int8
codes times a float16 scale per 32, as the embedded model's head is), so that in float32 the
native kernel also runs on its 8-bit form (``matmul_q8``, which DenseLinear takes for such a
weight: quant/q8_blocks.py), a quarter of the bytes; its result is checked bit-identical to the
dense kernel's.
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import fourbit
from fourbit.kernels.cpu import native
from fourbit.kernels.dequantize import dequantize_4bit_op, state_args
from fourbit.kernels.prepacked_linear import prepack, prepacked_linear
from fourbit.precision import cpu_kind
from fourbit.quant.q8_blocks import q8_blocks

SHAPES = {"q/o": (576, 576), "k/v": (192, 576), "gate/up": (1536, 576), "down": (576, 1536)}


def best_us(fn, calls: int = 20, rounds: int = 10) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,8,16,32,48,64,128")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--head", action="store_true", help="the dense output head instead of the 4-bit linears")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    lib = native.library()
    if lib is None:
        raise SystemExit("the native kernel could not be built here (see the warning above)")
    print(f"{cpu_kind()} CPU, build {lib.fourbit_isa().decode()}, {args.threads} threads, x in {args.dtype}, "
          f"torch {torch.__version__}; max_rows({args.dtype}) = {native.max_rows(dtype)}, "
          f"MAX_ROWS_DENSE = {native.MAX_ROWS_DENSE}")
    if args.head:
        return head(args, dtype)
    print(f"{'shape':<8} {'rows':>4} {'native':>8} {'deq+mm':>8} {'dense':>8} {'deq+mm/native':>14} {'dense/native':>13}"
          f" {'error':>8}")
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        packed, state = fourbit.quantize_4bit(torch.randn(n, k), "nf4", 64, True)
        a = state_args(state)
        w = dequantize_4bit_op(packed, *a, dtype)
        dense = prepack(w)
        for rows in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(rows, k).to(dtype)
            prepared = native.Weight4bit(packed, *a)
            y = prepared.matmul(x, None)
            ref = x.double() @ w.double().T
            error = ((y.double() - ref).norm() / ref.norm()).item()
            if not error < 1e-2:
                raise AssertionError(f"{name} rows={rows}: relative error {error:.3g}")
            t_native = best_us(functools.partial(prepared.matmul, x, None))
            t_deq = best_us(lambda x=x, packed=packed, a=a: torch.nn.functional.linear(
                x, dequantize_4bit_op(packed, *a, dtype)))
            t_dense = best_us(functools.partial(prepacked_linear, x, dense, None))
            print(f"{name:<8} {rows:>4} {t_native:>8.0f} {t_deq:>8.0f} {t_dense:>8.0f} {t_deq / t_native:>14.2f} "
                  f"{t_dense / t_native:>13.2f} {error:>8.1e}", flush=True)


def head(args, dtype: torch.dtype) -> None:
    print(f"{'rows':>4} {'native':>8} {'q8':>8} {'F.linear':>9} {'prepacked':>10} {'F.linear/native':>16} "
          f"{'prepacked/native':>17} {'native/q8':>10} {'error':>8}")
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (49152, 576), dtype=torch.int8)
    codes[:, ::32] = 127  # each block's largest code, as Q8_0 makes them
    scales = (torch.rand(49152, 576 // 32) * 0.01).half().float()
    w32 = (codes.float().reshape(49152, -1, 32) * scales[..., None]).reshape(49152, 576)
    blocks = q8_blocks(w32) if dtype == torch.float32 else None  # the form DenseLinear would find
    if dtype == torch.float32 and blocks is None:
        raise AssertionError("the bench's head has no 8-bit form")
    w = w32.to(dtype)
    packed = prepack(w)
    for rows in [int(r) for r in args.rows.split(",")]:
        x = torch.randn(rows, 576).to(dtype)
        y = native.matmul_dense(x, w)
        ref = x.double() @ w.double().T
        error = ((y.double() - ref).norm() / ref.norm()).item()
        if not error < 1e-2:
            raise AssertionError(f"head rows={rows}: relative error {error:.3g}")
        t_native = best_us(functools.partial(native.matmul_dense, x, w), calls=5)
        t_linear = best_us(functools.partial(torch.nn.functional.linear, x, w), calls=5)
        t_packed = best_us(functools.partial(prepacked_linear, x, packed, None), calls=5)
        t_q8, q8 = float("nan"), "-"
        if blocks is not None:
            if not torch.equal(native.matmul_q8(x, *blocks), y):
                raise AssertionError(f"head rows={rows}: the 8-bit form's product is not the dense kernel's")
            t_q8 = best_us(functools.partial(native.matmul_q8, x, *blocks), calls=5)
            q8 = f"{t_q8:.0f}"
        print(f"{rows:>4} {t_native:>8.0f} {q8:>8} {t_linear:>9.0f} {t_packed:>10.0f} {t_linear / t_native:>16.2f} "
              f"{t_packed / t_native:>17.2f} {t_native / t_q8:>10.2f} {error:>8.1e}", flush=True)


if __name__ == "__main__":
    main()
