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

The special tokens a built-in template writes must already be single tokens of the vocabulary:
adding tokens would mean resizing the (quantized) embeddings, which fourbit does not do. A
tokenizer that lacks them gets an error suggesting ``alpaca``, which needs only an EOS token.
"""

from __future__ import annotations

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


def apply_template(tokenizer, name: str | None):
    """Set ``tokenizer.chat_template`` (and its EOS/end-of-turn token) for ``template: name``.

    Returns the same tokenizer, changed in place.
    """
    if name is None or name == "auto":
        if not getattr(tokenizer, "chat_template", None):
            raise InputError(
                "template 'auto' uses the tokenizer's own chat template, but this tokenizer has "
                "none (a base model?); set `template: chatml` (or llama3, alpaca)"
            )
        _require_eos(tokenizer, "auto")
        _default_pad(tokenizer)
        return tokenizer
    if name not in BUILTIN:
        raise InputError(f"unknown template {name!r}; allowed: {', '.join(ALLOWED)}")
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
    _default_pad(tokenizer)
    return tokenizer


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
