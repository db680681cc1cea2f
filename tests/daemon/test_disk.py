"""Disks that do not fill, against a real daemon: the Hub cache is garbage-collected (and a rollback past what it
kept fails cleanly), a full disk while downloading or while writing state.json is ridden out and recovered from
once space is back. The small disks are real filesystems (a tmpfs of 1 MiB, tests/tmpfs.py)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotswapd.bench.fakehub import FakeHub
from hotswapd.client import ClientError
from hotswapd.demo import DemoAssets
from tests.tmpfs import fill, small_fs

from .harness import drop_adapter, metric, running_daemon, wait_until, write_config

pytestmark = pytest.mark.slow
REPO = "acme/support-adapters"
CACHE = "hub/models--acme--support-adapters"


def _files(folder: Path, indent: int | None = None) -> dict[str, bytes]:
    """An adapter folder's two files; ``indent`` re-serialises the config: the same adapter, another version."""
    config = (folder / "adapter_config.json").read_bytes()
    if indent is not None:
        config = json.dumps(json.loads(config), indent=indent).encode()
    return {
        "adapter_config.json": config,
        "adapter_model.safetensors": (folder / "adapter_model.safetensors").read_bytes(),
    }


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def workdir(short_tmp: Path) -> Path:
    """A short folder (the daemon's socket lives in it) with an empty watched folder."""
    (short_tmp / "adapters").mkdir()
    return short_tmp


def _hub_config(assets: DemoAssets, workdir: Path, hub: FakeHub, state_dir: Path, **hub_keys: Any) -> Path:
    keys = {"repo_id": REPO, "revision": "main", "poll_seconds": 0.5, "endpoint": hub.url, **hub_keys}
    return write_config(assets, workdir, workdir / "s.sock", state_dir=str(state_dir),
                        **{"adapter.initial": None, "source.kind": "hub", "source.hub": keys})  # fmt: skip


def _hub_env(cli_env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in cli_env.items() if not k.startswith(("HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE"))}


def _snapshots(state_dir: Path) -> set[str]:
    return {p.name for p in (state_dir / CACHE / "snapshots").iterdir()}


def _committed(state_dir: Path) -> str:
    return str(json.loads((state_dir / "state.json").read_text())["chain"][-1]["version"])


def test_hub_cache_keeps_the_rollback_chain_and_a_rollback_past_it_fails_cleanly(
    demo_assets: DemoAssets, workdir: Path, hub: FakeHub, cli_env: dict[str, str]
) -> None:
    state = workdir / "state"
    commits = [
        (demo_assets.alpha, None, " alpha"),
        (demo_assets.bravo, None, " bravo"),
        (demo_assets.alpha, 1, " alpha"),
        (demo_assets.bravo, 1, " bravo"),
    ]
    shas = [hub.commit(REPO, "main", _files(commits[0][0]))]
    config = _hub_config(demo_assets, workdir, hub, state, keep_versions=3)
    with running_daemon(config, workdir, _hub_env(cli_env)) as d:
        wait_until(lambda: d.live() == f"{REPO}@{shas[0]}", 30, "the first commit to go live")
        for folder, indent, _ in commits[1:]:
            shas.append(hub.commit(REPO, "main", _files(folder, indent)))
            wait_until(lambda: d.live() == f"{REPO}@{shas[-1]}", 30, "the next commit to go live")
        # The live commit and the two before it stay; the first one went.
        wait_until(lambda: _snapshots(state) == set(shas[1:]), 10, "the oldest download to be collected")
        # The line is logged after the files are gone: wait for it rather than race the daemon's stderr.
        wait_until(lambda: "deleted 1 snapshots" in d.log, 10, "the collection to be logged")

        rolled = d.client.post("/v1/adapters/rollback")  # a flip: standby holds commit 3
        assert rolled["live"]["version"] == f"{REPO}@{shas[2]}"
        rolled = d.client.post("/v1/adapters/rollback")  # re-staged from commit 2's kept files
        assert rolled["live"]["version"] == f"{REPO}@{shas[1]}"
        assert d.complete()["choices"][0]["text"].startswith(" bravo")

        with pytest.raises(ClientError) as refused:  # commit 1's files were collected
            d.client.post("/v1/adapters/rollback")
        assert refused.value.status == 409 and refused.value.code == "rollback_impossible", refused.value.body
        message = refused.value.body["error"]["message"]
        assert f"{REPO}@{shas[0]}" in message and "no such folder" in message, message
        assert d.live() == f"{REPO}@{shas[1]}" and d.complete()["choices"][0]["text"].startswith(" bravo")


def test_out_of_space_while_downloading_is_ridden_out_and_recovered_from(
    demo_assets: DemoAssets, workdir: Path, hub: FakeHub, cli_env: dict[str, str]
) -> None:
    with small_fs("1m") as fs:
        state = fs / "state"
        first = hub.commit(REPO, "main", _files(demo_assets.alpha))
        config = _hub_config(demo_assets, workdir, hub, state)
        with running_daemon(config, workdir, _hub_env(cli_env)) as d:
            wait_until(lambda: d.live() == f"{REPO}@{first}", 30, "the first commit to go live")
            errors = metric(d.metrics(), 'hotswapd_hub_polls_total{result="error"}') or 0.0
            filler = fill(fs, leave=32 * 1024)  # bravo's weights are 62 KB
            second = hub.commit(REPO, "main", _files(demo_assets.bravo))

            wait_until(lambda: (metric(d.metrics(), 'hotswapd_hub_polls_total{result="error"}') or 0) > errors, 30,
                       "a failed poll")  # fmt: skip
            source = d.client.get("/v1/adapters")["source"]
            assert "No space left on device" in (source["last_error"] or ""), source
            assert source["consecutive_failures"] >= 1
            assert d.live() == f"{REPO}@{first}" and d.complete()["choices"][0]["text"].startswith(" alpha")
            assert _snapshots(state) == {first} and not list(state.rglob("*.incomplete"))

            filler.unlink()
            freed = time.monotonic()
            wait_until(lambda: d.live() == f"{REPO}@{second}", 60, "the commit to go live once space is back")
            recovered = time.monotonic() - freed
            assert d.complete()["choices"][0]["text"].startswith(" bravo")
            assert d.client.get("/v1/adapters")["source"]["consecutive_failures"] == 0
            assert _snapshots(state) == {first, second}
            print(f"\nHub download out of space: space back -> live in {recovered:.2f}s")


def test_out_of_space_while_writing_state_is_counted_and_caught_up(
    demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    with small_fs("1m") as fs:
        state = fs / "state"
        config = write_config(demo_assets, workdir, workdir / "s.sock", state_dir=str(state))
        with running_daemon(config, workdir, cli_env) as d:
            wait_until(lambda: (state / "state.json").is_file() and _committed(state) == "alpha", 10, "state.json")
            filler = fill(fs)  # not a byte left
            drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-1")

            wait_until(lambda: d.live() == "bravo-1", 30, "bravo-1 to go live on a full state_dir")
            assert d.complete()["choices"][0]["text"].startswith(" bravo")
            wait_until(lambda: (metric(d.metrics(), "hotswapd_state_write_failures_total") or 0) >= 1, 10,
                       "a counted state write failure")  # fmt: skip
            wait_until(lambda: "cannot persist state" in d.log, 10, "the failure to be logged")  # counted first
            assert _committed(state) == "alpha"  # stale, but whole

            filler.unlink()
            freed = time.monotonic()
            wait_until(lambda: _committed(state) == "bravo-1", 70, "state.json to catch up once space is back")
            caught_up = time.monotonic() - freed
            failures = metric(d.metrics(), "hotswapd_state_write_failures_total")
            assert d.complete()["choices"][0]["text"].startswith(" bravo")
            assert not [p.name for p in state.iterdir() if p.name != "state.json"]  # no temp file left
            print(f"\nstate.json out of space: space back -> written in {caught_up:.2f}s ({failures:g} failed writes)")
