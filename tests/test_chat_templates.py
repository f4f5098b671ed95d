"""Chat templates: each built-in renders the documented layout, written out here by hand."""

import pytest

from fourbit.chat_templates import ALLOWED, apply_template
from fourbit.train.data import IGNORE_INDEX, encode_conversation

CHAT = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Name?"}, {"role": "assistant", "content": "Smol"}]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _trained_text(tokenizer, messages):
    out = encode_conversation(tokenizer, messages, cutoff_len=512)
    return tokenizer.decode([t for t, label in zip(out["input_ids"], out["labels"])
                             if label != IGNORE_INDEX])


def test_auto_keeps_smollm_template_with_its_default_system_prompt(fresh_tokenizer):
    assert apply_template(fresh_tokenizer, "auto") is fresh_tokenizer
    assert apply_template(fresh_tokenizer, None).eos_token == "<|im_end|>"
    text = fresh_tokenizer.apply_chat_template(CHAT[1:3], tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
                    "Hugging Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")


def test_chatml(fresh_tokenizer):
    apply_template(fresh_tokenizer, "chatml")
    assert fresh_tokenizer.eos_token == "<|im_end|>"
    assert fresh_tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nName?<|im_end|>\n"
        "<|im_start|>assistant\nSmol<|im_end|>\n")
    # unlike SmolLM2's own template, no system prompt is made up
    assert fresh_tokenizer.apply_chat_template(CHAT[1:2], tokenize=False,
                                               add_generation_prompt=True) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert _trained_text(fresh_tokenizer, CHAT) == "Hello<|im_end|>Smol<|im_end|>"


def test_alpaca_uses_the_tokenizers_eos(fresh_tokenizer):
    apply_template(fresh_tokenizer, "alpaca")
    assert fresh_tokenizer.apply_chat_template(CHAT, tokenize=False) == (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello<|im_end|>\n\n"
        "### Instruction:\nName?\n\n### Response:\nSmol<|im_end|>\n\n")
    default = fresh_tokenizer.apply_chat_template(CHAT[1:2], tokenize=False,
                                                  add_generation_prompt=True)
    assert default == ("Below is an instruction that describes a task. Write a response that "
                       "appropriately completes the request.\n\n### Instruction:\nHi\n\n"
                       "### Response:\n")
    assert _trained_text(fresh_tokenizer, CHAT) == "Hello<|im_end|>Smol<|im_end|>"


def test_llama3_with_its_special_tokens(fresh_tokenizer):
    fresh_tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)  # as a Llama 3 vocab has
    apply_template(fresh_tokenizer, "llama3")
    assert fresh_tokenizer.eos_token == "<|eot_id|>"
    assert fresh_tokenizer.apply_chat_template(CHAT[:3], tokenize=False) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")
    assert _trained_text(fresh_tokenizer, CHAT) == "Hello<|eot_id|>Smol<|eot_id|>"


def test_llama3_needs_its_tokens_in_the_vocabulary(fresh_tokenizer):
    with pytest.raises(ValueError, match=r"'llama3' writes <\|begin_of_text\|>.*template: alpaca"):
        apply_template(fresh_tokenizer, "llama3")


def test_unknown_name_lists_allowed(fresh_tokenizer):
    with pytest.raises(ValueError, match=r"unknown template 'vicuna' \(fourbit's: auto, chatml, "
                                         r"llama3, alpaca; LLaMA-Factory's family names.*: qwen, "):
        apply_template(fresh_tokenizer, "vicuna")
    assert ALLOWED == ("auto", "chatml", "llama3", "alpaca")


def test_unknown_name_suggests_the_nearest(fresh_tokenizer):
    with pytest.raises(ValueError, match="unknown template 'qwen3_nothnk'; did you mean 'qwen3_nothink'"):
        apply_template(fresh_tokenizer, "qwen3_nothnk")


# A chat template with Qwen3's thinking switch, written for this test (the logic Qwen3's template
# has: with enable_thinking false, the generation prompt carries an empty think block).
THINKING = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}"
    "{%- endif -%}"
)


@pytest.mark.parametrize("name, thinking, prompt_ends", [
    ("qwen3", None, "<|im_start|>assistant\n"),
    ("qwen3_nothink", None, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("qwen3", False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
    ("auto", False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
])
def test_llamafactory_family_names_use_the_models_template(fresh_tokenizer, name, thinking, prompt_ends):
    """A family name keeps the model's own template; qwen3_nothink (or enable_thinking: false)
    fixes the thinking switch in it, so a render that passes enable_thinking=True still sees false."""
    fresh_tokenizer.chat_template = THINKING
    apply_template(fresh_tokenizer, name, thinking)
    assert fresh_tokenizer.eos_token == "<|im_end|>"  # the model's own, untouched
    for passed in ({}, {"enable_thinking": True}) if prompt_ends.endswith("</think>\n\n") else ({},):
        prompt = fresh_tokenizer.apply_chat_template(CHAT[:2], add_generation_prompt=True, tokenize=False, **passed)
        assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" + prompt_ends


def test_family_name_without_a_chat_template_says_so(fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="template 'mistral' .LLaMA-Factory's name.*has none.*template: chatml"):
        apply_template(fresh_tokenizer, "mistral")


def test_nothink_and_enable_thinking_true_disagree(fresh_tokenizer):
    with pytest.raises(ValueError, match="'qwen3_nothink' turns thinking off.*use template 'qwen3'"):
        apply_template(fresh_tokenizer, "qwen3_nothink", True)


def test_auto_without_a_chat_template_suggests_chatml(fresh_tokenizer):
    fresh_tokenizer.chat_template = None
    with pytest.raises(ValueError, match="has none.*template: chatml"):
        apply_template(fresh_tokenizer, "auto")


def test_missing_pad_token_becomes_eos(fresh_tokenizer):
    fresh_tokenizer.pad_token = None
    apply_template(fresh_tokenizer, "chatml")
    assert fresh_tokenizer.pad_token == "<|im_end|>"
