"""4-bit weight x activation matmul at decode-sized batches: fourbit vs bitsandbytes vs bf16 cuBLAS.

    python bench/bench_matmul_4bit.py [--rows 1,4,16,64] [--repeats 30]

Question: for y = x @ W^T with W 4-bit (NF4 + double quantization, block 64) and x of M = 1 to
64 rows, how fast is ``fourbit.kernels.matmul_4bit`` next to ``bitsandbytes.matmul_4bit`` on the
same bytes, and next to ``torch.matmul`` with the dense bf16 weight?

Method (a CUDA GPU; ../shared/PERF.md, the device tool's METHOD.md)
- Shapes: Llama-3-8B's linears [N, K]: q/o 4096x4096, k/v 1024x4096, gate/up 14336x4096,
  down 4096x14336. x is randn in bf16; W is randn, quantized once by fourbit; bnb reads our
  state through its own ``QuantState.from_dict`` (our serialized form is bnb's layout).
- Correct first: each method's output against x @ dequant(W)^T in float64 (relative Frobenius
  error printed; bf16 outputs land near 2e-3; anything over 2e-2 fails the run).
- Timing: each method's calls over several input copies (weights at different addresses,
  together over 2 x 50 MB, the H100's L2) are captured in one CUDA graph, so launch overhead
  (Python, dispatch) stays out and the GPU time per call is what is measured; the graph is
  replayed ``--repeats`` times between CUDA events and the median per call is taken. If a
  method cannot be captured it is timed as an eager loop instead and marked "(eager)".
- Bytes per call: 4-bit: N*K/2 + absmax N*K/64 + x + y; bf16: 2*N*K + x + y. "GB/s" = bytes / time.
- Ratios: bf16 / ours and bnb / ours (>1: we are faster). Table last; JSON to $OUT or
  bench/results/matmul-4bit.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch
from _timing import time_per_call

import fourbit

try:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
except Exception as e:
    bitsandbytes, bnbf, BNB_ERROR = None, None, f"{type(e).__name__}: {e}"

SHAPES = {"q/o": (4096, 4096), "k/v": (1024, 4096), "gate/up": (14336, 4096), "down": (4096, 14336)}
ROTATE_BYTES = 2 * 50 * 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,4,16,64")
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA GPU (the kernels are tested on CPU by tests/kernels)")
    import triton

    env = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "bitsandbytes": bitsandbytes.__version__ if bitsandbytes else f"not importable ({BNB_ERROR})",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    for k, v in env.items():
        print(f"{k:>13}: {v}")
    torch.manual_seed(0)
    rows_out = []
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device="cuda")
        packed, state = fourbit.quantize_4bit(w, "nf4", 64, True)
        dense = fourbit.dequantize_4bit(packed, state, torch.bfloat16)
        del w
        w64 = dense.double()  # bf16 of dequant(W): within 1 ulp of the fp32 dequantization
        qbytes = packed.numel() + state.absmax.numel()
        copies = max(2, -(-ROTATE_BYTES // qbytes))
        quant = [(packed.clone(), fourbit.QuantState.from_dict({a: b.clone() for a, b in state.to_dict().items()}))
                 for _ in range(copies)]
        dense_copies = [dense.clone() for _ in range(max(2, -(-ROTATE_BYTES // dense.numel() // 2)))]
        bnb_states = [bnbf.QuantState.from_dict(s.to_dict(), device=torch.device("cuda")) for _, s in quant] if bnbf else []
        for m in [int(r) for r in args.rows.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.double() @ w64.T
            io_bytes = (m * k + m * n) * 2
            methods = {
                "ours": (lambda c, x=x: fourbit.kernels.matmul_4bit(x, c[0], c[1]), quant, qbytes),
                "bf16": (lambda c, x=x: torch.matmul(x, c.T), dense_copies, 2 * n * k),
            }
            if bnbf:
                methods["bnb"] = (lambda c, x=x: bitsandbytes.matmul_4bit(x, c[0].t(), quant_state=c[1]),
                                  list(zip([q[0] for q in quant], bnb_states)), qbytes)
            row = {"shape": name, "n": n, "k": k, "m": m}
            for key, (fn, inputs, wbytes) in methods.items():
                result = fn(inputs[0])
                err = ((result.double() - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    raise AssertionError(f"{name} m={m} {key}: relative error {err:.3g}")
                t, captured = time_per_call(fn, inputs, args.repeats)
                row[key] = {"us": t * 1e6, "gbps": (wbytes + io_bytes) / t / 1e9, "error": err, "graph": captured}
            rows_out.append(row)
            bnb_us = row.get("bnb", {}).get("us")
            print(f"{name:<8} m={m:<3} ours {row['ours']['us']:8.1f} us  bf16 {row['bf16']['us']:8.1f} us  "
                  f"bnb {bnb_us if bnb_us is None else round(bnb_us, 1)} us", flush=True)
        del quant, dense_copies, bnb_states
        torch.cuda.empty_cache()

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "matmul-4bit.json"
    path.write_text(json.dumps({"env": env, "args": vars(args), "rows": rows_out}, indent=2) + "\n")

    print(f"\n4-bit matmul, NF4 + double quant, bf16 x; {env['device']}; median per call in CUDA graphs ({path})")
    print(f"{'shape':<8} {'M':>3} {'ours us':>8} {'bnb us':>8} {'bf16 us':>8} {'ours GB/s':>10} {'bf16/ours':>10} "
          f"{'bnb/ours':>9}")
    for row in rows_out:
        ours, bf16, bnb = row["ours"], row["bf16"], row.get("bnb")
        mark = "" if all(v["graph"] for v in (ours, bf16, *(bnb and [bnb] or []))) else " (some eager)"
        print(f"{row['shape']:<8} {row['m']:>3} {ours['us']:>8.1f} {bnb['us'] if bnb else float('nan'):>8.1f} "
              f"{bf16['us']:>8.1f} {ours['gbps']:>10.0f} {bf16['us'] / ours['us']:>10.2f} "
              f"{(bnb['us'] / ours['us']) if bnb else float('nan'):>9.2f}" + mark)


if __name__ == "__main__":
    main()
