"""Swap history: records, the committed-version chain (for rollback), rejected and superseded
candidates, persisted state.

State is written to ``state_dir/state.json`` atomically (temp file, fsync, rename, fsync dir), so a
crash at any point leaves either the old or the new state, never a torn one. A full or read-only
``state_dir`` is logged and counted (``persist_failures``) but never stops serving.

Everything here is bounded however many swaps a daemon sees (the ``MAX_*`` constants): each
collection drops its oldest entries, and the texts kept (messages, fingerprints) are capped, so
``state.json`` stays under ``STATE_BYTES_BOUND`` and each save costs the same after 10 swaps or 10,000.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import itertools
import json
import logging
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, MutableSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotswap_core.slots import BASE_VERSION, AdapterVersion

log = logging.getLogger("hotswapd.history")

STATE_FILE = "state.json"
MAX_RECORDS = 200  # swap records, in memory only
MAX_CHAIN = 50  # committed versions kept for rollback (the live one included)
MAX_REJECTED = 200  # rejected candidates (GET /v1/adapters shows the newest 50)
MAX_SUPERSEDED = 100  # candidates passed over for a newer one in the same look
MAX_ROLLED_BACK = 100  # versions rolled back from (not re-applied), per set
MAX_MESSAGE = 1000  # characters of a rejection's (or a record's) message kept
_MAX_FINGERPRINT = 256  # longer fingerprints (folders of many files) are kept as their sha256
# What state.json can hold at most: each entry's paths are OS paths (PATH_MAX 4096 bytes, JSON-escaped
# up to 6x for control characters), the rest is capped above. Typical states are a few tens of KiB.
STATE_BYTES_BOUND = (MAX_CHAIN + MAX_REJECTED + MAX_SUPERSEDED + 2 * MAX_ROLLED_BACK) * 6 * (4096 + MAX_MESSAGE + 600)


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
        # Shallow: ``dataclasses.asdict`` deep-copies every value, and a record is shown three times per swap
        # (the event stream) and fifty per ``GET /v1/adapters``. Its one mutable field is copied.
        return {**vars(self), "phases": dict(self.phases)}


@dataclass(frozen=True)
class Rejection:
    path: str
    fingerprint: str
    reason: str
    message: str
    at: float


@dataclass(frozen=True)
class Superseded:
    """A candidate the source passed over because a newer one (``by``) won the same look."""

    path: str
    version: str
    by: str  # the winner's version
    at: float


_GONE = {errno.ENOENT, errno.ENOTDIR, errno.ELOOP}  # what pathlib's is_file() also reads as "no file"


def fingerprint(path: str | os.PathLike[str]) -> str:
    """Cheap content identity of an adapter folder: name, size and mtime of each file in it.

    Used to skip a rejected candidate until something in it changes, without hashing it again.
    """
    return folder_stamp(path)[0]


def folder_stamp(path: str | os.PathLike[str]) -> tuple[str, float]:
    """(``fingerprint``, latest st_mtime/st_ctime of the entries directly in the folder), from one
    listing and one ``stat`` per entry (a look at a folder of thousands of versions pays this per version).
    Symlinks are followed, as ``open`` would. ``("unreadable", 0.0)`` if the folder cannot be listed."""
    files: list[str] = []
    latest = 0.0
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    st = entry.stat()
                except OSError as exc:
                    if exc.errno in _GONE:  # vanished since listed, or a dangling symlink: not a file
                        continue
                    raise
                latest = max(latest, st.st_mtime, st.st_ctime)
                if stat.S_ISREG(st.st_mode):
                    files.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:  # unreadable: look again later
        return "unreadable", 0.0
    return "|".join(sorted(files)), latest


def _fingerprint_key(fp: str) -> str:
    """What a rejection keeps of a fingerprint: itself, or its sha256 when long (compared, never shown)."""
    return fp if len(fp) <= _MAX_FINGERPRINT else "sha256:" + hashlib.sha256(fp.encode("utf-8", "replace")).hexdigest()


def _cap(message: str | None) -> str | None:
    if message is None or len(message) <= MAX_MESSAGE:
        return message
    return message[: MAX_MESSAGE - 1] + "…"


class _Recent(MutableSet[str]):
    """A set that keeps its newest ``limit`` members, oldest first (adding one again makes it newest)."""

    def __init__(self, limit: int, members: Iterable[str] = ()) -> None:
        self.limit = limit
        self._members: dict[str, None] = {}
        for m in members:
            self.add(m)

    def __contains__(self, member: object) -> bool:
        return member in self._members

    def __iter__(self) -> Iterator[str]:
        return iter(self._members)

    def __len__(self) -> int:
        return len(self._members)

    def __repr__(self) -> str:
        return f"_Recent({list(self._members)!r}, limit={self.limit})"

    def add(self, member: str) -> None:
        self._members.pop(member, None)
        self._members[member] = None
        while len(self._members) > self.limit:
            del self._members[next(iter(self._members))]

    def discard(self, member: str) -> None:
        self._members.pop(member, None)


class History:
    def __init__(self, state_dir: str | None, max_records: int = MAX_RECORDS) -> None:
        self.state_dir = Path(state_dir) if state_dir else None
        self.records: deque[SwapRecord] = deque(maxlen=max_records)
        self.rejected: dict[str, Rejection] = {}  # by path, oldest rejection first
        self.superseded: deque[Superseded] = deque(maxlen=MAX_SUPERSEDED)  # oldest first
        # Committed versions, oldest first; the last one is live. Rollback pops.
        self.chain: list[AdapterVersion] = [BASE_VERSION]
        # A version explicitly rolled back from is not re-applied until a newer candidate lands
        # (set-like; the newest MAX_ROLLED_BACK are remembered).
        self.rolled_back: _Recent = _Recent(MAX_ROLLED_BACK)
        # Their names (a Hub source re-offers repo@sha on restart).
        self.rolled_back_versions: _Recent = _Recent(MAX_ROLLED_BACK)
        # Unix time the live version was committed (or rolled back to): a candidate that landed
        # before it is not newer, so a restart does not undo an operator's swap or rollback.
        self.live_since: float | None = None
        self.persist_failures = 0
        self.dirty = False  # the last save failed: what is in memory is not on disk yet (see retry_save)
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()

    # ---- records and rejections -------------------------------------------------------------
    def add(self, record: SwapRecord) -> None:
        with self._lock:
            self._append(record)

    def _append(self, record: SwapRecord) -> None:
        if record.message is not None and len(record.message) > MAX_MESSAGE:
            record = dataclasses.replace(record, message=_cap(record.message))
        self.records.append(record)

    def reject(self, path: str, fp: str, reason: str, message: str) -> None:
        rejection = Rejection(path, _fingerprint_key(fp), reason, _cap(message) or "", time.time())
        with self._lock:
            self.rejected.pop(path, None)  # re-rejected: now the newest
            self.rejected[path] = rejection
            while len(self.rejected) > MAX_REJECTED:  # bounded: forget the oldest
                del self.rejected[next(iter(self.rejected))]
        self.save()

    def supersede(self, passed: list[tuple[str, str]], by: str) -> None:
        """Record candidates (path, version) passed over because ``by`` won the same look. Not a swap,
        not a rejection: they were never validated."""
        if not passed:
            return
        now = time.time()
        with self._lock:
            self.superseded.extend(Superseded(path, version, by, now) for path, version in passed)
        self.save()

    def supersessions(self) -> list[Superseded]:
        """Superseded candidates, newest first: a copy (the source adds to them from its thread)."""
        with self._lock:
            return list(reversed(self.superseded))

    def recent(self, n: int) -> list[SwapRecord]:
        """The newest ``n`` records, newest first: a copy, because swaps append from other threads
        and iterating the deque while one does raises ``RuntimeError: deque mutated during iteration``."""
        with self._lock:
            return list(itertools.islice(reversed(self.records), n))

    def rejections(self) -> list[Rejection]:
        """Rejected candidates, newest first: a copy (the source and swaps add to them from other threads)."""
        with self._lock:
            return list(reversed(self.rejected.values()))

    def is_rejected(self, path: str, fp: str) -> bool:
        """True while ``path`` still has the content it had when it was rejected."""
        with self._lock:
            r = self.rejected.get(path)
            return r is not None and r.fingerprint == _fingerprint_key(fp)

    # ---- committed chain --------------------------------------------------------------------
    @property
    def live(self) -> AdapterVersion:
        return self.chain[-1]

    def committed(self, version: AdapterVersion, record: SwapRecord | None = None) -> None:
        """``version`` went live; ``record`` (the swap that did it) is added in the same step, before
        the save, so no reader sees the one without the other."""
        with self._lock:
            if record is not None:
                self._append(record)
            if self.chain[-1].sha256 == version.sha256:
                # Restored at start-up: already the chain's head, and live since its first commit.
                self.chain[-1] = version
                return
            self.chain.append(version)
            del self.chain[:-MAX_CHAIN]  # bounded; rollback depth of 50 is plenty
            self.rolled_back.discard(version.sha256)
            self.rolled_back_versions.discard(version.version)
            self.live_since = time.time()
        self.save()

    def previous(self) -> AdapterVersion | None:
        return self.chain[-2] if len(self.chain) >= 2 else None

    def rolled_back_to_previous(self, record: SwapRecord | None = None) -> AdapterVersion:
        with self._lock:
            if record is not None:
                self._append(record)
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
                    "chain": [_plain(v) for v in self.chain],
                    "rolled_back": list(self.rolled_back),  # oldest first, as kept
                    "rolled_back_versions": list(self.rolled_back_versions),
                    "live_since": self.live_since,
                    "rejected": [_plain(r) for r in self.rejected.values()],
                    "superseded": [_plain(s) for s in self.superseded],
                    "saved_at": time.time(),
                }
            try:
                # No indent: json's C encoder only runs without one (5x faster on a full state).
                atomic_write(self.state_dir / STATE_FILE, json.dumps(state).encode())
                self.dirty = False
                return True
            except OSError as exc:
                self.dirty = True
                self.persist_failures += 1
                log.error("cannot persist state to %s (serving continues): %s", self.state_dir, exc)
                return False

    def retry_save(self) -> bool:
        """Save again if the last save failed (else nothing is written): a state written only at the next
        swap would stay stale for as long as nothing swaps. True when nothing is left unsaved."""
        return self.save() if self.dirty else True

    def load(self) -> bool:
        """Restore the chain saved by a previous run. Returns False if there was none (or it was unreadable)."""
        if self.state_dir is None:
            return False
        path = self.state_dir / STATE_FILE
        try:
            state = json.loads(path.read_text())
            chain = [AdapterVersion(**v) for v in state["chain"]][-MAX_CHAIN:]
            rolled_back = _Recent(MAX_ROLLED_BACK, [str(v) for v in state.get("rolled_back", [])])
            rolled_back_versions = _Recent(MAX_ROLLED_BACK, [str(v) for v in state.get("rolled_back_versions", [])])
            live_since = state.get("live_since")
            found = sorted((Rejection(**r) for r in state.get("rejected", [])), key=lambda r: r.at)
            rejected = {
                r.path: dataclasses.replace(
                    r, fingerprint=_fingerprint_key(r.fingerprint), message=_cap(r.message) or ""
                )
                for r in found[-MAX_REJECTED:]
            }
            superseded = [Superseded(**x) for x in state.get("superseded", [])]
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
            self.superseded = deque(superseded, maxlen=MAX_SUPERSEDED)
        return True


def _plain(obj: Any) -> dict[str, Any]:
    """A frozen, flat dataclass as a dict, without copying (``dataclasses.asdict`` deep-copies every
    entry, which a save per swap would pay for); only ever read by ``json.dumps``."""
    return vars(obj)  # type: ignore[no-any-return]


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers (and a crash) see the old or the new file, never half.
    One writer per path at a time (History's save lock): the temporary file's name is fixed, which spares
    a swap's save the mkdir and the random-name search of ``tempfile`` (system time on a busy machine)."""
    tmp = path.with_name(f".{path.name}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC  # created here, so mode 0600 is ours
    try:
        fd = os.open(tmp, flags, 0o600)
    except FileExistsError:  # left by a save that was killed: not ours to trust (mode, owner)
        tmp.unlink()
        fd = os.open(tmp, flags, 0o600)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, flags, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
