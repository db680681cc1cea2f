"""The OpenAI wire format in isolation: request checks and response shapes (no model, no sockets)."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hotswap_core.generation import GenerationResult, TokenLogprob
from hotswap_core.slots import AdapterVersion
from hotswapd.protocol import (
    ApiError,
    Call,
    Tokenize,
    parse_chat,
    parse_completion,
    parse_detokenize,
    parse_json,
    parse_tokenize,
)
from hotswapd.responses import Echo, chunk, completion_body, logprobs_json, sse, usage_chunk

SEQ = 64


def tok(s: str) -> list[int]:
    return list(s.encode())


def render(msgs: list[dict[str, str]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in msgs)


def comp(**body: Any) -> Call:
    return parse_completion({"prompt": "hi", **body}, tok, SEQ, 4)


def chat(**body: Any) -> Call:
    return parse_chat({"messages": [{"role": "user", "content": "hi"}], **body}, render, tok, SEQ, 4)


def refused(fn: Any, body: dict[str, Any], param: str | None, code: str | None = None) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(**body)
    err = info.value
    assert err.status == 400 and err.param == param and err.code == code, err.body()
    return err


# ---- parse_json -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, words",
    [(b"\xff\xfe{}", "UTF-8"), (b"", "empty"), (b"  \n", "empty"), (b'{"a": NaN}', "NaN"),
     (b'{"a": -Infinity}', "Infinity"), (b"[" * 100000, "nested"), (b"[1, 2]", "list"),
     (b'"s"', "str"), (b"{", "not valid JSON")],
)  # fmt: skip
def test_parse_json_refuses(raw: bytes, words: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_json(raw)
    assert info.value.status == 400 and words in info.value.message


def test_parse_json_accepts_object() -> None:
    assert parse_json('{"prompt": "é", "n": 1.5}'.encode()) == {"prompt": "é", "n": 1.5}


# ---- parse_completion -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, expected",
    [("ab", [[97, 98]]), (["a", "bc"], [[97], [98, 99]]), ([5, 6], [[5, 6]]), ([[1], [2, 3]], [[1], [2, 3]])],
)
def test_prompt_forms(prompt: Any, expected: list[list[int]]) -> None:
    call = comp(prompt=prompt)
    assert call.prompts == expected and call.params.max_tokens == 16 and not call.stream


@pytest.mark.parametrize("prompt", [None, True, 3, {"a": 1}, [], ["a", 1], [[]], [1.5], [-1], ["a"] * 5])
def test_prompt_refused(prompt: Any) -> None:
    refused(comp, {"prompt": prompt}, "prompt")


@pytest.mark.parametrize("value", [True, 2.0, -1, 0, 10**9, SEQ - 1])
def test_max_tokens_refused(value: Any) -> None:
    code = "context_length_exceeded" if value == SEQ - 1 else None  # 2 prompt tokens + 63 > 64
    refused(comp, {"max_tokens": value}, "max_tokens", code)


def test_max_tokens_fills_context_exactly() -> None:
    assert comp(max_tokens=SEQ - 2).params.max_tokens == SEQ - 2


@pytest.mark.parametrize("n", [SEQ, SEQ + 10])
def test_prompt_alone_too_long(n: int) -> None:
    refused(comp, {"prompt": [1] * n}, "prompt", "context_length_exceeded")
    refused(chat, {"messages": [{"role": "u", "content": "x" * n}]}, "messages", "context_length_exceeded")


@pytest.mark.parametrize(
    "name, value",
    [("temperature", -0.1), ("temperature", 2.5), ("temperature", True), ("temperature", "1"),
     ("temperature", float("inf")), pytest.param("temperature", 10**400, id="temperature-huge-int"),
     ("top_p", 0), ("top_p", 1.01),
     ("top_p", float("nan")), ("top_p", False), ("seed", 2**64), ("seed", -(2**63) - 1), ("seed", 1.0)],
)  # fmt: skip
def test_sampling_numbers_refused(name: str, value: Any) -> None:
    refused(comp, {name: value}, name)


def test_sampling_values_kept() -> None:
    p = comp(temperature=0, top_p=0.5, seed=2**64 - 1, stop="\n").params
    assert (p.temperature, p.top_p, p.seed, p.stop) == (0.0, 0.5, 2**63 - 1, ("\n",))
    assert comp().params.temperature == 1.0 and comp().params.seed is None
    for seed in (-1, -(2**63), -12345):
        assert 0 <= comp(seed=seed).params.seed < 2**63
    assert comp(seed=-1).params.seed != comp(seed=-2).params.seed


@pytest.mark.parametrize(
    "name, value",
    [("top_k", -2), ("top_k", 1.5), ("top_k", True), ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", "2"),
     ("ignore_eos", 1), ("ignore_eos", "true")],
)  # fmt: skip
def test_vllm_extensions_refused(name: str, value: Any) -> None:
    refused(comp, {"max_tokens": 16, name: value}, name)


def test_vllm_extensions_kept() -> None:
    """What load generators written for vLLM send: ``ignore_eos``, ``min_tokens``, ``top_k`` (-1 and 0: off)."""
    p = comp(max_tokens=16, top_k=40, min_tokens=16, ignore_eos=True).params
    assert (p.top_k, p.min_tokens, p.ignore_eos) == (40, 16, True)
    assert (comp().params.top_k, comp().params.min_tokens, comp().params.ignore_eos) == (0, 0, False)
    assert comp(top_k=-1).params.top_k == 0 and comp(ignore_eos=None).params.ignore_eos is False


def test_model_generation_config_fills_what_the_request_omits() -> None:
    """As vLLM: the model's recommended temperature/top_p/top_k for a body that leaves them out, else OpenAI's."""
    defaults = {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    p = parse_completion({"prompt": "hi"}, tok, SEQ, 4, defaults).params
    assert (p.temperature, p.top_p, p.top_k) == (0.7, 0.8, 20)
    p = parse_completion({"prompt": "hi", "temperature": 0, "top_p": 1, "top_k": -1}, tok, SEQ, 4, defaults).params
    assert (p.temperature, p.top_p, p.top_k) == (0.0, 1.0, 0)
    p = parse_chat({"messages": [{"role": "user", "content": "x"}]}, render, tok, SEQ, 4, defaults).params
    assert (p.temperature, p.top_p, p.top_k) == (0.7, 0.8, 20)


@pytest.mark.parametrize("stop", [["a", "b", "c", "d", "e"], "", ["a", ""], [1], {"a": "b"}, 5])
def test_stop_refused(stop: Any) -> None:
    refused(comp, {"stop": stop}, "stop")


def test_stop_list_kept() -> None:
    assert comp(stop=["a", "b", "c", "d"]).params.stop == ("a", "b", "c", "d")


@pytest.mark.parametrize(
    "body, stream, usage",
    [({}, False, False), ({"stream": None}, False, False), ({"stream": True}, True, False),
     ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
     ({"stream": False, "stream_options": None}, False, False)],
)  # fmt: skip
def test_stream_accepted(body: dict[str, Any], stream: bool, usage: bool) -> None:
    call = comp(**body)
    assert (call.stream, call.include_usage) == (stream, usage)


@pytest.mark.parametrize(
    "body, param",
    [({"stream": "yes"}, "stream"), ({"stream": 1}, "stream"),
     ({"stream_options": {"include_usage": True}}, "stream_options"),
     ({"stream": False, "stream_options": {}}, "stream_options"),
     ({"stream": True, "stream_options": {"include_usage": "y"}}, "stream_options"),
     ({"stream": True, "stream_options": [1]}, "stream_options")],
)  # fmt: skip
def test_stream_refused(body: dict[str, Any], param: str) -> None:
    refused(comp, body, param)


@pytest.mark.parametrize(
    "name, value",
    [("best_of", 3), ("suffix", "x"), ("tools", [{}])],
)  # fmt: skip
def test_unsupported_parameters_refused(name: str, value: Any) -> None:
    err = refused(comp, {name: value}, name, "unsupported_parameter")
    assert name in err.message
    refused(chat, {name: value}, name, "unsupported_parameter")


def test_logit_bias() -> None:
    """Token ids (JSON keys) to a bias in [-100, 100], for completions and chat, each id inside the vocabulary."""
    assert comp(logit_bias={"7": -100, "0003": 2.5}).params.logit_bias == ((3, 2.5), (7, -100.0))
    assert chat(logit_bias={"1": 100}).params.adjusted and not comp(logit_bias={}).params.adjusted
    in_vocab = parse_completion({"prompt": "hi", "logit_bias": {"255": 1}}, tok, SEQ, 4, vocab_size=256)
    assert in_vocab.params.logit_bias == ((255, 1.0),)
    for bad_value in ([1], "x", {"a": 1}, {"-1": 1}, {"1.5": 1}, {"¹": 1}, {"1": 101}, {"1": "2"}, {"1": True},
                      {"1": None}, {"99999999999": 1}, {"1": 10**400}, {"1": float("nan")},
                      {"1": 1, "01": 2}):  # fmt: skip
        refused(comp, {"logit_bias": bad_value}, "logit_bias")
    with pytest.raises(ApiError, match="outside this model's vocabulary"):
        parse_chat({"messages": [{"role": "user", "content": "x"}], "logit_bias": {"256": 1}}, render, tok, SEQ, 4,
                   vocab_size=256)  # fmt: skip


def test_echo() -> None:
    """Completions' ``echo``: the prompt's own string kept (None for token ids), its log-probabilities asked with
    the completion's; ``max_tokens: 0`` only with it (the prompt alone, one token run). Chat has no echo."""
    call = comp(prompt=["ab", [7, 8, 9]], echo=True, logprobs=2, max_tokens=0)
    assert (call.echo, call.texts, call.completion) == (True, ("ab", None), False)
    assert (call.params.max_tokens, call.params.prompt_logprobs, call.params.logprobs) == (1, 2, 2)
    assert comp(echo=True, max_tokens=1).completion and comp(echo=True).params.prompt_logprobs is None
    assert not comp(echo=False).echo and comp(logprobs=3).params.prompt_logprobs is None
    assert not comp(echo=True, max_completion_tokens=0, max_tokens=5).completion  # the newer name wins
    refused(comp, {"max_tokens": 0}, "max_tokens")  # without echo there would be nothing to show
    refused(comp, {"echo": True, "max_tokens": -1}, "max_tokens")
    for bad_value in (1, "true", [True]):
        refused(comp, {"echo": bad_value}, "echo")
    refused(chat, {"echo": True}, "echo", "unsupported_parameter")


def test_neutral_and_unknown_fields_accepted() -> None:
    body = {"n": 1, "logprobs": None, "echo": False, "logit_bias": {}, "user": "u", "foo": [1], "model": "m"}
    assert comp(**body).prompts == [[104, 105]] and comp(**body).params.logprobs is None
    assert chat(logprobs=False, n=None).params.logprobs is None


def test_logprobs_parameters() -> None:
    """Completions: ``logprobs`` k in [0, 20] (0: the chosen token's alone). Chat: ``logprobs`` true/false and
    ``top_logprobs`` k, which needs it."""
    assert [comp(logprobs=k).params.logprobs for k in (0, 5, 20)] == [0, 5, 20]
    assert chat(logprobs=True).params.logprobs == 0 and chat(logprobs=True, top_logprobs=3).params.logprobs == 3
    assert chat(logprobs=1, top_logprobs=20).params.logprobs == 20
    for bad_value in (-1, 21, True, "3", 1.5):
        refused(comp, {"logprobs": bad_value}, "logprobs")
    for bad_value in (2, "yes", [True]):
        refused(chat, {"logprobs": bad_value}, "logprobs")
    refused(chat, {"top_logprobs": 2}, "top_logprobs")  # without logprobs: true
    assert chat(top_logprobs=0).params.logprobs is None  # 0: none, a client's default
    refused(chat, {"logprobs": False, "top_logprobs": 2}, "top_logprobs")
    refused(chat, {"logprobs": True, "top_logprobs": 21}, "top_logprobs")


def test_penalties() -> None:
    p = comp(presence_penalty=0.5, frequency_penalty=-2, repetition_penalty=1.2).params
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.adjusted) == (0.5, -2.0, 1.2, True)
    assert not comp(presence_penalty=0, frequency_penalty=0.0, repetition_penalty=1).params.adjusted
    assert chat(frequency_penalty=1).params.frequency_penalty == 1.0
    for name, value in (
        ("presence_penalty", 2.5),
        ("frequency_penalty", -3),
        ("frequency_penalty", "1"),
        ("repetition_penalty", 0),
        ("repetition_penalty", 11),
        ("repetition_penalty", True),
    ):
        refused(comp, {name: value}, name)  # fmt: skip


def test_n_choices_and_their_seeds() -> None:
    """``n`` choices per prompt, prompt by prompt; a seeded request's choice j draws from seed + j; every choice
    of a request must fit the engine's rows at once (``max_prompts``: 4 here)."""
    call = comp(prompt=["ab", "c"], n=2, seed=2**63 - 1, temperature=1)
    assert [(ids, p.seed) for ids, p in call.choices()] == [
        ([97, 98], 2**63 - 1),
        ([97, 98], 0),
        ([99], 2**63 - 1),
        ([99], 0),
    ]
    assert [p.seed for _, p in comp(n=3).choices()] == [None] * 3
    assert len(chat(n=4).choices()) == 4
    for bad_value in (0, 5, True, "2"):
        refused(comp, {"n": bad_value}, "n")
    err = refused(comp, {"prompt": ["a", "b", "c"], "n": 2}, "n")
    assert "3 prompts x n=2 is 6 choices; at most 4" in err.message
    refused(chat, {"n": 5}, "n")


@pytest.mark.parametrize("model", [1, ["m"], {"id": "m"}, True])
def test_model_must_be_string(model: Any) -> None:
    refused(comp, {"model": model}, "model")
    refused(chat, {"model": model}, "model")


# ---- parse_chat -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "messages, param",
    [(None, "messages"), ([], "messages"), ("hi", "messages"), ({"role": "user"}, "messages"),
     (["hi"], "messages[0].role"), ([{"content": "x"}], "messages[0].role"),
     ([{"role": "user", "content": "x"}, {"role": 1, "content": "y"}], "messages[1].role"),
     ([{"role": "user", "content": None}], "messages[0].content"),
     ([{"role": "user"}], "messages[0].content"), ([{"role": "user", "content": 5}], "messages[0].content"),
     ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}], "messages[0].content"),
     ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "messages[0].content")],
)  # fmt: skip
def test_chat_messages_refused(messages: Any, param: str) -> None:
    refused(chat, {"messages": messages}, param)


def test_chat_content_and_defaults() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    call = chat(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": parts}])
    assert call.prompts == [tok("<system>s<user>ab")]
    assert call.params.max_tokens == SEQ - len(call.prompts[0])  # default: the room left
    assert chat(max_completion_tokens=7).params.max_tokens == 7
    refused(chat, {"max_completion_tokens": SEQ}, "max_completion_tokens", "context_length_exceeded")


# ---- errors and responses -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "status, kind",
    [(400, "invalid_request_error"), (403, "permission_error"), (404, "not_found_error"),
     (429, "rate_limit_error"), (503, "service_unavailable_error"), (500, "server_error")],
)  # fmt: skip
def test_error_body(status: int, kind: str) -> None:
    body = ApiError(status, "msg", param="p", code="c").body()
    assert body == {"error": {"message": "msg", "type": kind, "param": "p", "code": "c"}}


AD = AdapterVersion("v7", "ab" * 32, "directory")


def result(text: str, ids: int, prompt: int, reason: str) -> GenerationResult:
    return GenerationResult(text, tuple(range(ids)), prompt, reason, AD, 0.1, 0.2)


RESULTS = [result("x", 2, 3, "length"), result("yz", 4, 5, "stop"), result("", 1, 2, "cancelled")]
USAGE = {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}


@pytest.mark.parametrize("is_chat", [False, True])
def test_completion_body(is_chat: bool) -> None:
    body = completion_body("rid", "m", RESULTS, is_chat, str)
    assert body["object"] == ("chat.completion" if is_chat else "text_completion")
    assert (body["id"], body["model"], body["usage"]) == ("rid", "m", USAGE) and isinstance(body["created"], int)
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "stop", "stop"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    texts = [c["message"]["content"] if is_chat else c["text"] for c in body["choices"]]
    assert texts == ["x", "yz", ""]
    if is_chat:
        assert all(c["message"]["role"] == "assistant" for c in body["choices"])
    assert body["adapter"] == {"version": "v7", "sha256": "ab" * 32, "source": "directory"}
    json.dumps(body)


def test_chunks() -> None:
    first = chunk("rid", "m", AD, True, 0, "he", None, first=True)
    assert first["object"] == "chat.completion.chunk" and first["adapter"]["version"] == "v7"
    assert first["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": "he"}, "logprobs": None,
                                 "finish_reason": None}]  # fmt: skip
    assert chunk("rid", "m", AD, True, 1, "y", None)["choices"][0]["delta"] == {"content": "y"}
    last = chunk("rid", "m", AD, True, 1, None, "length")["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "length"
    text = chunk("rid", "m", AD, False, 2, None, "stop")
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == ""
    assert text["choices"][0]["index"] == 2 and text["choices"][0]["finish_reason"] == "stop"
    for is_chat, obj in ((True, "chat.completion.chunk"), (False, "text_completion")):
        u = usage_chunk("rid", "m", is_chat, RESULTS)
        assert u["object"] == obj and u["choices"] == [] and u["usage"] == USAGE


def test_logprobs_and_n_in_bodies_and_chunks() -> None:
    texts = {1: "a", 2: "é", 3: "<eos>"}
    entries = (TokenLogprob(1, -0.5, ((1, -0.5), (2, -1.25)), 0), TokenLogprob(2, -2.0, ((1, -0.1), (3, -1.0)), 1))
    answers = [dataclasses.replace(result("aé", 2, 3, "length"), logprobs=entries) for _ in range(2)]
    body = completion_body("rid", "m", answers, False, texts.__getitem__, 2)
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}  # one prompt, n=2
    assert body["choices"][1]["logprobs"] == {
        "tokens": ["a", "é"],
        "token_logprobs": [-0.5, -2.0],
        "top_logprobs": [{"a": -0.5, "é": -1.25}, {"a": -0.1, "<eos>": -1.0, "é": -2.0}],  # the chosen one too
        "text_offset": [0, 1],
    }
    chat_body = completion_body("rid", "m", answers[:1], True, texts.__getitem__)
    assert chat_body["choices"][0]["logprobs"]["content"][1] == {
        "token": "é", "logprob": -2.0, "bytes": [195, 169],
        "top_logprobs": [{"token": "a", "logprob": -0.1, "bytes": [97]},
                         {"token": "<eos>", "logprob": -1.0, "bytes": [60, 101, 111, 115, 62]}],
    }  # fmt: skip
    assert completion_body("rid", "m", RESULTS, True, str)["choices"][0]["logprobs"] is None
    streamed = chunk("rid", "m", AD, True, 1, "é", None, logprobs=logprobs_json(entries[1:], True, texts.__getitem__))
    assert streamed["choices"][0]["logprobs"]["content"][0]["token"] == "é"
    assert usage_chunk("rid", "m", False, answers, 2)["usage"]["prompt_tokens"] == 3
    json.dumps(body), json.dumps(chat_body)


def test_echoed_prompts_lead_their_completions() -> None:
    """An echoed choice: the prompt's text, then the completion's; its tokens' log-probabilities first (the first
    token none), the completion's offsets moved past the prompt; ``n`` choices share their prompt's echo."""
    texts = {1: "a", 2: "é", 3: "<eos>", 4: "xy"}
    echo = Echo.of(None, [4, 2, 1], lambda ids: "".join(texts[t] for t in ids), offsets=True)
    assert (echo.text, echo.ids, echo.offsets) == ("xyéa", (4, 2, 1), (0, 2, 3))
    assert Echo.of("own", [4], str, offsets=False) == Echo("own", (4,))
    entries = (TokenLogprob(3, -0.25, ((3, -0.25),), 0),)
    scored = ((-1.5, ((1, -0.5),)), (-0.75, ((1, -0.75), (3, -2.0))))
    answer = dataclasses.replace(result("<eos>", 1, 3, "length"), logprobs=entries, prompt_logprobs=scored)
    body = completion_body("rid", "m", [answer, answer], False, texts.__getitem__, 2, [echo])
    assert [c["text"] for c in body["choices"]] == ["xyéa<eos>"] * 2
    assert body["choices"][1]["logprobs"] == {
        "tokens": ["xy", "é", "a", "<eos>"],
        "token_logprobs": [None, -1.5, -0.75, -0.25],
        "top_logprobs": [None, {"a": -0.5, "é": -1.5}, {"a": -0.75, "<eos>": -2.0}, {"<eos>": -0.25}],
        "text_offset": [0, 2, 3, 4],
    }
    plain = dataclasses.replace(answer, logprobs=None, prompt_logprobs=None)
    assert completion_body("rid", "m", [plain], False, str, 1, [echo])["choices"][0]["logprobs"] is None
    json.dumps(body)


def test_sse() -> None:
    assert sse("[DONE]") == b"data: [DONE]\n\n"
    raw = sse({"a": "é"})
    assert raw.startswith(b"data: ") and raw.endswith(b"\n\n") and json.loads(raw[6:]) == {"a": "é"}


# ---- property: no body crashes the parser ---------------------------------------------------------
FIELDS = [
    "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream",
    "stream_options", "model", "n", "best_of", "logprobs", "echo", "logit_bias", "suffix", "response_format",
]  # fmt: skip
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=6), kids, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON, max_size=6), st.booleans())
def test_any_body_is_a_call_or_a_400(body: dict[str, Any], with_prompt: bool) -> None:
    if with_prompt:
        body.setdefault("prompt", "hello")
    body = json.loads(json.dumps(body))  # exactly what could arrive on the wire
    try:
        call = parse_completion(body, tok, SEQ, 4)
    except ApiError as err:
        assert err.status == 400 and err.body()["error"]["type"] == "invalid_request_error"
    else:
        assert isinstance(call, Call) and 1 <= call.params.max_tokens <= SEQ - max(map(len, call.prompts))
        assert 1 <= len(call.choices()) <= 4 and (call.params.logprobs is None or 0 <= call.params.logprobs <= 20)


@pytest.mark.parametrize("prompt", [[1_000_000, 5], [[5], [259]], [[3, 4], [300, 2]]])
def test_token_ids_outside_the_vocabulary_are_refused_before_anything_runs(prompt: Any) -> None:
    """A 400 naming the id, not a failure mid-stream (an id past the embedding is an out-of-bounds read)."""
    with pytest.raises(ApiError) as caught:
        parse_completion({"prompt": prompt, "stream": True}, tok, SEQ, 4, None, 259)
    assert caught.value.status == 400 and caught.value.param == "prompt"
    assert "outside this model's vocabulary (0 to 258)" in str(caught.value)
    assert parse_completion({"prompt": [[5], [258]]}, tok, SEQ, 4, None, 259).prompts == [[5], [258]]


def test_tokenize_requests() -> None:
    assert parse_tokenize({"prompt": "hi"}) == Tokenize("hi", None, None, False)  # as a completion runs it
    assert parse_tokenize({"prompt": "", "add_special_tokens": True, "return_token_strs": True}) == Tokenize(
        "", None, True, True
    )
    chat = parse_tokenize({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]})
    assert chat == Tokenize(None, [{"role": "user", "content": "a"}], None, False)
    for body, param in (
        ({}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": False}, "add_generation_prompt"),
        ({"prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
        ({"prompt": "a", "model": 3}, "model"),
    ):
        with pytest.raises(ApiError) as err:
            parse_tokenize(body)
        assert err.value.status == 400 and err.value.param == param, (body, err.value.message)


def test_detokenize_requests() -> None:
    assert parse_detokenize({"tokens": [1, 2, 255]}, 256) == [1, 2, 255]
    assert parse_detokenize({"tokens": []}, 256) == []
    for body, needle in (
        ({"tokens": [256]}, "outside this model's vocabulary (0 to 255)"),
        ({"tokens": [-1]}, "list of token ids"),
        ({"tokens": [True]}, "list of token ids"),
        ({"tokens": "1 2"}, "list of token ids"),
        ({}, "list of token ids"),
    ):
        with pytest.raises(ApiError) as err:
            parse_detokenize(body, 256)
        assert err.value.param == "tokens" and needle in err.value.message, (body, err.value.message)
