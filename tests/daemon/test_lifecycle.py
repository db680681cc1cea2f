"""The daemon's life in real processes: readiness, SIGTERM drain with streams in flight, restart
restoring the last committed version (and an operator's rollback), stale sockets."""

from __future__ import annotations

import json
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hotswapd.client import Client, ClientError, _UnixConnection
from hotswapd.demo import DemoAssets

from .harness import DaemonProcess, drop_adapter, metric, wait_until, write_config

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-life-", dir="/tmp") as d:
        (Path(d) / "adapters").mkdir()
        yield Path(d)


def _start(assets: DemoAssets, workdir: Path, env: dict[str, str], name: str, **overrides: Any) -> DaemonProcess:
    config = write_config(assets, workdir, workdir / "s.sock", **overrides)
    return DaemonProcess(config, workdir / "s.sock", workdir / f"{name}.log", env)


def test_sigterm_lets_streams_in_flight_finish_then_exits_0(
    demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    # Stale socket file left by a crash: nothing answers on it, so it is replaced.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(workdir / "s.sock"))
    stale.close()
    # No adapter at all: the base model, whose greedy output runs to max_tokens (long streams).
    d = _start(demo_assets, workdir, cli_env, "drain", **{"adapter.initial": None})
    try:
        # Bound before the model loads: /readyz says 503 (not "connection refused") during warm-up.
        wait_until(lambda: _status(d.client) == 503, 60, "readyz 503 during warm-up")
        d.wait_ready()
        assert d.live() == "base"
        first_chunk = [threading.Event() for _ in range(4)]
        streams: list[list[dict[str, Any]] | BaseException] = [[] for _ in range(4)]
        together = threading.Barrier(4)

        def consume(i: int) -> None:
            try:
                together.wait(30)
                # 240 tokens of 256: each row decodes for hundreds of steps, all four in one batch.
                body = {"prompt": f"stream {i} =>", "max_tokens": 240, "temperature": 0}
                for chunk in Client(str(d.sock)).stream("/v1/completions", body):
                    streams[i].append(chunk)  # type: ignore[union-attr]
                    first_chunk[i].set()
            except BaseException as exc:
                streams[i] = exc
                first_chunk[i].set()

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for e in first_chunk:
            assert e.wait(60)
        d.signal(signal.SIGTERM)
        at_sigterm = [len(c) if isinstance(c, list) else 0 for c in streams]
        for t in threads:
            t.join(120)
        rc = d.proc.wait(60)
    finally:
        d.stop()
    assert "draining 4 in-flight requests" in d.log  # all four were mid-stream when SIGTERM came
    for chunks, seen in zip(streams, at_sigterm, strict=True):
        assert isinstance(chunks, list), chunks  # the stream ended with [DONE], no error
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
        assert len(chunks) > seen  # and went on after it
    assert rc == 0
    assert not (workdir / "s.sock").exists()


def _status(client: Client) -> int:
    try:
        client.get("/readyz")
        return 200
    except ClientError as exc:
        return exc.status or 0


def test_restart_serves_the_last_committed_version_and_keeps_a_rollback(
    demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    d = _start(demo_assets, workdir, cli_env, "first")
    try:
        d.wait_ready()
        assert d.live() == "alpha"
        drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-1")
        wait_until(lambda: d.live() == "bravo-1", 5, "bravo-1 to go live")
        assert d.client.post("/v1/adapters/rollback")["live"]["version"] == "alpha"
    finally:
        assert d.stop() == 0
    state = json.loads((workdir / "state" / "state.json").read_text())
    assert state["chain"][-1]["version"] == "alpha"

    # The operator rolled back from bravo-1: a restart serves alpha, not the newest folder.
    d = _start(demo_assets, workdir, cli_env, "second")
    try:
        d.wait_ready()
        assert d.live() == "alpha" and d.complete()["choices"][0]["text"].startswith(" alpha")
        # ... until something newer lands.
        drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-2")
        wait_until(lambda: d.live() == "bravo-2", 5, "bravo-2 to go live")
    finally:
        assert d.stop() == 0

    # Landed while the daemon was down: newer than the last commit, so it wins at start.
    drop_adapter(demo_assets.alpha, workdir / "adapters", "alpha-offline")
    d = _start(demo_assets, workdir, cli_env, "third")
    try:
        d.wait_ready()
        assert d.live() == "alpha-offline"
    finally:
        assert d.stop() == 0


def test_full_queue_answers_429_and_a_disconnect_cancels_its_generation(
    demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    d = _start(demo_assets, workdir, cli_env, "overload", **{"adapter.initial": None, "server.max_queue": 8})
    try:
        d.wait_ready()
        long = {"prompt": "long =>", "max_tokens": 200, "temperature": 0}
        t0 = time.monotonic()
        full = d.client.post("/v1/completions", long)
        full_s = time.monotonic() - t0
        assert full["usage"]["completion_tokens"] > 100, full  # the base model rambles: a long generation

        # A client that goes away after its first chunk: its row stops, so the batch ends early and
        # the next request does not wait for 200 tokens nobody will read.
        conn = _UnixConnection(str(d.sock), 30)
        conn.request("POST", "/v1/completions", body=json.dumps({**long, "stream": True}))
        response = conn.getresponse()
        assert response.readline().startswith(b"data: ")
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        t0 = time.monotonic()
        d.client.post("/v1/completions", {"prompt": "x =>", "max_tokens": 1})
        assert time.monotonic() - t0 < full_s / 2, (time.monotonic() - t0, full_s)

        # One batch of 8 running (streams that have started), 8 waiting (server.max_queue): the next
        # request is told to come back later.
        running = [Client(str(d.sock)).stream("/v1/completions", long) for _ in range(8)]
        pool = ThreadPoolExecutor(16)
        firsts = [pool.submit(next, s) for s in running]
        for f in firsts:
            f.result(60)
        queued = [pool.submit(d.client.post, "/v1/completions", long) for _ in range(8)]
        wait_until(lambda: metric(d.metrics(), "hotswapd_queue_depth") == 8, 30, "8 queued requests")
        overflow = _overflow(d)
        assert overflow is not None and overflow["error"]["code"] == "queue_full" and overflow["retry_after"] == "1"
        finished = [pool.submit(list, s) for s in running]
        for f in [*queued, *finished]:
            f.result(120)  # the running and the queued ones were all served
        pool.shutdown()
        assert d.complete()["choices"][0]["text"]
    finally:
        assert d.stop() == 0


def _overflow(d: DaemonProcess) -> dict[str, Any] | None:
    conn = _UnixConnection(str(d.sock), 30)
    conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "one more =>", "max_tokens": 1}))
    response = conn.getresponse()
    body = json.loads(response.read())
    return {**body, "retry_after": response.getheader("Retry-After")} if response.status == 429 else None
