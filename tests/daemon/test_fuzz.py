"""Fuzzing a real ``hotswapd run`` over its Unix socket.

Hypothesis sends wrong types, huge numbers, deep nesting, invalid UTF-8, lone surrogates, bodies on both sides of
``server.max_body_bytes``, unknown fields and valid-ish OpenAI bodies to every endpoint; then plain sockets abuse
the HTTP layer (a partial request then silence, 100 KB header lines, 200 idle connections, a client gone
mid-stream, garbage, HTTP/1.0, pipelining). The property everywhere: a 2xx with valid JSON or server-sent events,
or a 4xx with an OpenAI-shaped JSON error (aiohttp's own HTTP parser answers malformed HTTP with plain text), or a
closed connection; never a 5xx, never a traceback, and the daemon keeps serving.

One daemon for the file. It serves the base model (no adapter), so a long generation really is long, and nothing
an admin call can reach is swappable: ``server.swap_roots`` is an empty folder and there is nothing to roll back to.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from hotswapd.demo import DemoAssets

from .harness import DaemonProcess, metric, running_daemon, wait_until, write_config

pytestmark = pytest.mark.slow

MAX_BODY = 64 * 1024
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-fz-", dir="/tmp") as d:  # short: AF_UNIX paths < 108 bytes
        for sub in ("adapters", "roots"):
            (Path(d) / sub).mkdir()
        yield Path(d)


@pytest.fixture(scope="module")
def daemon(demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]) -> Iterator[DaemonProcess]:
    config = write_config(
        demo_assets,
        workdir,
        workdir / "s.sock",
        **{
            "adapter.initial": None,  # the base model: no EOS habit, so max_tokens=200 streams for seconds
            "server.max_body_bytes": MAX_BODY,
            "server.swap_roots": [str(workdir / "roots")],  # empty: no admin swap can succeed
        },
    )
    with running_daemon(config, workdir, cli_env) as d:
        yield d


# ---- talking HTTP by hand -------------------------------------------------------------------------
@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def _request(
    method: str,
    target: str,
    body: bytes | None = None,
    *,
    version: str = "HTTP/1.1",
    close: bool = True,
    extra: tuple[str, ...] = (),
) -> bytes:
    lines = [f"{method} {target} {version}", "Host: localhost", *extra]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b"")


def _connect(d: DaemonProcess, timeout: float = 60.0) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    deadline = time.monotonic() + timeout
    while True:
        try:
            s.connect(str(d.sock))
            return s
        except BlockingIOError:  # the listen backlog is full (AF_UNIX says EAGAIN instead of waiting): retry
            if time.monotonic() > deadline:
                s.close()
                raise
            time.sleep(0.01)


def _read_all(s: socket.socket) -> bytes:
    """Everything until the daemon closes the connection (b"" if it closed at once)."""
    chunks = []
    while True:
        try:
            chunk = s.recv(1 << 16)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _send(d: DaemonProcess, data: bytes, timeout: float = 60.0) -> bytes:
    """Send raw bytes, then read the answer until the daemon closes the connection."""
    with _connect(d, timeout) as s:
        # It may answer (413) and close before reading everything; the answer is still buffered for us.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
        return _read_all(s)


class _Replay(io.BytesIO):
    """Bytes already received, offered to http.client as a socket file; never closed by it, so pipelined
    answers can be parsed one after the other."""

    def makefile(self, *_args: Any, **_kwargs: Any) -> _Replay:
        return self

    def close(self) -> None:
        pass


def _parse(raw: bytes, methods: tuple[str, ...] = ("POST",)) -> list[Answer]:
    replay, answers = _Replay(raw), []
    for method in methods:
        response = http.client.HTTPResponse(replay, method=method)  # type: ignore[arg-type]
        response.begin()
        answers.append(Answer(response.status, response.headers, response.read()))
    return answers


def _no_constants(name: str) -> Any:
    raise AssertionError(f"the daemon wrote {name}, which is not JSON")


def _check(answer: Answer) -> Any:
    """The property: 2xx with JSON or SSE, or 4xx with an OpenAI-shaped error; no 5xx, no traceback."""
    raw = answer.body
    assert b"Traceback" not in raw and b'File "' not in raw, raw[:2000]
    assert answer.status < 500, (answer.status, raw[:2000])
    content_type = answer.headers.get("Content-Type", "")
    if 200 <= answer.status < 300:
        if content_type.startswith("text/event-stream"):
            return _events(raw)
        assert content_type.startswith("application/json"), content_type
        return json.loads(raw, parse_constant=_no_constants)
    assert 400 <= answer.status < 500, answer.status
    assert content_type.startswith("application/json"), (answer.status, content_type, raw[:300])
    error = json.loads(raw, parse_constant=_no_constants)["error"]
    assert set(error) >= {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str), error
    return error


def _events(raw: bytes) -> list[dict[str, Any]]:
    """Server-sent events: ``data: {json}`` blocks, no in-band error, ending with ``data: [DONE]``."""
    blocks = raw.decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], raw[-300:]
    chunks = []
    for block in blocks[:-2]:
        assert block.startswith("data: "), block
        chunk = json.loads(block.removeprefix("data: "), parse_constant=_no_constants)
        assert "error" not in chunk, chunk
        chunks.append(chunk)
    return chunks


def _call(d: DaemonProcess, method: str, target: str, body: bytes | None = None) -> tuple[int, Any]:
    """One request on its own connection; the answer is checked against the property."""
    raw = _send(d, _request(method, target, body))
    assert raw, f"{method} {target}: the daemon closed the connection without answering"
    (answer,) = _parse(raw, (method,))
    checked = _check(answer)
    assert d.proc.poll() is None, d.log[-3000:]
    return answer.status, checked


def _serving(d: DaemonProcess) -> None:
    assert d.proc.poll() is None, d.log[-3000:]
    body = json.dumps({"prompt": "Hello =>", "max_tokens": 2, "temperature": 0}).encode()
    status, answer = _call(d, "POST", "/v1/completions", body)
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1, answer


def _sample(text: str, series: str) -> float:
    return metric(text, series) or 0.0


# ---- strategies -----------------------------------------------------------------------------------
BIG_INTS = st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**100, -(10**300)]) | st.integers(3990, 4300).map(
    lambda digits: int("9" * digits)  # the most Python will parse (test_fuzz_raw_bodies sends longer ones)
)
NUMBERS = (
    st.integers()
    | BIG_INTS
    | st.floats()  # NaN and ±Infinity too: json.dumps writes them, the daemon must refuse them
    | st.sampled_from([1e308, -1e308, 5e-324, 1e-308, -0.0])
)
TEXT = st.text(max_size=24) | st.sampled_from(
    ["\ud800", "x \udfff", "\x00", "日本🙂", "Hello =>", "{{ 7 * 7 }}", "{% raw %}", "\r\n\r\nGET / HTTP/1.1"]
)
JUNK = st.recursive(
    st.none() | st.booleans() | NUMBERS | TEXT,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(TEXT, kids, max_size=4),
    max_leaves=12,
)


def _cheap(value: Any) -> bool:
    """Keeps the fuzz fast: never a valid max_tokens above 4 (and never absent, which means "fill the context")."""
    return value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 5 <= value <= 256)


MAX_TOKENS = st.integers(1, 4) | JUNK.filter(_cheap)
# What a well-behaved OpenAI client might send (unknown fields included: they are ignored) ...
PLAIN_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=8,
)
VALID_OPTIONS = {
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "seed": st.integers(-(2**63), 2**64 - 1),
    "stop": st.text(min_size=1, max_size=4) | st.lists(st.text(min_size=1, max_size=4), min_size=1, max_size=4),
    "stream": st.booleans(),
    "model": st.text(max_size=24),
    "user": st.text(max_size=24),
    "n": st.sampled_from([1, 2]),
    "logprobs": st.sampled_from([None, 0, 1]),  # completions: 0 or 1 alternatives; chat: false or true
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(0.01, 10),
    "echo": st.just(False),
    "logit_bias": st.dictionaries(st.integers(0, 258).map(str), st.floats(-100, 100), max_size=3),
    "response_format": st.just({"type": "text"}),
}
VALID_PROMPTS = (
    st.text(max_size=24)
    | st.lists(st.text(max_size=24), min_size=1, max_size=3)
    | st.lists(st.lists(st.integers(0, 258), min_size=1, max_size=6), min_size=1, max_size=3)  # 259 ids
)
VALID_MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]), "content": st.text(max_size=24)}),
    min_size=1,
    max_size=3,
)
# ... and the same with anything in any field.
FUZZED_OPTIONS = {
    **{name: valid | JUNK for name, valid in VALID_OPTIONS.items()},
    "seed": st.integers() | BIG_INTS | JUNK,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JUNK,
    "n": st.sampled_from([1, 2, 3, 9]) | JUNK,
    "logprobs": st.sampled_from([None, 0, False, True, 5, 21]) | JUNK,
    "top_logprobs": st.integers(-1, 21) | JUNK,
    "echo": st.booleans() | JUNK,
}
FUZZED_PROMPTS = (
    VALID_PROMPTS
    | st.lists(st.integers(-2, 300), min_size=1, max_size=6)  # ids past the vocabulary
    | st.lists(TEXT, min_size=1, max_size=3)
    | JUNK
)
TEXT_PART = st.fixed_dictionaries({"type": st.just("text"), "text": TEXT})
FUZZED_MESSAGES = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system"]) | TEXT, "content": TEXT | st.lists(TEXT_PART, max_size=3)}
        )
        | JUNK,
        min_size=1,
        max_size=3,
    )
    | JUNK
)


def _body(required: dict[str, Any], optional: dict[str, Any], unknown: Any) -> st.SearchStrategy[dict[str, Any]]:
    known = st.fixed_dictionaries(required, optional=optional)
    extra = st.dictionaries(TEXT, unknown, max_size=3)
    return st.builds(lambda u, k: {**u, **k}, extra, known)  # the known keys win: max_tokens stays cheap


COMPLETION_BODIES = _body(
    {"prompt": VALID_PROMPTS, "max_tokens": st.integers(1, 4)}, VALID_OPTIONS, PLAIN_JSON
) | _body({"prompt": FUZZED_PROMPTS, "max_tokens": MAX_TOKENS}, FUZZED_OPTIONS, JUNK)
CHAT_BODIES = _body({"messages": VALID_MESSAGES, "max_tokens": st.integers(1, 4)}, VALID_OPTIONS, PLAIN_JSON) | _body(
    {"messages": FUZZED_MESSAGES, "max_tokens": MAX_TOKENS},
    {**FUZZED_OPTIONS, "max_completion_tokens": MAX_TOKENS},
    JUNK,
)
SWAP_PREFIXES = st.sampled_from(
    ["{roots}/", "{roots}", "{roots}/../", "{roots}/../adapters/", "{alpha}", "{alpha}/../", "/", "/etc/", "/proc/", "",
     "relative/", "~/"]
)  # fmt: skip
SWAP_SUFFIXES = TEXT | st.sampled_from(["", "../" * 12 + "etc", "x/" * 200, "a" * 5000, "alpha\x00/../../etc"])


PATHS = [
    "/healthz", "/readyz", "/v1/models", "/v1/adapters", "/v1/completions", "/v1/chat/completions",
    "/v1/adapters/swap", "/v1/adapters/rollback", "/v1/nope", "/", "/v1/models/../adapters", "//v1/models",
    "/v1/%ff%fe", "/v1/adapters%2fswap", "/tokenize", "/detokenize", "/version", "/v1/models/base",
    "/v1/models/%ff", "/v1/models/",
]  # fmt: skip


def _dumps(body: Any) -> bytes:
    return json.dumps(body).encode()  # ASCII: lone surrogates travel as \ud800 escapes, as on the wire


# ---- hypothesis: every endpoint -------------------------------------------------------------------
@FUZZ
@given(body=COMPLETION_BODIES)
# Each once answered 500 (fixed): token ids past the vocabulary failed the whole batch in the compiled graph;
# a lone surrogate made the tokenizer raise; a tiny temperature made the sampling probabilities NaN.
@example(body={"prompt": [1_000_000, 5], "max_tokens": 2})
@example(body={"prompt": [[5], [259]], "max_tokens": 1, "stream": True})
@example(body={"prompt": "\ud800 =>", "max_tokens": 2})
@example(body={"prompt": "x", "max_tokens": 2, "temperature": 1e-125, "top_p": 0.5})
def test_fuzz_completions(daemon: DaemonProcess, body: dict[str, Any]) -> None:
    status, answer = _call(daemon, "POST", "/v1/completions", _dumps(body))
    event(f"status {status}")
    if status == 200 and isinstance(answer, dict):
        assert answer["object"] == "text_completion" and answer["adapter"]["version"] == "base", answer


@FUZZ
@given(body=CHAT_BODIES)
@example(body={"messages": [{"role": "user", "content": ""}], "max_tokens": 1, "temperature": 1.3e-125})
@example(body={"messages": [{"role": "\udfff", "content": "hi"}], "max_tokens": 1, "stream": True})
def test_fuzz_chat_completions(daemon: DaemonProcess, body: dict[str, Any]) -> None:
    status, answer = _call(daemon, "POST", "/v1/chat/completions", _dumps(body))
    event(f"status {status}")
    if status == 200 and isinstance(answer, dict):
        assert answer["object"] == "chat.completion", answer


TOKENIZE_OPTIONS = {"add_special_tokens": st.booleans() | JUNK, "return_token_strs": st.booleans() | JUNK,
                    "add_generation_prompt": st.just(True) | JUNK, "model": TEXT | JUNK}  # fmt: skip
TOKENIZE_BODIES = (
    _body({"prompt": TEXT}, TOKENIZE_OPTIONS, PLAIN_JSON)
    | _body({"messages": VALID_MESSAGES}, TOKENIZE_OPTIONS, PLAIN_JSON)
    | _body({}, {"prompt": FUZZED_PROMPTS, "messages": FUZZED_MESSAGES, **TOKENIZE_OPTIONS}, JUNK)
)
DETOKENIZE_BODIES = _body({"tokens": st.lists(st.integers(0, 258), max_size=8)}, {}, PLAIN_JSON) | _body(
    {}, {"tokens": st.lists(st.integers(-2, 300) | JUNK, max_size=6) | JUNK, "model": JUNK}, JUNK
)


@FUZZ
@given(body=TOKENIZE_BODIES)
@example(body={"prompt": "\ud800 =>"})  # what made the tokenizer raise in a completion
@example(body={"messages": [{"role": "user", "content": "\udfff"}], "return_token_strs": True})
def test_fuzz_tokenize(daemon: DaemonProcess, body: dict[str, Any]) -> None:
    status, answer = _call(daemon, "POST", "/tokenize", _dumps(body))
    event(f"status {status}")
    assert status in (200, 400), (status, answer)
    if status == 200:
        assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 256, answer
        strs = answer["token_strs"]
        assert strs is None or len(strs) == answer["count"], answer


@FUZZ
@given(body=DETOKENIZE_BODIES)
def test_fuzz_detokenize(daemon: DaemonProcess, body: dict[str, Any]) -> None:
    status, answer = _call(daemon, "POST", "/detokenize", _dumps(body))
    event(f"status {status}")
    assert status in (200, 400), (status, answer)
    if status == 200:
        assert isinstance(answer["prompt"], str), answer


@FUZZ
@given(
    body=st.builds(
        lambda prefix, suffix, extra: {**extra, "path": (prefix, suffix)},
        SWAP_PREFIXES,
        SWAP_SUFFIXES,
        st.dictionaries(TEXT, JUNK, max_size=2),
    )
    | st.fixed_dictionaries({"path": JUNK})
    | JUNK
)
@example(body={"path": ("{roots}/", "a\x00b")})  # once a failed swap and a 500 (fixed), as was \ud800
@example(body={"path": ("{roots}/", "\ud800")})
def test_fuzz_admin_swap(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path, body: Any) -> None:
    if isinstance(body, dict) and isinstance(body.get("path"), tuple):
        prefix, suffix = body["path"]
        body = {**body, "path": prefix.format(roots=workdir / "roots", alpha=demo_assets.alpha) + suffix}
    status, answer = _call(daemon, "POST", "/v1/adapters/swap", _dumps(body))
    assert status in (400, 403, 422), (status, answer)  # nothing under swap_roots is an adapter
    assert daemon.live() == "base"


@settings(FUZZ, max_examples=15)
@given(body=st.none() | st.binary(max_size=64) | JUNK.map(_dumps))
def test_fuzz_admin_rollback(daemon: DaemonProcess, body: bytes | None) -> None:
    status, answer = _call(daemon, "POST", "/v1/adapters/rollback", body)
    assert (status, answer["code"]) == (409, "rollback_impossible"), answer  # only the base model was ever live


@FUZZ
@given(
    method=st.sampled_from(["GET", "GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]),
    path=st.sampled_from(PATHS),
    query=st.text(max_size=40).map(lambda q: urllib.parse.quote(q, safe="=&"))
    | st.binary(max_size=20).map(urllib.parse.quote_from_bytes),
    body=st.none() | st.binary(max_size=200),
)
def test_fuzz_any_method_path_query_and_body(
    daemon: DaemonProcess, method: str, path: str, query: str, body: bytes | None
) -> None:
    status, _ = _call(daemon, method, f"{path}?{query}", body)
    if method == "GET" and path in ("/healthz", "/readyz", "/v1/models", "/v1/adapters", "/version"):
        assert status == 200  # the query string and any body are ignored


@FUZZ
@given(
    body=st.binary(max_size=300)
    | st.text(max_size=100).map(lambda t: t.encode("utf-16"))
    | st.builds(lambda head, tail: head + b"\xff\xfe\xc0\xaf" + tail, st.binary(max_size=20), st.binary(max_size=20))
    | st.integers(1, 30_000).map(lambda n: b'{"prompt": ' + b"[" * n + b"]" * n + b', "max_tokens": 1}')
    | st.integers(1, 9_000).map(lambda n: b'{"a": ' * n + b"1" + b"}" * n)  # 7 bytes a level: < max_body_bytes
    | st.integers(4290, 4400).map(lambda n: b'{"prompt": "x", "max_tokens": 1' + b"0" * n + b"}")
    | st.sampled_from([b"", b" ", b"null", b"[]", b'"x"', b"1e999", b'{"prompt": NaN}', b"{" * 5, b"\x00" * 10]),
    endpoint=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/v1/adapters/swap"]),
)
def test_fuzz_raw_bodies(daemon: DaemonProcess, body: bytes, endpoint: str) -> None:
    status, _ = _call(daemon, "POST", endpoint, body)
    assert status == 400


@settings(FUZZ, max_examples=12)
@given(size=st.integers(MAX_BODY - 40, MAX_BODY + 40) | st.integers(MAX_BODY + 41, 4 * MAX_BODY))
def test_fuzz_body_size_around_max_body_bytes(daemon: DaemonProcess, size: int) -> None:
    head, tail = b'{"max_tokens": 1, "prompt": "', b'"}'
    body = head + b"x" * (size - len(head) - len(tail)) + tail
    assert len(body) == size
    status, error = _call(daemon, "POST", "/v1/completions", body)
    if size > MAX_BODY:
        assert (status, error["code"]) == (413, "body_too_large"), error
    else:  # read whole, then refused for its length in tokens
        assert (status, error["code"]) == (400, "context_length_exceeded"), error


def test_still_serving_after_the_fuzz(daemon: DaemonProcess) -> None:
    _serving(daemon)


# ---- raw sockets ----------------------------------------------------------------------------------
def _status_line(raw: bytes) -> int | None:
    """The status of the first answer, or None when the daemon closed without one."""
    if not raw:
        return None
    (answer,) = _parse(raw, ("GET",))
    assert b"Traceback" not in raw and b'File "' not in raw, raw[:2000]
    return answer.status


def test_partial_request_then_silence(daemon: DaemonProcess) -> None:
    partial = [
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n",  # headers never end
        b'POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{"prompt": ',  # body short
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 1000000000000\r\n\r\n{",
        b'POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n10\r\n{"pro',
        b"GE",
    ]
    silent = [_connect(daemon, timeout=0.5) for _ in partial]
    try:
        for s, data in zip(silent, partial, strict=True):
            s.sendall(data)
        for _ in range(3):
            _serving(daemon)  # others are served meanwhile
        time.sleep(1.0)
        for s in silent:  # still waiting for the rest (a timeout here), or closed: either is fine, a 5xx is not
            try:
                got = _read_all(s)
            except TimeoutError:
                continue
            status = _status_line(got)
            assert status is None or 400 <= status < 500, got[:500]
    finally:
        for s in silent:
            s.close()
    _serving(daemon)


@pytest.mark.parametrize(
    "request_bytes",
    [
        _request("GET", "/healthz", extra=("X-Big: " + "a" * 100_000,)),
        _request("GET", "/healthz", extra=tuple(f"X-H{i}: {'v' * 100}" for i in range(1000))),
        _request("GET", "/" + "a" * 100_000),
        _request("POST", "/v1/completions", b"{}", extra=("Content-Type: " + "x" * 100_000,)),
    ],
    ids=["100KB-header-line", "1000-headers", "100KB-url", "100KB-content-type"],
)
def test_oversized_headers_are_refused(daemon: DaemonProcess, request_bytes: bytes) -> None:
    status = _status_line(_send(daemon, request_bytes, timeout=30))
    assert status is None or 400 <= status < 500, status
    _serving(daemon)


def _open_fds(d: DaemonProcess) -> int:
    return len(os.listdir(f"/proc/{d.proc.pid}/fd"))


def test_many_idle_connections(daemon: DaemonProcess) -> None:
    before = _open_fds(daemon)
    idle = [_connect(daemon, timeout=10) for _ in range(200)]
    try:
        wait_until(lambda: _open_fds(daemon) >= before + 200, 10, "the daemon to accept the 200 connections")
        for _ in range(3):
            _serving(daemon)
        status, body = _call(daemon, "GET", "/v1/models")
        assert status == 200 and body["data"], body
    finally:
        for s in idle:
            s.close()
    # Every idle connection is let go once its client is gone: no fd leak.
    wait_until(lambda: _open_fds(daemon) <= before + 5, 20, "the daemon to close the 200 connections")
    _serving(daemon)


def test_client_gone_mid_stream(daemon: DaemonProcess) -> None:
    gone_before = _sample(daemon.metrics(), 'hotswapd_requests_total{code="499",endpoint="completions"}')
    body = _dumps({"prompt": "Once upon a time", "max_tokens": 200, "temperature": 1.0, "seed": 7, "stream": True})
    s = _connect(daemon, timeout=60)
    try:
        s.sendall(_request("POST", "/v1/completions", body))
        seen = b""
        while b"data: {" not in seen:  # the headers, then the first chunk
            chunk = s.recv(4096)
            assert chunk, seen
            seen += chunk
        assert seen.startswith(b"HTTP/1.1 200") and b"text/event-stream" in seen, seen[:500]
    finally:
        s.close()
    metrics_text = ""

    def counted() -> bool:
        nonlocal metrics_text
        metrics_text = daemon.metrics()
        return _sample(metrics_text, 'hotswapd_requests_total{code="499",endpoint="completions"}') > gone_before

    wait_until(counted, 30, "the abandoned stream to be counted as 499")
    wait_until(lambda: _sample(daemon.metrics(), "hotswapd_inflight_requests") == 0, 30, "the stream to be let go")
    _serving(daemon)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\r\n\r\n",  # a TLS ClientHello
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",  # the HTTP/2 preface
        b"\x00\xff\xfe garbage \r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"FROB /v1/completions HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\n",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n{}",
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header With Spaces\r\n\r\n",
        b"\r\n" * 1000,
    ],
    ids=["tls", "http2", "binary", "no-target", "http-9.9", "bad-method", "two-lengths", "negative-length",
         "bad-chunk", "bad-header", "blank-lines"],
)  # fmt: skip
def test_garbage_instead_of_http(daemon: DaemonProcess, garbage: bytes) -> None:
    with _connect(daemon, timeout=5) as s:
        s.sendall(garbage)
        try:
            got = _read_all(s)
        except TimeoutError:
            got = b""  # still waiting for a request line: harmless
    status = _status_line(got)
    assert status is None or 400 <= status < 500, got[:500]
    _serving(daemon)


def test_compressed_body_bomb(daemon: DaemonProcess) -> None:
    import gzip

    bomb = gzip.compress(b'{"prompt": "' + b"x" * (32 * MAX_BODY) + b'"}')  # 2 MiB unpacked, 2 KiB on the wire
    status, error = _call_raw(daemon, _request("POST", "/v1/completions", bomb, extra=("Content-Encoding: gzip",)))
    assert (status, error["code"]) == (413, "body_too_large"), error
    _serving(daemon)


def test_chunked_body_over_the_limit(daemon: DaemonProcess) -> None:
    chunk = b"x" * 16384
    framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(MAX_BODY // len(chunk) + 2)) + b"0\r\n\r\n"
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    status, error = _call_raw(daemon, head + framed)
    assert (status, error["code"]) == (413, "body_too_large"), error


def _call_raw(d: DaemonProcess, data: bytes) -> tuple[int, Any]:
    (answer,) = _parse(_send(d, data))
    return answer.status, _check(answer)


def test_http10_and_pipelining(daemon: DaemonProcess) -> None:
    # HTTP/1.0: answered, then the connection is closed (no keep-alive was asked for).
    body = _dumps({"prompt": "Hello =>", "max_tokens": 2, "temperature": 0})
    for method, target, payload in (("GET", "/healthz", None), ("POST", "/v1/completions", body)):
        raw = _send(daemon, _request(method, target, payload, version="HTTP/1.0", close=False), timeout=30)
        (answer,) = _parse(raw, (method,))
        assert answer.status == 200 and _check(answer), raw[:500]
    # Two requests in one write on one keep-alive connection: two answers, in order.
    first = _request("POST", "/v1/completions", body, close=False)
    second = _request("GET", "/v1/models")
    completion, models = _parse(_send(daemon, first + second), ("POST", "GET"))
    assert (completion.status, models.status) == (200, 200)
    assert _check(completion)["object"] == "text_completion" and _check(models)["object"] == "list"


def test_no_5xx_and_no_unhandled_error_after_all_of_it(daemon: DaemonProcess) -> None:
    _serving(daemon)
    text = daemon.metrics()
    server_errors = [
        line
        for line in text.splitlines()
        if line.startswith('hotswapd_requests_total{code="5')
        and float(line.split()[-1])
        and not line.startswith('hotswapd_requests_total{code="503",endpoint="health"}')  # /readyz while starting
    ]
    assert not server_errors, server_errors
    assert _sample(text, "hotswapd_recompilations_total") == 0
    assert _sample(text, 'hotswapd_swaps_total{result="failed"}') == 0
    assert "unhandled error serving" not in daemon.log and "failed in phase" not in daemon.log, daemon.log[-5000:]
    assert daemon.proc.poll() is None
