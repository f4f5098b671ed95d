"""Greedy decode speed at batch 1, Llama-3-8B's shapes, on a GPU: fourbit vs bitsandbytes NF4 vs bf16.

    python bench/bench_decode_gpu.py [--layers 32] [--new-tokens 128] [--repeats 3] [--compile-bf16]
                                     [--variants fourbit-eager,bnb-eager,dense-eager,fourbit-compile,fourbit-graph]
                                     [--compile-recipe auto|manual] [--time-budget 560] [--model-dir DIR]
    OMP_NUM_THREADS=1 python bench/bench_decode_gpu.py --tiny --device cpu   # logic smoke test

Question: how many tokens/s does fourbit decode at batch 1 on an 8B Llama-3-shaped model, next
to transformers + bitsandbytes NF4 and plain bf16, each eager, and with a static KV cache +
torch.compile(mode="reduce-overhead")?

Method
- Model: random weights with Llama-3-8B's shapes (see bench/_llama_shape.py; built once on the
  GPU and saved as bf16 safetensors, default /tmp/fourbit-bench/llama3-8b-shape-L{layers}, the
  same folder bench_train_step_gpu.py uses; ``--layers N`` keeps N of 32).
- Variants, each in its own subprocess (clean memory, and a crash or hang in one cannot take the
  others down; each is killed at the time left in --time-budget):
    fourbit-eager    fourbit.load_model(nf4, double quant, bf16 compute), model.generate, dynamic cache
    bnb-eager        transformers + BitsAndBytesConfig(nf4, double quant, bf16 compute), generate
    dense-eager      transformers, bf16 weights, generate
    fourbit-compile  fourbit, generate(cache_implementation="static") with the forward compiled
    fourbit-graph    fourbit's own greedy loop, fourbit.serve.graph_decode.GraphDecoder: a static
                     cache and the decode step compiled (CUDA graph), the host syncing every 16 tokens
    dense-compile    the same recipe on bf16 weights (with --compile-bf16)
  Compile recipe "auto" (default): transformers 5's own path: with a static cache on CUDA,
  generate compiles the decode forward itself; we pass CompileConfig(mode="reduce-overhead",
  fullgraph=True), and fall back to fullgraph=False if that fails. "manual": the older documented
  recipe, model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True),
  with transformers' auto-compile disabled. Either way torch._dynamo's graph counter must be > 0
  after warm-up, else the row is marked "NOT COMPILED" (auto then falls back to manual).
- Same work everywhere: a prompt of 16 random token ids (fixed seed), greedy, exactly
  --new-tokens new tokens (eos disabled, min_new_tokens = max_new_tokens; the output length is
  checked), sdpa attention, batch 1. Warm-up: one short generate (8 tokens) for eager
  variants; two full-length generates for compiled ones (compilation, then CUDA-graph
  recording; a static cache is sized by the total length, so a shorter warm-up would
  recompile). Then --repeats full generates, each timed with time.perf_counter between
  torch.cuda.synchronize() calls; tokens/s = new tokens / median time (the 16-token prefill is
  included; it is a small share).
- Sanity: fourbit and bitsandbytes quantize the same weights to the same NF4 codes, so their
  greedy tokens should mostly agree; how many of the first 16 generated tokens match is
  printed (fourbit-eager vs bnb-eager, fourbit-compile vs fourbit-eager, dense vs bnb), never
  failed on: near-ties on a random model flip with rounding order.
- Reading it: ratios are fourbit's best tokens/s over bnb-eager's and over dense-eager's
  (>1: we are faster). PERF.md's ceiling at 8B on an H100: about 645 tokens/s for 4-bit
  linears, about 200 for bf16. The table goes to bench/results/decode-gpu.json (or
  $OUT/decode-gpu.json; "-tiny" added for --tiny); it is rewritten after every variant, so a
  run cut short still leaves what it measured. --tiny (hidden 64, vocab 512, fp32 on the CPU)
  only checks the logic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import _llama_shape as shape

VARIANTS = ["fourbit-eager", "bnb-eager", "dense-eager", "fourbit-compile", "fourbit-graph", "dense-compile"]
PROMPT_LEN = 16
MATCH_LEN = 16


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    p.add_argument("--new-tokens", type=int, default=None, help="tokens generated per timed run (default 128; --tiny: 32)")
    p.add_argument("--repeats", type=int, default=3, help="timed full generates per variant (median reported)")
    p.add_argument("--variants", default=None, help=f"comma-separated, in order, from {','.join(VARIANTS)} "
                   "(default: all but dense-compile, which --compile-bf16 adds)")
    p.add_argument("--compile-bf16", action="store_true", help="also run dense-compile (bf16 + static cache + compile)")
    p.add_argument("--compile-recipe", choices=["auto", "manual"], default="auto")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="dense / compute dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for checking the logic (CPU)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--time-budget", type=float, default=560,
                   help="seconds for the whole script; a variant still running when it is spent is killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, one more generate under torch.profiler: GPU kernel time and count per token")
    p.add_argument("--gemv", default=None, metavar="BLOCK_N,NB,WARPS,SPLIT",
                   help="fourbit's M = 1 launch shape (SPLIT: an int, or auto), e.g. 64,4,4,auto")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.layers = args.layers or shape.default_layers(args.tiny)
    args.new_tokens = args.new_tokens or (32 if args.tiny else 128)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.model_dir = args.model_dir or shape.default_dir(args.layers, args.tiny)
    if args.variants is None:
        args.variants = ",".join(VARIANTS if args.compile_bf16 else VARIANTS[:-1])
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    return args


# ------------------------------------------------------------------------------------- children
def load(variant: str, args):
    import torch

    dtype = getattr(torch, args.dtype)
    if variant.startswith("fourbit"):
        import fourbit

        model, _ = fourbit.load_model(str(args.model_dir), quantization="nf4", double_quant=True, blocksize=64,
                                      compute_dtype=args.dtype, device=args.device)
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            model.set_attn_implementation("sdpa")
    else:
        from transformers import AutoModelForCausalLM

        extra = {"device_map": {"": 0}} if args.device == "cuda" else {}
        if variant == "bnb-eager":
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=dtype, attn_implementation="sdpa", **extra)
    model.eval()
    gc = model.generation_config  # a random model: no eos, so every run makes exactly --new-tokens tokens
    gc.eos_token_id, gc.pad_token_id, gc.do_sample = None, 0, False
    for name in ("temperature", "top_p", "top_k"):
        if hasattr(gc, name):
            setattr(gc, name, None)
    model.config.use_cache = True
    return model


def dynamo_graphs() -> int:
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


def child(variant: str, args) -> None:
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass
    if variant == "bnb-eager":
        try:
            import bitsandbytes  # noqa: F401
        except Exception as e:  # not installed, or its native library failed to load
            print("RESULT " + json.dumps({"variant": variant, "unavailable": f"{type(e).__name__}: {e}"}), flush=True)
            return
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    device = torch.device(args.device)
    if args.gemv and variant.startswith("fourbit"):
        from fourbit.kernels.triton import matmul_4bit as fused

        fused.GEMV = gemv_config(args.gemv)
        print(f"[{variant}] M = 1 launch shape: {fused.GEMV}", flush=True)
    t0 = time.perf_counter()
    model = load(variant, args)
    sync()
    load_s = time.perf_counter() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30 if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    print(f"[{variant}] loaded in {load_s:.1f} s"
          + (f", {weights_gib:.2f} GiB allocated" if cuda else "")
          + f", attention {model.config._attn_implementation}", flush=True)

    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, model.config.vocab_size, (1, PROMPT_LEN), generator=g).to(device)
    base_kwargs = {"attention_mask": torch.ones_like(prompt), "do_sample": False,
                   "max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens}
    compiled = variant.endswith(("compile", "graph"))
    notes = []

    def generate(kwargs, n=None):
        kw = dict(kwargs)
        if n is not None:
            kw["max_new_tokens"] = kw["min_new_tokens"] = n
        with torch.inference_mode():
            return model.generate(prompt, **kw)

    def timed(kwargs):
        sync()
        start = time.perf_counter()
        out = generate(kwargs)
        sync()
        return time.perf_counter() - start, out

    kwargs = dict(base_kwargs)
    warm = []
    if variant == "fourbit-graph":
        from fourbit.serve.graph_decode import GraphDecoder

        decoder = GraphDecoder(model, max_length=PROMPT_LEN + args.new_tokens)
        prompt_ids = prompt[0].tolist()

        def generate(kwargs, n=None):
            new = decoder.generate(prompt_ids, n or args.new_tokens)  # no eos: exactly n tokens
            return torch.tensor([prompt_ids + new])

        for _ in range(2):  # compilation, then CUDA-graph recording
            dt, _out = timed(kwargs)
            warm.append(dt)
            print(f"[{variant}] warm-up: {dt:.1f} s", flush=True)
        notes.append("GraphDecoder (static cache, compiled step, reduce-overhead)")
    elif not compiled:
        start = time.perf_counter()
        generate(kwargs, n=8)
        sync()
        warm.append(time.perf_counter() - start)
    else:
        from transformers import CompileConfig

        def auto(fullgraph):
            cfg = CompileConfig(fullgraph=fullgraph, mode="reduce-overhead")
            if not cuda:
                cfg._compile_all_devices = True  # transformers only auto-compiles on accelerators otherwise
            return {**base_kwargs, "cache_implementation": "static", "compile_config": cfg}

        def manual(fullgraph):
            model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=fullgraph)
            return {**base_kwargs, "cache_implementation": "static", "disable_compile": True}

        attempts = ([("auto", True), ("auto", False)] if args.compile_recipe == "auto" else []) + \
            [("manual", True), ("manual", False)]
        for recipe, fullgraph in attempts:
            label = f"{recipe} fullgraph={fullgraph}"
            before = dynamo_graphs()
            try:
                kwargs = auto(fullgraph) if recipe == "auto" else manual(fullgraph)
                for _ in range(2):  # compile, then CUDA-graph recording
                    dt, _out = timed(kwargs)
                    warm.append(dt)
                    print(f"[{variant}] warm-up ({label}): {dt:.1f} s", flush=True)
            except Exception as e:
                traceback.print_exc()
                notes.append(f"{label} failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
                print(f"[{variant}] !!! {notes[-1]}", flush=True)
                if recipe == "manual" and hasattr(model.forward, "_torchdynamo_orig_callable"):
                    model.forward = model.forward._torchdynamo_orig_callable
                torch._dynamo.reset()
                continue
            graphs = dynamo_graphs()
            if graphs == before and graphs >= 0:
                notes.append(f"{label}: ran, but torch._dynamo compiled no graph (transformers did not compile)")
                print(f"[{variant}] !!! {notes[-1]}", flush=True)
                continue
            notes.append(f"compiled with {label} ({graphs} dynamo graph(s))")
            break
        else:
            raise RuntimeError("no compile recipe worked: " + "; ".join(notes))

    times, out = [], None
    for i in range(args.repeats):
        dt, out = timed(kwargs)
        times.append(dt)
        print(f"[{variant}] run {i}: {dt:.3f} s, {args.new_tokens / dt:.1f} tokens/s", flush=True)
    profile = kernel_profile(lambda: timed(kwargs), args.new_tokens) if args.profile and cuda else None
    if profile:
        print(f"[{variant}] profile: {json.dumps(profile)}", flush=True)
    new = out[0, PROMPT_LEN:].tolist()
    if len(new) != args.new_tokens:
        notes.append(f"!!! generated {len(new)} tokens, expected {args.new_tokens}")
    median = statistics.median(times)
    print("RESULT " + json.dumps({
        "variant": variant, "times": times, "median_s": median, "tokens_per_s": args.new_tokens / median,
        "ms_per_token": 1e3 * median / args.new_tokens, "warmup_s": warm, "load_s": load_s,
        "weights_gib": weights_gib, "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "generated": len(new), "first_tokens": new[:MATCH_LEN], "notes": notes,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu", "dtype": args.dtype,
        "gemv": args.gemv if variant.startswith("fourbit") else None, "profile": profile,
    }), flush=True)


def gemv_config(text: str):
    from fourbit.kernels.triton.matmul_4bit import Config

    block_n, nb, warps, split = text.split(",")
    return Config(block_n=int(block_n), nb=int(nb), num_warps=int(warps), split_k=None if split == "auto" else int(split))


def kernel_profile(run, new_tokens: int, top: int = 12) -> dict:
    """One generate under torch.profiler: wall time, GPU kernel time and kernel count per token,
    and the kernels that take the most time (CUDA-graph replays are traced kernel by kernel)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        wall, _ = run()
    kernels = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in kernels)
    calls = sum(e.count for e in kernels)
    ranked = sorted(kernels, key=lambda e: -e.self_device_time_total)[:top]
    return {"wall_ms_per_token": 1e3 * wall / new_tokens, "kernel_ms_per_token": total_us / 1e3 / new_tokens,
            "kernels_per_token": calls / new_tokens,
            "top": [{"name": e.key[:90], "calls_per_token": e.count / new_tokens,
                     "us_per_token": e.self_device_time_total / new_tokens} for e in ranked]}


# --------------------------------------------------------------------------------------- parent
def run_child(variant: str, argv: list[str], timeout: float) -> dict:
    """Runs one variant, streaming its output; its RESULT dict, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", variant]
    result, code = shape.run_streaming(cmd, timeout)
    if code is None:
        return {"variant": variant, "error": f"killed: the time budget ran out ({timeout:.0f} s left for it)"}
    if code != 0 or result is None:
        return {"variant": variant, "error": f"subprocess exit {code}, no result (traceback above)"}
    return result


def matches(a: list[int], b: list[int]) -> int:
    return sum(x == y for x, y in zip(a, b))


def summary(rows: dict) -> dict:
    ok = {k: r for k, r in rows.items() if "tokens_per_s" in r}
    out = {}
    fourbit = {k: r for k, r in ok.items() if k.startswith("fourbit")}
    if fourbit:
        best = max(fourbit, key=lambda k: fourbit[k]["tokens_per_s"])
        out["fourbit_best"] = best
        for peer in ["bnb-eager", "dense-eager", "dense-compile"]:
            if peer in ok:
                out[f"fourbit_best_over_{peer}"] = fourbit[best]["tokens_per_s"] / ok[peer]["tokens_per_s"]
    for a, b in [("fourbit-eager", "bnb-eager"), ("fourbit-compile", "fourbit-eager"), ("fourbit-graph", "fourbit-eager"),
                 ("dense-eager", "bnb-eager"),
                 ("dense-compile", "dense-eager")]:
        if a in ok and b in ok:
            out[f"match_{a}_vs_{b}"] = matches(ok[a]["first_tokens"], ok[b]["first_tokens"])
    return out


def main() -> None:
    args = parse_args()
    if args.child:
        return shape.run_as_child(child, args)

    start = time.monotonic()
    env = shape.print_header(args)
    variants = args.variants.split(",")
    print(f"batch 1, prompt {PROMPT_LEN} random tokens, {args.new_tokens} new tokens (greedy, eos off), "
          f"median of {args.repeats}, {args.dtype}, sdpa, device {args.device}; variants {', '.join(variants)}; "
          f"compile recipe {args.compile_recipe}; time budget {args.time_budget:.0f} s", flush=True)
    shape.ensure_model(args.model_dir, args.layers, args.tiny, args.device)

    argv = list(sys.argv[1:])
    if "--model-dir" not in argv:
        argv += ["--model-dir", str(args.model_dir)]
    path = shape.out_path("decode-gpu-tiny.json" if args.tiny else "decode-gpu.json")
    rows: dict[str, dict] = {}
    for variant in variants:
        left = args.time_budget - (time.monotonic() - start)
        if left < 20:
            rows[variant] = {"variant": variant, "error": "skipped: the time budget was spent"}
            print(f"!!! {variant}: skipped, the time budget was spent", flush=True)
            continue
        print(f"--- {variant} ({left:.0f} s of the budget left)", flush=True)
        res = run_child(variant, argv, left - 5)
        rows[variant] = res
        if "tokens_per_s" in res:
            print(f"{variant}: {res['tokens_per_s']:.1f} tokens/s (runs {' '.join(f'{t:.2f}' for t in res['times'])} s)"
                  + "".join(f"; {n}" for n in res["notes"]), flush=True)
        else:
            print(f"!!! {variant}: {res.get('error') or 'unavailable: ' + res.get('unavailable', '?')}", flush=True)
        path.write_text(json.dumps({
            "environment": env, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                             if k != "child"},
            "rows": rows, "summary": summary(rows)}, indent=1) + "\n")

    s = summary(rows)
    device_name = next((r["device_name"] for r in rows.values() if "device_name" in r), env["device"])
    print(f"\nDecode, batch 1, {device_name}, {shape.layers_note(args.layers, args.tiny)}, {args.new_tokens} new tokens, "
          f"median of {args.repeats} (written to {path})")
    print(f"{'variant':<17}{'tokens/s':>10}{'ms/token':>10}{'load s':>8}{'weights GiB':>13}{'peak GiB':>10}  notes")
    for variant, r in rows.items():
        if "tokens_per_s" in r:
            weights, peak = (f"{r[k]:.2f}" if r.get(k) is not None else "-" for k in ("weights_gib", "peak_gib"))
            print(f"{variant:<17}{r['tokens_per_s']:>10.1f}{r['ms_per_token']:>10.2f}{r['load_s']:>8.1f}"
                  f"{weights:>13}{peak:>10}  {'; '.join(r['notes'])}")
        else:
            print(f"{variant:<17}{'-':>10}{'-':>10}{'-':>8}{'-':>13}{'-':>10}  "
                  f"{r.get('error') or 'unavailable: ' + r.get('unavailable', '?')}")
    if "fourbit_best" in s:
        ratios = [f"fourbit best ({s['fourbit_best']}) / {peer}: {s[f'fourbit_best_over_{peer}']:.2f}x"
                  for peer in ["bnb-eager", "dense-eager", "dense-compile"] if f"fourbit_best_over_{peer}" in s]
        if ratios:
            print("   ".join(ratios) + "   (>1: we are faster)")
    found = [f"{k.removeprefix('match_').replace('_vs_', ' vs ')} {v}/{MATCH_LEN}"
             for k, v in s.items() if k.startswith("match_")]
    if found:
        print("first-token agreement: " + ", ".join(found))
    errors = [v for v, r in rows.items() if "error" in r and not r["error"].startswith("skipped")]
    if not any("tokens_per_s" in r for r in rows.values()) or any(v.endswith("eager") for v in errors):
        sys.exit(1)  # a compile variant failing is a finding, reported above; an eager one failing is an error


if __name__ == "__main__":
    main()
