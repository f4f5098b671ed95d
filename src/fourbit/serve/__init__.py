"""Running models: generation, several adapters on one base (and, to come, chat and the server)."""

from .generate import Completion, Delta, Sampling, generate, stream

__all__ = ["Completion", "Delta", "Sampling", "generate", "stream"]
