"""A real daemon on ``source.kind: hub``, polling a local Hub-API stand-in with the real huggingface_hub client."""

from __future__ import annotations

import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotswapd.bench.fakehub import FakeHub
from hotswapd.bench.fleet import adapter_files
from hotswapd.demo import DemoAssets

from .harness import DaemonProcess, wait_until, write_config

pytestmark = pytest.mark.slow
REPO = "acme/support-adapters"


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def daemon(demo_assets: DemoAssets, hub: FakeHub, cli_env: dict[str, str]) -> Iterator[tuple[DaemonProcess, Path, str]]:
    with tempfile.TemporaryDirectory(prefix="hs-hub-", dir="/tmp") as d:
        work = Path(d)
        first = hub.commit(REPO, "main", adapter_files(demo_assets.alpha))
        config = write_config(
            demo_assets, work, work / "s.sock",
            **{"adapter.initial": None, "source.kind": "hub",
               "source.hub": {"repo_id": REPO, "revision": "main", "poll_seconds": 0.5, "endpoint": hub.url}},
        )  # fmt: skip
        env = {k: v for k, v in cli_env.items() if not k.startswith(("HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE"))}
        proc = DaemonProcess(config, work / "s.sock", work / "d.log", env)
        try:
            proc.wait_ready()
            yield proc, work, first
        finally:
            assert proc.stop() == 0


def _record(d: DaemonProcess, version: str) -> dict[str, Any] | None:
    found = [r for r in d.client.get("/v1/adapters")["history"] if r["version"] == version]
    return found[0] if found else None


def test_hub_commits_are_swapped_in_broken_ones_rejected_and_outages_ridden_out(
    daemon: tuple[DaemonProcess, Path, str], hub: FakeHub, demo_assets: DemoAssets
) -> None:
    d, work, first = daemon
    wait_until(lambda: d.live() == f"{REPO}@{first}", 15, "the branch head to go live")
    answer = d.complete()
    assert answer["choices"][0]["text"].startswith(" alpha") and answer["adapter"]["source"] == "hub"
    source = d.client.get("/v1/adapters")["source"]
    assert source["kind"] == "hub" and source["last_sha"] == first and source["last_error"] is None
    snapshot = Path(_record(d, f"{REPO}@{first}")["path"])  # type: ignore[index]
    assert snapshot.is_relative_to(work / "state" / "hub")  # the cache lives under state_dir
    assert sorted(p.name for p in snapshot.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]

    broken = hub.commit(REPO, "main", adapter_files(demo_assets.broken["non_finite"]))
    wait_until(lambda: _record(d, f"{REPO}@{broken}"), 15, "the broken commit to be tried")
    assert _record(d, f"{REPO}@{broken}")["reason"] == "non_finite"  # type: ignore[index]
    assert d.live() == f"{REPO}@{first}" and d.complete()["choices"][0]["text"].startswith(" alpha")

    # The Hub fails for a while: no swap, the failure is visible, then the new commit lands.
    hub.fail("500", times=4)
    good = hub.commit(REPO, "main", adapter_files(demo_assets.bravo))
    wait_until(lambda: d.client.get("/v1/adapters")["source"]["consecutive_failures"] >= 1, 15, "a failed poll")
    status = d.client.get("/v1/adapters")["source"]
    assert status["last_result"] == "error" and "500" in (status["last_error"] or "")
    assert d.live() == f"{REPO}@{first}"  # still serving through the outage
    wait_until(lambda: d.live() == f"{REPO}@{good}", 60, "the commit after the outage to go live")
    assert d.complete()["choices"][0]["text"].startswith(" bravo")
    assert d.client.get("/v1/adapters")["source"]["consecutive_failures"] == 0

    text = d.metrics()
    polls = {m[1]: float(m[2]) for m in re.finditer(r'hotswapd_hub_polls_total\{result="(\w+)"\} (\S+)', text)}
    assert polls["error"] >= 1 and polls["changed"] >= 3, polls
    assert "server error" in d.log.lower() or "500" in d.log
