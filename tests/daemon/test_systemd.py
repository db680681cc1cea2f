"""systemd, with systemd's own tools: the units verified and scored, the notify protocol received on
a real datagram socket from a real daemon, socket activation through ``systemd-socket-activate``."""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotswap_core.config import load_config
from hotswapd.client import Client, ClientError
from hotswapd.demo import DemoAssets
from hotswapd.systemd import Notifier, listen_socket

from .harness import START_TIMEOUT, DaemonProcess, wait_until, write_config

ROOT = Path(__file__).parents[2]
UNITS = ROOT / "systemd"
EXEC = "/usr/local/bin/hotswapd"  # what ExecStart= names


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, timeout=120, cwd=UNITS)


@pytest.mark.parametrize(
    "unit", ["hotswapd.service", "hotswapd.socket", "hotswapd@support.service", "hotswapd@support.socket"]
)
def test_units_verify_cleanly(unit: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` checks that ExecStart= names an executable: where /usr/local/bin/hotswapd
    is not installed (a developer's venv), the units are verified with this Python's entry point in its place."""
    script = EXEC if os.access(EXEC, os.X_OK) else shutil.which("hotswapd", path=sysconfig.get_path("scripts"))
    assert script, "no hotswapd entry point: pip install the project first"
    for path in UNITS.glob("*.s*"):
        (tmp_path / path.name).write_text(path.read_text().replace(EXEC, script))
    out = subprocess.run(["systemd-analyze", "verify", unit], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")


@pytest.mark.parametrize("unit", ["hotswapd.service", "hotswapd@support.service"])
def test_security_exposure_at_most_4(unit: str) -> None:
    out = _analyze("security", "--offline=yes", unit)
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert found, out.stdout + out.stderr
    assert float(found[1]) <= 4.0
    for setting in ("ProtectSystem=", "NoNewPrivileges=", "CapabilityBoundingSet=", "SystemCallFilter="):
        assert any(line.startswith("✓ " + setting) for line in out.stdout.splitlines()), setting


def test_sysusers_and_tmpfiles_create_the_user_and_the_watched_folder(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    sysusers = UNITS / "sysusers.d" / "hotswapd.conf"
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(sysusers)], check=True, capture_output=True)
    user = [line for line in (tmp_path / "etc/passwd").read_text().splitlines() if line.startswith("hotswapd:")]
    assert user and user[0].endswith(":/var/lib/hotswapd:/usr/sbin/nologin")
    tmpfiles = UNITS / "tmpfiles.d" / "hotswapd.conf"
    subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(tmpfiles)], check=True, capture_output=True
    )
    st = (tmp_path / "var/lib/hotswapd/adapters").stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid) == ("0o2770", int(user[0].split(":")[2]))


def test_production_config_example_loads() -> None:
    config = load_config(ROOT / "configs" / "hotswapd.yaml")
    assert (config.model.device, config.model.dtype) == ("cuda", "bfloat16")
    assert config.source.directory.path == "/var/lib/hotswapd/adapters"
    assert config.server.socket == "/run/hotswapd/hotswapd.sock" and config.metrics.listen.startswith("127.0.0.1:")
    service = (UNITS / "hotswapd.service").read_text()
    assert "--config /etc/hotswapd/hotswapd.yaml" in service
    assert "ListenStream=/run/hotswapd/hotswapd.sock" in (UNITS / "hotswapd.socket").read_text()
    assert config.server.drain_timeout_s < int(re.search(r"TimeoutStopSec=(\d+)", service)[1])  # type: ignore[index]


# ---- the protocol, in-process --------------------------------------------------------------------------
def test_notifier_is_silent_without_notify_socket() -> None:
    n = Notifier({})
    assert not n.enabled and n.watchdog_interval is None
    n.ready("x")  # nothing to send to, nothing raised


def test_notifier_abstract_socket_and_watchdog_pid() -> None:
    name = f"hotswapd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(b"\0" + name.encode())
        receiver.settimeout(5)
        n = Notifier({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())})
        n.reloading()
        message = receiver.recv(4096).decode().splitlines()
    assert message[0] == "RELOADING=1" and message[1].startswith("MONOTONIC_USEC=")
    assert abs(int(message[1].split("=")[1]) / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
    assert n.watchdog_interval == 1.5
    assert Notifier({"WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"}).watchdog_interval is None  # not ours


def test_listen_socket_takes_the_named_fd_and_clears_the_environment() -> None:
    with tempfile.TemporaryDirectory(prefix="hs-", dir="/tmp") as d:
        a, b = socket.socket(socket.AF_UNIX), socket.socket(socket.AF_UNIX)
        a.bind(f"{d}/a.sock")
        b.bind(f"{d}/b.sock")
        for s in (a, b):
            s.listen()
        # Put them where systemd would: fds 3 and 4 (saving whatever this process had there).
        saved = [os.dup(3), os.dup(4)]
        try:
            os.dup2(a.fileno(), 3)
            os.dup2(b.fileno(), 4)
            env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "metrics:api", "X": "1"}
            sock = listen_socket("api", env)
            assert sock is not None and sock.getsockname() == f"{d}/b.sock"
            assert env == {"X": "1"}
            assert listen_socket("api", {"LISTEN_PID": "1", "LISTEN_FDS": "1"}) is None  # for another process
            sock.detach()  # fd 4 is restored below, not closed twice
        finally:
            os.dup2(saved[0], 3)
            os.dup2(saved[1], 4)
            for fd in saved:
                os.close(fd)
            a.close()
            b.close()


# ---- a real daemon --------------------------------------------------------------------------------
class NotifyReceiver:
    """A datagram socket standing in for systemd's notify socket; records (time, lines, readyz-at-arrival)."""

    def __init__(self, path: Path, sock: Path) -> None:
        self.messages: list[tuple[float, list[str], int | None]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._client = Client(str(sock), timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            lines = data.decode().splitlines()
            self.messages.append((time.monotonic(), lines, self._readyz() if "READY=1" in lines else None))

    def _readyz(self) -> int:
        try:
            self._client.get("/readyz")
            return 200
        except ClientError as exc:
            return exc.status or 0

    def lines(self) -> list[str]:
        return [line for _, lines, _ in self.messages for line in lines]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


@pytest.fixture
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-sd-", dir="/tmp") as d:
        (Path(d) / "adapters").mkdir()
        yield Path(d)


@pytest.mark.slow
def test_notify_sequence_from_a_real_daemon(demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]) -> None:
    receiver = NotifyReceiver(workdir / "notify", workdir / "s.sock")
    env = {**cli_env, "NOTIFY_SOCKET": str(workdir / "notify"), "WATCHDOG_USEC": "1000000"}
    d = DaemonProcess(
        write_config(demo_assets, workdir, workdir / "s.sock"), workdir / "s.sock", workdir / "d.log", env
    )
    try:
        wait_until(lambda: "READY=1" in receiver.lines(), START_TIMEOUT, "READY=1")
        ready = next(m for m in receiver.messages if "READY=1" in m[1])
        assert ready[2] == 200  # /readyz already answered 200 when READY=1 arrived
        before = [line for m in receiver.messages if m[0] < ready[0] for line in m[1]]
        assert any(line.startswith("STATUS=loading ") for line in before), before
        warming = [line for line in before if line.startswith("STATUS=compiling and warming: step ")]
        assert any("batch 8, prompt length" in line for line in warming), before  # e.g. "step 13/16: batch 8, …"
        assert any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in before)
        assert any(line.startswith("STATUS=serving alpha") for line in ready[1])

        time.sleep(3)  # WATCHDOG_USEC=1 s: a ping every 0.5 s from the serving loop
        pings = [t for t, lines, _ in receiver.messages if "WATCHDOG=1" in lines and t > ready[0]]
        gaps = sorted(b - a for a, b in itertools.pairwise(pings))
        assert len(pings) >= 4 and 0.3 < gaps[len(gaps) // 2] < 0.8, gaps

        mark = len(receiver.messages)
        sent = time.clock_gettime(time.CLOCK_MONOTONIC)
        d.signal(signal.SIGHUP)
        wait_until(lambda: any("READY=1" in m[1] for m in receiver.messages[mark:]), 30, "READY=1 after the reload")
        after = [m[1] for m in receiver.messages[mark:] if "WATCHDOG=1" not in m[1]]
        assert after[0][0] == "RELOADING=1" and after[0][1].startswith("MONOTONIC_USEC=")
        assert 0 <= int(after[0][1].split("=")[1]) / 1e6 - sent < 10
        assert "READY=1" in after[1]

        d.signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
        assert any(m[1][0] == "STOPPING=1" for m in receiver.messages[mark:])
    finally:
        d.stop()
        receiver.close()


@pytest.mark.slow
def test_socket_activation_with_systemd_socket_activate(
    demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    activated = workdir / "activated.sock"
    config = write_config(demo_assets, workdir, workdir / "configured.sock")
    log = open(workdir / "d.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", str(activated), "--fdname=api",
         sys.executable, "-m", "hotswapd.cli", "run", "--config", str(config)],
        stdout=log, stderr=subprocess.STDOUT, env=cli_env,
    )  # fmt: skip
    try:
        wait_until(activated.exists, 30, "systemd-socket-activate to listen")
        client = Client(str(activated), timeout=START_TIMEOUT)  # the first connection starts the daemon
        # Sent while the model still compiles: it waits in the socket's backlog, not a 503 "starting".
        answer = client.post("/v1/completions", {"prompt": "Hello =>", "max_tokens": 8, "temperature": 0})
        assert answer["choices"][0]["text"].startswith(" alpha")
        text = (workdir / "d.log").read_text()
        assert text.index("connections wait in its backlog") < text.index("ready in")
        assert client.get("/readyz")["status"] == "ready"
        assert not (workdir / "configured.sock").exists()  # it did not bind a socket of its own
        mode = activated.stat().st_mode
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert activated.exists() and activated.stat().st_mode == mode  # never unlinked or chmod-ed
        assert "serving on the socket passed by systemd" in (workdir / "d.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
