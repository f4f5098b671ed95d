"""bnb-4bit checkpoints: bit-identical round trips, read by transformers + bitsandbytes, atomic."""

import json

import pytest
import torch
from safetensors import safe_open

import fourbit.io.checkpoint as checkpoint
from fourbit import Linear4bit, load_model, save_quantized


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
def test_save_then_load_is_bit_identical(tiny_llama_tied, tmp_path, quant_type, double_quant):
    folder, _ = tiny_llama_tied
    model, tokenizer = load_model(folder, quantization=quant_type, double_quant=double_quant, blocksize=128,
                                  compute_dtype="float32")
    save_quantized(model, tokenizer, tmp_path / "out")
    again, _ = load_model(tmp_path / "out", compute_dtype="float32")
    ours, theirs = quantized_layers(model), quantized_layers(again)
    assert ours.keys() == theirs.keys()
    for name, layer in ours.items():
        assert torch.equal(layer.weight, theirs[name].weight), name
        for key, tensor in layer.quant_state.to_dict().items():
            assert torch.equal(tensor, theirs[name].quant_state.to_dict()[key]), (name, key)
    for (name, p), (_, q) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_folder_layout_is_bitsandbytes(tiny_llama_tied, tmp_path):
    folder, _ = tiny_llama_tied
    save_quantized(*load_model(folder, compute_dtype="float32"), tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "bitsandbytes"
    assert config["quantization_config"]["load_in_4bit"] and config["quantization_config"]["bnb_4bit_use_double_quant"]
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        assert f.metadata() == {"format": "pt"}
        prefix = "model.layers.0.mlp.down_proj.weight"
        assert {k for k in keys if k.startswith(prefix)} == {
            prefix, f"{prefix}.absmax", f"{prefix}.quant_map", f"{prefix}.nested_absmax",
            f"{prefix}.nested_quant_map", f"{prefix}.quant_state.bitsandbytes__nf4",
        }
        assert f.get_tensor(prefix).dtype == torch.uint8 and f.get_tensor(prefix).shape == (64 * 160 // 2, 1)
    assert "lm_head.weight" not in keys  # tied to the embeddings, stored once


@pytest.mark.parametrize("bnb_layer_shapes", ["aligned", "partial"], indirect=True)
def test_transformers_with_bitsandbytes_reads_our_checkpoint(make_tiny_llama, bnb_layer_shapes, tmp_path, bnb_reference):
    make_tiny_llama(tmp_path / "dense", **bnb_layer_shapes)
    model, _ = load_model(tmp_path / "dense", compute_dtype="float32")
    save_quantized(model, None, tmp_path / "out")
    theirs = bnb_reference(tmp_path / "out", dtype=torch.float32)
    assert type(theirs.model.layers[0].mlp.up_proj).__module__.startswith("bitsandbytes")
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        # Same bytes, same dequantized fp32 weights, same fp32 matmuls: equal to fp32 rounding.
        torch.testing.assert_close(theirs(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_failed_save_leaves_nothing_behind(tiny_llama, tmp_path, monkeypatch):
    folder, _ = tiny_llama
    model, _ = load_model(folder, compute_dtype="float32")

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", disk_full)
    with pytest.raises(OSError, match="No space left"):
        save_quantized(model, None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_folder(tiny_llama, tmp_path, monkeypatch):
    folder, _ = tiny_llama
    model, _ = load_model(folder, compute_dtype="float32")
    save_quantized(model, None, tmp_path / "out")
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already exists"):
        save_quantized(model, None, tmp_path / "out")
    monkeypatch.setattr(checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):  # not the refusal above: the overwrite itself failed
        save_quantized(model, None, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_dense_model_cannot_be_saved_as_4bit(tiny_llama, tmp_path):
    folder, _ = tiny_llama
    model, _ = load_model(folder, quantization=None)
    with pytest.raises(ValueError, match="holds no quantized layers"):
        save_quantized(model, None, tmp_path / "out")
