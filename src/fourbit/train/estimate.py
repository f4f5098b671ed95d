"""A per-GPU memory estimate for a training run, from the model's config alone (nothing is loaded).

For a Llama-shaped decoder with L layers, hidden H, MLP width I, vocab V, micro-batch B,
sequence T, P_lin quantized parameters (the seven linears of every layer), P_lora = r (in + out)
summed over the adapted linears, block size b, and N GPUs:

    4-bit codes            P_lin / 2 bytes                       (2 bytes/param for a 16-bit base)
    quantization constants P_lin (8/b + 32/(256 b)) / 8 bytes    double quant (32/b bits without)
    unquantized            (V H [x2 if lm_head is untied] + norms) * bytes of the compute dtype
    LoRA weights           4 P_lora (float32)
    LoRA gradients         4 P_lora; DDP adds its gradient buckets, another 4 P_lora
    optimizer state        8 P_lora (Adam's m and v in 32 bits; ~2 P_lora in 8 bits)
    activations            per layer ~ B T (12 H + 3 I) values kept for backward; with
                           checkpointing only each layer's input (B T H) is kept, plus one
                           layer's worth recomputed
    attention scores       on a CPU in bf16, sequences of up to 128 tokens: SDPA's math backend
                           keeps float32 scores, ~16 B heads T^2 bytes a layer (9 MiB measured
                           for SmolLM2's 9 heads at 4 x 128 tokens); one layer when checkpointed
    logits                 B T V float32, twice (the logits and their gradient); in one process,
                           for a model whose head fuses into the loss (train/loss.py), one
                           chunk's logits (float32, their copy in the compute dtype and the
                           gradient's) and dL/dh (B T H in the compute dtype) instead
    prepacked head         on a CPU, with the head fused into the loss: two copies of V H in the
                           compute dtype for oneDNN, while they fit PACKED_HEAD_BYTES
                           (kernels/linear_cross_entropy.py)

Strategies. ``ddp``: every GPU holds all of the above. ``fsdp`` (FSDP2): the parameters, their
gradients and the optimizer state are sharded, so codes, unquantized weights, LoRA weights,
gradients and optimizer state are divided by N; the quantization constants are not (fourbit
keeps them replicated, see train/parallel.py), activations and logits are per GPU anyway,
and two decoder layers are gathered whole at a time (the one computing and the one prefetched).

It ignores allocator fragmentation, the dequantized weight of the layer being computed,
temporary buffers and framework state (CUDA context, NCCL buffers), so read it as a lower
bound of the right order, not a promise; the training banner prints it next to the peak torch
measured (bench/bench_memory_estimate_gpu.py compares them for an 8B-shaped model).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InputError
from ..io.sources import open_source
from ..kernels.linear_cross_entropy import PACKED_HEAD_BYTES, chunk_tokens
from ..nn.short_attention import takes_math
from ..precision import native_bf16
from .config import STRATEGIES, TrainConfig
from .loss import PLAIN_HEAD_MODEL_TYPES


@dataclass
class MemoryEstimate:
    rows: dict[str, int] = field(default_factory=dict)
    title: str = "memory estimate"

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    def format(self) -> str:
        lines = [f"{self.title} (a lower bound; see fourbit/train/estimate.py):"]
        lines += [f"  {name:<36}{nbytes / 2**20:>10.1f} MiB" for name, nbytes in self.rows.items()]
        lines.append(f"  {'total':<36}{self.total / 2**20:>10.1f} MiB")
        return "\n".join(lines)


def estimate_memory(
    config: TrainConfig,
    device: str = "cpu",
    gpus: int = 1,
    strategy: str | None = None,
    seq_len: int | None = None,
    batch: int | None = None,
    model_config=None,
) -> MemoryEstimate:
    """Bytes per GPU (or per process) of a run of ``config``; ``strategy`` None: one process.
    ``seq_len`` and ``batch`` default to cutoff_len and per_device_train_batch_size; the shapes
    come from ``model_config`` (a loaded model's) or else from config.model_name_or_path."""
    if gpus < 1:
        raise InputError(f"gpus must be >= 1, got {gpus}")
    if strategy is not None and strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    c = (model_config or open_source(config.model_name_or_path).config).get_text_config()
    H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size  # noqa: E741 - the formulas' names
    head_dim = getattr(c, "head_dim", None) or H // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    linears = [(q, H), (kv, H), (kv, H), (H, q), (I, H), (I, H), (H, I)]
    per_layer = sum(o * i for o, i in linears)
    compute_bytes = _compute_bytes(config.compute_dtype, device)
    fsdp = strategy == "fsdp"
    shard = gpus if fsdp else 1

    b = config.quantization_blocksize
    quantized = config.quantization_bit == 4
    codes = per_layer * L * (0.5 if quantized else compute_bytes)
    constants_bits = (8 / b + 32 / (256 * b) if config.double_quantization else 32 / b) if quantized else 0
    constants = per_layer * L * constants_bits / 8
    unquantized = (V * H * (1 if c.tie_word_embeddings else 2) + (2 * L + 1) * H) * compute_bytes
    lora_per_layer = config.lora_rank * sum(o + i for o, i in linears)
    lora_params = lora_per_layer * L
    moments = 2 if "8bit" in config.optim else 8
    tokens = (batch or config.per_device_train_batch_size) * (seq_len or config.cutoff_len)
    layer_acts = tokens * (12 * H + 3 * I) * compute_bytes
    activations = tokens * H * compute_bytes * L + layer_acts if config.gradient_checkpointing else layer_acts * L

    rows = {
        "4-bit linears (codes)" if quantized else "16-bit linears": int(codes / shard),
        **({"quantization constants": int(constants)} if quantized else {}),
        "embeddings, norms, lm_head": int(unquantized / shard),
        "LoRA weights (fp32)": int(lora_params * 4 / shard),
        "LoRA gradients (fp32)": int(lora_params * 4 / shard),
        f"optimizer state ({config.optim})": int(lora_params * moments / shard),
    }
    if strategy == "ddp":
        rows["DDP gradient buckets"] = int(lora_params * 4)
    if fsdp and gpus > 1:  # two layers' parameters gathered whole, less the shard already counted
        rows["FSDP gathered layers (2)"] = int(2 * (per_layer * (0.5 if quantized else compute_bytes)
                                                    + lora_per_layer * compute_bytes) * (1 - 1 / gpus))
    rows["activations" + (" (checkpointed)" if config.gradient_checkpointing else "")] = int(activations)
    T = seq_len or config.cutoff_len
    dtype = torch.bfloat16 if compute_bytes == 2 else torch.float32
    if takes_math(torch.device(device).type, dtype, T) and not config.torch_compile:  # nn/short_attention.py
        kept_layers = 1 if config.gradient_checkpointing else L
        rows["attention scores (SDPA math backend)"] = int(
            16 * kept_layers * (batch or config.per_device_train_batch_size) * c.num_attention_heads * T * T)
    if strategy is None and getattr(c, "model_type", None) in PLAIN_HEAD_MODEL_TYPES:
        chunk = min(tokens, chunk_tokens(V))
        rows["logits (chunked into the loss)"] = int(chunk * V * (4 + 2 * compute_bytes) + tokens * H * compute_bytes)
        packs = compute_bytes == 4 or native_bf16("cpu")  # oneDNN packs bf16 only where the CPU computes it
        if torch.device(device).type == "cpu" and packs and 2 * V * H * compute_bytes <= PACKED_HEAD_BYTES:
            rows["lm_head prepacked for the loss"] = 2 * V * H * compute_bytes
    else:
        rows["logits + their gradient"] = int(tokens * V * 4 * 2)
    where = f"per GPU, {gpus} x {strategy}" if strategy else "one process"
    return MemoryEstimate(rows, f"memory estimate {where}, {tokens} tokens per micro-batch")


def _compute_bytes(compute_dtype: str, device) -> int:
    """Bytes per activation value; "auto" is what ``device`` computes natively, and a GPU
    planned for from a machine without one is taken to compute bf16 (Ampere and later)."""
    if compute_dtype != "auto":
        return 4 if compute_dtype == "float32" else 2
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        return 2
    return 2 if native_bf16(device) else 4


# The rows that are in memory before the first step (the rest is what a step adds).
STATIC_ROWS = ("4-bit linears (codes)", "quantization constants", "embeddings, norms, lm_head", "LoRA weights (fp32)")


def against_measurement(rows: dict[str, int], static_measured: int | None, peak_measured: int | None) -> dict:
    """An estimate's ``rows`` next to measured bytes (after loading, ``static_measured``; the run's
    peak, ``peak_measured``), with measured / estimated ratios; None where nothing was measured
    (a CPU). bench/bench_memory_estimate_gpu.py reports it."""
    static_estimate = sum(rows.get(k, 0) for k in STATIC_ROWS)
    total = sum(rows.values())

    def ratio(measured: int | None, estimated: int) -> float | None:
        return None if measured is None else round(measured / estimated, 4)

    return {
        "estimate_rows_MiB": {k: round(v / 2**20, 1) for k, v in rows.items()},
        "estimate_total_MiB": round(total / 2**20, 1),
        "estimate_static_MiB": round(static_estimate / 2**20, 1),
        "measured_static_MiB": None if static_measured is None else round(static_measured / 2**20, 1),
        "measured_peak_MiB": None if peak_measured is None else round(peak_measured / 2**20, 1),
        "static_ratio_measured_over_estimate": ratio(static_measured, static_estimate),
        "peak_ratio_measured_over_estimate": ratio(peak_measured, total),
        "peak_within_10_percent": None if peak_measured is None else abs(peak_measured / total - 1) <= 0.10,
    }
