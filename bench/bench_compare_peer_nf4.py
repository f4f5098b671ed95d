"""NF4 + double quant through the peer: transformers + bitsandbytes on the default model, scored as `fourbit compare` scores.

    python bench/bench_compare_peer_nf4.py

Question: is the gap between NF4 and bf16 in `fourbit compare`'s table NF4's or fourbit's? The
embedded SmolLM2-135M-Instruct is written out as a float32 Hugging Face folder, loaded by
transformers with BitsAndBytesConfig(nf4, double quant, float32 compute) on the CPU, and scored
with the same perplexity function on the same text (compare's default: the first 8192 tokens
of Python's documentation topics, context 512). Compare its figure with compare's nf4-dq row.
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import fourbit
from fourbit.compare import default_text_ids
from fourbit.perplexity import perplexity


def main() -> None:
    model, tokenizer = fourbit.load_model(None, quantization=None, torch_dtype="float32")
    ids, origin = default_text_ids(tokenizer)
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        del model
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        start = time.perf_counter()
        peer = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, dtype=torch.float32,
                                                    device_map="cpu")
        result = perplexity(peer, ids, 512)
    print(f"transformers + bitsandbytes nf4-dq: perplexity {result.perplexity:.4f} on {origin}, context 512 "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
