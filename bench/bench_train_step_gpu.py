"""One QLoRA training step at Llama-3-8B's shapes on a GPU: fourbit vs transformers + bitsandbytes + peft.

    python bench/bench_train_step_gpu.py [--layers 32] [--steps 5] [--warmup 2] [--rounds 1]
                                         [--batch 1] [--seq 2048] [--model-dir DIR]
    OMP_NUM_THREADS=1 python bench/bench_train_step_gpu.py --tiny --device cpu   # logic smoke test

Question: how many tokens/s does one QLoRA step of an 8B Llama-3-shaped model reach with
fourbit on a GPU, next to the usual stack (transformers + bitsandbytes + peft), and how much GPU
memory does each side need?

Method
- Model: random weights with Llama-3-8B's shapes (hidden 4096, intermediate 14336, 32 heads,
  8 kv heads, vocab 128256, rope_theta 500000, untied lm_head; ``--layers N`` keeps N of 32),
  built once on the GPU with a fixed seed (init std 0.02) and saved as a bf16 safetensors folder
  (bench/_llama_shape.py; default /tmp/fourbit-bench/llama3-8b-shape-L{layers}, reused when
  present). Both sides load that same folder, so they quantize the same weights.
- Same work on both sides: NF4 + double quantization (blocksize 64) of every linear but
  lm_head, bf16 compute; LoRA r=16, alpha=16, dropout 0 on q,k,v,o,gate,up,down; gradient
  checkpointing, non-reentrant; sdpa attention; AdamW lr 1e-4, weight decay 0; one batch of
  random token ids (fixed seed, labels = inputs, no attention mask: all positions attended).
  Ours: ``fourbit.load_model(folder, "nf4", double_quant=True, compute_dtype="bfloat16",
  device="cuda")``, ``fourbit.add_lora(..., target="all-linear")``, fourbit.train.recipe's
  ``enable_gradient_checkpointing`` (transformers' checkpointing, use_reentrant False), fourbit's
  AdamW, loss = ``causal_lm_loss(model, batch) / predicted tokens``. Peer:
  ``AutoModelForCausalLM.from_pretrained(folder, BitsAndBytesConfig(nf4, double quant, bf16
  compute), attn_implementation="sdpa", device_map={"": 0})``, ``prepare_model_for_kbit_training``
  (non-reentrant checkpointing), ``get_peft_model(LoraConfig(...))``, torch AdamW, loss =
  ``model(input_ids, labels=labels).loss``. Both losses are the mean next-token cross-entropy.
  Note: prepare_model_for_kbit_training casts every non-4-bit parameter (embeddings, norms,
  lm_head) to fp32, as the usual recipe does; that is part of the peer's cost, in memory
  (about +2.1 GB at 8B) and in the lm_head matmul (fp32 instead of bf16).
- Sanity: LoRA B starts at zero, so each side's first loss is the base model's loss on the
  batch; the two must agree within 2% (same weights, same NF4 codes). With random weights that
  loss sits near ln(vocab) on both sides whatever the numerics, so the gap in the excess over
  ln(vocab) is printed too (flagged above 10%). A larger gap is flagged loudly: a benchmark
  comparing different work is worthless. The trainable parameter counts must match too.
- Timing: each side in its own subprocess (so peak memory is per side). Step = forward +
  backward + optimizer.step() + zero_grad(), timed with time.perf_counter between
  torch.cuda.synchronize() calls; --warmup steps are untimed. With --rounds R the subprocesses
  alternate (ours, peer, peer, ours, ...); each side's figure is the median of all its timed
  steps. tokens/s = batch x seq / median step time.
- Memory (CUDA): "build peak" = torch.cuda.max_memory_allocated over loading + LoRA + optimizer
  construction; "after build" = memory_allocated then; "step peak" = max_memory_allocated over
  the steps only (peak stats reset after the build); "reserved" = max_memory_reserved over the
  steps. On the CPU (--device cpu) memory is not measured.
- Reading it: speed ratio = ours tokens/s / peer tokens/s (>1: we are faster); memory ratio =
  peer step peak / ours step peak (>1: we use less). The table goes to
  bench/results/train-step-gpu.json (or $OUT/train-step-gpu.json; "-tiny" added for --tiny).
  --tiny (hidden 64, 4 heads, vocab 512, seq 64, fp32 on the CPU) only checks the logic.
- ``--moe``: the same on a Mixtral-shaped model (4 of Mixtral-8x7B's 32 layers by default), LoRA
  r=16 on q,k,v,o and on every expert of both expert weights (PEFT's ``target_parameters``,
  ``mlp.experts.gate_up_proj`` and ``mlp.experts.down_proj``, on both sides). fourbit quantizes
  the experts to NF4 too (nn/experts4bit.py); bitsandbytes quantizes nn.Linear modules only, so
  the peer's experts stay bf16, and the peer skips prepare_model_for_kbit_training (which would
  cast them to fp32) for gradient checkpointing + ``enable_input_require_grads``. JSON:
  train-step-gpu-moe.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import _llama_shape as shape

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MOE_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
MOE_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]  # PEFT's target_parameters spelling


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 32; --tiny: 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, per subprocess")
    p.add_argument("--rounds", type=int, default=1, help="alternations of the two subprocesses")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 2048; --tiny: 64)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="compute dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, for checking the logic (CPU)")
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--sides", default="ours,peer", help="comma-separated subset of ours,peer")
    p.add_argument("--child-timeout", type=float, default=420, help="seconds before a side's subprocess is killed")
    p.add_argument("--time-budget", type=float, default=560,
                   help="seconds for the whole script; a side still running when it is spent is killed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true",
                   help="ours: torch.compile each decoder layer (the recipe's torch_compile: true)")
    p.add_argument("--moe", action="store_true",
                   help="a Mixtral-shaped model (bench/_llama_shape.py --family mixtral; default 4 layers): LoRA on "
                        "q,k,v,o and on every expert of both expert weights (target_parameters); the peer keeps its "
                        "experts in 16 bits (bitsandbytes quantizes nn.Linear only) and skips "
                        "prepare_model_for_kbit_training's fp32 upcast, which would make them 32-bit")
    p.add_argument("--child", choices=["ours", "peer"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.family = "mixtral" if args.moe else "llama"
    args.layers = args.layers or shape.default_layers(args.tiny, args.family)
    args.seq = args.seq or (64 if args.tiny else 2048)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    args.model_dir = args.model_dir or shape.default_dir(args.layers, args.tiny, args.family)
    return args


# ------------------------------------------------------------------------------------- children
def build(side: str, args):
    """(model, optimizer, loss_fn, trainable count, notes) for one side."""
    import torch

    dtype = getattr(torch, args.dtype)
    notes = []
    if side == "ours":
        import fourbit
        from fourbit.nn.lora import lora_settings
        from fourbit.train.recipe import causal_lm_loss, compile_decoder_layers, enable_gradient_checkpointing

        model, _ = fourbit.load_model(str(args.model_dir), quantization="nf4", double_quant=True, blocksize=64,
                                      compute_dtype=args.dtype, device=args.device)
        if getattr(model.config, "_attn_implementation", None) != "sdpa":
            notes.append(f"attention was {model.config._attn_implementation!r}; set to sdpa")
            model.set_attn_implementation("sdpa")
        targets = MOE_TARGETS if args.moe else TARGETS
        fourbit.add_lora(model, r=args.rank, alpha=args.alpha, dropout=0.0, target=targets if args.moe else "all-linear",
                         target_parameters=MOE_PARAMETERS if args.moe else None, verbose=False)
        modules = lora_settings(model).modules
        wrapped = {name.rsplit(".", 1)[-1] for name in modules}
        if wrapped != set(targets) or len(modules) != len(targets) * args.layers:
            notes.append(f"!!! LoRA wrapped {len(modules)} modules named {sorted(wrapped)}")
        enable_gradient_checkpointing(model)
        if args.compile:  # what torch_compile: true does in the recipe
            compile_decoder_layers(model)
            notes.append("decoder layers compiled (recipe.compile_decoder_layers)")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = fourbit.optim.build_optimizer("adamw", params, lr=1e-4, weight_decay=0.0)

        def loss_fn(batch):
            n_predicted = (batch["labels"][:, 1:] != -100).sum()
            return causal_lm_loss(model, batch) / n_predicted
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=dtype)
        extra = {"device_map": {"": 0}} if args.device == "cuda" else {}
        model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=dtype, quantization_config=quant,
                                                     attn_implementation="sdpa", **extra)
        if args.moe:  # the experts stay 16-bit: no fp32 upcast of every non-4-bit parameter
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
            lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=MOE_TARGETS,
                              target_parameters=MOE_PARAMETERS, lora_dropout=0.0, task_type="CAUSAL_LM")
        else:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
            lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, lora_dropout=0.0,
                              task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        def loss_fn(batch):
            return model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False).loss
    model.config.use_cache = False
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    notes.append(f"attention {base.config._attn_implementation}, gradient checkpointing "
                 f"{getattr(base, 'is_gradient_checkpointing', '?')}, lm_head {base.lm_head.weight.dtype}, "
                 f"embeddings {base.get_input_embeddings().weight.dtype}")
    return model, optimizer, loss_fn, sum(p.numel() for p in params), notes


def child(side: str, args) -> None:
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from inside peft/transformers
    if side == "peer":
        try:
            import bitsandbytes  # noqa: F401
            import peft  # noqa: F401
        except Exception as e:  # not installed, or its native library failed to load
            print("RESULT " + json.dumps({"side": side, "unavailable": f"{type(e).__name__}: {e}"}), flush=True)
            return
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except Exception:
        pass
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base_alloc = torch.cuda.memory_allocated() if cuda else 0
    torch.manual_seed(args.seed)  # LoRA A's random init: the same in every round
    t0 = time.perf_counter()
    model, optimizer, loss_fn, trainable, notes = build(side, args)
    sync()
    build_s = time.perf_counter() - t0
    mem = {}
    if cuda:
        mem["build_peak_gib"] = (torch.cuda.max_memory_allocated() - base_alloc) / 2**30
        mem["after_build_gib"] = (torch.cuda.memory_allocated() - base_alloc) / 2**30
        torch.cuda.reset_peak_memory_stats()
    for note in notes:
        print(f"[{side}] {note}", flush=True)

    device = torch.device(args.device)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g).to(device)
    batch = {"input_ids": ids, "labels": ids.clone()}
    losses, times, grads_seen = [], [], None
    for i in range(args.warmup + args.steps):
        sync()
        start = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        if i == 0:  # LoRA B starts at zero: the first backward must reach every B
            grads_seen = sum(1 for g_ in (p.grad for group in optimizer.param_groups for p in group["params"]) if g_ is not None
                             and bool(g_.abs().sum() > 0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        elapsed = time.perf_counter() - start
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(elapsed)
        print(f"[{side}] step {i}{' (warm-up)' if i < args.warmup else ''}: {elapsed:.3f} s, loss {losses[-1]:.4f}",
              flush=True)
    if cuda:
        mem["step_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        mem["step_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print("RESULT " + json.dumps({
        "side": side, "times": times, "losses": losses, "initial_loss": losses[0], "last_loss": losses[-1],
        "trainable": trainable, "trainable_tensors": sum(len(g_["params"]) for g_ in optimizer.param_groups),
        "tensors_with_grad_at_step0": grads_seen, "build_s": build_s, "vocab": vocab, **mem,
        "device_name": torch.cuda.get_device_name() if cuda else "cpu", "torch_threads": torch.get_num_threads(),
    }), flush=True)


# --------------------------------------------------------------------------------------- parent
def run_child(side: str, argv: list[str], timeout: float) -> dict:
    """Runs one side, streaming its output; its RESULT dict, or {"error": ...}."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", side]
    result, code = shape.run_streaming(cmd, timeout)
    if code is None:
        return {"side": side, "error": f"killed after {timeout:.0f} s (--child-timeout / --time-budget)"}
    if code != 0 or result is None:
        return {"side": side, "error": f"subprocess exit {code}, no result (traceback above)"}
    return result


def main() -> None:
    args = parse_args()
    if args.child:
        return shape.run_as_child(child, args)

    start = time.monotonic()
    env = shape.print_header(args)
    print(f"batch {args.batch} x {args.seq} random tokens, LoRA r={args.rank} alpha={args.alpha:g} dropout 0 on "
          f"{','.join(MOE_TARGETS) + ' + experts' if args.moe else ','.join(TARGETS)}, NF4 + double quant, "
          f"{args.dtype} compute, sdpa, non-reentrant gradient checkpointing, "
          f"AdamW lr 1e-4 wd 0, {args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s), "
          f"device {args.device}", flush=True)
    shape.ensure_model(args.model_dir, args.layers, args.tiny, args.device, args.family)

    argv = [a for a in sys.argv[1:]]
    if "--model-dir" not in argv:
        argv += ["--model-dir", str(args.model_dir)]
    sides = [s for s in args.sides.split(",") if s]
    runs: dict[str, list[dict]] = {s: [] for s in sides}
    failures, unavailable = {}, {}
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            if side in failures or side in unavailable:
                continue
            left = args.time_budget - (time.monotonic() - start)
            if left < 30:
                print(f"!!! round {r} {side}: skipped, the --time-budget was spent", flush=True)
                if not runs[side]:
                    failures[side] = "skipped: the --time-budget was spent"
                continue
            print(f"--- round {r}: {side} ({left:.0f} s of the budget left)", flush=True)
            res = run_child(side, argv, min(args.child_timeout, left - 5))
            if "unavailable" in res:
                unavailable[side] = res["unavailable"]
                print(f"!!! {side}: bitsandbytes/peft not importable ({res['unavailable']}): running ours alone")
                continue
            if "error" in res:
                failures[side] = res["error"]
                print(f"!!! {side} FAILED: {res['error']}", flush=True)
                continue
            runs[side].append(res)
            mem = f", step peak {res['step_peak_gib']:.2f} GiB" if "step_peak_gib" in res else ""
            print(f"round {r} {side}: timed {' '.join(f'{t:.3f}' for t in res['times'])} s, first loss "
                  f"{res['initial_loss']:.4f}, last {res['last_loss']:.4f}, build {res['build_s']:.1f} s{mem}, "
                  f"trainable {res['trainable']:,}", flush=True)

    tokens = args.batch * args.seq
    rows = {}
    for side, results in runs.items():
        if not results:
            continue
        times = [t for res in results for t in res["times"]]
        row = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "n_steps": len(times),
               "initial_loss": results[0]["initial_loss"], "last_loss": results[0]["last_loss"],
               "trainable": results[0]["trainable"], "build_s": statistics.median(r_["build_s"] for r_ in results),
               "device_name": results[0]["device_name"]}
        row["tokens_per_s"] = tokens / row["median_s"]
        for key in ["build_peak_gib", "after_build_gib", "step_peak_gib", "step_reserved_gib"]:
            if key in results[0]:
                row[key] = max(r_[key] for r_ in results)
        rows[side] = row

    checks, warnings_ = {}, []
    if "ours" in rows and "peer" in rows:
        o, p = rows["ours"], rows["peer"]
        checks["speed_ratio_ours_over_peer"] = o["tokens_per_s"] / p["tokens_per_s"]
        if "step_peak_gib" in o:
            checks["memory_ratio_peer_over_ours"] = p["step_peak_gib"] / o["step_peak_gib"]
            checks["build_peak_ratio_peer_over_ours"] = p["build_peak_gib"] / o["build_peak_gib"]
        checks["loss_gap"] = abs(o["initial_loss"] - p["initial_loss"]) / p["initial_loss"]
        uniform = math.log(runs["ours"][0]["vocab"])
        excess_o, excess_p = o["initial_loss"] - uniform, p["initial_loss"] - uniform
        checks["excess_over_ln_vocab"] = {"ours": excess_o, "peer": excess_p}
        checks["excess_gap"] = abs(excess_o - excess_p) / max(abs(excess_p), 1e-9)
        if checks["loss_gap"] > 0.02:
            warnings_.append(f"!!! WARNING: first losses differ by {100 * checks['loss_gap']:.2f}% (> 2%): the two sides do "
                             f"NOT compute the same thing; do not trust the ratios !!!")
        elif checks["excess_gap"] > 0.10:
            warnings_.append(f"!!! WARNING: the first losses' excess over ln(vocab) differs by {100 * checks['excess_gap']:.1f}% "
                             f"(ours {excess_o:.4f}, peer {excess_p:.4f}): check that both compute the same model !!!")
        if o["trainable"] != p["trainable"]:
            warnings_.append(f"!!! WARNING: trainable parameters differ: ours {o['trainable']:,}, peer {p['trainable']:,} !!!")
    for side, results in runs.items():
        for res in results:
            if res["tensors_with_grad_at_step0"] == 0:
                warnings_.append(f"!!! WARNING: {side}: no trainable tensor got a non-zero gradient in the first step !!!")
            if not all(math.isfinite(x) for x in res["losses"]):
                warnings_.append(f"!!! WARNING: {side}: non-finite loss {res['losses']} !!!")

    name = "train-step-gpu-moe" if args.moe else "train-step-gpu"
    path = shape.out_path(f"{name}-tiny.json" if args.tiny else f"{name}.json")
    path.write_text(json.dumps({
        "environment": env, "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                         if k != "child"},
        "rows": rows, "runs": runs, "checks": checks, "failures": failures, "unavailable": unavailable,
        "warnings": warnings_}, indent=1) + "\n")

    device_name = next((row["device_name"] for row in rows.values()), env["device"])
    print(f"\nQLoRA step, {device_name}, {shape.layers_note(args.layers, args.tiny, args.family)}, "
          f"batch {args.batch} x {args.seq}, median of {args.steps * args.rounds} steps (written to {path})")
    print(f"{'side':<6}{'s/step':>9}{'tokens/s':>10}{'step peak GiB':>15}{'build peak':>12}{'after build':>13}"
          f"{'first loss':>12}{'last loss':>11}{'load s':>8}")
    def fmt(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    for side, row in rows.items():
        print(f"{side:<6}{row['median_s']:>9.3f}{row['tokens_per_s']:>10.0f}{fmt(row, 'step_peak_gib'):>15}"
              f"{fmt(row, 'build_peak_gib'):>12}{fmt(row, 'after_build_gib'):>13}{row['initial_loss']:>12.4f}"
              f"{row['last_loss']:>11.4f}{row['build_s']:>8.1f}")
    for side, why in {**failures, **unavailable}.items():
        print(f"{side:<6} not measured: {why}")
    if "speed_ratio_ours_over_peer" in checks:
        line = f"speed ours/peer {checks['speed_ratio_ours_over_peer']:.2f}x (>1: we are faster)"
        if "memory_ratio_peer_over_ours" in checks:
            line += f"   step-peak memory peer/ours {checks['memory_ratio_peer_over_ours']:.2f}x (>1: we use less)"
            line += f"   build peak peer/ours {checks['build_peak_ratio_peer_over_ours']:.2f}x"
        print(line)
        print(f"first-loss gap {100 * checks['loss_gap']:.3f}% (must be < 2%); excess over ln(vocab): ours "
              f"{checks['excess_over_ln_vocab']['ours']:.4f}, peer {checks['excess_over_ln_vocab']['peer']:.4f}")
    for w in warnings_:
        print(w)
    if failures or not rows:
        sys.exit(1)


if __name__ == "__main__":
    main()
