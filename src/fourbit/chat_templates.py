"""Chat templates: which text a conversation becomes before it is tokenized.

The ``template`` config value picks one:

- ``"auto"`` or ``None``: the tokenizer's own ``chat_template`` (the right choice for an instruct
  model; SmolLM2-135M-Instruct's is ChatML and injects "You are a helpful AI assistant named
  SmolLM, trained by Hugging Face" as the system turn when the conversation has none).
- ``"chatml"``: ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per message, generation prompt
  ``<|im_start|>assistant\\n``; the end of a turn is ``<|im_end|>``. No default system prompt.
- ``"llama3"``: the Llama 3 instruct layout, ``<|begin_of_text|>`` then per message
  ``<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`` (content trimmed of
  surrounding whitespace, as Meta's template does), generation prompt
  ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``; the end of a turn is ``<|eot_id|>``.
- ``"alpaca"``: plain text for base models: the system prompt (default "Below is an instruction
  that describes a task. Write a response that appropriately completes the request.") and a blank
  line, then per exchange ``### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}<eos>\\n\\n``.
  The end of a turn is the tokenizer's own EOS token.

Training needs to know the token that ends an assistant turn, because that token is trained (the
model learns to stop) and generation stops on it. ``apply_template`` makes ``tokenizer.eos_token``
that token: ``<|im_end|>`` for chatml, ``<|eot_id|>`` for llama3, unchanged for alpaca and auto.
It also sets ``pad_token`` to the EOS token when the tokenizer has none (padding is masked by
length, never by id, so sharing the id is harmless).

**LLaMA-Factory's names.** LLaMA-Factory names a template per model family (``qwen3``,
``qwen3_nothink``, ``mistral``, ``gemma``, ``phi``, ``deepseek3``, ...) and writes each family's
format itself. fourbit takes a family's format from the model's own chat template (``auto``), which
is the format the family's models were trained with, and keeps its built-ins for the names it
shares (``chatml``, ``llama3``, ``alpaca``). Some names carry an option for the chat template:
``qwen3_nothink`` is Qwen3's template with ``enable_thinking`` false. ``enable_thinking`` (the
config key, or a name's option) is written into the template itself as its first statement, so
every render of this tokenizer, in training and after, sees the same value.

The special tokens a built-in template writes must already be single tokens of the vocabulary:
adding tokens would mean resizing the (quantized) embeddings, which fourbit does not do. A
tokenizer that lacks them gets an error suggesting ``alpaca``, which needs only an EOS token.
"""

from __future__ import annotations

import difflib
import json

from .errors import InputError

CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

LLAMA3 = (
    "{{- '<|begin_of_text|>' -}}"
    "{%- for message in messages -%}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}"
    "{%- endif -%}"
)

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
ALPACA = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{{- messages[0]['content'] + '\\n\\n' -}}"
    "{%- else -%}"
    "{{- '" + ALPACA_SYSTEM + "\\n\\n' -}}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '### Instruction:\\n' + message['content'] + '\\n\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '### Response:\\n' + message['content'] + eos_token + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\\n' -}}{%- endif -%}"
)

# name -> (jinja source, end-of-turn token or None for "the tokenizer's EOS", tokens it writes)
BUILTIN = {
    "chatml": (CHATML, "<|im_end|>", ("<|im_start|>", "<|im_end|>")),
    "llama3": (
        LLAMA3,
        "<|eot_id|>",
        ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "alpaca": (ALPACA, None, ()),
}
ALLOWED = ("auto", *BUILTIN)

# LLaMA-Factory's template names for families whose models ship a chat template -> the options
# that name sets (the format itself is the model's own, "auto").
FAMILIES: dict[str, dict] = {
    **dict.fromkeys(("qwen", "qwen2", "qwen3", "qwen3_5", "llama2", "llama4", "mistral", "ministral", "mistral_small",
                     "mixtral", "gemma", "gemma2", "gemma3", "gemma3n", "phi", "phi_small", "phi4", "phi4_mini",
                     "deepseek", "deepseek3", "deepseekr1", "gpt", "gpt_oss", "glm4", "yi", "olmo", "olmo2",
                     "granite3", "granite4", "smollm", "smollm2", "cohere", "falcon_h1", "hunyuan", "internlm2",
                     "internlm3", "ernie", "nanbeige", "seed_oss", "kimi", "minimax", "zephyr"), {}),
    **dict.fromkeys(("qwen3_nothink", "qwen3_5_nothink", "ernie_nothink", "nanbeige_nothink"),
                    {"enable_thinking": False}),
}


def template_names() -> tuple[str, ...]:
    """Every name ``template`` takes: fourbit's, then LLaMA-Factory's family names."""
    return (*ALLOWED, *FAMILIES)


def apply_template(tokenizer, name: str | None, enable_thinking: bool | None = None):
    """Set ``tokenizer.chat_template`` (and its EOS/end-of-turn token) for ``template: name``;
    ``enable_thinking`` (None: the template's default) is fixed in the template.

    Returns the same tokenizer, changed in place.
    """
    name = "auto" if name is None else name
    options = dict(FAMILIES.get(name, {}))
    if enable_thinking is not None:
        if options.get("enable_thinking", enable_thinking) != enable_thinking:
            raise InputError(f"template {name!r} turns thinking off, but enable_thinking is {enable_thinking}; "
                             f"use template {name.removesuffix('_nothink')!r} to think")
        options["enable_thinking"] = enable_thinking
    if name == "auto" or name in FAMILIES:
        if not getattr(tokenizer, "chat_template", None):
            family = "" if name == "auto" else (" (LLaMA-Factory's name for its family's format, which fourbit "
                                                "takes from the model's own chat template)")
            raise InputError(
                f"template {name!r}{family} uses the tokenizer's own chat template, but this tokenizer has "
                "none (a base model?); set `template: chatml` (or llama3, alpaca)"
            )
        _require_eos(tokenizer, name)
        _set_options(tokenizer, options)
        _default_pad(tokenizer)
        return tokenizer
    if name not in BUILTIN:
        close = difflib.get_close_matches(name, template_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown template {name!r}{hint} (fourbit's: {', '.join(ALLOWED)}; LLaMA-Factory's family "
                         f"names, which use the model's own chat template: {', '.join(FAMILIES)})")
    source, end_of_turn, writes = BUILTIN[name]
    for token in writes:
        if not _is_single_token(tokenizer, token):
            raise InputError(
                f"template {name!r} writes {token}, which this tokenizer does not have as a single "
                "token (fourbit does not add tokens, which would resize the embeddings); use "
                "`template: auto` if the model has its own chat template, or `template: alpaca`"
            )
    if end_of_turn is not None:
        tokenizer.eos_token = end_of_turn
    _require_eos(tokenizer, name)
    tokenizer.chat_template = source
    _set_options(tokenizer, options)
    _default_pad(tokenizer)
    return tokenizer


def _set_options(tokenizer, options: dict) -> None:
    """Each option as a ``set`` statement at the top of the chat template: a top-level ``set``
    shadows the render call's variable of that name, so every render sees the value."""
    for key, value in options.items():
        tokenizer.chat_template = "{%- set " + key + " = " + json.dumps(value) + " -%}" + tokenizer.chat_template


def _is_single_token(tokenizer, token: str) -> bool:
    return len(tokenizer.encode(token, add_special_tokens=False)) == 1


def _require_eos(tokenizer, name: str) -> None:
    if tokenizer.eos_token is None or tokenizer.eos_token_id is None:
        raise InputError(
            f"template {name!r}: the tokenizer has no EOS token, so an assistant turn has no token "
            "that ends it; set `template: chatml` or `template: llama3` if the vocabulary has "
            "their end-of-turn token"
        )


def _default_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


def pad_id(tokenizer) -> int:
    """The id that fills out shorter rows: the tokenizer's pad token, else EOS (as transformers'
    generate does), else 0. Padding is always masked out, so any id works; one rule keeps
    training, evaluation and serving alike."""
    for token_id in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if token_id is not None:
            return token_id
    return 0


END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def end_of_turn_ids(tokenizer) -> list[int]:
    """The ids that end an assistant turn: the tokenizer's EOS, then each well-known end-of-turn
    token that its chat template writes (generation stops on any of them)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    template = getattr(tokenizer, "chat_template", None) or ""
    for token in END_OF_TURN:
        if token in template and _is_single_token(tokenizer, token):
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id not in ids:
                ids.append(token_id)
    return ids
