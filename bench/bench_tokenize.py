"""Tokenizing a training set in worker processes: fourbit's preprocessing_num_workers vs datasets.map(num_proc).

    python bench/bench_tokenize.py [--rows 8000] [--workers 1,2] [--rounds 2]

Question: what does ``preprocessing_num_workers`` buy, and does fourbit's process pool do as
well as the mechanism LLaMA-Factory uses for the same key (``datasets.Dataset.map`` with
``num_proc``)?

Method
- Data: ``--rows`` alpaca rows of the embedded model's kind of task (a short instruction, an
  input of 20-60 words, an answer of 20-60 words), made from a fixed seed; the embedded
  SmolLM2-135M-Instruct tokenizer with its own chat template (``template: auto``), cutoff 1024.
- Ours: ``fourbit.train.data.encode_dataset(..., workers=N)`` on the conversations, with
  ``MIN_ROWS_PER_WORKER`` as shipped (so N workers are used only where the rows allow it; the
  line says how many ran). The peer: ``datasets.Dataset.from_list(conversations).map(f,
  num_proc=N)`` where ``f`` is fourbit's own ``encode_conversation`` on one row: the same work
  per row, so the ratio compares the two ways of spreading it, not two tokenizers.
- Every timed pass includes starting its workers (a user's run pays that too). Sides alternate
  within each round, the median of ``--rounds`` is reported. Before timing, the two sides'
  token ids are checked equal.
- Output: one line per (side, N) with rows/s and the speed-up over N=1; JSON in
  bench/results/tokenize-cpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import datasets
import torch
import transformers

from fourbit.chat_templates import apply_template
from fourbit.io.sources import open_source
from fourbit.train import data

WORDS = ("river stone cloud maple ember harbor violet apple quiet bright measure garden winter "
         "signal copper lantern meadow orbit puzzle thunder velvet whisper yellow zenith").split()


def make_rows(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60)))
        rows.append([{"role": "user", "content": f"Summarize item {i}.\n{text}"},
                     {"role": "assistant", "content": answer}])
    return rows


def ours(tokenizer, conversations, workers: int) -> list[dict]:
    return data.encode_dataset(tokenizer, conversations, 1024, workers=workers)


def peer(tokenizer, conversations, workers: int) -> list[dict]:
    table = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    mapped = table.map(lambda row: data.encode_conversation(tokenizer, row["messages"], 1024),
                       num_proc=workers if workers > 1 else None, remove_columns=["messages"],
                       load_from_cache_file=False, keep_in_memory=True)
    return mapped.to_list()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8000)
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    datasets.disable_progress_bars()
    tokenizer = apply_template(open_source(None).tokenizer(), "auto")
    conversations = make_rows(args.rows)
    counts = [int(w) for w in args.workers.split(",")]
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"datasets {datasets.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
          f"{args.rows} rows, MIN_ROWS_PER_WORKER {data.MIN_ROWS_PER_WORKER}")
    check = min(200, args.rows)
    assert ours(tokenizer, conversations[:check], 1) == [
        {"input_ids": r["input_ids"], "labels": r["labels"]} for r in peer(tokenizer, conversations[:check], 1)]
    times: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for n in counts:
            for side, fn in (("fourbit", ours), ("datasets.map", peer)):
                start = time.perf_counter()
                fn(tokenizer, conversations, n)
                times.setdefault((side, n), []).append(time.perf_counter() - start)
    results = []
    for (side, n), seconds in times.items():
        median = statistics.median(seconds)
        used = min(n, args.rows // data.MIN_ROWS_PER_WORKER, os.cpu_count() or 1) if side == "fourbit" else n
        base = statistics.median(times[(side, counts[0])])
        results.append({"side": side, "workers": n, "processes_used": max(used, 1), "seconds": round(median, 2),
                        "rows_per_s": round(args.rows / median), "speedup_over_first": round(base / median, 2)})
        print(f"{side:13s} workers={n}  used={max(used, 1)}  {median:6.2f} s  {args.rows / median:7.0f} rows/s  "
              f"x{base / median:.2f} over workers={counts[0]}")
    for n in counts:
        ratio = statistics.median(times[("datasets.map", n)]) / statistics.median(times[("fourbit", n)])
        print(f"workers={n}: datasets.map time / fourbit time = {ratio:.2f} (> 1: fourbit faster)")
    out = Path(os.environ.get("OUT", Path(__file__).parent / "results")) / "tokenize-cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"argv": sys.argv[1:], "results": results}, indent=2))


if __name__ == "__main__":
    main()
