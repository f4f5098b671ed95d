"""Running models: generation, several adapters on one base, the terminal chat, the batching
engine and the OpenAI-compatible server."""

from .generate import Completion, Delta, Sampling, generate, stream

__all__ = ["Completion", "Delta", "Sampling", "generate", "stream"]
