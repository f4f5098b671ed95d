"""Shared fixtures: tiny random Llama models built from a config (no download), and the
embedded SmolLM2 tokenizer (ChatML template, EOS <|im_end|>), loaded once per session."""

import copy
import os

import pytest
import torch

# Without a GPU, the Triton kernels run through Triton's CPU interpreter. It must be chosen
# before a kernel module is first imported (triton.jit reads it when decorating).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def tiny_llama_config(tie_word_embeddings: bool = False, **overrides):
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
        tie_word_embeddings=tie_word_embeddings,
    )
    return LlamaConfig(**(settings | overrides))


def save_tiny_llama(folder, seed: int = 0, tie_word_embeddings: bool = False, **overrides):
    """A random LlamaForCausalLM saved as safetensors in ``folder``; returns the model."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings, **overrides)).eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, dense transformers model) for an untied tiny Llama."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_tiny_llama(folder)


@pytest.fixture(scope="session")
def tiny_llama_tied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama-tied")
    return folder, save_tiny_llama(folder, seed=1, tie_word_embeddings=True)


@pytest.fixture(scope="session")
def make_tiny_llama():
    """``make_tiny_llama(folder, seed=0, **config_overrides)``: save a random tiny Llama there."""
    return save_tiny_llama


@pytest.fixture(scope="session")
def chat_tokenizer():
    """Shared and read-only: tests that change a tokenizer take ``fresh_tokenizer``."""
    from fourbit.io.default_model import default_model_path
    from fourbit.io.gguf import gguf_tokenizer

    return gguf_tokenizer(default_model_path())


@pytest.fixture
def fresh_tokenizer(chat_tokenizer):
    """A private copy of the SmolLM2 tokenizer that a test may modify."""
    return copy.deepcopy(chat_tokenizer)


@pytest.fixture(scope="session")
def lora_fit():
    """``lora_fit(base)``: train an r=8 LoRA on a frozen (quantized) linear ``base`` [out, in] toward
    the base's own weight plus a rank-4 change (which r=8 can represent); returns (first, last) loss."""
    from fourbit.nn.lora import LoRALinear

    def fit(base, steps: int = 150) -> tuple[float, float]:
        lora = LoRALinear(base, r=8, alpha=16)
        x = torch.randn(256, base.in_features)
        change = 0.05 * torch.randn(base.out_features, 4) @ torch.randn(4, base.in_features)
        target = x @ (base.dequantize(torch.float32) + change).T
        optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(steps):
            loss = torch.nn.functional.mse_loss(lora(x), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return losses[0], losses[-1]

    return fit
