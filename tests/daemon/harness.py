"""A real ``hotswapd run`` in a subprocess, on the demo assets, with its own socket, state and watched folder."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from hotswapd.client import Client, ClientError
from hotswapd.demo import DemoAssets

T = TypeVar("T")
START_TIMEOUT = 300.0  # a cold compile on 2 busy cores; warm caches make it ~15 s


def write_config(assets: DemoAssets, where: Path, sock: Path, **overrides: Any) -> Path:
    """The demo config with paths made absolute and the per-test parts moved into ``where``.

    ``overrides`` are dotted keys: ``{"source.directory.settle_seconds": 0.3}``.
    """
    raw = yaml.safe_load(assets.config.read_text())
    raw["model"]["path"] = str(assets.base)
    raw["model"]["compile"]["cache_dir"] = str(assets.root / "cache" / "inductor")  # shared: warm after the first
    raw["adapter"]["initial"] = str(assets.alpha)
    raw["source"]["directory"].update(path=str(where / "adapters"), settle_seconds=0.3, rescan_seconds=2)
    raw["server"]["socket"] = str(sock)
    raw["metrics"]["listen"] = "127.0.0.1:0"
    raw["state_dir"] = str(where / "state")
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    path = where / "hotswapd.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def metric(text: str, series: str) -> float | None:
    """The value of one series (``name{labels}`` exactly as exposed) in a scrape, or None if absent."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (bound, read, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening_tcp_ports(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on: its socket fds matched against /proc's tcp tables (proc(5))."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def drop_adapter(src: Path, watched: Path, name: str) -> Path:
    """The recommended producer protocol: copy into a dot-folder, then rename() it in."""
    staging = watched / f".tmp-{name}"
    shutil.copytree(src, staging)
    dest = watched / name
    os.rename(staging, dest)
    return dest


class DaemonProcess:
    def __init__(
        self, config: Path, sock: Path, log: Path, env: dict[str, str], argv: Sequence[str] | None = None
    ) -> None:
        """``argv``: the command to run instead of ``python -m hotswapd.cli run --config CONFIG``."""
        self.config, self.sock, self.log_path = config, sock, log
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv) if argv is not None else [sys.executable, "-m", "hotswapd.cli", "run", "--config", str(config)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.client = Client(str(sock), timeout=120)

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def metrics_url(self) -> str:
        """Where the daemon says it serves metrics (tests use ``metrics.listen: 127.0.0.1:0``)."""
        found = re.search(r"metrics on (http://\S+)", self.log)
        assert found, self.log[-3000:]
        return found[1]

    def metrics(self) -> str:
        """One scrape, in the text format."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            return str(response.read().decode())

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"hotswapd exited with {self.proc.returncode}:\n{self.log[-4000:]}")
            try:
                return self.client.get("/readyz")["status"] == "ready"
            except ClientError:
                return False

        wait_until(ready, timeout, "/readyz to answer 200", interval=0.2)

    def complete(self, prompt: str = "Hello =>", **body: Any) -> dict[str, Any]:
        return self.client.post("/v1/completions", {"prompt": prompt, "max_tokens": 8, "temperature": 0, **body})

    def live(self) -> str:
        return str(self.client.get("/v1/adapters")["live"]["version"])

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running_daemon(config: Path, workdir: Path, env: dict[str, str]) -> Iterator[DaemonProcess]:
    """A ready daemon on ``workdir/s.sock``; stopped after, which must exit 0 (its log tail is printed)."""
    d = DaemonProcess(config, workdir / "s.sock", workdir / "daemon.log", env)
    try:
        d.wait_ready()
        yield d
    finally:
        rc = d.stop()
        print(d.log[-3000:])
        assert rc == 0
