"""nn/short_attention.py: transformers' SDPA attention run by torch's math backend for short bf16
queries in training, against float64 math and against transformers' own SDPA (the flash kernel)."""

import contextlib

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fourbit.nn import short_attention as sa

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=96, vocab_size=256, max_position_embeddings=256)


def model_of(name: str, dtype, attn_implementation="sdpa"):
    """The same weights in every dtype (made in float32, then rounded to ``dtype``)."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(name, **COMMON)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    with torch.no_grad():  # scores of a few units, not the near-uniform softmax of a fresh init
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    return model.to(dtype).train()


def batch(tokens: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (3, tokens), generator=g)
    mask = torch.ones_like(ids)
    mask[0, : tokens // 3] = 0  # left padding in one row: a boolean mask reaches the attention
    return {"input_ids": ids, "attention_mask": mask}


def logits_and_grad(model, inputs):
    model.zero_grad(set_to_none=True)
    logits = model(**inputs).logits
    rows = inputs["attention_mask"].bool()
    logits[rows].float().square().mean().backward()  # padded rows' outputs are undefined: not compared
    return logits[rows].double(), model.model.layers[0].self_attn.q_proj.weight.grad.double()


@pytest.mark.parametrize("name", ["llama", "qwen3"])
@pytest.mark.parametrize("tokens", [40, 128])
def test_no_further_from_float64_math_than_transformers_own(name, tokens):
    inputs = batch(tokens)
    reference = logits_and_grad(model_of(name, torch.bfloat16).to(torch.float64), inputs)  # bf16's weights
    theirs = logits_and_grad(model_of(name, torch.bfloat16), inputs)
    model = model_of(name, torch.bfloat16)
    assert sa.use_short_attention(model)
    ours = logits_and_grad(model, inputs)
    for got, own, want in zip(ours, theirs, reference):
        # bf16 throughout (8-bit mantissa), the same ops but the attention's kernel: no further from
        # float64 math (on the same bf16-rounded weights) than transformers' bf16 forward and
        # backward, with the 1.25x slack of the other bf16 model tests plus 1e-3 of the values' norm.
        # Errors as norms over all values (a maximum over one layer's gradient swung by 30% between
        # batches; the norm by 5%): ours came to ~0.7 of this bound over 12 cases, and queries off
        # by 2% inside the math path fail it
        norm = torch.linalg.vector_norm
        assert norm(got - want) <= 1.25 * norm(own - want) + 1e-3 * norm(want)


@contextlib.contextmanager
def spy_backends(monkeypatch):
    used = []

    @contextlib.contextmanager
    def spy(backends):
        used.append(backends)
        with torch.nn.attention.sdpa_kernel(backends):
            yield

    monkeypatch.setattr(sa, "sdpa_kernel", spy)
    yield used


@pytest.mark.parametrize("tokens,dtype,grad,math", [
    (128, torch.bfloat16, True, True),     # training on short bf16 sequences: the math backend
    (129, torch.bfloat16, True, False),    # longer: flash
    (64, torch.float32, True, False),      # float32: flash at every length
    (64, torch.bfloat16, False, False),    # no gradients (evaluation, generation): as transformers runs it
])
def test_the_math_backend_is_used_only_where_it_was_measured_faster(monkeypatch, tokens, dtype, grad, math):
    model = model_of("llama", dtype)
    assert sa.use_short_attention(model)
    with spy_backends(monkeypatch) as used, torch.set_grad_enabled(grad):
        model(**batch(tokens))
    assert used == ([torch.nn.attention.SDPBackend.MATH] * 2 if math else [])  # once per layer


def test_only_sdpa_models_are_switched_and_saved_configs_do_not_name_it(tmp_path):
    assert not sa.use_short_attention(model_of("llama", torch.bfloat16, attn_implementation="eager"))
    model = model_of("llama", torch.bfloat16)
    assert sa.use_short_attention(model)
    assert model.model.layers[0].self_attn.config._attn_implementation == sa.NAME
    model.save_pretrained(tmp_path)
    assert sa.NAME not in (tmp_path / "config.json").read_text()  # a saved model loads anywhere
