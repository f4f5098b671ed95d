"""A frozen 4-bit weight's two training products on a CPU in float32: fourbit's product that
dequantizes W inside itself (kernels/cpu/gemm_4bit.c) against dequantize-then-matmul, fourbit's
and bitsandbytes'.

    python bench/bench_train_products.py [--rows 512] [--repeats 30] [--threads 2]

Question: at a training step's shapes (SmolLM2-135M: 4 x 128 tokens; q/o 576x576, k/v 192x576,
gate/up 1536x576, down 576x1536, NF4 + double quantization in blocks of 64), how long do the
forward product y = x W^T and the input gradient dL/dx = g W take per decoder layer?
- ours:     ``Weight4bit.linear`` / ``linear_grad`` (what matmul_4bit and matmul_4bit_grad call
            for float32 and more than 32 rows), in each build this CPU runs that has them
            ("native": this machine's instruction set; "avx2": the AVX2 + FMA build);
- twin:     fourbit's dequantization (its C kernel, bit-identical to the reference) + torch's
            F.linear / matmul: the path before gemm_4bit.c, and its plain twin;
- peer:     bitsandbytes' dequantize_4bit + torch (what its Linear4bit computes on a CPU in
            float32, MatMul4Bit forward and backward), when bitsandbytes is installed; W quantized
            by bitsandbytes itself, whose absmax codes round a few ties otherwise (its error
            against fourbit's dequantized W is ~1e-3, the codes' difference, not the product's).
Method: x, g and W randn (fixed seeds); each method checked against float64 math on fourbit's
reference dequantization first (largest error relative to the largest value, printed); then
--repeats rounds, the methods in a shuffled order each round, each call timed with
time.perf_counter after one untimed call; the median per call in ms. Per layer: q, k, v, o, gate,
up once and down once each, forward + dL/dx. Ratios: the other method's time over ours
(native build; >1: ours is faster). Writes bench/results/train-products-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import fourbit
from fourbit.kernels.cpu import native
from fourbit.kernels.dequantize import dequantize_4bit, state_args
from fourbit.precision import cpu_kind
from fourbit.quant import dequantize_4bit_reference, quantize_4bit

SHAPES = {"q/o": ((576, 576), 2), "k/v": ((192, 576), 2), "gate/up": ((1536, 576), 2), "down": ((576, 1536), 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    probe = torch.zeros(args.rows, 576)
    builds = [isa for isa in native.runnable_isas() if native._trains(probe, isa)]
    if "native" not in builds:
        raise SystemExit("this machine's build has no float32 training products (FOURBIT_CPU_COMPILE=0, no "
                         "compiler, or neither AVX-512 nor AVX2)")
    try:
        import bitsandbytes.functional as bnb
    except ImportError:
        bnb = None
    print(f"{platform.machine()}, {cpu_kind()} CPU, torch {torch.__version__}, fourbit {fourbit.__version__}, "
          f"bitsandbytes {getattr(__import__('bitsandbytes'), '__version__', '-') if bnb else 'not installed'}, "
          f"{args.threads} threads, {args.rows} rows, float32")
    rows, per_layer = [], {}
    for name, ((n, k), count) in SHAPES.items():
        for row in measure(name, n, k, args, builds, bnb):
            rows.append(row)
            per_layer[row["method"]] = per_layer.get(row["method"], 0.0) + count * (row["forward_ms"] + row["grad_ms"])
    print(f"{'shape':<8} {'method':<14} {'forward ms':>10} {'GFLOP/s':>8} {'dL/dx ms':>9} {'GFLOP/s':>8} {'max rel err':>11}")
    for r in rows:
        print(f"{r['shape']:<8} {r['method']:<14} {r['forward_ms']:10.3f} {r['forward_gflops']:8.0f} "
              f"{r['grad_ms']:9.3f} {r['grad_gflops']:8.0f} {r['max_rel_error']:11.1e}")
    ours = per_layer["ours (native)"]
    print("per decoder layer (forward + dL/dx of its 7 products): "
          + ", ".join(f"{m} {t:.2f} ms ({t / ours:.2f}x ours)" for m, t in per_layer.items()))
    out = Path(__file__).resolve().parent / "results" / "train-products-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpu": cpu_kind(), "rows": rows, "per_layer_ms": per_layer},
                              indent=1))
    print(f"wrote {out}")


def measure(name: str, n: int, k: int, args, builds: list[str], bnb) -> list[dict]:
    """Each method's median forward and dL/dx times (ms) for one weight shape [n, k]."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen)
    x, g = torch.randn(args.rows, k, generator=gen), torch.randn(args.rows, n, generator=gen)
    packed, state = quantize_4bit(w, "nf4", 64, True)
    w64 = dequantize_4bit_reference(packed, state, torch.float32).double()
    weight = native.Weight4bit(packed, *state_args(state))
    methods = {f"ours ({isa})": (lambda isa=isa: weight.linear(x, None, isa),
                                 lambda isa=isa: weight.linear_grad(g, isa)) for isa in builds}
    methods["twin"] = (lambda: F.linear(x, dequantize_4bit(packed, state, torch.float32)),
                       lambda: g @ dequantize_4bit(packed, state, torch.float32))
    if bnb is not None:
        q, bnb_state = bnb.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        methods["peer"] = (lambda: F.linear(x, bnb.dequantize_4bit(q, bnb_state)),
                           lambda: g @ bnb.dequantize_4bit(q, bnb_state))
    want = (x.double() @ w64.T, g.double() @ w64)
    errors = {}
    for method, (forward, backward) in methods.items():
        got = (forward(), backward())
        errors[method] = max(((a.double() - b).abs().max() / b.abs().max()).item() for a, b in zip(got, want))
    times = {method: [] for method in methods}
    for _ in range(args.repeats):
        order = list(methods)
        random.shuffle(order)
        for method in order:
            forward, backward = methods[method]
            start = time.perf_counter()
            forward()
            middle = time.perf_counter()
            backward()
            times[method].append((middle - start, time.perf_counter() - middle))
    rows, gflop = [], 2 * args.rows * n * k / 1e9
    for method, pairs in times.items():
        fwd = statistics.median(t[0] for t in pairs) * 1e3
        bwd = statistics.median(t[1] for t in pairs) * 1e3
        rows.append({"shape": name, "method": method, "forward_ms": fwd, "grad_ms": bwd,
                     "forward_gflops": gflop / fwd * 1e3, "grad_gflops": gflop / bwd * 1e3,
                     "max_rel_error": errors[method]})
    return rows


if __name__ == "__main__":
    main()
