"""The shipped units under a real systemd: systemd 252 booted in a container, driven as an operator would.

The container's root is an overlay of this machine's ``/`` with a tmpfs on top, so it has the same
Debian packages (systemd, curl, gcc, Debian's python3) and everything written goes away with the
tmpfs. Before the boot, in a chroot (the container gets no network): a venv from Debian's
``/usr/bin/python3`` at ``/opt/hotswapd``, ``pip install torch==<this torch>`` and a copy of this
working tree (not editable), the link ``/usr/local/bin/hotswapd``, the demo assets. After the boot,
inside it (``nsenter``): the README's install steps, then the checks below, one test each, in order.

Slow: about 4 minutes with a warm inductor cache kept from an earlier run under
``$HOTSWAPD_TEST_CACHE`` (default ``/var/tmp/hotswapd-test-cache``), about 6 cold on 2 CPU cores.
Needs root and ``systemd-nspawn`` (Debian package systemd-container); skipped otherwise.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from .harness import wait_until

ROOT = Path(__file__).parents[2]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
VENV = "/opt/hotswapd"
SRC = "/opt/src/hotswapd"  # the copy of this working tree, inside the container
DEMO = "/opt/hotswapd-demo"
CONFIGS = "/opt/hotswapd-configs"  # the test's configs, installed from here as the README says
SOCK = "/run/hotswapd/hotswapd.sock"
WATCHED = "/var/lib/hotswapd/adapters"
VERSION = "v42"  # the producer's adapter version
HOST_CACHE = Path(os.environ.get("HOTSWAPD_TEST_CACHE", "/var/tmp/hotswapd-test-cache")) / "real-systemd"
COLD_START_S = 600.0  # measured: 136 s to READY with a cold compile cache, 23-33 s warm (2 shared cores)
COMPLETION = json.dumps({"prompt": "Hello =>", "max_tokens": 8, "temperature": 0})

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="boots systemd in a container (systemd-nspawn): needs root"),
    pytest.mark.skipif(
        shutil.which("systemd-nspawn") is None, reason="systemd-nspawn is missing (Debian package systemd-container)"
    ),
]


_capture: list[Any] = []  # pytest's capture manager while this module runs (see _show_log)


@pytest.fixture(scope="module", autouse=True)
def _show_log(pytestconfig: pytest.Config) -> Iterator[None]:
    """What this module checks is part of CI's output, not only on failure: log() writes past pytest's capture."""
    _capture.append(pytestconfig.pluginmanager.getplugin("capturemanager"))
    yield
    _capture.clear()


def log(message: str) -> None:
    line = f"[real-systemd] {message}"
    if not _capture:
        print(line, flush=True)
        return
    with _capture[0].global_and_fixture_disabled():
        print(line, flush=True)


def _run(argv: Sequence[str], timeout: float, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise AssertionError(f"{shlex.join(argv)} exited {out.returncode}:\n{out.stdout[-6000:]}\n{out.stderr[-6000:]}")
    return out.stdout


def _chroot_env() -> dict[str, str]:
    """A clean environment for the chroot, keeping this machine's pip settings (local wheels, proxies)."""
    keep = ("PIP_", "SSL_CERT_", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
    env = {k: v for k, v in os.environ.items() if k.upper().startswith(keep)}
    return {**env, "PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"}


class Machine:
    """An overlay of ``/`` (tmpfs upper) at ``root``, prepared in a chroot, booted with systemd-nspawn."""

    def __init__(self, base: Path) -> None:
        self.base, self.root, self.rw = base, base / "root", base / "rw"
        self.name = f"hotswapd-test-{os.getpid()}"
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.init_pid = 0
        self.mounts: list[Path] = []
        self.timings: dict[str, float] = {}
        self.results: dict[str, Any] = {}  # handed from one test to a later one

    # ---- before the boot ------------------------------------------------------------------------
    def mount(self) -> None:
        self.rw.mkdir()
        self.root.mkdir()
        _run(["mount", "-t", "tmpfs", "-o", "size=6g,mode=0755", "hotswapd-test", str(self.rw)], 30)
        self.mounts.append(self.rw)
        (self.rw / "upper").mkdir()
        (self.rw / "work").mkdir()
        options = f"lowerdir=/,upperdir={self.rw}/upper,workdir={self.rw}/work"
        _run(["mount", "-t", "overlay", "overlay", "-o", options, str(self.root)], 30)
        self.mounts.append(self.root)

    def chroot(self, script: str, timeout: float) -> str:
        """``sh -euxc script`` chrooted into the container's root, with /dev and /proc, in a private
        mount namespace (its mounts vanish when it exits)."""
        r = shlex.quote(str(self.root))
        inner = (
            f"mount --rbind /dev {r}/dev && mount -t proc proc {r}/proc && "
            f"exec chroot {r} /bin/sh -euxc {shlex.quote(script)}"
        )
        return _run(["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", inner], timeout, _chroot_env())

    def timed(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        t0 = time.monotonic()
        try:
            return fn(*args, **kwargs)
        finally:
            self.timings[what] = time.monotonic() - t0
            log(f"timing: {what}: {self.timings[what]:.1f}s")

    # ---- the boot -------------------------------------------------------------------------------
    def boot(self, timeout: float) -> None:
        (self.root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")  # its own journal, not the host's id
        (self.root / "var/log/journal").mkdir(parents=True, exist_ok=True)  # persistent: readable with -D
        console = open(self.base / "console.log", "wb")  # noqa: SIM115 - closed with the process
        argv = ["systemd-nspawn", "-D", str(self.root), "-b", "--console=pipe", "--register=no", "--keep-unit",
                "--private-network", "--link-journal=no", "-M", self.name]  # fmt: skip
        log(f"boot: {shlex.join(argv)}")
        with console:
            self.nspawn = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.init_pid = wait_until(self._init_pid, 60, "the container's init (systemd) to exist", interval=0.1)
        state = wait_until(self._booted, timeout, "the container to finish booting", interval=0.5)
        log(f"container init pid {self.init_pid}; systemctl is-system-running: {state}")
        if state != "running":
            log(self.exec(["systemctl", "--failed", "--no-pager"], check=False).stdout)

    def _init_pid(self) -> int:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}")
        with contextlib.suppress(OSError, ValueError):
            for child in Path(f"/proc/{self.nspawn.pid}/task/{self.nspawn.pid}/children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                    return int(child)
        return 0

    def _booted(self) -> str:
        assert self.nspawn is not None
        if self.nspawn.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.nspawn.returncode}:\n{self.console()}")
        state = self.exec(["systemctl", "is-system-running"], check=False, timeout=30).stdout.strip()
        return state if state in ("running", "degraded") else ""

    def console(self) -> str:
        return (self.base / "console.log").read_text(errors="replace")[-4000:]

    # ---- inside the running container -----------------------------------------------------------
    def exec(
        self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """``argv`` inside the container (its mount, UTS, IPC, network and PID namespaces), clean env."""
        full = ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--",
                "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root", *argv]  # fmt: skip
        out = subprocess.run(full, capture_output=True, text=True, timeout=timeout)
        if check and out.returncode != 0:
            raise AssertionError(
                f"in the container: {shlex.join(argv)} exited {out.returncode}:\n{out.stdout}\n{out.stderr}"
            )
        return out

    def sh(self, script: str, *, timeout: float = 60.0) -> str:
        return self.exec(["/bin/sh", "-euxc", script], timeout=timeout).stdout

    def popen(self, argv: Sequence[str]) -> subprocess.Popen[str]:
        full = ["nsenter", "-t", str(self.init_pid), "-m", "-u", "-i", "-n", "-p", "--",
                "env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", *argv]  # fmt: skip
        return subprocess.Popen(full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def show(self, unit: str, *props: str) -> dict[str, str]:
        argv = ["systemctl", "show", unit, *(f"--property={p}" for p in props)]
        out = self.exec(argv).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, *match: str) -> list[str]:
        """Message texts from the container's journal files, read from outside (``journalctl -D``)."""
        argv = ["journalctl", "-D", str(self.root / "var/log/journal"), "-o", "cat", "--no-pager", *match]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout.splitlines()

    def journal_entries(self, *match: str) -> list[dict[str, Any]]:
        argv = ["journalctl", "-D", str(self.root / "var/log/journal"), "-o", "json", "--no-pager", *match]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def curl(self, path: str, body: str | None = None, sock: str = SOCK, timeout: float = 60) -> tuple[int, str]:
        argv = ["curl", "-sS", "--max-time", str(int(timeout)), "-w", "\n%{http_code}", "--unix-socket", sock,
                f"http://localhost{path}"]  # fmt: skip
        if body is not None:
            argv += ["-d", body]
        out = self.exec(argv, check=False, timeout=timeout + 10)
        text, _, code = out.stdout.rpartition("\n")
        return int(code or 0), text

    def curl_json(self, path: str, body: str | None = None, sock: str = SOCK) -> dict[str, Any]:
        code, text = self.curl(path, body, sock)
        assert code == 200, (path, code, text)
        return dict(json.loads(text))

    def wait_active(self, unit: str, timeout: float) -> dict[str, str]:
        """Polls until ``unit`` is active (Type=notify: after READY=1); fails at once if it fails."""
        last = [0.0]

        def active() -> dict[str, str]:
            s = self.show(unit, "ActiveState", "SubState", "StatusText", "Result")
            if s["ActiveState"] == "failed":
                raise AssertionError(f"{unit} failed: {s}\n" + "\n".join(self.journal("-u", unit)[-40:]))
            if time.monotonic() - last[0] > 20:
                last[0] = time.monotonic()
                log(f"{unit}: {s['ActiveState']} ({s['SubState']}): {s.get('StatusText', '')}")
            return s if s["ActiveState"] == "active" else {}

        return wait_until(active, timeout, f"{unit} to be active", interval=0.5)

    # ---- the end --------------------------------------------------------------------------------
    def poweroff(self, timeout: float = 60.0) -> None:
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None and self.init_pid:
            with contextlib.suppress(subprocess.TimeoutExpired, AssertionError):
                self.exec(["systemctl", "poweroff"], check=False, timeout=20)
            try:
                self.nspawn.wait(timeout)
                log(f"container powered off (systemd-nspawn exited {self.nspawn.returncode})")
            except subprocess.TimeoutExpired:
                log(f"container still up {timeout:g}s after poweroff: killing it")
        if self.nspawn.poll() is None:
            for pid in (self.init_pid, self.nspawn.pid):  # SIGKILL to a PID namespace's init ends all of it
                if pid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.nspawn.pid, signal.SIGKILL)
            self.nspawn.wait(30)

    def cleanup(self) -> None:
        try:
            self.poweroff()
        finally:
            for mount in reversed(self.mounts):
                if subprocess.run(["umount", str(mount)], capture_output=True, timeout=60).returncode != 0:
                    subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=60)
            still = [m for m in self.mounts if os.path.ismount(m)]
            with contextlib.suppress(OSError):
                Path(f"/run/systemd/nspawn/propagate/{self.name}").rmdir()  # left behind by systemd-nspawn
            assert not still, f"still mounted: {still}"  # never rmtree through a mounted overlay
            shutil.rmtree(self.base, ignore_errors=True)


def container_config(demo_yaml: Path, instance: str | None) -> dict[str, Any]:
    """The demo config with the container's paths: the demo model on the CPU, the unit's folders."""
    raw = yaml.safe_load(demo_yaml.read_text())
    sub = f"/{instance}" if instance else ""
    raw["model"].update(path=f"{DEMO}/base", device="cpu")
    raw["model"]["compile"]["cache_dir"] = f"/var/cache/hotswapd{sub}/inductor"
    raw["adapter"]["initial"] = f"{DEMO}/examples/alpha"
    raw["source"]["directory"].update(path=f"/var/lib/hotswapd{sub}/adapters", settle_seconds=0.5, rescan_seconds=2)
    raw["server"]["socket"] = f"/run/hotswapd/{instance or 'hotswapd'}.sock"
    raw["metrics"]["listen"] = f"127.0.0.1:{9465 if instance else 9464}"  # the container's own loopback
    raw["state_dir"] = f"/var/lib/hotswapd{sub}"
    return dict(raw)


def _copy_tree(src: Path, dest: Path) -> None:
    """The parts of this working tree that ``pip install`` and the install steps need."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / name, dest / name)
    for name in ("hotswapd", "hotswap_core", "systemd", "configs"):
        shutil.copytree(src / name, dest / name, ignore=ignore)


def _prepare(m: Machine) -> None:
    _copy_tree(ROOT, m.root / SRC.lstrip("/"))
    torch_version = importlib.metadata.version("torch").split("+")[0]  # the CPU build this machine's pip finds
    m.timed(
        "venv + pip install torch and the project (in the chroot)",
        m.chroot,
        f"""
        /usr/bin/python3 -m venv {VENV}
        {VENV}/bin/pip install -q torch=={torch_version}
        {VENV}/bin/pip install -q {SRC}
        rm -f /usr/local/bin/hotswapd
        ln -s {VENV}/bin/hotswapd /usr/local/bin/hotswapd
        """,
        900,
    )
    m.timed("hotswapd demo --no-serve (in the chroot)", m.chroot, f"hotswapd demo --dir {DEMO} --no-serve", 300)
    configs = m.root / CONFIGS.lstrip("/")
    configs.mkdir(parents=True)
    demo_yaml = m.root / DEMO.lstrip("/") / "hotswapd.yaml"
    for name, instance in (("hotswapd", None), ("demo", "demo")):
        (configs / f"{name}.yaml").write_text(yaml.safe_dump(container_config(demo_yaml, instance)))
    broken = container_config(demo_yaml, "broken")
    broken["model"]["path"] = f"{DEMO}/no-such-model"  # a valid config that fails at start (exit 3), every time
    (configs / "broken.yaml").write_text(yaml.safe_dump(broken))
    # This machine's enabled services (a database, a Prometheus, timers) have no business in the test.
    for wants in ("multi-user.target.wants", "timers.target.wants"):
        folder = m.root / "etc/systemd/system" / wants
        units = sorted(p.name for p in folder.glob("*") if not p.name.startswith("hotswapd")) if folder.is_dir() else []
        if units:
            _run(["systemctl", f"--root={m.root}", "mask", *units], 60)
    cached = HOST_CACHE / "inductor"
    if cached.is_dir():  # a warm start: only a speed-up, the checks are the same
        shutil.copytree(cached, m.root / "var/cache/hotswapd/inductor")
        log(f"inductor cache from an earlier run copied in from {cached}")


# The README's install steps ("Production on a GPU in five steps", 2, 4 and 5), run inside the container.
# sysusers.d: `install -D … /etc/sysusers.d/hotswapd.conf`, as Debian 12 has no /etc/sysusers.d.
INSTALL = f"""
cd {SRC}
install -m 0644 systemd/hotswapd.service systemd/hotswapd.socket systemd/hotswapd@.service \
  systemd/hotswapd@.socket /etc/systemd/system/
install -D -m 0644 systemd/sysusers.d/hotswapd.conf /etc/sysusers.d/hotswapd.conf
systemd-sysusers
install -D -m 0644 systemd/tmpfiles.d/hotswapd.conf /etc/tmpfiles.d/hotswapd.conf
systemd-tmpfiles --create
systemctl daemon-reload
install -D -m 0640 -g hotswapd {CONFIGS}/hotswapd.yaml /etc/hotswapd/hotswapd.yaml
hotswapd check-config /etc/hotswapd/hotswapd.yaml
systemctl enable --now --no-block hotswapd.socket hotswapd.service
"""


@pytest.fixture(scope="module")
def machine() -> Iterator[Machine]:
    m = Machine(Path(tempfile.mkdtemp(prefix="hs-nspawn-", dir="/var/tmp")))
    t0 = time.monotonic()
    try:
        m.mount()
        _prepare(m)
        m.timed("container boot to is-system-running", m.boot, 180)
        log(m.sh(INSTALL))
        m.timed("enable --now to hotswapd.service active (READY=1)", m.wait_active, "hotswapd.service", COLD_START_S)
        m.results["ready"] = True
        ready = [line for line in m.journal("-u", "hotswapd.service") if "ready in" in line or "compiling and" in line]
        log("\n".join(ready))
        yield m
    finally:
        with contextlib.suppress(OSError):
            if m.results.get("ready") and (m.root / "var/cache/hotswapd/inductor").is_dir():  # keep it for next time
                tmp = HOST_CACHE / "inductor.new"
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(m.root / "var/cache/hotswapd/inductor", tmp)
                shutil.rmtree(HOST_CACHE / "inductor", ignore_errors=True)
                tmp.rename(HOST_CACHE / "inductor")
        m.cleanup()
        log("timings: " + ", ".join(f"{k}: {v:.1f}s" for k, v in m.timings.items()))
        log(f"whole run: {time.monotonic() - t0:.1f}s")


def test_socket_and_service_active_after_ready(machine: Machine) -> None:
    exec_start = machine.exec(["systemctl", "show", "-p", "ExecStart", "hotswapd.service"]).stdout.strip()
    log(f"systemctl show -p ExecStart hotswapd.service: {exec_start}")
    assert "argv[]=/usr/local/bin/hotswapd run --config /etc/hotswapd/hotswapd.yaml --log-format json ;" in exec_start
    socket_unit = machine.show("hotswapd.socket", "ActiveState", "SubState", "Listen")
    service = machine.show("hotswapd.service", "StatusText", "ActiveState", "SubState", "MainPID", "Type")
    log(f"hotswapd.socket: {socket_unit}")
    log(f"hotswapd.service: {service}")
    assert (socket_unit["ActiveState"], socket_unit["SubState"]) == ("active", "running")
    assert service["Type"] == "notify"  # so "active" means READY=1 arrived
    assert (service["ActiveState"], service["SubState"]) == ("active", "running")
    assert service["StatusText"].startswith("serving alpha ("), service["StatusText"]
    user = machine.exec(["ps", "-o", "user=", "-p", service["MainPID"]]).stdout.strip()
    assert user == "hotswapd"
    mode = machine.exec(["stat", "-c", "%a %U %G", SOCK]).stdout.strip()
    assert mode == "660 hotswapd hotswapd"


def test_completion_over_the_units_socket(machine: Machine) -> None:
    answer = machine.curl_json("/v1/completions", COMPLETION)
    log(f"POST /v1/completions over {SOCK}: {answer}")
    assert answer["adapter"]["version"] == "alpha" and answer["choices"][0]["text"].startswith(" alpha")


def test_adapter_dropped_in_by_a_producer_goes_live(machine: Machine) -> None:
    machine.sh("useradd --no-create-home producer && usermod -aG hotswapd producer")
    src = f"{DEMO}/examples/bravo"
    # The README's producer commands, verbatim, as a member of group hotswapd whose umask keeps its
    # files private (the chmod is what lets the daemon read them then).
    producer = f"""umask 077
cp -r {src} {WATCHED}/.incoming-{VERSION}
chmod -R g+rX {WATCHED}/.incoming-{VERSION}
mv {WATCHED}/.incoming-{VERSION} {WATCHED}/{VERSION}
"""
    log("as producer:\n" + producer)
    machine.exec(["runuser", "-u", "producer", "--", "/bin/sh", "-euxc", producer])
    t0 = time.monotonic()
    adapters = wait_until(
        lambda: (a := machine.curl_json("/v1/adapters"))["live"]["version"] == VERSION and a,
        60,
        f"GET /v1/adapters to show live.version == {VERSION}",
        interval=0.2,
    )
    log(f"{VERSION} live {time.monotonic() - t0:.1f}s after the mv: {adapters['live']}")
    answer = machine.curl_json("/v1/completions", COMPLETION)
    assert answer["adapter"]["version"] == VERSION and answer["choices"][0]["text"].startswith(" bravo")
    # Group members may call the model too (the socket is 0660 hotswapd:hotswapd).
    curl = [*shlex.split("curl -s -o /dev/null -w %{http_code} --unix-socket"), SOCK, "http://localhost/v1/adapters"]
    code = machine.exec(["runuser", "-u", "producer", "--", *curl]).stdout
    assert code == "200"
    machine.results["dropped"] = VERSION


def test_reload_applies_a_config_change(machine: Machine) -> None:
    config = machine.root / "etc/hotswapd/hotswapd.yaml"
    raw = yaml.safe_load(config.read_text())
    raw["source"]["directory"]["settle_seconds"] = 0.75
    raw["server"]["request_timeout_s"] = 123
    config.write_text(yaml.safe_dump(raw))  # the same file (owner, mode), new content: an operator's edit
    before = machine.show("hotswapd.service", "MainPID")["MainPID"]
    mark = len(machine.journal("-u", "hotswapd.service"))
    machine.exec(["systemctl", "reload", "hotswapd"], timeout=120)
    lines = wait_until(
        lambda: [line for line in machine.journal("-u", "hotswapd.service")[mark:] if '"reloaded: ' in line],
        60,
        "the daemon's 'reloaded:' log line",
    )
    log("journal after systemctl reload:\n" + "\n".join(lines))
    message = json.loads(lines[0])["message"]
    assert "source" in message and "server" in message, message
    settle = machine.curl_json("/v1/adapters")["source"]["settle_seconds"]
    assert settle == 0.75
    state = machine.wait_active("hotswapd.service", 60)
    assert machine.show("hotswapd.service", "MainPID")["MainPID"] == before  # reloaded, not restarted
    log(f"after reload: {state}; GET /v1/adapters source.settle_seconds={settle}")


def _client(machine: Machine, retry: bool) -> subprocess.Popen[str]:
    argv = ["curl", "-sS", "--max-time", "300", "-w", "\n%{http_code}"]
    if retry:  # as Retry-After asks: 503 is transient for curl --retry, which honours the header
        argv += ["--retry", "60", "--retry-max-time", "300"]
    argv += ["--unix-socket", SOCK, "http://localhost/v1/completions", "-d", COMPLETION]
    return machine.popen(argv)


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON objects written one after another (no separator) in ``text``."""
    decoder, found, i = json.JSONDecoder(), [], 0
    while i < len(text):
        obj, i = decoder.raw_decode(text, i)
        found.append(obj)
    return found


def test_restart_loses_no_client_that_retries(machine: Machine) -> None:
    show = ("MainPID", "ActiveState")
    old = machine.show("hotswapd.service", *show)["MainPID"]
    inode = machine.exec(["stat", "-c", "%i", SOCK]).stdout.strip()
    clients: list[tuple[str, bool, subprocess.Popen[str]]] = []

    def launch(when: str) -> None:
        for retry in (True, True, False, False):
            clients.append((when, retry, _client(machine, retry)))

    launch("before the restart")
    machine.exec(["systemctl", "restart", "--no-block", "hotswapd"])
    launch("right after systemctl restart")
    wait_until(lambda: machine.show("hotswapd.service", *show)["MainPID"] not in (old, "0"), 120, "a new main PID")
    launch("once the new process runs")
    t0 = time.monotonic()
    state = machine.wait_active("hotswapd.service", COLD_START_S)
    log(f"restarted: active again {time.monotonic() - t0:.1f}s after the new process appeared: {state}")
    launch("once it is active again")
    results = []
    for when, retry, proc in clients:
        out, err = proc.communicate(timeout=360)
        text, _, status = out.rpartition("\n")
        results.append((when, retry, int(status or 0), text, err))
        attempts = text.count('{"id": "cmpl-') + text.count('{"error": ')
        log(f"client {when}, {'retrying' if retry else 'plain'}: {status} after {attempts} attempt(s): {text[-200:]}")
    machine.results["restart"] = results
    assert machine.exec(["stat", "-c", "%i", SOCK]).stdout.strip() == inode  # the same socket throughout
    for when, retry, code, text, err in results:
        if retry:
            answers = _json_objects(text)  # curl --retry writes every attempt's body: the 503s, then the answer
            assert code == 200 and answers and answers[-1]["adapter"]["version"], (when, code, text, err)
            assert all(a["error"]["code"] in ("starting", "draining") for a in answers[:-1]), answers


def test_restart_clients_queue_without_retrying(machine: Machine) -> None:
    results = machine.results.get("restart")
    assert results, "needs test_restart_loses_no_client_that_retries first"
    plain = [(when, code, text[:120]) for when, retry, code, text, _ in results if not retry]
    assert all(code == 200 for _, code, _ in plain), plain


def test_journal_has_json_swap_lines_and_no_seccomp_denials(machine: Machine) -> None:
    entries = machine.journal_entries("_SYSTEMD_UNIT=hotswapd.service")
    daemon = [e for e in entries if e.get("SYSLOG_IDENTIFIER") == "hotswapd"]
    assert daemon, "no hotswapd lines in the journal"
    records = []
    for e in daemon:
        message = e["MESSAGE"] if isinstance(e["MESSAGE"], str) else bytes(e["MESSAGE"]).decode(errors="replace")
        if message.startswith("config error:"):
            continue  # what the CLI prints for a broken config (a later test), not a log record
        records.append(json.loads(message))  # --log-format json: every line one JSON object
    swaps = [r for r in records if r["logger"] == "hotswapd.swap"]
    log("swap lines in the journal:\n" + "\n".join(json.dumps(r) for r in swaps))
    succeeded = {r["message"].split("version=")[1].split()[0] for r in swaps if "result=success" in r["message"]}
    assert "alpha" in succeeded
    if "dropped" in machine.results:
        assert machine.results["dropped"] in succeeded
    words = ("EPERM", "operation not permitted", "seccomp", "permissionerror", "permission denied")
    ours = machine.journal("-u", "hotswapd.service", "-u", "hotswapd.socket", "-u", "hotswapd@demo.service")
    denied = [line for line in ours if any(w in line.lower() for w in map(str.lower, words))]
    everywhere = [line for line in machine.journal() if "seccomp" in line.lower() or "type=1326" in line]
    log(f"checked {len(ours)} hotswapd journal lines and {len(machine.journal())} in all for {words}")
    assert not denied, denied
    assert not everywhere, everywhere


def test_template_instance_serves_on_its_socket(machine: Machine) -> None:
    # A new instance starts from the main instance's compile cache (an operator's shortcut; the
    # same model and torch, so its entries hit) instead of a cold compile.
    log(
        machine.sh(f"""
        install -D -m 0640 -g hotswapd {CONFIGS}/demo.yaml /etc/hotswapd/demo.yaml
        hotswapd check-config /etc/hotswapd/demo.yaml
        install -d -o hotswapd -g hotswapd /var/cache/hotswapd/demo
        cp -a /var/cache/hotswapd/inductor /var/cache/hotswapd/demo/inductor
        systemctl enable --now --no-block hotswapd@demo.socket hotswapd@demo.service
        """)
    )
    t0 = time.monotonic()
    state = machine.wait_active("hotswapd@demo.service", COLD_START_S)
    log(f"hotswapd@demo.service active {time.monotonic() - t0:.1f}s after enable --now: {state}")
    exec_start = machine.exec(["systemctl", "show", "-p", "ExecStart", "hotswapd@demo.service"]).stdout.strip()
    log(f"systemctl show -p ExecStart hotswapd@demo.service: {exec_start}")
    assert "argv[]=/usr/local/bin/hotswapd run --config /etc/hotswapd/demo.yaml --log-format json ;" in exec_start
    assert machine.show("hotswapd@demo.socket", "ActiveState")["ActiveState"] == "active"
    answer = machine.curl_json("/v1/completions", COMPLETION, sock="/run/hotswapd/demo.sock")
    log(f"POST /v1/completions over /run/hotswapd/demo.sock: {answer}")
    assert answer["adapter"]["version"] == "alpha" and answer["choices"][0]["text"].startswith(" alpha")
    assert machine.show("hotswapd@demo.service", "StatusText")["StatusText"].startswith("serving alpha")
    machine.exec(["systemctl", "disable", "--now", "hotswapd@demo.socket", "hotswapd@demo.service"], timeout=120)


def test_broken_config_ends_in_failed(machine: Machine) -> None:
    props = ("ActiveState", "SubState", "Result", "NRestarts", "ExecMainStatus")
    # A config that loads but whose model does not exist: exit 3 at every start, retried RestartSec=5
    # apart until the start limit (5 starts in 5 minutes) makes it `failed`.
    machine.sh(f"""
        install -D -m 0640 -g hotswapd {CONFIGS}/broken.yaml /etc/hotswapd/broken.yaml
        systemctl start --no-block hotswapd@broken.socket hotswapd@broken.service
        """)
    t0 = time.monotonic()
    # A config error (exit 2): not retried at all (RestartPreventExitStatus=2).
    (machine.root / "etc/hotswapd/hotswapd.yaml").write_text("model: {path: [unterminated\n")
    restart = machine.exec(["systemctl", "restart", "hotswapd"], check=False, timeout=120)
    main = machine.show("hotswapd.service", *props)
    log(f"hotswapd.service with a config error, after systemctl restart (rc {restart.returncode}): {main}")
    assert restart.returncode != 0
    assert (main["ActiveState"], main["Result"], main["ExecMainStatus"], main["NRestarts"]) == (
        "failed", "exit-code", "2", "0"
    )  # fmt: skip
    assert any(line.startswith("config error:") for line in machine.journal("-u", "hotswapd.service"))

    def failed() -> dict[str, str]:
        s = machine.show("hotswapd@broken.service", *props)
        return s if s["ActiveState"] == "failed" else {}

    state = wait_until(failed, 300, "hotswapd@broken.service to end in failed", interval=0.5)
    lines = [line for line in machine.journal("-u", "hotswapd@broken.service") if "hotswapd@broken" in line]
    log(f"hotswapd@broken.service failed {time.monotonic() - t0:.1f}s after its start: {state}")
    log("\n".join(lines[-8:]))
    assert state["ExecMainStatus"] == "3" and int(state["NRestarts"]) >= 4  # the first start and 4 retries
    assert any("Start request repeated too quickly" in line for line in lines)
    assert machine.show("hotswapd@broken.socket", "Result")["Result"] == "service-start-limit-hit"
    # And it stays failed: no restart is scheduled any more.
    assert "hotswapd@broken" not in machine.exec(["systemctl", "list-jobs", "--no-legend"]).stdout
    assert machine.show("hotswapd@broken.service", "ActiveState")["ActiveState"] == "failed"
