"""nn/rms_norm.py: fourbit's RMSNorm swapped in for transformers' Llama-family norms keeps every
weight and the model's function (against the model before the swap, transformers' own norms)."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from fourbit.kernels.cpu import native
from fourbit.nn.rms_norm import RMSNorm, replace_rms_norms

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
              intermediate_size=96, vocab_size=256, max_position_embeddings=128)


def model_of(name: str, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(name, **COMMON), dtype=dtype)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" in key:
                p.add_(0.2 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name,norms", [("llama", 5), ("qwen2", 5), ("mistral", 5), ("qwen3", 9)])
def test_swap_keeps_weights_and_keys(name, norms):
    model = model_of(name)
    before = {key: p for key, p in model.named_parameters()}
    assert replace_rms_norms(model) == norms  # 2 a layer and the final one; Qwen3: q and k norms too
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)  # the same Parameters
    assert sum(isinstance(m, RMSNorm) for m in model.modules()) == norms


@pytest.mark.parametrize("kernels", ["0", "1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swapped_model_computes_the_same_and_trains_the_same(monkeypatch, kernels, dtype):
    monkeypatch.setenv(native.ENV, kernels)
    reference, model = model_of("qwen3", dtype), model_of("qwen3", dtype)
    replace_rms_norms(model)
    for m in (reference, model):
        m.requires_grad_(False)
        m.model.layers[0].self_attn.q_proj.weight.requires_grad_(True)  # a trained weight behind the norms
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    out, ref = model(input_ids=ids).logits, reference(input_ids=ids).logits
    out.float().square().mean().backward()
    ref.float().square().mean().backward()
    got, want = model.model.layers[0].self_attn.q_proj.weight.grad, reference.model.layers[0].self_attn.q_proj.weight.grad
    if kernels == "0":  # the twin is transformers' formula, op for op
        assert torch.equal(out, ref) and torch.equal(got, want)
    else:  # native: float32 sums of squares in another order; bf16 may then round a value one ulp away
        rel = 1e-5 if dtype == torch.float32 else 2e-2
        assert ((out - ref).float().norm() / ref.float().norm()) < rel
        assert ((got - want).float().norm() / want.float().norm()) < rel


def test_other_norms_are_left_alone():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gemma", **COMMON))
    assert replace_rms_norms(model) == 0  # Gemma's norm multiplies by 1 + w
