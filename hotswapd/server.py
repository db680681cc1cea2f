"""HTTP/1.1 over the Unix socket (aiohttp): health, OpenAI-compatible completions, adapters, admin.

Handlers run on the daemon's event loop; generation runs on the engine's worker thread and comes
back through ``call_soon_threadsafe``. A client that disconnects cancels its generation (aiohttp's
``handler_cancellation``). Errors are OpenAI-shaped JSON, never a traceback.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.exposition import choose_encoder

from hotswap_core.config import ServerConfig
from hotswap_core.engine import Engine, EngineBusy, EngineStopped
from hotswap_core.errors import SwapError
from hotswap_core.generation import GenerationRequest, GenerationResult
from hotswap_core.metrics import Metrics
from hotswap_core.slots import AdapterVersion
from hotswap_core.swap import Swapper
from hotswapd import protocol
from hotswapd.events import EventBus
from hotswapd.protocol import ApiError, Call
from hotswapd.unix_socket import peer_uid

log = logging.getLogger("hotswapd.server")

_ENDPOINTS = {
    "/v1/completions": "completions",
    "/v1/chat/completions": "chat_completions",
    "/v1/models": "models",
    "/v1/adapters": "adapters",
    "/v1/adapters/events": "adapters",
    "/v1/adapters/swap": "admin",
    "/v1/adapters/rollback": "admin",
    "/v1/adapters/refresh": "admin",
    "/healthz": "health",
    "/health": "health",
    "/readyz": "health",
    "/metrics": "metrics",
}


_KEEPALIVE_S = 15.0
_PARSE_THREADS = 2  # request parsing and tokenisation; a request waits its turn in this pool's queue
# What server.listen_tcp serves: inference and health. Adapters, events and admin verbs stay on the Unix socket,
# where SO_PEERCRED says who is asking (server.admin_uids); over TCP anyone who can connect would be asking.
_TCP_ENDPOINTS = frozenset({"completions", "chat_completions", "models", "health", "metrics"})


@dataclass
class ServingState:
    """What the server reads from the daemon; swapped as a whole on reload."""

    config: ServerConfig
    ready: bool = False
    draining: bool = False


class Server:
    def __init__(
        self,
        state: ServingState,
        engine: Engine,
        swapper: Swapper,
        metrics: Metrics,
        *,
        model_id: str,
        describe_source: Callable[[], dict[str, Any]],
        events: EventBus,
        swap_roots: Callable[[], tuple[str, ...]] = tuple,
        refresh: Callable[[], dict[str, Any]] | None = None,
        serve_metrics: bool = True,
    ) -> None:
        self.state, self.engine, self.swapper, self.metrics = state, engine, swapper, metrics
        self.model_id = model_id
        self.describe_source = describe_source
        self.events = events
        self.swap_roots = swap_roots
        self.refresh = refresh
        self.inflight = 0
        self.app = web.Application(client_max_size=state.config.max_body_bytes, middlewares=[self._middleware])
        self.app.on_response_prepare.append(self._close_when_draining)
        r = self.app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/health", self.healthz)  # vLLM's name for it: what load generators and routers written for vLLM call
        r.add_get("/readyz", self.readyz)
        r.add_get("/v1/models", self.models)
        r.add_post("/v1/completions", self.completions)
        r.add_post("/v1/chat/completions", self.chat_completions)
        r.add_get("/v1/adapters", self.adapters)
        r.add_get("/v1/adapters/events", self.adapter_events)
        r.add_post("/v1/adapters/swap", self.admin_swap)
        r.add_post("/v1/adapters/rollback", self.admin_rollback)
        r.add_post("/v1/adapters/refresh", self.admin_refresh)
        if serve_metrics:
            # Also here, not only on metrics.listen: a fleet router scrapes the port it routes to (the Gateway
            # API Inference Extension's endpoint picker reads /metrics on the InferencePool's target port).
            r.add_get("/metrics", self.exposition)
        self._runner: web.AppRunner | None = None
        self._parsers = ThreadPoolExecutor(_PARSE_THREADS, thread_name_prefix="hotswapd-tokenize")
        self._sites: list[web.SockSite] = []

    # ---- lifecycle ------------------------------------------------------------------------------
    async def start(self, sock: socket.socket, tcp: socket.socket | None = None) -> None:
        """Serve on the Unix socket ``sock`` and, with ``server.listen_tcp``, the bound TCP socket ``tcp``."""
        logging.getLogger("aiohttp.server").addFilter(_quiet_client_errors)
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None, shutdown_timeout=5.0)
        await self._runner.setup()
        for listening in (sock, tcp):
            if listening is not None:
                site = web.SockSite(self._runner, listening)
                await site.start()
                self._sites.append(site)

    async def stop_accepting(self) -> None:
        """Close the listening sockets; connections already open are served until drained."""
        sites, self._sites = self._sites, []
        for site in sites:
            await site.stop()

    async def drain(self, timeout: float) -> bool:
        """Wait for in-flight completions; True if all finished within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self.inflight == 0

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self._parsers.shutdown(wait=False, cancel_futures=True)

    # ---- middleware -----------------------------------------------------------------------------
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        endpoint = _ENDPOINTS.get(request.path, "other")
        t0 = time.monotonic()
        status = 500
        try:
            if endpoint not in _TCP_ENDPOINTS and endpoint != "other" and _over_tcp(request):
                raise ApiError(403, f"{request.path} is served on the Unix socket only, not over server.listen_tcp",
                               code="unix_socket_only")  # fmt: skip
            response = await handler(request)
            status = response.status
            return response
        except ApiError as exc:
            status = exc.status
            return _error_response(exc)
        except web.HTTPException as exc:  # aiohttp's own 404 / 405 / 413, made OpenAI-shaped
            status = exc.status
            return _error_response(_from_http_exception(exc, request))
        except (asyncio.CancelledError, ConnectionResetError):
            status = 499  # client closed the connection (nginx's convention)
            raise
        except Exception:
            log.exception("unhandled error serving %s %s", request.method, request.path)
            return _error_response(ApiError(500, "internal error; see the daemon's log", code="internal_error"))
        finally:
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(time.monotonic() - t0)

    # ---- health and info ------------------------------------------------------------------------
    async def exposition(self, request: web.Request) -> web.Response:
        """GET /metrics: the same registry as the metrics listener, in the format the scraper asks for."""
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = await asyncio.get_running_loop().run_in_executor(None, encoder, self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        status, body = self.readiness()
        return web.json_response(body, status=status, headers={"Retry-After": "5"} if status == 503 else None)

    def readiness(self) -> tuple[int, dict[str, Any]]:
        """/readyz: 503 while loading or draining, else 200 with the live adapter (also read by the metrics
        listener's thread: it only reads)."""
        if self.state.draining:
            return 503, {"status": "draining"}
        if not self.state.ready:
            return 503, {"status": "starting"}
        return 200, {"status": "ready", "adapter": protocol.adapter_json(self.swapper.live)}

    async def models(self, request: web.Request) -> web.Response:
        live = self.swapper.live
        created = int(self.swapper.history.live_since or time.time())
        data = [
            {"id": self.model_id, "object": "model", "created": created, "owned_by": "hotswapd",
             "max_model_len": self.engine.max_seq_len, "adapter": protocol.adapter_json(live)},
            {"id": live.version, "object": "model", "created": created, "owned_by": "hotswapd",
             "parent": self.model_id, "adapter": protocol.adapter_json(live)},
        ]  # fmt: skip
        return web.json_response({"object": "list", "data": data})

    async def adapters(self, request: web.Request) -> web.Response:
        slots, history = self.engine.slots, self.swapper.history
        body = {
            "live": {**(protocol.version_json(self.swapper.live) or {}), "since": history.live_since},
            "standby": protocol.version_json(slots.contents[slots.standby]),
            "previous": protocol.version_json(history.previous()) if history.previous() else None,
            "history": [protocol.record_json(r) for r in history.recent(50)],
            "rejected": [
                {"path": r.path, "reason": r.reason, "message": r.message, "at": r.at}
                for r in history.rejections()[:50]
            ],
            "superseded": [protocol.superseded_json(x) for x in history.supersessions()[:50]],
            "source": self.describe_source(),
            "recompilations": self.engine.recompilations,
        }
        return web.json_response(body)

    async def adapter_events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: seen, staged, committed, rejected, failed, rolled_back, unchanged."""
        queue = self.events.subscribe()
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
            await response.prepare(request)
            await response.write(b": subscribed\n\n")
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")  # also finds a client that went away
                    continue
                if event is None:  # shutting down, or this subscriber fell too far behind
                    break
                payload = f"event: {event['event']}\nid: {event['seq']}\ndata: {json.dumps(event)}\n\n"
                await response.write(payload.encode())
        finally:
            self.events.unsubscribe(queue)
        await response.write_eof()
        return response

    # ---- admin ----------------------------------------------------------------------------------
    def _require_admin(self, request: web.Request) -> None:
        uid = peer_uid(request)
        allowed = self.state.config.admin_uids
        allowed_set = {os.getuid(), 0} if allowed is None else set(allowed)
        if uid is None or uid not in allowed_set:
            raise ApiError(403, f"uid {uid} may not change adapters (server.admin_uids)", code="forbidden")

    async def admin_swap(self, request: web.Request) -> web.Response:
        self._require_admin(request)
        body = protocol.parse_json(await request.read())
        path = body.get("path")
        if not isinstance(path, str) or not path:
            raise protocol.bad("path must be the adapter folder's absolute path", "path")
        if not os.path.isabs(path):
            raise protocol.bad(f"path must be absolute, got {path!r}", "path")
        if "\0" in path:  # os.stat raises ValueError on it: a failed swap (500) instead of a bad request
            raise protocol.bad("path must not contain a NUL byte", "path")
        real = os.path.realpath(path)
        roots = self.swap_roots()
        if not any(os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root) for root in roots):
            raise ApiError(403, f"{path} is not under server.swap_roots ({', '.join(roots) or 'none'})",
                           param="path", code="path_not_allowed")  # fmt: skip
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(None, lambda: self.swapper.swap(path, source="admin"))
        if record.result == "rejected":
            raise ApiError(422, f"adapter rejected: {record.message}", param="path", code=record.reason,
                           extra={"record": protocol.record_json(record)})  # fmt: skip
        if record.result == "failed":
            raise ApiError(
                500,
                f"swap failed: {record.message}",
                code=record.reason,
                extra={"record": protocol.record_json(record)},
            )
        return web.json_response(
            {"record": protocol.record_json(record), "live": protocol.version_json(self.swapper.live)}
        )

    async def admin_rollback(self, request: web.Request) -> web.Response:
        self._require_admin(request)
        loop = asyncio.get_running_loop()
        try:
            record = await loop.run_in_executor(None, self.swapper.rollback)
        except SwapError as exc:
            raise ApiError(409, str(exc), code="rollback_impossible") from exc
        return web.json_response(
            {"record": protocol.record_json(record), "live": protocol.version_json(self.swapper.live)}
        )

    async def admin_refresh(self, request: web.Request) -> web.Response:
        """The source looks now (a pipeline that just pushed need not wait for the next poll or rescan).
        Answers once the look is done, bounded by server.request_timeout_s; a version it found is then swapped
        in as usual (watch /v1/adapters or the events)."""
        self._require_admin(request)
        if self.refresh is None or not self.state.ready:
            raise ApiError(503, "the adapter source is not running yet", code="starting", headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.state.config.request_timeout_s):
                looked = await loop.run_in_executor(None, self.refresh)
        except TimeoutError as exc:
            raise ApiError(504, "the source's look took longer than server.request_timeout_s", code="timeout") from exc
        return web.json_response({**looked, "live": protocol.version_json(self.swapper.live)})

    # ---- completions ----------------------------------------------------------------------------
    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        raw = await request.read()

        def parse() -> protocol.Call:
            body = protocol.parse_json(raw)
            return protocol.parse_completion(
                body,
                self._tokenize,
                self.engine.max_seq_len,
                self.engine.max_batch_size,
                self.engine.sampling_defaults,
                self.engine.vocab_size,
            )

        call = await self._off_loop(parse)
        return await self._serve(request, call, chat=False, prefix="cmpl")

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        if not getattr(self.engine.tokenizer, "chat_template", None):
            raise ApiError(
                404, "this model's tokenizer has no chat template; use /v1/completions", code="no_chat_template"
            )
        raw = await request.read()

        def parse() -> protocol.Call:
            body = protocol.parse_json(raw)
            return protocol.parse_chat(
                body, self._render_chat, self._tokenize, self.engine.max_seq_len, self.engine.sampling_defaults
            )

        call = await self._off_loop(parse)
        return await self._serve(request, call, chat=True, prefix="chatcmpl")

    async def _off_loop(self, parse: Callable[[], protocol.Call]) -> protocol.Call:
        """JSON parsing, chat templating and tokenisation on the request threads, never on the event loop (a
        4 MB prompt takes milliseconds to tokenise; every other connection would wait that long)."""
        return await asyncio.get_running_loop().run_in_executor(self._parsers, parse)

    async def _close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.state.draining:  # this answer is the connection's last: no keep-alive past a SIGTERM
            response.force_close()
            response.headers["Connection"] = "close"

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

    async def _serve(self, request: web.Request, call: Call, *, chat: bool, prefix: str) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        # One ordered queue of ("start", i, version), ("text", i, delta) and ("done", i, future) from
        # the worker thread: call_soon_threadsafe keeps their order, so a row's text precedes its done.
        events: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()

        def post(kind: str, index: int, value: Any) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, index, value))

        reqs = [
            GenerationRequest(
                ids,
                call.params,
                on_text=functools.partial(post, "text", i) if call.stream else None,
                on_start=functools.partial(post, "start", 0) if i == 0 else None,
            )
            for i, ids in enumerate(call.prompts)
        ]
        try:
            futures = self.engine.submit_group(reqs)
        except EngineBusy as exc:
            raise ApiError(429, str(exc), code="queue_full", headers={"Retry-After": "1"}) from exc
        except EngineStopped as exc:
            raise ApiError(503, str(exc), code="draining", headers={"Retry-After": "1"}) from exc
        for i, fut in enumerate(futures):
            fut.add_done_callback(functools.partial(post, "done", i))
        self.inflight += 1
        self.metrics.inflight.inc()
        rid = protocol.new_id(prefix)
        try:
            async with asyncio.timeout(self.state.config.request_timeout_s):
                if call.stream:
                    return await self._stream(request, rid, call, chat, events)
                results = list(await asyncio.gather(*(asyncio.wrap_future(f) for f in futures)))
                self._observe(results)
                body = protocol.completion_body(rid, self.model_id, results, chat)
                return web.json_response(
                    body, headers={"X-Hotswapd-Adapter": protocol.adapter_header(results[0].adapter)}
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
        self, request: web.Request, rid: str, call: Call, chat: bool, events: asyncio.Queue[tuple[str, int, Any]]
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
                "X-Hotswapd-Adapter": protocol.adapter_header(adapter),
            }
        )
        await response.prepare(request)

        async def send(index: int, text: str | None, finish: str | None = None, first: bool = False) -> None:
            chunk = protocol.chunk(rid, self.model_id, adapter, chat, index, text, finish, first=first)
            await response.write(protocol.sse(chunk))

        if chat:
            for i in range(len(call.prompts)):
                await send(i, "", first=True)
        results: dict[int, GenerationResult] = {}
        while len(results) < len(call.prompts):
            kind, i, value = await events.get()
            if kind == "text":
                await send(i, value)
            elif kind == "done":
                try:
                    results[i] = value.result()
                except Exception as exc:  # headers are sent: report in-band, as OpenAI does
                    log.warning("streamed generation failed: %s", exc)
                    await response.write(protocol.sse(ApiError(500, f"generation failed: {exc}").body()))
                    return response
                await send(i, None, protocol.finish_reason(results[i]))
        ordered = [results[i] for i in sorted(results)]
        self._observe(ordered)
        if call.include_usage:
            await response.write(protocol.sse(protocol.usage_chunk(rid, self.model_id, chat, ordered)))
        await response.write(protocol.sse("[DONE]"))
        await response.write_eof()
        return response

    def _observe(self, results: list[GenerationResult]) -> None:
        for r in results:
            self.metrics.generated_tokens.inc(r.completion_tokens)
            self.metrics.ttft.observe(r.time_to_first_token_s)


def _over_tcp(request: web.Request) -> bool:
    sock = request.transport.get_extra_info("socket") if request.transport else None
    return sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6)


def _error_response(exc: ApiError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status, headers=exc.headers)


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> ApiError:
    if exc.status == 404:
        return ApiError(404, f"no such endpoint: {request.method} {request.path}", code="not_found")
    if exc.status == 405:
        return ApiError(405, f"method {request.method} is not allowed on {request.path}", code="method_not_allowed",
                        headers={"Allow": exc.headers.get("Allow", "")})  # fmt: skip
    if exc.status == 413:
        return ApiError(413, "request body is larger than server.max_body_bytes", code="body_too_large")
    return ApiError(exc.status, exc.reason or "bad request")


def _quiet_client_errors(record: logging.LogRecord) -> bool:
    """aiohttp logs a client's malformed HTTP (a huge header, garbage bytes) as ERROR with a traceback:
    one line at DEBUG instead, or any socket user could flood the journal. Our own errors pass."""
    exc = record.exc_info[1] if record.exc_info else None
    if isinstance(exc, HttpProcessingError):
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args, record.exc_info, record.exc_text = f"bad HTTP from a client: {exc}", (), None, None
        return logging.getLogger("aiohttp.server").isEnabledFor(logging.DEBUG)
    return True
