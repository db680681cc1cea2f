"""The adapter endpoints: what is live and what happened (``/v1/adapters``), the swap-event stream
(``/v1/adapters/events``), and the admin verbs (swap, rollback, refresh), which only the uids in
``server.admin_uids`` may call (SO_PEERCRED on the Unix socket; never served over TCP).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from typing import Any

from aiohttp import web

from hotswap_core.engine import Engine
from hotswap_core.errors import SwapError
from hotswap_core.swap import Swapper
from hotswapd import protocol, responses
from hotswapd.events import EventBus
from hotswapd.protocol import ApiError
from hotswapd.state import ServingState
from hotswapd.unix_socket import peer_uid

_KEEPALIVE_S = 15.0  # a comment line on an idle event stream this often: it also finds a client that went away


class AdapterRoutes:
    """The adapter handlers: the swap history and source as JSON, the event stream, the admin verbs."""

    def __init__(
        self,
        state: ServingState,
        engine: Engine,
        swapper: Swapper,
        events: EventBus,
        *,
        describe_source: Callable[[], dict[str, Any]],
        swap_roots: Callable[[], tuple[str, ...]] = tuple,
        refresh: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self.state, self.engine, self.swapper, self.events = state, engine, swapper, events
        self._describe_source = describe_source
        self._swap_roots = swap_roots
        self._refresh = refresh

    async def status(self, request: web.Request) -> web.Response:
        slots, history = self.engine.slots, self.swapper.history
        body = {
            "live": {**(responses.version_json(self.swapper.live) or {}), "since": history.live_since},
            "standby": responses.version_json(slots.contents[slots.standby]),
            "previous": responses.version_json(history.previous()) if history.previous() else None,
            "history": [responses.record_json(r) for r in history.recent(50)],
            "rejected": [
                {"path": r.path, "reason": r.reason, "message": r.message, "at": r.at}
                for r in history.rejections()[:50]
            ],
            "superseded": [responses.superseded_json(x) for x in history.supersessions()[:50]],
            "source": self._describe_source(),
            "recompilations": self.engine.recompilations,
        }
        return web.json_response(body)

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
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

    def _require_admin(self, request: web.Request) -> None:
        uid = peer_uid(request)
        allowed = self.state.config.admin_uids
        allowed_set = {os.getuid(), 0} if allowed is None else set(allowed)
        if uid is None or uid not in allowed_set:
            raise ApiError(403, f"uid {uid} may not change adapters (server.admin_uids)", code="forbidden")

    async def swap(self, request: web.Request) -> web.Response:
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
        roots = self._swap_roots()
        if not any(os.path.commonpath([real, r]) == r for r in map(os.path.realpath, roots)):
            raise ApiError(403, f"{path} is not under server.swap_roots ({', '.join(roots) or 'none'})",
                           param="path", code="path_not_allowed")  # fmt: skip
        loop = asyncio.get_running_loop()
        record = await loop.run_in_executor(None, lambda: self.swapper.swap(path, source="admin"))
        if record.result == "rejected":
            raise ApiError(422, f"adapter rejected: {record.message}", param="path", code=record.reason,
                           extra={"record": responses.record_json(record)})  # fmt: skip
        if record.result == "failed":
            raise ApiError(
                500,
                f"swap failed: {record.message}",
                code=record.reason,
                extra={"record": responses.record_json(record)},
            )
        return web.json_response(
            {"record": responses.record_json(record), "live": responses.version_json(self.swapper.live)}
        )

    async def rollback(self, request: web.Request) -> web.Response:
        self._require_admin(request)
        loop = asyncio.get_running_loop()
        try:
            record = await loop.run_in_executor(None, self.swapper.rollback)
        except SwapError as exc:
            raise ApiError(409, str(exc), code="rollback_impossible") from exc
        return web.json_response(
            {"record": responses.record_json(record), "live": responses.version_json(self.swapper.live)}
        )

    async def refresh(self, request: web.Request) -> web.Response:
        """The source looks now (a pipeline that just pushed need not wait for the next poll or rescan).
        Answers once the look is done, bounded by server.request_timeout_s; a version it found is then swapped
        in as usual (watch /v1/adapters or the events)."""
        self._require_admin(request)
        if self._refresh is None or not self.state.ready:
            raise ApiError(503, "the adapter source is not running yet", code="starting", headers={"Retry-After": "5"})
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.state.config.request_timeout_s):
                looked = await loop.run_in_executor(None, self._refresh)
        except TimeoutError as exc:
            raise ApiError(504, "the source's look took longer than server.request_timeout_s", code="timeout") from exc
        return web.json_response({**looked, "live": responses.version_json(self.swapper.live)})
