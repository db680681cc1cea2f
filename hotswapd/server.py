"""HTTP/1.1 over the Unix socket (aiohttp): the app, its routes, health and readiness, and what every request
passes through (request metrics, TCP limits, OpenAI-shaped errors, never a traceback).

The handlers are the nouns': ``completions.py`` (the OpenAI endpoints) and ``admin.py`` (adapters, events and
the admin verbs). They run on the daemon's event loop; a client that disconnects cancels its generation
(aiohttp's ``handler_cancellation``).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client.exposition import choose_encoder

from hotswap_core.engine import Engine
from hotswap_core.metrics import Metrics
from hotswap_core.swap import Swapper
from hotswapd import responses
from hotswapd.admin import AdapterRoutes
from hotswapd.completions import Completions
from hotswapd.events import EventBus
from hotswapd.protocol import ApiError
from hotswapd.state import ServingState

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
    "/tokenize": "tokenize",
    "/detokenize": "tokenize",
    "/version": "models",
}


# What server.listen_tcp serves: inference and health. Adapters, events and admin verbs stay on the Unix socket,
# where SO_PEERCRED says who is asking (server.admin_uids); over TCP anyone who can connect would be asking.
_TCP_ENDPOINTS = frozenset({"completions", "chat_completions", "models", "tokenize", "health", "metrics"})


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
        state.model_id = model_id
        self.completions = Completions(state, engine, metrics)
        self.adapters = AdapterRoutes(
            state, engine, swapper, events, describe_source=describe_source, swap_roots=swap_roots, refresh=refresh
        )
        self.app = web.Application(client_max_size=state.config.max_body_bytes, middlewares=[self._middleware])
        self.app.on_response_prepare.append(self._close_when_draining)
        r = self.app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/health", self.healthz)  # vLLM's name for it: what load generators and routers written for vLLM call
        r.add_get("/readyz", self.readyz)
        r.add_get("/v1/models", self.models)
        r.add_get("/v1/models/{model:.+}", self.model)  # a Hub id has a slash: Qwen/Qwen2.5-1.5B-Instruct
        r.add_get("/version", self.version)
        r.add_post("/tokenize", self.completions.tokenize)
        r.add_post("/detokenize", self.completions.detokenize)
        r.add_post("/v1/completions", self.completions.complete)
        r.add_post("/v1/chat/completions", self.completions.chat)
        r.add_get("/v1/adapters", self.adapters.status)
        r.add_get("/v1/adapters/events", self.adapters.event_stream)
        r.add_post("/v1/adapters/swap", self.adapters.swap)
        r.add_post("/v1/adapters/rollback", self.adapters.rollback)
        r.add_post("/v1/adapters/refresh", self.adapters.refresh)
        if serve_metrics:
            # Also here, not only on metrics.listen: a fleet router scrapes the port it routes to (the Gateway
            # API Inference Extension's endpoint picker reads /metrics on the InferencePool's target port).
            r.add_get("/metrics", self.exposition)
        self._runner: web.AppRunner | None = None
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

    @property
    def inflight(self) -> int:
        """Completion requests being answered."""
        return self.completions.inflight

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
        self.completions.close()

    # ---- middleware -----------------------------------------------------------------------------
    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        endpoint = _ENDPOINTS.get(request.path) or ("models" if request.path.startswith("/v1/models/") else "other")
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
        return 200, {"status": "ready", "adapter": responses.adapter_json(self.swapper.live)}

    def _models(self) -> list[dict[str, Any]]:
        """The base model and the live adapter version, as OpenAI's model objects."""
        live = self.swapper.live
        created = int(self.swapper.history.live_since or time.time())
        return [
            {"id": self.state.model_id, "object": "model", "created": created, "owned_by": "hotswapd",
             "max_model_len": self.engine.max_seq_len, "adapter": responses.adapter_json(live)},
            {"id": live.version, "object": "model", "created": created, "owned_by": "hotswapd",
             "parent": self.state.model_id, "adapter": responses.adapter_json(live)},
        ]  # fmt: skip

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._models()})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model} (the openai client's ``models.retrieve``): one of /v1/models' entries."""
        name = request.match_info["model"]
        found = next((m for m in self._models() if m["id"] == name), None)
        if found is None:
            served = ", ".join(m["id"] for m in self._models())
            raise ApiError(404, f"no model {name!r} here; this daemon serves {served}", param="model",
                           code="model_not_found")  # fmt: skip
        return web.json_response(found)

    async def version(self, request: web.Request) -> web.Response:
        """GET /version (vLLM's): hotswapd's version."""
        from hotswap_core import __version__

        return web.json_response({"version": __version__})

    async def _close_when_draining(self, request: web.Request, response: web.StreamResponse) -> None:
        if self.state.draining:  # this answer is the connection's last: no keep-alive past a SIGTERM
            response.force_close()
            response.headers["Connection"] = "close"


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
