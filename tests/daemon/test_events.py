"""The swap-event bus in isolation: one real event loop, publishers on another thread (as swaps are)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from hotswap_core.history import SwapRecord
from hotswapd.events import EventBus


def _record(version: str) -> SwapRecord:
    return SwapRecord(version, "ab" * 32, "directory", f"/a/{version}", "success")


class CountingLoop:
    """Counts the wake-ups a publisher asks of the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop, self.wakeups = loop, 0

    def call_soon_threadsafe(self, *args: Any) -> Any:
        self.wakeups += 1
        return self.loop.call_soon_threadsafe(*args)


def test_no_follower_no_wakeup_and_numbers_run_on() -> None:
    async def main() -> list[dict[str, Any] | None]:
        bus, counting = EventBus(), CountingLoop(asyncio.get_running_loop())
        bus.bind(counting)  # type: ignore[arg-type]

        def publish(*versions: str) -> None:
            def run() -> None:
                for v in versions:
                    bus.publish("success", _record(v))

            thread = threading.Thread(target=run)
            thread.start()
            thread.join()

        publish("v1", "v2", "v3")  # nobody follows: the loop is left alone
        assert counting.wakeups == 0
        queue = bus.subscribe()
        publish("v4", "v5")
        assert counting.wakeups == 2
        return [await asyncio.wait_for(queue.get(), 5) for _ in range(2)]

    events = asyncio.run(main())
    got = [(e["event"], e["version"], e["seq"]) for e in events if e]
    assert got == [("committed", "v4", 4), ("committed", "v5", 5)]
