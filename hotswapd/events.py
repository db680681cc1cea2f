"""Swap events fanned out to ``GET /v1/adapters/events`` subscribers (server-sent events).

Published from any thread (the source's, an executor's); delivered on the event loop, in order,
to every subscriber connected at the time. A subscriber that falls too far behind is dropped
rather than letting its backlog grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from typing import Any

from hotswap_core.history import SwapRecord
from hotswapd.responses import record_json

log = logging.getLogger("hotswapd.events")

# Swapper listener kinds -> event names (a successful swap is "committed" to its followers).
KINDS = {"seen": "seen", "staged": "staged", "success": "committed", "rejected": "rejected", "failed": "failed",
         "rolled_back": "rolled_back", "unchanged": "unchanged"}  # fmt: skip
BACKLOG = 1000


class EventBus:
    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._seq = itertools.count(1)

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, kind: str, record: SwapRecord) -> None:
        """Thread-safe. The event is the record as ``GET /v1/adapters`` shows it, plus ``event`` and ``ts``."""
        if self._loop is None or kind not in KINDS:
            return
        # Numbered here: swaps publish one at a time (under the swapper's lock), so numbers follow the
        # order of publication, which is the order of delivery. With no follower nothing wakes the loop
        # (three wake-ups per swap otherwise, on a machine whose cores the engine wants).
        seq = next(self._seq)
        if not self._subscribers:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: shutting down
            self._loop.call_soon_threadsafe(self._deliver, KINDS[kind], time.time(), record, seq)

    def _deliver(self, name: str, ts: float, record: SwapRecord, seq: int) -> None:
        if not self._subscribers:
            return  # the follower left meanwhile; built for followers only, on the loop, not the swap's thread
        event = {"event": name, "ts": ts, **record_json(record), "seq": seq}
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:
                log.warning("dropping a swap-event subscriber %d events behind", queue.qsize())
                self._end(queue)

    def subscribe(self) -> asyncio.Queue[dict[str, Any] | None]:
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(BACKLOG)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self._subscribers.discard(queue)

    def close(self) -> None:
        """End every subscriber's stream (shutdown)."""
        for queue in list(self._subscribers):
            self._end(queue)

    def _end(self, queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        """Replace what ``queue`` still holds with the end marker (``None``)."""
        self._subscribers.discard(queue)
        while not queue.empty():
            queue.get_nowait()
        queue.put_nowait(None)
