"""Where QLoRA's accuracy goes: the main job as (a) 16-bit LoRA, (b) LoRA on a dense base holding
the NF4-dequantized weights, (c) QLoRA, at each compute dtype and seed.

    python bench/qlora_gap.py [--variants a,b,c] [--dtypes bfloat16,float32] [--seeds 0,1,2,3,4]
                              [--results bench/qlora-gap.jsonl] [--table]

Question: when QLoRA scores below 16-bit LoRA on the main job, is it NF4's rounding of the weights
(then b ~ c) or fourbit's 4-bit training path (then c < b)?

Method
- The main job exactly as ``fourbit train seed=S compute_dtype=D`` runs it (demo/config.py:
  SmolLM2-135M-Instruct, the generated task, 100 steps, r=16 on every linear), one process per
  run, scored by its held-out exact match after training (90 questions).
- (a) ``quantization_bit=none``: the base in the compute dtype. (c) the default: NF4 with double
  quantization, block 64. (b) the model of (c) loaded, each 4-bit linear dequantized (in fp32,
  then held in the compute dtype) into the unquantized model of (a) in its place: the weights
  QLoRA trains against, with no 4-bit code path. The adapters, data order and schedule are the
  seed's on all three (train/run.py ``adapt_and_train``).
- (p) the peer in the same harness: the same model (fourbit's safetensors copy of the embedded
  GGUF, fp32) loaded by transformers with bitsandbytes' NF4 + double quant at the compute dtype,
  ``peft.prepare_model_for_kbit_training`` (it casts every unquantized weight to fp32) and a
  LoraConfig of the same rank, alpha and targets; trained on fourbit's tokenized rows in the same
  batches (``data.batches`` of the seed), with torch's AdamW, transformers' cosine schedule, the
  same warm-up and clipping, the loss transformers' model returns; scored by the same greedy
  exact-match code on the same 90 questions.
- Each run appends one JSON line to ``--results`` (variant, dtype, seed, accuracy before and
  after, final loss, seconds, versions, CPU); runs already there are skipped, so the script can be
  stopped and rerun. ``--table`` prints the means by variant and dtype from that file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = {"a": "16-bit LoRA", "b": "LoRA on the dequantized NF4 weights", "c": "QLoRA (NF4 + double quant)",
            "p": "transformers + bitsandbytes + peft QLoRA"}


def one_run(variant: str, dtype: str, seed: int) -> dict:
    """Train and score one (variant, dtype, seed); runs in its own process."""
    import torch
    import transformers

    import fourbit
    from fourbit.demo.config import default_config
    from fourbit.nn.linear4bit import Linear4bit
    from fourbit.precision import cpu_kind
    from fourbit.train.run import adapt_and_train, run

    with tempfile.TemporaryDirectory() as scratch:
        overrides = [f"seed={seed}", f"compute_dtype={dtype}", f"output_dir={scratch}/out"]
        config = default_config(overrides + (["quantization_bit=none"] if variant == "a" else []))
        start = time.perf_counter()
        if variant == "p":
            result = _peer_run(config, getattr(torch, dtype))
        elif variant == "b":
            four_bit, _ = fourbit.load_model(config.model_name_or_path, quantization="nf4", double_quant=True,
                                             blocksize=64, compute_dtype=dtype)
            dense, tokenizer = fourbit.load_model(config.model_name_or_path, quantization=None, compute_dtype=dtype)
            with torch.no_grad():
                for name, module in four_bit.named_modules():
                    if isinstance(module, Linear4bit):
                        target = dense.get_submodule(name).weight
                        target.copy_(module.dequantize(torch.float32).to(target.dtype))
            del four_bit
            result = adapt_and_train(dense, tokenizer, config)
        else:
            result = run(config)
        seconds = time.perf_counter() - start
    return {"variant": variant, "dtype": dtype, "seed": seed,
            "accuracy_before": result.eval_before["accuracy"], "accuracy_after": result.eval_after["accuracy"],
            "final_loss": result.losses[-1], "seconds": round(seconds, 1), "train_seconds": round(result.seconds, 1),
            "date": time.strftime("%Y-%m-%d"), "cpu": cpu_kind(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _peer_run(config, dtype):
    """The main job through transformers + bitsandbytes + peft; returns what train() would."""
    import math
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, get_scheduler

    from fourbit.chat_templates import apply_template, pad_id
    from fourbit.io.datasets import resolve_dataset
    from fourbit.io.sources import open_source
    from fourbit.train.data import batches, collate, encode_dataset, steps_per_epoch
    from fourbit.train.evaluate import greedy_answers, score_answers

    source = open_source(config.model_name_or_path)
    tokenizer = apply_template(source.tokenizer(), config.template)
    examples = encode_dataset(tokenizer, resolve_dataset(config.dataset, config.dataset_dir), config.cutoff_len)
    questions = resolve_dataset(config.eval_dataset)
    model = AutoModelForCausalLM.from_pretrained(source.hf_folder(), dtype=dtype, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    torch.manual_seed(config.seed)
    model = get_peft_model(model, LoraConfig(r=config.lora_rank, lora_alpha=config.alpha, target_modules="all-linear",
                                             lora_dropout=config.lora_dropout, task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = config.warmup_steps or math.ceil(config.warmup_ratio * config.max_steps)
    scheduler = get_scheduler(config.lr_scheduler_type, optimizer, num_warmup_steps=warmup,
                              num_training_steps=config.max_steps)
    # No score before training: on a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its
    # weight in place for its inference kernel at the first forward in eval mode without grad
    # (_convert_weight_packed_for_cpu), and training after that diverged (loss 3.0-3.4 at the end,
    # 0 of 90 right, at both dtypes; the same loop without the evaluation before it tracks
    # fourbit's losses to 3 decimals). The base model's score is fourbit's "before" (0 of 90).
    before = {"accuracy": None}
    model.config.use_cache = False
    model.train()
    per_epoch, losses, epoch = steps_per_epoch(len(examples), config.per_device_train_batch_size), [], 0
    start = time.perf_counter()
    while len(losses) < config.max_steps:
        for step, indices in enumerate(batches(len(examples), config.per_device_train_batch_size, config.seed, epoch)):
            if len(losses) == config.max_steps or step == per_epoch:
                break
            batch = collate([examples[i] for i in indices], pad_id(tokenizer))
            loss = model(**batch, use_cache=False).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        epoch += 1
    seconds = time.perf_counter() - start
    after = score_answers(greedy_answers(model, tokenizer, questions, config.eval_max_new_tokens), questions)
    return SimpleNamespace(eval_before=before, eval_after=after, losses=losses, seconds=seconds)


def table(path: Path) -> None:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    seeds = sorted({r["seed"] for r in rows})
    for dtype in sorted({r["dtype"] for r in rows}):
        print(f"\n{dtype}: held-out exact match after training, by seed")
        print("| variant | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
        print("|---|" + "---|" * (len(seeds) + 1))
        for variant, name in VARIANTS.items():
            scores = {r["seed"]: r["accuracy_after"] for r in rows if r["dtype"] == dtype and r["variant"] == variant}
            if scores:
                cells = " | ".join(f"{scores[s]:.1%}" if s in scores else "" for s in seeds)
                print(f"| ({variant}) {name} | {cells} | {statistics.mean(scores.values()):.1%} (n={len(scores)}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="a,b,c")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--seeds", default="0,1,2,3,4")
    # kept in the repository (bench/results/ is not): a sweep takes hours, and a rerun skips what is there
    parser.add_argument("--results", type=Path, default=Path(__file__).parent / "qlora-gap.jsonl")
    parser.add_argument("--table", action="store_true", help="print the table from --results and stop")
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "DTYPE", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one_run(args.one[0], args.one[1], int(args.one[2]))))
        return
    if args.table:
        return table(args.results)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if args.results.exists():
        done = {(r["variant"], r["dtype"], r["seed"]) for r in map(json.loads, args.results.read_text().splitlines())}
    for seed in map(int, args.seeds.split(",")):  # seeds outermost: an interrupted sweep leaves whole seeds
        for dtype in args.dtypes.split(","):
            for variant in args.variants.split(","):
                if (variant, dtype, seed) in done:
                    continue
                out = subprocess.run([sys.executable, __file__, "--one", variant, dtype, str(seed)],
                                     capture_output=True, text=True, env=os.environ | {"TQDM_DISABLE": "1"})
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    sys.exit(f"({variant}, {dtype}, seed {seed}) failed:\n{out.stderr[-3000:]}")
                record = json.loads(line.removeprefix("RESULT "))
                with args.results.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                before = "" if record["accuracy_before"] is None else f"{record['accuracy_before']:.1%} -> "
                print(f"({variant}) {dtype} seed {seed}: {before}{record['accuracy_after']:.1%}, "
                      f"loss {record['final_loss']:.3f}, {record['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
