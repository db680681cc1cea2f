"""HubSource with the real huggingface_hub client against a local Hub stand-in (tests/fakehub.py) over real HTTP."""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save

from hotswap_core.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from hotswap_core.config import HubSourceConfig
from hotswap_core.metrics import HUB_POLL_RESULTS
from hotswap_core.sources.directory import Candidate
from hotswap_core.sources.hub import EVENT_KINDS, HubSource, hub_cache_dir
from hotswapd.bench.fakehub import FakeHub
from tests.tmpfs import fill, small_fs

REPO = "acme/support-lora"
TIMEOUT = 0.5  # the source's network timeout in these tests: a stall costs this, not minutes


def adapter_files(seed: int, **extra: bytes) -> dict[str, bytes]:
    """A small, valid PEFT LoRA adapter (config + safetensors), different per seed."""
    return {**wide_adapter_files(seed, 64), **extra}


def wide_adapter_files(seed: int, width: int) -> dict[str, bytes]:
    """``adapter_files`` with weights of about ``16 * width`` bytes; the config is the same for every seed."""
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    rng = np.random.default_rng(seed)
    tensors = {
        f"{prefix}.lora_A.weight": rng.standard_normal((2, width), dtype=np.float32),
        f"{prefix}.lora_B.weight": rng.standard_normal((width, 2), dtype=np.float32),
    }
    return {CONFIG_NAME: json.dumps(config).encode(), WEIGHTS_NAME: save(tensors)}


class Sink:
    """The daemon's side: on_candidate / on_poll / on_event, waitable."""

    def __init__(self) -> None:
        self.offers: list[Candidate] = []
        self.polls: list[str] = []
        self.events: list[str] = []
        self._cond = threading.Condition()

    def offer(self, c: Candidate) -> None:
        with self._cond:
            self.offers.append(c)
            self._cond.notify_all()

    def poll(self, result: str) -> None:
        with self._cond:
            self.polls.append(result)
            self._cond.notify_all()

    def event(self, kind: str) -> None:
        self.events.append(kind)

    def wait(self, pred: Callable[[], bool], timeout: float = 5.0) -> None:
        with self._cond:
            assert self._cond.wait_for(pred, timeout), f"timed out; polls={self.polls} offers={self.offers}"


@pytest.fixture(autouse=True)
def _no_user_hub_state(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HF_HUB_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as fake:
        yield fake


@pytest.fixture
def make(hub: FakeHub, tmp_path: Path) -> Iterator[Callable[..., tuple[HubSource, Sink]]]:
    sources: list[HubSource] = []

    def _make(
        *,
        revision: str = "main",
        poll_seconds: float = 60.0,
        token_file: str | None = None,
        keep_versions: int = 3,
        cache: Path | None = None,
        poll_jitter: float = 0.1,
        **kw: Any,
    ) -> tuple[HubSource, Sink]:
        sink = Sink()
        config = HubSourceConfig(
            REPO, revision, poll_seconds, token_file, endpoint=hub.url, keep_versions=keep_versions,
            poll_jitter=poll_jitter,
        )  # fmt: skip
        kw.setdefault("timeout_s", TIMEOUT)
        kw.setdefault("uniform", lambda low, high: (low + high) / 2)  # deterministic: poll_seconds exactly
        kw.setdefault("jitter", lambda ceiling: ceiling)  # deterministic: the top of the backoff window
        source = HubSource(
            config, cache or tmp_path / "cache", sink.offer, on_event=sink.event, on_poll=sink.poll, **kw
        )
        sources.append(source)
        return source, sink

    yield _make
    for s in sources:
        s.stop()


def recording(ceilings: list[float]) -> Callable[[float], float]:
    """A jitter that records each backoff ceiling and picks its top."""

    def jitter(ceiling: float) -> float:
        ceilings.append(ceiling)
        return ceiling

    return jitter


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_first_poll_offers_the_commit_with_only_the_adapter_files(hub: FakeHub, make: Any, tmp_path: Path) -> None:
    files = adapter_files(1, **{"README.md": b"# card", "adapter_model.bin": b"\x80\x04pickle", "x/y.json": b"{}"})
    sha = hub.commit(REPO, "main", files)
    source, sink = make()
    before = time.monotonic()

    c = source.poll_now()

    assert c is not None and sink.offers == [c] and sink.polls == ["changed"] and "poll" in sink.events
    assert (c.version, c.fingerprint) == (f"{REPO}@{sha}", sha)
    assert c.path == tmp_path / "cache" / "models--acme--support-lora" / "snapshots" / sha
    assert files_in(c.path) == {CONFIG_NAME: files[CONFIG_NAME], WEIGHTS_NAME: files[WEIGHTS_NAME]}
    assert before <= c.seen_at <= time.monotonic() and abs(c.landed_at - time.time()) < 5
    # Exactly the routes huggingface_hub 2.4.0 uses, and no other file was ever requested.
    assert sorted({(r.method, r.path.replace(sha, "SHA")) for r in hub.requests()}) == [
        ("GET", f"/{REPO}/resolve/SHA/{CONFIG_NAME}"),
        ("GET", f"/{REPO}/resolve/SHA/{WEIGHTS_NAME}"),
        ("GET", f"/api/models/{REPO}/revision/main"),
        ("GET", f"/api/models/{REPO}/tree/SHA"),
        ("HEAD", f"/{REPO}/resolve/SHA/{CONFIG_NAME}"),
        ("HEAD", f"/{REPO}/resolve/SHA/{WEIGHTS_NAME}"),
    ]
    assert not any("authorization" in r.headers for r in hub.requests())  # no token anywhere: none sent
    status = source.status()
    assert json.loads(json.dumps(status)) == status
    assert status | {"last_poll_at": None} == {
        "repo_id": REPO,
        "revision": "main",
        "endpoint": hub.url,
        "last_sha": sha,
        "head_sha": sha,
        "last_poll_at": None,
        "last_result": "changed",
        "last_error": None,
        "consecutive_failures": 0,
        "next_poll_in_s": pytest.approx(60, abs=1),
    }
    assert abs(status["last_poll_at"] - time.time()) < 5


def test_unchanged_branch_offers_nothing_and_a_new_commit_is_offered(hub: FakeHub, make: Any) -> None:
    first = hub.commit(REPO, "main", adapter_files(1))
    source, sink = make()
    assert source.poll_now() is not None
    hub.clear_requests()

    assert source.poll_now() is None
    assert sink.polls == ["changed", "unchanged"]
    assert [(r.method, r.path) for r in hub.requests()] == [("GET", f"/api/models/{REPO}/revision/main")]

    second = hub.commit(REPO, "main", adapter_files(2))
    c = source.poll_now()
    assert c is not None and c.version == f"{REPO}@{second}" and second != first
    assert files_in(c.path)[WEIGHTS_NAME] == adapter_files(2)[WEIGHTS_NAME]
    assert [o.fingerprint for o in sink.offers] == [first, second]


def test_a_tag_is_followed_and_moving_it_back_offers_the_earlier_commit_again(hub: FakeHub, make: Any) -> None:
    v1 = hub.commit(REPO, "main", adapter_files(1))
    hub.tag(REPO, "prod", v1)
    v2 = hub.commit(REPO, "main", adapter_files(2))
    source, sink = make(revision="prod")

    assert source.poll_now() is not None and sink.offers[-1].fingerprint == v1
    hub.tag(REPO, "prod", v2)
    assert source.poll_now() is not None and sink.offers[-1].fingerprint == v2
    assert source.poll_now() is None  # still at v2: offered once, not at every poll
    hub.tag(REPO, "prod", v1)  # moved back: the head is what should be live (a fleet's rollback)
    assert source.poll_now() is not None and source.poll_now() is None
    assert [o.fingerprint for o in sink.offers] == [v1, v2, v1]
    assert sink.polls == ["changed", "changed", "unchanged", "changed", "unchanged"]
    assert source.status()["last_sha"] == v1 == source.status()["head_sha"]


def test_skip_vetoes_an_offer_once(hub: FakeHub, make: Any) -> None:
    sha = hub.commit(REPO, "main", adapter_files(1))
    asked: list[Candidate] = []

    def veto(c: Candidate) -> bool:
        asked.append(c)
        return True

    source, sink = make(skip=veto)

    assert source.poll_now() is None and source.poll_now() is None
    assert [c.fingerprint for c in asked] == [sha]  # asked once, not at every poll
    assert sink.offers == [] and sink.polls == ["changed", "unchanged"]


def test_server_errors_back_off_exponentially_then_recover(hub: FakeHub, make: Any) -> None:
    hub.commit(REPO, "main", adapter_files(1))
    ceilings: list[float] = []
    source, sink = make(poll_seconds=1.0, jitter=recording(ceilings))
    hub.fail("500", times=3, path="/revision/")

    for expected in (2.0, 4.0, 8.0):
        assert source.poll_now() is None
        assert source.status()["next_poll_in_s"] == pytest.approx(expected, abs=0.2)
    status = source.status()
    assert status["consecutive_failures"] == 3 and status["last_result"] == "error"
    assert "500" in status["last_error"] and sink.polls == ["error"] * 3 and sink.events.count("error") == 3

    sha = hub.commit(REPO, "main", adapter_files(2))
    c = source.poll_now()
    assert c is not None and c.fingerprint == sha
    status = source.status()
    assert (status["consecutive_failures"], status["last_error"], status["last_result"]) == (0, None, "changed")
    assert status["next_poll_in_s"] == pytest.approx(1.0, abs=0.2)
    assert ceilings == [2.0, 4.0, 8.0]


def test_backoff_is_capped_and_jittered_by_default(hub: FakeHub, make: Any) -> None:
    ceilings: list[float] = []
    source, _ = make(poll_seconds=100.0, jitter=recording(ceilings))
    hub.fail("500", times=6, path="/revision/")
    for _ in range(6):
        source.poll_now()
    assert ceilings == [200.0, 400.0, 800.0, 900.0, 900.0, 900.0]  # max(poll_seconds, 15 min)

    jittered, _ = make(poll_seconds=100.0, jitter=None)
    hub.fail("500", times=5, path="/revision/")
    delays = []
    for _ in range(5):
        jittered.poll_now()
        delays.append(jittered.status()["next_poll_in_s"])
    assert all(0 <= d <= c for d, c in zip(delays, [200, 400, 800, 900, 900], strict=True))
    assert len(set(delays)) > 1


def test_polls_are_spread_by_poll_jitter_around_poll_seconds(hub: FakeHub, make: Any) -> None:
    hub.commit(REPO, "main", adapter_files(1))
    source, _ = make(poll_seconds=10.0, uniform=random.uniform)
    waits = []
    for _ in range(40):
        source.poll_now()
        waits.append(source.status()["next_poll_in_s"])
    assert all(8.9 <= w <= 11.0 for w in waits), waits  # 10 s +- 10 % (poll_jitter 0.1)
    assert max(waits) - min(waits) > 0.5  # spread, not lockstep
    assert 9.5 <= sum(waits) / len(waits) <= 10.5  # the mean stays poll_seconds

    steady, _ = make(poll_seconds=10.0, poll_jitter=0.0, uniform=random.uniform)
    steady.poll_now()
    assert steady.status()["next_poll_in_s"] == pytest.approx(10.0, abs=0.05)


def test_a_missing_revision_is_retried_within_a_second_then_backs_off(hub: FakeHub, make: Any) -> None:
    """A branch being moved (delete_branch, then create_branch) is missing for one round trip."""
    hub.commit(REPO, "main", adapter_files(1))
    ceilings: list[float] = []
    source, sink = make(revision="stable", poll_seconds=30.0, jitter=recording(ceilings))
    for _ in range(3):
        assert source.poll_now() is None
        assert source.status()["next_poll_in_s"] == pytest.approx(1.0, abs=0.1)
        assert "RevisionNotFound" in (source.status()["last_error"] or "") or "stable" in source.status()["last_error"]
    source.poll_now()  # still missing: a wrong revision in the config, not a promotion; the usual backoff
    assert source.status()["next_poll_in_s"] == pytest.approx(ceilings[-1], abs=0.2) and ceilings[-1] == 480.0
    sha = hub.commit(REPO, "stable", adapter_files(2))
    assert source.poll_now() is not None and sink.offers[-1].fingerprint == sha


def test_rate_limited_waits_at_least_retry_after(hub: FakeHub, make: Any) -> None:
    sha = hub.commit(REPO, "main", adapter_files(1))
    source, sink = make(poll_seconds=0.2, jitter=lambda c: 0.0)  # without Retry-After it would retry at once
    hub.fail("429", path="/revision/", retry_after="2")

    source.start()
    sink.wait(lambda: len(sink.offers) == 1)

    assert sink.polls[:2] == ["rate_limited", "changed"] and sink.offers[0].fingerprint == sha
    asked = [r.at for r in hub.requests("GET", "/revision/")]
    assert asked[1] - asked[0] >= 2.0
    assert "rate_limited" in sink.events


def test_a_stalled_connection_is_an_error_within_the_timeout_then_recovers(hub: FakeHub, make: Any) -> None:
    sha = hub.commit(REPO, "main", adapter_files(1))
    source, sink = make()
    hub.fail("stall", path="/revision/", stall_s=30)

    started = time.monotonic()
    assert source.poll_now() is None
    assert time.monotonic() - started < TIMEOUT + 2
    assert sink.polls == ["error"] and "timed out" in source.status()["last_error"].lower()

    c = source.poll_now()
    assert c is not None and c.fingerprint == sha


def test_a_stall_inside_snapshot_download_is_bounded_too(hub: FakeHub, make: Any) -> None:
    # huggingface_hub lists the tree with timeout=None: without the source's cap this waits out the whole stall.
    sha = hub.commit(REPO, "main", adapter_files(1))
    source, _ = make()
    hub.fail("stall", path="/tree/", stall_s=30)

    started = time.monotonic()
    c = source.poll_now()  # the library retries the listing once it timed out (after 1 s)
    assert c is not None and c.fingerprint == sha
    assert time.monotonic() - started < 8


def test_a_truncated_download_is_resumed_or_not_offered(hub: FakeHub, make: Any) -> None:
    files = adapter_files(1)
    sha = hub.commit(REPO, "main", files)
    source, sink = make()
    weights = f"/resolve/{sha}/{WEIGHTS_NAME}"

    # Cut short once: the client notices (Content-Length) and fetches it again within the same poll.
    hub.fail("truncate", method="GET", path=weights)
    c = source.poll_now()
    assert c is not None and files_in(c.path) == files and len(hub.requests("GET", weights)) == 2

    # Cut short every time: the client retries 5 times, 1 s apart, then gives up and deletes the partial file.
    files = adapter_files(2)
    sha = hub.commit(REPO, "main", files)
    weights = f"/resolve/{sha}/{WEIGHTS_NAME}"
    hub.fail("truncate", times=6, method="GET", path=weights)
    assert source.poll_now() is None
    assert len(sink.offers) == 1 and sink.polls == ["changed", "error"] and hub.pending_faults() == 0
    assert len(hub.requests("GET", weights)) == 6
    assert "complete message body" in source.status()["last_error"]

    c = source.poll_now()
    assert c is not None and c.fingerprint == sha and files_in(c.path) == files


@pytest.mark.parametrize("linked", [True, False], ids=["short-blob", "short-file"])
def test_a_cached_file_of_the_wrong_size_is_downloaded_again(
    hub: FakeHub, make: Any, tmp_path: Path, linked: bool
) -> None:
    files = adapter_files(1)
    sha = hub.commit(REPO, "main", files)
    # A short blob linked from the snapshot, as a download whose size nobody reported would leave it; or a
    # short plain file there (a cache copied without symlinks).
    repo = tmp_path / "cache" / "models--acme--support-lora"
    blob = repo / "blobs" / hashlib.sha256(files[WEIGHTS_NAME]).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(files[WEIGHTS_NAME][:100])
    (repo / "snapshots" / sha).mkdir(parents=True)
    if linked:
        (repo / "snapshots" / sha / WEIGHTS_NAME).symlink_to(blob)
    else:
        (repo / "snapshots" / sha / WEIGHTS_NAME).write_bytes(files[WEIGHTS_NAME][:100])
    source, sink = make()

    assert source.poll_now() is None  # the library trusts the file it finds; the size check does not
    assert sink.polls == ["error"] and "incomplete" in source.status()["last_error"]
    c = source.poll_now()
    assert c is not None and files_in(c.path) == files


def test_the_token_file_is_sent_as_a_bearer_token(hub: FakeHub, make: Any, tmp_path: Path, monkeypatch: Any) -> None:
    hub.commit(REPO, "main", adapter_files(1))
    token_file = tmp_path / "token"
    token_file.write_text("hf_from_file\n")
    monkeypatch.setenv("HF_TOKEN", "hf_from_env")  # the file wins

    source, _ = make(token_file=str(token_file))
    assert source.poll_now() is not None
    sent = {r.headers.get("authorization") for r in hub.requests()}
    assert sent == {"Bearer hf_from_file"} and len(hub.requests()) == 6

    hub.clear_requests()
    hub.commit(REPO, "main", adapter_files(2))
    env_only, _ = make()
    assert env_only.poll_now() is not None
    assert {r.headers.get("authorization") for r in hub.requests()} == {"Bearer hf_from_env"}

    missing, sink = make(token_file=str(tmp_path / "absent"))
    assert missing.poll_now() is None and sink.polls == ["error"]
    assert "token_file" in missing.status()["last_error"]


def test_start_offers_commits_made_while_running_and_stop_is_prompt(hub: FakeHub, make: Any) -> None:
    first = hub.commit(REPO, "main", adapter_files(1))
    source, sink = make(poll_seconds=0.2)
    source.start()
    sink.wait(lambda: len(sink.offers) == 1)
    second = hub.commit(REPO, "main", adapter_files(2))
    sink.wait(lambda: len(sink.offers) == 2)
    assert [o.fingerprint for o in sink.offers] == [first, second]
    assert sink.polls[0] == "changed" and set(sink.polls) <= {"changed", "unchanged"}

    started = time.monotonic()
    source.stop()
    source.stop()
    assert time.monotonic() - started < 1.0
    polls = len(sink.polls)
    time.sleep(0.5)
    assert len(sink.polls) == polls  # no poll after stop


def test_update_config_applies_a_new_revision_at_once(hub: FakeHub, make: Any) -> None:
    v1 = hub.commit(REPO, "main", adapter_files(1))
    v2 = hub.commit(REPO, "main", adapter_files(2))
    hub.tag(REPO, "v1", v1)
    source, sink = make(revision="v1", poll_seconds=60.0)
    source.start()
    sink.wait(lambda: len(sink.offers) == 1)

    source.update_config(HubSourceConfig(REPO, "main", 60.0, endpoint=hub.url))
    sink.wait(lambda: len(sink.offers) == 2, timeout=3.0)  # not after 60 s
    assert [o.fingerprint for o in sink.offers] == [v1, v2]
    assert source.status()["revision"] == "main"

    source.update_config(HubSourceConfig(REPO, "main", 5.0, endpoint=hub.url))
    assert source.status()["next_poll_in_s"] <= 5.0


def test_reported_kinds_are_the_bounded_metric_labels(hub: FakeHub, make: Any) -> None:
    hub.commit(REPO, "main", adapter_files(1))
    source, sink = make(poll_seconds=1.0)
    hub.fail("500", path="/revision/")
    hub.fail("429", path="/revision/", retry_after="1")
    for _ in range(4):
        source.poll_now()
    assert sink.polls == ["error", "rate_limited", "changed", "unchanged"]
    assert set(sink.polls) == set(HUB_POLL_RESULTS) and set(sink.events) == set(EVENT_KINDS)


def test_hub_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert hub_cache_dir(tmp_path) == tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "shared"))
    assert hub_cache_dir(tmp_path) == tmp_path / "shared"
    assert os.fspath(hub_cache_dir("/srv/state")) == str(tmp_path / "shared")


# ---- disk use: garbage collection, interrupted downloads, a full disk --------------------------------------------


def cache_usage(cache: Path) -> tuple[int, int]:
    """(bytes in regular files, snapshot folders) of the test repo's share of the cache."""
    files = [p for p in cache.rglob("*") if p.is_file() and not p.is_symlink()]
    snapshots = list((cache / "models--acme--support-lora" / "snapshots").glob("*"))
    return sum(p.stat().st_size for p in files), len(snapshots)


def leftovers(cache: Path, kept: set[str]) -> list[str]:
    """What is in the cache beyond the snapshots of ``kept`` and the blobs, listings and locks they need."""
    repo = cache / "models--acme--support-lora"
    linked = {
        Path(os.path.normpath(p.parent / os.readlink(p))) for s in kept for p in (repo / "snapshots" / s).iterdir()
    }
    extra = [p for p in (repo / "snapshots").iterdir() if p.name not in kept]
    extra += [p for p in (repo / "blobs").iterdir() if p not in linked]  # partial downloads included
    extra += [p for p in (repo / "trees").iterdir() if p.name not in {f"{s}.json" for s in kept}]
    extra += [p for p in (cache / ".locks" / repo.name).iterdir() if repo / "blobs" / p.stem not in linked]
    extra += list(cache.rglob("*.incomplete")) + list((repo / "refs").rglob("*") if (repo / "refs").exists() else [])
    return sorted(str(p.relative_to(cache)) for p in extra)


def chain_of(sink: Sink) -> Callable[[], list[str]]:
    """The daemon's rollback chain as the source sees it: every offer went live, oldest first."""
    return lambda: [o.version for o in sink.offers]


def test_disk_use_stays_bounded_over_50_commits(hub: FakeHub, make: Any, tmp_path: Path) -> None:
    # 25 distinct weights files (each in two consecutive commits: blobs shared by content) and one config blob
    # shared by all 50 commits; about 100 KB a commit.
    keep = 3
    sink_box: list[Sink] = []
    source, sink = make(keep_versions=keep, keep=lambda: chain_of(sink_box[0])())
    sink_box.append(sink)
    cache = tmp_path / "cache"
    unbounded, worst = 0, 0
    sizes: list[int] = []
    for i in range(50):
        files = wide_adapter_files(i // 2, 3200)
        sha = hub.commit(REPO, "main", files)
        c = source.poll_now()
        assert c is not None and c.fingerprint == sha, sink.polls[-3:]
        unbounded += sum(len(b) for b in files.values())
        sizes.append(sum(len(b) for b in files.values()))
        used, snapshots = cache_usage(cache)
        worst = max(worst, used)
        kept = [o.fingerprint for o in sink.offers[-keep:]]
        assert snapshots == min(i + 1, keep), i
        assert used <= sum(sizes[-keep:]) + 4096 * (keep + 1), (i, used)  # + the listings and the CACHEDIR.TAG
        assert leftovers(cache, set(kept)) == [], i
        for o in sink.offers[-keep:]:  # every kept commit whole, shared blobs included
            assert files_in(o.path) == wide_adapter_files(sink.offers.index(o) // 2, 3200), i
    distinct = sum(len(b) for b in {wide_adapter_files(i, 3200)[WEIGHTS_NAME] for i in range(25)})
    print(f"\n50 commits: {unbounded / 1e6:.2f} MB downloaded, {distinct / 1e6:.2f} MB of distinct blobs; "
          f"the cache held at most {worst / 1e6:.3f} MB (keep_versions={keep})")  # fmt: skip
    assert worst < distinct / 8


def test_gc_keeps_what_rollback_needs_and_nothing_the_chain_dropped(hub: FakeHub, make: Any, tmp_path: Path) -> None:
    rolled_back: set[str] = set()
    others: list[str] = []  # chain entries that are not Hub versions

    def chain() -> list[str]:  # each offer went live, except those rolled back from
        return others + [o.version for o in sink.offers if o.version not in rolled_back]

    source, sink = make(keep_versions=2, keep=chain)
    shas = []
    for i in range(4):
        shas.append(hub.commit(REPO, "main", adapter_files(i)))
        assert source.poll_now() is not None
    cache = tmp_path / "cache"
    assert snapshot_dirs(cache) == set(shas[-2:]) and leftovers(cache, set(shas[-2:])) == []
    # Rolled back (the chain pops): the previous commit's files are all there to re-stage from.
    rolled_back.add(sink.offers[3].version)
    assert files_in(sink.offers[2].path) == adapter_files(2)
    # The next commit goes live: the chain is [.., 1, 2, 4] now, so 2 and 4 stay, 3 (rolled back from) goes.
    shas.append(hub.commit(REPO, "main", adapter_files(4)))
    assert source.poll_now() is not None
    assert snapshot_dirs(cache) == {shas[2], shas[4]} and leftovers(cache, {shas[2], shas[4]}) == []
    assert files_in(sink.offers[2].path) == adapter_files(2)
    # Entries that are not Hub versions (the base model, a folder) neither count nor break anything.
    others[:] = ["base", "alpha"]
    shas.append(hub.commit(REPO, "main", adapter_files(5)))
    assert source.poll_now() is not None
    assert snapshot_dirs(cache) == {shas[4], shas[5]}


def snapshot_dirs(cache: Path) -> set[str]:
    return {p.name for p in (cache / "models--acme--support-lora" / "snapshots").iterdir()}


def test_a_failing_keep_callback_deletes_nothing(hub: FakeHub, make: Any, tmp_path: Path) -> None:
    calls: list[int] = []

    def broken() -> list[str]:
        calls.append(1)
        raise RuntimeError("the daemon is not ready")

    source, _ = make(keep_versions=1, keep=broken)
    for i in range(3):
        hub.commit(REPO, "main", adapter_files(i))
        assert source.poll_now() is not None
    assert len(snapshot_dirs(tmp_path / "cache")) == 3 and calls


@pytest.mark.parametrize("keep", [True, False], ids=["with-chain", "without-chain"])
def test_an_interrupted_download_leaves_nothing_behind(hub: FakeHub, make: Any, tmp_path: Path, keep: bool) -> None:
    first = hub.commit(REPO, "main", adapter_files(1))
    sink_box: list[Sink] = []
    source, sink = make(**({"keep": lambda: chain_of(sink_box[0])()} if keep else {}))
    sink_box.append(sink)
    assert source.poll_now() is not None
    cache = tmp_path / "cache"
    before = sorted(p for p in cache.rglob("*"))

    # The config arrives, the weights never do whole: the client retries 5 times, then gives up.
    second = hub.commit(REPO, "main", wide_adapter_files(2, 20000))
    hub.fail("truncate", times=6, method="GET", path=f"/resolve/{second}/{WEIGHTS_NAME}", fraction=0.3)
    assert source.poll_now() is None and sink.polls[-1] == "error" and hub.pending_faults() == 0

    assert snapshot_dirs(cache) == {first} and leftovers(cache, {first}) == []
    assert sorted(p for p in cache.rglob("*")) == before  # not even an empty folder more
    c = source.poll_now()
    assert c is not None and c.fingerprint == second and files_in(c.path) == wide_adapter_files(2, 20000)


def test_what_a_killed_download_left_is_collected_at_start_unless_it_is_in_flight(
    hub: FakeHub, make: Any, tmp_path: Path
) -> None:
    import fcntl

    sha = hub.commit(REPO, "main", adapter_files(1))
    cache = tmp_path / "cache"
    repo = cache / "models--acme--support-lora"
    locks = cache / ".locks" / repo.name
    for d in (repo / "blobs", repo / "snapshots" / ("f" * 40), repo / "trees", repo / "refs", locks):
        d.mkdir(parents=True)
    (repo / "blobs" / "dead.0123abcd.incomplete").write_bytes(b"x" * 5000)  # SIGKILLed mid-download
    (repo / "blobs" / "orphan").write_bytes(b"y" * 3000)  # downloaded, never linked
    (repo / "snapshots" / ("f" * 40) / CONFIG_NAME).symlink_to("../../blobs/orphan")
    (repo / "trees" / ("f" * 40 + ".json")).write_text("{}")
    (repo / "trees" / "tmpab12.tmp").write_text("")
    (repo / "refs" / "main").write_text("f" * 40)
    (locks / "dead.lock").touch()
    (repo / "blobs" / "busy.89abcdef.incomplete").write_bytes(b"z" * 100)  # another process is downloading it
    (locks / "busy.lock").touch()
    held = os.open(locks / "busy.lock", os.O_RDWR)
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        source, sink = make(keep=lambda: [])  # nothing committed
        hub.fail("500", path="/revision/")  # collected at start even when the Hub is down
        assert source.poll_now() is None and sink.polls == ["error"]
        left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if not p.is_dir())
        assert left == [
            ".locks/models--acme--support-lora/busy.lock",
            "models--acme--support-lora/blobs/busy.89abcdef.incomplete",
        ]
    finally:
        os.close(held)
    c = source.poll_now()
    assert c is not None and c.fingerprint == sha
    # The offer was not kept by the (empty) chain, so it went too; the released lock's partial file as well.
    assert leftovers(cache, set()) == [] and snapshot_dirs(cache) == set()


def test_out_of_space_while_downloading_backs_off_and_recovers(hub: FakeHub, make: Any) -> None:
    with small_fs("1m") as fs:
        cache = fs / "cache"
        first = hub.commit(REPO, "main", adapter_files(1))
        sink_box: list[Sink] = []
        source, sink = make(poll_seconds=0.3, cache=cache, keep=lambda: chain_of(sink_box[0])())
        sink_box.append(sink)
        assert source.poll_now() is not None
        big = wide_adapter_files(2, 16000)  # 256 KB of weights
        second = hub.commit(REPO, "main", big)
        filler = fill(fs, leave=128 * 1024)

        assert source.poll_now() is None
        status = source.status()
        assert sink.polls[-1] == "error" and status["consecutive_failures"] == 1
        assert "No space left on device" in status["last_error"], status["last_error"]
        assert status["next_poll_in_s"] == pytest.approx(0.6, abs=0.1)  # backed off: 2x poll_seconds
        assert snapshot_dirs(cache) == {first} and leftovers(cache, {first}) == []
        assert files_in(sink.offers[0].path) == adapter_files(1)  # the live commit's files untouched

        filler.unlink()
        freed, polled = time.monotonic(), len(sink.polls)
        source.start()  # the thread's next poll is the backed-off one
        # The poll is counted after its offer returns: wait for both, not the offer alone.
        sink.wait(lambda: len(sink.offers) == 2 and len(sink.polls) > polled)
        recovered = time.monotonic() - freed
        assert sink.offers[1].fingerprint == second and files_in(sink.offers[1].path) == big
        assert sink.polls[polled] == "changed" and source.status()["consecutive_failures"] == 0
        assert 0.3 <= recovered < 3.0, recovered  # waited out the backoff, no more
        print(f"\nout of space -> space back -> live: {recovered:.2f}s (backoff 0.6s)")
        source.stop()


def test_a_shared_cache_loses_nothing_but_this_repos_old_downloads(
    hub: FakeHub, make: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shared = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(shared))
    # Another tool's downloads in the same cache: another model (snapshot, blob, ref, listing, lock), a dataset.
    other = shared / "models--other--model"
    for d in (other / "blobs", other / "snapshots" / ("a" * 40), other / "refs", other / "trees"):
        d.mkdir(parents=True)
    (other / "blobs" / "b1").write_bytes(b"other weights")
    (other / "blobs" / "b2.0123abcd.incomplete").write_bytes(b"half")
    (other / "snapshots" / ("a" * 40) / "model.safetensors").symlink_to("../../blobs/b1")
    (other / "refs" / "main").write_text("a" * 40)
    (other / "trees" / ("a" * 40 + ".json")).write_text("{}")
    (shared / ".locks" / other.name).mkdir(parents=True)
    (shared / ".locks" / other.name / "b2.lock").touch()
    (shared / "datasets--other--data" / "blobs").mkdir(parents=True)
    (shared / "datasets--other--data" / "blobs" / "d1").write_bytes(b"rows")

    def listing() -> dict[str, bytes | str]:
        found: dict[str, bytes | str] = {}
        for p in sorted(shared.rglob("*")):
            if "support-lora" in str(p) or p == shared / "CACHEDIR.TAG":
                continue
            found[str(p.relative_to(shared))] = (
                os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else ""
            )
        return found

    before = listing()
    sink_box: list[Sink] = []
    source, sink = make(keep_versions=1, cache=hub_cache_dir(tmp_path / "state"), keep=lambda: chain_of(sink_box[0])())
    sink_box.append(sink)
    for i in range(4):
        hub.commit(REPO, "main", adapter_files(i))
        assert source.poll_now() is not None
    assert snapshot_dirs(shared) == {sink.offers[-1].fingerprint}  # this repo: collected
    assert listing() == before  # everything else: untouched
    assert not (tmp_path / "state").exists()
