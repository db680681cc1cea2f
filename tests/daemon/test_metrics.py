"""Metrics and swap events of a real daemon, checked with Prometheus' own tools: ``promtool check
metrics`` on the exposition, and a real Prometheus server scraping it and answering queries."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotswap_core import cpu_threads
from hotswapd.client import _UnixConnection
from hotswapd.demo import DemoAssets

from .harness import DaemonProcess, drop_adapter, metric, wait_until, write_config
from .prometheus import Prometheus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-met-", dir="/tmp") as d:
        (Path(d) / "adapters").mkdir()
        yield Path(d)


@pytest.fixture(scope="module")
def daemon(demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]) -> Iterator[DaemonProcess]:
    d = DaemonProcess(
        write_config(demo_assets, workdir, workdir / "s.sock"), workdir / "s.sock", workdir / "d.log", cli_env
    )
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0


def _get(url: str, accept: str | None = None) -> tuple[str, str]:
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read().decode(), response.headers["Content-Type"]


class EventFollower:
    """A client of GET /v1/adapters/events, connected before the swaps it should see."""

    def __init__(self, sock: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._conn = _UnixConnection(str(sock), 60)
        self._conn.request("GET", "/v1/adapters/events")
        self._response = self._conn.getresponse()
        assert self._response.status == 200
        assert self._response.getheader("Content-Type", "").startswith("text/event-stream")
        assert self._response.readline().startswith(b": subscribed")
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        try:
            for raw in self._response:
                line = raw.decode()
                if line.startswith("data: "):
                    self.events.append(json.loads(line[6:]))
        except (OSError, AttributeError, ValueError):  # close() from the test's side ends the read
            pass

    def close(self) -> None:
        self._conn.close()


def test_swap_events_arrive_in_order(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    follower = EventFollower(daemon.sock)
    try:
        drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-1")
        wait_until(lambda: any(e["event"] == "committed" for e in follower.events), 10, "the committed event")
        drop_adapter(demo_assets.broken["non_finite"], workdir / "adapters", "nan-1")
        wait_until(lambda: any(e["event"] == "rejected" for e in follower.events), 10, "the rejected event")
    finally:
        follower.close()
    got = [(e["event"], e["version"]) for e in follower.events]
    assert got == [("seen", "bravo-1"), ("staged", "bravo-1"), ("committed", "bravo-1"),
                   ("seen", "nan-1"), ("rejected", "nan-1")], got  # fmt: skip
    assert [e["seq"] for e in follower.events] == sorted(e["seq"] for e in follower.events)
    committed = follower.events[2]
    assert committed["sha256"] and set(committed["phases_ms"]) >= {"detect", "validate", "stage", "commit"}
    assert follower.events[-1]["reason"] == "non_finite"


def test_exposition_passes_promtool_and_counts_what_happened(daemon: DaemonProcess) -> None:
    for _ in range(3):
        daemon.complete()
    text, content_type = _get(daemon.metrics_url)
    assert content_type.startswith("text/plain")
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and check.stdout == "" and check.stderr == "", (check.stdout, check.stderr)

    assert metric(text, 'hotswapd_swaps_total{result="success"}') == 2  # alpha at start, bravo-1
    assert metric(text, 'hotswapd_swaps_total{result="rejected"}') == 1
    assert metric(text, 'hotswapd_swaps_total{result="rolled_back"}') == 0  # known series, at 0
    assert metric(text, 'hotswapd_adapter_validation_failures_total{reason="non_finite"}') == 1
    assert metric(text, 'hotswapd_adapter_validation_failures_total{reason="truncated"}') == 0
    assert metric(text, "hotswapd_recompilations_total") == 0
    assert metric(text, "hotswapd_swap_stall_seconds_count") == 2
    assert metric(text, "hotswapd_swap_duration_seconds_count") == 1  # only bravo-1 was "seen landing"
    assert metric(text, 'hotswapd_requests_total{code="200",endpoint="completions"}') >= 3  # type: ignore[operator]
    assert metric(text, "hotswapd_generated_tokens_total") >= 3  # type: ignore[operator]
    assert metric(text, "hotswapd_inflight_requests") == 0
    live = [ln for ln in text.splitlines() if ln.startswith("hotswapd_adapter_info{")]
    assert len(live) == 1 and 'version="bravo-1"' in live[0] and live[0].endswith(" 1.0")
    assert re.search(r'hotswapd_build_info\{.*device="cpu".*\} 1.0', text)
    # model.cpu_threads auto: torch's count, which this process got too (same host, same environment)
    assert metric(text, "hotswapd_engine_cpu_threads") == cpu_threads.STARTUP_THREADS
    # Versions and paths appear only on the _info metrics.
    for line in text.splitlines():
        if not line.startswith("#") and "_info{" not in line:
            assert "bravo" not in line and "/" not in line.split(" ")[0], line


def test_openmetrics_on_request_and_loopback_only(daemon: DaemonProcess) -> None:
    url = daemon.metrics_url
    text, content_type = _get(url, accept="application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and text.rstrip().endswith("# EOF")
    port = urllib.parse.urlsplit(url).port
    assert port is not None
    # What the kernel says is listening on that port: 127.0.0.1 only (/proc/net/tcp, hex, little-endian).
    listening = [
        fields[1].split(":")[0]
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]
        if (fields := line.split()) and fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port
    ]
    assert listening == ["0100007F"], listening


def test_a_real_prometheus_scrapes_the_daemon(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    target = urllib.parse.urlsplit(daemon.metrics_url).netloc
    prom = Prometheus(workdir / "prometheus", [(target, {})])
    try:
        drop_adapter(demo_assets.alpha, workdir / "adapters", "alpha-2")
        wait_until(lambda: daemon.live() == "alpha-2", 10, "alpha-2 to go live")
        found = prom.wait('hotswapd_adapter_info{version="alpha-2"}', 60, "Prometheus to scrape alpha-2")
        assert found[0]["metric"]["source"] == "directory" and found[0]["value"][1] == "1"
        success = prom.wait('hotswapd_swaps_total{result="success"} >= 1', 30, "the swap counter")
        assert float(success[0]["value"][1]) >= 1
    finally:
        rc = prom.stop()
    assert rc == 0, prom.log_path.read_text()[-2000:]


def test_serving_metrics_count_prompts_choices_and_their_timings(daemon: DaemonProcess) -> None:
    before = daemon.metrics()
    sent = time.monotonic()
    answer = daemon.client.post(  # two prompts, two choices each: four rows of 6 tokens
        "/v1/completions",
        {"prompt": ["Hello =>", "A longer prompt than the first one =>"], "n": 2, "max_tokens": 6,
         "ignore_eos": True, "temperature": 0},
    )  # fmt: skip
    wall = time.monotonic() - sent
    after = daemon.metrics()

    def delta(series: str) -> float:
        return (metric(after, series) or 0.0) - (metric(before, series) or 0.0)

    assert delta("hotswapd_prompt_tokens_total") == answer["usage"]["prompt_tokens"]  # each prompt once
    assert delta("hotswapd_request_prompt_tokens_count") == 2
    assert delta("hotswapd_generated_tokens_total") == answer["usage"]["completion_tokens"] == 24
    assert delta("hotswapd_request_generation_tokens_count") == 4
    assert delta('hotswapd_completions_finished_total{finish_reason="length"}') == 4
    assert delta('hotswapd_completions_finished_total{finish_reason="stop"}') == 0
    for name in ("hotswapd_request_queue_time_seconds", "hotswapd_time_per_output_token_seconds",
                 "hotswapd_time_to_first_token_seconds"):  # fmt: skip
        assert delta(f"{name}_count") == 4, name
    # Each choice: queued -> admitted <= queued -> first token, and first token + 5 gaps within the client's wall.
    queued, ttft = delta("hotswapd_request_queue_time_seconds_sum"), delta("hotswapd_time_to_first_token_seconds_sum")
    tpot = delta("hotswapd_time_per_output_token_seconds_sum")
    assert 0 <= queued <= ttft and tpot > 0
    assert ttft + 5 * tpot <= 4 * wall, (ttft, tpot, wall)


def test_running_rows_while_a_generation_runs(daemon: DaemonProcess) -> None:
    assert metric(daemon.metrics(), "hotswapd_running_rows") == 0
    conn = _UnixConnection(str(daemon.sock), 60)
    body = {"prompt": "Hello =>", "max_tokens": 240, "ignore_eos": True, "stream": True, "n": 3}
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    try:
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # generating now: its three rows hold the cache
        text = daemon.metrics()
        assert metric(text, "hotswapd_running_rows") == 3, [ln for ln in text.splitlines() if "running" in ln]
        assert (metric(text, "hotswapd_kv_cache_usage_ratio") or 0) > 0
    finally:
        conn.close()  # the client leaves: its generation is cancelled and its rows freed
    wait_until(lambda: metric(daemon.metrics(), "hotswapd_running_rows") == 0, 10, "the rows to be freed")
