"""Faults against a real daemon: SIGKILL in the middle of swap transactions, an unwritable state_dir,
an unreachable Hub. (Elsewhere: a watched folder deleted and recreated, test_daemon_e2e; lost file
events, test_directory_source; an adapter truncated between inspection and load, test_adapters.)"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotswapd.client import Client
from hotswapd.demo import DemoAssets

from .harness import DaemonProcess, drop_adapter, metric, wait_until, write_config
from .test_metrics import EventFollower

pytestmark = pytest.mark.slow


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-flt-", dir="/tmp") as d:
        (Path(d) / "adapters").mkdir()
        (Path(d) / "lib").mkdir()
        yield Path(d)


def _committed(workdir: Path) -> dict[str, Any]:
    """The last committed version in state.json: always whole JSON (atomic write), whatever was killed."""
    return json.loads((workdir / "state" / "state.json").read_text())["chain"][-1]


@pytest.mark.parametrize("kill_on", ["seen", "staged", "committed"])
def test_sigkill_mid_swap_then_restart_serves_the_last_committed_version(
    kill_on: str, demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    # Adapters come through the admin API (the watched folder stays empty), so that at restart
    # nothing newer has landed and the daemon must serve exactly what state.json says.
    lib = workdir / "lib"
    for name, src in (("alpha-1", demo_assets.alpha), ("bravo-1", demo_assets.bravo)):
        drop_adapter(src, lib, name)
    overrides = {"server.swap_roots": [str(lib)], "adapter.initial": None}
    config = write_config(demo_assets, workdir, workdir / "s.sock", **overrides)
    d = DaemonProcess(config, workdir / "s.sock", workdir / "first.log", cli_env)
    try:
        d.wait_ready()
        assert d.client.post("/v1/adapters/swap", {"path": str(lib / "alpha-1")})["live"]["version"] == "alpha-1"
        follower = EventFollower(d.sock)
        swap = threading.Thread(target=_swap_quietly, args=(d.sock, lib / "bravo-1"), daemon=True)
        swap.start()
        wait_until(lambda: any(e["event"] == kill_on for e in follower.events), 30, f"the {kill_on} event", 0.001)
        d.proc.send_signal(signal.SIGKILL)  # no drain, no atexit, no flush: a crash
        assert d.proc.wait(30) == -signal.SIGKILL
        follower.close()
    finally:
        d.stop()
    last = _committed(workdir)
    # Killed after "seen" or "staged", the swap may or may not have reached its commit by the time
    # the signal landed (verify takes milliseconds); after "committed" it must be on disk.
    assert last["version"] in (("bravo-1",) if kill_on == "committed" else ("alpha-1", "bravo-1")), last

    again = DaemonProcess(config, workdir / "s.sock", workdir / "second.log", cli_env)  # stale socket replaced
    try:
        again.wait_ready()
        assert again.live() == last["version"]
        answer = again.complete()
        assert answer["adapter"]["sha256"] == last["sha256"]
        assert answer["choices"][0]["text"].startswith(" bravo" if last["version"] == "bravo-1" else " alpha")
    finally:
        assert again.stop() == 0


def _swap_quietly(sock: Path, path: Path) -> None:
    with contextlib.suppress(Exception):  # the daemon is killed under it: that is the point
        Client(str(sock), timeout=60).post("/v1/adapters/swap", {"path": str(path)})


def test_unwritable_state_dir_is_logged_counted_and_serving_goes_on(
    demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    (workdir / "not-a-dir").write_text("a file where state_dir's parent should be")
    config = write_config(demo_assets, workdir, workdir / "s.sock", state_dir=str(workdir / "not-a-dir" / "state"))
    d = DaemonProcess(config, workdir / "s.sock", workdir / "d.log", cli_env)
    try:
        d.wait_ready()
        drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-1")
        wait_until(lambda: d.live() == "bravo-1", 10, "bravo-1 to go live despite the state_dir")
        assert d.complete()["choices"][0]["text"].startswith(" bravo")
        assert metric(d.metrics(), "hotswapd_state_write_failures_total") >= 1
        wait_until(lambda: "cannot persist state" in d.log, 10, "the failure to be logged")  # counted first
    finally:
        assert d.stop() == 0


def test_unreachable_hub_never_stops_serving(demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    hub = {"repo_id": "acme/adapters", "revision": "main", "poll_seconds": 0.5, "endpoint": f"http://127.0.0.1:{port}"}
    config = write_config(demo_assets, workdir, workdir / "s.sock", **{"source.kind": "hub", "source.hub": hub})
    d = DaemonProcess(config, workdir / "s.sock", workdir / "d.log", cli_env)
    try:
        d.wait_ready()
        assert d.complete()["choices"][0]["text"].startswith(" alpha")  # adapter.initial, Hub or not
        wait_until(lambda: d.client.get("/v1/adapters")["source"]["consecutive_failures"] >= 2, 30, "failed polls")
        source = d.client.get("/v1/adapters")["source"]
        assert source["last_result"] == "error" and source["last_error"]
        assert metric(d.metrics(), 'hotswapd_hub_polls_total{result="error"}') >= 2
        assert d.complete()["adapter"]["version"] == "alpha"
    finally:
        assert d.stop() == 0
