"""fourbit's decode step (serve/decode_step.py) against transformers' forward, per decoded token,
and the native decoding kernels (kernels/cpu/decode.c) against their torch twins.

    python bench/bench_decode_step.py [--tokens 40] [--rounds 4]
    FOURBIT_CPU_BF16=0 python bench/bench_decode_step.py      # float32 on an AVX512-BF16 CPU

Questions: (1) what one decoded token of the embedded SmolLM2-135M-Instruct (NF4, from the 4-bit
codes, the compute dtype load_model picks) costs through the step (each layer one native
DecodeLayer: kernels/cpu/decode_layer.c), through the step op by op (``fuse_layers=False``: each
kernel called from Python) and through transformers' forward, on the same model and cache
contents; (2) what the step's attention, RMS norm and rotary kernels cost against the torch code
they replace, at SmolLM2's shapes.

Method
- (1) A chat prompt prefilled through the model's forward; then --tokens greedy steps, the
  first 5 not timed, median ms a step. Per round, each variant gets a fresh prefill of the same
  prompt; the variants alternate, --rounds rounds, medians of the rounds' medians; each step's
  greedy tokens are compared with the forward's (reported, not required: bf16 attention rounds
  once in the step).
- (2) ``timeit``-style: 200 warm-up calls, then the mean of 2,000, each kernel after its twin,
  inputs fixed (bf16 and float32; attention at 70, 300 and 2,000 cached positions, 9 query and
  3 key/value heads of 64).
- Output: a short table; JSON to $OUT or bench/results/decode-step-cpu-<dtype>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path

import torch
import transformers

import fourbit
from fourbit.kernels.cpu import native
from fourbit.kernels.decode_attention import decode_attention_reference
from fourbit.kernels.rms_norm import rms_norm_reference
from fourbit.kernels.rotary import rotated_reference
from fourbit.precision import cpu_kind
from fourbit.serve.decode_step import DecodeStep

PROMPT = [{"role": "user", "content": "Tell me about the ocean in three sentences."}]  # bench_serve.py's
FORWARD = "transformers' forward"
OP_BY_OP = "decode step, op by op"


@torch.no_grad()
def decode(model, ids: list[int], tokens: int, step: DecodeStep | None) -> tuple[float, list[int]]:
    """Median seconds a step after the prompt ``ids``, and the greedy tokens."""
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    mask = torch.ones(1, len(ids), dtype=torch.long)
    times, made = [], []
    for _ in range(tokens):
        start = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
        positions = mask.sum(1, keepdim=True) - 1
        if step is not None:
            logits = step(token, mask, positions, cache)
        else:
            logits = model(input_ids=token, attention_mask=mask, position_ids=positions, past_key_values=cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
        token = logits.argmax(-1, keepdim=True)
        times.append(time.perf_counter() - start)
        made.append(int(token))
    return statistics.median(times[5:]), made


def per_call(fn, calls: int = 2000) -> float:
    for _ in range(200):
        fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def rotated_pair(q, k, cos, sin):  # what the native rotate_ does to both, in torch
    return rotated_reference(q, cos[:, None], sin[:, None]), rotated_reference(k, cos[:, None], sin[:, None])


@torch.no_grad()
def kernels() -> list[dict]:
    rows = []
    for dtype in (torch.bfloat16, torch.float32):
        g = torch.Generator().manual_seed(0)
        x, w = torch.randn(1, 1, 576, generator=g).to(dtype), torch.randn(576, generator=g).to(dtype)
        q, k = torch.randn(1, 9, 64, generator=g).to(dtype), torch.randn(1, 3, 64, generator=g).to(dtype)
        cos, sin = torch.randn(1, 64, generator=g).to(dtype), torch.randn(1, 64, generator=g).to(dtype)
        cases = {"rms norm (576)": (partial(rms_norm_reference, x, w, 1e-5), partial(native.rms_norm, x, w, 1e-5)),
                 "rotary (q 9 heads, k 3)": (partial(rotated_pair, q, k, cos, sin), partial(native.rotate_, q, k, cos, sin))}
        for length in (70, 300, 2000):
            keys, values = (torch.randn(1, 3, length, 64, generator=g).to(dtype) for _ in range(2))
            cases[f"attention ({length} keys)"] = (partial(decode_attention_reference, q, keys, values, None, 0.125),
                                                   partial(native.decode_attention, q, keys, values, None, 0.125))
        for name, (twin, ours) in cases.items():
            rows.append({"dtype": str(dtype).removeprefix("torch."), "kernel": name, "torch_us": per_call(twin) * 1e6,
                         "native_us": per_call(ours) * 1e6})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=40)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    if not native.supports_decode(torch.ones(1)):
        raise SystemExit("the native CPU kernels are off or could not be built (FOURBIT_CPU_COMPILE, a C compiler)")
    model, tokenizer = fourbit.load_model(None)
    ids = tokenizer(tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False),
                    add_special_tokens=False)["input_ids"]
    step, per_op = DecodeStep.of(model), DecodeStep.of(model, fuse_layers=False)
    dtype = str(model.lm_head.weight.dtype).removeprefix("torch.")  # the compute dtype load_model picked
    env = {"device": f"CPU ({cpu_kind()})", "dtype": dtype, "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": transformers.__version__,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    print(" ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    variants = {FORWARD: None, OP_BY_OP: per_op, "decode step": step}
    rounds = {name: [] for name in variants}
    tokens = {}
    for _ in range(args.rounds):
        for name, use in variants.items():
            seconds, tokens[name] = decode(model, ids, args.tokens, use)
            rounds[name].append(seconds)
    ms = {name: statistics.median(t) * 1e3 for name, t in rounds.items()}
    same = {name: next((i for i, (a, b) in enumerate(zip(tokens[FORWARD], made)) if a != b), None)
            for name, made in tokens.items() if name != FORWARD}  # where each parts from the forward's tokens
    table = kernels()

    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else Path(__file__).parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decode-step-cpu-{dtype}.json"
    path.write_text(json.dumps({"env": env, "args": vars(args), "ms_per_token": ms, "rounds": rounds,
                                "tokens_part_at": same, "kernels": table}, indent=2) + "\n")
    print(f"\nSmolLM2-135M-Instruct NF4, {env['device']}, {dtype}, {args.tokens} steps x {args.rounds} rounds ({path})")
    for name, value in ms.items():
        print(f"{name:<24} {value:6.2f} ms a token")
    for name in (OP_BY_OP, "decode step"):
        print(f"{name} / forward time: {ms[name] / ms[FORWARD]:.2f}x; greedy tokens "
              f"{'identical' if same[name] is None else f'part at step {same[name]}'}")
    print(f"{'kernel':<26} {'dtype':<9} {'torch us':>9} {'native us':>10}")
    for row in table:
        print(f"{row['kernel']:<26} {row['dtype']:<9} {row['torch_us']:>9.1f} {row['native_us']:>10.1f}")


if __name__ == "__main__":
    main()
