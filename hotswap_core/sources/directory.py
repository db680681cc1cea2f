"""Directory source: notices adapter versions landing in a watched folder and offers the newest one.

The folder holds one subfolder per version; dot-entries are ignored (producers stage there and
``rename()`` in). If it holds a ``current`` symlink (git-sync or Kubernetes ``..data`` style, flipped
by renaming a new symlink over it), only its target is a candidate. Symlinks are resolved; an entry
whose target is outside the folder is never offered (``on_refused``). Nothing is ever written there.

**Symlinks inside a version folder.** Every entry of a version folder must resolve inside the watched
folder too, unless ``follow_symlinks`` is set: one that points outside (``adapter_model.safetensors ->
/home/alice/private.safetensors``) makes the folder refused with ``outside_watched_folder``, naming the
file and its target; its files are not read. Links that stay inside are fine. The swap keeps to the
same rule when it reads (``Candidate.within``, checked on each file opened), so flipping a link after
the check changes nothing.

Events are hints: one makes the source look at once or, when the look before the previous one is not
yet two gaps (``_look_gap()``) old, as soon as it is (later events never move that back). The gap is
``settle_seconds / 8``, or four times what the last look took when that is longer (a folder of thousands
of versions), at most ``settle_seconds / 2``: so a version renamed in just after a look (a producer that
sends the next version once the last one is live) is seen at once, and however fast events come, looks
average at most one a gap, a quarter of a core. Events inside dot-entries (a producer's ``.incoming``
copy) are not hints, unless a ``current`` symlink may point into one (Kubernetes ``..data``). A periodic
look every ``rescan_seconds`` catches lost events. A folder's content is its ``history.fingerprint``; it
has *settled* once two looks ``settle_seconds`` apart saw the same one, and a look is due at that moment.
Every wait is bounded: by the next settle, hold or rescan deadline.

**Offering rule.** A settled folder is sorted (``completeness.classify``), from headers and sizes only
(sha256 only for a marker that carries one), into:

* *complete*: ``adapter_config.json`` is a JSON object, the ``adapter_model.safetensors`` header
  parses and its offsets cover the file exactly, and the ``marker`` (if configured) is there and
  matches that file's sha256 if it holds a digest. Offered.
* *arriving*, what a copy in progress looks like, never offered however long it stays so: the
  marker is configured and absent (or its digest does not match yet); the config or the weights
  (safetensors or any pickle) are not there yet; or the safetensors file is shorter than its header says.
* *broken*: anything else (config not JSON, header malformed or with trailing bytes, pickle-only
  weights). Offered, so that the swap rejects it with a reason code and records it.
* *outside*: an entry resolves outside the watched folder (above). Refused by the source itself.

Per look the newest settled folder that is not *arriving* wins (newest: content first seen last;
ties, as among what the first look finds, go to the later ``max(st_mtime, st_ctime)``), and all older
settled ones are passed over for good: ``on_superseded(passed, winner)`` names those that landed
after the source was made (not what the folder held before: that is history, not a lost race).

**Liveness.** While a newer folder is still settling, the winner waits for it, but only for 0.75
``settle_seconds`` beyond its own settling: at most until ``seen_at + 1.75 * settle_seconds`` of the
oldest folder waiting (enough for one that landed just after it, and was noticed at the next look, to
settle and win). Then the newest settled one is offered however fast later ones arrive, so every
version is offered, or superseded by a newer one that is, within about ``1.75 * settle_seconds`` of
its arrival, and live, swap included, within ``2 * settle_seconds`` (a version every 0.4 x settle
once meant that none ever was).

A winner already offered, or refused by ``skip``, is not offered, and older ones are still passed
over: a live version that ``skip`` refuses never lets an older one become live at start-up.

A look only ``stat``s (one listing and one ``stat`` per file of each version); what a folder holds is
read once per fingerprint and cached. Looks run on the source's own thread and hold only the
source's lock (``update_config`` does not wait for it), never one that serving needs.
"""

from __future__ import annotations

import logging
import math
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from hotswap_core.config import DirectorySourceConfig
from hotswap_core.history import folder_stamp
from hotswap_core.sources import call_back
from hotswap_core.sources.completeness import NO_MARKER, OUTSIDE, State, classify
from hotswap_core.sources.watch import CURRENT_NAME, Watch, folder_key

log = logging.getLogger("hotswapd.source.directory")

_HOLD_SETTLES = 0.75  # how long (in settles) a newer folder still settling may hold back a settled one
_MISSING_CHECK_S = 1.0  # how often a missing watched folder (or an unarmed observer) is retried


@dataclass(frozen=True)
class Candidate:
    """A version folder worth a swap. ``seen_at`` is ``time.monotonic()`` when this content was first noticed."""

    path: Path  # resolved folder (for ``current``: its target)
    version: str  # the resolved folder's name
    seen_at: float
    fingerprint: str
    # Unix time it landed: the latest st_mtime/st_ctime of the entry, its folder and the files in
    # it (rename and in-place writes both move ctime, which no producer can set back).
    landed_at: float = 0.0
    # The resolved watched folder: every file the swap reads must resolve inside it. None when
    # ``follow_symlinks`` is set.
    within: Path | None = None


@dataclass
class _Track:
    candidate: Candidate
    observed: float  # monotonic time of the first look that saw this fingerprint
    arrival: float  # max(st_mtime, st_ctime): the tie-break between folders first seen together
    logged: bool | None = False  # "looks unfinished" said once per content (None: "judged as it is" said)
    existing: bool = False  # landed before the source was made: content, not an arrival (never "superseded")

    def newness(self) -> tuple[float, float, str]:
        return self.candidate.seen_at, self.arrival, self.candidate.version


class DirectorySource:
    """Watches ``config.path`` and calls ``on_candidate`` (serially, from its own thread) with new versions.

    ``skip(candidate)`` vetoes an offer (already live, rejected before with this content).
    ``on_event(kind)`` counts: created, modified, deleted, moved, rescan, missing.
    ``on_refused((path, reason, message))``: an entry or version the source refuses itself
    (``outside_watched_folder``). ``on_superseded(passed, winner)``: candidates passed over because
    ``winner`` won the same look (once per look, before the winner is offered).
    """

    def __init__(
        self,
        config: DirectorySourceConfig,
        on_candidate: Callable[[Candidate], None],
        *,
        skip: Callable[[Candidate], bool] = lambda c: False,
        on_event: Callable[[str], None] | None = None,
        on_refused: Callable[[tuple[str, str, str]], None] | None = None,
        on_superseded: Callable[[list[Candidate], Candidate], None] | None = None,
    ) -> None:
        self._config = config
        self._pending: DirectorySourceConfig | None = None  # from update_config, applied by the next look
        self._on_refused = on_refused or (lambda refusal: None)  # (entry path, reason code, message)
        self._on_superseded = on_superseded or (lambda passed, winner: None)
        self._on_candidate, self._skip, self._on_event = on_candidate, skip, on_event or (lambda kind: None)
        self._scan_lock = threading.RLock()  # one look (and its offer) at a time; guards what follows
        self._tracks: dict[Path, _Track] = {}
        self._done: set[tuple[Path, str]] = set()  # (path, fingerprint) offered or passed over
        self._states: dict[tuple[Path, str], tuple[State, str]] = {}
        self._escapes: set[tuple[str, str]] = set()
        self._paths: dict[str, Path] = {}  # name -> resolved folder, from the last look of _paths_root
        self._paths_root: Path | None = None
        # Unix time the source was made: what landed before it is the folder's content, not an arrival.
        self._since = time.time()
        self._last_offered: Path | None = None
        self._hold_until: float | None = None  # a newer folder settling holds the winner back until then
        self._root_id: tuple[object, ...] | None = None  # () while the watched folder is missing
        self._watch = Watch(self._hint)
        self._lock = threading.Lock()  # _pending and the two event fields below (observer thread, callers)
        self._last_scan = -math.inf  # so the first look is due at once
        self._prev_scan = -math.inf  # the look before it: events may ask for two looks per two gaps
        self._first_event: float | None = None
        self._look_s = 0.0  # how long the last look took
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the timer thread: it looks at once (arming the observer), then on hints, settling and rescans."""
        if self._thread is None:
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
            self._watch.disarm()

    def update_config(self, config: DirectorySourceConfig) -> None:
        """Apply a reloaded config: timings at once; the observer is re-armed if path or polling changed.

        Never waits for a look or a swap in progress (the daemon calls it from its event loop): the
        source's thread (or ``rescan``) takes the new config before its next look."""
        with self._lock:
            self._pending = config
        self._hint(None)

    def _apply_config(self) -> DirectorySourceConfig:
        """Under ``_scan_lock``: take a config from ``update_config``, if one came."""
        with self._lock:
            config, self._pending = self._pending, None
        if config is not None:
            if (config.marker, config.follow_symlinks) != (self._config.marker, self._config.follow_symlinks):
                self._states.clear()
            self._config = config
        return self._config

    def rescan(self) -> Candidate | None:
        """Look now, on the caller's thread; offer and return the candidate this look offered, if any."""
        return self._scan(periodic=True)

    def newest(self) -> Candidate | None:
        """The newest *complete* candidate now, by ``landed_at``; not settled, not offered."""
        found = self.complete()
        return found[0] if found else None

    def complete(self) -> list[Candidate]:
        """Every *complete* candidate now, newest ``landed_at`` first (start-up picks from these)."""
        with self._scan_lock:
            cfg = self._apply_config()
            found = []
            entries, real_root = self._entries(Path(cfg.path))
            within = None if cfg.follow_symlinks else real_root
            for path, (fp, arrival) in (entries or {}).items():
                c = Candidate(path, path.name, time.monotonic(), fp, arrival, within)
                if fp != "unreadable" and self._state(c)[0] == "complete":
                    found.append(c)
            return sorted(found, key=lambda c: (c.landed_at, c.version), reverse=True)

    def _hint(self, kind: str | None) -> None:
        """Look soon (called from the observer's thread, or by update_config)."""
        with self._lock:
            if self._first_event is None:
                self._first_event = time.monotonic()
        self._wake.set()
        if kind is not None:
            call_back(log, self._on_event, kind)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            delay = self._next_due() - time.monotonic()
            if delay > 0:
                self._wake.wait(delay)
                continue
            try:
                self._scan(periodic=time.monotonic() >= self._last_scan + self._config.rescan_seconds)
            except Exception:  # the next look retries; the thread must live on
                log.exception("looking at %s failed", self._config.path)

    def _next_due(self) -> float:
        """When the next look is due: never later than the next rescan, and never moved later by events."""
        with self._scan_lock:
            cfg, last = self._apply_config(), self._last_scan
            # A folder first seen since the last look is looked at again once it may have settled;
            # a winner held back for a newer folder, once the hold is over.
            settling = [t.observed + cfg.settle_seconds for t in self._tracks.values()]
            if self._hold_until is not None:
                settling.append(self._hold_until)
            due = min([last + cfg.rescan_seconds, *(d for d in settling if d > last)])
            if self._watch.armed is None:  # missing, or the observer could not start
                due = min(due, last + min(cfg.rescan_seconds, _MISSING_CHECK_S))
        with self._lock:
            if self._first_event is not None:  # the first event since the last look: later ones add nothing
                due = min(due, max(self._first_event, self._prev_scan + 2 * self._look_gap(cfg)))
        return due

    def _look_gap(self, cfg: DirectorySourceConfig) -> float:
        """The shortest time from one look to the next that an event may ask for (see the module docstring)."""
        return min(cfg.settle_seconds / 2, max(cfg.settle_seconds / 8, 4 * self._look_s))

    def _scan(self, *, periodic: bool) -> Candidate | None:
        started = time.monotonic()
        try:
            return self._look(periodic=periodic)
        finally:
            self._look_s = time.monotonic() - started

    def _look(self, *, periodic: bool) -> Candidate | None:
        with self._scan_lock:
            cfg, now = self._apply_config(), time.monotonic()
            with self._lock:
                seen_at = self._first_event if self._first_event is not None else now
                self._first_event, self._prev_scan, self._last_scan = None, self._last_scan, now
            # One stat per look: inode numbers are reused, so a folder deleted and made again can look
            # the same to a second stat; but watchdog's emitter stops when its folder is deleted.
            root, key = Path(cfg.path), folder_key(cfg)
            root_id, dead = key[:2], self._watch.dead()
            if root_id != self._root_id or dead:  # gone, back, or replaced: what is in it now is all new
                if root_id == ():
                    log.warning("watched folder %s is missing; still serving, looking for it again", root)
                    call_back(log, self._on_event, "missing")
                elif self._root_id == ():
                    log.info("watched folder %s is back", root)
                self._root_id, self._last_offered = root_id, None
                self._tracks.clear()
                self._done.clear()
            if self._thread is not None and (self._watch.armed != key or dead):
                self._watch.arm(root, key, cfg)
            if periodic:
                call_back(log, self._on_event, "rescan")
            entries, real_root = self._entries(root)
            within = None if cfg.follow_symlinks else real_root
            tracks: dict[Path, _Track] = {}
            for path, (fp, arrival) in (entries or {}).items():
                old = self._tracks.get(path)
                if old is not None and old.candidate.fingerprint == fp:
                    if old.candidate.within != within:  # follow_symlinks reloaded
                        old.candidate = replace(old.candidate, within=within)
                    tracks[path] = old
                elif fp != "unreadable":
                    c = Candidate(path, path.name, seen_at, fp, arrival, within)
                    tracks[path] = _Track(c, now, arrival, existing=arrival <= self._since)
            self._tracks = tracks
            keys = {(p, t.candidate.fingerprint) for p, t in tracks.items()}
            self._done &= keys
            self._states = {k: v for k, v in self._states.items() if k in keys}
            if self._last_offered is not None and not self._last_offered.is_dir():
                log.warning("%s (the last version offered) is gone; nothing older is offered", self._last_offered)
                self._last_offered = None
            return self._offer(now)

    def _offer(self, now: float) -> Candidate | None:
        cfg = self._config
        self._hold_until = None
        ready: list[_Track] = []  # settled and not arriving, newest first
        newer_settling = False  # a folder newer than every ready one is still settling
        for t in sorted(self._tracks.values(), key=_Track.newness, reverse=True):
            c = t.candidate
            if now < t.observed + cfg.settle_seconds:  # the very sum _next_due waits for
                newer_settling = newer_settling or not ready
                continue
            state, why = self._state(c)
            if state != "arriving":
                ready.append(t)
            elif now >= t.observed + self._stale_after() and not why.startswith(NO_MARKER):
                # Unchanged for a whole rescan period: not a copy in progress but a folder left
                # incomplete (a producer that died, a truncated upload). Offered as it is, so that
                # the swap rejects it with its reason code; new content makes it a new candidate.
                if t.logged is not None:
                    log.warning("%s has looked unfinished for %.0fs (%s); judging it as it is",
                                c.path, now - t.observed, why)  # fmt: skip
                    t.logged = None
                ready.append(t)
            elif t.logged is False:
                log.info("%s has settled but looks unfinished (%s); waiting", c.path, why)
                t.logged = True
        waiting = [t for t in ready if (t.candidate.path, t.candidate.fingerprint) not in self._done]
        if not waiting:
            return None
        if newer_settling:
            # A newer folder may make these moot, but it holds them back for 0.75 settle at most beyond
            # their own settling (from the oldest one's arrival): else versions landing faster than they
            # settle would keep every one of them waiting, and nothing would ever go live. 0.75: a folder
            # that landed just after (noticed up to half a settle later, at the next look) still settles
            # in time to win, and the swap's own time still fits in 2 x settle.
            hold_until = min(t.candidate.seen_at for t in waiting) + (1 + _HOLD_SETTLES) * cfg.settle_seconds
            if now < hold_until:
                self._hold_until = hold_until
                return None
        winner, fresh = ready[0].candidate, ready[0] in waiting
        self._done.update((t.candidate.path, t.candidate.fingerprint) for t in ready)
        passed = [t.candidate for t in waiting if t is not ready[0] and not t.existing]
        if passed:
            log.info("passing over %s for %s", ", ".join(c.version for c in passed), winner.version)
            call_back(log, lambda args: self._on_superseded(*args), (passed, winner))
        if not fresh or call_back(log, self._skip, winner):
            return None
        state, why = self._state(winner)
        if state == "outside":
            log.warning("%s", why)
            call_back(log, self._on_refused, (str(winner.path), OUTSIDE, why))
            return None
        log.info("offering %s (%s)", winner.version, winner.path)
        self._last_offered = winner.path
        call_back(log, self._on_candidate, winner)
        return winner

    def _stale_after(self) -> float:
        return max(self._config.settle_seconds, self._config.rescan_seconds)

    def _entries(self, root: Path) -> tuple[dict[Path, tuple[str, float]] | None, Path | None]:
        """(resolved candidate folder -> (fingerprint, arrival time), the resolved watched folder);
        (None, None) when the watched folder is missing. One listing, and per version one ``lstat``
        and ``history.folder_stamp``: a symlink is the only entry that needs resolving."""
        try:
            real_root = root.resolve(strict=True)
            with os.scandir(root) as it:
                listed = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return None, None
        except OSError as exc:
            log.warning("cannot list %s: %s", root, exc)
            return {}, None
        if (root / CURRENT_NAME).is_symlink():
            listed = [e for e in listed if e.name == CURRENT_NAME]
        found: dict[Path, tuple[str, float]] = {}
        escapes: set[tuple[str, str]] = set()
        # The Path objects of the last look, reused: thousands of new ones per look are garbage the
        # collector has to walk (in a process that holds torch, its full passes are long).
        paths = self._paths if self._paths_root == real_root else {}
        self._paths, self._paths_root = {}, real_root
        for entry in listed:
            name = entry.name
            if name.startswith(".") and name != CURRENT_NAME:
                continue
            try:
                st_entry = entry.stat(follow_symlinks=False)
                if entry.is_symlink():
                    path = Path(entry.path).resolve(strict=True)
                    st_path = path.stat()
                    if real_root not in path.parents:
                        escapes.add((name, str(path)))
                        if (name, str(path)) not in self._escapes:
                            message = f"{entry.path} points outside the watched folder (to {path}); never offered"
                            log.warning("%s", message)
                            call_back(log, self._on_refused, (entry.path, OUTSIDE, message))
                        continue
                    if not stat.S_ISDIR(st_path.st_mode):
                        continue
                elif entry.is_dir(follow_symlinks=False):  # inside by construction: nothing to resolve
                    path = self._paths[name] = paths.get(name) or real_root / name
                    st_path = st_entry
                else:
                    continue
            except (OSError, RuntimeError):  # vanished, dangling or looping symlink
                continue
            fp, latest = folder_stamp(path)
            found[path] = fp, max(st_entry.st_mtime, st_entry.st_ctime, st_path.st_mtime, st_path.st_ctime, latest)
        self._escapes = escapes
        return found, real_root

    def _state(self, c: Candidate) -> tuple[State, str]:
        key = (c.path, c.fingerprint)
        if key not in self._states:
            try:
                self._states[key] = classify(c.path, self._config.marker, c.within)
            except OSError as exc:  # vanished or unreadable: not cached, the next look tries again
                return "arriving", str(exc)
        return self._states[key]
