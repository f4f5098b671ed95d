"""CPU decoding: a prepacked weight against F.linear, and where the decoding thread's time goes.

    python bench/bench_cpu_decode.py [--rows 1,16,64] [--runs 3]

Questions: (1) how much of a small CPU product is oneDNN reordering the weight, which
kernels/prepacked_linear.py does once instead of per call; (2) what a decode step of the
embedded SmolLM2-135M-Instruct costs with dense weights as F.linear uses them and prepacked,
and on which thread: the serving engine decodes on a worker thread, and the model is loaded
either on the main thread (leaving it an OpenMP pool) or on a thread that ends.

Method
- (1) SmolLM2's linear shapes (576x576, 576x192, 576x1536, 1536x576) in bfloat16 (where the
  CPU has native bf16) and float32, x of 1, 16 and 64 rows: median of 9 repeats of 200 calls,
  F.linear and prepacked_linear alternating; both checked equal to 1e-2 relative first.
- (2) One process per measurement (a process's OpenMP pools are what is measured): the model
  loaded NF4 in the default compute dtype, dense weights, 16 rows of a 40-token left-padded
  prompt (half the rows padded by 5), then 3 warm-up decode steps and the mean of 10. Variants:
  ``main`` (load and decode on the main thread), ``thread`` (load on the main thread, decode on
  a new one: the engine before on_own_thread), ``own`` (load on a thread that ends, decode on
  another: the engine now), and ``plain`` (as ``own``, the dense weights not prepacked). Each
  variant --runs times, interleaved; medians reported.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import threading
import time

import torch
from torch.nn import functional as F

SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536)]  # (out, in): q/o, k/v, gate/up, down


def products(rows: list[int]) -> list[dict]:
    from fourbit.kernels.prepacked_linear import is_prepacked, prepack, prepacked_linear

    found = []
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    for dtype in dtypes:
        for out_features, in_features in SHAPES:
            w = torch.randn(out_features, in_features).to(dtype)
            packed = prepack(w)
            for m in rows:
                x = torch.randn(m, in_features).to(dtype)
                assert is_prepacked(packed) and torch.allclose(prepacked_linear(x, packed).float(), F.linear(x, w).float(),
                                                               rtol=1e-2, atol=1e-2)
                plain, ours = [], []
                for _ in range(9):
                    plain.append(_per_call(F.linear, x, w))
                    ours.append(_per_call(prepacked_linear, x, packed))
                found.append({"dtype": str(dtype).removeprefix("torch."), "shape": f"{out_features}x{in_features}",
                              "rows": m, "f_linear_us": statistics.median(plain) * 1e6,
                              "prepacked_us": statistics.median(ours) * 1e6})
                print(json.dumps(found[-1]), flush=True)
    return found


def _per_call(call, *args, n: int = 200) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call(*args)
    return (time.perf_counter() - start) / n


def step(variant: str, rows: int) -> float:
    """Mean seconds of a decode step of ``rows`` rows, the model loaded and decoded as ``variant`` says."""
    from fourbit.io.loader import load_model
    from fourbit.nn.linear4bit import Linear4bit, dense_weights
    from fourbit.serve.adapters import AdapterSet
    from fourbit.serve.engine import on_own_thread
    from fourbit.serve.kv_batch import KVBatch

    def load():
        torch.manual_seed(0)
        model, _ = load_model(None, quantization="nf4")
        return model, AdapterSet(model)

    model, adapters = load() if variant in ("main", "thread") else on_own_thread(load)
    box = {}

    def decode():
        with dense_weights(model), torch.no_grad():
            if variant == "plain":
                for layer in model.modules():
                    if isinstance(layer, Linear4bit):
                        layer.dense_copy = layer.dequantize(layer.compute_dtype)
            ids = torch.randint(0, 40000, (rows, 40))
            mask = torch.ones(rows, 40, dtype=torch.long)
            mask[: rows // 2, :5] = 0
            kv = KVBatch(model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1).past_key_values, mask)
            token = torch.randint(0, 40000, (rows, 1))

            def one():
                with adapters.use([None] * rows):
                    out = model(input_ids=token, attention_mask=kv.grow(), position_ids=kv.positions(),
                                past_key_values=kv.cache, use_cache=True, logits_to_keep=1)
                kv.cache = out.past_key_values

            for _ in range(3):
                one()
            start = time.perf_counter()
            for _ in range(10):
                one()
            box["seconds"] = (time.perf_counter() - start) / 10

    if variant == "main":
        decode()
    else:
        worker = threading.Thread(target=decode)
        worker.start()
        worker.join()
    return box["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1,16,64")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--step", default=None, choices=["main", "thread", "own", "plain"],
                   help="time one decode-step variant in this process and print its seconds (what each run does)")
    p.add_argument("--step-rows", type=int, default=16)
    args = p.parse_args()
    if args.step:
        print(step(args.step, args.step_rows))
        return
    flags = open("/proc/cpuinfo").read()
    env = {"cpu": "AVX512-BF16" if "avx512_bf16" in flags else "AVX2", "threads": torch.get_num_threads(),
           "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(json.dumps(env), flush=True)
    found = products([int(r) for r in args.rows.split(",")])
    steps: dict[str, list[float]] = {v: [] for v in ("main", "thread", "own", "plain")}
    for _ in range(args.runs):
        for variant in steps:
            out = subprocess.run([sys.executable, __file__, "--step", variant], capture_output=True, text=True, check=True)
            steps[variant].append(float(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({"variant": variant, "step_ms": steps[variant][-1] * 1e3}), flush=True)
    print("\n| dtype | weight | rows | F.linear us | prepacked us | ratio |\n|---|---|---|---|---|---|")
    for r in found:
        print(f"| {r['dtype']} | {r['shape']} | {r['rows']} | {r['f_linear_us']:.0f} | {r['prepacked_us']:.0f} | "
              f"{r['f_linear_us'] / r['prepacked_us']:.2f}x |")
    print("\n| decode step, 16 rows | ms (median of runs) | runs |\n|---|---|---|")
    for variant, values in steps.items():
        print(f"| {variant} | {statistics.median(values) * 1e3:.1f} | {', '.join(f'{v * 1e3:.0f}' for v in values)} |")


if __name__ == "__main__":
    main()
