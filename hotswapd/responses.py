"""The OpenAI wire format, outgoing: whole completion bodies, stream chunks and server-sent events, usage and
log-probabilities, and the JSON of adapter versions and swap records (``protocol.py`` checks what comes in)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from typing import Any

from hotswap_core.generation import GenerationResult, TokenLogprob
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


def logprobs_json(entries: tuple[TokenLogprob, ...] | None, chat: bool, token_text: TokenText) -> dict[str, Any] | None:
    """Log-probabilities as OpenAI shows them: chat's ``{"content": [{token, logprob, bytes, top_logprobs}]}``
    (``bytes``: the UTF-8 of the token's text), or the completions API's parallel lists, whose ``top_logprobs``
    maps each alternative's text to its log-probability and includes the chosen token, as vLLM's does."""
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
        "text_offset": [e.offset for e in entries],
    }


def completion_body(
    rid: str, model: str, results: list[GenerationResult], chat: bool, token_text: TokenText, n: int = 1
) -> dict[str, Any]:
    """A whole response; ``n`` choices per prompt (for ``usage``), ``token_text`` names tokens in log-probabilities."""
    if chat:
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": r.text},
             "logprobs": logprobs_json(r.logprobs, chat, token_text), "finish_reason": finish_reason(r)}
            for i, r in enumerate(results)
        ]  # fmt: skip
    else:
        choices = [
            {"index": i, "text": r.text, "logprobs": logprobs_json(r.logprobs, chat, token_text),
             "finish_reason": finish_reason(r)}
            for i, r in enumerate(results)
        ]  # fmt: skip
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
