"""The daemon's lifecycle, in one place: bind -> load -> compile -> warm -> pick the first version ->
watch -> READY -> serve -> (SIGHUP: reload) -> SIGTERM: stop accepting, drain, stop.

Signal handlers only set flags (asyncio's ``add_signal_handler``); the work happens on the loop.
The socket is bound before the model loads, so ``/healthz`` and ``/readyz`` (503) answer during a
long cold compile, and a second daemon on the same socket fails at once, not minutes later.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from hotswap_core.config import Config, apply_reload, load_config, split_host_port, swap_roots
from hotswap_core.engine import Engine, WarmupStep
from hotswap_core.errors import ConfigError, HotswapError
from hotswap_core.history import History, SwapRecord, fingerprint
from hotswap_core.metrics import Metrics
from hotswap_core.sources.directory import EVENT_KINDS as SOURCE_EVENT_KINDS
from hotswap_core.sources.directory import Candidate, DirectorySource
from hotswap_core.sources.hub import EVENT_KINDS as HUB_EVENT_KINDS
from hotswap_core.sources.hub import HubSource, hub_cache_dir
from hotswap_core.swap import Swapper
from hotswapd.events import EventBus
from hotswapd.metrics_server import MetricsServer
from hotswapd.server import Server, ServingState
from hotswapd.systemd import Notifier, listen_socket
from hotswapd.unix_socket import bind_unix_socket

log = logging.getLogger("hotswapd.daemon")
T = TypeVar("T")
_WARMUP_STEP_TIMEOUT_S = 300.0  # EXTEND_TIMEOUT_USEC per warm-up step: room for one cold compile
_STATE_RETRY_S = (1.0, 60.0)  # a failed state write is retried after 1 s, backing off to once a minute


class DaemonError(HotswapError):
    """The daemon cannot start (socket in use, metrics port taken, ...)."""


class Daemon:
    def __init__(self, config_path: str | Path, config: Config) -> None:
        self.config_path = Path(config_path)
        self.config = config
        self.metrics = Metrics()
        self.history = History(config.state_dir)
        self.state = ServingState(config.server)
        self.events = EventBus()
        self.engine: Engine | None = None
        self.swapper: Swapper | None = None
        self.source: DirectorySource | HubSource | None = None
        self.server: Server | None = None
        self.metrics_url: str | None = None
        self.on_ready: Callable[[Daemon], None] | None = None  # the demo prints its three lines here
        self.metrics_port_fallback = False  # the demo: take a free port when metrics.listen is busy
        # Warm-up progress for a terminal (the CLI's progress bar; None once done); unset: a log line per step.
        self.on_warmup: Callable[[WarmupStep | None], None] | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._startup_since: float | None = None
        self._abandoned = False  # a start-up thread was left running when a stop came
        self.notifier = Notifier()
        self._socket_passed = False
        self._tcp: socket.socket | None = None  # server.listen_tcp, bound before the model loads
        self._offered: str | None = None  # the directory source's last offer: its head

    # ---- the whole life -----------------------------------------------------------------------
    def run(self) -> int:
        rc = asyncio.run(self._main())
        if self._abandoned:
            # A start-up thread is still inside torch (loading or compiling) and cannot be
            # interrupted; letting the interpreter finalize under it aborts the process. Leave now.
            logging.shutdown()
            os._exit(rc)
        return rc

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self.events.bind(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        sock = self._bind()
        metrics_server = self._start_metrics()
        watchdog = asyncio.ensure_future(self._watchdog()) if self.notifier.watchdog_interval else None
        state_retry = asyncio.ensure_future(self._retry_state_writes())
        try:
            await self._start(sock)
            if self._stop.is_set():
                return 0
            while not self._stop.is_set():
                stop, reload = asyncio.ensure_future(self._stop.wait()), asyncio.ensure_future(self._reload.wait())
                await asyncio.wait([stop, reload], return_when=asyncio.FIRST_COMPLETED)
                stop.cancel()
                reload.cancel()
                if self._reload.is_set() and not self._stop.is_set():
                    self._reload.clear()
                    self.notifier.reloading()
                    await self.reload()
                    self.notifier.ready(self._status_line())
            await self._shutdown()
            return 0
        finally:
            if watchdog is not None:
                watchdog.cancel()
            state_retry.cancel()
            if self.server is not None:
                await self.server.close()
            if self._tcp is not None:
                self._tcp.close()
            if metrics_server is not None:
                metrics_server.shutdown()
            if not self._socket_passed:  # a socket systemd owns is never unlinked (sd_listen_fds(3))
                Path(self.config.server.socket).unlink(missing_ok=True)
            self.notifier.close()

    def _bind(self) -> Any:
        listen_tcp = self.config.server.listen_tcp
        if listen_tcp is not None:
            host, port = split_host_port(listen_tcp) or ("", 0)  # checked at config load
            try:
                self._tcp = socket.create_server(
                    (host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET, backlog=128
                )
            except OSError as exc:
                raise DaemonError(f"cannot listen on server.listen_tcp {listen_tcp}: {exc.strerror or exc}") from exc
            self._tcp.setblocking(False)
            log.info("inference endpoints also on tcp %s (admin verbs on the Unix socket only)", listen_tcp)
        try:
            passed = listen_socket("api")
            if passed is not None:
                self._socket_passed = True
                return passed
            return bind_unix_socket(self.config.server.socket, self.config.server.socket_mode)
        except OSError as exc:
            raise DaemonError(f"cannot listen on {self.config.server.socket}: {exc.strerror or exc}") from exc

    async def _retry_state_writes(self) -> None:
        """Retry a failed write of state.json (a full or read-only state_dir) until one succeeds, backing off,
        rather than only at the next swap: once space is back, the state on disk catches up within a minute."""
        delay = _STATE_RETRY_S[0]
        while True:
            await asyncio.sleep(delay)
            saved = not self.history.dirty or await asyncio.to_thread(self.history.retry_save)
            delay = _STATE_RETRY_S[0] if saved else min(2 * delay, _STATE_RETRY_S[1])

    async def _watchdog(self) -> None:
        """WATCHDOG=1 every WATCHDOG_USEC/2, sent from the event loop (so it proves the loop turns) and
        only while the engine's worker shows a fresh heartbeat (so it proves generation is not stuck)."""
        interval = self.notifier.watchdog_interval
        assert interval is not None
        while True:
            engine = self.engine
            stale = time.monotonic() - engine.last_loop_at if engine is not None and engine.ready.is_set() else 0.0
            if stale < 2 * interval:
                self.notifier.watchdog()
            else:
                log.error("the engine worker has not turned for %.0fs; not answering the systemd watchdog", stale)
            await asyncio.sleep(interval)

    def _status_line(self) -> str:
        if self.swapper is None:
            return "starting"
        live = self.swapper.live
        last = self.history.records[-1] if self.history.records else None
        tail = f"; last swap: {last.version} {last.result}" if last is not None else ""
        return f"serving {live.version} ({live.sha256[:12]}){tail}"

    def _start_metrics(self) -> MetricsServer | None:
        if not self.config.metrics.enabled:
            return None
        listen = split_host_port(self.config.metrics.listen)
        assert listen is not None  # checked at config load
        host, port = listen
        try:
            try:
                httpd = MetricsServer(host, port, self.metrics.registry, self._readiness)
            except OSError:
                if not self.metrics_port_fallback:
                    raise
                log.warning("metrics port %s is busy; using a free one", self.config.metrics.listen)
                httpd = MetricsServer(host, 0, self.metrics.registry, self._readiness)
        except OSError as exc:
            raise DaemonError(
                f"cannot serve metrics on {self.config.metrics.listen}: {exc.strerror or exc} "
                "(set metrics.listen, or metrics.enabled: false)"
            ) from exc
        shown = f"[{host}]" if ":" in host else host
        self.metrics_url = f"http://{shown}:{httpd.address[1]}/metrics"
        log.info("metrics on %s (and /healthz, /readyz for probes)", self.metrics_url)
        return httpd

    def _readiness(self) -> tuple[int, dict[str, Any]]:
        """What /readyz answers, on the socket and on the metrics listener alike."""
        if self.server is None:
            return 503, {"status": "draining" if self.state.draining else "starting"}
        return self.server.readiness()

    async def _start(self, sock: Any) -> None:
        t0 = time.monotonic()
        engine = self.engine = Engine(self.config)
        self.swapper = Swapper(engine, self.config.validation, self.history)
        self.swapper.listeners.append(self._on_swap)
        self.server = Server(
            self.state,
            engine,
            self.swapper,
            self.metrics,
            model_id=_model_id(self.config),
            describe_source=self.describe_source,
            events=self.events,
            swap_roots=lambda: swap_roots(self.config),
            refresh=self.refresh,
            serve_metrics=self.config.metrics.enabled,
        )
        if self._socket_passed:
            # systemd's socket: connections wait in its backlog until we are ready, so clients queue
            # across a start or a restart instead of getting 503 "starting" (sd_listen_fds(3)).
            log.info("socket passed in by systemd; connections wait in its backlog until warm-up is done")
        else:
            # Our own socket: answer at once, /healthz 200 and /readyz 503 while loading.
            await self.server.start(sock, self._tcp)
            log.info("listening on %s (readyz answers 503 until warm-up is done)", self.config.server.socket)
        if not await self._in_thread(self._load_and_warm):
            return
        # The name clients pass as "model": one the base declares itself, else its folder or Hub id.
        self.server.model_id = getattr(engine.model_config, "hotswapd_base_id", None) or self.server.model_id
        engine.on_batch = self.metrics.batch_size.observe
        self.metrics.watch_engine(
            lambda: engine.recompilations, lambda: engine.queue_depth, lambda: engine.kv_cache_usage
        )
        self.metrics.watch_source_head(self._source_head)
        self.metrics.set_build_info(str(engine.device))
        self.metrics.cpu_threads.set(engine.runner.cpu_threads)
        self.metrics.watch_history(lambda: self.history.persist_failures)
        if self.config.source.kind == "directory":
            self.metrics.watch_source("directory", SOURCE_EVENT_KINDS)
        engine.start()
        if not await self._in_thread(self._choose_first_version):
            return
        if self.config.source.kind == "hub" and not await self._in_thread(self._first_hub_poll):
            return
        self._start_source()
        self.state.ready = True
        if self._socket_passed:
            await self.server.start(sock, self._tcp)
        self.notifier.ready(self._status_line())
        live = self.swapper.live
        log.info("ready in %.1fs: serving %s (sha256 %s)", time.monotonic() - t0, live.version, live.sha256[:12])
        if self.on_ready is not None:
            self.on_ready(self)

    async def _in_thread(self, fn: Callable[[], T]) -> bool:
        """Run ``fn`` on a daemon thread (a SIGTERM during a cold compile must not wait for it)."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn())
            except BaseException as exc:
                fut.set_exception(exc)

        threading.Thread(target=run, name="hotswapd-start", daemon=True).start()
        wrapped: asyncio.Future[Any] = asyncio.wrap_future(fut)
        stop: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        await asyncio.wait([wrapped, stop], return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if not wrapped.done():
            log.warning("stopping during start-up")
            self._abandoned = True
            return False
        wrapped.result()
        return True

    def _load_and_warm(self) -> None:
        assert self.engine is not None
        self.notifier.status(f"loading {self.config.model.path}")
        log.info("loading %s", self.config.model.path)
        self.engine.load()
        cache = self.config.model.compile.cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        if self.config.model.compile.enabled:
            warm = cache is not None and _has_files(Path(cache))
            log.info(
                "compiling and warming up (%s); the first step compiles the graphs",
                f"compile cache {cache} has entries: expect seconds to a minute"
                if warm
                else "cold compile cache: expect minutes on a small CPU",
            )

        def progress(step: WarmupStep) -> None:
            self.notifier.status(f"compiling and warming: {step.describe()}")
            self.notifier.extend_timeout(_WARMUP_STEP_TIMEOUT_S)  # a cold compile step may take minutes
            if self.on_warmup is not None:
                self.on_warmup(step)
            else:
                eta = f", about {step.eta_s:.0f}s left" if step.eta_s is not None else ""
                log.info("warm-up %s; %.0fs so far%s", step.describe(), step.elapsed_s, eta)

        try:
            self.engine.warm_up(progress=progress)
        finally:
            if self.on_warmup is not None:
                self.on_warmup(None)

    async def _shutdown(self) -> None:
        """SIGTERM: stop accepting, let in-flight requests finish (bounded), stop everything."""
        assert self.server is not None
        log.info("stopping: no new connections; draining %d in-flight requests", self.server.inflight)
        self.state.draining = True
        self.notifier.stopping()
        self.events.close()
        await self.server.stop_accepting()
        if self.source is not None:
            await asyncio.to_thread(self.source.stop)
        timeout = self.config.server.drain_timeout_s
        if not await self.server.drain(timeout):
            log.warning("drain timeout (%gs): cancelling %d requests", timeout, self.server.inflight)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, 5.0)
        self.history.save()
        log.info("stopped")

    # ---- which version first ------------------------------------------------------------------
    def _choose_first_version(self) -> None:
        """The last committed version, unless something newer landed since; else the newest valid
        candidate; else ``adapter.initial``; else the base model (zero adapter)."""
        assert self.swapper is not None
        swapper, history = self.swapper, self.history
        restored = history.load()
        last, since = history.live, history.live_since
        self._startup_since = since
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

    def _first_hub_poll(self) -> None:
        """Before READY, look at the branch once: a new replica of a fleet (empty state) must not take traffic on
        the base model or an older version while its cohort serves the branch head. Bounded: each request by
        the source's timeout; a Hub that does not answer leaves what _choose_first_version picked, and the
        poll thread keeps trying."""
        hub = self.config.source.hub
        log.info("first look at %s@%s before ready", hub.repo_id, hub.revision)
        self._hub().poll_now()

    # ---- the source -----------------------------------------------------------------------------
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

    def _start_source(self) -> None:
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

    def _source_head(self) -> tuple[str, str] | None:
        """(version, state) for hotswapd_source_head_info: where the source points, and whether that is live here."""
        if isinstance(self.source, HubSource):
            sha = self.source.status()["head_sha"]
            head = f"{self.config.source.hub.repo_id}@{sha}" if sha else None
        else:
            head = self._offered
        if head is None or self.swapper is None:
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
        return self._startup_since is not None and c.landed_at <= self._startup_since

    def _on_candidate(self, c: Candidate) -> None:
        assert self.swapper is not None
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

    def describe_source(self) -> dict[str, Any]:
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

    def _on_swap(self, result: str, record: SwapRecord) -> None:
        self.events.publish(result, record)
        if result in ("seen", "staged"):
            return
        if self.state.ready:
            self.notifier.status(self._status_line())
        m = self.metrics
        for phase, seconds in record.phases.items():
            m.swap_phase.labels(phase).observe(seconds)
        if result in ("success", "rolled_back"):
            m.swaps.labels(result).inc()
            m.last_swap.set(record.finished_at)
            if record.stall_s is not None:
                m.swap_stall.observe(record.stall_s)
            if "detect" in record.phases:  # landed (first seen) -> live
                m.swap_duration.observe(sum(record.phases.values()))
            m.set_live(record.version, record.sha256 or "", record.source)
        elif result == "rejected":
            m.swaps.labels(result).inc()
            m.validation_failures.labels(record.reason or "unknown").inc()
        elif result == "failed":
            m.swaps.labels(result).inc()

    # ---- SIGHUP -------------------------------------------------------------------------------
    async def reload(self) -> None:
        """Re-read the config; apply what can change live (source, validation, admin uids, timeouts)."""
        log.info("reloading %s", self.config_path)
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running config: %s", problem)
            return
        old = self.config
        self.config, refused = apply_reload(old, new)
        for what in refused:
            log.warning("reload: not applying %s (needs a restart)", what)
        server = self.config.server
        source = self.config.source
        self.state.config = server
        if self.swapper is not None:
            self.swapper.validation = self.config.validation
        if isinstance(self.source, DirectorySource):
            self.source.update_config(source.directory)
            await asyncio.to_thread(self.source.rescan)
        elif isinstance(self.source, HubSource):
            self.source.update_config(source.hub)  # polls at once when anything but poll_seconds changed
        changed = [k for k in ("source", "validation", "server") if getattr(self.config, k) != getattr(old, k)]
        log.info("reloaded: %s", ", ".join(changed) if changed else "nothing changed")


def _model_id(config: Config) -> str:
    path = config.model.path
    return Path(path).name if os.path.isdir(path) else path


def _has_files(folder: Path) -> bool:
    """True if ``folder`` holds any file (a warm inductor cache); stops at the first one."""
    try:
        return any(files for _, _, files in os.walk(folder))
    except OSError:
        return False
