"""GGUF reading: tiny files written here (fast), and the embedded SmolLM2 file (slow).

References:
- tiny files: a random transformers model is written with gguf-py's GGUFWriter the way llama.cpp's
  converter does it (gguf-py's own name map, Q/K rows permuted for llama only), read back with
  iter_gguf_tensors, and compared with the model's state_dict and with transformers' own GGUF
  loading of the same file;
- SmolLM2: transformers' GGUF loader, which dequantizes with the same gguf-py routine in float32,
  so every tensor must be identical.

transformers' loader is called as `load_gguf_checkpoint(..., return_tensors=True)`: that is what
`from_pretrained(dir, gguf_file=..., quantization_config=GgufConfig(dequantize=True))` runs for
llama/qwen2/qwen3 in transformers 5.23 (its newer packed path covers only qwen35), and
`from_pretrained(gguf_file=...)` additionally requires `accelerate`, which fourbit does not use.
"""

import json
import os

import gguf
import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from fourbit.io.default_model import default_model_path
from fourbit.io.gguf import (
    SUPPORTED_ARCHITECTURES,
    _converted_once,
    gguf_config,
    gguf_tensor_names,
    gguf_tokenizer,
    iter_gguf_tensors,
)
from fourbit.io.sources import open_source

TINY = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=128,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
MODEL_CLASSES = {
    "llama": transformers.LlamaForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM,
    "qwen3": transformers.Qwen3ForCausalLM,
}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """FOURBIT_CACHE pointed at a fresh folder for this module: conversions happen here, not in ~."""
    with pytest.MonkeyPatch.context() as patch:
        root = tmp_path_factory.mktemp("fourbit-cache")
        patch.setenv("FOURBIT_CACHE", str(root))
        yield root


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter: each head's rows go from halves [2, d/2] to interleaved pairs [d/2, 2]."""
    split = weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


def write_tiny_gguf(path, model, arch: str, qtype=gguf.GGMLQuantizationType.F32):
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(config.vocab_size)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)

    arch_id = next(key for key, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    name_map = gguf.get_tensor_name_map(arch_id, config.num_hidden_layers)
    for hf_name, tensor in model.state_dict().items():
        module, suffix = hf_name.rsplit(".", 1)
        name = f"{name_map.get_name(module)}.{suffix}"
        values = tensor.numpy()
        if arch == "llama" and ".attn_q." in name:
            values = llama_cpp_permute(values, config.num_attention_heads)
        if arch == "llama" and ".attn_k." in name:
            values = llama_cpp_permute(values, config.num_key_value_heads)
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(name, gguf.quants.quantize(values, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def transformers_tensors(path, config) -> dict[str, torch.Tensor]:
    """transformers' own reading of the GGUF file, as {HF name: float32 tensor}."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    return parsed["tensors"]


def tiny_model(arch: str):
    torch.manual_seed(0)
    config_class = MODEL_CLASSES[arch].config_class
    # qwen2 has Q/K/V biases; qwen3 has q_norm/k_norm and head_dim 128 (its config default, which
    # transformers' GGUF config keeps, as it does not read qwen3.attention.key_length).
    return MODEL_CLASSES[arch](config_class(**TINY)).eval()


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_tiny_gguf_reads_back_the_model_it_was_written_from(arch, tmp_path):
    model = tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, model, arch)

    config = gguf_config(path)
    assert type(config) is type(model.config)
    assert config.tie_word_embeddings is False  # output.weight is in the file
    ours = {name: load() for name, load in iter_gguf_tensors(path, config)}
    assert list(ours) == gguf_tensor_names(path)
    expected = model.state_dict()
    assert sorted(ours) == sorted(expected)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected[name]), name

    reference = transformers_tensors(path, config)
    assert sorted(reference) == sorted(ours)
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name


def test_quantized_tiny_gguf_matches_transformers(tmp_path):
    model = tiny_model("llama")
    path = tmp_path / "tiny-q8.gguf"
    write_tiny_gguf(path, model, "llama", gguf.GGMLQuantizationType.Q8_0)

    config = gguf_config(path)
    ours = {name: load() for name, load in iter_gguf_tensors(path, config)}
    reference = transformers_tensors(path, config)
    expected = model.state_dict()
    for name, tensor in ours.items():
        assert torch.equal(tensor, reference[name]), name
        # Q8_0: blocks of 32 int8 codes with an fp16 scale d = block absmax / 127. Rounding costs
        # half a step, the fp16 scale (relative error <= 2**-11) up to 127 steps times that.
        step = expected[name].abs().max() / 127
        assert (tensor - expected[name]).abs().max() <= step * (0.5 + 127 * 2**-11), name


def test_config_is_converted_once_and_cached(tmp_path, cache):
    path = tmp_path / "tiny-cached.gguf"
    write_tiny_gguf(path, tiny_model("llama"), "llama")
    first = gguf_config(path)
    folder = cache / "configs" / f"tiny-cached-{path.stat().st_size}"
    assert (folder / "config.json").is_file()
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(saved | {"max_position_embeddings": 512}))
    assert gguf_config(path).max_position_embeddings == 512  # read from the cache, not converted again
    assert first.max_position_embeddings == 256 and first.num_key_value_heads == 2


def test_cache_race_keeps_the_winners_folder(tmp_path, cache):
    path = tmp_path / "raced.gguf"
    path.write_bytes(b"x" * 10)
    winner = cache / "race" / "raced-10"

    def convert(staging):  # another process finishes first, while we are still converting
        (staging / "ours").write_text("ours")
        winner.mkdir(parents=True)
        (winner / "theirs").write_text("theirs")

    assert _converted_once("race", path, convert) == winner
    assert [p.name for p in (cache / "race").iterdir()] == ["raced-10"]  # our staging is gone
    assert [p.name for p in winner.iterdir()] == ["theirs"]


def test_unsupported_architecture_is_named(tmp_path):
    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        open_source(path)


# ---- the embedded SmolLM2-135M-Instruct (Q4_1 linears, Q8_0 embedding, F32 norms) ----


@pytest.fixture(scope="module")
def smollm2():
    """(path, config, transformers' tensors), read once: transformers' loader takes several seconds."""
    path = default_model_path()
    config = gguf_config(path)
    return path, config, transformers_tensors(path, config)


def model_from(config, state: dict[str, torch.Tensor]) -> transformers.LlamaForCausalLM:
    with no_init_weights():  # every weight is overwritten below; random init costs seconds
        model = transformers.LlamaForCausalLM(config).eval()  # float32, the config's default dtype
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and unexpected == []
    model.tie_weights()  # construction under no_init_weights leaves lm_head untied in transformers 5.23
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


@pytest.mark.slow
def test_smollm2_tensors_equal_transformers(smollm2):
    path, _, expected = smollm2
    source = open_source(None)
    assert source.description == "SmolLM2-135M-Instruct.Q4_1.gguf (GGUF, Q4_1)"
    assert source.folder is None and source.quantization_config is None
    for alias in ("default", "SmolLM2-135M-Instruct", path):
        assert open_source(alias).description == source.description
    config = source.config
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (576, 30, 49152)
    assert (config.num_attention_heads, config.num_key_value_heads) == (9, 3)
    assert config.tie_word_embeddings is True

    names = source.tensor_names()
    assert "lm_head.weight" not in names  # tied: the file has no output.weight
    assert sorted(names) == sorted(set(expected) - {"lm_head.weight"})
    for name, load in source.tensors():
        tensor = load()
        assert tensor.dtype == torch.float32 and tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.slow
def test_smollm2_logits_equal_transformers_and_it_answers(smollm2, cache):
    path, config, expected = smollm2
    ours = model_from(config, {name: load() for name, load in iter_gguf_tensors(path, config)})
    theirs = model_from(config, expected)

    tokenizer = gguf_tokenizer(path)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = ids["input_ids"]
    with torch.no_grad():
        # identical float32 weights through identical modules: identical logits
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
        answer = ours.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids.shape[1] :])


@pytest.mark.slow
def test_smollm2_tokenizer_is_cached(cache, monkeypatch):
    path = default_model_path()
    first = gguf_tokenizer(path)  # converted by the test above, or here when run alone
    [cached] = (cache / "tokenizers").iterdir()  # the only tokenizer converted; no staging left
    assert cached.name == f"{path.stem}-{path.stat().st_size}"
    assert {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= set(os.listdir(cached))

    # From now on converting from the GGUF file fails: the second load must read the cached folder.
    from_pretrained = transformers.AutoTokenizer.from_pretrained

    def cached_folders_only(name, *args, **kwargs):
        if "gguf_file" in kwargs:
            raise RuntimeError(f"converted {name} again instead of reading the cache")
        return from_pretrained(name, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", cached_folders_only)
    second = gguf_tokenizer(path)
    assert second.name_or_path == str(cached)
    text = "Hello <|im_start|>world, the capital of France"
    assert second(text)["input_ids"] == first(text)["input_ids"]
    assert second.eos_token == "<|im_end|>" and second.eos_token_id == 2

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = second.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n" in prompt


@pytest.mark.parametrize("arch", SUPPORTED_ARCHITECTURES)
def test_a_gguf_loads_quantized_and_computes_its_model(arch, tmp_path):
    # llama, and two other architectures (qwen2's Q/K/V biases, qwen3's q/k norms): converted once
    # into a cached folder, then loaded by transformers with fourbit's quantizer.
    import copy

    from fourbit import Linear4bit, load_model

    model = tiny_model(arch)
    path = tmp_path / f"tiny-{arch}.gguf"
    write_tiny_gguf(path, model, arch)
    ours, tokenizer = load_model(path, quantization="nf4", compute_dtype="float32", torch_dtype="float32")
    assert tokenizer is None  # the tiny file holds weights alone
    layers = {n: m for n, m in ours.named_modules() if isinstance(m, Linear4bit)}
    assert len(layers) == 7 * model.config.num_hidden_layers
    twin = copy.deepcopy(model)  # the model the file was written from, holding the dequantized weights
    with torch.no_grad():
        for name, layer in layers.items():
            twin.get_submodule(name).weight.copy_(layer.dequantize(torch.float32))
        ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
        # Same float32 weights (F32 in the file), same operations: float32 summation order only.
        torch.testing.assert_close(ours(ids).logits, twin(ids).logits, rtol=1e-5, atol=1e-5)
