"""Swap history: records, the committed-version chain (for rollback), rejected candidates, persisted state.

State is written to ``state_dir/state.json`` atomically (temp file, fsync, rename, fsync dir), so a
crash at any point leaves either the old or the new state, never a torn one. A full or read-only
``state_dir`` is logged and counted (``persist_failures``) but never stops serving.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import os
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotswap_core.slots import BASE_VERSION, AdapterVersion

log = logging.getLogger("hotswapd.history")

STATE_FILE = "state.json"


@dataclass(frozen=True)
class SwapRecord:
    """One transaction's outcome. ``result``: success | rejected | failed | rolled_back | unchanged."""

    version: str
    sha256: str | None
    source: str
    path: str | None
    result: str
    reason: str | None = None
    message: str | None = None
    phases: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    stall_s: float | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Rejection:
    path: str
    fingerprint: str
    reason: str
    message: str
    at: float


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Cheap content identity of an adapter folder: name, size and mtime of each file in it.

    Used to skip a rejected candidate until something in it changes, without hashing it again.
    """
    p = Path(path)
    try:
        entries = sorted(f"{e.name}:{e.stat().st_size}:{e.stat().st_mtime_ns}" for e in p.iterdir() if e.is_file())
    except OSError:
        return "unreadable"
    return "|".join(entries)


class History:
    def __init__(self, state_dir: str | None, max_records: int = 200) -> None:
        self.state_dir = Path(state_dir) if state_dir else None
        self.records: deque[SwapRecord] = deque(maxlen=max_records)
        self.rejected: dict[str, Rejection] = {}
        # Committed versions, oldest first; the last one is live. Rollback pops.
        self.chain: list[AdapterVersion] = [BASE_VERSION]
        # A version explicitly rolled back from is not re-applied until a newer candidate lands.
        self.rolled_back: set[str] = set()
        self.rolled_back_versions: set[str] = set()  # their names (a Hub source re-offers repo@sha on restart)
        # Unix time the live version was committed (or rolled back to): a candidate that landed
        # before it is not newer, so a restart does not undo an operator's swap or rollback.
        self.live_since: float | None = None
        self.persist_failures = 0
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()

    # ---- records and rejections -------------------------------------------------------------
    def add(self, record: SwapRecord) -> None:
        with self._lock:
            self.records.append(record)

    def reject(self, path: str, fp: str, reason: str, message: str) -> None:
        with self._lock:
            self.rejected[path] = Rejection(path, fp, reason, message, time.time())
            if len(self.rejected) > 1000:  # bounded: forget the oldest
                del self.rejected[min(self.rejected.values(), key=lambda r: r.at).path]
        self.save()

    def recent(self, n: int) -> list[SwapRecord]:
        """The newest ``n`` records, newest first: a copy, because swaps append from other threads
        and iterating the deque while one does raises ``RuntimeError: deque mutated during iteration``."""
        with self._lock:
            return list(itertools.islice(reversed(self.records), n))

    def rejections(self) -> list[Rejection]:
        """Rejected candidates, newest first: a copy (the source and swaps add to them from other threads)."""
        with self._lock:
            found = list(self.rejected.values())
        return sorted(found, key=lambda r: r.at, reverse=True)

    def is_rejected(self, path: str, fp: str) -> bool:
        """True while ``path`` still has the content it had when it was rejected."""
        with self._lock:
            r = self.rejected.get(path)
            return r is not None and r.fingerprint == fp

    # ---- committed chain --------------------------------------------------------------------
    @property
    def live(self) -> AdapterVersion:
        return self.chain[-1]

    def committed(self, version: AdapterVersion) -> None:
        with self._lock:
            if self.chain[-1].sha256 == version.sha256:
                # Restored at start-up: already the chain's head, and live since its first commit.
                self.chain[-1] = version
                return
            self.chain.append(version)
            del self.chain[:-50]  # bounded; rollback depth of 50 is plenty
            self.rolled_back.discard(version.sha256)
            self.rolled_back_versions.discard(version.version)
            self.live_since = time.time()
        self.save()

    def previous(self) -> AdapterVersion | None:
        return self.chain[-2] if len(self.chain) >= 2 else None

    def rolled_back_to_previous(self) -> AdapterVersion:
        with self._lock:
            gone = self.chain.pop()
            self.rolled_back.add(gone.sha256)
            self.rolled_back_versions.add(gone.version)
            self.live_since = time.time()
        self.save()
        return self.live

    # ---- persistence --------------------------------------------------------------------------
    def save(self) -> bool:
        if self.state_dir is None:
            return True
        with self._save_lock:  # saves from two threads land in order, never interleaved
            with self._lock:
                state = {
                    "chain": [dataclasses.asdict(v) for v in self.chain],
                    "rolled_back": sorted(self.rolled_back),
                    "rolled_back_versions": sorted(self.rolled_back_versions),
                    "live_since": self.live_since,
                    "rejected": [dataclasses.asdict(r) for r in self.rejected.values()],
                    "saved_at": time.time(),
                }
            try:
                atomic_write(self.state_dir / STATE_FILE, json.dumps(state, indent=2).encode())
                return True
            except OSError as exc:
                self.persist_failures += 1
                log.error("cannot persist state to %s (serving continues): %s", self.state_dir, exc)
                return False

    def load(self) -> bool:
        """Restore the chain saved by a previous run. Returns False if there was none (or it was unreadable)."""
        if self.state_dir is None:
            return False
        path = self.state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
            chain = [AdapterVersion(**v) for v in state["chain"]]
            rolled_back = set(state.get("rolled_back", []))
            rolled_back_versions = {str(v) for v in state.get("rolled_back_versions", [])}
            live_since = state.get("live_since")
            rejected = {r["path"]: Rejection(**r) for r in state.get("rejected", [])}
            if live_since is not None and not isinstance(live_since, (int, float)):
                raise TypeError(f"live_since is {live_since!r}")
        except FileNotFoundError:
            return False
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("ignoring unreadable state file %s: %s", path, exc)
            return False
        with self._lock:
            self.chain = chain or [BASE_VERSION]
            self.rolled_back = rolled_back
            self.rolled_back_versions = rolled_back_versions
            self.live_since = live_since
            self.rejected = rejected
        return True


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers (and a crash) see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
