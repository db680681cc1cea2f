"""The OpenAI wire format, outgoing: whole completion bodies, stream chunks and server-sent events, usage and
log-probabilities, and the JSON of adapter versions and swap records (``protocol.py`` checks what comes in)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hotswap_core.detokenize import IncrementalDetokenizer
from hotswap_core.generation import GenerationResult, Scored, TokenLogprob
from hotswap_core.history import Superseded, SwapRecord
from hotswap_core.slots import AdapterVersion


def adapter_json(v: AdapterVersion) -> dict[str, Any]:
    return {"version": v.version, "sha256": v.sha256, "source": v.source}


def version_json(v: AdapterVersion | None) -> dict[str, Any] | None:
    """A version as ``/v1/adapters`` shows it: the adapter object plus where its files are."""
    return None if v is None else {**adapter_json(v), "path": v.path}


def record_json(r: SwapRecord) -> dict[str, Any]:
    """A swap record as ``/v1/adapters`` and the event stream show it: phases in ms, the stall in µs."""
    body = r.to_json()
    body["phases_ms"] = {k: round(v * 1000, 3) for k, v in body.pop("phases").items()}
    stall = body.pop("stall_s")
    body["stall_us"] = None if stall is None else round(stall * 1e6, 1)
    return body


def superseded_json(s: Superseded) -> dict[str, Any]:
    """A candidate passed over for a newer one in the same look, as ``/v1/adapters`` lists it."""
    return {"path": s.path, "version": s.version, "by": s.by, "at": s.at}


def adapter_header(v: AdapterVersion) -> str:
    return f"{v.version}; sha256={v.sha256}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def usage(results: list[GenerationResult], n: int = 1) -> dict[str, int]:
    """Token counts of a response: each prompt counted once, whatever its ``n`` choices (as OpenAI)."""
    prompt = sum(r.prompt_tokens for r in results[::n])
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(r: GenerationResult) -> str:
    return "length" if r.finish_reason == "length" else "stop"


TokenText = Callable[[int], str]  # a token id's own text (``detokenize.TokenTexts``)


@dataclass(frozen=True)
class Echo:
    """A prompt shown before its completion (the completions API's ``echo``): its text, its tokens, and where
    each token's text starts in it (``offsets``, characters; empty unless log-probabilities were asked)."""

    text: str
    ids: tuple[int, ...]
    offsets: tuple[int, ...] = ()

    @classmethod
    def of(cls, text: str | None, ids: list[int], decode: Callable[[list[int]], str], offsets: bool) -> Echo:
        """The prompt's own string (``text``), or its tokens decoded where it came as ids; ``offsets`` as a
        completion's are counted (``detokenize.IncrementalDetokenizer``, constant cost per token)."""
        if not offsets:
            return cls(decode(ids) if text is None else text, tuple(ids))
        detok, starts = IncrementalDetokenizer(decode), []
        for token in ids:
            starts.append(len(detok.text))
            detok.push(token)
        detok.finish()
        return cls(detok.text if text is None else text, tuple(ids), tuple(starts))

    def logprobs_json(self, scored: tuple[Scored, ...], token_text: TokenText) -> dict[str, Any]:
        """The prompt's log-probabilities in the completions API's lists: the first token has none (no context
        to be scored in: ``None``, as OpenAI and vLLM show it), each later one its own and its alternatives'."""
        tops = [
            {**{token_text(t): lp for t, lp in top}, token_text(token): lp}
            for token, (lp, top) in zip(self.ids[1:], scored, strict=True)
        ]
        return {
            "tokens": [token_text(t) for t in self.ids],
            "token_logprobs": [None, *(lp for lp, _ in scored)],
            "top_logprobs": [None, *tops],
            "text_offset": list(self.offsets),
        }


def logprobs_json(
    entries: tuple[TokenLogprob, ...] | None, chat: bool, token_text: TokenText, shift: int = 0
) -> dict[str, Any] | None:
    """Log-probabilities as OpenAI shows them: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}``
    (``bytes``: the UTF-8 of the token's text), or the completions API's parallel lists, whose ``top_logprobs``
    maps each alternative's text to its log-probability and includes the chosen token, as vLLM's does;
    ``shift``: the characters before the completion's text (an echoed prompt), added to its offsets."""
    if entries is None:
        return None
    if chat:

        def item(token_id: int, logprob: float) -> dict[str, Any]:
            text = token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return {
            "content": [
                {**item(e.token_id, e.logprob), "top_logprobs": [item(t, lp) for t, lp in e.top]} for e in entries
            ]
        }
    return {
        "tokens": [token_text(e.token_id) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {**{token_text(t): lp for t, lp in e.top}, token_text(e.token_id): e.logprob} for e in entries
        ],
        "text_offset": [shift + e.offset for e in entries],
    }


def _echoed(echo: Echo, r: GenerationResult, token_text: TokenText) -> tuple[str, dict[str, Any] | None]:
    """A completions choice's text and log-probabilities with its prompt in front."""
    text = echo.text + r.text
    if r.logprobs is None or r.prompt_logprobs is None:
        return text, None
    both = echo.logprobs_json(r.prompt_logprobs, token_text)
    after = logprobs_json(r.logprobs, False, token_text, len(echo.text))
    assert after is not None
    return text, {key: both[key] + after[key] for key in both}


def completion_body(
    rid: str,
    model: str,
    results: list[GenerationResult],
    chat: bool,
    token_text: TokenText,
    n: int = 1,
    echoes: list[Echo] | None = None,
) -> dict[str, Any]:
    """A whole response; ``n`` choices per prompt (for ``usage``), ``token_text`` names tokens in log-probabilities,
    ``echoes`` (per prompt) put the prompts in front of their completions."""
    if chat:
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": r.text},
             "logprobs": logprobs_json(r.logprobs, chat, token_text), "finish_reason": finish_reason(r)}
            for i, r in enumerate(results)
        ]  # fmt: skip
    else:
        shown = [
            _echoed(echoes[i // n], r, token_text) if echoes else (r.text, logprobs_json(r.logprobs, chat, token_text))
            for i, r in enumerate(results)
        ]
        choices = [
            {"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish_reason(r)}
            for i, (r, (text, logprobs)) in enumerate(zip(results, shown, strict=True))
        ]
    return {
        "id": rid,
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(results, n),
        "adapter": adapter_json(results[0].adapter),
    }


def chunk(
    rid: str, model: str, adapter: AdapterVersion, chat: bool, index: int, text: str | None, finish: str | None,
    *, first: bool = False, logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """One stream chunk; ``text=None`` with ``finish`` set is a choice's last chunk; ``logprobs``: those of the
    tokens whose text starts in this chunk (``logprobs_json``)."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "adapter": adapter_json(adapter),
    }


def usage_chunk(rid: str, model: str, chat: bool, results: list[GenerationResult], n: int = 1) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(results, n),
    }


def sse(data: dict[str, Any] | str) -> bytes:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()
