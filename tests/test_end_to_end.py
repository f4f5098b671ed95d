"""End to end on the embedded SmolLM2-135M-Instruct (a real pretrained model, ~30 s)."""

import pytest
import torch

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
