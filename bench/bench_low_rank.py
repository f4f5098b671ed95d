"""A LoRA adapter's rank-r products on a CPU: fourbit's C kernels (kernels/cpu/low_rank.c) against
their plain-torch twins (kernels/lora.py's torch path), in the same process.

    python bench/bench_low_rank.py [--rows 512] [--rank 16] [--widths 576,1536] [--repeats 60] [--threads 2]

Question: do the three kernels the one-node QLoRA linear calls in training beat the torch ops they
replace, at a training step's shapes (SmolLM2-135M: 4 x 128 tokens, widths 576 and 1536)?
- project: ``(x.float() @ b) * s``       x [rows, width] bf16 or float32, b [width, r]
- grad:    ``u.T @ x.float()``           u [rows, r]
- add:     ``y + (u @ v).to(y.dtype)``   y [rows, width], v [r, width]
Method: each call timed with time.perf_counter, the variants interleaved in a shuffled order per
round (this machine's speed drifts), --repeats rounds after one untimed call each; min and median
per call in ms, and the ratio twin / ours of the medians (>1: the kernel is faster). The twins'
float32 copies of x are part of what the kernels save, so they are timed with them.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time

import torch

from fourbit.kernels.cpu import native


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=512)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--widths", default="576,1536")
    p.add_argument("--repeats", type=int, default=60)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not native.supports_low_rank(torch.zeros(1, 1), torch.zeros(args.rank, 1), torch.zeros(1, args.rank)):
        raise SystemExit("the native low-rank kernels are not available here (FOURBIT_CPU_COMPILE=0, no compiler, "
                         f"or rank > {native.MAX_RANK})")
    print(f"{platform.processor() or platform.machine()}, isa {native.library().fourbit_isa().decode()}, torch "
          f"{torch.__version__}, {args.threads} threads, rows {args.rows}, rank {args.rank}")
    print(f"{'dtype':<9}{'width':>6}  {'op':<8}{'ours min/med ms':>17}{'twin min/med ms':>17}{'twin/ours':>11}")
    for dtype in (torch.bfloat16, torch.float32):
        for width in map(int, args.widths.split(",")):
            for op, (ours, twin) in time_shape(dtype, width, args).items():
                print(f"{str(dtype).removeprefix('torch.'):<9}{width:>6}  {op:<8}"
                      f"{min(ours):>8.3f}/{statistics.median(ours):<8.3f}{min(twin):>8.3f}/{statistics.median(twin):<8.3f}"
                      f"{statistics.median(twin) / statistics.median(ours):>10.2f}x")


def time_shape(dtype: torch.dtype, width: int, args) -> dict[str, tuple[list[float], list[float]]]:
    """Per op, the ms per call of ours and of the twin, interleaved in shuffled rounds."""
    x, y = torch.randn(args.rows, width).to(dtype), torch.randn(args.rows, width).to(dtype)
    b, u, v = torch.randn(width, args.rank), torch.randn(args.rows, args.rank), torch.randn(args.rank, width)
    pairs = {
        "project": (lambda: native.low_rank_project(x, b, 0.5), lambda: (x.float() @ b) * 0.5),
        "grad": (lambda: native.low_rank_grad(u, x), lambda: u.T @ x.float()),
        "add": (lambda: native.low_rank_add_(y, u, v), lambda: y + (u @ v).to(dtype)),
    }
    calls = {(op, side): fn for op, fns in pairs.items() for side, fn in zip(("ours", "twin"), fns)}
    times = {key: [] for key in calls}
    for fn in calls.values():
        fn()
    keys = list(calls)
    for _ in range(args.repeats):
        random.shuffle(keys)
        for key in keys:
            start = time.perf_counter()
            calls[key]()
            times[key].append((time.perf_counter() - start) * 1e3)
    return {op: (times[(op, "ours")], times[(op, "twin")]) for op in pairs}

if __name__ == "__main__":
    main()
