"""History: committed chain, rollback bookkeeping, rejections and the persisted state.json (no engine)."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import threading
from pathlib import Path

import pytest

from hotswap_core import history as history_mod
from hotswap_core.history import (
    MAX_CHAIN,
    MAX_MESSAGE,
    MAX_RECORDS,
    MAX_REJECTED,
    MAX_ROLLED_BACK,
    MAX_SUPERSEDED,
    STATE_BYTES_BOUND,
    STATE_FILE,
    History,
    SwapRecord,
    atomic_write,
    fingerprint,
)
from hotswap_core.slots import BASE_VERSION, AdapterVersion


def _version(n: int) -> AdapterVersion:
    return AdapterVersion(version=f"v{n}", sha256=f"{n:064x}", source="directory", path=f"/adapters/v{n}")


V1, V2, V3 = _version(1), _version(2), _version(3)


def _state(state_dir: Path) -> dict:
    return json.loads((state_dir / STATE_FILE).read_text())


def _assert_defaults(h: History) -> None:
    assert h.chain == [BASE_VERSION]
    assert h.rolled_back == set()
    assert h.live_since is None
    assert h.rejected == {}


# ---- persistence --------------------------------------------------------------------------------


def test_round_trip_restores_chain_rolled_back_live_since_and_rejected(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    h.committed(V1)
    h.committed(V2)
    h.committed(V3)
    h.rolled_back_to_previous()  # V3 -> rolled_back, live is V2
    h.reject("/adapters/bad", "fp-bad", "shape_mismatch", "lora_A has the wrong rank")
    assert h.save() is True

    fresh = History(str(tmp_path))
    assert fresh.load() is True
    assert fresh.chain == [BASE_VERSION, V1, V2]
    assert all(isinstance(v, AdapterVersion) for v in fresh.chain)
    assert fresh.live == V2
    assert fresh.rolled_back == {V3.sha256}
    assert fresh.live_since == h.live_since
    assert isinstance(fresh.live_since, float)
    assert fresh.rejected == h.rejected
    assert fresh.rejected["/adapters/bad"].reason == "shape_mismatch"
    assert fresh.is_rejected("/adapters/bad", "fp-bad")
    assert not fresh.is_rejected("/adapters/bad", "fp-changed")


def test_round_trip_of_fresh_history_keeps_base_and_no_live_since(tmp_path: Path) -> None:
    assert History(str(tmp_path)).save() is True
    fresh = History(str(tmp_path))
    assert fresh.load() is True
    _assert_defaults(fresh)


def test_load_without_state_file_returns_false(tmp_path: Path) -> None:
    h = History(str(tmp_path / "never-written"))
    assert h.load() is False
    _assert_defaults(h)


def test_no_state_dir_save_is_a_noop_and_load_is_false() -> None:
    h = History(None)
    h.committed(V1)
    assert h.save() is True
    assert h.persist_failures == 0
    assert h.load() is False
    assert h.live == V1  # load() with nothing to read changes nothing


_V1_JSON = dataclasses.asdict(V1)


@pytest.mark.parametrize(
    "content",
    [
        pytest.param("{not json", id="not-json"),
        pytest.param("", id="empty-file"),
        pytest.param(json.dumps([_V1_JSON]), id="json-list"),
        pytest.param(json.dumps("chain"), id="json-string"),
        pytest.param(json.dumps({"rolled_back": [], "live_since": 1.0}), id="no-chain-key"),
        pytest.param(json.dumps({"chain": [{"version": "v1"}]}), id="chain-entry-missing-keys"),
        pytest.param(json.dumps({"chain": [{**_V1_JSON, "extra": 1}]}), id="chain-entry-unknown-key"),
        pytest.param(json.dumps({"chain": ["v1"]}), id="chain-entry-not-object"),
        pytest.param(json.dumps({"chain": 5}), id="chain-not-list"),
        pytest.param(json.dumps({"chain": [_V1_JSON], "live_since": "yesterday"}), id="live-since-string"),
        pytest.param(json.dumps({"chain": [_V1_JSON], "rolled_back": 3}), id="rolled-back-not-list"),
        pytest.param(json.dumps({"chain": [_V1_JSON], "rejected": [{"path": "/x"}]}), id="rejection-missing-keys"),
        pytest.param(json.dumps({"chain": [_V1_JSON], "rejected": ["/x"]}), id="rejection-not-object"),
    ],
)
def test_corrupted_or_wrong_shape_state_is_ignored(tmp_path: Path, content: str) -> None:
    (tmp_path / STATE_FILE).write_text(content)
    h = History(str(tmp_path))
    assert h.load() is False
    _assert_defaults(h)


def test_valid_state_alongside_bad_one_loads(tmp_path: Path) -> None:
    # Control for the parametrized test above: the same shapes, well-formed, do load.
    (tmp_path / STATE_FILE).write_text(json.dumps({"chain": [_V1_JSON], "live_since": 12.5}))
    h = History(str(tmp_path))
    assert h.load() is True
    assert h.chain == [V1]
    assert h.live_since == 12.5


def test_load_of_empty_chain_falls_back_to_base(tmp_path: Path) -> None:
    (tmp_path / STATE_FILE).write_text(json.dumps({"chain": [], "live_since": None}))
    h = History(str(tmp_path))
    assert h.load() is True
    assert h.chain == [BASE_VERSION]


# ---- committed chain ------------------------------------------------------------------------------


def test_committed_appends_sets_live_since_and_persists(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    assert h.previous() is None
    h.committed(V1)
    assert h.chain == [BASE_VERSION, V1]
    assert h.live == V1
    assert h.previous() == BASE_VERSION
    first = h.live_since
    assert first is not None
    h.committed(V2)
    assert h.chain == [BASE_VERSION, V1, V2]
    assert h.live_since is not None and h.live_since >= first
    assert [v["sha256"] for v in _state(tmp_path)["chain"]] == [BASE_VERSION.sha256, V1.sha256, V2.sha256]


def test_committed_same_sha_as_head_does_not_duplicate_and_keeps_live_since(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    h.committed(V1)
    h.live_since = 1000.0  # a commit from a previous run
    h.save()

    restored = History(str(tmp_path))
    assert restored.load() is True
    # Start-up restore: the engine re-stages the chain's head and reports it as committed again.
    restaged = dataclasses.replace(V1, path="/moved/v1")
    restored.committed(restaged)
    assert restored.chain == [BASE_VERSION, restaged]
    assert restored.live_since == 1000.0


def test_rollback_pops_records_sha_and_moves_live_since(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    h.committed(V1)
    h.committed(V2)
    h.live_since = 1000.0
    live = h.rolled_back_to_previous()
    assert live == V1
    assert h.live == V1
    assert h.chain == [BASE_VERSION, V1]
    assert h.rolled_back == {V2.sha256}
    assert h.live_since is not None and h.live_since > 1000.0
    saved = _state(tmp_path)
    assert saved["rolled_back"] == [V2.sha256]
    assert saved["live_since"] == h.live_since


def test_committing_a_rolled_back_version_again_clears_it(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    h.committed(V1)
    h.committed(V2)
    h.rolled_back_to_previous()
    assert V2.sha256 in h.rolled_back
    h.committed(V2)
    assert h.rolled_back == set()
    assert h.chain == [BASE_VERSION, V1, V2]
    assert _state(tmp_path)["rolled_back"] == []


def test_chain_is_bounded_at_50(tmp_path: Path) -> None:
    h = History(None)
    for n in range(1, 61):
        h.committed(_version(n))
    assert len(h.chain) == 50
    assert h.chain[0] == _version(11)
    assert h.live == _version(60)


# ---- rejections -----------------------------------------------------------------------------------


def test_is_rejected_only_while_fingerprint_matches(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    assert not h.is_rejected("/adapters/a", "fp1")
    h.reject("/adapters/a", "fp1", "bad_config", "rank too large")
    assert h.is_rejected("/adapters/a", "fp1")
    assert not h.is_rejected("/adapters/a", "fp2")
    assert not h.is_rejected("/adapters/b", "fp1")
    # Rejected again with the new content: now that content is the one skipped.
    h.reject("/adapters/a", "fp2", "bad_config", "still too large")
    assert h.is_rejected("/adapters/a", "fp2")
    assert not h.is_rejected("/adapters/a", "fp1")
    assert [r["path"] for r in _state(tmp_path)["rejected"]] == ["/adapters/a"]


def test_reject_bounds_the_dict_dropping_the_oldest() -> None:
    h = History(None)
    n = MAX_REJECTED
    for i in range(n):
        h.reject(f"/a/{i}", "fp", "r", "m")
    assert len(h.rejected) == n
    h.reject(f"/a/{n}", "fp", "r", "m")
    assert len(h.rejected) == n
    assert "/a/0" not in h.rejected
    assert "/a/1" in h.rejected and f"/a/{n}" in h.rejected
    # Oldest by rejection time, not by first insertion: re-rejecting /a/1 makes /a/2 the oldest.
    h.reject("/a/1", "fp-new", "r", "m")
    assert len(h.rejected) == n
    h.reject(f"/a/{n + 1}", "fp", "r", "m")
    assert len(h.rejected) == n
    assert "/a/1" in h.rejected
    assert "/a/2" not in h.rejected
    assert f"/a/{n + 1}" in h.rejected
    assert h.rejections()[0].path == f"/a/{n + 1}" and h.rejections()[1].path == "/a/1"  # newest first


def test_long_fingerprints_and_messages_are_capped_but_still_compared() -> None:
    h = History(None)
    fp = "|".join(f"file-{i}.bin:{i}:{i * 1000}" for i in range(2000))  # a folder of 2,000 files
    h.reject("/a/many", fp, "malformed", "x" * 100_000)
    r = h.rejected["/a/many"]
    assert len(r.fingerprint) < 100 and len(r.message) <= MAX_MESSAGE
    assert h.is_rejected("/a/many", fp)
    assert not h.is_rejected("/a/many", fp + "|one-more:1:1")


def test_superseded_are_kept_newest_first_and_round_trip(tmp_path: Path) -> None:
    h = History(str(tmp_path))
    h.supersede([("/w/v1", "v1"), ("/w/v2", "v2")], by="v3")
    assert [(s.version, s.by) for s in h.supersessions()] == [("v2", "v3"), ("v1", "v3")]
    assert [s["version"] for s in _state(tmp_path)["superseded"]] == ["v1", "v2"]
    fresh = History(str(tmp_path))
    assert fresh.load() is True
    assert fresh.supersessions() == h.supersessions()
    assert fresh.rejected == {} and fresh.chain == [BASE_VERSION]  # not a swap, not a rejection


def test_history_stays_bounded_over_10000_swaps() -> None:
    # /dev/shm when there is one: 10,000 fsyncs of state.json on a shared disk take minutes, on tmpfs
    # seconds; the writes, renames and reads are the real ones either way.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="hs-history-", dir=base) as state_dir:
        h = History(state_dir)
        state = Path(state_dir) / STATE_FILE
        sizes: list[int] = []
        folder = "/srv/hotswapd/adapters/" + "deep/" * 20  # longish paths: ~120 characters
        fp = "|".join(f"f{i}:{1000 + i}:{1733000000000000000 + i}" for i in range(12))
        for n in range(10_000):
            v = AdapterVersion(f"v{n:05d}", f"{n:064x}", "directory", f"{folder}v{n:05d}")
            kind = n % 10
            if kind < 4:
                h.committed(v)
            elif kind == 4 and h.previous() is not None:
                h.rolled_back_to_previous()
            elif kind < 8:
                h.reject(f"{folder}v{n:05d}", fp, "shape_mismatch", f"{folder}v{n:05d}: lora_A: shape [8, 64] " * 8)
            else:
                h.supersede([(f"{folder}v{n:05d}-{i}", f"v{n:05d}-{i}") for i in range(3)], by=v.version)
            h.add(SwapRecord(v.version, v.sha256, "directory", v.path, "success", message="m" * 5000))
            if n % 500 == 499:
                sizes.append(state.stat().st_size)
        assert len(h.chain) <= MAX_CHAIN
        assert len(h.rejected) <= MAX_REJECTED
        assert len(h.superseded) <= MAX_SUPERSEDED
        assert len(h.rolled_back) <= MAX_ROLLED_BACK and len(h.rolled_back_versions) <= MAX_ROLLED_BACK
        assert len(h.records) <= MAX_RECORDS
        assert all(r.message is not None and len(r.message) <= MAX_MESSAGE for r in h.records)
        # The file stops growing once every collection is full, far under the worst-case bound.
        assert max(sizes) <= STATE_BYTES_BOUND
        assert max(sizes) < 1_000_000, sizes
        assert sizes[-1] <= sizes[len(sizes) // 2] * 1.05, sizes
        fresh = History(state_dir)
        assert fresh.load() is True
        assert fresh.chain == h.chain
        assert fresh.rejected == h.rejected
        assert fresh.supersessions() == h.supersessions()
        assert list(fresh.rolled_back) == list(h.rolled_back)
        assert list(fresh.rolled_back_versions) == list(h.rolled_back_versions)
        assert fresh.live_since == h.live_since
        print(f"state.json after 10,000 operations: {sizes[-1]} bytes (max {max(sizes)})")


# ---- write failures -------------------------------------------------------------------------------


def test_unwritable_state_dir_counts_failures_without_raising(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a regular file, so mkdir below it fails even as root")
    h = History(str(blocker / "state"))
    assert h.save() is False
    assert h.persist_failures == 1
    h.committed(V1)  # saves internally; must not raise
    h.reject("/adapters/a", "fp", "r", "m")
    assert h.persist_failures == 3
    assert h.live == V1  # serving state still updated in memory
    assert blocker.read_text().startswith("a regular file")


def test_atomic_write_leaves_only_the_target(tmp_path: Path) -> None:
    target = tmp_path / STATE_FILE
    atomic_write(target, b'{"a": 1}')
    atomic_write(target, b'{"a": 2}')
    assert target.read_bytes() == b'{"a": 2}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_atomic_write_over_a_temp_file_left_by_a_crash(tmp_path: Path) -> None:
    target = tmp_path / STATE_FILE
    (tmp_path / f".{STATE_FILE}.tmp").write_bytes(b"half a state from a killed save, longer than the next")
    atomic_write(target, b'{"a": 3}')
    assert target.read_bytes() == b'{"a": 3}'
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    assert target.stat().st_mode & 0o777 == 0o600  # the state names files and versions: not world-readable


def test_atomic_write_creates_missing_parent(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / STATE_FILE
    atomic_write(target, b"x")
    assert target.read_bytes() == b"x"


def test_interrupted_write_keeps_previous_file_and_no_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / STATE_FILE
    atomic_write(target, b"old")

    def boom(src: object, dst: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr(history_mod.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]


def test_interrupted_save_keeps_previous_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = History(str(tmp_path))
    h.committed(V1)
    before = (tmp_path / STATE_FILE).read_bytes()

    def boom(src: object, dst: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(history_mod.os, "replace", boom)
    h.committed(V2)
    assert h.persist_failures == 1
    assert (tmp_path / STATE_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_FILE]
    monkeypatch.undo()

    fresh = History(str(tmp_path))
    assert fresh.load() is True
    assert fresh.chain == [BASE_VERSION, V1]


# ---- fingerprint ----------------------------------------------------------------------------------


def test_fingerprint_changes_with_content_and_size(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(b"a" * 16)
    (adapter / "adapter_config.json").write_text("{}")
    fp0 = fingerprint(adapter)
    assert fp0 == fingerprint(adapter)  # stable while nothing changes
    assert "adapter_model.safetensors" in fp0

    st0 = weights.stat()
    weights.write_bytes(b"a" * 17)  # size change; mtime pinned so only the size tells
    os.utime(weights, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    fp1 = fingerprint(adapter)
    assert fp1 != fp0

    # Same size, new content: a later write has a later mtime (set explicitly: coarse fs clocks).
    st = weights.stat()
    weights.write_bytes(b"b" * 17)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    fp2 = fingerprint(adapter)
    assert fp2 != fp1

    (adapter / "extra.bin").write_bytes(b"")  # a new file
    assert fingerprint(adapter) != fp2


def test_fingerprint_of_missing_folder_is_unreadable(tmp_path: Path) -> None:
    assert fingerprint(tmp_path / "nope") == "unreadable"
    assert fingerprint(str(tmp_path / "nope")) == "unreadable"
    assert fingerprint(tmp_path) != "unreadable"


def test_recent_and_rejections_are_safe_to_read_while_swaps_record() -> None:
    # GET /v1/adapters reads these on the event loop while the source thread records swaps: iterating
    # the live deque there raised "deque mutated during iteration" (a 500 seen in the soak test).
    history = History(None)
    stop = threading.Event()

    def record() -> None:
        i = 0
        while not stop.is_set():
            history.add(SwapRecord(f"v{i}", None, "directory", None, "rejected"))
            history.reject(f"/w/v{i}", "fp", "bad_config", "x")
            i += 1

    writer = threading.Thread(target=record)
    writer.start()
    try:
        for _ in range(2000):
            recent = history.recent(50)
            assert len(recent) <= 50 and all(r.result == "rejected" for r in recent)
            history.rejections()
    finally:
        stop.set()
        writer.join()
    assert history.recent(1)[0].version == history.records[-1].version  # newest first
