"""NF4 + double-quant dequantization throughput: fourbit vs bitsandbytes vs a copy, at Llama-3-8B's linear shapes.

    python bench/bench_dequantize.py [--device cpu|cuda] [--dtype bfloat16|float16|float32]
                                     [--shapes full|small] [--repeats N] [--warmup N]
    OMP_NUM_THREADS=1 python bench/bench_dequantize.py ...   # pins torch's and bnb's OpenMP threads

Question: how fast is ``fourbit.dequantize_4bit`` (packed NF4 bytes + double-quant state ->
a dense weight) next to ``bitsandbytes.functional.dequantize_4bit`` on the same bytes?

Method
- Shapes: Llama-3-8B's linears, q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096, down
  4096x14336 (``--shapes small``: 1/4 of each side, for a quick run). Weights are randn (never zeros), quantized once with
  ``fourbit.quantize_4bit(W, "nf4", 64, double_quant=True)`` in the output dtype.
- Same inputs for both: bitsandbytes gets our state through its own
  ``QuantState.from_dict(state.to_dict())`` (our serialized form is bnb's layout), so both ops
  read identical packed bytes and identical 8-bit absmax codes. We also run bnb's quantizer on
  the same weight once and check its packed bytes equal ours (its 8-bit absmax codes may differ
  on near-ties; the count is printed).
- Before timing, ours and bnb must agree on every shape: a benchmark that compares different
  work is worthless. On the CPU they are equal bit for bit. On a GPU, our kernel may contract the
  double-quant scale's multiply-add into one FMA, so a few values may differ by one ulp of the
  output dtype (counted and printed); anything more fails the run.
- The ceiling: a device-to-device copy (``dst.copy_(src)``) of (read + written) / 2 bytes, so
  it moves as many bytes as one dequantization; "% copy" = our GB/s over the copy's.
- Timing: warm-up, then the median of N repeats. CPU: ``time.perf_counter`` around one pass
  over all the input copies, ours and bnb alternating each repeat so drift hits both alike.
  CUDA: the pass is captured in a CUDA graph and replayed between CUDA events (bench/_timing.py),
  so Python and launch overhead stay out and GPU time is measured; ``--sweep`` also times our
  kernel's other launch shapes (values per program x warps) and reports the fastest. Each call
  reads the next of several copies of the inputs, together more than 2 x 50 MB (the H100's L2),
  so no call finds its input in cache. Both ops allocate their output (and ours its temporaries)
  on every call, as a model's forward does; on a CPU VM the first touch of freshly mapped pages
  is a large share of the time (see bench/RESULTS.md).
- Bytes moved, per call:  read    = packed bytes (numel/2) + absmax bytes (nblocks, uint8)
                                    + nested bytes (nested absmax float32 + 256 + 16 float32 tables)
                          written = numel * element size of the output dtype
  GB/s = (read + written) / median time / 1e9.  ratio = bnb time / ours time (>1: we are faster).
- Output: the environment first, then one line per shape, then a short table; the table is
  also written as JSON to bench/results/dequantize-<device>.json (or $OUT when set).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from _timing import time_per_call

import fourbit
from fourbit.precision import cpu_kind, native_bf16

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
except Exception as e:  # not installed, or its native library failed to load
    bitsandbytes, bnbf, BNB_ERROR = None, None, f"{type(e).__name__}: {e}"

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ROTATE_BYTES = 2 * 50 * 2**20  # inputs cycled per shape: twice the H100's 50 MB L2


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default=None, help="output dtype (see the default below)")
    p.add_argument("--shapes", choices=["full", "small"], default="full")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per op (default 20 CPU, 200 CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls per op (default 2 CPU, 20 CUDA)")
    p.add_argument("--sweep", action="store_true", help="CUDA: also time the kernel's other launch shapes")
    return p.parse_args()


def environment(device: str) -> dict:
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else f"{cpu_model()} ({cpu_kind()})",
        "torch": torch.__version__,
        "bitsandbytes": bitsandbytes.__version__ if bitsandbytes else f"not importable ({BNB_ERROR})",
        "fourbit": fourbit.__version__,
        "threads": f"torch {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def make_inputs(rows: int, cols: int, dtype: torch.dtype, device: str, check_bnb_quantizer: bool):
    """(list of (packed, our state, bnb state or None) copies, bytes read per call, a note)."""
    weight = torch.randn(rows, cols, device=device).to(dtype)
    packed, state = fourbit.quantize_4bit(weight, quant_type="nf4", blocksize=64, double_quant=True)
    read = sum(t.numel() * t.element_size() for t in [packed, *state.tensors()])
    note = ""
    if bnbf is not None and check_bnb_quantizer:
        bnb_packed, bnb_state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        bytes_differ = (bnb_packed.view(torch.uint8).reshape(-1) != packed.reshape(-1)).sum().item()
        differ = (bnb_state.absmax != state.absmax).sum().item()
        note = (f"bnb quantizer: {bytes_differ}/{packed.numel()} packed bytes differ, "
                f"{differ}/{state.absmax.numel()} absmax codes differ")
    del weight
    copies = []
    for i in range(max(2, math.ceil(ROTATE_BYTES / read))):
        p, s = packed, state
        if i > 0:  # fresh buffers at new addresses, same bytes
            p, s = packed.clone(), fourbit.QuantState.from_dict({k: v.clone() for k, v in state.to_dict().items()})
        b = bnbf.QuantState.from_dict(s.to_dict(), device=torch.device(device)) if bnbf is not None else None
        copies.append((p, s, b))
    return copies, read, note


def timer():
    """CPU: (fn, inputs) -> seconds per call of fn over all inputs in turn."""
    def run(fn, inputs):
        t0 = time.perf_counter()
        for c in inputs:
            fn(c)
        return (time.perf_counter() - t0) / len(inputs)
    return run


def agreement(out: torch.Tensor, ref: torch.Tensor, exact: bool) -> int:
    """How many values differ (each at most one ulp of the dtype unless ``exact``); raises otherwise."""
    differ = (out != ref).sum().item()
    if exact and differ:
        raise AssertionError(f"{differ} values differ (max {(out.float() - ref.float()).abs().max()})")
    if differ:
        eps = torch.finfo(out.dtype).eps
        if not ((out.float() - ref.float()).abs() <= eps * ref.float().abs()).all():
            raise AssertionError(f"values differ by more than one ulp (max {(out.float() - ref.float()).abs().max()})")
    return differ


def bench_shape(name, rows, cols, dtype, args) -> dict:
    copies, read, note = make_inputs(rows, cols, dtype, args.device, check_bnb_quantizer=True)
    numel = rows * cols
    written = numel * torch.empty((), dtype=dtype).element_size()
    ours = lambda c: fourbit.dequantize_4bit(c[0], c[1], dtype)  # noqa: E731
    peer = lambda c: bnbf.dequantize_4bit(c[0], c[2])  # noqa: E731

    # correctness first: identical work, identical result
    out = ours(copies[0])
    assert out.dtype == dtype and tuple(out.shape) == (rows, cols)
    if bnbf is not None:
        ref = peer(copies[0])
        if ref.dtype != dtype:
            print(f"  note: bnb returned {ref.dtype}; cast to {dtype} for the comparison")
            ref = ref.to(dtype)
        differ = agreement(out, ref, exact=args.device == "cpu")
        note += f"; {differ} of {numel} values differ by one ulp" if differ else "; outputs identical"
    del out

    # the ceiling: a copy moving the same bytes (half read, half written)
    src = [torch.randint(0, 255, ((read + written) // 2,), dtype=torch.uint8, device=args.device) for _ in copies]
    dst = torch.empty_like(src[0])
    copy = lambda c: dst.copy_(c)  # noqa: E731

    ops = {"ours": (ours, copies), "bnb": (peer, copies), "copy": (copy, src)}
    if bnbf is None:
        del ops["bnb"]
    if args.device == "cpu":
        del ops["copy"]  # a memcpy on a shared VM says little; the CPU figures are ratios to bnb
    if args.device == "cuda" and args.sweep:
        from fourbit.kernels.dequantize import state_args
        from fourbit.kernels.triton.dequantize import dequantize_4bit as kernel
        for vpp in (2048, 4096, 8192, 16384):
            for warps in (4, 8):
                ops[f"sweep vpp={vpp} warps={warps}"] = (
                    lambda c, vpp=vpp, warps=warps: kernel(c[0], *state_args(c[1]), dtype,
                                                           values_per_program=vpp, num_warps=warps), copies)
    times = {key: [] for key in ops}
    if args.device == "cuda":
        for key, (fn, inputs) in ops.items():
            times[key] = [time_per_call(fn, inputs, args.repeats)[0]]
    else:
        run = timer()
        for i in range(args.warmup + args.repeats):
            for key, (fn, inputs) in ops.items():  # alternating, so drift hits all alike
                t = run(fn, inputs)
                if i >= args.warmup:
                    times[key].append(t)

    row = {"shape": name, "rows": rows, "cols": cols, "bytes_read": read, "bytes_written": written,
           "copies": len(copies), "note": note}
    for key in ops:
        t = statistics.median(times[key])
        row[f"{key}_ms"] = t * 1e3
        row[f"{key}_gbps"] = (read + written) / t / 1e9
    row["ratio_bnb_over_ours"] = row["bnb_ms"] / row["ours_ms"] if bnbf is not None else None
    sweep = {key: row.pop(f"{key}_ms") for key in ops if key.startswith("sweep")}
    for key in sweep:
        row.pop(f"{key}_gbps")
    if sweep:
        best = min(sweep, key=sweep.get)
        row["best_sweep"] = {"launch": best.removeprefix("sweep "), "ms": sweep[best],
                             "gbps": (read + written) / sweep[best] * 1e3 / 1e9}
        row["sweep_ms"] = sweep
    row["ours_pct_of_copy"] = 100 * row["ours_gbps"] / row["copy_gbps"] if "copy" in ops else None
    row["bnb_pct_of_copy"] = 100 * row["bnb_gbps"] / row["copy_gbps"] if "copy" in ops and bnbf is not None else None
    return row


def main() -> None:
    args = parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA device")
    bf16 = native_bf16(args.device)
    if args.dtype is None:
        args.dtype = "bfloat16" if bf16 else "float32"
        why = "" if bf16 else " (this CPU has no avx512_bf16/amx_bf16)"
        print(f"output dtype: {args.dtype} (default on {args.device}{why})")
    else:
        print(f"output dtype: {args.dtype} (--dtype)")
    gpu = args.device == "cuda"
    args.repeats = args.repeats or (50 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 2)
    dtype = DTYPES[args.dtype]

    env = environment(args.device)
    for k, v in env.items():
        print(f"{k:>13}: {v}")
    print(f"{'method':>13}: median of {args.repeats} after {args.warmup} warm-up, ours/bnb alternating")
    if bnbf is None:
        print(f"bitsandbytes is not importable ({BNB_ERROR}): timing ours only")

    torch.manual_seed(0)
    rows = []
    for name, (r, c) in SHAPES.items():
        if args.shapes == "small":
            r, c = r // 4, c // 4
        row = bench_shape(name, r, c, dtype, args)
        rows.append(row)
        check = row["note"].lstrip("; ") if bnbf is not None else "ours only, nothing to check against"
        print(f"{name} {r}x{c}: {row['copies']} input copies; {check}", flush=True)
        if "best_sweep" in row:
            print(f"  fastest launch: {row['best_sweep']['launch']} {row['best_sweep']['gbps']:.0f} GB/s", flush=True)

    results = {"env": env, "args": vars(args), "rows": rows}
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"dequantize-{args.device}.json"
    path.write_text(json.dumps(results, indent=2, default=str) + "\n")

    print(f"\nNF4 + double quant -> {args.dtype}, {env['device']}, {args.repeats} repeats (written to {path})")
    print(f"{'shape':<8} {'rows x cols':>12} {'ours ms':>9} {'bnb ms':>9} {'ours GB/s':>10} {'bnb GB/s':>9} "
          f"{'copy GB/s':>10} {'ours %copy':>11} {'bnb %copy':>10} {'bnb/ours':>9}")
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    for row in rows:
        dims = f"{row['rows']}x{row['cols']}"
        print(f"{row['shape']:<8} {dims:>12} {row['ours_ms']:>9.3f} {fmt(row.get('bnb_ms'), '.3f'):>9} "
              f"{row['ours_gbps']:>10.1f} {fmt(row.get('bnb_gbps'), '.1f'):>9} {fmt(row.get('copy_gbps'), '.1f'):>10} "
              f"{fmt(row['ours_pct_of_copy'], '.1f'):>11} {fmt(row['bnb_pct_of_copy'], '.1f'):>10} "
              f"{fmt(row['ratio_bnb_over_ours'], '.3f'):>9}")


if __name__ == "__main__":
    main()
