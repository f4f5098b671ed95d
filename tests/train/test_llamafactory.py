"""LLaMA-Factory's own SFT LoRA/QLoRA example configs run through ``fourbit train`` unchanged.

The key sets and values of its example files (examples/train_lora/*_sft*.yaml and
examples/train_qlora/*.yaml, as of 2026) are recreated below, not copied; only
``model_name_or_path`` points at a tiny local model (with the vocabulary the template needs) and
``dataset_dir`` at a local registry holding the two datasets they name. The expected reading of
each file is LLaMA-Factory's documented one, written out here by hand: no ``quantization_bit`` is
16-bit LoRA, ``bf16: true`` is bf16 compute, ``lora_rank`` defaults to 8 and ``lora_alpha`` to
twice the rank, and every other key the file sets means what the file says.
"""

import json
import logging
import math
import re

import pytest
import yaml

from fourbit.chat_templates import LLAMA3
from fourbit.cli import main
from fourbit.train.config import FIELDS, load_config

OUTPUT = {"logging_steps": 10, "save_steps": 500, "plot_loss": True, "overwrite_output_dir": True}
NEWER_OUTPUT = OUTPUT | {"save_only_model": False, "report_to": "none"}
TRAIN = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8, "learning_rate": 1.0e-4,
         "num_train_epochs": 3.0, "lr_scheduler_type": "cosine", "warmup_ratio": 0.1, "bf16": True,
         "ddp_timeout": 180000000}
EVAL = {"val_size": 0.1, "per_device_eval_batch_size": 1, "eval_strategy": "steps", "eval_steps": 500}
METHOD = {"stage": "sft", "do_train": True, "finetuning_type": "lora"}
DATA = {"dataset": "identity,alpaca_en_demo", "max_samples": 1000, "preprocessing_num_workers": 16}


def _example(model: str, template: str, cutoff_len: int, *, rank: int | None = 8, quantization: dict | None = None,
             newer: bool = True, eval_on: bool = False, remote: bool = True, **more) -> dict:
    keys = {"model_name_or_path": model} | (quantization or {})
    keys |= {"trust_remote_code": True} if remote else {}
    keys |= METHOD | ({"lora_rank": rank} if rank else {}) | {"lora_target": "all"}
    keys |= DATA | {"template": template, "cutoff_len": cutoff_len}
    keys |= {"dataloader_num_workers": 4} if newer else {"overwrite_cache": True}
    keys |= {"output_dir": "saves/example/lora/sft"} | (NEWER_OUTPUT if newer else OUTPUT) | TRAIN
    keys |= EVAL if eval_on else {}
    return keys | more


OTFQ = {"quantization_bit": 4, "quantization_method": "bnb"}
EXAMPLES = {
    # examples/train_lora
    "qwen3_lora_sft": _example("Qwen/Qwen3-4B-Instruct-2507", "qwen3_nothink", 2048, resume_from_checkpoint=None),
    "llama3_lora_sft": _example("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", 2048, newer=False),
    "gpt_lora_sft": _example("openai/gpt-oss-20b", "gpt", 2048, overwrite_cache=True, resume_from_checkpoint=None),
    "mistral3_lora_sft": _example("mistralai/Ministral-3-3B-Instruct-2512", "mistral", 2048, overwrite_cache=True,
                                  resume_from_checkpoint=None),
    "qwen2.5_lora_sft": _example("Qwen/Qwen2.5-3B-Instruct", "qwen", 2048, overwrite_cache=True,
                                 resume_from_checkpoint=None),
    # examples/train_qlora: on-the-fly quantization (bitsandbytes) ...
    "qwen3_lora_sft_otfq": _example("Qwen/Qwen3-4B-Instruct-2507", "qwen3_nothink", 2048, quantization=OTFQ),
    "qwen3_lora_sft_bnb_npu": _example("Qwen/Qwen3-4B-Instruct-2507", "qwen3_nothink", 2048,
                                       quantization=OTFQ | {"double_quantization": False}),
    "llama3_lora_sft_otfq": _example("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", 2048, rank=None, newer=False,
                                     eval_on=True, remote=False,
                                     quantization={"quantization_bit": 4, "quantization_method": "bitsandbytes"}),
    "llama3_lora_sft_otfq_npu": _example("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", 2048, rank=None,
                                         newer=False, eval_on=True,
                                         quantization={"quantization_bit": 4, "quantization_method": "bitsandbytes",
                                                       "double_quantization": False}),
    "llama3_lora_sft_bnb_npu": _example("meta-llama/Meta-Llama-3-8B-Instruct", "llama3", 2048,
                                        quantization=OTFQ | {"double_quantization": False}, overwrite_cache=True),
    "llama3.2_lora_sft": _example("meta-llama/Llama-3.2-1B-Instruct", "llama3", 1024, rank=None, newer=False,
                                  eval_on=True, remote=False),
    "nanbeige42_lora_sft_otfq": _example("Nanbeige/Nanbeige4.2-3B", "nanbeige_nothink", 2048,
                                         quantization=OTFQ | {"use_fast_tokenizer": False, "upcast_layernorm": True},
                                         resume_from_checkpoint=None),
    # ... and pre-quantized bases (fourbit quantizes the model it is given to NF4 instead)
    "llama3_lora_sft_awq": _example("TechxGenus/Meta-Llama-3-8B-Instruct-AWQ", "llama3", 1024, rank=None,
                                    newer=False, eval_on=True),
    "llama3_lora_sft_gptq": _example("TechxGenus/Meta-Llama-3-8B-Instruct-GPTQ", "llama3", 2048, newer=False),
    "llama3_lora_sft_aqlm": _example("ISTA-DASLab/Meta-Llama-3-8B-Instruct-AQLM-2Bit-1x16", "llama3", 2048,
                                     rank=None, newer=False, eval_on=True, remote=False),
}
# Examples that need what fourbit does otherwise, each refused in one line that says what instead.
REFUSED = {
    "qwen3_lora_sft_ds3": (EXAMPLES["qwen3_lora_sft"] | {"deepspeed": "examples/deepspeed/ds_z3_config.json"},
                           r"'deepspeed'.*torchrun.*strategy: fsdp"),
    "qwen3_lora_sft_ray": (EXAMPLES["qwen3_lora_sft"] | {"ray_num_workers": 4}, r"'ray_num_workers'.*torchrun"),
    "qwen3vl_lora_sft": (EXAMPLES["qwen3_lora_sft"] | {"image_max_pixels": 262144, "video_max_pixels": 16384,
                                                       "template": "qwen3_vl_nothink"}, r"'image_max_pixels'.*text-only"),
    "qwen3moe_lora_sft_kt": (EXAMPLES["qwen3_lora_sft"] | {"use_kt": True, "cpu_infer": 32, "chunk_size": 8192},
                             r"'use_kt'.*lora_target_parameters"),
    "llama3_lora_sft_round": (EXAMPLES["llama3.2_lora_sft"] | {"export_quantization_bit": 4,
                                                               "export_quantization_method": "auto_round"},
                              r"'export_quantization_bit'.*fourbit quantize"),
    "qwen3_lora_dpo": (EXAMPLES["qwen3_lora_sft"] | {"stage": "dpo"}, r"'stage': 'dpo'.*sft.*DPO"),
    "qwen3_full_sft": (EXAMPLES["qwen3_lora_sft"] | {"finetuning_type": "full"}, r"'finetuning_type'.*LoRA"),
    "hqq": (EXAMPLES["qwen3_lora_sft_otfq"] | {"quantization_method": "hqq"}, r"'quantization_method'.*NF4"),
}

# LLaMA-Factory's data/ folder in miniature: its registry layout and its two demo datasets'
# formats (identity: alpaca rows with {{name}}/{{author}} placeholders; alpaca_en_demo: alpaca).
# The rows are an echo task a tiny model learns in a few steps.
WORDS = ["apple", "river", "stone", "cloud", "maple", "ember", "harbor", "violet"]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llamafactory-data")
    identity = [{"instruction": "Who are you?", "input": "", "output": "I am {{name}}, made by {{author}}."}] + [
        {"instruction": "Repeat the word.", "input": w, "output": w} for w in WORDS]
    demo = [{"instruction": "Say the word twice.", "input": w, "output": f"{w} {w}"} for w in WORDS]
    (folder / "identity.json").write_text(json.dumps(identity))
    (folder / "alpaca_en_demo.json").write_text(json.dumps(demo))
    (folder / "dataset_info.json").write_text(json.dumps({
        "identity": {"file_name": "identity.json"}, "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"}}))
    return folder


@pytest.fixture(scope="module")
def llama3_chat_model(tmp_path_factory, chat_tokenizer, make_tiny_llama):
    """A tiny Llama with SmolLM2's vocabulary plus Llama 3's special tokens and chat template
    (what template: llama3 writes must be single tokens of the vocabulary)."""
    import copy

    tokenizer = copy.deepcopy(chat_tokenizer)
    tokenizer.add_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                         special_tokens=True)
    tokenizer.chat_template, tokenizer.eos_token = LLAMA3, "<|eot_id|>"
    folder = tmp_path_factory.mktemp("tiny-llama3")
    make_tiny_llama(folder, vocab_size=len(tokenizer), max_position_embeddings=256, initializer_range=0.5)
    tokenizer.save_pretrained(folder)
    return folder


def _write(tmp_path, keys: dict, model, registry) -> str:
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(keys | {"model_name_or_path": str(model), "dataset_dir": str(registry)},
                                   sort_keys=False))
    return str(path)


def _model_for(keys, chat_model, llama3_chat_model):
    return llama3_chat_model if keys["template"] == "llama3" else chat_model


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_config_passes_dry_run_with_llamafactorys_meaning(name, tmp_path, monkeypatch, capsys, caplog,
                                                                   registry, chat_model, llama3_chat_model):
    keys = EXAMPLES[name]
    monkeypatch.chdir(tmp_path)  # output_dir is relative, as in the examples
    path = _write(tmp_path, keys, _model_for(keys, chat_model, llama3_chat_model), registry)
    with caplog.at_level(logging.WARNING, logger="fourbit"):
        assert main(["train", path, "--dry-run"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "the run can start" in printed
    resolved = yaml.safe_load(printed[: printed.index("\n", printed.index("plot_loss:"))])  # the config part

    # LLaMA-Factory's reading of the file, key by key
    assert resolved["quantization_bit"] == keys.get("quantization_bit")  # absent: no quantization (16-bit LoRA)
    assert resolved["double_quantization"] == keys.get("double_quantization", True)
    assert resolved["compute_dtype"] == "bfloat16"  # bf16: true
    assert resolved["lora_rank"] == keys.get("lora_rank", 8)
    assert resolved.get("lora_alpha") is None and load_config(path).alpha == 2 * resolved["lora_rank"]
    assert resolved["eval_strategy"] == keys.get("eval_strategy", "no")
    assert resolved["max_samples"] == 1000 and resolved["template"] == keys["template"]
    for key, value in keys.items():
        if key in FIELDS and key != "model_name_or_path":
            assert resolved[key] == value, key
    notes = caplog.text
    assert "read as a LLaMA-Factory config" in notes
    assert ("never runs a model's own code" in notes) == bool(keys.get("trust_remote_code"))


@pytest.mark.parametrize("name", REFUSED)
def test_what_fourbit_does_otherwise_is_refused_in_one_line(name, tmp_path, capsys, registry, chat_model):
    keys, message = REFUSED[name]
    assert main(["train", _write(tmp_path, keys, chat_model, registry), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.search(message, err), err


def test_a_typo_still_gets_did_you_mean(tmp_path, capsys, registry, chat_model):
    keys = EXAMPLES["qwen3_lora_sft"] | {"finetunning_type": "lora"}
    assert main(["train", _write(tmp_path, keys, chat_model, registry), "--dry-run"]) == 2
    assert "unknown config key 'finetunning_type'; did you mean 'finetuning_type'?" in capsys.readouterr().err


@pytest.mark.parametrize("name, model", [("qwen3_lora_sft_otfq", "chat"), ("llama3_lora_sft", "llama3")])
def test_example_config_trains_to_a_falling_loss(name, model, tmp_path, monkeypatch, registry, chat_model,
                                                 llama3_chat_model):
    """The file unchanged; on the command line, as a user would, a learning rate a tiny random
    model moves at in a few steps (the example's 1e-4 is for an 8B model over 1,000 rows) and
    float32 compute where the CPU would emulate bf16 (an order of magnitude slower)."""
    from fourbit.precision import resolve_compute_dtype

    monkeypatch.chdir(tmp_path)
    keys = EXAMPLES[name]
    path = _write(tmp_path, keys, chat_model if model == "chat" else llama3_chat_model, registry)
    overrides = ["learning_rate=2e-2", "output_dir=out"]
    if resolve_compute_dtype("auto", "cpu").itemsize == 4:  # no native bf16 here
        overrides += ["bf16=false", "compute_dtype=float32"]
    assert main(["train", path, *overrides]) == 0
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    losses = [line["loss"] for line in lines if "loss" in line]
    # 17 rows, 8 examples a step, 3 epochs: ceil(17 / 8) = 3 steps an epoch, 9 in all
    assert len(losses) == 9 and all(math.isfinite(x) for x in losses)
    # falling: the last epoch's full steps (8 rows each; its third has 1) well under the first
    # epoch's: the same 17 rows each epoch, so a broken mask or a frozen adapter leaves them within
    # noise of each other (measured here: 0.66-0.72 of the first epoch's)
    assert sum(losses[6:8]) < 0.8 * sum(losses[0:2]), losses
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------- the mapping itself


def test_precision_keys_map_to_the_compute_dtype():
    assert load_config(None, {"bf16": True}).compute_dtype == "bfloat16"
    assert load_config(None, {"pure_bf16": True}).compute_dtype == "bfloat16"
    assert load_config(None, {"fp16": True}).compute_dtype == "float16"
    assert load_config(None, {"bf16": False}).compute_dtype == "auto"  # fourbit's default stays
    with pytest.raises(ValueError, match="'fp16': true asks for compute_dtype float16, but compute_dtype is 'bfloat16'"):
        load_config(None, {"bf16": True, "fp16": True})
    with pytest.raises(ValueError, match="'bf16': true asks for compute_dtype bfloat16, but compute_dtype is 'float32'"):
        load_config(None, {"bf16": True, "compute_dtype": "float32"})


def test_llamafactory_defaults_apply_only_to_its_configs():
    ours = load_config(None, {})
    assert (ours.quantization_bit, ours.lora_rank, ours.eval_strategy) == (4, 16, "steps")
    theirs = load_config(None, {"stage": "sft"})
    # transformers' TrainingArguments and LLaMA-Factory's own defaults
    assert (theirs.quantization_bit, theirs.lora_rank, theirs.learning_rate, theirs.lr_scheduler_type) == (
        None, 8, 5e-5, "linear")
    assert (theirs.per_device_train_batch_size, theirs.cutoff_len, theirs.logging_steps, theirs.plot_loss) == (
        8, 2048, 500, False)
    assert theirs.eval_strategy == "no"
    set_here = load_config(None, {"stage": "sft", "quantization_bit": 4, "lora_rank": 32, "eval_strategy": "steps",
                                  "logging_steps": 7})
    assert (set_here.quantization_bit, set_here.lora_rank) == (4, 32)
    assert set_here.eval_steps == 7  # transformers: eval_steps defaults to logging_steps


def test_eval_strategy_spellings():
    assert load_config(None, {"evaluation_strategy": "epoch"}).eval_strategy == "epoch"  # the older name
    assert load_config(None, ["eval_strategy=no"]).eval_strategy == "no"  # YAML 1.1 reads a bare no as false
    with pytest.raises(ValueError, match="'eval_strategy': 'sometimes' is not allowed; expected one of"):
        load_config(None, {"eval_strategy": "sometimes"})
    with pytest.raises(ValueError, match="disagree"):
        load_config(None, {"evaluation_strategy": "epoch", "eval_strategy": "steps"})
    with pytest.raises(ValueError, match="'do_eval'.*val_size > 0"):
        load_config(None, {"do_eval": True})


@pytest.mark.parametrize("key, value, allowed", [
    ("stage", "sft", True), ("stage", "pt", False), ("do_train", True, True), ("do_train", False, False),
    ("finetuning_type", "lora", True), ("finetuning_type", "freeze", False),
    ("quantization_method", "bnb", True), ("quantization_method", "bitsandbytes", True),
    ("quantization_method", "eetq", False), ("quantization_device_map", "auto", False),
    ("use_unsloth", False, True), ("use_unsloth", True, False), ("do_predict", True, False),
    ("overwrite_cache", True, True), ("upcast_layernorm", True, True), ("use_fast_tokenizer", False, True),
])
def test_accepted_and_refused_values(key, value, allowed):
    if allowed:
        load_config(None, {key: value})
    else:
        with pytest.raises(ValueError, match=f"config key '{key}': {value!r} is not supported: "):
            load_config(None, {key: value})


def test_quantization_bit_8_says_what_instead():
    with pytest.raises(ValueError, match="'quantization_bit': 8 is not allowed.*fourbit quantize --method int8"):
        load_config(None, {"quantization_bit": 8})


def test_dataset_dir_defaults_to_data_as_in_llamafactory(tmp_path, monkeypatch, registry):
    """LLaMA-Factory reads data/dataset_info.json from where the command runs; fourbit's own
    configs read the registry beside the config file."""
    import shutil

    from fourbit.train.run import preflight

    monkeypatch.chdir(tmp_path)
    shutil.copytree(registry, tmp_path / "data")
    (tmp_path / "examples").mkdir()
    path = tmp_path / "examples" / "qwen3_lora_sft.yaml"
    path.write_text(yaml.safe_dump(EXAMPLES["qwen3_lora_sft"]))
    config = load_config(path)
    assert config.dataset_dir == "data"
    preflight(config)  # identity and alpaca_en_demo found in ./data
    own = tmp_path / "examples" / "own.yaml"
    own.write_text(yaml.safe_dump({"dataset": "identity"}))
    assert load_config(own).dataset_dir == str(tmp_path / "examples")


def test_a_key_without_effect_is_said_once_when_not_at_its_default(caplog):
    with caplog.at_level(logging.WARNING, logger="fourbit"):
        load_config(None, {"use_fast_tokenizer": True, "trust_remote_code": False, "dataloader_num_workers": 0})
    assert caplog.text == ""  # LLaMA-Factory's defaults: what fourbit does anyway
    with caplog.at_level(logging.WARNING, logger="fourbit"):
        load_config(None, {"use_fast_tokenizer": False, "dataloader_num_workers": 4})
    assert caplog.text.count("use_fast_tokenizer:") == 1 and caplog.text.count("dataloader_num_workers:") == 1
