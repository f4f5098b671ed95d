"""Token generation with a KV cache, for any causal LM fourbit loads (4-bit or not, with adapters).

One loop serves every caller (the chat, the server, evaluation):

    prefill   the prompts, left-padded to one length: attention_mask marks the padding and
              position_ids count real tokens only, so each row sees exactly what it would see
              alone; the KV cache keeps every layer's keys and values
    decode    one token per row per step, fed with its cached context: the logits of row i
              depend on row i alone, so a batch gives each row its batch-size-1 result (greedy;
              up to the floating-point order of the batched products)
    choose    greedy (temperature 0) or sampled: logits / temperature, then top-k, then top-p
              (the smallest set of tokens whose probabilities sum to p), drawn with the row's own
              torch.Generator, seeded, so one request's draw does not depend on its batch
    stop      at an end-of-sequence id (the generation config's, the tokenizer's and the chat
              template's end of turn), at a stop string (the text is cut before it), or at
              max_new_tokens; finished rows keep a slot in the batch but no longer emit

Log-probabilities, when a Sampling asks: each generated token's (``logprobs``: with that many
most likely alternatives) and each prompt token's given the ones before it (``prompt_logprobs``,
what OpenAI's ``echo`` returns; the prefill then keeps the logits of every position, [batch,
prompt, vocabulary] floats, instead of the last). Both are the log-softmax of the raw logits,
before temperature and cuts: what the model assigns, whatever was sampled.

Streaming: :func:`stream` yields each row's new text as it is decoded, holding back only the
characters that could still turn into a stop string (and incomplete UTF-8 at the end).
``use_cache=False`` recomputes the whole sequence at each step: slower, the same function, and
the reference the cached path is tested against.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..chat_templates import end_of_turn_ids, pad_id
from ..errors import InputError


@dataclass
class Sampling:
    """How to pick tokens; the OpenAI API's fields, with temperature 0 meaning greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # per generated token: its log-probability and this many alternatives
    prompt_logprobs: bool = False  # the same for every prompt token after the first (OpenAI's echo)

    def __post_init__(self):
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise InputError(f"logprobs must be an integer from 0 to {MAX_LOGPROBS}, got {self.logprobs!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not 0 <= self.temperature <= 100:
            raise InputError(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InputError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InputError(f"stop strings must be non-empty strings, got {self.stop!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -2**63 <= self.seed < 2**64):
            raise InputError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI allows


@dataclass
class TokenLogprob:
    """A token, its log-probability under the model (log-softmax of the raw logits, before any
    temperature or cut), and the ``top`` most likely tokens at its position as (id, log-probability)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token (None for the first)


@dataclass
class Delta:
    """A piece of one row's output, as :func:`stream` yields it."""

    row: int
    text: str
    finish_reason: str | None = None  # set on the row's last delta


def generate(model, tokenizer, prompts: list[list[int]], sampling: Sampling | list[Sampling], use_cache: bool = True,
             eos_ids: set[int] | None = None) -> list[Completion]:
    """Complete each prompt (token ids); one :class:`Sampling` for all rows or one per row."""
    for _ in (run := Generation(model, tokenizer, prompts, sampling, use_cache, eos_ids)).steps():
        pass
    return run.completions()


def stream(model, tokenizer, prompts: list[list[int]], sampling: Sampling | list[Sampling], use_cache: bool = True,
           eos_ids: set[int] | None = None) -> Iterator[Delta]:
    """Like :func:`generate`, yielding each row's text as it grows (one final Delta per row)."""
    yield from Generation(model, tokenizer, prompts, sampling, use_cache, eos_ids).steps()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Ids that end generation: the generation config's, the tokenizer's, the template's end of turn."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    if tokenizer is not None:
        ids |= set(end_of_turn_ids(tokenizer))
    return ids


class Generation:
    """One batch being generated: iterate :meth:`steps` for Deltas; :meth:`completion` gives a
    row's result once its final Delta has been yielded."""

    def __init__(self, model, tokenizer, prompts, sampling, use_cache, eos_ids):
        if not prompts or any(len(p) == 0 for p in prompts):
            raise InputError("every prompt needs at least one token")
        self.model, self.tokenizer, self.use_cache = model, tokenizer, use_cache
        self.sampling = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(self.sampling) != len(prompts):
            raise InputError(f"{len(self.sampling)} sampling settings for {len(prompts)} prompts")
        self.eos = eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer)
        self.prompts = [list(p) for p in prompts]
        self.generators = [_generator(s.seed) for s in self.sampling]
        self.out: list[list[int]] = [[] for _ in prompts]
        self.emitted = [0] * len(prompts)  # characters of each row's text already yielded
        self.finish: list[str | None] = [None] * len(prompts)
        self.text = [""] * len(prompts)
        self.logprobs = [[] if s.logprobs is not None else None for s in self.sampling]
        self.prompt_logprobs: list[list | None] = [None] * len(prompts)
        self._step_logprobs: torch.Tensor | None = None  # log-softmax of the last step's logits

    @torch.no_grad()
    def steps(self) -> Iterator[Delta]:
        device = next(self.model.parameters()).device
        pad = pad_id(self.tokenizer)
        longest = max(len(p) for p in self.prompts)
        ids = torch.tensor([[pad] * (longest - len(p)) + p for p in self.prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in self.prompts], device=device)
        cache, step_ids = None, ids  # with the cache, only the newest token goes in after the prompt
        echo = any(s.prompt_logprobs for s in self.sampling)
        for step in range(max(s.max_new_tokens for s in self.sampling)):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            if self.use_cache and cache is not None:
                positions = positions[:, -1:]
            every = echo and step == 0  # the prefill's logits at every position, for prompt logprobs
            out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                             past_key_values=cache, use_cache=self.use_cache, logits_to_keep=0 if every else 1)
            cache = out.past_key_values if self.use_cache else None
            if every:
                self._record_prompt_logprobs(out.logits, longest)
            last = out.logits[:, -1].float()
            if any(lp is not None for lp in self.logprobs):
                self._step_logprobs = torch.log_softmax(last, dim=-1)
            tokens = self._choose(last)
            yield from self._advance(tokens)
            if all(f is not None for f in self.finish):
                return
            next_ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
            step_ids = next_ids if self.use_cache else torch.cat([step_ids, next_ids], dim=1)
        yield from self._finish_all("length")

    def _choose(self, logits: torch.Tensor) -> list[int]:
        greedy = logits.argmax(-1).tolist()  # one transfer for the batch, not one per row
        tokens = []
        for row, s in enumerate(self.sampling):
            if self.finish[row] is not None:
                tokens.append(self.out[row][-1] if self.out[row] else 0)  # a placeholder, never emitted
            elif s.temperature == 0:
                tokens.append(greedy[row])
            else:
                probs = _filtered_probs(logits[row] / s.temperature, s.top_k, s.top_p)
                tokens.append(int(torch.multinomial(probs.cpu(), 1, generator=self.generators[row])))
        return tokens

    def _advance(self, tokens: list[int]) -> Iterator[Delta]:
        for row, token in enumerate(tokens):
            if self.finish[row] is not None:
                continue
            s = self.sampling[row]
            if token in self.eos:
                yield from self._end(row, "stop")
                continue
            self.out[row].append(token)
            if self.logprobs[row] is not None:
                self.logprobs[row].append(_token_logprob(self._step_logprobs[row], token, s.logprobs))
            self.text[row] = self.tokenizer.decode(self.out[row], skip_special_tokens=True) if self.tokenizer else ""
            cut = _first_stop(self.text[row], s.stop)
            if cut is not None:
                self.text[row] = self.text[row][:cut]
                yield from self._end(row, "stop")
            elif len(self.out[row]) >= s.max_new_tokens:
                yield from self._end(row, "length")
            else:
                safe = len(self.text[row]) - _held_back(self.text[row], s.stop)
                if safe > self.emitted[row]:
                    yield Delta(row, self.text[row][self.emitted[row]:safe])
                    self.emitted[row] = safe

    def _end(self, row: int, reason: str) -> Iterator[Delta]:
        self.finish[row] = reason
        yield Delta(row, self.text[row][self.emitted[row]:], reason)
        self.emitted[row] = len(self.text[row])

    def _finish_all(self, reason: str) -> Iterator[Delta]:
        for row in range(len(self.prompts)):
            if self.finish[row] is None:
                yield from self._end(row, reason)

    def _record_prompt_logprobs(self, logits: torch.Tensor, longest: int) -> None:
        """Each prompt token's log-probability given the tokens before it (rows are left-padded)."""
        for row, s in enumerate(self.sampling):
            if not s.prompt_logprobs:
                continue
            prompt, offset = self.prompts[row], longest - len(self.prompts[row])
            lp = torch.log_softmax(logits[row, offset:-1].float(), dim=-1)  # position i predicts token i + 1
            self.prompt_logprobs[row] = [None] + [_token_logprob(lp[i], prompt[i + 1], s.logprobs or 0)
                                                  for i in range(len(prompt) - 1)]

    def completion(self, row: int) -> Completion:
        return Completion(self.text[row], self.out[row], self.finish[row], len(self.prompts[row]),
                          self.logprobs[row], self.prompt_logprobs[row])

    def completions(self) -> list[Completion]:
        return [self.completion(row) for row in range(len(self.prompts))]


def _token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry of one position's log-softmax, with the ``top`` most likely tokens."""
    best = torch.topk(logprobs, top) if top else None
    alternatives = list(zip(best.indices.tolist(), best.values.tolist())) if best is not None else []
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _filtered_probs(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax over the tokens top-k and top-p keep (the rest get probability 0)."""
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= top_p] = 0  # keep the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return probs / probs.sum()


def _first_stop(text: str, stops: list[str]) -> int | None:
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters could still begin a stop string (or are a partial character)."""
    hold = 1 if text.endswith("\ufffd") else 0  # an incomplete UTF-8 sequence decodes to U+FFFD
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold
