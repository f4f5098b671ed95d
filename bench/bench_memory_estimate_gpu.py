"""The per-GPU memory estimate (fourbit/train/estimate.py) against the peak torch measures, for QLoRA on an 8B-shaped Llama.

    python bench/bench_memory_estimate_gpu.py --out FILE [--layers 32] [--seq 2048] [--batch 1] [--steps 3]
                                              [--model-dir DIR]
    python bench/bench_memory_estimate_gpu.py --tiny --device cpu --out FILE     # logic smoke test

Question: how close is ``fourbit memory --model CONFIG`` (and the training banner's estimate) to
what one GPU actually allocates for a QLoRA run of an 8B Llama-3-shaped model?

Method
- Model: random weights with Llama-3-8B's shapes (bench/_llama_shape.py: hidden 4096,
  intermediate 14336, 32 heads, 8 kv heads, vocab 128256, untied lm_head; ``--layers N`` keeps N
  of 32 and the output says so), saved once as bf16 safetensors and reused.
- Run: fourbit's own recipe (fourbit.train.recipe.train) on the data-parallel path with world
  size 1: RANK=0, WORLD_SIZE=1 as torchrun would set them, so train/distributed.py joins a 1-rank
  process group (nccl) and wraps the model in DDP. NF4 + double quantization (block 64), bf16
  compute, LoRA r=16 alpha=32 on all seven linears of every layer, gradient checkpointing,
  AdamW 32-bit, micro-batch ``--batch`` rows of exactly ``--seq`` tokens (long responses cut at
  cutoff_len; SmolLM2's tokenizer, whose ids all fit the 128256-word vocabulary), every
  response token trained, ``--steps`` optimizer steps.
- Measured: ``torch.cuda.memory_allocated`` after loading + LoRA (the static part), and
  ``torch.cuda.max_memory_allocated`` over the training (peak statistics reset after loading,
  so the quantization pass is not counted; the static part is, being allocated throughout).
  ``max_memory_reserved`` is given too (what the caching allocator held).
- Estimate: ``estimate_memory(config, "cuda", gpus=1, strategy="ddp")``, the rows the banner
  and ``fourbit memory --model`` print; compared as measured / estimated, in total and for the
  static rows (codes, quantization constants, embeddings/norms/lm_head, LoRA weights).
- Output: a JSON (``--out``; also printed) with the rows, the measurements, the ratios and the
  environment. --tiny on a CPU checks the logic only: nothing is measured there, and its model
  is a 2-layer, 64-wide Llama with SmolLM2's vocabulary (built in the script, not the 8B shape).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import sys
from pathlib import Path

import _llama_shape as shape

WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo", "lima", "mike",
         "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango", "uniform", "victor", "whiskey", "xray", "yankee",
         "zulu"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="the JSON file to write")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default: 32, the full 8B shape; 2 with --tiny)")
    p.add_argument("--seq", type=int, default=2048, help="tokens per row (default 2048)")
    p.add_argument("--batch", type=int, default=1, help="rows per micro-batch (default 1)")
    p.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    p.add_argument("--model-dir", type=Path, default=None, help="where the random model is built once and reused")
    p.add_argument("--tiny", action="store_true", help="the tiny shape, for checking the logic")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="a saved SmolLM2 tokenizer folder (default: read from the embedded GGUF)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = shape.default_layers(args.tiny)
    for name in ("layers", "seq", "batch", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    return args


def write_dataset(path: Path, rows: int, words_per_row: int, seed: int = 0) -> Path:
    """Alpaca rows whose responses are longer than any cutoff used here (so rows are cut to it)."""
    rng = random.Random(seed)
    data = [{"instruction": "Recite.", "input": "", "output": " ".join(rng.choice(WORDS) for _ in range(words_per_row))}
            for _ in range(rows)]
    path.write_text(json.dumps(data))
    return path


def training_settings(model_dir: Path, dataset: Path, output_dir: Path, args: argparse.Namespace) -> dict:
    return {
        "model_name_or_path": str(model_dir), "dataset": str(dataset), "output_dir": str(output_dir),
        "overwrite_output_dir": True, "compute_dtype": "auto", "quantization_type": "nf4", "double_quantization": True,
        "quantization_blocksize": 64, "lora_rank": 16, "lora_alpha": 32, "lora_target": "all",
        "gradient_checkpointing": True, "optim": "adamw", "learning_rate": 1e-4, "lr_scheduler_type": "constant",
        "per_device_train_batch_size": args.batch, "gradient_accumulation_steps": 1, "max_steps": args.steps,
        "save_steps": 10**6, "cutoff_len": args.seq, "plot_loss": False, "strategy": "ddp", "seed": 0,
    }


def _join_one_rank_group() -> None:
    """The environment torchrun gives a 1-process run, on a free local port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})


def build_tiny(folder: Path, layers: int, vocab_size: int) -> Path:
    """A random 64-wide Llama with the tokenizer's vocabulary (the logic check's model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096)
        LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from fourbit.io.default_model import default_model_path
    from fourbit.io.gguf import gguf_tokenizer
    from fourbit.io.loader import load_model
    from fourbit.nn.lora import add_lora
    from fourbit.train.config import load_config
    from fourbit.train.distributed import destroy, init_ranks
    from fourbit.train.estimate import against_measurement, estimate_memory
    from fourbit.train.recipe import train

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here (use --tiny --device cpu to check the logic)")
    work = args.out.resolve().parent / f"{args.out.stem}-work"
    work.mkdir(parents=True, exist_ok=True)
    if args.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = gguf_tokenizer(default_model_path())
    if args.tiny:
        model_dir = build_tiny(args.model_dir or work / "tiny-model", args.layers, len(tokenizer))
    else:
        model_dir = args.model_dir or shape.default_dir(args.layers, tiny=False)
        shape.ensure_model(model_dir, args.layers, False, args.device)
    dataset = write_dataset(work / "recite.json", rows=args.batch * args.steps, words_per_row=2 * args.seq)
    config = load_config(None, training_settings(model_dir, dataset, work / "run", args))

    _join_one_rank_group()
    ranks = init_ranks(config)  # world size 1, the DDP path
    model, _ = load_model(config.model_name_or_path, quantization="nf4", double_quant=True, blocksize=64,
                          compute_dtype="auto", device=ranks.device, progress=True)
    torch.manual_seed(config.seed)
    add_lora(model, r=config.lora_rank, alpha=config.alpha, target=config.targets)
    cuda = ranks.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    static = torch.cuda.memory_allocated() if cuda else None

    result = train(model, tokenizer, config)
    reserved = torch.cuda.max_memory_reserved() if cuda else None
    estimate = estimate_memory(config, ranks.device, gpus=1, strategy="ddp")
    destroy()

    report = {
        "question": "per-GPU memory estimate vs measured peak, QLoRA NF4 r16 all linears, gradient checkpointing",
        "model": shape.layers_note(args.layers, args.tiny), "seq": args.seq, "batch": args.batch, "steps": args.steps,
        "strategy": "ddp, world size 1", "losses": [round(x, 4) for x in result.losses],
        **against_measurement(estimate.rows, static, result.peak_memory),
        "measured_peak_reserved_MiB": None if reserved is None else round(reserved / 2**20, 1),
        "measured_with": "torch.cuda.memory_allocated / max_memory_allocated" if cuda else "nothing (CPU: logic check only)",
        "environment": shape.environment(args.device),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
