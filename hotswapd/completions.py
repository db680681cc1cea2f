"""The OpenAI-compatible completion endpoints: ``/v1/completions`` and ``/v1/chat/completions``.

A request is parsed, chat-templated and tokenised on a small thread pool (never on the event loop), submitted
to the engine as one group (its prompts start together, so on one adapter version), and answered whole or
streamed as server-sent events. Generation runs on the engine's worker thread; its starts, text deltas and
results come back through ``call_soon_threadsafe`` in order. A client that disconnects cancels its generation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiohttp import web

from hotswap_core.engine import Engine, EngineBusy, EngineStopped
from hotswap_core.generation import GenerationRequest, GenerationResult, Scored, TokenLogprob
from hotswap_core.metrics import Metrics
from hotswap_core.slots import AdapterVersion
from hotswapd import protocol, responses
from hotswapd.protocol import ApiError, Call
from hotswapd.state import ServingState

log = logging.getLogger("hotswapd.server")

T = TypeVar("T")
_PARSE_THREADS = 2  # request parsing and tokenisation; a request waits its turn in this pool's queue


class Completions:
    """The completion handlers, and the count of requests in flight (what a drain waits for)."""

    def __init__(self, state: ServingState, engine: Engine, metrics: Metrics) -> None:
        self.state, self.engine, self.metrics = state, engine, metrics
        self.inflight = 0
        self._parsers = ThreadPoolExecutor(_PARSE_THREADS, thread_name_prefix="hotswapd-tokenize")

    def close(self) -> None:
        self._parsers.shutdown(wait=False, cancel_futures=True)

    async def complete(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        raw = await request.read()

        def parse() -> tuple[protocol.Call, list[responses.Echo]]:
            body = protocol.parse_json(raw)
            call = protocol.parse_completion(
                body,
                self._tokenize,
                self.engine.max_seq_len,
                self.engine.max_batch_size,
                self.engine.sampling_defaults,
                self.engine.vocab_size,
            )
            if not call.echo:
                return call, []
            scored, decode, runs_as = call.params.logprobs is not None, self.engine.detokenize, self.engine.prompt_ids
            return call, [
                responses.Echo.of(text, runs_as(ids), decode, scored)  # an empty prompt runs as BOS: scored as such
                for text, ids in zip(call.texts, call.prompts, strict=True)
            ]

        call, echoes = await self._off_loop(parse)
        return await self._serve(request, call, chat=False, prefix="cmpl", echoes=echoes)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        if not getattr(self.engine.tokenizer, "chat_template", None):
            raise ApiError(
                404, "this model's tokenizer has no chat template; use /v1/completions", code="no_chat_template"
            )
        raw = await request.read()

        def parse() -> protocol.Call:
            body = protocol.parse_json(raw)
            return protocol.parse_chat(
                body,
                self._render_chat,
                self._tokenize,
                self.engine.max_seq_len,
                self.engine.max_batch_size,
                self.engine.sampling_defaults,
                self.engine.vocab_size,
            )

        call = await self._off_loop(parse)
        return await self._serve(request, call, chat=True, prefix="chatcmpl")

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize (vLLM's): the token ids of a ``prompt``, or of chat ``messages`` rendered as
        /v1/chat/completions renders them. Without ``add_special_tokens``, the ids a completion would run: its
        ``count`` is what ``usage.prompt_tokens`` would say."""
        self._require_ready()
        raw = await request.read()

        def work() -> dict[str, Any]:
            call = protocol.parse_tokenize(protocol.parse_json(raw))
            tokenizer = self.engine.tokenizer
            if call.messages is not None:
                if not getattr(tokenizer, "chat_template", None):
                    raise ApiError(404, "this model's tokenizer has no chat template", code="no_chat_template")
                text = self._render_chat(call.messages)
                ids = list(tokenizer.encode(text, add_special_tokens=bool(call.add_special_tokens)))
            elif call.add_special_tokens is None:
                ids = self.engine.prompt_ids(call.prompt or "")  # as a completion runs it (empty: BOS)
            else:
                ids = list(tokenizer.encode(call.prompt, add_special_tokens=call.add_special_tokens))
            strs = list(tokenizer.convert_ids_to_tokens(ids)) if call.token_strs else None
            return {"count": len(ids), "max_model_len": self.engine.max_seq_len, "tokens": ids, "token_strs": strs}

        return web.json_response(await self._off_loop(work))

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize (vLLM's): ``tokens`` as text, special tokens included."""
        self._require_ready()
        raw = await request.read()

        def work() -> dict[str, Any]:
            ids = protocol.parse_detokenize(protocol.parse_json(raw), self.engine.vocab_size)
            return {"prompt": str(self.engine.tokenizer.decode(ids))}

        return web.json_response(await self._off_loop(work))

    async def _off_loop(self, work: Callable[[], T]) -> T:
        """JSON parsing, chat templating and tokenisation on the request threads, never on the event loop (a
        4 MB prompt takes milliseconds to tokenise; every other connection would wait that long); and so the
        building of a body with log-probabilities (up to 21 entries a token)."""
        return await asyncio.get_running_loop().run_in_executor(self._parsers, work)

    def _require_ready(self) -> None:
        # While draining, a request on a connection accepted before the stop is still served (the drain
        # waits for it, bounded by server.drain_timeout_s): under socket activation its client cannot
        # know the connection was not left in systemd's backlog for the next process. Only once the
        # engine has stopped is it refused (EngineStopped -> 503 draining).
        if not self.state.ready:
            raise ApiError(503, "the model is still loading", code="starting", headers={"Retry-After": "5"})

    def _tokenize(self, text: str) -> list[int]:
        return list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    def _render_chat(self, messages: list[dict[str, str]]) -> str:
        try:
            return str(self.engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        except Exception as exc:  # jinja raises anything (TemplateError, exceptions raised by the template)
            raise protocol.bad(f"the chat template cannot render these messages: {exc}", "messages") from exc

    async def _serve(
        self, request: web.Request, call: Call, *, chat: bool, prefix: str, echoes: list[responses.Echo] | None = None
    ) -> web.StreamResponse:
        """``echoes``: the prompts shown before their completions (``call.echo``), one per prompt."""
        loop = asyncio.get_running_loop()
        # One ordered queue of ("start", i, version), ("prompt", i, log-probabilities), ("text", i, (delta,
        # logprobs)) and ("done", i, future) from the worker thread: call_soon_threadsafe keeps their order, so a
        # row's prompt precedes its text, and its text its done.
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()

        def post(kind: str, index: int, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, index, value))

        def post_text(index: int, text: str, logprobs: tuple[TokenLogprob, ...]) -> None:
            post("text", index, (text, logprobs))

        # A whole answer needs none of these events: its futures alone wake the event loop, once each (every
        # wake-up from the worker costs the loop a turn, and the worker the GIL, mid-step).
        reqs = [
            GenerationRequest(
                ids,
                params,
                on_text=functools.partial(post_text, i) if call.stream else None,
                on_start=functools.partial(post, "start", 0) if call.stream and i == 0 else None,
                on_prompt=functools.partial(post, "prompt", i) if call.stream and call.echo else None,
            )
            for i, (ids, params) in enumerate(call.choices())
        ]
        # Everything the loop does for this request is done before it is submitted: the worker wakes at once
        # and would wait for the GIL while the loop still held it.
        if call.stream:
            for i, r in enumerate(reqs):
                r.future.add_done_callback(functools.partial(post, "done", i))
        answers = [] if call.stream else [asyncio.wrap_future(r.future) for r in reqs]
        rid = responses.new_id(prefix)
        try:
            self.engine.submit_group(reqs)
        except (EngineBusy, EngineStopped) as exc:
            for r in reqs:
                r.future.cancel()  # never ran: its wrapped future ends cancelled, not pending
            if isinstance(exc, EngineBusy):
                raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from exc
            raise ApiError(503, str(exc), code="draining", headers={"Retry-After": "1"}) from exc
        self.inflight += 1
        self.metrics.inflight.inc()
        try:
            async with asyncio.timeout(self.state.config.request_timeout_s):
                if call.stream:
                    return await self._stream(request, rid, call, chat, events, echoes)
                results = [_shown(call, r) for r in await asyncio.gather(*answers)]
                self.metrics.observe_completions(results, call.n)

                def build() -> dict[str, Any]:
                    model, text = self.state.model_id, self.engine.token_text
                    return responses.completion_body(rid, model, results, chat, text, call.n, echoes)

                body = build() if call.params.logprobs is None else await self._off_loop(build)
                return web.json_response(
                    body, headers={"X-Hotswapd-Adapter": responses.adapter_header(results[0].adapter)}
                )
        except TimeoutError as exc:
            raise ApiError(504, f"generation took longer than server.request_timeout_s "
                                f"({self.state.config.request_timeout_s:g} s)", code="timeout") from exc  # fmt: skip
        except ValueError as exc:  # a prompt the engine refused (length): the client's problem
            raise protocol.bad(str(exc), "prompt") from exc
        finally:
            for r in reqs:
                r.cancelled.set()  # no-op when finished; stops generation when the client went away
            self.inflight -= 1
            self.metrics.inflight.dec()

    async def _stream(
        self,
        request: web.Request,
        rid: str,
        call: Call,
        chat: bool,
        events: asyncio.Queue[tuple[str, int, Any]],
        echoes: list[responses.Echo] | None,
    ) -> web.StreamResponse:
        # Headers wait for the batch to start: only then is the adapter version known (and fixed).
        kind, _, value = await events.get()
        if kind != "start":
            value.result()  # a request the engine refused raises here, before any byte is sent
            raise ApiError(500, "generation ended before it started", code="internal_error")
        adapter: AdapterVersion = value
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Hotswapd-Adapter": responses.adapter_header(adapter),
            }
        )
        await response.prepare(request)

        def event(
            index: int, text: str | None, finish: str | None = None, first: bool = False, logprobs: Any = None
        ) -> bytes:
            chunk = responses.chunk(
                rid, self.state.model_id, adapter, chat, index, text, finish, first=first, logprobs=logprobs
            )
            return responses.sse(chunk)

        def prompt_event(index: int, echo: responses.Echo, scored: tuple[Scored, ...]) -> bytes:
            return event(index, echo.text, logprobs=echo.logprobs_json(scored, self.engine.token_text))

        async def send(
            index: int, text: str | None, finish: str | None = None, first: bool = False, logprobs: Any = None
        ) -> None:
            await response.write(event(index, text, finish, first, logprobs))

        choices = len(call.prompts) * call.n
        if chat:
            for i in range(choices):
                await send(i, "", first=True)
        results: dict[int, GenerationResult] = {}
        wanted, token_text = call.params.logprobs is not None, self.engine.token_text
        while len(results) < choices:
            kind, i, value = await events.get()
            echo = echoes[i // call.n] if echoes else None
            if kind == "prompt" and echo is not None:  # an echoed prompt leads its choice, as in a whole answer
                if value is None:
                    await send(i, echo.text)
                else:  # a prompt's entries (up to 21 a token) are built on the request threads, as a whole body's
                    await response.write(await self._off_loop(functools.partial(prompt_event, i, echo, value)))
            elif kind == "text" and call.completion:
                text, entries = value
                shift = len(echo.text) if echo is not None else 0  # offsets count from the echoed prompt's start
                logprobs = responses.logprobs_json(entries, chat, token_text, shift) if wanted else None
                await send(i, text, logprobs=logprobs)
            elif kind == "done":
                try:
                    results[i] = _shown(call, value.result())
                except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                    log.warning("streamed generation failed: %s", exc)
                    await response.write(responses.sse(ApiError(500, f"generation failed: {exc}").body()))
                    return response
                await send(i, None, responses.finish_reason(results[i]))
        ordered = [results[i] for i in sorted(results)]
        self.metrics.observe_completions(ordered, call.n)
        if call.include_usage:
            await response.write(responses.sse(responses.usage_chunk(rid, self.state.model_id, chat, ordered, call.n)))
        await response.write(responses.sse("[DONE]"))
        await response.write_eof()
        return response


def _shown(call: Call, result: GenerationResult) -> GenerationResult:
    """What a response shows of a result: ``max_tokens: 0`` (``echo``) shows the prompt alone, as OpenAI did;
    the one token run is left out, from the text, the log-probabilities and ``usage``."""
    if call.completion:
        return result
    return dataclasses.replace(
        result, text="", token_ids=(), logprobs=None if result.logprobs is None else (), finish_reason="length"
    )
