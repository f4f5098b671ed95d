"""Where a QLoRA step's GPU time goes: torch.profiler over the training step of
bench/bench_train_step_gpu.py (same model, batch and settings), one side per process.

    python bench/profile_train_step_gpu.py --side ours|peer [--layers 32] [--steps 2]

Prints the kernels with the most GPU time and the time per category (4-bit dequantization,
matrix products, attention, elementwise/norm/other), summed over the profiled steps and
divided by their number. Writes the table to $OUT (or bench/results)/profile-<side>.txt.
"""

from __future__ import annotations

import collections
import sys

import _llama_shape as shape
import bench_train_step_gpu as train_bench
import torch

CATEGORIES = [  # first match wins; names as CUDA kernels are called by cuBLAS, Triton, bnb, torch
    ("4-bit dequantize", ("dequantize", "kdequant")),
    ("matmul (cuBLAS)", ("gemm", "gemv", "sm90_xmma", "cutlass", "nvjet")),
    ("attention", ("flash", "fmha", "attention", "efficient")),
    ("cross-entropy / softmax", ("softmax", "nll", "log_softmax", "cross_entropy")),
    ("optimizer", ("adam", "foreach", "multi_tensor")),
]


def main() -> None:
    argv = sys.argv[1:]
    side = argv[argv.index("--side") + 1] if "--side" in argv else "ours"
    argv = [a for i, a in enumerate(argv) if a != "--side" and (i == 0 or argv[i - 1] != "--side")]
    args = train_bench.parse_args(argv)
    shape.ensure_model(args.model_dir, args.layers, args.tiny, args.device)
    model, optimizer, loss_fn, _, notes = train_bench.build(side, args)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    batch = {"input_ids": ids, "labels": ids.clone()}

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def step():
        loss_fn(batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    sync()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            step()
        sync()
    kernels = collections.Counter()
    for event in prof.key_averages():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key] += event.self_device_time_total / 1e3 / args.steps  # ms per step
    by_category = collections.Counter()
    for name, ms in kernels.items():
        lowered = name.lower()
        category = next((c for c, keys in CATEGORIES if any(k in lowered for k in keys)), "other")
        by_category[category] += ms
    total = sum(kernels.values())
    if total == 0:
        raise SystemExit("the profiler recorded no GPU kernels (this script profiles a CUDA run)")
    lines = [f"{side}: layers {args.layers}, batch {args.batch} x {args.seq}, GPU time per step {total:.1f} ms "
             f"(kernels only, {args.steps} steps profiled); {'; '.join(notes)}", "", "by category:"]
    lines += [f"  {c:<26} {ms:8.1f} ms  {100 * ms / total:5.1f}%" for c, ms in by_category.most_common()]
    lines += ["", "top kernels:"]
    lines += [f"  {ms:8.2f} ms  {100 * ms / total:5.1f}%  {name[:110]}" for name, ms in kernels.most_common(25)]
    text = "\n".join(lines)
    print(text)
    (shape.out_path(f"profile-{side}.txt")).write_text(text + "\n")


if __name__ == "__main__":
    main()
