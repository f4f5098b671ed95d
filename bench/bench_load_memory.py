"""Peak host memory while loading a model: fourbit's streaming NF4 load vs a dense load.

Each measurement runs in a fresh subprocess. A thread samples the process's anonymous
resident memory (RssAnon in /proc/self/status) every 2 ms; the report gives its peak minus
its value right before loading (after imports), so interpreter, torch and transformers are not
counted. Anonymous memory is what the process allocates; pages of a memory-mapped checkpoint
file (safetensors, GGUF) are page cache the kernel can drop, and are not counted. Three loads
of the same source:

    fourbit nf4   fourbit.load_model(src, quantization="nf4")   streaming, quantize on read
    fourbit dense fourbit.load_model(src, quantization=None)    same path, nothing quantized
    peer          transformers + bitsandbytes: from_pretrained(..., BitsAndBytesConfig(nf4))
                  for a safetensors folder; for a GGUF file transformers can only dequantize
                  the whole model (GgufConfig(dequantize=True)), so the peer is that dense load

Reading the result: the streaming load should peak near the quantized model plus one layer
plus fixed costs of the source (a GGUF file's parsed metadata and tokenizer are ~300 MB for
SmolLM2, which is why --synthetic, a safetensors folder, is the cleaner measure).

    python bench/bench_load_memory.py --synthetic   # random 1024-wide, 16-layer Llama in bf16 (~530 MB)
    python bench/bench_load_memory.py [SRC]         # default: the embedded SmolLM2-135M-Instruct
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from datetime import date

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
src, mode, dtype = sys.argv[1] or None, sys.argv[2], getattr(torch, sys.argv[3])
import fourbit, transformers
before = anon_kib()
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
if mode == "fourbit-nf4":
    model, _ = fourbit.load_model(src, quantization="nf4", compute_dtype="float32", torch_dtype=dtype)
elif mode == "fourbit-dense":
    model, _ = fourbit.load_model(src, quantization=None, compute_dtype="float32", torch_dtype=dtype)
else:
    from pathlib import Path
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GgufConfig
    from fourbit.io.default_model import default_model_path
    path = Path(src) if src else default_model_path()
    if path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype,
                                                     quantization_config=GgufConfig(dequantize=True))
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32))
seconds = time.perf_counter() - start
time.sleep(0.01)
held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"mode": mode, "peak_mib": (peak - before) / 1024, "model_mib": held / 2**20, "seconds": seconds}))
"""

MODES = ["fourbit-nf4", "fourbit-dense", "peer"]


def make_synthetic() -> str:
    """A random Llama (hidden 1024, 16 layers, vocab 32000: 266M parameters) saved in bf16, cached."""
    import tempfile
    from pathlib import Path

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = Path(tempfile.gettempdir()) / "fourbit-bench-synthetic-llama"
    if not (folder / "config.json").is_file():
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("source", nargs="?", default="")
    parser.add_argument("--synthetic", action="store_true", help="measure on a random 1024-wide, 16-layer Llama")
    args = parser.parse_args()
    import torch
    import transformers

    dtype = "float32"
    if args.synthetic:
        args.source, dtype = make_synthetic(), "bfloat16"

    from fourbit.precision import cpu_kind

    print(f"# {date.today()}  {platform.processor() or platform.machine()} ({cpu_kind()})  torch {torch.__version__}  "
          f"transformers {transformers.__version__}  source: {args.source or 'SmolLM2-135M-Instruct (embedded GGUF)'}")
    rows = []
    for mode in MODES:
        out = subprocess.run([sys.executable, "-c", CHILD, args.source, mode, dtype], capture_output=True, text=True)
        if out.returncode:
            print(f"{mode}: failed\n{out.stderr[-2000:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"unquantized weights in {dtype}; compute dtype float32")
    print(f"{'load':<16}{'peak anon MiB added':>22}{'model tensors (MiB)':>22}{'seconds':>10}")
    for r in rows:
        print(f"{r['mode']:<16}{r['peak_mib']:>22.0f}{r['model_mib']:>22.0f}{r['seconds']:>10.1f}")


if __name__ == "__main__":
    main()
