"""The Train tab's form: the config it builds, the refusals it shares with ``fourbit train``, the
preview of what is learned, and a run's settings read back."""

import os

import pytest
import yaml

from fourbit.cli import main
from fourbit.errors import one_line
from fourbit.train.config import load_config
from fourbit.webui import runs, train_tab
from fourbit.webui.train_form import FORM_KEYS, default_value, preview


def form(model, data, **changes):
    values = {key: default_value(key) for key in FORM_KEYS}
    return values | {"model_name_or_path": str(model), "dataset": str(data), "max_steps": 4.0} | changes


# (form changes, the same as key=value arguments): each refused by the config, the data or the folder checks
REFUSED = [
    ({"lora_dropout": 1.5}, ["lora_dropout=1.5"]),
    ({"cutoff_len": 4.0}, ["cutoff_len=4"]),
    ({"lora_alpha": "-2"}, ["lora_alpha=-2"]),
    ({"optim": "sgd"}, ["optim=sgd"]),
    ({"dataset": "/no/such/file.jsonl"}, ["dataset=/no/such/file.jsonl"]),
]


@pytest.mark.parametrize("changes, arguments", REFUSED, ids=[a[0] for _, a in REFUSED])
def test_the_ui_refuses_what_the_cli_refuses_in_the_same_words(tmp_path, model, data, capsys, changes, arguments):
    with pytest.raises(Exception) as refused:
        train_tab.prepare(tmp_path, "run-1", form(model, data, **changes))
    out = str(runs.run_folder(tmp_path, "run-1").resolve())
    # dataset_dir: the form's empty field means the UI's working folder, said explicitly here
    values = {"model_name_or_path": model, "dataset": data, "max_steps": 4, "output_dir": out, "dataset_dir": os.getcwd()}
    code = main(["train", *[f"{k}={v}" for k, v in values.items()], *arguments])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"fourbit train: error: {one_line(refused.value)}"


def test_an_existing_run_is_refused_unless_overwritten_as_the_cli_refuses_it(tmp_path, model, data, capsys):
    folder = runs.run_folder(tmp_path, "run-1")
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("")
    with pytest.raises(FileExistsError) as refused:
        train_tab.prepare(tmp_path, "run-1", form(model, data))
    assert main(["train", f"model_name_or_path={model}", f"dataset={data}", f"output_dir={folder.resolve()}"]) == 2
    assert capsys.readouterr().err.strip() == f"fourbit train: error: {refused.value}"
    train_tab.prepare(tmp_path, "run-1", form(model, data), overwrite=True)  # what the checkbox is for


def test_the_yaml_a_run_starts_from_is_the_config_the_form_built(tmp_path, model, data):
    config, text, warning = train_tab.prepare(tmp_path, "run-1", form(model, data, lora_rank=8.0, use_dora=True))
    assert warning is None
    saved = yaml.safe_load(text)
    assert saved["lora_rank"] == 8 and saved["use_dora"] is True and saved["max_steps"] == 4
    assert "learning_rate" not in saved  # defaults are left out
    path = tmp_path / "train.yaml"
    path.write_text(text)
    assert load_config(path).to_dict() == config.to_dict()


def test_the_preview_marks_the_prompt_masked_and_the_answer_with_its_end_of_turn_trained(tmp_path, model, data,
                                                                                      chat_tokenizer):
    config, _, _ = train_tab.prepare(tmp_path, "run-1", form(model, data))
    pieces = preview(config, rows=2)
    first = pieces[1:pieces.index(("\n\n", None))]  # example 1's pieces, after its heading
    assert pieces[0] == ("example 1 of 16\n", None)
    # the reference: the template's own rendering of the prompt and of the whole conversation
    messages = [{"role": "user", "content": "What is 0 plus 0?"}]
    prompt = chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    whole = chat_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "0"}], tokenize=False)
    assert "".join(text for text, _ in first) == whole
    assert [label for _, label in first] == ["masked", "trained", "masked"]  # prompt, answer, the newline after
    assert first[0][0] == prompt and first[1][0] == "0<|im_end|>"


def test_a_past_run_reopens_with_its_settings(tmp_path, model, data, monkeypatch):
    started = []
    monkeypatch.setattr(train_tab.jobs, "start", lambda *args, **kwargs: started.append(args))  # no process
    train_tab.start_run(tmp_path, "run-1", form(model, data, lora_rank=4.0, quantization_bit="none"))
    (_, kind, argv), = started
    assert kind == "train" and argv[-2:] == ["train", str(runs.job_folder(tmp_path, "run-1").resolve() / "train.yaml")]
    values = train_tab.form_values_of(tmp_path, "run-1")
    assert values["lora_rank"] == 4 and values["quantization_bit"] == "none"
    assert values["model_name_or_path"] == str(model) and values["learning_rate"] == default_value("learning_rate")
