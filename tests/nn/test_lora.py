"""LoRA against float64 math on the merged weight, QLoRA against LoRA on the dequantized weight."""

import copy
import math

import pytest
import torch
from torch import nn

from fourbit import Linear4bit, load_model
from fourbit.nn.lora import LoRALinear, add_lora, count_parameters, lora_layers, match_targets


def randomize(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    """B starts at zero; give it values so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return layer


def test_starts_equal_to_base_with_kaiming_a():
    torch.manual_seed(0)
    base = nn.Linear(128, 24)
    layer = LoRALinear(base, r=8, alpha=16)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), base(x))
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on [r, in] = U(+-1/sqrt(in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    assert torch.equal(layer.lora_B.weight, torch.zeros(24, 8))


@pytest.mark.parametrize("use_rslora,expected_scaling", [(False, 16 / 4), (True, 16 / 2)])
def test_forward_equals_merged_weight_in_float64(use_rslora, expected_scaling):
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer = randomize(LoRALinear(base, r=4, alpha=16, use_rslora=use_rslora))
    assert layer.scaling == expected_scaling
    x = torch.randn(3, 7, 64)
    W = base.weight.double() + expected_scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    expected = x.double() @ W.T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding


def test_dora_forward_equals_its_definition_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(48, 20)
    layer = randomize(LoRALinear(base, r=4, alpha=8, use_dora=True))
    torch.testing.assert_close(layer.lora_magnitude_vector, base.weight.norm(dim=1))  # init = ||W||_row
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 20))
    x = torch.randn(6, 48)
    adapted = base.weight.double() + layer.scaling * layer.lora_B.weight.double() @ layer.lora_A.weight.double()
    direction = adapted / adapted.norm(dim=1, keepdim=True)
    expected = x.double() @ (layer.lora_magnitude_vector.double()[:, None] * direction).T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_qlora_matches_lora_on_the_dequantized_weight(use_dora):
    torch.manual_seed(0)
    dense = nn.Linear(128, 64)
    four_bit = Linear4bit.from_linear(dense)
    twin = nn.Linear(128, 64)
    with torch.no_grad():
        twin.weight.copy_(four_bit.dequantize(torch.float32))
        twin.bias.copy_(four_bit.bias)
    torch.manual_seed(1)
    q = randomize(LoRALinear(four_bit, r=8, alpha=16, use_dora=use_dora))
    torch.manual_seed(1)
    d = randomize(LoRALinear(twin.requires_grad_(False), r=8, alpha=16, use_dora=use_dora))
    assert torch.equal(q.lora_A.weight, d.lora_A.weight)
    x = torch.randn(4, 9, 128)
    yq, yd = q(x), d(x)
    torch.testing.assert_close(yq, yd, rtol=1e-6, atol=1e-6)  # same fp32 weights and ops
    grad = torch.randn_like(yq)
    yq.backward(grad)
    yd.backward(grad)
    for name in ("lora_A", "lora_B"):
        gq, gd = getattr(q, name).weight.grad, getattr(d, name).weight.grad
        assert gq.abs().sum() > 0
        torch.testing.assert_close(gq, gd, rtol=1e-5, atol=1e-6)


def test_adapter_keeps_its_own_precision():
    base = Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=torch.bfloat16)
    layer = LoRALinear(base, r=4, alpha=8, dtype=torch.float32)
    out = layer(torch.randn(2, 64))
    assert layer.lora_A.weight.dtype == torch.float32 and out.dtype == torch.float32


def test_bad_settings_are_refused():
    base = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        LoRALinear(base, r=0, alpha=8)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        LoRALinear(base, r=2, alpha=8, dropout=1.5)


@pytest.fixture
def tiny_4bit(tiny_llama):
    folder, _ = tiny_llama
    return load_model(folder, compute_dtype="float32")[0]


def test_add_lora_all_linear_freezes_the_rest_and_skips_lm_head(tiny_4bit, capsys):
    model = add_lora(tiny_4bit, r=4, alpha=8)
    layers = lora_layers(model)
    assert len(layers) == 14 and "lm_head" not in layers
    assert all(isinstance(layer.base_layer, Linear4bit) for layer in layers.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    n_trainable, total = count_parameters(model)
    assert n_trainable == sum(4 * (layer.in_features + layer.out_features) for layer in layers.values())
    assert f"trainable {n_trainable:,}" in capsys.readouterr().out


def test_targets_follow_peft_matching_rules(tiny_4bit):
    assert match_targets(tiny_4bit, ["q_proj", "v_proj"]) == [
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")
    ]
    assert match_targets(tiny_4bit, r"model\.layers\.1\.mlp\..*") == [
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")
    ]


def test_target_matching_nothing_is_an_error(tiny_4bit):
    with pytest.raises(ValueError, match=r"lora_target \['qkv'\] matches no linear module; .*'down_proj'"):
        add_lora(tiny_4bit, target=["qkv"])
    with pytest.raises(ValueError, match=r"matches no linear module"):
        add_lora(tiny_4bit, target="q_proj")  # a regex string must match the whole path


def test_the_lora_settings_are_read_from_the_layers_themselves(tiny_llama):
    from fourbit.errors import InputError
    from fourbit.nn.lora import lora_settings

    _, dense = tiny_llama
    model = copy.deepcopy(dense)
    with pytest.raises(InputError, match="no LoRA adapters"):
        lora_settings(model)
    add_lora(model, r=4, alpha=12, target=["q_proj", "v_proj"], dropout=0.1, use_rslora=True, verbose=False)
    settings = lora_settings(model)
    assert (settings.r, settings.alpha, settings.dropout, settings.use_rslora, settings.use_dora) == (4, 12, 0.1, True, False)
    assert sorted(settings.modules) == sorted(f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj"))
    assert not hasattr(model, "lora_settings")  # nothing hung on the transformers model
    lora_layers(model)["model.layers.0.self_attn.q_proj"].r = 8  # layers that disagree: no one adapter file
    with pytest.raises(InputError, match="different ranks"):
        lora_settings(model)
