"""PEFT adapters both ways, with peft (test-only peer) as the reference."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from fourbit import load_model, save_quantized
from fourbit.io.peft import load_adapter, save_adapter
from fourbit.nn.lora import add_lora, lora_adapters, lora_layers

IDS = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(0))


def trained_looking(model, seed=0):
    """Give every LoRA B (and DoRA magnitude) non-zero values, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in lora_adapters(model).values():
            adapter.lora_B.weight.copy_(torch.randn(adapter.lora_B.weight.shape, generator=g) * 0.05)
            if adapter.use_dora:
                adapter.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(adapter.lora_magnitude_vector.shape, generator=g))
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("use_dora,use_rslora", [(False, False), (True, False), (False, True)])
def test_peft_loads_our_adapter_on_a_dense_base(tiny_llama, tmp_path, use_dora, use_rslora):
    folder, dense = tiny_llama
    ours, _ = load_model(folder, quantization=None, compute_dtype="float32")
    trained_looking(add_lora(ours, r=4, alpha=8, use_dora=use_dora, use_rslora=use_rslora, verbose=False))
    save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    theirs = PeftModel.from_pretrained(copy.deepcopy(dense), tmp_path / "adapter")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)  # fp32, same weights
    assert not torch.allclose(logits(ours), logits(dense), atol=1e-3)  # the adapter does something


@pytest.mark.parametrize("bnb_layer_shapes", ["aligned", "partial"], indirect=True)
def test_peft_loads_our_qlora_adapter_on_a_bitsandbytes_base(make_tiny_llama, bnb_layer_shapes, tmp_path, bnb_reference):
    make_tiny_llama(tmp_path / "dense", **bnb_layer_shapes)
    ours, _ = load_model(tmp_path / "dense", compute_dtype="float32")
    save_quantized(ours, None, tmp_path / "base-4bit")
    trained_looking(add_lora(ours, r=8, alpha=16, verbose=False))
    save_adapter(ours, tmp_path / "adapter")
    bnb_base = bnb_reference(tmp_path / "base-4bit", dtype=torch.float32)
    theirs = PeftModel.from_pretrained(bnb_base, tmp_path / "adapter")
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_dora", [False, True])
def test_we_load_an_adapter_made_by_peft(tiny_llama, tmp_path, use_dora):
    folder, dense = tiny_llama
    config = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False, use_dora=use_dora, task_type="CAUSAL_LM")
    theirs = get_peft_model(copy.deepcopy(dense), config)
    theirs.save_pretrained(tmp_path / "adapter")
    ours, _ = load_model(folder, quantization=None, compute_dtype="float32")
    load_adapter(ours, tmp_path / "adapter")
    assert len(lora_layers(ours)) == 6
    assert not any(p.requires_grad for p in ours.parameters())  # inference unless is_trainable
    torch.testing.assert_close(logits(ours), logits(theirs), rtol=1e-5, atol=1e-5)


def test_round_trip_and_trainable_load(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    ours, _ = load_model(folder, compute_dtype="float32")
    trained_looking(add_lora(ours, r=4, alpha=8, target=["o_proj", "up_proj"], verbose=False))
    save_adapter(ours, tmp_path / "adapter")
    again, _ = load_model(folder, compute_dtype="float32")
    load_adapter(again, tmp_path / "adapter", is_trainable=True)
    assert torch.equal(logits(ours), logits(again))
    assert {n for n, p in again.named_parameters() if p.requires_grad} == {
        n for n, p in ours.named_parameters() if p.requires_grad
    }


def test_unknown_config_keys_are_tolerated(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    ours, _ = load_model(folder, compute_dtype="float32")
    save_adapter(trained_looking(add_lora(ours, r=2, alpha=4, verbose=False)), tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"eva_config": None, "some_future_field": 3}))
    again = load_adapter(load_model(folder, compute_dtype="float32")[0], tmp_path / "adapter")
    assert len(lora_layers(again)) == 2 * 7  # every linear of both layers (add_lora's default target)
    assert torch.equal(logits(again), logits(ours))  # the same adapter, read in full despite the extra keys


def test_adapter_for_another_base_is_refused(tiny_llama, make_tiny_llama, tmp_path):
    folder, _ = tiny_llama
    other_folder = tmp_path / "wider"
    make_tiny_llama(other_folder, hidden_size=96, num_attention_heads=4)
    wider, _ = load_model(other_folder, compute_dtype="float32")
    save_adapter(add_lora(wider, r=2, alpha=4, verbose=False), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"has shape \(2, 96\); this model's layer needs \(2, 64\)"):
        load_adapter(load_model(folder, compute_dtype="float32")[0], tmp_path / "adapter")


def test_adapter_naming_modules_the_base_lacks_is_refused(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    model, _ = load_model(folder, compute_dtype="float32")
    save_adapter(add_lora(model, r=2, alpha=4, verbose=False), tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"target_modules": ["qkv_proj"]}))
    with pytest.raises(ValueError, match=r"does not fit this model: lora_target \['qkv_proj'\] matches no linear module"):
        load_adapter(load_model(folder, compute_dtype="float32")[0], tmp_path / "adapter")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        load_adapter(model, tmp_path / "empty")
