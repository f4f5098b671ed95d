"""One LoRA training step on CPU: fourbit's QLoRA, transformers + bitsandbytes + peft, and
fourbit's LoRA on the unquantized model, side by side.

    python bench/bench_train_step.py [--compute-dtype auto|float32|bfloat16] [--steps 5] [--warmup 3]
                                     [--rounds 1] [--threads N] [--batch 4] [--seq 128]
                                     [--gradient-checkpointing] [--sides ours,peer,lora]
    python bench/bench_train_step.py --steps 1 --warmup 0 --layers 2 --threads 1   # smoke test

Question: how long does one QLoRA step of the default model (SmolLM2-135M-Instruct, a Llama:
hidden 576, 30 layers, vocab 49152, tied embeddings) take with fourbit, next to the usual
stack, and how much memory does each add? And what does 4 bits cost over no quantization at
all: the third side ("lora") trains the same adapters on the unquantized model, its weights in
the compute dtype (bf16 with "auto" on a CPU with native bf16: 16-bit LoRA), so ours / lora is
the price of dequantizing.

Method
- Same work on every side: the embedded SmolLM2 GGUF, dequantized (ours and lora: fourbit's
  loader, streaming; peer: transformers' GgufConfig(dequantize=True), saved once as a dense fp32
  folder under <fourbit cache>/bench/smollm2-hf), then NF4 + double quantization of every linear
  but lm_head (not on the lora side); the unquantized weights (embeddings, norms) in the compute
  dtype as fourbit's load_model keeps them, and so for the peer (dtype=, bnb_4bit_compute_dtype=);
  "auto" is resolved once in the parent, as fourbit resolves it (precision.py). LoRA r=16,
  alpha=32, dropout 0 on q,k,v,o,gate,up,down; AdamW lr 1e-4, weight decay 0 (fourbit's
  default; torch's own default of 0.01 is overridden); adapters in fp32 on every side
  (fourbit's default, and PEFT's autocast_adapter_dtype); one batch of random token ids (fixed
  seed, labels = inputs, all positions attended). Gradient checkpointing only with
  --gradient-checkpointing (non-reentrant everywhere; ours and lora as ``fourbit train`` turns it
  on, train/recipe.py; the peer through peft.prepare_model_for_kbit_training). Loss: ours =
  causal_lm_loss(...) / predicted tokens, peer = model(..., labels).loss; both the mean
  next-token cross-entropy.
- Sanity: LoRA B starts at 0, so each side's first loss is the base model's loss on the batch;
  ours and peer should agree within ~2% (same weights, same NF4 codes), lora within a few
  percent of them (NF4's rounding of the weights moves a random batch's loss by ~1%). Both are printed; a larger gap
  is flagged loudly, since a benchmark comparing different work is worthless.
- Each side runs in its own subprocess (peak memory is per side), all three alive at once and
  stepped in lockstep by the parent: one step of each side per cycle, in a rotating order (ours,
  peer, lora; peer, lora, ours; ...), one side at a time, 0.2 s apart (libgomp's idle threads
  stop spinning). This machine's speed drifts by a fifth within minutes; when each side ran its
  steps in its own stretch of time (the method before 2026-12-04), the drift between stretches
  moved the ratios by as much. Step = forward + backward + optimizer.step() + zero_grad(), timed
  with time.perf_counter; --warmup cycles are untimed (the first step also compiles fourbit's
  CPU kernels where they are compiled), then --steps x --rounds timed cycles. Each side's
  s/step is the median of its timed steps; the time ratios are the medians over cycles of the
  two sides' steps in the same cycle. torch threads (and OMP_NUM_THREADS) = --threads in every
  child.
- The machine: a VM that reports freed pages to its host (Linux free page reporting, as this
  project's Firecracker VMs do: /sys/module/page_reporting) takes back memory a process freed, and
  the process faults it in from the host when it maps memory again. The peer maps ~480 MB fresh
  at every step (its full logits and their gradient: blocks above glibc's 32 MiB heap ceiling);
  with the other sides' steps between its own it paid 0.95-1.6 s of system time a step there,
  against 0.2 s with the reporting held off (bench/RESULTS.md, issue 20). The environment line
  records the setting and a note is printed when pages are reported within 10 s; RESULTS' figures
  from 2026-12-05 (late) on were taken with it held off for a minute, as a bare machine runs
  (as root: echo 60000 > /sys/module/page_reporting/parameters/min_free_ms).
- Process: ours and lora keep glibc's freed blocks for reuse as ``fourbit train`` does
  (train/allocator.py); the peer runs with glibc's defaults, as its users run it.
- Memory: "peak added" = VmHWM (the kernel's high-water RSS, fourbit.peak_memory, reset through
  /proc/self/clear_refs just before building) minus RSS right before building the model, so the
  interpreter and imports are not counted; it includes load-time transients (and resident pages
  of memory-mapped checkpoint files). "after build" = RSS once model and optimizer are built
  (what the load left behind), "step peak" = the high-water mark over the training steps only;
  both minus the same baseline, so step peak - after build is what a step itself adds. "model" =
  bytes of the model's state (parameters, buffers, 4-bit quant states, LoRA), shared storage counted once.
- Reading it: peer/ours time = peer's step / ours in the same cycle, median over cycles (>1: we
  are faster); peer/ours peak = peer peak / ours (>1: we use less); ours/lora time = ours / lora's
  step likewise (1.10: 4 bits cost 10%). --layers N
  keeps only the first N decoder layers (after loading, on every side): a smoke test only, its
  numbers mean nothing. The table goes to bench/results/train-step-cpu-<dtype>.json (or $OUT
  when set).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata as md
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDLE_S = 0.2  # between two sides' steps: libgomp's idle threads spin for a while after a parallel region
SIDES = {"ours": "fourbit QLoRA", "peer": "transformers + bitsandbytes + peft", "lora": "fourbit LoRA, unquantized"}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=5, help="timed lockstep cycles (one step of each side), per round")
    p.add_argument("--warmup", type=int, default=3, help="untimed cycles first")
    p.add_argument("--rounds", type=int, default=1, help="multiplies --steps (kept for earlier commands)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32)
    p.add_argument("--layers", type=int, default=None, help="keep the first N layers (smoke tests only)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="dtype of the matmuls (and of the unquantized weights); auto: as fourbit chooses")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated subset of {','.join(SIDES)}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child", choices=[*SIDES, "prepare"], help=argparse.SUPPRESS)
    args = p.parse_args()
    args.sides = args.sides.split(",")
    if unknown := set(args.sides) - set(SIDES):
        p.error(f"unknown side(s) {sorted(unknown)}; expected some of {','.join(SIDES)}")
    return args


def peer_folder() -> Path:  # mirrors fourbit.io.default_model.cache_dir(), without importing torch here
    root = os.environ.get("FOURBIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "fourbit") / "bench" / "smollm2-hf"


# ------------------------------------------------------------------------------------- children
def rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def prepare() -> None:
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    from fourbit.io.default_model import default_model_path

    gguf, out = default_model_path(), peer_folder()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                 quantization_config=GgufConfig(dequantize=True))
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tmp.rename(out)
    print(f"saved the dense peer model to {out}")


def build(side: str, args):
    import torch

    dtype = getattr(torch, args.compute_dtype)  # resolved by the parent: float32 or bfloat16
    if side in ("ours", "lora"):
        import fourbit

        quantization = "nf4" if side == "ours" else None
        model, _ = fourbit.load_model(None, quantization=quantization, double_quant=True, compute_dtype=dtype)
        truncate(model, args.layers)
        fourbit.add_lora(model, r=args.rank, alpha=args.alpha, target="all-linear", verbose=False)
        from fourbit.nn.rms_norm import replace_rms_norms

        replace_rms_norms(model)  # as `fourbit train` does on a CPU (train/recipe.py)
        from fourbit.nn.short_attention import use_short_attention

        use_short_attention(model)  # likewise
        if args.gradient_checkpointing:  # as `fourbit train` turns it on (non-reentrant, 4-bit weights kept once)
            from fourbit.train.recipe import enable_gradient_checkpointing

            enable_gradient_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = fourbit.optim.build_optimizer("adamw", params, lr=1e-4)
        from fourbit.train.recipe import causal_lm_loss

        def loss_fn(batch):
            return causal_lm_loss(model, batch) / (batch["labels"][:, 1:] != -100).sum()
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        model = AutoModelForCausalLM.from_pretrained(peer_folder(), dtype=dtype, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
        truncate(model, args.layers)
        if args.gradient_checkpointing:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                    gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS,
                                                 lora_dropout=0.0, task_type="CAUSAL_LM"))
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)

        def loss_fn(batch):
            return model(**batch, use_cache=False).loss
    model.config.use_cache = False
    model.train()
    return model, optimizer, loss_fn, sum(p.numel() for p in params)


def truncate(model, layers: int | None) -> None:
    if layers is not None:
        del model.model.layers[layers:]
        model.config.num_hidden_layers = layers
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:layers]


def child(side: str, args) -> None:
    """Build one side, say READY, then run one step per "step" line on stdin (answering STEP with its
    time and loss) until "done", and answer RESULT with the memory figures."""
    import torch
    import transformers

    from fourbit.peak_memory import measured_peak, reset_peak

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes from inside peft/transformers
    if side in ("ours", "lora"):  # as `fourbit train` sets its process up (cli.py)
        from fourbit.train.allocator import keep_freed_memory

        keep_freed_memory()
    before, reset = rss_kib(), reset_peak("cpu")
    model, optimizer, loss_fn, trainable = build(side, args)
    build_peak, ready = measured_peak("cpu").bytes // 1024, rss_kib()
    state = {id(t.untyped_storage()): t for t in model.state_dict().values()}  # shared storage once
    model_bytes = sum(t.untyped_storage().nbytes() for t in state.values())

    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    reset_peak("cpu")
    print("READY", flush=True)
    for command in sys.stdin:
        if command.strip() != "step":
            break
        start = time.perf_counter()
        loss = loss_fn(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"STEP {time.perf_counter() - start} {loss.item()}", flush=True)
    step_peak = measured_peak("cpu").bytes // 1024
    print("RESULT " + json.dumps({
        "side": side, "trainable": trainable, "threads": torch.get_num_threads(),
        "peak_added_mib": (max(build_peak, step_peak) - before) / 1024,
        "ready_added_mib": (ready - before) / 1024, "step_peak_added_mib": (step_peak - before) / 1024,
        "model_mib": model_bytes / 2**20, "peak_reset": reset,
    }), flush=True)


# --------------------------------------------------------------------------------------- parent
def environment(threads: int) -> dict:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.partition(":")[2].strip()
            break
    versions = {}
    for name in ["torch", "transformers", "bitsandbytes", "peft", "fourbit"]:
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            versions[name] = "not installed"
    from fourbit.precision import cpu_kind, resolve_compute_dtype

    return {"device": cpu, "cpu_kind": cpu_kind(), "auto_compute_dtype": str(resolve_compute_dtype("auto", "cpu")),
            "threads": threads, "free_page_reporting": free_page_reporting(), **versions,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def free_page_reporting() -> dict[str, int] | None:
    """The kernel's free page reporting (a VM handing freed memory back to its host), as its module's
    parameters say, or None where there is none."""
    params = Path("/sys/module/page_reporting/parameters")
    if not params.is_dir():
        return None
    return {p.name: int(p.read_text()) for p in sorted(params.iterdir())
            if p.name in ("page_reporting_order", "min_free_ms")}


def warn_about_page_reporting(setting: dict[str, int] | None) -> None:
    """A VM that reports freed pages to its host soon after they are freed makes a side that maps
    fresh memory at every step (the peer: its full logits and their gradient, ~480 MB a step) pay
    the host's faults too, and more so the longer the other sides run between its steps."""
    if setting is not None and setting.get("min_free_ms", 10_000) < 10_000:
        print(f"note: this VM reports freed pages to its host ({setting}): a side that maps fresh memory at "
              "every step (the peer) runs slower here than on a bare machine, and slower with more sides; "
              "bench/RESULTS.md (issue 20) says how much and how the figures there were taken")


class Child:
    """One side's subprocess, stepped by the parent."""

    def __init__(self, side: str, argv: list[str], threads: int):
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        self.side = side
        self.proc = subprocess.Popen([sys.executable, __file__, *argv, "--child", side], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._expect("READY")

    def _expect(self, tag: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(tag):
                return line[len(tag):].strip()
            print(line, end="")
        sys.exit(f"the {self.side} subprocess failed (exit {self.proc.wait()}); its traceback is above")

    def step(self) -> tuple[float, float]:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        seconds, loss = self._expect("STEP ").split()
        return float(seconds), float(loss)

    def finish(self) -> dict:
        self.proc.stdin.write("done\n")
        self.proc.stdin.close()
        result = json.loads(self._expect("RESULT "))
        self.proc.wait()
        return result


def prepare_peer(argv: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if subprocess.run([sys.executable, __file__, *argv, "--child", "prepare"], env=env).returncode != 0:
        sys.exit("preparing the peer's dense folder failed; its traceback is above")


def main() -> None:
    args = parse_args()
    if args.child == "prepare":
        return prepare()
    if args.child:
        return child(args.child, args)

    env = environment(args.threads)
    command = "python bench/bench_train_step.py " + " ".join(sys.argv[1:])
    if args.compute_dtype == "auto":
        args.compute_dtype = env["auto_compute_dtype"].removeprefix("torch.")
    print("  ".join(f"{k}: {v}" for k, v in env.items()))
    warn_about_page_reporting(env["free_page_reporting"])
    print(f"batch {args.batch} x {args.seq} tokens, LoRA r={args.rank} alpha={args.alpha:g} on {','.join(TARGETS)}, "
          f"NF4 + double quant, {args.compute_dtype} compute, AdamW lr 1e-4, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}, layers {args.layers or 'all'}, "
          f"{args.warmup} warm-up + {args.steps} timed steps x {args.rounds} round(s)")
    argv = [*sys.argv[1:], "--compute-dtype", args.compute_dtype]  # the children's: resolved (argparse keeps the last)
    if "peer" in args.sides and not (peer_folder() / "config.json").is_file():
        print(f"preparing the dense peer folder {peer_folder()} (once)")
        prepare_peer(argv, args.threads)

    children = {side: Child(side, argv, args.threads) for side in args.sides}  # built one after another
    times = {side: [] for side in args.sides}
    losses = {side: [] for side in args.sides}
    for cycle in range(args.warmup + args.steps * args.rounds):
        order = args.sides[cycle % len(args.sides):] + args.sides[:cycle % len(args.sides)]
        for side in order:
            time.sleep(IDLE_S)  # the last side's OpenMP threads stop spinning before this one runs
            seconds, loss = children[side].step()
            losses[side].append(loss)
            if cycle >= args.warmup:
                times[side].append(seconds)
        if cycle >= args.warmup:
            print(f"cycle {cycle - args.warmup}: " + "  ".join(f"{side} {times[side][-1]:.3f} s" for side in order),
                  flush=True)
    results = {side: child_.finish() for side, child_ in children.items()}

    tokens = args.batch * args.seq
    rows = {}
    for side, res in results.items():
        rows[side] = {
            "median_s": statistics.median(times[side]), "peak_added_mib": res["peak_added_mib"],
            "ready_added_mib": res["ready_added_mib"], "step_peak_added_mib": res["step_peak_added_mib"],
            "model_mib": res["model_mib"], "initial_loss": losses[side][0], "last_loss": losses[side][-1],
            "trainable": res["trainable"], "times": times[side],
        }
        rows[side]["tokens_per_s"] = tokens / rows[side]["median_s"]

    def paired(a: str, b: str) -> float:  # the median over cycles of a's step / b's step in the same cycle
        return statistics.median(x / y for x, y in zip(times[a], times[b]))

    ratios = {}
    if {"ours", "peer"} <= rows.keys():
        ratios["peer/ours time"] = paired("peer", "ours")
        ratios["peer/ours peak"] = rows["peer"]["peak_added_mib"] / rows["ours"]["peak_added_mib"]
    if {"ours", "lora"} <= rows.keys():
        ratios["ours/lora time"] = paired("ours", "lora")
    gaps = {side: abs(row["initial_loss"] - rows["ours"]["initial_loss"]) / rows["ours"]["initial_loss"]
            for side, row in rows.items() if side != "ours" and "ours" in rows}

    print(f"\n{'side':<6}{'s/step':>9}{'tokens/s':>10}{'peak added MiB':>16}{'after build':>13}{'step peak':>11}"
          f"{'model MiB':>11}{'first loss':>12}   {args.compute_dtype} compute")
    for side, row in rows.items():
        print(f"{side:<6}{row['median_s']:>9.3f}{row['tokens_per_s']:>10.1f}{row['peak_added_mib']:>16.0f}"
              f"{row['ready_added_mib']:>13.0f}{row['step_peak_added_mib']:>11.0f}{row['model_mib']:>11.1f}"
              f"{row['initial_loss']:>12.4f}   {SIDES[side]}")
    meaning = {"peer/ours time": ">1: we are faster", "peer/ours peak": ">1: we use less",
               "ours/lora time": "what 4 bits cost over the unquantized model"}
    print("   ".join(f"{name} {value:.2f}x ({meaning[name]})" for name, value in ratios.items()))
    if not all(res["peak_reset"] for res in results.values()):
        print("note: /proc/self/clear_refs was not writable: peaks are since process start, step peak = overall peak")
    limits = {"peer": 0.02, "lora": 0.05}  # same NF4 codes; NF4's rounding of every weight (see Method)
    for side, gap in gaps.items():
        if gap > limits[side]:
            print(f"\n!!! WARNING: first losses of ours and {side} differ by {100 * gap:.1f}% (> {100 * limits[side]:.0f}%):"
                  f" the two do NOT compute the same thing; do not trust their ratio !!!")

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"train-step-cpu-{args.compute_dtype}.json"
    path.write_text(json.dumps({"command": command, "environment": env,
                                "settings": {k: v for k, v in vars(args).items() if k != "child"}, "rows": rows,
                                "ratios": ratios, "first_loss_gaps": gaps}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
