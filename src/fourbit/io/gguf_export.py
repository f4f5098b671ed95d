"""A model (and optionally its LoRA adapter, merged first) as one GGUF file that llama.cpp,
Ollama and LM Studio run, written with gguf-py; no llama.cpp build is needed.

The file: the architecture's hyperparameters under ``<arch>.*`` (context length, widths, heads,
rotary base, norm epsilon), the tokenizer and chat template (io/gguf_vocab.py), and every weight
under llama.cpp's tensor name (gguf-py's TensorNameMap: ``token_embd``, ``blk.N.attn_q``, ...),
in the type ``quant`` asks for (per tensor as llama.cpp's own quantizer chooses for the same file
type: ``tensor_type``):

    quant    most 2-D weights                                           1-D (norms, biases)
    f16      float16                                                    float32
    bf16     bfloat16                                                   float32
    q8_0     Q8_0: blocks of 32, f16 scale d = absmax/127, int8 codes
    q4_0     Q4_0: blocks of 32, f16 scale d = (signed absmax)/-8, 4-bit codes; LM head Q6_K
    q4_k_m   Q4_K (quant/kquants.py); attn_v and ffn_down of some layers and the LM head Q6_K
    q5_k_m   Q5_K; the same tensors Q6_K
    q6_k     Q6_K

Q8_0, Q4_0 and the fallbacks of K-quants for rows that are not whole 256-blocks (Q5_0, Q5_1) are
quantized by gguf-py from the weights as rounded to float16: the numbers an f16 file holds, so
those tensors equal, byte for byte, what llama.cpp's quantizer (``llama-quantize``) writes from
our f16 file. The K-quants are fourbit's own quantizer (the bytes differ from llama.cpp's; the
errors are compared in tests/io/test_gguf_export.py).

Architectures (transformers ``model_type`` -> GGUF ``general.architecture``): llama and mistral
-> llama, qwen2, qwen3, phi3 (its fused qkv_proj and gate_up_proj as they are), gemma2 and
gemma3_text -> gemma3. For ``llama`` llama.cpp's rotary embedding pairs neighbouring dimensions
where transformers pairs dimension i with i + d/2, so the rows of Q and K are permuted per head,
[h, 2, d/2] -> [h, d/2, 2] (io/gguf.py undoes it when reading). Gemma's norms compute
x * (1 + w) where llama.cpp multiplies by the stored weight, so 1 + w is stored; Gemma writes its
soft-capping, sliding window (and Gemma 3 its per-layer pattern and local rotary base). A tied LM
head writes no ``output`` tensor (llama.cpp reuses ``token_embd``; Gemma must be tied). Rope
scaling: linear (``rope.scaling.*``) and Llama 3's (the ``rope_freqs`` tensor: :func:`rope_scaling`).
An architecture, rope scaling or quant type not listed is refused by name before anything is
written; the file appears whole or not at all (a temporary file, then a rename).

Beside the file, ``<stem>.Modelfile`` for Ollama: FROM the file, the chat format as an Ollama
(Go) TEMPLATE for the families it knows (ChatML, Llama 3), and a ``stop`` for the end-of-turn
token.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from ..errors import InputError
from ..quant.kquants import QK_K, quantize_q4_k, quantize_q5_k, quantize_q6_k
from .atomic import atomic_file, check_output_apart
from .gguf_vocab import add_tokenizer

ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "phi3": "phi3",
                 "gemma2": "gemma2", "gemma3_text": "gemma3"}
PERMUTES_QK = {"llama"}
PLUS_ONE_NORMS = {"gemma2", "gemma3"}  # norms computing x * (1 + w): llama.cpp's multiply by the stored weight
TIED_ONLY = {"gemma2", "gemma3"}  # no output tensor: the embedding is the LM head
T = gguf.GGMLQuantizationType
QUANT_TYPES = {  # --quant -> (the type of most 2-D weights, the file type)
    "f16": (T.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (T.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (T.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (T.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "q4_k_m": (T.Q4_K, gguf.LlamaFileType.MOSTLY_Q4_K_M),
    "q5_k_m": (T.Q5_K, gguf.LlamaFileType.MOSTLY_Q5_K_M),
    "q6_k": (T.Q6_K, gguf.LlamaFileType.MOSTLY_Q6_K),
}
FALLBACK = {T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}  # K-quants need rows of whole 256-blocks
K_QUANTIZERS = {T.Q4_K: quantize_q4_k, T.Q5_K: quantize_q5_k, T.Q6_K: quantize_q6_k}


@dataclass
class ExportReport:
    output: Path
    modelfile: Path | None  # None for a LoRA file
    architecture: str
    quant: str
    tensors: int
    types: dict[str, int]  # GGML type name -> tensors of that type
    bytes: int

    def format(self) -> str:
        types = ", ".join(f"{n} {t}" for t, n in sorted(self.types.items()))
        line = (f"wrote {self.output} ({self.bytes / 2**20:.1f} MiB, {self.architecture}, {self.quant}): "
                f"{self.tensors} tensors ({types})")
        if self.modelfile is None:
            return line + f"\n  llama.cpp: llama-cli -m BASE.gguf --lora {self.output}"
        return line + f"\n  Ollama: ollama create NAME -f {self.modelfile}"


def export_gguf(source: str | os.PathLike | None, output: str | os.PathLike, quant: str = "q8_0",
                adapter: str | os.PathLike | None = None, overwrite: bool = False,
                into: str = "dequantized") -> ExportReport:
    """``fourbit export``: the model at ``source`` (what load_model takes; a quantized folder is
    dequantized), with the PEFT ``adapter`` merged first if given (io/merge.py, float32, ``into``
    the dequantized base it was trained on or the original weights), as a GGUF file at ``output``."""
    from transformers import AutoConfig

    from .loader import load_model
    from .merge import dequantize_model, merge_adapter

    output = _checked_output(output, overwrite, source, adapter)
    if quant not in QUANT_TYPES:
        raise InputError(f"GGUF quant type {quant!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")
    if source is not None and Path(source).is_dir():  # refused before any loading or merging
        check_exportable(AutoConfig.from_pretrained(source), quant)
    name = Path(str(source)).name.removesuffix(".gguf") if source is not None else "SmolLM2-135M-Instruct"
    with tempfile.TemporaryDirectory(dir=output.parent if output.parent.exists() else None) as tmp:
        if adapter is not None:
            merge_adapter(source, adapter, Path(tmp) / "merged", dtype="float32", into=into)
            source = Path(tmp) / "merged"
        model, tokenizer = load_model(source, quantization=None, compute_dtype="float32", torch_dtype="float32")
        check_exportable(model.config, quant)
        dequantize_model(model)
        return write_gguf(model, tokenizer, output, quant, name=name)


def export_gguf_lora(source: str | os.PathLike | None, adapter: str | os.PathLike, output: str | os.PathLike,
                     overwrite: bool = False) -> ExportReport:
    """``fourbit export --format gguf-lora``: the PEFT ``adapter`` alone, as a llama.cpp LoRA
    GGUF (``llama-cli -m BASE.gguf --lora FILE.gguf``) for the base exported from ``source``.

    The file: ``general.type = "adapter"``, ``adapter.type = "lora"``, ``adapter.lora.alpha``
    (llama.cpp scales by alpha / r: an rsLoRA adapter is written with alpha * sqrt(r)), and per
    adapted weight ``<tensor>.weight.lora_a`` [r, in] and ``.lora_b`` [out, r] in float32, under
    the base's GGUF tensor names, B's rows permuted as the base's Q/K rows are (io/gguf_export.py).
    llama.cpp adds s * B @ A to the weights of the GGUF base it is given; an adapter trained on a
    4-bit base learned to correct that base's quantization error, which an f16 base lacks.
    """
    from transformers import AutoConfig

    from .peft import PREFIX, read_adapter
    from .sources import open_source

    output = _checked_output(output, overwrite, source, adapter)
    files = read_adapter(adapter)
    for key, why in (("use_dora", "DoRA"), ("target_parameters", "LoRA on MoE expert weights")):
        if files.config.get(key):
            raise InputError(f"{adapter}: {why} adapters have no llama.cpp LoRA form; export the merged model instead")
    config = AutoConfig.from_pretrained(open_source(source).hf_folder())
    arch = check_exportable(config, "f16")
    names = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    alpha = files.scaling * files.r  # llama.cpp scales by alpha / r: this alpha gives the adapter's own scale (rsLoRA too)
    with gguf_file(output, arch) as writer:
        writer.add_string(gguf.Keys.General.TYPE, gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        count = 0
        for key in sorted(k for k in files.tensors if k.endswith(".lora_A.weight")):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            name = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if name is None:
                raise InputError(f"{adapter}: {module} has no GGUF tensor for {arch}")
            b = files.tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise InputError(f"{adapter}: {module} has a lora_A but no lora_B")
            a, b = files.tensors[key].float(), b.float()
            if arch in PERMUTES_QK and module.endswith(("q_proj", "k_proj")):
                b = permute_rotary(b, config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads)
            writer.add_tensor(name + ".lora_a", a.contiguous().numpy())
            writer.add_tensor(name + ".lora_b", b.contiguous().numpy())
            count += 1
    return ExportReport(output, None, arch, "lora", 2 * count, {"F32": 2 * count}, output.stat().st_size)


def _checked_output(output, overwrite: bool, *inputs) -> Path:
    output = Path(output)
    if output.suffix != ".gguf":
        raise InputError(f"the output must be a .gguf file, got {output}")
    check_output_apart(output, *inputs)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} already exists; choose another output or pass --overwrite")
    return output


@contextlib.contextmanager
def gguf_file(output: Path, arch: str):
    """A GGUFWriter for ``output``: the file is written to a temporary name beside it and renamed
    once whole; on an error nothing is left."""
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_exportable(config, quant: str) -> str:
    """The GGUF architecture of a transformers ``config``; a ValueError names what cannot be written."""
    if quant not in QUANT_TYPES:
        raise InputError(f"GGUF quant type {quant!r} is not supported; choose one of {', '.join(QUANT_TYPES)}")
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise InputError(f"fourbit cannot write {model_type!r} models to GGUF yet; it writes "
                         f"{', '.join(sorted(ARCHITECTURES))}")
    rope_scaling(config, ARCHITECTURES[model_type])  # refuses a kind it cannot write
    if ARCHITECTURES[model_type] in TIED_ONLY and not getattr(config, "tie_word_embeddings", False):
        raise InputError(f"llama.cpp's {ARCHITECTURES[model_type]} reuses the embedding as the LM head; this "
                         f"{model_type} model has its own lm_head, which the file cannot hold")
    return ARCHITECTURES[model_type]


def write_gguf(model: nn.Module, tokenizer, output: str | os.PathLike, quant: str = "q8_0",
               name: str | None = None) -> ExportReport:
    """Write the dense transformers ``model`` and its ``tokenizer`` to ``output`` (a .gguf file) and
    an Ollama Modelfile beside it."""
    output = Path(output)
    config = model.config
    arch = check_exportable(config, quant)
    if tokenizer is None:
        raise InputError("GGUF export needs the model's tokenizer (llama.cpp reads it from the file)")
    weight_type, file_type = QUANT_TYPES[quant]
    with gguf_file(output, arch) as writer:
        writer.add_name(name or Path(getattr(config, "_name_or_path", "") or "model").name or "model")
        _add_hyperparameters(writer, config, arch)
        writer.add_file_type(int(file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        special = add_tokenizer(writer, tokenizer, config.vocab_size)
        types = _add_tensors(writer, model, arch, weight_type)
    modelfile = output.with_suffix(".Modelfile")
    with atomic_file(modelfile) as f:
        f.write(ollama_modelfile(output.name, tokenizer, special))
    counts: dict[str, int] = {}
    for t in types.values():
        counts[t] = counts.get(t, 0) + 1
    return ExportReport(output, modelfile, arch, quant, len(types), counts, output.stat().st_size)


def _rope_parameters(config, layer_type: str = "full_attention") -> dict:
    """rope_theta and rope_type, wherever this transformers version keeps them (per layer type
    for models with sliding and full attention layers, Gemma 3)."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if layer_type in params or "full_attention" in params:
        params = dict(params.get(layer_type) or params["full_attention"])
    scaling = getattr(config, "rope_scaling", None) or {}
    params.setdefault("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    return params


def rope_scaling(config, arch: str) -> str:
    """The rope scaling of ``config`` that the file can carry: "default" (none), "linear" (every
    position divided by ``factor``: ``rope.scaling.type`` and ``.factor``; on Gemma 3 its global
    layers alone, as Gemma 3 has it) or "llama3" (Llama 3.1-3.3: a per-frequency divisor, written
    as the ``rope_freqs`` tensor, which llama.cpp's llama architecture reads). Others (yarn,
    dynamic, longrope) are refused by name."""
    full = _rope_parameters(config, "full_attention").get("rope_type") or "default"
    sliding = _rope_parameters(config, "sliding_attention").get("rope_type") or "default"
    allowed = {"default", "linear"} | ({"llama3"} if arch == "llama" else set())
    if full not in allowed or (sliding != full and not (arch == "gemma3" and sliding == "default")):
        kind = full if full not in allowed else sliding
        raise InputError(f"a {config.model_type} model with rope scaling {kind!r} cannot be written to GGUF yet; "
                         f"fourbit writes {', '.join(sorted(allowed - {'default'}))} scaling for {arch}")
    return full


def rope_frequency_divisors(config) -> torch.Tensor:
    """Llama 3 rope scaling as llama.cpp's ``rope_freqs``: for each rotary frequency, the number
    the plain frequency 1 / theta^(2i/d) is divided by (1 for high frequencies, ``factor`` for
    low ones, a blend between), taken from transformers' own definition of the scaling."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = _head_dim(config)
    theta = float(_rope_parameters(config).get("rope_theta", 10000.0))
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    scaled, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    if attention_factor != 1.0:
        raise InputError(f"llama3 rope scaling with an attention factor of {attention_factor} cannot be written to GGUF")
    return (plain / scaled.double()).float()


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _add_hyperparameters(writer: gguf.GGUFWriter, config, arch: str) -> None:
    head_dim = _head_dim(config)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_rope_freq_base(float(_rope_parameters(config).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if rope_scaling(config, arch) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(_rope_parameters(config)["factor"]))
    if head_dim != config.hidden_size // config.num_attention_heads or arch in ("qwen3", "gemma2", "gemma3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(float(_rope_parameters(config, "sliding_attention").get("rope_theta", 10000.0)))
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])


def _add_tensors(writer: gguf.GGUFWriter, model: nn.Module, arch: str, weight_type) -> dict[str, str]:
    config = model.config
    names = gguf.get_tensor_name_map(_arch_enum(arch), config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    types = {}
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise InputError(f"{hf_name} has no GGUF tensor name for {arch}; the file would be incomplete")
        data = tensor.detach().float()
        if arch in PERMUTES_QK and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
            data = permute_rotary(data, heads)
        if arch in PLUS_ONE_NORMS and hf_name.endswith("norm.weight"):
            data = data + 1
        kind = tensor_type(name, data.shape, weight_type, config.num_hidden_layers, has_output=not tied)
        writer.add_tensor(name, encode(data, kind), raw_dtype=kind)
        types[name] = kind.name
    if rope_scaling(config, arch) == "llama3":
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        writer.add_tensor(name, rope_frequency_divisors(config).numpy(), raw_dtype=T.F32)
        types[name] = T.F32.name
    return types


def tensor_type(name: str, shape: tuple[int, ...], weight_type, layers: int, has_output: bool):
    """The GGML type of tensor ``name`` in a file of ``weight_type``, chosen as llama.cpp's quantizer
    (llama-quantize) chooses for the same file type, so that our files and its files agree:

    - 1-D tensors (norms, biases): F32; f16/bf16 files: every 2-D weight in that type.
    - The LM head (``output``, or ``token_embd`` when the head is tied to it): Q6_K in q4_0 and
      K-quant files, Q8_0 where its rows are not whole 256-blocks; Q8_0 in q8_0 files.
    - q4_k_m / q5_k_m: ``attn_v`` (or a fused ``attn_qkv``) and ``ffn_down`` of the first and last
      eighth of the layers and of every third layer between them: Q6_K (more bits where the error
      costs most).
    - A K-quant weight whose rows are not whole 256-blocks: Q5_0 for Q4_K, Q5_1 for Q5_K, Q8_0
      for Q6_K; a Q4_0/Q8_0 weight whose rows are not whole 32-blocks: F16.
    """
    if len(shape) < 2:
        return T.F32
    if weight_type in (T.F16, T.BF16):
        return weight_type
    columns = shape[-1]
    kind = weight_type
    head = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if head and weight_type != T.Q8_0:
        kind = T.Q6_K if columns % QK_K == 0 else T.Q8_0
    elif weight_type in (T.Q4_K, T.Q5_K) and name.endswith(("attn_v.weight", "attn_qkv.weight", "ffn_down.weight")):
        layer = int(name.split(".")[1])
        if layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2:
            kind = T.Q6_K
    if kind in FALLBACK and columns % QK_K:
        kind = FALLBACK[kind]
    if columns % 32:
        kind = T.F16
    return kind


def encode(data: torch.Tensor, kind) -> np.ndarray:
    """What gguf-py writes for tensor ``data`` in GGML type ``kind``. Quantized types start from the
    weights as rounded to float16: the numbers an f16 file holds, which llama.cpp's quantizer reads."""
    if kind == T.F32:
        return data.numpy().astype(np.float32)
    if kind == T.BF16:
        return gguf.quants.quantize(data.numpy(), kind)
    half = data.to(torch.float16)
    if kind == T.F16:
        return half.numpy()
    if kind in K_QUANTIZERS:
        return K_QUANTIZERS[kind](half.float().reshape(-1, data.shape[-1]))
    return gguf.quants.quantize(half.float().numpy(), kind)


def permute_rotary(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of Q or K from transformers' half-split rotary layout to llama.cpp's interleaved one."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _arch_enum(arch: str) -> gguf.MODEL_ARCH:
    return next(e for e, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)


OLLAMA_TEMPLATES = {  # the end-of-turn token a chat template uses -> Ollama's (Go) template
    "<|im_end|>": (
        "{{ if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
        "{{ if .Prompt }}<|im_start|>user\n{{ .Prompt }}<|im_end|>\n{{ end }}"
        "<|im_start|>assistant\n{{ .Response }}<|im_end|>\n"
    ),
    "<|eot_id|>": (
        "{{ if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
        "{{ if .Prompt }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Prompt }}<|eot_id|>{{ end }}"
        "<|start_header_id|>assistant<|end_header_id|>\n\n{{ .Response }}<|eot_id|>"
    ),
}


def ollama_modelfile(gguf_name: str, tokenizer, special: dict[str, int]) -> str:
    """An Ollama Modelfile for the GGUF file ``gguf_name`` in the same folder."""
    lines = [f"FROM ./{gguf_name}"]
    stops = []
    for key in ("eot", "eos"):
        if key in special:
            text = tokenizer.convert_ids_to_tokens(special[key])
            if text not in stops:
                stops.append(text)
    template = next((t for token, t in OLLAMA_TEMPLATES.items() if stops and stops[0] == token), None)
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# no TEMPLATE: Ollama reads the chat template from the GGUF file")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    return "\n".join(lines) + "\n"
