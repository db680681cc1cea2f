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
from hotswap_core.engine import Engine
from hotswap_core.errors import ConfigError, HotswapError
from hotswap_core.history import History, SwapRecord
from hotswap_core.metrics import Metrics
from hotswap_core.swap import Swapper
from hotswap_core.warmup import WarmupStep
from hotswapd.events import EventBus
from hotswapd.feed import Feed
from hotswapd.metrics_server import MetricsServer
from hotswapd.server import Server
from hotswapd.state import ServingState
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
        self.feed: Feed | None = None  # the adapter source and what it offers
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
        feed = self.feed = Feed(self.config, self.history, self.metrics, self.swapper)
        self.server = Server(
            self.state,
            engine,
            self.swapper,
            self.metrics,
            model_id=_model_id(self.config),
            describe_source=feed.describe,
            events=self.events,
            swap_roots=lambda: swap_roots(self.config),
            refresh=feed.refresh,
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
        self.state.model_id = getattr(engine.model_config, "hotswapd_base_id", None) or self.state.model_id
        engine.on_batch = self.metrics.batch_size.observe
        self.metrics.watch_engine(
            lambda: engine.recompilations,
            lambda: engine.queue_depth,
            lambda: engine.kv_cache_usage,
            lambda: engine.running_rows,
        )
        self.metrics.set_build_info(str(engine.device))
        self.metrics.cpu_threads.set(engine.runner.cpu_threads)
        self.metrics.watch_history(lambda: self.history.persist_failures)
        feed.watch()
        engine.start()
        if not await self._in_thread(feed.choose_first_version):
            return
        if self.config.source.kind == "hub" and not await self._in_thread(feed.first_hub_poll):
            return
        feed.start()
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
        cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")  # the one inductor uses (compile.cache_dir, set by load)
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
        if self.feed is not None:
            await asyncio.to_thread(self.feed.stop)
        timeout = self.config.server.drain_timeout_s
        if not await self.server.drain(timeout):
            log.warning("drain timeout (%gs): cancelling %d requests", timeout, self.server.inflight)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.stop, 5.0)
        self.history.save()
        log.info("stopped")

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
        self.state.config = self.config.server
        if self.swapper is not None:
            self.swapper.validation = self.config.validation
        if self.feed is not None:
            await asyncio.to_thread(self.feed.reload, self.config)
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
