"""GGUF export (io/gguf_export.py), read back by llama.cpp itself through llama-cpp-python.

References: the transformers model the file was written from (float32), and for quantized files
that model holding the weights gguf-py dequantizes from the file; llama.cpp's own quantizer
(``llama_model_quantize``) for which type each tensor gets, and for the bytes of Q8_0/Q4_0/Q5_x
tensors (K-quant tensors: their error against the weights).

Tolerances, as max |difference| / max |logit| over a 16-token prompt, on tiny random models
(transformers' default initialization):
- f16 file vs the float32 model: 1e-2. The weights are rounded to float16 (2^-11 relative) and
  llama.cpp's CPU matmul also rounds the activations to float16 before its f16 dot products;
  measured 7e-4. A misplaced tensor or a wrong Q/K permutation moves the logits by their size.
- quantized files vs the model holding the file's own dequantized weights: 2e-2. llama.cpp's
  quantized matmuls quantize the activations too, to 8 bits per block (Q8_0, Q8_K); measured
  8e-3 to 1.1e-2. (The quantized weights themselves move the logits 1% at q8_0, 7-21% at 4 bits.)
"""

import json

import gguf
import llama_cpp  # a test dependency, built from its source release (pyproject.toml's test extra)
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import fourbit
from fourbit.cli import main
from fourbit.io.gguf_export import ARCHITECTURES as GGUF_ARCHITECTURES
from fourbit.io.gguf_export import export_gguf, permute_rotary
from fourbit.io.gguf_vocab import CHECK_TEXT, pre_tokenizer

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=128, max_position_embeddings=256, tie_word_embeddings=False)
ARCHITECTURES = {"llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "phi3": dict(pad_token_id=0),
                 "gemma2": dict(query_pre_attn_scalar=16, tie_word_embeddings=True),
                 "gemma3_text": dict(query_pre_attn_scalar=16, tie_word_embeddings=True,
                                     layer_types=["sliding_attention", "full_attention"])}
PROMPT = "The quick brown fox jumps over the lazy dog, and then it naps."


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def arch(request, tmp_path_factory, chat_tokenizer):
    """(name, folder of a tiny random model saved with SmolLM2's tokenizer and exported to
    ``f16.gguf`` in it, that model, the tokenizer as transformers loads it from the folder: for
    qwen2, Qwen2Tokenizer, which splits text with Qwen's expression over SmolLM2's vocabulary)."""
    name = request.param
    config = AutoConfig.for_model(name, vocab_size=len(chat_tokenizer), **(COMMON | ARCHITECTURES[name]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    # not named after the architecture: the file's general.name is the folder's, and llama.cpp
    # looks for Phi-3's <|end|> token (absent from SmolLM2's vocabulary) in a model named "phi..."
    folder = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    report = export_gguf(folder, folder / "f16.gguf", "f16")  # shared by the tests of this architecture
    assert report.architecture == GGUF_ARCHITECTURES[name]
    return name, folder, model, AutoTokenizer.from_pretrained(folder)


def llama_logits(path, ids, n_ctx: int = 64) -> torch.Tensor:
    llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, logits_all=True, verbose=False, n_threads=2, seed=0)
    llm.eval(ids)
    return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))


def hf_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_the_pre_tokenizer_is_named_as_llama_cpp_names_it(chat_tokenizer):
    from fourbit.io.default_model import default_model_path

    # SmolLM2's GGUF, written by llama.cpp's converter, records its pre-tokenizer: ours agrees
    field = gguf.GGUFReader(default_model_path()).fields["tokenizer.ggml.pre"]
    assert pre_tokenizer(chat_tokenizer) == bytes(field.parts[-1]).decode() == "smollm"
    assert "🦙" in CHECK_TEXT


def test_f16_runs_in_llama_cpp_with_the_models_logits(arch):
    name, folder, model, tokenizer = arch
    ids = tokenizer.encode(PROMPT)
    assert relative(llama_logits(folder / "f16.gguf", ids), hf_logits(model, ids)) < 1e-2  # see the module docstring


def test_llama_cpp_tokenizes_and_stops_as_the_tokenizer_does(arch):
    _, folder, _, tokenizer = arch
    assert_same_tokens(folder / "f16.gguf", tokenizer)
    fields = gguf.GGUFReader(folder / "f16.gguf").fields
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert fields["tokenizer.ggml.eot_token_id"].parts[-1][0] == im_end
    assert bytes(fields["tokenizer.chat_template"].parts[-1]).decode() == tokenizer.chat_template
    modelfile = (folder / "f16.Modelfile").read_text()
    assert modelfile.startswith("FROM ./f16.gguf\n") and 'PARAMETER stop "<|im_end|>"' in modelfile


def assert_same_tokens(path, tokenizer):
    llm = llama_cpp.Llama(str(path), n_ctx=64, verbose=False, vocab_only=True)
    for text in (PROMPT, CHECK_TEXT, "<|im_start|>user\nHi 12345<|im_end|>\n"):
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tokenizer.encode(text, add_special_tokens=False)
        # with the special tokens the tokenizer adds (a BOS or not: llama.cpp reads add_bos_token)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text


def test_a_known_splitting_over_another_vocabulary_is_named_by_its_expression(tmp_path, chat_tokenizer):
    """Llama 3's expression (digits in threes) over SmolLM2's vocabulary: no known hash, so the
    pre-tokenizer is named by its Split expression, and llama.cpp splits as transformers does."""
    from fourbit.io.gguf_vocab import SPLIT_PATTERNS

    spec = json.loads(chat_tokenizer.backend_tokenizer.to_str())
    llama3 = next(p for p, n in SPLIT_PATTERNS.items() if n == "llama-bpe")
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": llama3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    folder = tmp_path / "llama3-split"
    config = AutoConfig.for_model("llama", vocab_size=len(chat_tokenizer), **COMMON)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.encode(CHECK_TEXT) != chat_tokenizer.encode(CHECK_TEXT)  # the splitting took effect
    assert pre_tokenizer(tokenizer) == "llama-bpe"
    export_gguf(folder, tmp_path / "m.gguf", "f16")
    assert_same_tokens(tmp_path / "m.gguf", tokenizer)


def dequantized_twin(model, path, read=None):
    """A copy of ``model`` holding the weights gguf-py dequantizes from the GGUF file at ``path``
    (``read``: its tensors, when already read)."""
    import copy

    twin = copy.deepcopy(model)
    config = model.config
    arch = GGUF_ARCHITECTURES[config.model_type]
    enum = next(e for e, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    names = gguf.get_tensor_name_map(enum, config.num_hidden_layers)
    tensors = read if read is not None else {t.name: t for t in gguf.GGUFReader(path).tensors}
    with torch.no_grad():
        for hf_name, param in twin.state_dict().items():
            if hf_name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the embedding's storage
            tensor = tensors[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
            values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy()).reshape(param.shape)
            if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
                heads = config.num_attention_heads if "q_proj" in hf_name else config.num_key_value_heads
                values = unpermute(values, heads)
            if arch.startswith("gemma") and hf_name.endswith("norm.weight"):
                values = values - 1  # Gemma's norms scale by 1 + w; the file holds 1 + w
            param.copy_(values)
    return twin


def unpermute(weight, heads):
    rows = weight.shape[0]
    return weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


K_QUANTS = {"Q4_K", "Q5_K", "Q6_K"}


def llama_cpp_quantize(source, output, quant):
    """llama.cpp's own quantizer (llama-quantize) on our f16 file."""
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant.upper()}")
    assert llama_cpp.llama_model_quantize(str(source).encode(), str(output).encode(), params) == 0


def tensors(path):
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def values(tensor) -> np.ndarray:
    return gguf.quants.dequantize(tensor.data, tensor.tensor_type)


# every architecture at q4_0 (gguf-py's quantizer, byte for byte, and the LM head's rule); the
# K-quant mix where its per-tensor rules differ: llama (attn_v, ffn_down), phi3 (a fused attn_qkv),
# gemma2 (a tied head); q8_0 and q6_k on llama (q5_k_m: the next test, with K-quant rows)
PAIRS = [(a, "q4_0") for a in sorted(ARCHITECTURES)] + [(a, "q4_k_m") for a in ("gemma2", "llama", "phi3")] + [
    ("llama", "q8_0"), ("llama", "q6_k")]


@pytest.mark.parametrize("arch,quant", PAIRS, indirect=["arch"])
def test_quantized_files_compute_their_weights_and_match_llama_cpps_quantizer(arch, tmp_path, quant):
    name, folder, model, tokenizer = arch
    export_gguf(folder, tmp_path / "ours.gguf", quant)
    ids = tokenizer.encode(PROMPT)
    ours = tensors(tmp_path / "ours.gguf")
    twin = dequantized_twin(model, tmp_path / "ours.gguf", ours)
    assert relative(llama_logits(tmp_path / "ours.gguf", ids), hf_logits(twin, ids)) < 2e-2  # see the docstring
    assert 1e-3 < relative(hf_logits(twin, ids), hf_logits(model, ids))  # the weights were quantized

    llama_cpp_quantize(folder / "f16.gguf", tmp_path / "theirs.gguf", quant)
    theirs = tensors(tmp_path / "theirs.gguf")
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    for n in ours:  # gguf-py's quantizers are llama.cpp's, to the byte (K-quants: see the next test)
        assert ours[n].tensor_type.name in K_QUANTS or bytes(ours[n].data) == bytes(theirs[n].data), n


@pytest.mark.parametrize("quant", ["q4_k_m", "q5_k_m"])  # Q4_K, Q5_K and (in both) Q6_K tensors
def test_k_quants_are_as_close_to_the_weights_as_llama_cpps(tmp_path, chat_tokenizer, quant):
    """Rows of whole 256-blocks (hidden 256): the K-quant tensors are fourbit's own quantizer's.
    Each tensor's squared error against the f16 weights, ours over llama.cpp's: at most 1.1
    (measured: Q4_K 0.99-1.00, Q5_K 1.01-1.02, Q6_K 1.04-1.05; llama.cpp minimises an error
    weighted toward large values, we the plain one)."""
    config = AutoConfig.for_model("llama", vocab_size=len(chat_tokenizer), **(COMMON | dict(
        hidden_size=256, intermediate_size=512, head_dim=64, tie_word_embeddings=True)))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(tmp_path / "wide")
    chat_tokenizer.save_pretrained(tmp_path / "wide")
    export_gguf(tmp_path / "wide", tmp_path / "f16.gguf", "f16")
    export_gguf(tmp_path / "wide", tmp_path / "ours.gguf", quant)
    llama_cpp_quantize(tmp_path / "f16.gguf", tmp_path / "theirs.gguf", quant)
    weights, ours, theirs = tensors(tmp_path / "f16.gguf"), tensors(tmp_path / "ours.gguf"), tensors(tmp_path / "theirs.gguf")
    assert {n: t.tensor_type.name for n, t in ours.items()} == {n: t.tensor_type.name for n, t in theirs.items()}
    kinds = {t.tensor_type.name for t in ours.values()}
    assert kinds & K_QUANTS == {quant[:2].upper() + "_K", "Q6_K"}
    ratios = {}
    for n, t in ours.items():
        if t.tensor_type.name in K_QUANTS:
            w = values(weights[n])
            ratios[n] = ((values(t) - w) ** 2).sum() / ((values(theirs[n]) - w) ** 2).sum()
    assert max(ratios.values()) < 1.1, ratios
    ids = chat_tokenizer.encode(PROMPT)
    twin = dequantized_twin(model, tmp_path / "ours.gguf", ours)
    assert relative(llama_logits(tmp_path / "ours.gguf", ids), hf_logits(twin, ids)) < 2e-2


def test_the_adapter_is_merged_first(tmp_path, chat_tokenizer):
    from fourbit.io.merge import merge_adapter
    from fourbit.nn.lora import lora_adapters

    config = AutoConfig.for_model("llama", vocab_size=len(chat_tokenizer), **COMMON)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    chat_tokenizer.save_pretrained(tmp_path / "base")
    model, _ = fourbit.load_model(tmp_path / "base", compute_dtype="float32", torch_dtype="float32")
    fourbit.add_lora(model, r=4, alpha=8, verbose=False)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.weight.normal_(std=0.05)
    fourbit.save_adapter(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"),
                             "--quant", "f16", "-o", str(tmp_path / "out.gguf")]) == 0
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    ids = chat_tokenizer.encode(PROMPT)
    ours = llama_logits(tmp_path / "out.gguf", ids)
    assert relative(ours, hf_logits(merged, ids)) < 1e-2
    assert relative(ours, hf_logits(base, ids)) > 5e-2  # the adapter is in the file


SENTENCEPIECE_TEXTS = (PROMPT, CHECK_TEXT, "def f(x):\n    return x  + 1\n\n\tdone", "  two  spaces ", "a", "</s> inside")


@pytest.mark.parametrize("name,space_prefix", [("llama", True), ("gemma2", False)])
def test_a_sentencepiece_style_tokenizer_tokenizes_in_llama_cpp_as_in_transformers(tmp_path, name, space_prefix):
    """Llama 2 / Mistral (a leading "▁") and Gemma (none): the vocabulary as GGUF's "llama" model,
    scores from the merge ranks, byte tokens for the characters without a token (CHECK_TEXT's
    emoji, Khmer and Chinese); llama.cpp's SentencePiece tokenizer gives transformers' ids."""
    from sentencepiece_style import sentencepiece_style

    config = AutoConfig.for_model(name, vocab_size=len(sentencepiece_style(space_prefix)),
                                  **(COMMON | ARCHITECTURES[name]))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    sentencepiece_style(space_prefix).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    export_gguf(folder, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(tmp_path / "m.gguf").fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    assert bool(fields["tokenizer.ggml.add_space_prefix"].parts[-1][0]) is space_prefix
    assert any(len(tokenizer.tokenize(t)) > len(t.split()) + 1 for t in SENTENCEPIECE_TEXTS)  # merges had work to do
    assert "<0xF0>" in tokenizer.tokenize(CHECK_TEXT)  # and so had byte fallback
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, verbose=False, vocab_only=True)
    for text in SENTENCEPIECE_TEXTS:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tokenizer.encode(text), text
    ids = tokenizer.encode(PROMPT)
    assert relative(llama_logits(tmp_path / "m.gguf", ids), hf_logits(model, ids)) < 1e-2  # see the module docstring


LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=100.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=32)
ROPE_SCALING = {  # a small rotary base, so that within 100 tokens the scaled low frequencies turn far enough to matter
    "llama3 on llama": ("llama", dict(rope_parameters=LLAMA3_ROPE)),
    "linear on llama": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=100.0, factor=4.0))),
    "linear on gemma3 global layers": ("gemma3_text", dict(rope_parameters={
        "full_attention": dict(rope_type="linear", rope_theta=100.0, factor=4.0),
        "sliding_attention": dict(rope_type="default", rope_theta=50.0)})),
}


@pytest.mark.parametrize("case", sorted(ROPE_SCALING))
def test_rope_scaling_runs_in_llama_cpp_as_in_transformers(tmp_path, chat_tokenizer, case):
    """Llama 3.1-3.3's scaling (per-frequency divisors as the rope_freqs tensor) and linear
    scaling (Gemma 3's global layers): f16 logits over 100 tokens within the f16 bound, where the
    same model without its scaling is far outside it."""
    name, rope = ROPE_SCALING[case]
    settings = COMMON | ARCHITECTURES[name] | rope
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, vocab_size=len(chat_tokenizer), **settings),
                                             dtype=torch.float32).eval()
    with torch.no_grad():  # sharper attention than the default initialization's: positions matter more
        for module_name, weight in model.named_parameters():
            if module_name.endswith(("q_proj.weight", "k_proj.weight")):
                weight.mul_(6)
    model.save_pretrained(tmp_path / "tiny")
    chat_tokenizer.save_pretrained(tmp_path / "tiny")
    export_gguf(tmp_path / "tiny", tmp_path / "m.gguf", "f16")
    ids = chat_tokenizer.encode(" ".join([PROMPT] * 8))[:100]
    got, want = llama_logits(tmp_path / "m.gguf", ids, n_ctx=128), hf_logits(model, ids)
    assert relative(got, want) < 1e-2  # see the module docstring
    plain = {k: {**v, "rope_type": "default"} if isinstance(v, dict) else v for k, v in rope["rope_parameters"].items()}
    plain = plain if "full_attention" in plain else {"rope_type": "default", "rope_theta": 100.0}
    unscaled = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        name, vocab_size=len(chat_tokenizer), **(settings | {"rope_parameters": plain})), dtype=torch.float32).eval()
    unscaled.load_state_dict(model.state_dict())
    without = relative(hf_logits(unscaled, ids), want)
    assert relative(got, want) < without / 4, without  # the file carries the scaling: far closer than without it


def test_what_cannot_be_exported_is_refused_and_nothing_written(tmp_path, chat_tokenizer):
    folder = tmp_path / "llama"
    config = AutoConfig.for_model("llama", vocab_size=len(chat_tokenizer), **COMMON)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    chat_tokenizer.save_pretrained(folder)
    config = AutoConfig.for_model("olmo2", vocab_size=len(chat_tokenizer), **COMMON)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "olmo2")
    with pytest.raises(ValueError, match=r"cannot write 'olmo2' models to GGUF yet; it writes gemma2, gemma3_text, llama"):
        export_gguf(tmp_path / "olmo2", tmp_path / "out.gguf")
    config = AutoConfig.for_model("gemma2", vocab_size=len(chat_tokenizer), **COMMON, query_pre_attn_scalar=16)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gemma2")  # COMMON: an untied lm_head
    with pytest.raises(ValueError, match=r"llama.cpp's gemma2 reuses the embedding as the LM head"):
        export_gguf(tmp_path / "gemma2", tmp_path / "out.gguf")
    config = AutoConfig.for_model("qwen2", vocab_size=len(chat_tokenizer), **COMMON, rope_parameters=dict(
        rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=64))
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "yarn")
    with pytest.raises(ValueError, match=r"rope scaling 'yarn' cannot be written to GGUF yet; fourbit writes linear"):
        export_gguf(tmp_path / "yarn", tmp_path / "out.gguf")
    with pytest.raises(ValueError, match=r"quant type 'q3_k' is not supported; choose one of f16, bf16, q8_0, q4_0"):
        export_gguf(folder, tmp_path / "out.gguf", "q3_k")
    with pytest.raises(ValueError, match="must be a .gguf file"):
        export_gguf(folder, tmp_path / "out.bin")
    assert list(tmp_path.glob("out*")) == []
    (tmp_path / "out.gguf").write_text("keep me")
    with pytest.raises(FileExistsError, match="already exists"):
        export_gguf(folder, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_text() == "keep me"
    assert main(["export", str(tmp_path / "olmo2"), "-o", str(tmp_path / "g.gguf")]) == 2
    assert not (tmp_path / "g.gguf").exists()


def test_rotary_permutation_pairs_neighbouring_dimensions():
    # head of 4 dims: transformers rotates (0, 2) and (1, 3); llama.cpp rotates (0, 1) and (2, 3)
    rows = torch.arange(8.0).reshape(8, 1)  # two heads
    assert permute_rotary(rows, 2).flatten().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert json.dumps(unpermute(permute_rotary(rows, 2), 2).flatten().tolist()) == json.dumps(rows.flatten().tolist())


def test_an_adapter_as_a_llama_cpp_lora_file_adds_what_the_merge_adds(tmp_path, chat_tokenizer):
    from fourbit.io.merge import merge_adapter
    from fourbit.nn.lora import lora_adapters

    config = AutoConfig.for_model("llama", vocab_size=len(chat_tokenizer), **COMMON)  # llama: Q/K rows permuted
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "base")
    chat_tokenizer.save_pretrained(tmp_path / "base")
    model, _ = fourbit.load_model(tmp_path / "base", quantization=None, compute_dtype="float32", torch_dtype="float32")
    fourbit.add_lora(model, r=4, alpha=8, use_rslora=True, verbose=False)  # rsLoRA: alpha rewritten for llama.cpp
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.weight.normal_(std=0.05)
    fourbit.save_adapter(model, tmp_path / "adapter")
    assert main(["export", str(tmp_path / "base"), "--quant", "f16", "-o", str(tmp_path / "base.gguf")]) == 0
    assert main(["export", str(tmp_path / "base"), "--adapter", str(tmp_path / "adapter"), "--format", "gguf-lora",
                 "-o", str(tmp_path / "lora.gguf")]) == 0
    merge_adapter(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", dtype="float32", base_quantization=None)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    ids = chat_tokenizer.encode(PROMPT)
    llm = llama_cpp.Llama(str(tmp_path / "base.gguf"), lora_path=str(tmp_path / "lora.gguf"), n_ctx=64,
                          logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    assert relative(theirs, hf_logits(merged, ids)) < 1e-2  # as the f16 file: see the module docstring
    assert relative(llama_logits(tmp_path / "base.gguf", ids), hf_logits(merged, ids)) > 5e-2  # the LoRA counts


@pytest.mark.slow
def test_the_default_model_chats_in_llama_cpp_and_stops_at_its_end_of_turn(tmp_path):
    """The embedded SmolLM2 exported at f16: llama.cpp's own chat handler (the template read from
    the file) answers as transformers does and stops at <|im_end|>, not at the token limit. (f16:
    this greedy answer is a near tie at its first token; the Q4_1 file SmolLM2 ships in, run by
    llama.cpp, answers "L'Étoile, la Marseillaise, ..." and runs to the limit, and so does a q8_0
    export.)"""
    export_gguf(None, tmp_path / "smollm2.gguf", "f16")
    llm = llama_cpp.Llama(str(tmp_path / "smollm2.gguf"), n_ctx=512, verbose=False, n_threads=2)
    out = llm.create_chat_completion(messages=[{"role": "user", "content": "What is the capital of France?"}],
                                     max_tokens=64, temperature=0.0, seed=0)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "stop", choice
    assert choice["message"]["content"] == "The capital of France is Paris."  # transformers' greedy answer
