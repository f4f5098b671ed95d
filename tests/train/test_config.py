"""The training config: LLaMA-Factory keys, overrides, and errors that name the key."""

import pytest

from fourbit.cli import main
from fourbit.train.config import load_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model_name_or_path: some/model\nlearning_rate: 2.0e-4\nlora_target: q_proj,v_proj\npacking: false\n")
    config = load_config(path, ["learning_rate=1e-3", "packing=true", "max_steps=7", "lora_alpha=none"])
    assert config.learning_rate == 1e-3 and config.packing is True and config.max_steps == 7
    assert config.targets == ["q_proj", "v_proj"] and config.alpha == 2 * config.lora_rank
    assert config.dataset_dir == str(tmp_path)  # dataset names resolve next to the config
    assert load_config(None, ["lora_target=all"]).targets == "all-linear"
    assert load_config(None, [r"lora_target=.*layers\.0\..*proj"]).targets == r".*layers\.0\..*proj"


@pytest.mark.parametrize(
    "override,message",
    [
        ("learning_rate=0", r"'learning_rate': 0.0 is not allowed; expected a number > 0"),
        ("learning_rate=-1e-4", r"'learning_rate': -0.0001 is not allowed"),
        ("optim=sgd", r"'optim': 'sgd' is not allowed; expected one of \('adamw'"),
        ("lr_scheduler_type=step", r"expected one of \('linear', 'cosine'"),
        ("quantization_bit=3", r"'quantization_bit': 3 is not allowed; expected 4, or none"),
        ("quantization_type=int8", r"'quantization_type'"),
        ("per_device_train_batch_size=0", r"'per_device_train_batch_size': 0"),
        ("lora_dropout=1.0", r"'lora_dropout'"),
        ("max_steps=ten", r"'max_steps': 'ten' is not a valid int"),
        ("learning_rat=1e-4", r"unknown config key 'learning_rat'; did you mean 'learning_rate'\?"),
        ("novalue", r"not of the form key=value"),
    ],
)
def test_bad_values_name_the_key_and_what_is_allowed(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_lora_on_expert_weights_is_a_list_of_names_without_dropout():
    assert load_config(None, ["lora_target_parameters=mlp.experts.gate_up_proj, mlp.experts.down_proj"]).target_parameters \
        == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    assert load_config(None).target_parameters is None
    with pytest.raises(ValueError, match=r"'lora_target_parameters': .* expected LoRA on expert weights without lora_dropout"):
        load_config(None, ["lora_target_parameters=mlp.experts.down_proj", "lora_dropout=0.1"])


def test_torch_compile_with_fsdp_is_refused():
    with pytest.raises(ValueError, match=r"'torch_compile': True is not allowed; expected false with strategy fsdp"):
        load_config(None, ["strategy=fsdp", "torch_compile=true"])
    assert load_config(None, ["torch_compile=true"]).torch_compile is True


def test_dry_run_prints_the_resolved_config_and_an_estimate(tiny_llama, tmp_path, capsys):
    folder, _ = tiny_llama
    (tmp_path / "x.json").write_text('[{"instruction": "a", "output": "b"}]')
    code = main(["train", f"model_name_or_path={folder}", f"dataset={tmp_path / 'x.json'}", f"output_dir={tmp_path / 'o'}",
                 "per_device_train_batch_size=2", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "per_device_train_batch_size: 2" in out and "learning_rate: 0.0002" in out
    assert "memory estimate" in out and "4-bit linears" in out and "total" in out
    assert not (tmp_path / "o").exists()  # a dry run writes nothing


def test_train_cli_reports_bad_config_as_one_line(capsys):
    assert main(["train", "learning_rate=0"]) == 2
    assert "learning_rate" in capsys.readouterr().err


def test_default_run_dry_run_writes_nothing(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["train", f"output_dir={out}", "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert "max_steps: 100" in printed and "memory estimate" in printed
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override,allowed", [
    ("val_size=1.5", "0 (none), a fraction in (0, 1) of the dataset's examples, or a whole number >= 1 of them"),
    ("val_size=-0.1", "0 (none), a fraction in (0, 1) of the dataset's examples, or a whole number >= 1 of them"),
    ("eval_steps=0", "none (at every save_steps) or an integer > 0"),
    ("per_device_eval_batch_size=0", "none (per_device_train_batch_size) or an integer > 0"),
])
def test_bad_eval_settings_are_refused_naming_the_key(override, allowed):
    key, value = override.split("=")
    with pytest.raises(ValueError) as refused:
        load_config(None, [override])
    shown = repr(float(value)) if key == "val_size" else value
    assert str(refused.value) == f"config key {key!r}: {shown} is not allowed; expected {allowed}"


def test_val_size_is_a_fraction_or_a_count():
    assert load_config(None, ["val_size=0.1"]).val_size == 0.1 and load_config(None, ["val_size=50"]).val_size == 50
    assert load_config(None).val_size == 0 and load_config(None).eval_steps is None


def test_report_to_is_a_name_a_list_or_names_separated_by_commas():
    assert load_config(None).trackers == [] and load_config(None, ["report_to=none"]).trackers == []
    assert load_config(None, ["report_to=tensorboard, wandb"]).trackers == ["tensorboard", "wandb"]
    assert load_config(None, {"report_to": ["mlflow", "tensorboard"]}).trackers == ["mlflow", "tensorboard"]
    with pytest.raises(ValueError) as refused:
        load_config(None, ["report_to=tensorboard,all"])
    assert str(refused.value) == ("config key 'report_to': 'tensorboard,all' is not allowed; expected none, or one or "
                                  "more of ('tensorboard', 'wandb', 'mlflow') (a list, or names separated by commas)")
