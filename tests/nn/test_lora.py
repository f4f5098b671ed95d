"""LoRA against float64 math on the merged weight, QLoRA against LoRA on the dequantized weight."""

import copy
import math

import pytest
import torch
from torch import nn

from fourbit import Linear4bit, load_model
from fourbit.errors import InputError
from fourbit.nn.lora import DEFAULT, LoRAAdapter, LoRALinear, add_lora, count_parameters, lora_adapters, lora_layers
from fourbit.nn.targets import match_targets


def randomize(adapter: LoRAAdapter, seed: int = 0) -> LoRAAdapter:
    """B starts at zero; give it values so the update is visible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.1)
    return adapter


def adapted(base: nn.Module, **settings) -> tuple[LoRALinear, LoRAAdapter]:
    """``base`` wrapped, with one adapter named "default" (as add_lora leaves each layer)."""
    layer = LoRALinear(base)
    return layer, layer.add_adapter(DEFAULT, **settings)


def test_starts_equal_to_base_with_kaiming_a():
    torch.manual_seed(0)
    base = nn.Linear(128, 24)
    layer, adapter = adapted(base, r=8, alpha=16)
    x = torch.randn(5, 128)
    assert torch.equal(layer(x), base(x))
    bound = 1 / math.sqrt(128)  # kaiming_uniform(a=sqrt(5)) on [r, in] = U(+-1/sqrt(in))
    assert adapter.lora_A.weight.abs().max() <= bound and adapter.lora_A.weight.abs().max() > 0.9 * bound
    assert torch.equal(adapter.lora_B.weight, torch.zeros(24, 8))


@pytest.mark.parametrize("use_rslora,expected_scaling", [(False, 16 / 4), (True, 16 / 2)])
def test_forward_equals_merged_weight_in_float64(use_rslora, expected_scaling):
    torch.manual_seed(0)
    base = nn.Linear(64, 32)
    layer, adapter = adapted(base, r=4, alpha=16, use_rslora=use_rslora)
    randomize(adapter)
    assert adapter.scaling == expected_scaling
    x = torch.randn(3, 7, 64)
    W = base.weight.double() + expected_scaling * adapter.lora_B.weight.double() @ adapter.lora_A.weight.double()
    expected = x.double() @ W.T + base.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)  # fp32 rounding


def test_dora_forward_equals_its_definition_in_float64():
    torch.manual_seed(0)
    base = nn.Linear(48, 20)
    layer, adapter = adapted(base, r=4, alpha=8, use_dora=True)
    randomize(adapter)
    torch.testing.assert_close(adapter.lora_magnitude_vector, base.weight.norm(dim=1))  # init = ||W||_row
    with torch.no_grad():
        adapter.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 20))
    x = torch.randn(6, 48)
    weight = base.weight.double() + adapter.scaling * adapter.lora_B.weight.double() @ adapter.lora_A.weight.double()
    direction = weight / weight.norm(dim=1, keepdim=True)
    expected = x.double() @ (adapter.lora_magnitude_vector.double()[:, None] * direction).T + base.bias.double()
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
    q, qa = adapted(four_bit, r=8, alpha=16, use_dora=use_dora)
    torch.manual_seed(1)
    d, da = adapted(twin.requires_grad_(False), r=8, alpha=16, use_dora=use_dora)
    randomize(qa), randomize(da)
    assert torch.equal(qa.lora_A.weight, da.lora_A.weight)
    x = torch.randn(4, 9, 128)
    yq, yd = q(x), d(x)
    torch.testing.assert_close(yq, yd, rtol=1e-6, atol=1e-6)  # same fp32 weights and ops
    grad = torch.randn_like(yq)
    yq.backward(grad)
    yd.backward(grad)
    for name in ("lora_A", "lora_B"):
        gq, gd = getattr(qa, name).weight.grad, getattr(da, name).weight.grad
        assert gq.abs().sum() > 0
        torch.testing.assert_close(gq, gd, rtol=1e-5, atol=1e-6)


def test_adapter_keeps_its_own_precision():
    base = Linear4bit.from_linear(nn.Linear(64, 64), compute_dtype=torch.bfloat16)
    layer, adapter = adapted(base, r=4, alpha=8, dtype=torch.float32)
    out = layer(torch.randn(2, 64))
    assert adapter.lora_A.weight.dtype == torch.float32 and out.dtype == torch.float32


def test_bad_settings_are_refused():
    base = nn.Linear(8, 8)
    with pytest.raises(ValueError, match="rank r must be a positive integer"):
        adapted(base, r=0, alpha=8)
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\)"):
        adapted(base, r=2, alpha=8, dropout=1.5)
    layer, _ = adapted(base, r=2, alpha=8)
    with pytest.raises(InputError, match="already has an adapter named 'default'"):
        layer.add_adapter(DEFAULT, r=2, alpha=8)


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
    lora_adapters(model)["model.layers.0.self_attn.q_proj"].r = 8  # layers that disagree: no one adapter file
    with pytest.raises(InputError, match="different ranks"):
        lora_settings(model)


def two_adapters(base: nn.Module) -> LoRALinear:
    """``base`` with adapters "a" (r=4, s=2) and "b.v2" (r=2, rsLoRA s=6/sqrt(2)), B random."""
    layer = LoRALinear(base)
    randomize(layer.add_adapter("a", r=4, alpha=8), seed=1)
    randomize(layer.add_adapter("b.v2", r=2, alpha=6, use_rslora=True), seed=2)
    return layer


def float64_output(layer: LoRALinear, x: torch.Tensor, mixture: dict[str, float]) -> torch.Tensor:
    """x (W + sum_a w_a s_a B_a A_a)^T + b in float64, from the definition."""
    weight = layer.base_layer.weight.double().clone()
    for name, w in mixture.items():
        a = layer.adapter(name)
        weight += w * a.scaling * a.lora_B.weight.double() @ a.lora_A.weight.double()
    return x.double() @ weight.T + layer.base_layer.bias.double()


def test_a_mixture_of_adapters_equals_the_weighted_sum_of_their_updates_in_float64():
    torch.manual_seed(0)
    layer = two_adapters(nn.Linear(32, 16))
    assert layer.names == ["a", "b.v2"]
    x = torch.randn(3, 5, 32)
    for route, mixture in ((None, {"a": 1, "b.v2": 1}),  # None: every adapter, as a merge of both computes
                           ({"a": 0.5, "b.v2": 0.3}, {"a": 0.5, "b.v2": 0.3}),
                           ({"b.v2": 1.0}, {"b.v2": 1}),
                           ({"a": 1.0, "elsewhere": 0.7}, {"a": 1}),  # an adapter this layer lacks adds nothing
                           ({}, {})):
        layer.route = route
        torch.testing.assert_close(layer(x).double(), float64_output(layer, x, mixture), rtol=1e-5, atol=1e-5)  # fp32


def test_each_row_gets_its_own_mixture_as_if_it_ran_alone():
    torch.manual_seed(0)
    layer = two_adapters(nn.Linear(32, 16))
    x = torch.randn(4, 5, 32)
    rows = [{"a": 1.0}, {}, {"a": 0.25, "b.v2": 2.0}, {"b.v2": 1.0}]
    layer.route = rows
    out = layer(x)
    for i, mixture in enumerate(rows):
        torch.testing.assert_close(out[i].double(), float64_output(layer, x[i], mixture), rtol=1e-5, atol=1e-5)  # fp32
    layer.route = rows[:3]
    with pytest.raises(ValueError, match="3 mixtures for a batch of 4 rows"):
        layer(x)


def test_a_dora_adapter_computes_alone_never_in_a_mixture():
    torch.manual_seed(0)
    layer = two_adapters(nn.Linear(32, 16))
    randomize(layer.add_adapter("d", r=2, alpha=4, use_dora=True), seed=3)
    x = torch.randn(2, 32)
    layer.route = {"d": 1.0}
    assert torch.isfinite(layer(x)).all()
    for route in ({"d": 0.5}, {"a": 1.0, "d": 1.0}, [{"d": 1.0}, {}], None):
        layer.route = route
        with pytest.raises(InputError, match="'d' is DoRA"):
            layer(x)


def test_removing_an_adapter_leaves_the_others():
    torch.manual_seed(0)
    layer = two_adapters(nn.Linear(32, 16))
    layer.remove_adapter("b.v2")
    x = torch.randn(2, 32)
    assert layer.names == ["a"]
    torch.testing.assert_close(layer(x).double(), float64_output(layer, x, {"a": 1}), rtol=1e-5, atol=1e-5)  # fp32


def test_frozen_adapters_mixed_per_row_take_two_products_and_equal_the_definition():
    # Serving's case: frozen adapters side by side along the rank (4 and 2, padded to 4; rsLoRA's
    # scale folded into B), each row's columns weighted by its mixture.
    torch.manual_seed(0)
    layer = two_adapters(nn.Linear(32, 16)).requires_grad_(False)
    x = torch.randn(6, 3, 32)
    rows = [{"a": 1.0}, {}, {"b.v2": 0.5}, {"elsewhere": 1.0}, {"a": 2.0}, {"a": 0.25, "b.v2": 2.0}]
    layer.route = rows
    out = layer(x)
    assert layer._stacked and list(layer._stacked[0]) == ["a", "b.v2"]  # the stacked path ran
    for i, mixture in enumerate(rows):
        held = {k: v for k, v in mixture.items() if k in layer.names}
        torch.testing.assert_close(out[i].double(), float64_output(layer, x[i], held), rtol=1e-5, atol=1e-5)  # fp32
    layer.add_adapter("c", r=8, alpha=8)  # a new adapter: the stack is built again
    randomize(layer.adapter("c"), seed=5).requires_grad_(False)
    layer.route = [{"c": 1.0}] * 6
    torch.testing.assert_close(layer(x).double(), float64_output(layer, x, {"c": 1.0}), rtol=1e-5, atol=1e-5)  # fp32
    assert list(layer._stacked[0]) == ["a", "b.v2", "c"]
