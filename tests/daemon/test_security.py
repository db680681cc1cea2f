"""The security model, checked against real ``hotswapd run`` processes and real files.

Who may call the model is the socket's mode and group; who may swap and roll back is ``server.admin_uids``
(``SO_PEERCRED``); admin swaps read only under ``server.swap_roots``; symlinks escaping the watched folder are
refused; nothing is ever unpickled; a safetensors header is capped before it is read; metrics bind to loopback.

Tests that switch uid (``setpriv``) need root; they are skipped, saying so, when the suite runs as another user.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotswap_core.config import MetricsConfig, ServerConfig, ValidationConfig
from hotswapd.client import Client, ClientError
from hotswapd.demo import DemoAssets

from ..conftest import run_cli
from .harness import DaemonProcess, drop_adapter, running_daemon, wait_until, write_config

IS_ROOT = os.geteuid() == 0
NEEDS_ROOT = "needs root: the test runs a client (or the daemon) under other uids/gids with setpriv"
NOBODY = 65534  # uid and gid of nobody/nogroup
OUTSIDER = 65533  # a uid and gid that is in no group of the socket
SETTLE = 0.3  # harness default; rescan_seconds is 2


def test_secure_defaults() -> None:
    assert MetricsConfig().listen.startswith("127.0.0.1:")  # metrics on loopback unless configured otherwise
    server = ServerConfig()
    assert server.socket_mode == 0o660 and server.admin_uids is None  # owner + group; admins: own uid and root
    assert ValidationConfig().allow_pickle is False


# ---- the socket: mode, group, who can connect ------------------------------------------------------
_CLIENT = r"""
import http.client, json, os, socket, sys

path, method, target, body = sys.argv[1:5]


class Unix(http.client.HTTPConnection):
    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(path)


out = {"uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups()}
try:
    conn = Unix("localhost", timeout=60)
    conn.request(method, target, body=body.encode() or None, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    out.update(status=response.status, body=json.loads(response.read() or b"null"))
except PermissionError:
    out.update(status=None, body="EACCES")
print(json.dumps(out))
"""


def _as(uid: int, gid: int, sock: Path, method: str, target: str, body: Any = None) -> dict[str, Any]:
    """One request from a process running as ``uid``:``gid`` with no supplementary groups (stdlib only)."""
    argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", sys.executable, "-I", "-c", _CLIENT]
    payload = "" if body is None else json.dumps(body)
    out = subprocess.run([*argv, str(sock), method, target, payload], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    answer: dict[str, Any] = json.loads(out.stdout)
    assert (answer["uid"], answer["gid"], answer["groups"]) == (uid, gid, []), answer
    return answer


def _gid_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Gid:"):
            return int(line.split()[2])  # real, effective, saved, fs: the effective gid owns new files
    raise AssertionError(f"no Gid line for pid {pid}")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, 0o640], ids=["default-0660", "0640"])
def test_socket_mode_group_and_who_may_connect(
    demo_assets: DemoAssets, cli_env: dict[str, str], short_tmp: Path, mode: int | None
) -> None:
    """Only the start-up is needed: the socket is bound (and /healthz answers) before the model loads."""
    short_tmp.chmod(0o755)  # traversable, so only the socket's own mode decides
    sock = short_tmp / "s.sock"
    config = write_config(demo_assets, short_tmp, sock, **({} if mode is None else {"server.socket_mode": mode}))
    # As root, run the daemon with another primary group, so "the socket's group is the daemon's" means something.
    prefix = ["setpriv", f"--regid={NOBODY}", "--clear-groups"] if IS_ROOT else []
    with open(short_tmp / "d.log", "wb") as log:
        proc = subprocess.Popen(
            [*prefix, sys.executable, "-m", "hotswapd.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=cli_env,
        )
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (short_tmp / "d.log").read_text()
            try:
                return Client(str(sock), timeout=5).get("/healthz")["status"] == "ok"
            except ClientError:
                return False

        wait_until(healthy, 120, "the socket to answer /healthz", interval=0.1)
        st = os.stat(sock)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == (0o660 if mode is None else mode)
        assert st.st_uid == os.geteuid() and st.st_gid == _gid_of(proc.pid)
        if IS_ROOT:
            assert st.st_gid == NOBODY
            # A member of the socket's group may connect only when the mode gives the group write access;
            # anyone else never (connect(2) on a Unix socket needs write permission).
            member = _as(NOBODY, NOBODY, sock, "GET", "/healthz")
            assert member["status"] == (200 if mode is None else None), member
            outsider = _as(OUTSIDER, OUTSIDER, sock, "GET", "/healthz")
            assert (outsider["status"], outsider["body"]) == (None, "EACCES"), outsider
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(60)
    assert rc == 0, (short_tmp / "d.log").read_text()


# ---- one serving daemon for the rest ----------------------------------------------------------------
@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-sec-", dir="/tmp") as d:  # short: AF_UNIX paths < 108 bytes
        root = Path(d)
        root.chmod(0o755)  # so a client under another uid can reach the socket
        for sub in ("adapters", "roots", "outside"):
            (root / sub).mkdir()
        yield root


@pytest.fixture(scope="module")
def daemon(demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]) -> Iterator[DaemonProcess]:
    config = write_config(
        demo_assets,
        workdir,
        workdir / "s.sock",
        **{"server.socket_mode": 0o666, "server.swap_roots": [str(workdir / "roots")]},
    )
    with running_daemon(config, workdir, cli_env) as d:
        yield d


def _live(d: DaemonProcess) -> tuple[str, str]:
    live = d.client.get("/v1/adapters")["live"]
    return live["version"], live["sha256"]


def _post(d: DaemonProcess, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    try:
        return 200, d.client.post(path, body)
    except ClientError as exc:
        assert exc.status is not None, exc
        return exc.status, exc.body


def _rejected(d: DaemonProcess, path: Path) -> dict[str, Any] | None:
    found = [r for r in d.client.get("/v1/adapters")["rejected"] if r["path"] == str(path)]
    return found[0] if found else None


@pytest.mark.slow
def test_admin_verbs_refused_to_a_peer_uid_that_is_not_admin(daemon: DaemonProcess, demo_assets: DemoAssets) -> None:
    if not IS_ROOT:
        pytest.skip(NEEDS_ROOT)
    candidate = daemon.sock.parent / "roots" / "bravo-admin"
    shutil.copytree(demo_assets.bravo, candidate)  # valid and under swap_roots: only the uid can refuse it
    before = _live(daemon)
    for target, body in (("/v1/adapters/swap", {"path": str(candidate)}), ("/v1/adapters/rollback", {})):
        answer = _as(NOBODY, NOBODY, daemon.sock, "POST", target, body)
        assert answer["status"] == 403 and answer["body"]["error"]["code"] == "forbidden", answer
        assert f"uid {NOBODY}" in answer["body"]["error"]["message"]
    assert _live(daemon) == before
    # The same peer may use the model: the socket's mode lets it in, only admin verbs need an admin uid.
    done = _as(NOBODY, NOBODY, daemon.sock, "POST", "/v1/completions", {"prompt": "Hello =>", "max_tokens": 4})
    assert done["status"] == 200 and done["body"]["adapter"]["version"] == before[0], done
    info = _as(NOBODY, NOBODY, daemon.sock, "GET", "/v1/adapters")
    assert info["status"] == 200 and not any(r["path"] == str(candidate) for r in info["body"]["history"])


@pytest.mark.slow
def test_admin_swap_only_under_swap_roots(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    outside = workdir / "outside" / "bravo-out"
    shutil.copytree(demo_assets.bravo, outside)
    inside = workdir / "roots" / "bravo-in"
    shutil.copytree(demo_assets.bravo, inside)
    escape = workdir / "roots" / "escape"
    escape.symlink_to(outside)  # inside the root by name, outside by realpath
    before = _live(daemon)
    for path in (outside, escape, workdir / "roots" / ".." / "outside" / "bravo-out", Path("/etc")):
        status, body = _post(daemon, "/v1/adapters/swap", {"path": str(path)})
        assert (status, body["error"]["code"], body["error"]["param"]) == (403, "path_not_allowed", "path"), body
        assert _live(daemon) == before
    status, body = _post(daemon, "/v1/adapters/swap", {"path": str(inside)})
    assert status == 200 and body["live"]["version"] == "bravo-in", body
    assert daemon.complete()["choices"][0]["text"].startswith(" bravo")
    status, body = _post(daemon, "/v1/adapters/rollback", {})
    assert status == 200 and (body["live"]["version"], body["live"]["sha256"]) == before, body


@pytest.mark.slow
def test_symlink_escaping_the_watched_folder_never_goes_live(
    daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path
) -> None:
    target = workdir / "outside" / "bravo-linked"
    shutil.copytree(demo_assets.bravo, target)  # a perfectly valid adapter, but not in the watched folder
    before = _live(daemon)
    link = workdir / "adapters" / "sneaky"
    link.symlink_to(target)
    entry = wait_until(lambda: _rejected(daemon, link), SETTLE + 6, "the escaping symlink to be recorded")
    assert entry["reason"] == "outside_watched_folder" and str(target) in entry["message"], entry
    time.sleep(2 * SETTLE)
    assert _live(daemon) == before
    history = daemon.client.get("/v1/adapters")["history"]
    assert not [r for r in history if r["version"] in ("sneaky", "bravo-linked")], history


# ---- pickles: never unpickled ------------------------------------------------------------------------
class _TouchOnUnpickle:
    """Unpickling this creates ``marker``: a stand-in for any code an attacker would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return pathlib.Path.touch, (self.marker,)


def _evil_adapter(folder: Path, valid: Path, marker: Path, *, with_safetensors: bool) -> Path:
    """``valid``'s adapter_config.json (and its safetensors, if asked) with a malicious adapter_model.bin."""
    folder.mkdir()
    shutil.copy(valid / "adapter_config.json", folder)
    if with_safetensors:
        shutil.copy(valid / "adapter_model.safetensors", folder)
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_TouchOnUnpickle(marker)))
    return folder


@pytest.mark.slow
def test_malicious_pickle_is_never_unpickled(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    marker = workdir / "PWNED"
    staging = workdir / "evil-src"
    staging.mkdir()
    evil = _evil_adapter(staging / "evil", demo_assets.alpha, marker, with_safetensors=False)
    mixed = _evil_adapter(staging / "mixed", demo_assets.bravo, marker, with_safetensors=True)  # live is alpha
    before = _live(daemon)

    # Dropped into the watched folder: refused by name, never opened.
    dropped = drop_adapter(evil, workdir / "adapters", "evil-pickle")
    entry = wait_until(lambda: _rejected(daemon, dropped), SETTLE + 6, "the pickle to be rejected")
    assert entry["reason"] == "pickle_refused", entry
    # Through the admin verb, from under swap_roots: the same.
    inside = workdir / "roots" / "evil-pickle"
    shutil.copytree(evil, inside)
    status, body = _post(daemon, "/v1/adapters/swap", {"path": str(inside)})
    assert (status, body["error"]["code"]) == (422, "pickle_refused"), body
    assert _live(daemon) == before and not marker.exists()

    # Safetensors next to a malicious .bin: the safetensors is served, the .bin is never opened.
    shutil.copytree(mixed, workdir / "roots" / "mixed-admin")
    status, body = _post(daemon, "/v1/adapters/swap", {"path": str(workdir / "roots" / "mixed-admin")})
    assert status == 200 and body["live"]["version"] == "mixed-admin", body
    assert daemon.complete()["choices"][0]["text"].startswith(" bravo")  # bravo's safetensors
    status, body = _post(daemon, "/v1/adapters/rollback", {})
    assert status == 200 and (body["live"]["version"], body["live"]["sha256"]) == before, body
    drop_adapter(mixed, workdir / "adapters", "mixed")
    wait_until(lambda: _live(daemon)[0] == "mixed", SETTLE + 4, "the safetensors of the mixed folder to go live")
    assert daemon.complete()["choices"][0]["text"].startswith(" bravo")
    assert not marker.exists()

    # And the payload is real: unpickling the very same file runs it.
    for path in (inside / "adapter_model.bin", workdir / "adapters" / "mixed" / "adapter_model.bin"):
        out = subprocess.run(
            [sys.executable, "-c", "import pickle, sys; pickle.load(open(sys.argv[1], 'rb'))", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        assert marker.exists(), "the payload did not run: the test above proves nothing"
        marker.unlink()


@pytest.mark.slow
def test_allow_pickle_still_runs_no_code(demo_assets: DemoAssets, short_tmp: Path, cli_env: dict[str, str]) -> None:
    """With ``validation.allow_pickle: true`` only torch's weights-only unpickler reads adapter_model.bin."""
    marker = short_tmp / "PWNED"
    evil = _evil_adapter(short_tmp / "evil", demo_assets.alpha, marker, with_safetensors=False)
    config = write_config(demo_assets, short_tmp, short_tmp / "s.sock", **{"validation.allow_pickle": True})
    out = subprocess.run(
        run_cli("validate", str(evil), "--config", str(config), "--json"),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert json.loads(out.stdout)["reason"] == "pickle_refused", out.stdout
    assert not marker.exists()


# ---- safetensors header: capped before it is read ---------------------------------------------------
def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


@pytest.mark.slow
def test_huge_safetensors_header_is_refused_before_reading(
    daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path
) -> None:
    def huge(folder: Path) -> Path:
        folder.mkdir()
        shutil.copy(demo_assets.alpha / "adapter_config.json", folder)
        # u64 little-endian header length of 1 TiB, then a few bytes: a reader that trusts it allocates 1 TiB.
        (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b'{"a": 1}')
        return folder

    before_live, rss_before = _live(daemon), _rss_kib(daemon.proc.pid)
    t0 = time.monotonic()
    status, body = _post(daemon, "/v1/adapters/swap", {"path": str(huge(workdir / "roots" / "huge"))})
    elapsed = time.monotonic() - t0
    assert (status, body["error"]["code"]) == (422, "too_large"), body
    assert "max_header_bytes" in body["error"]["message"]
    assert elapsed < 5, elapsed
    dropped = huge(workdir / "adapters" / "huge")
    entry = wait_until(lambda: _rejected(daemon, dropped), SETTLE + 6, "the huge header to be rejected")
    assert entry["reason"] == "too_large", entry
    rss_after = _rss_kib(daemon.proc.pid)
    assert rss_after - rss_before < 64 * 1024, (rss_before, rss_after)  # KiB: no 1 TiB (or even 64 MiB) buffer
    assert _live(daemon) == before_live
    assert daemon.complete()["choices"][0]["text"]
