"""A mixture-of-experts model in 4 bits: fourbit (experts quantized) vs transformers + bitsandbytes.

    python bench/bench_moe.py [--steps 30]

The model: a random Mixtral (hidden 256, 4 layers, 8 experts of intermediate 512, top-2,
vocabulary 4096: 15.5M parameters, 81% of them in the experts), saved in bfloat16 in a temporary
folder. Each side loads it in its own subprocess, NF4 with double quantization, float32
compute; a thread samples the process's anonymous resident memory (RssAnon) every 2 ms, and the
peak while loading is reported above the value right before (after imports). "Bytes" are the
model's tensors as loaded: what the weights cost in memory. bitsandbytes quantizes the linear
layers only; transformers 5 keeps each layer's experts as fused 3-D parameters, which stay in
16 bits there. fourbit quantizes each expert matrix too (nn/experts4bit.py).

Then fourbit trains a LoRA (r=8 on every attention linear and on every expert of both expert
weights, PEFT's target_parameters; AdamW lr 2e-3, gradient checkpointing, batch 4 x 64 tokens)
for --steps steps on a fixed random batch it must learn to predict (memorization: the loss must
fall), and reports the first and last losses and the peak RSS of the run. Figures go to
bench/RESULTS.md with the device (CPU kind) and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

CHILD = r"""
import json, sys, threading, time, torch
def anon_kib():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("RssAnon:"))
peak = 0
def sample():
    global peak
    while True:
        peak = max(peak, anon_kib())
        time.sleep(0.002)
folder, side, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
import fourbit, transformers
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
before = anon_kib()
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if side == "fourbit":
    model, _ = fourbit.load_model(folder, compute_dtype="float32", torch_dtype="bfloat16")
else:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
seconds = time.perf_counter() - start
load_peak = (peak - before) / 1024
held = {id(t.untyped_storage()): t for t in model.state_dict().values()}
result = {"side": side, "load_seconds": seconds, "load_peak_mib": load_peak,
          "model_mib": sum(t.untyped_storage().nbytes() for t in held.values()) / 2**20}
if side == "fourbit":
    from fourbit.memory import memory_report
    report = memory_report(model)
    result["bits_per_quantized_param"] = report.bits_per_quantized_param()
    result["quantized_params"] = report.quantized_params
    result["report"] = report.format()
    if steps:
        from fourbit.train.recipe import enable_gradient_checkpointing
        fourbit.add_lora(model, r=8, alpha=16, target=["q_proj", "k_proj", "v_proj", "o_proj"], verbose=False,
                         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
        enable_gradient_checkpointing(model)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-3)
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, model.config.vocab_size, (4, 64), generator=g)
        peak, losses, start = anon_kib(), [], time.perf_counter()
        for _ in range(steps):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        result.update({"train_steps": steps, "first_loss": losses[0], "last_loss": losses[-1],
                       "train_seconds_per_step": (time.perf_counter() - start) / steps,
                       "train_peak_mib": (peak - before) / 1024})
print("RESULT " + json.dumps(result))
"""


def make_model(folder: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    config = MixtralConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                           num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096,
                           max_position_embeddings=256, tie_word_embeddings=False)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    import importlib.metadata as md

    from fourbit.precision import cpu_kind

    versions = {n: md.version(n) for n in ("torch", "transformers", "bitsandbytes", "fourbit")}
    print(f"# {date.today()}  {platform.processor() or platform.machine()} ({cpu_kind()})  "
          + "  ".join(f"{k} {v}" for k, v in versions.items()))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "mixtral"
        make_model(folder)
        rows = []
        for side in ("fourbit", "peer"):
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), side, str(args.steps if side == "fourbit" else 0)],
                                 capture_output=True, text=True)
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                print(f"{side}: failed\n{out.stderr[-3000:]}")
                continue
            rows.append(json.loads(lines[-1].removeprefix("RESULT ")))
    print(f"{'side':<10}{'model MiB':>11}{'load peak MiB':>15}{'load s':>8}")
    for r in rows:
        print(f"{r['side']:<10}{r['model_mib']:>11.1f}{r['load_peak_mib']:>15.0f}{r['load_seconds']:>8.1f}")
    ours = next((r for r in rows if r["side"] == "fourbit"), None)
    if ours:
        print(ours["report"])
        if "first_loss" in ours:
            print(f"QLoRA on the MoE model: {ours['train_steps']} steps, loss {ours['first_loss']:.3f} -> "
                  f"{ours['last_loss']:.3f}, {ours['train_seconds_per_step']:.2f} s/step, peak +{ours['train_peak_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
