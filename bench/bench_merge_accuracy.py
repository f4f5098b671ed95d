"""Held-out accuracy of a merged adapter next to the unmerged one, on the default model.

    fourbit train                                   # writes fourbit-output/smollm2-default-task(-data)
    python bench/bench_merge_accuracy.py [--run fourbit-output/smollm2-default-task] [--dtypes float32,bfloat16]

Question: does ``fourbit merge`` keep what the adapter learned? The unmerged model is the one
``fourbit train`` evaluates: the embedded SmolLM2-135M-Instruct in NF4 + double quant with the
adapter on top, computing in the compute dtype load_model picks for this machine. Each merged
model is the folder ``merge_adapter`` writes, loaded by transformers alone
(``AutoModelForCausalLM.from_pretrained``, weights in the merge dtype, computing in float32 on a
CPU without native bf16, as the unmerged one does). Both answer the run's held-out set greedily
with the same evaluation code (train/evaluate.py: batched, left-padded, exact match); the
number of answers that differ between the two is printed too.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import tempfile
import time
from pathlib import Path

import torch
import transformers

import fourbit
from fourbit.io.datasets import load_rows, resolve_dataset
from fourbit.io.merge import merge_adapter
from fourbit.precision import native_bf16
from fourbit.train.evaluate import exact_match_accuracy


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="fourbit-output/smollm2-default-task", help="the output_dir of `fourbit train`")
    p.add_argument("--dtypes", default="float32,bfloat16")
    args = p.parse_args()
    run = Path(args.run)
    eval_file = run.with_name(run.name + "-data") / "eval.jsonl"
    conversations = resolve_dataset(str(eval_file), None)
    skills = [row.get("skill", "all") for row in load_rows(eval_file)]
    print(f"fourbit {fourbit.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"adapter {run}, held-out set {eval_file} ({len(conversations)} conversations)")

    model, tokenizer = fourbit.load_model(None)
    fourbit.load_adapter(model, run)
    start = time.perf_counter()
    unmerged = exact_match_accuracy(model, tokenizer, conversations, skills, max_new_tokens=16)
    print(f"unmerged (NF4 base + adapter): {unmerged['accuracy']:.1%} ({unmerged['correct']}/{unmerged['total']}) "
          f"in {time.perf_counter() - start:.0f} s")
    rows = [("unmerged", unmerged, None)]
    for dtype in args.dtypes.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            report = merge_adapter(None, run, Path(tmp) / "merged", dtype=dtype)
            merged = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "merged", dtype=getattr(torch, dtype))
            merged_tok = transformers.AutoTokenizer.from_pretrained(Path(tmp) / "merged")
            if dtype != "float32" and not native_bf16("cpu"):
                merged = merged.float()  # weights rounded to the merge dtype, arithmetic in float32
            result = exact_match_accuracy(merged, merged_tok, conversations, skills, max_new_tokens=16)
        differ = sum(a != b for a, b in zip(result["answers"], unmerged["answers"]))
        print(f"merged {dtype}: {result['accuracy']:.1%} ({result['correct']}/{result['total']}); logits vs unmerged "
              f"{report.merged_error:.1e} relative; {differ} of {result['total']} answers differ from the unmerged")
        rows.append((f"merged {dtype}", result, differ))

    print("\nmodel | held-out exact match | answers differing from unmerged")
    for name, result, differ in rows:
        print(f"{name} | {result['accuracy']:.1%} ({result['correct']}/{result['total']}) | {'-' if differ is None else differ}")


if __name__ == "__main__":
    main()
