"""GGUF files read lazily, as a stream of Hugging Face-named float32 tensors.

Format facts this relies on (llama.cpp's GGUF, read with gguf-py's `GGUFReader`):

- The file is memory-mapped; each `ReaderTensor.data` is a view of its raw blocks (uint8 for
  quantized types, float32/float16 for plain ones), so a tensor costs memory only when it is
  dequantized. `gguf.quants.dequantize(data, type)` returns float32 numpy in row-major order,
  which is already Hugging Face's shape (`[out, in]` for linears, `[vocab, hidden]` for the
  embedding); GGUF's own `shape` field lists the dimensions in the reverse order.
- Opening the reader parses every metadata field, ~4 s for SmolLM2 (49k tokens and merges), so
  one reader per file is kept for the life of the process.
- Names are `token_embd`, `output_norm`, `output` and `blk.N.<leaf>`, each with `.weight` or
  `.bias`; the table below maps them to Hugging Face names. There is no `output.weight` when the
  embedding is tied to the LM head (SmolLM2), so no `lm_head.weight` is yielded then.
- llama.cpp's converter permutes the rows of Q and K for the `llama` architecture only (Qwen2/3 are
  written as-is): per head, HF's half-split rotary layout `[h, 2, d/2]` becomes interleaved pairs
  `[h, d/2, 2]`. Undoing it views rows as `[h, d/2, 2, ...]` and swaps axes 1 and 2, with
  h = num_attention_heads for Q and num_key_value_heads for K (biases too, where present).
- `rope_freqs` (Llama 3 rope scaling factors) is a buffer Hugging Face recomputes from the config,
  not a parameter, and is skipped.

The config and tokenizer come from transformers' own GGUF support (`gguf_file=`), which re-parses
the metadata: ~7 s for the config and ~7-9 s for the tokenizer on SmolLM2. Each is therefore
converted once and saved with `save_pretrained` under `cache_dir()/configs/<stem>-<size>/` and
`cache_dir()/tokenizers/<stem>-<size>/`, and loaded from there (well under a second) afterwards.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import gguf
import numpy as np
import torch

from ..errors import InputError
from .default_model import cache_dir
from .no_remote_code import from_pretrained

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
_PERMUTES_QK = {"llama"}

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_LEAVES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",  # qwen3
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NOT_PARAMETERS = {"rope_freqs", "attn_rot_embd"}


def open_reader(path: str | os.PathLike) -> gguf.GGUFReader:
    """The process-wide memory-mapped reader for `path` (reopened if the file changed)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _cached_reader(str(resolved), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, size: int, mtime_ns: int) -> gguf.GGUFReader:
    """The reader, once the file is shown to hold every byte its header promises (a truncated file
    would otherwise fail deep inside a tensor's reshape, or not at all until that tensor is read)."""
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise InputError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e})") from None
    short = next((t for t in reader.tensors if t.data.nbytes != t.n_bytes), None)
    if short is not None:
        raise InputError(f"{path} is not a whole GGUF file: tensor {short.name} should have {short.n_bytes} bytes, the "
                         f"file holds {short.data.nbytes}; is it truncated (an interrupted download or copy)?")
    return reader


def _field(reader: gguf.GGUFReader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(path: str | os.PathLike) -> str:
    """`general.architecture`, checked against the ones fourbit can map (ValueError otherwise)."""
    arch = _field(open_reader(path), "general.architecture", "<missing>")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise InputError(
            f"{path}: GGUF architecture {arch!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return arch


def gguf_quant_type(path: str | os.PathLike) -> str:
    """Short name of the file's quantization, e.g. 'Q4_1' (from `general.file_type`)."""
    reader = open_reader(path)
    file_type = _field(reader, "general.file_type")
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:  # missing or unknown: name the commonest type among the matrices
        types = [t.tensor_type.name for t in reader.tensors if len(t.shape) == 2]
        return max(set(types), key=types.count) if types else "unknown"


def gguf_config(path: str | os.PathLike):
    """The transformers config (e.g. LlamaConfig) that transformers derives from the GGUF metadata."""
    from transformers import AutoConfig

    path = Path(path).resolve()

    def convert(folder: Path) -> None:
        gguf_architecture(path)
        from_pretrained(AutoConfig, path.parent, gguf_file=path.name, what=str(path)).save_pretrained(folder)

    return from_pretrained(AutoConfig, _converted_once("configs", path, convert), what=str(path))


def hf_name(gguf_name: str) -> str | None:
    """Hugging Face parameter name for a GGUF tensor name; None for non-parameters (rope_freqs)."""
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] in _NOT_PARAMETERS or parts[-1] in _NOT_PARAMETERS:
        return None
    if len(parts) == 1 and base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{suffix}"
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_LEAVES:
        return f"model.layers.{parts[1]}.{_BLOCK_LEAVES[parts[2]]}.{suffix}"
    raise InputError(
        f"GGUF tensor {gguf_name!r} has no Hugging Face name; known leaves: "
        f"{', '.join([*_TOP_LEVEL, *_BLOCK_LEAVES])} (mixture-of-experts files are not supported)"
    )


def gguf_tensor_names(path: str | os.PathLike) -> list[str]:
    """Hugging Face names of the file's parameters, in file order, without loading any."""
    gguf_architecture(path)
    return [name for t in open_reader(path).tensors if (name := hf_name(t.name)) is not None]


def undo_rotary_permutation(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's Q/K row permutation: rows [h, d/2, 2] back to HF's [h, 2, d/2]."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise InputError(f"cannot split {rows} rows into {n_heads} heads of rotary pairs")
    split = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return split.transpose(1, 2).reshape(weight.shape)


def _load(tensor, n_heads: int | None) -> torch.Tensor:
    values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    expected = tuple(int(n) for n in reversed(tensor.shape))
    # copy: plain F32 tensors come back as views of the read-only memory map
    weight = torch.from_numpy(np.array(values, dtype=np.float32, copy=True)).reshape(expected)
    return weight if n_heads is None else undo_rotary_permutation(weight, n_heads)


def iter_gguf_tensors(
    path: str | os.PathLike, config
) -> Iterator[tuple[str, Callable[[], torch.Tensor]]]:
    """(HF name, loader) per tensor in file order; each loader dequantizes just its own tensor."""
    arch = gguf_architecture(path)
    heads = {
        "attn_q": config.num_attention_heads,
        "attn_k": getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
    }
    for tensor in open_reader(path).tensors:
        name = hf_name(tensor.name)
        if name is None:
            continue
        leaf = tensor.name.split(".")[-2]
        n_heads = heads.get(leaf) if arch in _PERMUTES_QK else None
        yield name, functools.partial(_load, tensor, n_heads)


def gguf_tokenizer(path: str | os.PathLike):
    """The file's tokenizer as a transformers tokenizer, with its chat template and EOS token."""
    from transformers import AutoTokenizer

    path = Path(path).resolve()

    def convert(folder: Path) -> None:  # tokenizer.json, tokenizer_config.json, chat_template.jinja
        from_pretrained(AutoTokenizer, path.parent, gguf_file=path.name, what=str(path)).save_pretrained(folder)

    return from_pretrained(AutoTokenizer, _converted_once("tokenizers", path, convert), what=f"the tokenizer of {path}")


SHARD_BYTES = 2**28  # safetensors shards of the converted folder: what is held while converting


def gguf_folder(path: str | os.PathLike) -> Path:
    """The GGUF file as a Hugging Face folder (config.json, float32 safetensors shards with an
    index, tokenizer files), converted once into fourbit's cache, for transformers to load.

    Streaming: tensors are dequantized one at a time and written in shards of SHARD_BYTES, so
    the conversion holds one shard, never the dense model. The cache costs the dense float32
    model on disk (SmolLM2-135M: 0.54 GB), once per file."""
    from safetensors.torch import save_file

    path = Path(path).resolve()

    def convert(folder: Path) -> None:
        config = gguf_config(path)
        config.save_pretrained(folder)
        if "tokenizer.ggml.model" in open_reader(path).fields:  # a file may hold the weights alone
            gguf_tokenizer(path).save_pretrained(folder)
        weight_map, shard, size, count, total = {}, {}, 0, 0, 0

        def flush() -> None:
            nonlocal shard, size, count
            if shard:
                count += 1
                name = f"model-{count:05d}.safetensors"
                save_file(shard, folder / name, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, name))
                shard, size = {}, 0

        for name, load in iter_gguf_tensors(path, config):
            tensor = load().contiguous()
            if size and size + tensor.nbytes > SHARD_BYTES:
                flush()
            shard[name], size, total = tensor, size + tensor.nbytes, total + tensor.nbytes
        flush()
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    return _converted_once("models", path, convert)


def _converted_once(kind: str, path: Path, convert: Callable[[Path], None]) -> Path:
    """`cache_dir()/<kind>/<stem>-<size>/`, filled by `convert(folder)` the first time it is asked for.

    The folder is written under a temporary name beside it and renamed into place, which is atomic:
    readers never see half a folder, and when two processes race the loser's rename fails and it
    uses the winner's folder.
    """
    cached = cache_dir() / kind / f"{path.stem}-{path.stat().st_size}"
    if cached.is_dir():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cached.name}-", dir=cached.parent))
    try:
        convert(staging)
        os.rename(staging, cached)
    except OSError:
        if not cached.is_dir():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return cached
