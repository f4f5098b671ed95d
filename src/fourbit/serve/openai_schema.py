"""The OpenAI API's request bodies as pydantic models: what the server accepts, checked before
anything runs.

Types are strict, as OpenAI's own server is: ``max_tokens: true`` or ``"5"`` is refused, not read
as 1 or 5; an integer is accepted where a number is. Fields OpenAI defines that fourbit does not
implement are refused when they would change the answer (a non-zero penalty, ``suffix``, image
parts) rather than dropped; fields it does not know are ignored, as OpenAI's SDKs send new ones
first. Text must be valid Unicode: a lone surrogate (which JSON can spell as ``"\\ud800"``) is
refused here, not found by the tokenizer. Limits that depend on the server's settings (``n``, the
number of stop strings, the context) are checked by the server with the model at hand.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .generate import MAX_LOGPROBS


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not valid Unicode") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]
Seed = Annotated[int, Field(ge=-(2**63), lt=2**64)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[dict] | None = None
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if not isinstance(content, list):
            return content
        for part in content:
            if part.get("type") != "text":
                raise ValueError(f"content part of type {part.get('type')!r}: this model reads text only")
        return "".join(TextPart.model_validate(part).text for part in content)

    def text(self) -> str:
        return self.content or ""


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampled(_Body):
    """Fields shared by chat and completions."""

    model: Text | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0  # vLLM's extension; -1 and 0: no cut
    n: Annotated[int, Field(ge=1)] = 1
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: Seed | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: Text | None = None

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, value):
        if value != 0:
            raise ValueError("repetition penalties are not implemented: only 0 is accepted")
        return value

    @model_validator(mode="after")
    def _seeds_of_every_choice_fit(self):
        if self.seed is not None and self.seed + self.n - 1 >= 2**64:
            raise ValueError(f"choice i draws from seed + i: seed {self.seed} with n {self.n} passes 2**64 - 1")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class ChatCompletionRequest(_Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self


class CompletionRequest(_Sampled):
    prompt: Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    suffix: None = None  # insertion is not implemented: only null

    @model_validator(mode="after")
    def _no_echo_when_streaming(self):
        if self.echo and self.stream:
            raise ValueError("'echo' is not supported with 'stream'")
        return self


class TokenizeRequest(_Body):
    prompt: Text | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("/tokenize takes a 'prompt' string or chat 'messages'")
        return self


class DetokenizeRequest(_Body):
    tokens: list[Annotated[int, Field(ge=0)]]


class LoadAdapterRequest(_Body):
    lora_name: Annotated[Text, Field(min_length=1)]
    lora_path: Annotated[Text, Field(min_length=1)]


class UnloadAdapterRequest(_Body):
    lora_name: Annotated[Text, Field(min_length=1)]
