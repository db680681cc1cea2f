"""Hub source: polls a Hugging Face Hub branch or tag and offers each new commit's adapter.

A poll resolves ``revision`` to a commit sha (one API call). A sha not handled before is fetched with
``snapshot_download`` pinned to it, the adapter config and safetensors weights only (nothing is unpickled), into
``cache_dir`` (Hub cache layout); its snapshot folder is offered as ``repo_id@sha``. The branch head is what
should be live: a commit is offered once each time the revision moves to it, so moving a branch back to an
earlier commit rolls back (a fleet's rollback is moving ``stable`` back). Polls are ``poll_seconds`` apart,
each wait spread by ``poll_jitter`` so a fleet does not poll in lockstep. Failures are logged and retried with
exponential backoff and full jitter, a 429's ``Retry-After`` as a floor; none escapes. A revision that is
missing is retried within a second a few times first: moving a branch with huggingface_hub is
``delete_branch`` then ``create_branch``, and a poll between the two must not wait out a backoff.

Why it looks as it does (huggingface_hub 2.4.0):

* ``resolve_revision`` answers from the cached ref when the Hub is unreachable (an outage would read as
  "unchanged"); ``model_info`` raises instead.
* The shared httpx client has no default timeout and ``snapshot_download`` lists the tree with ``timeout=None``: a
  stalled connection would hang the poll for ever. A request hook caps the timeouts of this repo's requests only.
* The client checks each file's size and retries a short one, then deletes the partial file; but the snapshot
  folder can still hold a short file (a size nobody reported, a damaged cache), so sizes are checked here
  against the tree listing the download cached.
* The cache only grows (a commit an hour of 100 MB is 2.4 GB a day): with a ``keep`` callback (the daemon's
  rollback chain) the source deletes every download of its repo but the newest ``keep_versions`` commits of the
  chain, at its first poll, after each offer, and after a failed download (which so leaves nothing behind:
  no half snapshot, blob, listing or lock of it). See ``hub_cache`` for what is deleted and why not with
  ``scan_cache_dir``.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import HfApi, get_cached_repo_tree, snapshot_download
from huggingface_hub.errors import (
    CachedRepoTreeNotFoundError,
    HFValidationError,
    RevisionNotFoundError,
)

from hotswap_core.adapter_files import CONFIG_NAME, WEIGHTS_NAME
from hotswap_core.config import HubSourceConfig
from hotswap_core.errors import HotswapError, SourceError
from hotswap_core.sources import call_back
from hotswap_core.sources.directory import Candidate
from hotswap_core.sources.hub_cache import collect, kept_commits, snapshot_shas
from hotswap_core.sources.hub_http import Quiet, TimeoutCap, describe, endpoint_of, rate_limit, token_of

log = logging.getLogger("hotswapd.source.hub")

ALLOW_PATTERNS = (CONFIG_NAME, WEIGHTS_NAME)
EVENT_KINDS = ("poll", "error", "rate_limited")  # what on_event reports (on_poll: metrics.HUB_POLL_RESULTS)
_MAX_BACKOFF_S = 15 * 60.0
_STOP_WAIT_S = 5.0  # stop() waits this long for a poll in flight; a late one offers nothing
# A missing revision (a branch between delete_branch and create_branch) is retried after 1 s, this many times in
# a row, before the usual backoff: a promotion's gap is one HTTP round trip.
_MISSING_REVISION_RETRIES = (3, 1.0)
# Logged without a traceback: the Hub, the network, the disk, a malformed repo id.
_EXPECTED = (HotswapError, OSError, httpx2.HTTPError, CachedRepoTreeNotFoundError, HFValidationError)


def hub_cache_dir(state_dir: str | Path) -> Path:
    """Where snapshots go: ``$HF_HUB_CACHE`` when set (a cache shared with other tools), else ``state_dir/hub``."""
    env = os.environ.get("HF_HUB_CACHE")
    return Path(env).expanduser() if env else Path(state_dir) / "hub"


class HubSource:
    """Polls ``config.revision`` of ``config.repo_id`` and calls ``on_candidate`` (serially) with each new commit.

    ``skip(candidate)`` vetoes an offer (the sha still counts as handled). ``on_poll(result)`` is called once per
    poll with ``unchanged``, ``changed``, ``error`` or ``rate_limited``; ``on_event(kind)`` with ``poll``, ``error``,
    ``rate_limited``. ``timeout_s`` bounds every network wait; ``jitter(ceiling)`` picks a backoff delay in
    ``[0, ceiling]`` (random by default; tests pass a deterministic one).

    ``keep()`` names the committed versions, oldest first, the live one last (the daemon's rollback chain):
    the newest ``config.keep_versions`` of them that are ``repo@sha`` stay in the cache, every other download of
    the source's repos is deleted. Without it nothing is deleted but what a failed download left.
    """

    def __init__(
        self,
        config: HubSourceConfig,
        cache_dir: str | Path,
        on_candidate: Callable[[Candidate], None],
        *,
        skip: Callable[[Candidate], bool] = lambda c: False,
        on_event: Callable[[str], None] | None = None,
        on_poll: Callable[[str], None] | None = None,
        timeout_s: float = 10.0,
        jitter: Callable[[float], float] | None = None,
        keep: Callable[[], Iterable[str]] | None = None,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._config, self._cache_dir, self._timeout_s = config, Path(cache_dir), timeout_s
        self._on_candidate, self._skip = on_candidate, skip
        self._on_event = on_event or (lambda kind: None)
        self._on_poll = on_poll or (lambda result: None)
        self._jitter = jitter or (lambda ceiling: random.uniform(0.0, ceiling))
        self._keep = keep
        self._uniform = uniform  # spreads each wait between polls (poll_jitter)
        self._repos: set[str] = {config.repo_id}  # repos downloaded into: their old downloads are collected too
        self._collected = False  # the first poll collects what an earlier run left
        self._cap = TimeoutCap()
        self._poll_lock = threading.Lock()  # one poll at a time: the thread's or poll_now's
        self._lock = threading.Lock()  # the fields below, read by status()
        self._handled: str | None = None  # the head last offered or vetoed: not offered again while it stays
        self._first_seen: dict[str, float] = {}  # the pending version -> monotonic time first resolved
        self._suspect: set[str] = set()  # versions whose cached files looked wrong: re-download them
        self._last_sha: str | None = None  # the sha last handled (offered, vetoed, or seen again)
        self._head_sha: str | None = None  # the sha the revision resolved to at the last poll that reached the Hub
        self._last_poll_at: float | None = None
        self._last_poll_mono: float | None = None
        self._last_result: str | None = None
        self._last_error: str | None = None
        self._failures = 0
        self._due = time.monotonic()  # the next poll (monotonic)
        self._wake = threading.Event()
        self._stop: threading.Event | None = None  # one per thread, so a late thread never resumes
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the poll thread: it polls at once, then every ``poll_seconds`` (or later, backing off)."""
        if self._thread is None:
            self._stop = stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(stop,), name="hotswapd-source-hub", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the poll thread and wait for it (a download in flight: a few seconds, then it is left to end
        on its own, offering nothing). Safe to call twice."""
        thread, stop, self._thread, self._stop = self._thread, self._stop, None, None
        if stop is not None:
            stop.set()
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(_STOP_WAIT_S)
            if thread.is_alive():
                log.warning("a poll of %s is still running; it will offer nothing", self._config.repo_id)
                return
        self._cap.detach()

    def update_config(self, config: HubSourceConfig) -> None:
        """Apply a reloaded config at once: a new repo, revision, endpoint or token file is polled right away."""
        with self._lock:
            old, self._config = self._config, config
            if replace(config, poll_seconds=old.poll_seconds) != old:
                self._due = time.monotonic()
            elif self._failures == 0 and self._last_poll_mono is not None:
                self._due = self._last_poll_mono + self._interval(config)
        self._wake.set()

    def poll_now(self) -> Candidate | None:
        """Poll once on the caller's thread; return the candidate offered, if any. Errors are logged and counted
        (see ``status()``), never raised."""
        return self._poll(None)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot: what is watched, the last poll and when the next one is due."""
        with self._lock:
            c = self._config
            return {
                "repo_id": c.repo_id,
                "revision": c.revision,
                "endpoint": endpoint_of(c),
                "last_sha": self._last_sha,
                "head_sha": self._head_sha,
                "last_poll_at": self._last_poll_at,
                "last_result": self._last_result,
                "last_error": self._last_error,
                "consecutive_failures": self._failures,
                "next_poll_in_s": round(max(0.0, self._due - time.monotonic()), 3),
            }

    def _run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            delay = self._due - time.monotonic()
            if delay > 0:
                self._wake.wait(delay)
                continue
            self._poll(stop)

    def _poll(self, stop: threading.Event | None) -> Candidate | None:
        with self._poll_lock:
            config = self._config
            call_back(log, self._on_event, "poll")
            offered: Candidate | None = None
            if not self._collected:
                self._collected = True
                self._collect(config)
            try:
                result, offered = self._attempt(config, stop)
            except Exception as exc:  # the Hub, the network, the disk: all retried later
                result = self._failed(config, exc)
            with self._lock:
                if result not in ("error", "rate_limited"):
                    self._failures, self._last_error = 0, None
                    self._due = time.monotonic() + self._interval(config)
                self._last_result, self._last_poll_at, self._last_poll_mono = result, time.time(), time.monotonic()
            call_back(log, self._on_poll, result)
            return offered

    def _attempt(self, config: HubSourceConfig, stop: threading.Event | None) -> tuple[str, Candidate | None]:
        endpoint, token = endpoint_of(config), token_of(config)
        self._cap.arm((f"{endpoint}/api/models/{config.repo_id}/", f"{endpoint}/{config.repo_id}/resolve/"),
                      self._timeout_s)  # fmt: skip
        info = HfApi(endpoint=endpoint, token=token).model_info(
            config.repo_id, revision=config.revision, timeout=self._timeout_s
        )
        if not info.sha:
            raise SourceError(f"the Hub named no commit for {config.repo_id}@{config.revision}")
        sha, version = info.sha, f"{config.repo_id}@{info.sha}"
        with self._lock:
            self._head_sha = sha
        if version == self._handled:
            return "unchanged", None
        now = time.monotonic()
        self._first_seen = {version: self._first_seen.get(version, now)}  # a sha passed over is forgotten
        log.info("%s of %s moved to %s; downloading", config.revision, config.repo_id, sha)
        folder = self._download(config, endpoint, token, sha)
        if stop is not None and stop.is_set():
            return "changed", None  # stopped meanwhile: not handled, so a restart offers it
        self._handled = version
        with self._lock:
            self._last_sha = sha
        if folder is None:
            log.warning("%s has neither %s nor %s; nothing to offer", version, CONFIG_NAME, WEIGHTS_NAME)
            self._collect(config)
            return "changed", None
        candidate = Candidate(folder, version, self._first_seen.pop(version), sha, time.time())
        if call_back(log, self._skip, candidate):
            self._collect(config)
            return "changed", None
        log.info("offering %s (%s)", version, folder)
        call_back(log, self._on_candidate, candidate)
        self._collect(config)  # live now, or rejected: the chain says what stays
        return "changed", candidate

    def _download(self, config: HubSourceConfig, endpoint: str, token: str | bool, sha: str) -> Path | None:
        """The complete snapshot folder of ``sha`` (None: the commit has neither file); raises when incomplete."""
        version = f"{config.repo_id}@{sha}"
        self._repos.add(config.repo_id)
        try:
            return self._fetch(config, endpoint, token, sha, version)
        except Exception:
            self._collect(config, failed=sha)  # an interrupted download leaves nothing behind
            raise

    def _fetch(self, config: HubSourceConfig, endpoint: str, token: str | bool, sha: str, version: str) -> Path | None:
        folder = Path(
            snapshot_download(
                config.repo_id,
                revision=sha,
                cache_dir=self._cache_dir,
                allow_patterns=list(ALLOW_PATTERNS),
                endpoint=endpoint,
                token=token,
                etag_timeout=self._timeout_s,
                force_download=version in self._suspect,
                max_workers=len(ALLOW_PATTERNS),
                tqdm_class=Quiet,
            )
        )
        # The listing the download just cached (no request): the sizes the Hub reported for this commit.
        listing = get_cached_repo_tree(config.repo_id, revision=sha, cache_dir=self._cache_dir)
        expected = {f.path: f.size for f in listing if f.path in ALLOW_PATTERNS}
        for name, size in expected.items():
            path = folder / name
            actual = path.stat().st_size if path.is_file() else None
            if actual != size:
                self._suspect.add(version)
                path.unlink(missing_ok=True)  # the library would hand this very file back otherwise
                raise SourceError(f"{version}: {name} is incomplete ({actual} of {size} bytes); will download again")
        self._suspect.discard(version)
        return folder if expected else None

    def _collect(self, config: HubSourceConfig, failed: str | None = None) -> None:
        """Delete the downloads nothing needs (see the class docstring); ``failed``: a download that just failed,
        deleted unless the chain names it (a transient error re-fetching the live commit keeps the live files)."""
        kept = self._kept(config)
        for repo in sorted(self._repos):
            if kept is None:
                if failed is None or repo != config.repo_id:
                    continue
                keep = snapshot_shas(self._cache_dir, repo) - {failed}
            else:
                keep = kept.get(repo, set())
            try:
                done = collect(self._cache_dir, repo, keep)
            except Exception:  # a cache we cannot clean must not stop polling
                log.exception("collecting old downloads of %s in %s failed", repo, self._cache_dir)
                continue
            if done.files or done.snapshots:
                log.info("deleted %d snapshots and %d files of %s (%.2f MB) from %s; kept %s",
                         done.snapshots, done.files, repo, done.bytes / 1e6, self._cache_dir,
                         ", ".join(s[:12] for s in sorted(keep)) or "nothing")  # fmt: skip

    def _kept(self, config: HubSourceConfig) -> dict[str, set[str]] | None:
        """repo_id -> the shas to keep: the newest ``keep_versions`` distinct ``repo@sha`` versions ``keep()``
        names; None without ``keep`` or when it failed (then nothing is deleted on its word)."""
        if self._keep is None:
            return None
        chain = call_back(log, _versions, self._keep)
        return None if chain is None else kept_commits(chain, config.keep_versions)

    def _interval(self, config: HubSourceConfig) -> float:
        """The wait until the next poll: poll_seconds, spread by poll_jitter (uniform, same mean)."""
        j = config.poll_jitter
        return config.poll_seconds * self._uniform(1.0 - j, 1.0 + j) if j else config.poll_seconds

    def _failed(self, config: HubSourceConfig, exc: Exception) -> str:
        limited, retry_after = rate_limit(exc)
        with self._lock:
            self._failures += 1
            cap = max(config.poll_seconds, _MAX_BACKOFF_S)
            ceiling = min(cap, config.poll_seconds * 2.0 ** min(self._failures, 32))
            delay = max(self._jitter(ceiling), retry_after or 0.0)
            retries, soon = _MISSING_REVISION_RETRIES
            if isinstance(exc, RevisionNotFoundError) and self._failures <= retries:
                delay = min(soon, config.poll_seconds)
            self._due = time.monotonic() + delay
            self._last_error = message = describe(exc)
            failures = self._failures
        result = "rate_limited" if limited else "error"
        log.warning("polling %s@%s failed (%s in a row): %s; next try in %.1fs",
                    config.repo_id, config.revision, failures, message, delay,
                    exc_info=not isinstance(exc, _EXPECTED))  # fmt: skip
        call_back(log, self._on_event, result)
        return result


def _versions(keep: Callable[[], Iterable[str]]) -> list[str]:
    return [str(v) for v in keep()]
