"""The CLI under careless input: it never writes over what it reads, refuses damaged weights and
bad files before any heavy work, and says what is wrong in one line (exit status 2)."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

import fourbit
from fourbit.cli import main


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    """A private copy of the tiny Llama folder: a test that fails must not damage the shared one."""
    folder, _ = tiny_llama
    return shutil.copytree(folder, tmp_path / "model")


def snapshot(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_quantize_never_writes_over_its_source(model_copy, tmp_path, capsys, method):
    before = snapshot(model_copy)
    for output in (model_copy, tmp_path):  # the source itself, and a folder that holds it
        assert main(["quantize", str(model_copy), "--method", method, "--output", str(output), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "writing it would replace what is being read" in err and len(err.strip().splitlines()) == 1
    assert snapshot(model_copy) == before


def test_merge_never_writes_over_its_base_or_adapter(model_copy, tmp_path, capsys):
    model, _ = fourbit.load_model(model_copy, compute_dtype="float32")
    fourbit.add_lora(model, r=2, alpha=4, target=["q_proj"], verbose=False)
    fourbit.save_adapter(model, tmp_path / "adapter")
    before = snapshot(tmp_path / "adapter")
    for output in (tmp_path / "adapter", model_copy):
        argv = ["merge", "--base", str(model_copy), "--adapter", str(tmp_path / "adapter"), "--output", str(output),
                "--overwrite"]
        assert main(argv) == 2
        assert "writing it would replace what is being read" in capsys.readouterr().err
    assert snapshot(tmp_path / "adapter") == before


def test_an_existing_output_is_refused_before_the_work(model_copy, tmp_path, capsys, monkeypatch):
    import fourbit.io.loader as loader

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(loader, "load_model", no_loading)
    (tmp_path / "out").mkdir()
    for method in ("nf4", "gptq"):
        assert main(["quantize", str(model_copy), "--method", method, "--output", str(tmp_path / "out")]) == 2
        assert "already exists; choose another output folder or pass --overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["quantize", "merge", "eval", "train"])
def test_nan_in_a_norm_is_refused_by_every_command(model_copy, tmp_path, capsys, command, chat_tokenizer):
    chat_tokenizer.save_pretrained(model_copy)  # eval reads its text first
    model, _ = fourbit.load_model(model_copy, compute_dtype="float32")  # the adapter, made while the base is sound
    fourbit.add_lora(model, r=2, alpha=4, target=["q_proj"], verbose=False)
    fourbit.save_adapter(model, tmp_path / "adapter")
    tensors = load_file(model_copy / "model.safetensors")
    tensors["model.norm.weight"][7] = float("nan")  # outside every linear weight: no quantizer looks at it
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "text.txt").write_text("The cat sat on the mat. " * 20)
    (tmp_path / "data.json").write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    argv = {
        "quantize": ["quantize", str(model_copy), "--method", "nf4", "--output", str(tmp_path / "q")],
        "merge": ["merge", "--base", str(model_copy), "--adapter", str(tmp_path / "adapter"), "--output", str(tmp_path / "m")],
        "eval": ["eval", str(model_copy), "--perplexity", str(tmp_path / "text.txt")],
        "train": ["train", f"model_name_or_path={model_copy}", f"dataset={tmp_path / 'data.json'}",
                  f"output_dir={tmp_path / 't'}"],
    }[command]
    assert main(argv) == 2
    assert "tensor model.norm.weight holds 1 NaN or Inf values" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("q", "m"))


def test_a_malformed_config_names_the_file_and_line(tmp_path, capsys):
    (tmp_path / "train.yaml").write_text("lora_rank: 16\nlora_target: [q_proj, v_proj\nlearning_rate: 1e-4\n")
    assert main(["train", str(tmp_path / "train.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path / 'train.yaml'} line " in err and "not valid YAML" in err
    assert len(err.strip().splitlines()) == 1  # one line, no traceback
    assert main(["train", "lora_rank=[16", "--dry-run"]) == 2
    assert "override 'lora_rank=[16': the value is not valid YAML" in capsys.readouterr().err


def test_dry_run_checks_the_dataset_and_the_cutoff(tmp_path, capsys, chat_tokenizer, make_tiny_llama):
    make_tiny_llama(tmp_path / "model", vocab_size=len(chat_tokenizer))
    chat_tokenizer.save_pretrained(tmp_path / "model")
    base = [f"model_name_or_path={tmp_path / 'model'}", f"output_dir={tmp_path / 'out'}", "--dry-run"]
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "c"}]))
    assert main(["train", f"dataset={tmp_path / 'bad.json'}", *base]) == 2
    assert "row 1" in capsys.readouterr().err
    long = "apple river stone cloud maple ember harbor violet copper meadow " * 3
    (tmp_path / "long.json").write_text(json.dumps([{"instruction": "Repeat.", "output": long}] * 3))
    assert main(["train", f"dataset={tmp_path / 'long.json'}", "cutoff_len=48", *base]) == 2
    assert "cutoff_len 48 cuts the answers of 3 of 3 examples" in capsys.readouterr().err
    assert main(["train", f"dataset={tmp_path / 'long.json'}", *base]) == 0  # cutoff_len 1024: nothing cut
    assert "dataset, output_dir and cutoff_len checked: the run can start" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_a_truncated_weights_file_is_one_line(model_copy, tmp_path, capsys):
    data = (model_copy / "model.safetensors").read_bytes()
    (model_copy / "model.safetensors").write_bytes(data[: len(data) // 3])
    assert main(["quantize", str(model_copy), "--method", "nf4", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is not a readable safetensors file" in err and len(err.strip().splitlines()) == 1


def test_input_files_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch, chat_tokenizer, make_tiny_llama):
    import fourbit.io.loader as loader

    make_tiny_llama(tmp_path / "model", vocab_size=len(chat_tokenizer))
    chat_tokenizer.save_pretrained(tmp_path / "model")

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before its input files were checked")

    monkeypatch.setattr(loader, "load_model", no_loading)
    model, missing = str(tmp_path / "model"), str(tmp_path / "missing.txt")
    runs = {
        "eval": (["eval", model, "--perplexity", missing], "perplexity file"),
        "gptq": (["quantize", model, "--method", "gptq", "--calibration", missing, "--output", str(tmp_path / "g")],
                 "calibration file"),
        "awq": (["quantize", model, "--method", "awq", "--calibration", missing, "--output", str(tmp_path / "a")],
                "calibration file"),
    }
    for argv, what in runs.values():
        assert main(argv) == 2
        assert f"{what} {missing} does not exist" in capsys.readouterr().err
    (tmp_path / "text.txt").write_text("some text " * 50)
    assert main(["compare", model, "--perplexity", str(tmp_path / "text.txt"), "--plot", str(tmp_path / "text.txt")]) == 2
    assert "writing it would replace what is being read" in capsys.readouterr().err
    assert (tmp_path / "text.txt").read_text() == "some text " * 50


def test_a_truncated_gguf_or_config_is_one_line(model_copy, tmp_path, capsys):
    from fourbit.io.default_model import default_model_path

    data = default_model_path().read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[: len(data) // 2])  # an interrupted download
    assert main(["quantize", str(tmp_path / "half.gguf"), "--method", "nf4", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "half.gguf is not a readable GGUF file" in err and len(err.strip().splitlines()) == 1
    text = (model_copy / "config.json").read_text()
    (model_copy / "config.json").write_text(text[: len(text) // 2])
    assert main(["quantize", str(model_copy), "--method", "nf4", "--output", str(tmp_path / "q")]) == 2
    err = capsys.readouterr().err
    assert "config.json line" in err and "not valid JSON" in err and len(err.strip().splitlines()) == 1
