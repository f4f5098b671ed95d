"""serve/decode_step.py: one decoded token per row, against transformers' own forward on the same
model and cache (the reference: an independent implementation of the same layers)."""

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import fourbit
from fourbit.kernels.cpu import native
from fourbit.serve import Sampling, generate
from fourbit.serve.decode_step import DecodeStep

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=96, vocab_size=256, max_position_embeddings=128, tie_word_embeddings=False)
ARCHITECTURES = {"llama": {}, "mistral": dict(sliding_window=None), "qwen2": {}, "qwen3": {}}


@pytest.fixture(autouse=True, params=["native kernels", "plain torch"])
def kernels(request, monkeypatch):
    """Each test twice: the step through the native decoding kernels (kernels/cpu/decode.c, and the
    4-bit matmul) and through their plain-torch twins."""
    monkeypatch.setenv(native.ENV, "1" if request.param == "native kernels" else "0")
    return request.param


def dense_model(name: str, seed: int = 0, **overrides):
    config = AutoConfig.for_model(name, **(COMMON | ARCHITECTURES.get(name, {}) | overrides))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1 and biases away from 0, so that both are really tested
        for name_, p in model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return model


def prefilled(model, lengths=(7, 4)):
    """A left-padded batch's cache after random prompts, and its mask."""
    g = torch.Generator().manual_seed(1)
    longest = max(lengths)
    ids = torch.randint(0, model.config.vocab_size, (len(lengths), longest), generator=g)
    mask = torch.tensor([[0] * (longest - n) + [1] * n for n in lengths])
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=True)
    return out.past_key_values, mask


def both_ways(model, steps=4, lengths=(7, 4), fuse_layers=True):
    """Per step: (the step's logits, transformers' forward's logits) on the same random tokens."""
    step = DecodeStep.of(model, fuse_layers)
    assert step is not None
    cache, mask = prefilled(model, lengths)
    theirs_cache = copy.deepcopy(cache)
    tokens = torch.randint(0, model.config.vocab_size, (steps, len(lengths), 1), generator=torch.Generator().manual_seed(2))
    pairs = []
    for ids in tokens:
        mask = torch.cat([mask, mask.new_ones(len(lengths), 1)], dim=1)
        positions = mask.sum(1, keepdim=True) - 1
        ours = step(ids, mask, positions, cache)
        with torch.no_grad():
            theirs = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=theirs_cache,
                           use_cache=True, logits_to_keep=1).logits[:, -1]
        pairs.append((ours, theirs))
    assert cache.get_seq_length() == theirs_cache.get_seq_length()
    return pairs


def scaled_error(a, b) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_the_step_computes_transformers_forward_in_float32(name):
    # the same float32 operations; only the attention kernel's summation order may differ
    # (masked or not): a few float32 ulps (2^-23 = 1.2e-7) of the largest logit (measured 2.6e-7)
    for ours, theirs in both_ways(dense_model(name)):
        assert ours.dtype == theirs.dtype == torch.float32
        assert scaled_error(ours, theirs) < 2e-6


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_the_step_in_bfloat16_is_as_close_to_float32_as_transformers_is(name):
    model = dense_model(name).to(torch.bfloat16)
    reference = [theirs for _, theirs in both_ways(copy.deepcopy(model).float())]  # float32 math, the same weights
    for (ours, theirs), exact in zip(both_ways(model), reference):
        # the same bf16 roundings as transformers' layers (norms cast back, then times the weight):
        # the step's error against float32 math is transformers' own (0.4-0.8% of the largest
        # logit here), up to bf16 rounding noise where a kernel rounds once instead of per op
        assert scaled_error(ours, exact) <= 1.25 * scaled_error(theirs, exact) + 1e-3


@pytest.mark.parametrize("name", ["llama", "qwen2"])  # qwen2: q, k and v with biases, added after the grouped call
def test_the_step_on_4bit_weights_computes_transformers_forward(tmp_path, name):
    dense_model(name).save_pretrained(tmp_path)
    model, _ = fourbit.load_model(tmp_path, quantization="nf4", compute_dtype="float32", torch_dtype="float32")
    for ours, theirs in both_ways(model):
        # the same 4-bit products (through the layers' own modules) in both: a few float32 ulps
        assert scaled_error(ours, theirs) < 2e-6


def test_the_step_on_4bit_weights_in_bfloat16_is_as_close_to_float32_as_transformers_is(tmp_path):
    dense_model("llama").save_pretrained(tmp_path)
    exact = fourbit.load_model(tmp_path, quantization="nf4", compute_dtype="float32", torch_dtype="float32")[0]
    reference = [theirs for _, theirs in both_ways(exact)]  # the same 4-bit codes, float32 compute
    model, _ = fourbit.load_model(tmp_path, quantization="nf4", compute_dtype="bfloat16", torch_dtype="bfloat16")
    for (ours, theirs), want in zip(both_ways(model), reference):
        # as the dense bf16 test: transformers' own error, up to where a kernel rounds once
        # instead of per op (the attention: float32 inside, one rounding of its output)
        assert scaled_error(ours, want) <= 1.25 * scaled_error(theirs, want) + 1e-3


def test_other_models_decode_through_their_own_forward():
    assert DecodeStep.of(dense_model("gemma2", query_pre_attn_scalar=16)) is None  # another architecture
    assert DecodeStep.of(dense_model("mistral", sliding_window=32)) is None  # a sliding window: the config's
    assert DecodeStep.of(dense_model("qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=1)) is None
    assert DecodeStep.of(dense_model("llama").train()) is None  # training mode (dropout)
    changed = dense_model("llama")
    changed.model.layers[1].post_attention_layernorm = torch.nn.LayerNorm(64)  # a layer changed by hand
    assert DecodeStep.of(changed) is None
    assert DecodeStep.of(dense_model("llama")) is not None


def test_generate_makes_the_same_tokens_either_way(chat_model):
    model, tokenizer, _ = chat_model
    prompts = [tokenizer("Hello there, how are you?")["input_ids"], tokenizer("Hi")["input_ids"]]
    sampling = Sampling(max_new_tokens=12)
    assert DecodeStep.of(model) is not None
    fast = generate(model, tokenizer, prompts, sampling, eos_ids=set())
    slow = generate(model, tokenizer, prompts, sampling, eos_ids=set(), decode_step=False)
    assert [c.token_ids for c in fast] == [c.token_ids for c in slow]


# Models whose every product the native 4-bit kernel takes (whole blocks of 64 in every input
# width: COMMON's intermediate 96 is not, so the tests above mix its per-op and module paths):
# each decoder layer then runs as one native DecodeLayer (kernels/cpu/decode_layer.c).
WHOLE_BLOCKS = dict(intermediate_size=128)
WITH_BIASES = dict(attention_bias=True, mlp_bias=True)  # Llama with a bias on every product


def four_bit(tmp_path, name: str, dtype: str, **overrides):
    dense_model(name, **WHOLE_BLOCKS, **overrides).save_pretrained(tmp_path)
    return fourbit.load_model(tmp_path, quantization="nf4", compute_dtype=dtype, torch_dtype=dtype)[0]


@pytest.fixture
def layer_calls(monkeypatch):
    calls = []
    layer_in = native.DecodeLayer.layer_in
    monkeypatch.setattr(native.DecodeLayer, "layer_in", lambda self, *a: calls.append(self) or layer_in(self, *a))
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name,overrides", [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", WITH_BIASES)],
                         ids=["llama", "qwen2", "qwen3", "llama-biases"])
def test_a_layer_of_4bit_products_decodes_as_one_native_call(tmp_path, layer_calls, kernels, name, overrides, dtype):
    model = four_bit(tmp_path, name, dtype, **overrides)
    fused = both_ways(model)
    assert len(layer_calls) == (2 * 4 if kernels == "native kernels" else 0)  # 2 layers x 4 steps
    per_op = both_ways(model, fuse_layers=False)  # the twin: the step op by op
    assert len(layer_calls) == (2 * 4 if kernels == "native kernels" else 0)
    if dtype == "bfloat16":  # the independent reference: transformers' forward on the same codes in float32
        exact = [theirs for _, theirs in both_ways(four_bit(tmp_path / "float32", name, "float32", **overrides))]
    for step, ((ours, theirs), (twin, _)) in enumerate(zip(fused, per_op)):
        if dtype == "float32":
            # the same kernels in the same order; only silu's exponential differs (C's expf against
            # torch's vectorized one, an ulp apart at times): measured up to 1.9e-7 of the largest logit
            assert scaled_error(ours, twin) < 1e-6 and scaled_error(ours, theirs) < 2e-6
        else:
            # the same bf16 roundings: measured identical; an exponential an ulp apart may flip one
            # bf16 rounding of an activation (2^-8 relative), far below the bound
            assert scaled_error(ours, twin) < 1e-2
            # and as far from float32 math as transformers' own bf16 forward (as the tests above)
            assert scaled_error(ours, exact[step]) <= 1.25 * scaled_error(theirs, exact[step]) + 1e-3


def test_the_native_layers_follow_the_models_changes(tmp_path, layer_calls, kernels):
    from fourbit.nn.linear4bit import dense_weights

    model = four_bit(tmp_path, "llama", "float32")
    both_ways(model, steps=1)
    calls = len(layer_calls)
    torch.manual_seed(5)
    model.model.layers[0].self_attn.q_proj.quantize_(torch.randn(64, 64))  # new codes: its layer rebuilt
    model.model.layers[1].mlp.down_proj.register_forward_hook(lambda *args: None)  # its layer op by op, the hook run
    for ours, theirs in both_ways(model, steps=2):
        assert scaled_error(ours, theirs) < 2e-6  # transformers' forward sees the new codes too
    assert len(layer_calls) - calls == (2 if kernels == "native kernels" else 0)  # layer 0 only, 2 steps
    with dense_weights(model):  # a dense copy in use: every product through it
        calls = len(layer_calls)
        for ours, theirs in both_ways(model, steps=1):
            assert scaled_error(ours, theirs) < 2e-6
        assert len(layer_calls) == calls
    calls = len(layer_calls)
    for ours, theirs in both_ways(model, steps=1):  # the copy gone: layer 0 native again
        assert scaled_error(ours, theirs) < 2e-6
    assert len(layer_calls) - calls == (1 if kernels == "native kernels" else 0)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_norms_that_training_swapped_in_still_take_the_step(name):
    # fourbit train replaces a CPU model's RMS norms with fourbit's (nn/rms_norm.py): the same
    # function, so the trained model in the same process still decodes through the step
    from fourbit.nn.rms_norm import replace_rms_norms

    model = dense_model(name)
    assert replace_rms_norms(model) > 0
    for ours, theirs in both_ways(model, steps=2):
        assert scaled_error(ours, theirs) < 2e-6  # as the float32 test above
