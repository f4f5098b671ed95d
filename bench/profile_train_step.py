"""Where a LoRA training step's CPU time goes: torch.profiler over one step of
bench/bench_train_step.py (same model, batch and settings), one side per process.

    python bench/profile_train_step.py --side ours|peer|lora [--compute-dtype auto] [--steps 2]
    (and bench_train_step.py's other options: --batch, --seq, --threads, --gradient-checkpointing, ...)

Prints the step's time by category, summed over --steps profiled steps (after two untimed
ones) and divided by their number, then the operators with the most self time. Categories,
from operator self times (first match wins):
- 4-bit dequantize: fourbit's dequantize op and its compiled kernel (on a CPU nothing else is
  compiled here), bitsandbytes' dequantize ops;
- logits (head products): matrix products with the vocabulary (49,152) as a dimension;
- LoRA products: matrix products with the rank as a dimension;
- base products: the other matrix products (the frozen linears, forward and dL/dx);
- attention, cross-entropy / softmax, copies and casts (aten::copy_ / _to_copy);
- optimizer: the inclusive time of AdamW's step and zero_grad (taken out of "other", where its
  elementwise operators fall);
- other: the rest (norms, activations, elementwise, Python-side overhead the profiler sees).
fourbit's C kernels (kernels/cpu: dequantization, the float32 4-bit products of AVX-512/AVX2
builds, the adapters' rank-r products, the norms) are
not aten operators: their time is the self time of the autograd node that calls them
(_QLoRALinear and its backward, _RMSNorm), in "other", and its top operators list shows them.
The profiler adds overhead per operator, so the total exceeds the step's time unprofiled; read
the shares, and the timed figures of bench_train_step.py. Writes the text to $OUT (or
bench/results)/profile-cpu-<side>-<dtype>.txt.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

import bench_train_step as bench
import torch

NAMED = [  # (category, substrings of the lower-cased operator name); first match wins
    ("4-bit dequantize", ("dequantize", "compiledfxgraph", "torch-compiled region", "torchdynamo", "pregraph",
                          "aotdispatcher")),
    ("attention", ("scaled_dot_product", "attention")),
    ("cross-entropy / softmax", ("softmax", "nll_loss", "cross_entropy", "logsumexp")),
    ("copies and casts", ("aten::copy_", "aten::_to_copy")),
]
PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
            "mkldnn::_linear_pointwise")  # the last: products with a prepacked weight (the head in the loss)


def category(name: str, shapes: list, vocab: int, rank: int) -> str:
    lowered = name.lower()
    if lowered in PRODUCTS:
        dims = {d for shape in shapes for d in shape}
        if vocab in dims:
            return "logits (head products)"
        return "LoRA products" if rank in dims else "base products"
    return next((c for c, keys in NAMED if any(k in lowered for k in keys)), "other")


def main() -> None:
    argv = sys.argv[1:]
    side = argv[argv.index("--side") + 1] if "--side" in argv else "ours"
    sys.argv = [sys.argv[0]] + [a for i, a in enumerate(argv) if a != "--side" and (i == 0 or argv[i - 1] != "--side")]
    args = bench.parse_args()
    if args.compute_dtype == "auto":
        from fourbit.precision import resolve_compute_dtype

        args.compute_dtype = str(resolve_compute_dtype("auto", "cpu")).removeprefix("torch.")
    torch.set_num_threads(args.threads)
    model, optimizer, loss_fn, _ = bench.build(side, args)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    def step():
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    steps = max(1, args.steps)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    vocab, times = model.config.vocab_size, collections.Counter()
    by_operator = collections.Counter()
    optimizer_ms = 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        ms = event.self_cpu_time_total / 1e3 / steps
        if event.key.startswith("Optimizer."):
            optimizer_ms += event.cpu_time_total / 1e3 / steps
            continue
        times[category(event.key, [s for s in event.input_shapes if s], vocab, args.rank)] += ms
        by_operator[event.key] += ms
    times["other"] -= optimizer_ms  # the optimizer's own operators were counted above by name
    times["optimizer"] = optimizer_ms
    total = sum(times.values())
    lines = [f"{side}: {args.compute_dtype} compute, batch {args.batch} x {args.seq}, {args.threads} threads, "
             f"{steps} step(s) profiled: {total:.0f} ms of CPU time per step (profiled)", "", "by category:"]
    lines += [f"  {c:<26} {ms:8.1f} ms  {100 * ms / total:5.1f}%" for c, ms in times.most_common()]
    lines += ["", "top operators (self time):"]
    lines += [f"  {ms:8.1f} ms  {100 * ms / total:5.1f}%  {name[:100]}" for name, ms in by_operator.most_common(15)]
    text = "\n".join(lines)
    print(text)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).resolve().parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"profile-cpu-{side}-{args.compute_dtype}.txt").write_text(text + "\n")


if __name__ == "__main__":
    main()
