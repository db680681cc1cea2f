"""Where the daemon's versions come from: the configured source (a watched folder or a Hub branch), run for the
daemon. Which version serves first after a start, which offers are skipped (rejected before, rolled back from,
older than what was restored), what a refresh finds, and what the source points at
(``hotswapd_source_head_info``). Every offer goes through the one ``Swapper``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hotswap_core.config import Config
from hotswap_core.history import History, SwapRecord, fingerprint
from hotswap_core.metrics import Metrics
from hotswap_core.sources.directory import Candidate, DirectorySource
from hotswap_core.sources.hub import EVENT_KINDS as HUB_EVENT_KINDS
from hotswap_core.sources.hub import HubSource, hub_cache_dir
from hotswap_core.sources.watch import EVENT_KINDS as DIRECTORY_EVENT_KINDS
from hotswap_core.swap import Swapper

log = logging.getLogger("hotswapd.daemon")


class Feed:
    """The daemon's adapter source and what it offers. ``config`` is replaced on reload (``reload``)."""

    def __init__(self, config: Config, history: History, metrics: Metrics, swapper: Swapper) -> None:
        self.config = config
        self.history = history
        self.metrics = metrics
        self.swapper = swapper
        self.source: DirectorySource | HubSource | None = None
        self.startup_since: float | None = None  # when the restored version went live: older arrivals are not newer
        self._offered: str | None = None  # the directory source's last offer: its head

    def watch(self) -> None:
        """Metrics that read the source: its head, and the directory source's events (the Hub's: when it is made)."""
        if self.config.source.kind == "directory":
            self.metrics.watch_source("directory", DIRECTORY_EVENT_KINDS)
        self.metrics.watch_source_head(self.head)

    def stop(self) -> None:
        if self.source is not None:
            self.source.stop()

    def reload(self, config: Config) -> None:
        """Apply a reloaded config to the running source; the directory source looks again at once, the Hub
        source polls at once when anything but ``poll_seconds`` changed."""
        self.config = config
        if isinstance(self.source, DirectorySource):
            self.source.update_config(config.source.directory)
            self.source.rescan()
        elif isinstance(self.source, HubSource):
            self.source.update_config(config.source.hub)

    def choose_first_version(self) -> None:
        """The last committed version, unless something newer landed since; else the newest valid
        candidate; else ``adapter.initial``; else the base model (zero adapter)."""
        swapper, history = self.swapper, self.history
        restored = history.load()
        last, since = history.live, history.live_since
        self.startup_since = since
        candidates = self._directory().complete() if self.config.source.kind == "directory" else []
        newer = [c for c in candidates if since is None or c.landed_at > since]
        older = [c for c in candidates if c not in newer]

        def ok(record: SwapRecord) -> bool:
            return record.result in ("success", "unchanged")

        for c in newer:
            if ok(swapper.swap(c.path, version=c.version, source="directory", within=c.within)):
                return
        if restored and since is not None:
            if last.is_base:
                log.info("serving the base model, as before the restart")
                return
            if ok(swapper.restore(last)):
                return
            log.warning("the last committed version %s cannot be restored; falling back", last.version)
        for c in older:
            if ok(swapper.swap(c.path, version=c.version, source="directory", within=c.within)):
                return
        initial = self.config.adapter.initial
        if initial and ok(swapper.swap(initial, source="initial")):
            return
        log.info("no adapter to serve: serving the base model (zero adapter)")

    def first_hub_poll(self) -> None:
        """Before READY, look at the branch once: a new replica of a fleet (empty state) must not take traffic on
        the base model or an older version while its cohort serves the branch head. Bounded: each request by
        the source's timeout; a Hub that does not answer leaves what choose_first_version picked, and the
        poll thread keeps trying."""
        hub = self.config.source.hub
        log.info("first look at %s@%s before ready", hub.repo_id, hub.revision)
        self._hub().poll_now()

    def _directory(self) -> DirectorySource:
        if not isinstance(self.source, DirectorySource):
            self.source = DirectorySource(
                self.config.source.directory,
                self._on_candidate,
                skip=self._skip,
                on_event=self._on_source_event,
                on_refused=self._on_refused,
                on_superseded=self._on_superseded,
            )
        return self.source

    def start(self) -> None:
        kind = self.config.source.kind
        if kind == "directory":
            self._directory().start()
            log.info("watching %s", self.config.source.directory.path)
        elif kind == "hub":
            hub = self.config.source.hub
            self._hub().start()
            log.info("watching %s at %s on %s", hub.repo_id, hub.revision, hub.endpoint or "the Hugging Face Hub")

    def _hub(self) -> HubSource:
        if not isinstance(self.source, HubSource):
            self.source = HubSource(
                self.config.source.hub,
                hub_cache_dir(self.config.state_dir),
                self._on_candidate,
                skip=self._skip,
                on_event=self._on_source_event,
                on_poll=lambda result: self.metrics.hub_polls.labels(result).inc(),
                keep=lambda: [v.version for v in list(self.history.chain)],  # the rest of the cache is deleted
            )
            self.metrics.watch_source("hub", HUB_EVENT_KINDS)
        return self.source

    def refresh(self) -> dict[str, Any]:
        """``POST /v1/adapters/refresh``: the source looks now, on the caller's thread (a version it finds is
        swapped in by that look). What it found, for the answer."""
        if isinstance(self.source, HubSource):
            offered = self.source.poll_now()
            status = self.source.status()
            return {"source": "hub", "result": status["last_result"], "error": status["last_error"],
                    "sha": status["last_sha"], "offered": offered.version if offered else None}  # fmt: skip
        if isinstance(self.source, DirectorySource):
            offered = self.source.rescan()
            return {"source": "directory", "result": "looked", "offered": offered.version if offered else None}
        return {"source": self.config.source.kind, "result": "no_source", "offered": None}

    def head(self) -> tuple[str, str] | None:
        """(version, state) for hotswapd_source_head_info: where the source points, and whether that is live here."""
        if isinstance(self.source, HubSource):
            sha = self.source.status()["head_sha"]
            head = f"{self.config.source.hub.repo_id}@{sha}" if sha else None
        else:
            head = self._offered
        if head is None:
            return None
        if head == self.swapper.live.version:
            return head, "live"
        if head in self.history.rolled_back_versions:
            return head, "rolled_back"
        tried = next((r for r in self.history.recent(50) if r.version == head and r.result != "unchanged"), None)
        return head, "rejected" if tried is not None and tried.result in ("rejected", "failed") else "pending"

    def _skip(self, c: Candidate) -> bool:
        if self.history.is_rejected(str(c.path), c.fingerprint):
            return True
        if self.config.source.kind == "hub":
            # Restarted, the Hub source offers the branch head again: not if the operator rolled back from it.
            return c.version in self.history.rolled_back_versions
        # At start-up, what landed before the restored version was committed is not newer.
        return self.startup_since is not None and c.landed_at <= self.startup_since

    def _on_candidate(self, c: Candidate) -> None:
        self._offered = c.version
        # within: the directory source's watched folder, kept to as each file is read (None for the Hub).
        self.swapper.swap(c.path, version=c.version, source=self.config.source.kind, seen_at=c.seen_at, within=c.within)

    def _on_refused(self, refusal: tuple[str, str, str]) -> None:
        """The source refused an entry before any swap (a symlink escaping the watched folder)."""
        path, reason, message = refusal
        self.history.reject(path, fingerprint(path), reason, message)
        self.metrics.validation_failures.labels(reason).inc()
        self.metrics.swaps.labels("rejected").inc()

    def _on_superseded(self, passed: list[Candidate], winner: Candidate) -> None:
        """The directory source passed these over for ``winner`` in one look: listed, not a swap or a rejection."""
        self.history.supersede([(str(c.path), c.version) for c in passed], by=winner.version)

    def _on_source_event(self, kind: str) -> None:
        self.metrics.source_events.labels(self.config.source.kind, kind).inc()

    def describe(self) -> dict[str, Any]:
        kind = self.config.source.kind
        if isinstance(self.source, HubSource):
            return {"kind": kind, **self.source.status()}
        if kind != "directory":
            return {"kind": kind}
        d = self.config.source.directory
        return {
            "kind": kind,
            "path": d.path,
            "present": Path(d.path).is_dir(),
            "settle_seconds": d.settle_seconds,
            "rescan_seconds": d.rescan_seconds,
            "polling": d.polling,
            "marker": d.marker,
            "follow_symlinks": d.follow_symlinks,
        }
