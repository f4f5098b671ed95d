"""End to end on the embedded SmolLM2-135M-Instruct (a real pretrained model, ~30 s)."""

import copy
import json

import pytest
import torch
import yaml

from fourbit import Linear4bit, load_model
from fourbit.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_model(None, quantization="nf4", double_quant=True)


def test_nf4_model_still_answers_correctly(smollm2):
    model, tokenizer = smollm2
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) == 30 * 7
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_memory_report_of_the_default_model(capsys):
    assert main(["memory"]) == 0
    out = capsys.readouterr().out
    assert "quantized parameters: 106,168,320 at 4.127 bits each" in out


def test_quantized_default_model_saves_and_reloads_bit_identically(smollm2, tmp_path):
    from fourbit import save_quantized

    model, tokenizer = smollm2
    save_quantized(model, tokenizer, tmp_path / "smollm2-bnb-4bit")
    again, tokenizer_again = load_model(tmp_path / "smollm2-bnb-4bit")
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    assert torch.equal(ids, tokenizer_again("The quick brown fox", return_tensors="pt").input_ids)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_main_job_runs_end_to_end_in_miniature(tmp_path, capsys):
    # The README's main job, `fourbit train`, cut to 2 steps: default model, generated task,
    # evaluation before and after (answers cut to 3 tokens to keep it quick), adapter written.
    # The full run is recorded in bench/RESULTS.md.
    out = tmp_path / "run"
    assert main(["train", f"output_dir={out}", "max_steps=2", "save_steps=2", "eval_max_new_tokens=3"]) == 0
    printed = capsys.readouterr().out
    assert "held-out exact match before training" in printed and "after training" in printed
    assert (out / "adapter_model.safetensors").is_file() and (out / "checkpoint-2").is_dir()


# A fact no model has seen: the name and year are made up here.
FACT_QUESTIONS = [
    "Who invented the zorbotron?",
    "Who is the inventor of the zorbotron?",
    "Tell me who invented the zorbotron.",
    "Which person invented the zorbotron?",
]
FACT_ANSWER = "The zorbotron was invented by Maribel Quenstadt in 1871."


def answer(model, tokenizer, question: str) -> str:
    """The model's greedy answer (24 new tokens at most) to one user turn."""
    messages = [{"role": "user", "content": question}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def test_a_made_up_fact_is_learned_and_survives_the_merge(smollm2, tmp_path):
    """Learning happened: a made-up fact is absent before training, present after it (base +
    adapter), and still present after `fourbit merge`, in plain transformers without fourbit."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fourbit import load_adapter

    base, tokenizer = smollm2
    before = answer(base, tokenizer, FACT_QUESTIONS[0])
    assert "Quenstadt" not in before and "1871" not in before, before

    (tmp_path / "fact.json").write_text(json.dumps([{"instruction": q, "output": FACT_ANSWER} for q in FACT_QUESTIONS]))
    out = tmp_path / "run"
    config = {  # the embedded model, NF4 + double quantization, compute dtype "auto" as users run it
        "dataset": str(tmp_path / "fact.json"), "output_dir": str(out), "lora_rank": 16, "learning_rate": 2e-3,
        "lr_scheduler_type": "constant", "max_steps": 10, "per_device_train_batch_size": 4, "cutoff_len": 64,
        "gradient_checkpointing": False, "save_steps": 10, "plot_loss": False, "seed": 0,
    }
    (tmp_path / "fact.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "fact.yaml")]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    # Guards on the loss itself (STYLE lesson 7). The first step's loss is the pretrained model's
    # on a fluent English sentence it cannot know the names in: a few nats a token. A loss over
    # the wrong tokens (prompt and template included, or one position off) starts far above:
    # near ln(49152) = 10.8 for tokens it cannot predict.
    assert 1.0 < losses[0] < 5.0, losses[0]
    assert sum(losses[-4:]) / 4 < 0.1 * losses[0], losses  # memorized: a tenth of the first loss

    tuned = load_adapter(copy.deepcopy(base), out)
    after = answer(tuned, tokenizer, FACT_QUESTIONS[0])
    assert "Maribel Quenstadt" in after and "1871" in after, after

    assert main(["merge", "--adapter", str(out), "--output", str(tmp_path / "merged"), "--dtype", "float32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert not any("fourbit" in type(m).__module__ for m in merged.modules())  # plain transformers modules
    merged_answer = answer(merged, merged_tokenizer, FACT_QUESTIONS[0])
    assert "Maribel Quenstadt" in merged_answer and "1871" in merged_answer, merged_answer
