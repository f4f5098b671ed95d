"""Token generation with a KV cache, for any causal LM fourbit loads (4-bit or not, with adapters).

One loop serves every caller (the chat, the server, evaluation):

    prefill   the prompts, left-padded to one length: attention_mask marks the padding and
              position_ids count real tokens only, so each row sees exactly what it would see
              alone; the KV cache keeps every layer's keys and values
    decode    one token per row per step, fed with its cached context: the logits of row i
              depend on row i alone, so a batch gives each row its batch-size-1 result (greedy;
              up to the floating-point order of the batched products)
              (for a Llama-family model on a CPU, through serve/decode_step.py: the same layers
              without transformers' per-layer machinery; else the model's own forward)
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
from .cache_keyword import cache_keyword, returned_cache
from .decode_step import DecodeStep, cache_supported


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
             eos_ids: set[int] | None = None, decode_step: bool = True) -> list[Completion]:
    """Complete each prompt (token ids); one :class:`Sampling` for all rows or one per row.
    ``decode_step``: decode through serve/decode_step.py where it applies (False: always the
    model's own forward)."""
    for _ in (run := Generation(model, tokenizer, prompts, sampling, use_cache, eos_ids, decode_step)).steps():
        pass
    return run.completions()


def stream(model, tokenizer, prompts: list[list[int]], sampling: Sampling | list[Sampling], use_cache: bool = True,
           eos_ids: set[int] | None = None, decode_step: bool = True) -> Iterator[Delta]:
    """Like :func:`generate`, yielding each row's text as it grows (one final Delta per row)."""
    yield from Generation(model, tokenizer, prompts, sampling, use_cache, eos_ids, decode_step).steps()


def eos_token_ids(model, tokenizer) -> set[int]:
    """Ids that end generation: the generation config's, the tokenizer's, the template's end of turn."""
    ids = set()
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if config_eos is not None:
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
    if tokenizer is not None:
        ids |= set(end_of_turn_ids(tokenizer))
    return ids


class Decoder:
    """One row's decoding: the tokens it chose, its text so far, and when and why it stopped.
    The batch loops (:class:`Generation` here, the engine's continuous batch) feed it one row of
    logits a step; what it does depends on its own row alone."""

    def __init__(self, prompt: list[int], sampling: Sampling, tokenizer, eos: set[int], index: int = 0):
        if not prompt:
            raise InputError("every prompt needs at least one token")
        self.prompt, self.sampling, self.tokenizer, self.eos, self.index = list(prompt), sampling, tokenizer, eos, index
        self.generator = _generator(sampling.seed)
        self.out: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of the text already yielded
        self.finish: str | None = None
        self.logprobs: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None

    def choose(self, logits: torch.Tensor, greedy: int) -> int:
        """The next token from this row's float32 logits (``greedy``: their argmax, computed batched)."""
        s = self.sampling
        if s.temperature == 0:
            return greedy
        probs = _filtered_probs(logits, s.temperature, s.top_k, s.top_p)
        return int(torch.multinomial(probs.cpu(), 1, generator=self.generator))

    def advance(self, token: int, logprobs: torch.Tensor | None = None) -> Delta | None:
        """Take ``token`` (``logprobs``: this step's log-softmax, when the row asked for them);
        the text it adds that is safe to show, or the row's final Delta, or None."""
        s = self.sampling
        if token in self.eos:
            return self.end("stop")
        self.out.append(token)
        if self.logprobs is not None:
            self.logprobs.append(_token_logprob(logprobs, token, s.logprobs))
        self.text = self.tokenizer.decode(self.out, skip_special_tokens=True) if self.tokenizer else ""
        cut = _first_stop(self.text, s.stop)
        if cut is not None:
            self.text = self.text[:cut]
            return self.end("stop")
        if len(self.out) >= s.max_new_tokens:
            return self.end("length")
        safe = len(self.text) - _held_back(self.text, s.stop)
        if safe <= self.emitted:
            return None
        delta = Delta(self.index, self.text[self.emitted:safe])
        self.emitted = safe
        return delta

    def end(self, reason: str) -> Delta:
        self.finish = reason
        delta = Delta(self.index, self.text[self.emitted:], reason)
        self.emitted = len(self.text)
        return delta

    def record_prompt_logprobs(self, logits: torch.Tensor) -> None:
        """Each prompt token's log-probability given the tokens before it, from the logits at the
        prompt's positions ([len(prompt), vocabulary]; position i predicts token i + 1)."""
        lp = torch.log_softmax(logits[:-1].float(), dim=-1)
        self.prompt_logprobs = [None] + [_token_logprob(lp[i], self.prompt[i + 1], self.sampling.logprobs or 0)
                                         for i in range(len(self.prompt) - 1)]

    def completion(self) -> Completion:
        return Completion(self.text, self.out, self.finish, len(self.prompt), self.logprobs, self.prompt_logprobs)


class Generation:
    """One batch being generated, all rows from the start: iterate :meth:`steps` for Deltas;
    :meth:`completion` gives a row's result once its final Delta has been yielded."""

    def __init__(self, model, tokenizer, prompts, sampling, use_cache, eos_ids, decode_step=True):
        if not prompts:
            raise InputError("no prompts to complete")
        self.model, self.tokenizer, self.use_cache = model, tokenizer, use_cache
        self.decode_step = DecodeStep.of(model) if use_cache and decode_step else None
        self.cache_keyword = cache_keyword(model)  # (past_key_values before transformers 5.24)
        sampling = sampling if isinstance(sampling, list) else [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise InputError(f"{len(sampling)} sampling settings for {len(prompts)} prompts")
        eos = eos_ids if eos_ids is not None else eos_token_ids(model, tokenizer)
        self.rows = [Decoder(p, s, tokenizer, eos, i) for i, (p, s) in enumerate(zip(prompts, sampling))]

    @torch.no_grad()
    def steps(self) -> Iterator[Delta]:
        device = next(self.model.parameters()).device
        pad = pad_id(self.tokenizer)
        longest = max(len(r.prompt) for r in self.rows)
        ids = torch.tensor([[pad] * (longest - len(r.prompt)) + r.prompt for r in self.rows], device=device)
        mask = torch.tensor([[0] * (longest - len(r.prompt)) + [1] * len(r.prompt) for r in self.rows], device=device)
        cache, step_ids = None, ids  # with the cache, only the newest token goes in after the prompt
        echo = any(r.sampling.prompt_logprobs for r in self.rows)
        for step in range(max(r.sampling.max_new_tokens for r in self.rows)):
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            if self.use_cache and cache is not None:
                positions = positions[:, -1:]
            every = echo and step == 0  # the prefill's logits at every position, for prompt logprobs
            if self.decode_step is not None and cache is not None and cache_supported(cache):
                logits = self.decode_step(step_ids, mask, positions, cache)  # the cache grows in place
            else:
                out = self.model(input_ids=step_ids, attention_mask=mask, position_ids=positions,
                                 **{self.cache_keyword: cache}, use_cache=self.use_cache,
                                 logits_to_keep=0 if every else 1)
                cache = returned_cache(out) if self.use_cache else None
                if every:
                    for i, row in enumerate(self.rows):
                        if row.sampling.prompt_logprobs:
                            row.record_prompt_logprobs(out.logits[i, longest - len(row.prompt):])
                logits = out.logits[:, -1]
            tokens = yield from _step(self.rows, logits.float())
            if all(r.finish is not None for r in self.rows):
                return
            next_ids = torch.tensor(tokens, device=device)[:, None]
            mask = torch.cat([mask, mask.new_ones(len(tokens), 1)], dim=1)
            step_ids = next_ids if self.use_cache else torch.cat([step_ids, next_ids], dim=1)
        for row in self.rows:
            if row.finish is None:
                yield row.end("length")

    def completion(self, row: int) -> Completion:
        return self.rows[row].completion()

    def completions(self) -> list[Completion]:
        return [row.completion() for row in self.rows]


def _step(rows: list[Decoder], logits: torch.Tensor):
    """Choose and take one token for every unfinished row from its row of ``logits``; yields the
    Deltas and returns the tokens (a finished row's is a placeholder, never emitted)."""
    greedy = logits.argmax(-1).tolist()  # one transfer for the batch, not one per row
    logprobs = torch.log_softmax(logits, dim=-1) if any(r.logprobs is not None for r in rows) else None
    tokens = []
    for i, row in enumerate(rows):
        if row.finish is not None:
            tokens.append(row.out[-1] if row.out else 0)
            continue
        tokens.append(row.choose(logits[i], greedy[i]))
        delta = row.advance(tokens[-1], logprobs[i] if logprobs is not None else None)
        if delta is not None:
            yield delta
    return tokens


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


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Softmax of logits / temperature over the tokens top-k and top-p keep (the rest get
    probability 0). The largest logit is subtracted first, so a tiny temperature gives -inf to
    every other token instead of inf - inf = NaN; an infinite or NaN logit is the model's fault
    and fails this row alone (the caller's business)."""
    if not torch.isfinite(logits).all():
        raise FloatingPointError("the model's logits hold NaN or infinite values; cannot sample from them")
    logits = (logits - logits.max()) / temperature
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
