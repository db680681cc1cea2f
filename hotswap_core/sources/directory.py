"""Directory source: notices adapter versions landing in a watched folder and offers the newest one.

The watched folder holds one subfolder per version; dot-entries are ignored (producers stage there
and ``rename()`` in). If it holds a ``current`` symlink (git-sync, Kubernetes ``..data`` style, flipped
by renaming a new symlink over it), only its target is a candidate. Symlinks are resolved, and one
whose target is outside the watched folder is never offered. Nothing is ever written there.

Watchdog events are hints: an event makes the source look (at most every ``settle_seconds / 2``),
and a periodic rescan every ``rescan_seconds`` catches lost events. A folder's content is identified
by ``history.fingerprint``; it has *settled* once two looks ``settle_seconds`` apart saw the same one.

**Offering rule.** A settled folder is sorted into one of three states, from a cheap check (header
and sizes, never the tensor data; sha256 only for a marker that carries one):

* *complete*: ``adapter_config.json`` is a JSON object, the ``adapter_model.safetensors`` header
  parses and its offsets cover the file exactly, and the ``marker`` (if configured) is present, and
  matches that file's sha256 if it holds a digest. Offered.
* *arriving*: what a copy in progress looks like, so never offered, however long it stays so: the
  marker is configured and absent (or its digest does not match yet); the config or the weights
  (``.safetensors``, or any pickle file) are not there yet; or the safetensors file is shorter than
  its own header says.
* *broken*: anything else (config not JSON, header malformed or with trailing bytes, pickle-only
  weights). Offered, so the swap rejects it with a reason code and records it.

Per look, only the newest candidate wins (newest = its content first seen last; ties, e.g. all the
folders found by the first look, go to the later ``max(st_mtime, st_ctime)``), and every older one
is passed over for good. While a newer folder is still settling, older ones wait for it. A winner
already offered, or refused by ``skip``, is not offered (again); older ones are still passed over,
so a live version refused by ``skip`` never makes an older version live at start-up.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from hotswap_core.adapters import _PICKLE_SUFFIXES, CONFIG_NAME, WEIGHTS_NAME
from hotswap_core.config import DirectorySourceConfig, ValidationConfig
from hotswap_core.errors import AdapterRejected
from hotswap_core.history import fingerprint
from hotswap_core.safetensors_header import parse_header

log = logging.getLogger("hotswapd.source.directory")

CURRENT_NAME = "current"
_MISSING_CHECK_S = 1.0  # how often a missing watched folder (or an unarmed observer) is retried
_MAX_HEADER = ValidationConfig().max_header_bytes
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})")
_EVENT_KINDS = {"created": "created", "modified": "modified", "attrib": "modified", "deleted": "deleted",
                "moved": "moved"}  # fmt: skip
State = Literal["complete", "arriving", "broken"]


@dataclass(frozen=True)
class Candidate:
    """A version folder worth a swap. ``seen_at`` is ``time.monotonic()`` when this content was first noticed."""

    path: Path  # resolved folder (for ``current``: its target)
    version: str  # the resolved folder's name
    seen_at: float
    fingerprint: str


@dataclass
class _Track:
    candidate: Candidate
    observed: float  # monotonic time of the first look that saw this fingerprint
    arrival: float  # max(st_mtime, st_ctime): the tie-break between folders first seen together
    logged: bool = False  # "still arriving" said once per content


class DirectorySource:
    """Watches ``config.path`` and calls ``on_candidate`` (serially, from its own thread) with new versions.

    ``skip(candidate)`` vetoes an offer (already live, rejected before with this content).
    ``on_event(kind)`` counts events: created, modified, deleted, moved, rescan, missing.
    """

    def __init__(
        self,
        config: DirectorySourceConfig,
        on_candidate: Callable[[Candidate], None],
        *,
        skip: Callable[[Candidate], bool] = lambda c: False,
        on_event: Callable[[str], None] | None = None,
    ) -> None:
        self._config = config
        self._on_candidate, self._skip, self._on_event = on_candidate, skip, on_event
        self._scan_lock = threading.RLock()  # one look (and its offer) at a time; guards what follows
        self._tracks: dict[Path, _Track] = {}
        self._done: set[tuple[Path, str]] = set()  # (path, fingerprint) offered or passed over
        self._states: dict[tuple[Path, str], tuple[State, str]] = {}
        self._escapes: set[tuple[str, str]] = set()
        self._last_offered: Path | None = None
        self._missing = False
        self._root_id: tuple[object, ...] = ()
        self._observer: BaseObserver | None = None
        self._armed: tuple[object, ...] | None = None
        self._lock = threading.Lock()  # event fields below, written by the observer thread
        self._last_scan = -math.inf  # so the first look is due at once
        self._first_event: float | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._handler = _Handler(self._hint)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Look once now, arm the observer and start the timer thread (settle, rescan, re-arm)."""
        if self._thread is not None:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="hotswapd-source-directory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the timer thread and the observer and wait for both. Safe to call twice."""
        thread, self._thread = self._thread, None
        self._stopping.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        with self._scan_lock:
            self._disarm()

    def update_config(self, config: DirectorySourceConfig) -> None:
        """Apply a reloaded config: timings at once; the observer is re-armed if path or polling changed."""
        with self._scan_lock:
            if config.marker != self._config.marker:
                self._states.clear()
            self._config = config
            self._armed = None if self._armed != self._arm_key() else self._armed
        self._hint(None)

    # ---- looking ------------------------------------------------------------------------------
    def rescan(self) -> Candidate | None:
        """Look now, on the caller's thread; offer and return the candidate this look offered, if any."""
        return self._scan(periodic=True)

    def newest(self) -> Candidate | None:
        """The newest *complete* candidate now, by ``max(st_mtime, st_ctime)``; not settled, not offered."""
        with self._scan_lock:
            entries = self._entries(Path(self._config.path))
            best: tuple[float, str, Candidate] | None = None
            for path, arrival in (entries or {}).items():
                c = Candidate(path, path.name, time.monotonic(), fingerprint(path))
                if self._state(c)[0] == "complete" and (best is None or (arrival, path.name) > best[:2]):
                    best = (arrival, path.name, c)
            return best[2] if best else None

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            delay = self._next_due() - time.monotonic()
            if delay > 0:
                self._wake.wait(delay)
                continue
            try:
                self._scan(periodic=time.monotonic() >= self._last_scan + self._config.rescan_seconds)
            except Exception:  # a look that failed is retried by the next one; the thread must live on
                log.exception("looking at %s failed", self._config.path)

    def _next_due(self) -> float:
        with self._scan_lock:
            cfg, last = self._config, self._last_scan
            # A folder first seen since the last look is looked at again once it may have settled.
            settling = [t.observed + cfg.settle_seconds for t in self._tracks.values()]
            due = min([last + cfg.rescan_seconds, *(d for d in settling if d > last)])
            if self._missing or self._armed is None:
                due = min(due, last + min(cfg.rescan_seconds, _MISSING_CHECK_S))
        with self._lock:
            if self._first_event is not None:
                due = min(due, max(self._first_event, last + cfg.settle_seconds / 2))
        return due

    def _scan(self, *, periodic: bool) -> Candidate | None:
        with self._scan_lock:
            cfg, now = self._config, time.monotonic()
            with self._lock:
                seen_at = self._first_event if self._first_event is not None else now
                self._first_event, self._last_scan = None, now
            if periodic:
                self._emit("rescan")
            root = Path(cfg.path)
            if self._thread is not None:
                self._ensure_armed(root)
            entries, root_id = self._entries(root), self._arm_key()[:2]
            if root_id != self._root_id:  # gone, or replaced: what is in it now is all new
                self._root_id, self._last_offered = root_id, None
                self._tracks.clear()
                self._done.clear()
            if entries is None:
                if not self._missing:
                    log.warning("watched folder %s is missing; still serving, looking again every few seconds", root)
                    self._emit("missing")
                self._missing = True
                self._disarm()
                return None
            if self._missing:
                log.info("watched folder %s is back", root)
                self._missing = False
            tracks: dict[Path, _Track] = {}
            for path, arrival in entries.items():
                fp, old = fingerprint(path), self._tracks.get(path)
                if fp == "unreadable":
                    continue
                if old is not None and old.candidate.fingerprint == fp:
                    tracks[path] = old
                else:
                    tracks[path] = _Track(Candidate(path, path.name, seen_at, fp), now, arrival)
            self._tracks = tracks
            keys = {(p, t.candidate.fingerprint) for p, t in tracks.items()}
            self._done &= keys
            self._states = {k: v for k, v in self._states.items() if k in keys}
            if self._last_offered is not None and self._last_offered not in tracks:
                log.warning("%s (the last version offered) is gone; nothing older is offered", self._last_offered)
                self._last_offered = None
            return self._offer(now)

    def _offer(self, now: float) -> Candidate | None:
        settle = self._config.settle_seconds
        newest_first = sorted(self._tracks.values(), key=lambda t: (t.candidate.seen_at, t.arrival), reverse=True)
        ready: list[Candidate] = []
        for t in newest_first:
            c = t.candidate
            if now - t.observed < settle:
                if not ready:
                    return None  # a newer folder is still settling: older ones wait for it
                continue
            state, why = self._state(c)
            if state != "arriving":
                ready.append(c)
            elif not t.logged:
                log.info("%s has settled but looks unfinished (%s); waiting", c.path, why)
                t.logged = True
        if not ready:
            return None
        winner, fresh = ready[0], (ready[0].path, ready[0].fingerprint) not in self._done
        self._done.update((c.path, c.fingerprint) for c in ready)
        if not fresh or self._call(self._skip, winner, False):
            return None
        log.info("offering %s (%s)", winner.version, winner.path)
        self._last_offered = winner.path
        self._call(self._on_candidate, winner, None)
        return winner

    def _entries(self, root: Path) -> dict[Path, float] | None:
        """Resolved candidate folders -> arrival time, or None when the watched folder is missing."""
        try:
            names = os.listdir(root)
            real_root = root.resolve(strict=True)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            log.warning("cannot list %s: %s", root, exc)
            return {}
        if (root / CURRENT_NAME).is_symlink():
            names = [CURRENT_NAME]
        found: dict[Path, float] = {}
        escapes: set[tuple[str, str]] = set()
        for name in names:
            entry = root / name
            if name.startswith(".") and name != CURRENT_NAME:
                continue
            try:
                path = entry.resolve(strict=True)
                st_entry, st_path = entry.lstat(), path.stat()
            except (OSError, RuntimeError):  # vanished, dangling or looping symlink
                continue
            if real_root not in path.parents:
                escapes.add((name, str(path)))
                if (name, str(path)) not in self._escapes:
                    log.warning("%s points outside the watched folder (to %s); it will never be offered", entry, path)
                continue
            if path.is_dir():
                found[path] = max(st_entry.st_mtime, st_entry.st_ctime, st_path.st_mtime, st_path.st_ctime)
        self._escapes = escapes
        return found

    def _state(self, c: Candidate) -> tuple[State, str]:
        key = (c.path, c.fingerprint)
        if key not in self._states:
            try:
                self._states[key] = _classify(c.path, self._config.marker)
            except OSError as exc:  # vanished or unreadable: not cached, the next look tries again
                return "arriving", str(exc)
        return self._states[key]

    # ---- observer -----------------------------------------------------------------------------
    def _arm_key(self) -> tuple[object, ...]:
        cfg = self._config
        try:
            st = os.stat(cfg.path)
        except OSError:
            return ()
        return (st.st_dev, st.st_ino, cfg.path, cfg.polling, cfg.rescan_seconds if cfg.polling else None)

    def _ensure_armed(self, root: Path) -> None:
        key = self._arm_key()
        if key == self._armed or not key:
            return
        self._disarm()
        # With polling the periodic rescan does the work; the observer only adds hints at the same pace.
        observer = PollingObserver(timeout=self._config.rescan_seconds) if self._config.polling else Observer()
        try:
            observer.schedule(self._handler, str(root), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("cannot watch %s (%s); relying on rescans until it can", root, exc)
            return
        self._observer, self._armed = observer, key

    def _disarm(self) -> None:
        observer, self._observer, self._armed = self._observer, None, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join()

    def _hint(self, kind: str | None) -> None:
        with self._lock:
            if self._first_event is None:
                self._first_event = time.monotonic()
        self._wake.set()
        if kind is not None:
            self._emit(kind)

    def _emit(self, kind: str) -> None:
        if self._on_event is not None:
            self._call(self._on_event, kind, None)

    @staticmethod
    def _call(fn: Callable[..., object], arg: object, default: object) -> object:
        try:
            return fn(arg)
        except Exception:
            log.exception("%s(%r) raised; the source carries on", getattr(fn, "__name__", fn), arg)
            return default


class _Handler(FileSystemEventHandler):
    def __init__(self, hint: Callable[[str | None], None]) -> None:
        self._hint = hint

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Our own reads show up as opened/closed_no_write; reacting to them would look forever.
        if event.event_type == "closed":
            self._hint(None)  # a write finished: worth a look, but already counted as modified
        elif event.event_type in _EVENT_KINDS:
            self._hint(_EVENT_KINDS[event.event_type])


def _classify(folder: Path, marker: str | None) -> tuple[State, str]:
    """complete / arriving / broken (see the module docstring), with why, from headers and sizes only."""
    weights = folder / WEIGHTS_NAME
    if marker and not (folder / marker).is_file():
        return "arriving", f"no marker file {marker}"
    has_pickle = any(p.suffix in _PICKLE_SUFFIXES and p.is_file() for p in folder.iterdir())
    if not weights.is_file() and not has_pickle:
        return "arriving", f"no {WEIGHTS_NAME} yet"
    if not (folder / CONFIG_NAME).is_file():
        return "arriving", f"no {CONFIG_NAME} yet"
    weights_state, why = _check_weights(weights) if weights.is_file() else ("broken", "pickle weights only")
    if weights_state == "arriving":
        return "arriving", why
    if marker and weights_state == "complete":
        expected = _DIGEST.match((folder / marker).read_bytes()[:200].decode("ascii", "replace").strip())
        if expected and expected.group(1).lower() != _sha256(weights):
            return "arriving", f"{WEIGHTS_NAME} does not match the sha256 in {marker} yet"
    try:
        with open(folder / CONFIG_NAME, "rb") as f:
            config = json.loads(f.read(_MAX_HEADER + 1))
    except (OSError, ValueError, RecursionError) as exc:
        return "broken", f"{CONFIG_NAME}: {exc}"
    if not isinstance(config, dict):
        return "broken", f"{CONFIG_NAME} is not a JSON object"
    return weights_state, why


def _check_weights(path: Path) -> tuple[State, str]:
    """Read only the safetensors header: shorter than it says is still arriving, otherwise wrong is broken."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                return "arriving", f"{path.name} has {size} bytes"
            (header_len,) = struct.unpack("<Q", f.read(8))  # u64 little-endian header length
            if header_len > _MAX_HEADER:
                return "broken", f"{path.name} header of {header_len} bytes"
            if 8 + header_len > size:
                return "arriving", f"{path.name} is shorter than its header"
            raw = f.read(header_len)
        parse_header(raw, size - 8 - header_len, path)
    except OSError as exc:
        return "arriving", f"{path.name}: {exc.strerror or exc}"
    except AdapterRejected as exc:
        return ("arriving" if exc.reason == "truncated" else "broken"), exc.message
    return "complete", ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
