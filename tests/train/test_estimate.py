"""The per-GPU memory estimate (train/estimate.py) and ``fourbit memory --model CONFIG``."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from fourbit.cli import main
from fourbit.precision import resolve_compute_dtype
from fourbit.train.config import load_config
from fourbit.train.estimate import estimate_memory

SHARDED = ["4-bit linears (codes)", "embeddings, norms, lm_head", "LoRA weights (fp32)", "LoRA gradients (fp32)",
           "optimizer state (adamw)"]


@pytest.fixture
def config(tiny_llama):
    return load_config(None, {"model_name_or_path": str(tiny_llama[0]), "cutoff_len": 64, "per_device_train_batch_size": 2})


def test_the_rows_follow_the_formulas(config):
    rows = estimate_memory(config).rows
    # tiny Llama: H 64, I 160, 2 layers, vocab 256, 4 heads of 16, 2 kv heads -> q 64, kv 32
    per_layer = 64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 160 * 64
    assert rows["4-bit linears (codes)"] == per_layer * 2 // 2
    assert rows["quantization constants"] == int(per_layer * 2 * (8 / 64 + 32 / (256 * 64)) / 8)
    lora = 16 * ((64 + 64) + 2 * (32 + 64) + (64 + 64) + 2 * (160 + 64) + (64 + 160)) * 2
    assert rows["LoRA weights (fp32)"] == rows["LoRA gradients (fp32)"] == 4 * lora
    assert rows["optimizer state (adamw)"] == 8 * lora
    # one process, a Llama: the head is fused into the loss, the 128 tokens' logits in one chunk
    # (a chunk holds 31 MiB of float32 logits: thousands of tokens of a 256-entry vocabulary):
    # float32 logits, their compute-dtype copy and gradient (bf16 on this machine's "auto", 4 bytes
    # without native bf16), and dL/dh
    compute_bytes = 2 if "bfloat16" in str(resolve_compute_dtype("auto", "cpu")) else 4
    assert rows["logits (chunked into the loss)"] == 128 * 256 * (4 + 2 * compute_bytes) + 128 * 64 * compute_bytes
    # on a CPU the loss reads two prepacked copies of the head (256 x 64), well within the budget
    assert rows["lm_head prepacked for the loss"] == 2 * 256 * 64 * compute_bytes
    ddp = estimate_memory(config, "cuda", gpus=2, strategy="ddp").rows  # DDP's forward runs: the full logits
    assert ddp["logits + their gradient"] == 2 * 64 * 256 * 4 * 2
    assert "lm_head prepacked for the loss" not in estimate_memory(config, "cuda").rows
    # SDPA's math backend on a CPU in bf16 at <= 128 tokens: float32 scores, 16 B heads T^2 bytes a layer
    config.compute_dtype, config.gradient_checkpointing = "bfloat16", False
    assert estimate_memory(config).rows["attention scores (SDPA math backend)"] == 16 * 2 * 2 * 4 * 64 * 64
    config.gradient_checkpointing = True  # one layer's at a time
    assert estimate_memory(config).rows["attention scores (SDPA math backend)"] == 16 * 1 * 2 * 4 * 64 * 64
    config.compute_dtype = "float32"  # flash in float32
    assert "attention scores (SDPA math backend)" not in estimate_memory(config).rows
    assert "attention scores (SDPA math backend)" not in estimate_memory(config, seq_len=129).rows


def test_fsdp_divides_the_sharded_parts_by_the_number_of_gpus(config):
    ddp = estimate_memory(config, "cuda", gpus=4, strategy="ddp").rows
    fsdp = estimate_memory(config, "cuda", gpus=4, strategy="fsdp").rows
    for name in SHARDED:
        assert fsdp[name] == ddp[name] // 4, name
    for name in ("quantization constants", "activations (checkpointed)", "logits + their gradient"):
        assert fsdp[name] == ddp[name], name  # replicated, or per GPU anyway
    assert "DDP gradient buckets" in ddp and "FSDP gathered layers (2)" in fsdp
    assert estimate_memory(config, "cuda", gpus=4, strategy="fsdp").total < estimate_memory(config, "cuda", 4, "ddp").total


def test_checkpointing_keeps_one_input_per_layer(config):
    # estimate.py: a layer keeps ~ B T (12 H + 3 I) values for backward; checkpointed, each of
    # the L layers keeps only its input (B T H) plus one layer's worth recomputed. Tiny Llama:
    # B T = 2 x 64, H 64, I 160, L 2; float32 compute, 4 bytes a value.
    config.compute_dtype = "float32"
    tokens = 2 * 64
    layer = tokens * (12 * 64 + 3 * 160) * 4
    assert estimate_memory(config).rows["activations (checkpointed)"] == tokens * 64 * 4 * 2 + layer
    config.gradient_checkpointing = False
    assert estimate_memory(config).rows["activations"] == layer * 2


def test_bad_arguments_are_refused(config):
    with pytest.raises(ValueError, match="gpus"):
        estimate_memory(config, gpus=0)
    with pytest.raises(ValueError, match="strategy"):
        estimate_memory(config, strategy="zero3")


def test_cli_memory_model_prints_the_per_gpu_estimate(config, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model_name_or_path": config.model_name_or_path}))
    assert main(["memory", "--model", str(path), "--gpus", "2", "--strategy", "fsdp", "--seq-len", "128", "--batch", "3"]) == 0
    out = capsys.readouterr().out
    assert "per GPU, 2 x fsdp, 384 tokens per micro-batch" in out and "FSDP gathered layers" in out and "total" in out


def test_an_estimate_is_set_against_measured_bytes():
    from fourbit.train.estimate import against_measurement

    rows = {"4-bit linears (codes)": 300, "quantization constants": 10, "embeddings, norms, lm_head": 100,
            "LoRA weights (fp32)": 90, "activations (checkpointed)": 500}
    report = against_measurement(rows, static_measured=550, peak_measured=1050)
    assert report["static_ratio_measured_over_estimate"] == 1.1 and report["peak_ratio_measured_over_estimate"] == 1.05
    assert report["peak_within_10_percent"] is True
    assert against_measurement(rows, 550, 1200)["peak_within_10_percent"] is False
    assert against_measurement(rows, None, None)["peak_ratio_measured_over_estimate"] is None  # a CPU measures nothing


def test_the_gpu_benchmark_refuses_bad_arguments_and_a_machine_without_a_gpu(tmp_path):
    """bench/bench_memory_estimate_gpu.py runs on a GPU; here, as a user runs it, its refusals."""
    script = Path(__file__).resolve().parents[2] / "bench" / "bench_memory_estimate_gpu.py"
    bad = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "m.json"), "--steps", "0"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error: --steps must be >= 1" in bad.stderr
    if not torch.cuda.is_available():
        run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "m.json")], capture_output=True, text=True)
        assert run.returncode != 0 and "no CUDA GPU" in run.stderr + run.stdout
        assert not (tmp_path / "m.json").exists()
