"""The OpenAI wire format, incoming: request bodies checked field by field (``responses.py`` builds what goes out).

Every problem is an ``ApiError`` naming the parameter (OpenAI's error shape). Fields hotswapd cannot
honour (``best_of``, tools, chat's ``echo``, ...) are refused by name rather than silently ignored; fields it
does not know (``user``, new client options) are ignored, as vLLM does.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from hotswap_core.generation import MAX_LOGIT_BIAS, MAX_LOGPROBS, MAX_PENALTY, MAX_REPETITION_PENALTY, SamplingParams

MAX_STOP = 4  # as OpenAI
MAX_PROMPTS = 64


class ApiError(Exception):
    """An HTTP error answered as ``{"error": {"message", "type", "param", "code"}}``."""

    TYPES: ClassVar[dict[int, str]] = {
        400: "invalid_request_error", 403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
        409: "conflict_error", 413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
        503: "service_unavailable_error", 504: "timeout_error",
    }  # fmt: skip

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "server_error" if self.status >= 500 else "invalid_request_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}, **self.extra}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def parse_json(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; NaN/Infinity, invalid UTF-8, lone surrogates and absurd nesting are refused."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"request body is not valid UTF-8 (byte {exc.start})") from exc
    if not text.strip():
        raise bad("request body is empty; expected a JSON object")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        body = json.loads(text, parse_constant=no_constants)
    except RecursionError as exc:
        raise bad("request body is nested too deeply") from exc
    except ValueError as exc:
        raise bad(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad(f"request body must be a JSON object, got {type(body).__name__}")
    try:  # a \ud800 escape decodes to a lone surrogate: not Unicode, and the tokenizer raises on it
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad("request body holds a lone surrogate escape (\\ud800-\\udfff), which is not valid Unicode") from exc
    except RecursionError as exc:
        raise bad("request body is nested too deeply") from exc
    return body


# ---- field checks ---------------------------------------------------------------------------------
def _int(body: dict[str, Any], name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"{name} must be an integer, got {json.dumps(v)[:40]}", name)
    if not lo <= v <= hi:
        raise bad(f"{name} must be between {lo} and {hi}, got {v}", name)
    return v


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, open_lo: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(f"{name} must be a number, got {json.dumps(v)[:40]}", name)
    if v > hi or v < lo or (open_lo and v == lo):
        raise bad(f"{name} must be in {'(' if open_lo else '['}{lo}, {hi}], got {v}", name)
    return float(v)


# Parameters hotswapd does not implement, with the value that means "not used".
_NEUTRAL: dict[str, Any] = {
    "best_of": 1, "echo": False, "suffix": None, "tools": [], "functions": [],
    "tool_choice": "none", "response_format": {"type": "text"},
}  # fmt: skip


def _refuse_unsupported(body: dict[str, Any], supported: tuple[str, ...] = ()) -> None:
    """Parameters that would change the result if silently ignored (but for the endpoint's ``supported``)."""
    for name, neutral in _NEUTRAL.items():
        v = body.get(name)
        if v is None or v == neutral or name in supported:
            continue
        if name == "response_format" and isinstance(v, dict) and v.get("type") == "text":
            continue
        raise bad(f"{name}={json.dumps(v)[:40]} is not supported by hotswapd", name, "unsupported_parameter")


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop must be a non-empty string or a list of non-empty strings", "stop")
    if len(stops) > MAX_STOP:
        raise bad(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop")
    return tuple(stops)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad("stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is None:
        return stream, False
    if not stream:
        raise bad("stream_options is only allowed with stream: true", "stream_options")
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad('stream_options must be an object like {"include_usage": true}', "stream_options")
    return stream, bool(options.get("include_usage", False))


@dataclass(frozen=True)
class Call:
    """A checked request: token ids per prompt, how to sample, and ``n`` choices per prompt. With ``echo`` (the
    completions API's), each choice's text starts with its prompt (``texts``: a prompt's own string, None where
    it came as token ids), and the prompt's tokens lead its log-probabilities; ``completion`` False is
    ``max_tokens: 0`` with ``echo``: the prompt alone (scoring it), one token run and not shown."""

    prompts: list[list[int]]
    params: SamplingParams
    stream: bool
    include_usage: bool
    n: int = 1
    echo: bool = False
    texts: tuple[str | None, ...] = ()
    completion: bool = True

    def choices(self) -> list[tuple[list[int], SamplingParams]]:
        """One (prompt, params) per choice, in the response's order: prompt ``i``'s ``n`` choices at ``i * n``
        onwards (OpenAI's order). A seeded request's choice ``j`` draws from ``seed + j``: the same seed gives
        the same ``n`` texts, and they differ from one another."""
        seed = self.params.seed
        per_choice = [
            self.params if seed is None or j == 0 else replace(self.params, seed=(seed + j) & (2**63 - 1))
            for j in range(self.n)
        ]
        return [(ids, params) for ids in self.prompts for params in per_choice]


def _n(body: dict[str, Any], prompts: int, max_rows: int) -> int:
    """``n``: choices per prompt. Every choice of a request runs at once, in rows of one batch (one version)."""
    n = _int(body, "n", 1, 1, max_rows)
    assert n is not None
    if n * prompts > max_rows:
        raise bad(
            f"{prompts} prompts x n={n} is {n * prompts} choices; at most {max_rows} run at once "
            "(model.max_batch_size)",
            "n",
        )
    return n


def _params(
    body: dict[str, Any],
    prompts: list[list[int]],
    max_seq_len: int,
    default_max: int | None,
    defaults: Mapping[str, float],
    logprobs: int | None = None,
    echo: bool = False,
    vocab_size: int | None = None,
) -> SamplingParams:
    """``defaults``: the model's generation_config values (temperature, top_p, top_k) for what the body omits;
    with ``echo``, ``max_tokens`` may be 0 (run as 1: ``Call.completion``) and the prompt's log-probabilities
    are asked with the completion's."""
    longest = max(len(p) for p in prompts)
    if longest >= max_seq_len:
        raise bad(
            f"the prompt has {longest} tokens; this model's maximum context length is {max_seq_len} tokens",
            "prompt" if "prompt" in body else "messages",
            "context_length_exceeded",
        )
    name = _max_tokens_name(body)
    room = max_seq_len - longest
    max_tokens = _int(body, name, default_max if default_max is not None else room, 0 if echo else 1, max_seq_len)
    assert max_tokens is not None
    max_tokens = max(1, max_tokens)  # 0 (echo): the prompt alone; the one token run is not shown
    if max_tokens > room:
        raise bad(
            f"this model's maximum context length is {max_seq_len} tokens; you requested {longest + max_tokens} "
            f"({longest} in the prompt, {max_tokens} for the completion)",
            name,
            "context_length_exceeded",
        )
    seed = _int(body, "seed", None, -(2**63), 2**64 - 1)
    top_k = _int(body, "top_k", int(defaults.get("top_k", 0)), -1, 2**31 - 1)  # vLLM's extension; -1 and 0: off
    min_tokens = _int(body, "min_tokens", 0, 0, max_tokens)  # vLLM's extension
    ignore_eos = body.get("ignore_eos", False)  # vLLM's extension
    if ignore_eos is None:
        ignore_eos = False
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be true or false", "ignore_eos")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", float(defaults.get("temperature", 1.0)), 0.0, 2.0),
        top_p=_number(body, "top_p", float(defaults.get("top_p", 1.0)), 0.0, 1.0, open_lo=True),
        seed=None if seed is None else seed & (2**63 - 1),
        stop=_stop(body),
        top_k=max(0, top_k or 0),
        min_tokens=min_tokens or 0,
        ignore_eos=ignore_eos,
        logprobs=logprobs,
        prompt_logprobs=logprobs if echo else None,
        logit_bias=_logit_bias(body, vocab_size),
        presence_penalty=_number(body, "presence_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -MAX_PENALTY, MAX_PENALTY),
        repetition_penalty=_number(  # vLLM's extension
            body, "repetition_penalty", 1.0, 0.0, MAX_REPETITION_PENALTY, open_lo=True
        ),
    )


def _max_tokens_name(body: dict[str, Any]) -> str:
    """Chat's newer name wins where both are sent."""
    return "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"


def _logit_bias(body: dict[str, Any], vocab_size: int | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias``: token ids (as JSON keys, decimal strings) to a bias in [-100, 100] added to that
    token's logit before sampling (-100 bans it; 100 all but forces it). Each id below ``vocab_size``."""
    raw = body.get("logit_bias")
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise bad('logit_bias must be an object of token ids to numbers, like {"50256": -100}', "logit_bias")
    out: dict[int, float] = {}
    for key, value in raw.items():
        if not (key.isascii() and key.isdigit()) or len(key) > 10:
            raise bad(f"logit_bias keys are token ids (decimal strings), got {json.dumps(key)[:40]}", "logit_bias")
        token = int(key)
        if vocab_size is not None and token >= vocab_size:
            raise bad(f"logit_bias: token id {token} is outside this model's vocabulary (0 to {vocab_size - 1})",
                      "logit_bias")  # fmt: skip
        if token in out:  # "1" and "01": one token, two biases
            raise bad(f"logit_bias names token {token} twice", "logit_bias")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad(f"logit_bias[{key}] must be a number, got {json.dumps(value)[:40]}", "logit_bias")
        if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:  # NaN and any int compare without raising
            raise bad(f"logit_bias[{key}] must be between -100 and 100, got {str(value)[:40]}", "logit_bias")
        out[token] = float(value)
    return tuple(sorted(out.items()))


def _model(body: dict[str, Any]) -> None:
    if "model" in body and body["model"] is not None and not isinstance(body["model"], str):
        raise bad("model must be a string", "model")


def parse_completion(
    body: dict[str, Any],
    tokenize: Callable[[str], list[int]],
    max_seq_len: int,
    max_prompts: int,
    defaults: Mapping[str, float] | None = None,
    vocab_size: int | None = None,
) -> Call:
    """``POST /v1/completions``: ``prompt`` is a string, a list of strings, token ids, or lists of token ids
    (each below ``vocab_size``: an id past the embedding is refused here, before anything is streamed)."""
    _model(body)
    _refuse_unsupported(body, supported=("echo",))
    echo = body.get("echo", False)
    if echo is None:
        echo = False
    if not isinstance(echo, bool):
        raise bad("echo must be true or false", "echo")
    raw = body.get("prompt")
    if raw is None:
        raise bad("prompt is required", "prompt")
    if isinstance(raw, str) or (isinstance(raw, list) and raw and all(_is_token(t) for t in raw)):
        items: list[Any] = [raw]
    elif isinstance(raw, list) and raw:
        items = raw
    else:
        raise bad("prompt must be a string, a non-empty list of strings, or token ids", "prompt")
    if len(items) > max_prompts:
        raise bad(f"at most {max_prompts} prompts per request, got {len(items)}", "prompt")
    prompts: list[list[int]] = []
    for item in items:
        if isinstance(item, str):
            prompts.append(tokenize(item))
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            outside = next((t for t in item if vocab_size is not None and not 0 <= t < vocab_size), None)
            if outside is not None:
                assert vocab_size is not None
                raise bad(f"token id {outside} is outside this model's vocabulary (0 to {vocab_size - 1})", "prompt")
            prompts.append(list(item))
        else:
            raise bad("each prompt must be a string or a non-empty list of token ids", "prompt")
    stream, usage = _stream(body)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)  # the alternatives per token; 0: the token's only
    params = _params(body, prompts, max_seq_len, 16, defaults or {}, logprobs, echo, vocab_size)
    n = _n(body, len(prompts), max_prompts)
    if not echo:
        return Call(prompts, params, stream, usage, n)
    texts = tuple(item if isinstance(item, str) else None for item in items)
    shown = body.get(_max_tokens_name(body)) != 0  # checked by _params: 0 is the prompt alone
    return Call(prompts, params, stream, usage, n, echo=True, texts=texts, completion=shown)


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31


def parse_chat(
    body: dict[str, Any],
    render: Callable[[list[dict[str, str]]], str],
    tokenize: Callable[[str], list[int]],
    max_seq_len: int,
    max_rows: int,
    defaults: Mapping[str, float] | None = None,
    vocab_size: int | None = None,
) -> Call:
    """``POST /v1/chat/completions``: ``messages`` rendered with the tokenizer's chat template; ``max_rows``
    bounds ``n``; ``logit_bias`` ids below ``vocab_size``."""
    _model(body)
    _refuse_unsupported(body)
    messages = chat_messages(body)
    stream, usage = _stream(body)
    logprobs = _chat_logprobs(body)
    n = _n(body, 1, max_rows)
    prompt = tokenize(render(messages))
    params = _params(body, [prompt], max_seq_len, None, defaults or {}, logprobs, vocab_size=vocab_size)
    return Call([prompt], params, stream, usage, n)


def chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """``messages``, each ``{"role", "content"}`` with text content (a list of text parts is joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    clean: list[dict[str, str]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a string role", f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
            ):
                raise bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")
        clean.append({"role": m["role"], "content": content})
    return clean


@dataclass(frozen=True)
class Tokenize:
    """``POST /tokenize`` (vLLM's): a ``prompt`` or chat ``messages``, and whether to add special tokens."""

    prompt: str | None
    messages: list[dict[str, str]] | None
    add_special_tokens: bool | None  # None: as a completion would run it
    token_strs: bool


def _flag(body: dict[str, Any], name: str, default: bool | None) -> bool | None:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false", name)
    return value


def parse_tokenize(body: dict[str, Any]) -> Tokenize:
    _model(body)
    token_strs = bool(_flag(body, "return_token_strs", False))
    special = _flag(body, "add_special_tokens", None)
    if "messages" in body:
        if "prompt" in body:
            raise bad("send either prompt or messages, not both", "messages")
        if body.get("add_generation_prompt", True) is not True:  # hotswapd's chat always adds it
            raise bad("add_generation_prompt: only true is supported (as /v1/chat/completions renders)",
                      "add_generation_prompt", "unsupported_parameter")  # fmt: skip
        return Tokenize(None, chat_messages(body), special, token_strs)
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("prompt (a string) or messages is required", "prompt")
    return Tokenize(prompt, None, special, token_strs)


def parse_detokenize(body: dict[str, Any], vocab_size: int) -> list[int]:
    """``POST /detokenize`` (vLLM's): ``tokens``, a list of token ids of this model."""
    _model(body)
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(_is_token(t) for t in tokens):
        raise bad("tokens must be a list of token ids", "tokens")
    outside = next((t for t in tokens if t >= vocab_size), None)
    if outside is not None:
        raise bad(f"token id {outside} is outside this model's vocabulary (0 to {vocab_size - 1})", "tokens")
    return list(tokens)


def _chat_logprobs(body: dict[str, Any]) -> int | None:
    """Chat's ``logprobs`` (true/false) and ``top_logprobs`` (alternatives per token, only with ``logprobs``)."""
    wanted = body.get("logprobs")
    if wanted is not None and wanted not in (True, False):  # 0 and 1 too, as a lax JSON schema takes them
        raise bad(f"logprobs must be true or false, got {json.dumps(wanted)[:40]}", "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if top and not wanted:  # 0 means none: a client may send it as its default
        raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    return (top or 0) if wanted else None
