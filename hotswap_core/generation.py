"""Requests, results and per-request decoding state (sampling, stop strings, streaming deltas).

The engine's worker owns the model; everything here is plain host-side bookkeeping per row.
"""

from __future__ import annotations

import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from hotswap_core.detokenize import IncrementalDetokenizer
from hotswap_core.slots import AdapterVersion

log = logging.getLogger("hotswapd.engine")
MAX_LOGPROBS = 20  # the most alternatives a token's log-probabilities list (OpenAI's top_logprobs limit)
MAX_PENALTY = 2.0  # presence_penalty and frequency_penalty lie in [-2, 2], as OpenAI's
MAX_LOGIT_BIAS = 100.0  # a logit_bias value lies in [-100, 100], as OpenAI's: -100 bans a token, 100 all but forces it
MAX_REPETITION_PENALTY = 10.0  # far past any useful value (1.05-1.3); a bound keeps a typo from flattening the text
# A token's log-probability, and its step's most likely tokens as (id, log-probability), most likely first.
Scored = tuple[float, tuple[tuple[int, float], ...]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0  # 0 = off; else sample among the k most likely tokens
    min_tokens: int = 0  # EOS cannot be sampled and stop strings do not end the text before this many tokens
    ignore_eos: bool = False  # EOS is a token like any other: generate max_tokens (load generators use it)
    # None: no log-probabilities; k: each generated token's, and the k most likely tokens' at its position.
    logprobs: int | None = None
    # OpenAI's: subtracted from a token's logit once it was generated (presence) and per time (frequency).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers': a logit of a token in the prompt or the output is divided by it (multiplied when
    # negative); 1 is off.
    repetition_penalty: float = 1.0
    # None: none; k: each prompt token's log-probability after the first, with the k most likely tokens' at its
    # position (vLLM's ``prompt_logprobs``; the completions API's ``echo`` with ``logprobs``).
    prompt_logprobs: int | None = None
    # OpenAI's: (token id, bias) pairs, each bias added to that token's logit before the row draws.
    logit_bias: tuple[tuple[int, float], ...] = ()

    @property
    def adjusted(self) -> bool:
        """Whether the row's logits change before it draws: penalties or a logit bias."""
        return (
            self.presence_penalty != 0
            or self.frequency_penalty != 0
            or self.repetition_penalty != 1
            or bool(self.logit_bias)
        )

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: off), got {self.top_k}")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be in [0, max_tokens={self.max_tokens}], got {self.min_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -MAX_PENALTY <= getattr(self, name) <= MAX_PENALTY:
                raise ValueError(f"{name} must be in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}], got {getattr(self, name)}")
        for token, bias in self.logit_bias:
            if token < 0 or not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias: token {token} must be >= 0, its bias in [-100, 100], got {bias}")
        if not 0 < self.repetition_penalty <= MAX_REPETITION_PENALTY:
            raise ValueError(
                f"repetition_penalty must be in (0, {MAX_REPETITION_PENALTY:g}], got {self.repetition_penalty}"
            )


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (its raw distribution: before temperature, top-k and
    top-p, as vLLM reports by default), the ``top`` most likely tokens at its position with theirs (most likely
    first), and where its text starts in the completion's text (``offset``, characters)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    offset: int


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    finish_reason: str  # "stop" (EOS or stop string), "length", "cancelled"
    adapter: AdapterVersion
    time_to_first_token_s: float  # queued -> first token
    duration_s: float  # queued -> last token
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids, when the request asked
    # One per prompt token after the first (the first has no context to be scored in), when the request asked.
    prompt_logprobs: tuple[Scored, ...] | None = None
    queue_time_s: float = 0.0  # queued -> admitted into a row of the KV cache

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def time_per_output_token_s(self) -> float | None:
        """The mean time between this output's tokens after the first (vLLM's TPOT); None under two tokens."""
        if len(self.token_ids) < 2:
            return None
        return max(0.0, self.duration_s - self.time_to_first_token_s) / (len(self.token_ids) - 1)


@dataclass(eq=False)
class GenerationRequest:
    """One prompt to complete. From the worker thread, ``on_start`` receives the adapter version the
    request will run on (fixed for its whole life), ``on_prompt`` the prompt's log-probabilities once its prefill
    ran (``None`` unless ``params.prompt_logprobs`` asks for them; before any text), and ``on_text`` text deltas
    (streaming), each with the log-probabilities of the tokens that produced it (empty unless
    ``params.logprobs`` asks for them)."""

    prompt: str | list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    on_text: Callable[[str, tuple[TokenLogprob, ...]], Any] | None = None
    on_start: Callable[[AdapterVersion], Any] | None = None
    on_prompt: Callable[[tuple[Scored, ...] | None], Any] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    future: Future[GenerationResult] = field(default_factory=Future)
    created_at: float = field(default_factory=time.monotonic)


class RowState:
    """Decoding state of one row of a batch."""

    def __init__(
        self,
        request: GenerationRequest,
        prompt_ids: list[int],
        decode: Callable[[list[int]], str],
        eos_ids: frozenset[int],
    ) -> None:
        self.request = request
        self.params = request.params
        self.prompt_ids = prompt_ids
        self._detok = IncrementalDetokenizer(decode)
        self.eos_ids = frozenset() if self.params.ignore_eos else eos_ids
        self.ids: list[int] = []
        self.text = ""
        self.logprobs: list[TokenLogprob] | None = None if self.params.logprobs is None else []
        self.prompt_logprobs: tuple[Scored, ...] | None = None
        self._logprobs_emitted = 0
        self._longest_stop = max((len(s) for s in self.params.stop), default=0)
        self._emitted = 0
        self.finish_reason: str | None = None
        self._stopped = False  # a stop string ended the text
        self.first_token_at: float | None = None
        self._seed = self.params.seed if self.params.seed is not None else secrets.randbits(63)
        self._random = random.Random(self._seed)
        # Text that may still become the start of a stop string is held back from the stream.
        self._holdback = max(0, self._longest_stop - 1)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # ---- what sampling reads (hotswap_core.sampling.Row) --------------------------------------------------
    @property
    def temperature(self) -> float:
        return self.params.temperature

    @property
    def top_p(self) -> float:
        return self.params.top_p

    @property
    def top_k(self) -> int:
        return self.params.top_k

    @property
    def min_tokens(self) -> int:
        return self.params.min_tokens

    @property
    def adjusted(self) -> bool:
        return self.params.adjusted

    def uniform(self) -> float:
        """The next number in [0, 1) of this row's random stream, seeded from the request (or at random): its
        own, so a seeded request draws the same tokens whatever else is in its batch."""
        return self._random.random()

    def prefilled(self, prompt_logprobs: tuple[Scored, ...] | None) -> None:
        """The prompt ran (with its log-probabilities, when the request asked): tell ``on_prompt``, before any
        text. A failing callback cancels this request alone, as a failing ``on_text`` does."""
        self.prompt_logprobs = prompt_logprobs
        if self.request.on_prompt is None:
            return
        try:
            self.request.on_prompt(prompt_logprobs)
        except Exception:
            log.warning("on_prompt callback failed; cancelling that request", exc_info=True)
            self.request.cancelled.set()

    def push(self, token_id: int, logprob: Scored | None = None) -> None:
        """Accept the next sampled token (with its log-probability and the top alternatives', when the request
        asked: ``sampling.logprobs``); updates text, finish state, and streams the new text."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        if self.request.cancelled.is_set():
            self.finish_reason = "cancelled"
            return
        self.ids.append(token_id)
        if token_id in self.eos_ids:  # a token of the output, as in vLLM (counted, scored), but not of its text
            self.finish_reason = "stop"
            self._append(self._detok.finish())
            self._score(token_id, logprob)
            self._emit(final=True)
            return
        self._score(token_id, logprob)
        self._append(self._detok.push(token_id))
        if self.finish_reason is None and len(self.ids) >= self.params.max_tokens:
            self.finish_reason = "length"
            self._append(self._detok.finish())
        self._emit(final=self.done)

    def _score(self, token_id: int, logprob: Scored | None) -> None:
        """Keep the token's log-probability (when the request asked), its text starting where the text ends."""
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(TokenLogprob(token_id, logprob[0], logprob[1], len(self.text)))

    def _append(self, delta: str) -> None:
        """Extend the text; a stop string is looked for only where it could newly end (incremental)."""
        if not delta or self._stopped:
            return
        start = max(0, len(self.text) - self._longest_stop + 1)
        self.text += delta
        if not self.params.stop or len(self.ids) < self.params.min_tokens:
            return
        tail = self.text[start:]
        found = [at for at in (tail.find(stop) for stop in self.params.stop) if at != -1]
        if found:
            self.text = self.text[: start + min(found)]
            self.finish_reason, self._stopped = "stop", True

    def _emit(self, final: bool) -> None:
        if self.request.on_text is None:
            return
        end = len(self.text)
        if not final:
            end -= self._holdback
            # A multi-byte character split across tokens decodes as U+FFFD until it is complete.
            while end > self._emitted and self.text[end - 1] == "\ufffd":
                end -= 1
        # Log-probabilities go with the delta in which their token's text starts (those of tokens whose text is
        # held back wait for it); the last delta, possibly empty, carries whatever is left.
        pending: tuple[TokenLogprob, ...] = ()
        if self.logprobs is not None:
            upto = len(self.logprobs)
            while not final and upto > self._logprobs_emitted and self.logprobs[upto - 1].offset >= end:
                upto -= 1
            pending = tuple(self.logprobs[self._logprobs_emitted : upto])
        if end > self._emitted or (final and pending):
            try:
                self.request.on_text(self.text[self._emitted : end], pending)
            except Exception:
                # A broken consumer (a stream whose client is gone) cancels its own row, never the batch.
                log.warning("streaming callback failed; cancelling that request", exc_info=True)
                self.request.cancelled.set()
            self._emitted = end
            self._logprobs_emitted += len(pending)
