"""A memory estimate for a training run, from the model's config alone (nothing is loaded).

For a Llama-shaped decoder with L layers, hidden H, MLP width I, vocab V, batch B, sequence T:

    4-bit linears      P_lin * (4 + 8/b + 32/(256 b)) / 8 bytes      (b = block size, double quant;
                       4 + 32/b without it; 2 bytes/param for a 16-bit base)
    unquantized        (V H [x2 if lm_head is untied] + norms) * bytes of the compute dtype
    LoRA               r (in + out) per adapted linear: weight + gradient in fp32 (8 bytes) and
                       Adam's two moments (8 bytes in 32 bits, ~2 bytes in 8 bits)
    activations        per layer ~ B T (12 H + 3 I) values kept for backward; with checkpointing
                       only each layer's input (B T H) is kept, plus one layer's worth recomputed
    logits             B T V float32, twice (the logits and their gradient)

It ignores allocator overhead, temporary buffers of the dequantization and framework state, so
read it as a lower bound of the right order, not a promise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..io.sources import open_source
from ..precision import native_bf16
from .config import TrainConfig


@dataclass
class MemoryEstimate:
    rows: dict[str, int] = field(default_factory=dict)

    def format(self) -> str:
        lines = ["memory estimate (a lower bound; see fourbit/train/estimate.py):"]
        lines += [f"  {name:<28}{nbytes / 2**20:>10.1f} MiB" for name, nbytes in self.rows.items()]
        lines.append(f"  {'total':<28}{sum(self.rows.values()) / 2**20:>10.1f} MiB")
        return "\n".join(lines)


def estimate_memory(config: TrainConfig, device: str = "cpu") -> MemoryEstimate:
    c = open_source(config.model_name_or_path).config.get_text_config()
    H, I, L, V = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    head_dim = getattr(c, "head_dim", None) or H // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    linears = [(q, H), (kv, H), (kv, H), (H, q), (I, H), (I, H), (H, I)]
    per_layer = sum(o * i for o, i in linears)
    compute_bytes = 2 if config.compute_dtype in ("bfloat16", "float16") or (
        config.compute_dtype == "auto" and native_bf16(device)) else 4

    b = config.quantization_blocksize
    if config.quantization_bit == 4:
        bits = 4 + (8 / b + 32 / (256 * b) if config.double_quantization else 32 / b)
        weights = per_layer * L * bits / 8
    else:
        weights = per_layer * L * compute_bytes
    unquantized = (V * H * (1 if c.tie_word_embeddings else 2) + (2 * L + 1) * H) * compute_bytes
    lora_params = config.lora_rank * sum(o + i for o, i in linears) * L
    moments = 2 if "8bit" in config.optim else 8
    tokens = config.per_device_train_batch_size * config.cutoff_len
    layer_acts = tokens * (12 * H + 3 * I) * compute_bytes
    activations = tokens * H * compute_bytes * L + layer_acts if config.gradient_checkpointing else layer_acts * L
    return MemoryEstimate({
        "4-bit linears" if config.quantization_bit == 4 else "16-bit linears": int(weights),
        "embeddings, norms, lm_head": int(unquantized),
        "LoRA weights + gradients": int(lora_params * 8),
        f"optimizer state ({config.optim})": int(lora_params * moments),
        "activations" + (" (checkpointed)" if config.gradient_checkpointing else ""): int(activations),
        "logits + their gradient": int(tokens * V * 4 * 2),
    })
