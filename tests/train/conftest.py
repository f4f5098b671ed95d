"""The embedded SmolLM2 tokenizer (ChatML template, EOS <|im_end|>), loaded once per session."""

import copy

import pytest


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
