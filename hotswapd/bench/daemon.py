"""Daemon contenders: ``hotswapd run`` subprocesses timed to READY and to a first token, and the
measurements that need a real daemon on its Unix socket (landed -> live, latency under swaps, throughput)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any

import yaml

from hotswapd.bench.errors import BenchError
from hotswapd.bench.stats import LoadWindow, closed_loop
from hotswapd.client import Client, ClientError

PROMPT = "Hello =>"
_POLL_S = 0.02  # /readyz polling while a daemon starts
_LIVE_POLL_S = 0.005  # pause between completions while waiting for a landed version to serve
SWAP_EVERY_S = 0.2  # latency under swaps: one admin swap this often
# Set to another checkout's root, the bench measures that checkout's ``hotswapd run`` (before/after tables).
DAEMON_PYTHONPATH = "HOTSWAPD_BENCH_DAEMON_PYTHONPATH"


@dataclass
class Arrivals:
    """What ``DaemonBench.arrivals`` saw: each version renamed in, and when each that went live did."""

    landed: list[tuple[str, float]] = field(default_factory=list)  # (version, rename time.time()), in order
    live: dict[str, float] = field(default_factory=dict)  # version -> its swap record's finished_at
    superseded: int = 0  # of ours, listed in GET /v1/adapters (the newest 50 at most)

    def went_live(self) -> list[float]:
        """Seconds from arrival to live, for each version that went live."""
        landed = dict(self.landed)
        return [t - landed[v] for v, t in self.live.items() if v in landed]

    def newest_behind(self) -> list[float]:
        """For every arrival, seconds until it or a newer version was live (how stale the live version got)."""
        order = {v: i for i, (v, _) in enumerate(self.landed)}
        went = sorted((order[v], t) for v, t in self.live.items() if v in order)
        return [min((t for j, t in went if j >= i), default=float("inf")) - at for i, (_, at) in enumerate(self.landed)]


class DaemonRun:
    """One ``hotswapd run`` process: spawned now, timed to READY (``/readyz`` 200) and to its first token."""

    def __init__(self, config: Path, sock: Path, log: Path, cache_dir: Path) -> None:
        self.sock, self.log_path = sock, log
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir), "PYTHONUNBUFFERED": "1"}
        other = os.environ.get(DAEMON_PYTHONPATH)
        if other:  # another checkout's daemon (a before/after table); the bench itself stays this one
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [other, env.get("PYTHONPATH")]))
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hotswapd.cli", "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.client = Client(str(sock), timeout=120)

    def wait_ready(self, timeout: float) -> float:
        """Seconds from spawn until ``/readyz`` answered 200."""
        deadline = self.started + timeout
        while True:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise BenchError(f"hotswapd run exited with {self.proc.returncode} while starting:\n{tail}")
            try:
                if self.client.get("/readyz").get("status") == "ready":
                    return time.perf_counter() - self.started
            except ClientError:
                pass
            if time.perf_counter() > deadline:
                raise BenchError(f"hotswapd run was not ready after {timeout:g}s (log: {self.log_path})")
            time.sleep(_POLL_S)

    def first_token(self) -> float:
        """Seconds from spawn until a one-token completion came back."""
        complete(self.client, 1)
        return time.perf_counter() - self.started

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def complete(client: Client, max_tokens: int, prompt: str = PROMPT) -> dict[str, Any]:
    """A greedy completion of exactly ``max_tokens`` (``ignore_eos``): the same work whichever adapter is live, so
    windows that swap adapters and windows that do not compare like for like."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    return client.post("/v1/completions", body)


class DaemonBench:
    """Runs ``hotswapd run`` the way an operator would, from a config the bench writes per run."""

    def __init__(self, raw_config: dict[str, Any], work: Path, sock_dir: Path, start_timeout: float) -> None:
        self.raw = raw_config
        self.work = work
        self.sock = sock_dir / "bench.sock"  # AF_UNIX paths must stay under 108 bytes
        self.watched = work / "watched"
        self.watched.mkdir(parents=True, exist_ok=True)
        self.start_timeout = start_timeout
        self.warm_cache: Path | None = None
        self.current: DaemonRun | None = None
        self.ready_seconds: dict[str, list[float]] = {"cold_cache": [], "warm_cache": []}
        self._runs = 0

    @property
    def client(self) -> Client:
        if self.current is None:
            raise BenchError("no daemon is running")
        return self.current.client

    def _config(self, cache_dir: Path) -> Path:
        self._runs += 1
        run = self.work / f"run-{self._runs}"
        raw = {**self.raw}
        raw["model"] = {**raw["model"], "compile": {**raw["model"]["compile"], "cache_dir": str(cache_dir)}}
        raw["source"] = {"kind": "directory", "directory": {**raw["source"]["directory"], "path": str(self.watched)}}
        raw["server"] = {**raw.get("server", {}), "socket": str(self.sock)}
        raw["metrics"] = {"enabled": True, "listen": "127.0.0.1:0"}
        raw["state_dir"] = str(run / "state")
        run.mkdir(parents=True)
        path = run / "hotswapd.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def restart_turn(self, cold: bool) -> Callable[[], float]:
        """Stop the running daemon (untimed), start a new one; the sample is spawn -> first token.
        Cold: a fresh ``compile.cache_dir`` and ``TORCHINDUCTOR_CACHE_DIR``; warm: the first cold one's."""
        kind = "cold_cache" if cold else "warm_cache"

        def turn() -> float:
            self.stop()
            if cold or self.warm_cache is None:
                cache = self.work / f"cache-{self._runs + 1}"
                self.warm_cache = self.warm_cache or cache
            else:
                cache = self.warm_cache
            config = self._config(cache)
            self.current = DaemonRun(config, self.sock, config.parent / "hotswapd.log", cache)
            self.ready_seconds[kind].append(self.current.wait_ready(self.start_timeout))
            return self.current.first_token()

        return turn

    def stop(self) -> None:
        if self.current is not None:
            self.current.stop()
            self.current = None

    # ---- on the running daemon -------------------------------------------------------------------
    def swap(self, path: Path) -> dict[str, Any]:
        answer = self.client.post("/v1/adapters/swap", {"path": str(path)})
        if answer["record"]["result"] not in ("success", "unchanged"):
            raise BenchError(f"daemon swap of {path} ended {answer['record']['result']}")
        return answer

    def tokens(self, max_tokens: int) -> Callable[[], int]:
        """One completion over the socket; returns its completion tokens (a fresh connection each, as curl)."""
        client = self.client

        def request() -> int:
            return int(complete(client, max_tokens)["usage"]["completion_tokens"])

        return request

    def latency_window(
        self, clients: int, seconds: float, max_tokens: int, swap_paths: list[Path] | None
    ) -> LoadWindow:
        """A closed-loop load window; with ``swap_paths``, an admin swap every ``SWAP_EVERY_S`` meanwhile."""
        stop = threading.Event()
        swaps: list[str] = []
        failures: list[str] = []

        def swapper() -> None:
            assert swap_paths is not None
            order = cycle(swap_paths)
            tick = time.perf_counter()
            while not stop.is_set():
                tick += SWAP_EVERY_S
                try:
                    swaps.append(self.swap(next(order))["record"]["result"])
                except (BenchError, ClientError) as exc:  # counted with the window's errors
                    failures.append(f"swap: {exc}")
                stop.wait(max(0.0, tick - time.perf_counter()))

        thread = threading.Thread(target=swapper, name="bench-swapper", daemon=True) if swap_paths else None
        if thread is not None:
            thread.start()
        try:
            window = closed_loop(self.tokens(max_tokens), clients, seconds)
        finally:
            stop.set()
            if thread is not None:
                thread.join(30)
        window.swaps = len(swaps)
        window.errors += failures
        return window

    def landed_to_live(self, src: Path, name: str, timeout: float) -> tuple[float, dict[str, float]]:
        """The README's producer protocol: copy ``src`` into a dot-folder of the watched folder, ``rename()``
        it to ``name``, and time until the first completion that names ``name``.
        Returns (seconds, the swap record's phases in seconds)."""
        staging = self.watched / f".incoming-{name}"
        shutil.copytree(src, staging)
        client = self.client
        t0 = time.perf_counter()
        os.rename(staging, self.watched / name)
        while complete(client, 1)["adapter"]["version"] != name:
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"{name} was not live {timeout:g}s after it landed")
            time.sleep(_LIVE_POLL_S)
        elapsed = time.perf_counter() - t0
        # The record is added just after the flip that the completion above already saw.
        deadline = time.perf_counter() + 10.0
        while time.perf_counter() < deadline:
            for record in client.get("/v1/adapters")["history"]:
                if record["version"] == name and record["result"] == "success":
                    return elapsed, {k: v / 1000 for k, v in record["phases_ms"].items()}
            time.sleep(_POLL_S)
        raise BenchError(f"no successful swap record for {name} in GET /v1/adapters")

    def arrivals(self, paths: list[Path], every: float, seconds: float, timeout: float) -> Arrivals:
        """A producer renaming a new version into the watched folder every ``every`` seconds for ``seconds``
        (the README's protocol, each config made unique so every swap is a real one); swap records are
        collected from ``GET /v1/adapters`` meanwhile (it lists the newest 50)."""
        run = Arrivals()
        client, order = self.client, cycle(paths)

        def collect() -> None:
            adapters = client.get("/v1/adapters")
            for record in adapters["history"]:
                if record["result"] == "success" and record["version"].startswith("arrival-"):
                    run.live.setdefault(record["version"], record["finished_at"])
            run.superseded = sum(s["version"].startswith("arrival-") for s in adapters.get("superseded", []))

        tick = time.perf_counter()
        end, next_collect = tick + seconds, tick + 1.0
        while tick < end:
            name = f"arrival-{len(run.landed):04d}"
            staging = self.watched / f".incoming-{name}"
            shutil.copytree(next(order), staging)
            config = json.loads((staging / "adapter_config.json").read_text())
            (staging / "adapter_config.json").write_text(json.dumps({**config, "revision": name}))
            os.rename(staging, self.watched / name)
            run.landed.append((name, time.time()))
            if time.perf_counter() >= next_collect:
                collect()
                next_collect += 1.0
            tick += every
            time.sleep(max(0.0, tick - time.perf_counter()))
        last, deadline = run.landed[-1][0], time.perf_counter() + timeout
        while last not in run.live:
            if time.perf_counter() > deadline:
                raise BenchError(f"{last}, the last arrival, was not live {timeout:g}s after the producer stopped")
            time.sleep(_POLL_S * 5)
            collect()
        return run
