"""A tiny random Llama with the SmolLM2 vocabulary and tokenizer, loaded 4-bit, once per session."""

import pytest


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory, make_tiny_llama, chat_tokenizer):
    """(model, tokenizer, folder): NF4 base, float32 compute, ChatML tokenizer."""
    import fourbit

    folder = tmp_path_factory.mktemp("tiny-chat-llama")
    make_tiny_llama(folder, seed=3, vocab_size=len(chat_tokenizer))
    chat_tokenizer.save_pretrained(folder)
    model, tokenizer = fourbit.load_model(folder, quantization="nf4", compute_dtype="float32", torch_dtype="float32")
    return model, tokenizer, folder
