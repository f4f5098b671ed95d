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


def test_main_job_prints_the_memory_report(capsys):
    # The README's main-job command, `fourbit memory`, on the default model.
    assert main(["memory"]) == 0
    out = capsys.readouterr().out
    assert "quantized parameters: 106,168,320 at 4.127 bits each" in out
