"""Decode speed at batch 1, and the server under concurrent load: fourbit vs its baselines.

    python bench/bench_serve.py [--new-tokens 32] [--requests 16] [--concurrency 8] [--device cpu|cuda]
                                [--skip-load | --skip-decode] [--engine-dense-cache default|on|off|both]

Questions: (1) how many tokens a second does fourbit's generation loop decode for one sequence,
next to transformers' own ``generate`` on the same loaded model; (2) on a CPU, what decoding
straight from the 4-bit weights costs next to the dense cache the engine keeps there by
default, at batch 1 and 8, and how far both are from llama.cpp on the embedded model's own
GGUF; (3) how many requests a second does ``fourbit serve`` answer when many arrive at once,
and how much of that is batching.

Method
- Model: the embedded SmolLM2-135M-Instruct, NF4 + double quant (fourbit.load_model; compute
  dtype as load_model picks for the device). Greedy, EOS disabled, so every run decodes exactly
  --new-tokens tokens; a short chat prompt.
- Batch 1: fourbit ``serve.generate`` vs ``model.generate`` (transformers, same model object,
  same KV cache type), alternating, median of --repeats after a warm-up; tokens/s = new tokens
  / seconds (the prefill included, as a user waits for it). On a CPU both run inside
  ``dense_weights`` (what the engine does there by default), so neither dequantizes per token.
- CPU decode (question 2): fourbit ``serve.generate`` on --batch-rows copies of the prompt
  (1 and 8), once inside ``dense_weights`` (the engine's default on a CPU: every Linear4bit
  dequantized once and prepacked, the dense model's memory) and once without it (the 4-bit
  model's memory: each decoding product reads the 4-bit codes through the native kernel,
  kernels/cpu/native.py; the prefill's products dequantize), both through fourbit's decode step
  (serve/decode_step.py); the 4-bit model once more through transformers' forward
  (``decode_step=False``: what the step saves); and llama-cpp-python (test extra)
  on the GGUF the embedded model ships as (Q4_1 linears) at batch 1, greedy with EOS ignored,
  n_threads = torch's threads; the same --new-tokens each, prefill included, the variants
  alternating, median of --repeats. tokens/s counts every row's tokens.
- Load: the OpenAI server (serve/server.py) in this process on a free port, driven over HTTP by
  --concurrency client threads sending --requests chat requests (max_tokens = --new-tokens).
  Once with the engine batching up to 16 rows, once with max_batch=1 (one request at a time,
  the baseline); with --engine-dense-cache both, the batched engine twice, from its dense cache
  and from the 4-bit codes (on a CPU the engine keeps the dense cache by default). Reported:
  requests/s, generated tokens/s, latency p50/p90/p99 (seconds from sending a request to its full
  answer), and the mean batch size the engine formed.
- Output: a short table last; JSON to $OUT or bench/results/serve-<device>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import json
import os
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import torch
import transformers

import fourbit
from fourbit.nn.linear4bit import dense_weights
from fourbit.serve import Sampling, generate
from fourbit.serve.adapters import AdapterSet
from fourbit.serve.engine import Engine
from fourbit.serve.server import OpenAIServer, make_http_server

PROMPT = [{"role": "user", "content": "Tell me about the ocean in three sentences."}]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def batch_one(model, tokenizer, ids: list[int], args) -> dict:
    sampling = Sampling(max_new_tokens=args.new_tokens)
    ours = lambda: generate(model, tokenizer, [ids], sampling, eos_ids=set())  # noqa: E731
    tensor = torch.tensor([ids], device=args.device)

    def theirs():
        with torch.no_grad():
            # the mask is explicit: with EOS off, generate would take the prompt's <|im_end|> (the pad id
            # too) for padding and mask it out
            return model.generate(tensor, attention_mask=torch.ones_like(tensor), max_new_tokens=args.new_tokens,
                                  min_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None,
                                  pad_token_id=tokenizer.pad_token_id)

    dense = dense_weights(model) if args.device == "cpu" else contextlib.nullcontext()
    with dense:
        return _time_both(ours, theirs, ids, args)


def _time_both(ours, theirs, ids, args) -> dict:
    ours(), theirs()  # warm-up
    same = ours()[0].token_ids == theirs()[0, len(ids):].tolist()
    times = {"fourbit": [], "transformers": []}
    for _ in range(args.repeats):
        for name, fn in (("fourbit", ours), ("transformers", theirs)):
            if args.device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            fn()
            if args.device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - start)
    rates = {name: args.new_tokens / statistics.median(t) for name, t in times.items()}
    return {"tokens_per_s": rates, "ratio": rates["fourbit"] / rates["transformers"], "same_tokens": same}


def decode_cpu(model, tokenizer, ids: list[int], args) -> dict:
    """tokens/s of fourbit's generation from dense-cached and from 4-bit weights, and of llama.cpp."""
    sampling = Sampling(max_new_tokens=args.new_tokens)
    variants = {}
    for rows in args.batch_rows:
        def ours(rows=rows, step=True):
            return generate(model, tokenizer, [ids] * rows, sampling, eos_ids=set(), decode_step=step)
        variants[f"dense cache, batch {rows}"] = (ours, rows, True)
        variants[f"4-bit, batch {rows}"] = (ours, rows, False)
        variants[f"4-bit, tf forward, batch {rows}"] = (functools.partial(ours, rows, False), rows, False)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed (pip install 'fourbit[test]'): no llama.cpp row")
    else:
        from fourbit.io.default_model import default_model_path

        llm = llama_cpp.Llama(str(default_model_path()), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

        def theirs():
            produced = 0
            for _ in llm.generate(ids, top_k=1, temp=0.0, reset=True):  # never stops by itself: EOS ignored
                produced += 1
                if produced == args.new_tokens:
                    return
        variants["llama.cpp Q4_1, batch 1"] = (theirs, 1, False)

    times = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for name, (fn, _rows, dense) in variants.items():
            with dense_weights(model) if dense else contextlib.nullcontext():
                start = time.perf_counter()
                fn()
                if repeat:
                    times[name].append(time.perf_counter() - start)
    return {name: variants[name][1] * args.new_tokens / statistics.median(t) for name, t in times.items()}


def load(model, tokenizer, adapters, args, max_batch: int, dense_cache: bool | None = None) -> dict:
    engine = Engine(model, tokenizer, adapters, max_batch=max_batch, dense_cache=dense_cache)
    server = make_http_server(OpenAIServer(engine, "bench"), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/chat/completions"
    body = json.dumps({"model": "bench", "messages": PROMPT, "max_tokens": args.new_tokens}).encode()
    latencies, tokens, lock = [], [], threading.Lock()
    pending = list(range(args.requests))

    def client():
        while True:
            with lock:
                if not pending:
                    return
                pending.pop()
            start = time.perf_counter()
            request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                answer = json.loads(response.read())
            with lock:
                latencies.append(time.perf_counter() - start)
                tokens.append(answer["usage"]["completion_tokens"])

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    server.shutdown()
    server.server_close()
    engine.close()
    return {"max_batch": max_batch, "dense_cache": dense_cache, "seconds": seconds, "requests_per_s": args.requests / seconds,
            "tokens_per_s": sum(tokens) / seconds, "p50": percentile(latencies, 50), "p90": percentile(latencies, 90),
            "p99": percentile(latencies, 99), "mean_batch": engine.stats.mean_batch()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-rows", default="1,8", help="rows of the CPU decode comparison, comma-separated")
    p.add_argument("--skip-load", action="store_true", help="only the decode measurements")
    p.add_argument("--skip-decode", action="store_true", help="only the server under load")
    p.add_argument("--engine-dense-cache", choices=["default", "on", "off", "both"], default="default",
                   help="the batched engine's dense cache (default: the engine's own choice; both: one run each)")
    args = p.parse_args()
    args.batch_rows = [int(r) for r in args.batch_rows.split(",")]
    model, tokenizer = fourbit.load_model(None, device=args.device)
    text = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    from fourbit.precision import cpu_kind

    env = {"device": torch.cuda.get_device_name() if args.device == "cuda" else f"CPU ({cpu_kind()})",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
           "fourbit": fourbit.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    one = batch_one(model, tokenizer, ids, args) if not args.skip_decode else None
    if one:
        print(f"batch 1: {one}", flush=True)
    decode = decode_cpu(model, tokenizer, ids, args) if args.device == "cpu" and not args.skip_decode else {}
    if decode:
        print(f"CPU decode: {decode}", flush=True)
    loads = []
    if not args.skip_load:
        adapters = AdapterSet(model)  # as `fourbit serve` runs (no adapter loaded): wrapped once, for both engines
        caches = {"default": [None], "on": [True], "off": [False], "both": [True, False]}[args.engine_dense_cache]
        loads = [load(model, tokenizer, adapters, args, 16, cache) for cache in caches]
        loads.append(load(model, tokenizer, adapters, args, 1))
    for row in loads:
        print(f"load: {row}", flush=True)

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"serve-{args.device}.json"
    path.write_text(json.dumps({"env": env, "args": vars(args), "batch1": one, "cpu_decode": decode, "load": loads},
                               indent=2) + "\n")

    print(f"\nSmolLM2-135M-Instruct NF4, {env['device']}, {args.new_tokens} new tokens ({path})")
    if one:
        r = one["tokens_per_s"]
        print(f"batch 1 decode: fourbit {r['fourbit']:.1f} tok/s, transformers generate {r['transformers']:.1f} tok/s, "
              f"ratio {one['ratio']:.2f} (same tokens: {one['same_tokens']})")
    if decode:
        print(f"{'CPU decode':<32} {'tok/s':>7}")
        for name, rate in decode.items():
            print(f"{name:<32} {rate:>7.1f}")
        for rows in args.batch_rows:
            ratio = decode[f"4-bit, batch {rows}"] / decode[f"dense cache, batch {rows}"]
            step = decode[f"4-bit, batch {rows}"] / decode[f"4-bit, tf forward, batch {rows}"]
            print(f"batch {rows}: 4-bit / dense cache {ratio:.2f}x; decode step / transformers' forward {step:.2f}x")
        if "llama.cpp Q4_1, batch 1" in decode:
            llama = decode["llama.cpp Q4_1, batch 1"]
            print(f"batch 1 vs llama.cpp: dense cache {decode['dense cache, batch 1'] / llama:.2f}x, "
                  f"4-bit {decode['4-bit, batch 1'] / llama:.2f}x")
    if not loads:
        return
    print(f"{'server':<26} {'req/s':>7} {'tok/s':>7} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} {'mean batch':>11}")
    for row in loads:
        cache = {None: "", True: ", dense cache", False: ", 4-bit"}[row["dense_cache"]]
        name = f"max_batch={row['max_batch']}{cache}"
        print(f"{name:<26} {row['requests_per_s']:>7.2f} {row['tokens_per_s']:>7.1f} {row['p50']:>7.2f} "
              f"{row['p90']:>7.2f} {row['p99']:>7.2f} {row['mean_batch']:>11.2f}")
    print(f"batching: {loads[0]['requests_per_s'] / loads[-1]['requests_per_s']:.2f}x the requests/s of one at a time")
    if len(loads) == 3:
        print(f"batched from the 4-bit codes / from the dense cache: "
              f"{loads[1]['tokens_per_s'] / loads[0]['tokens_per_s']:.2f}x the tokens/s")


if __name__ == "__main__":
    main()
