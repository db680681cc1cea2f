"""bind_unix_socket: modes, stale-socket replacement and refusing to clobber a live socket or a file."""

from __future__ import annotations

import os
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotswapd.unix_socket import SocketInUse, bind_unix_socket


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    # Short on purpose: AF_UNIX paths must stay under 108 bytes, pytest's tmp_path may not.
    with tempfile.TemporaryDirectory(prefix="hs-", dir="/tmp") as d:
        yield Path(d)


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(8)
    return s


def _round_trip(server: socket.socket, path: Path, payload: bytes = b"ping") -> None:
    """Connect a real client to ``path`` and check ``server`` accepts it and receives ``payload``.

    Earlier connections (e.g. bind_unix_socket's probe) may sit in the backlog ahead of ours; they
    read as EOF and are skipped.
    """
    server.settimeout(5.0)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5.0)
        client.connect(str(path))
        client.sendall(payload)
        for _ in range(4):
            conn, _addr = server.accept()
            with conn:
                conn.settimeout(5.0)
                if conn.recv(len(payload)) == payload:
                    conn.sendall(b"pong")
                    assert client.recv(4) == b"pong"
                    return
    pytest.fail("the server never accepted the client's connection")


@pytest.mark.parametrize("mode", [0o660, 0o600])
def test_binds_fresh_path_with_mode_and_accepts(sock_dir: Path, mode: int) -> None:
    path = sock_dir / "d.sock"
    umask_before = os.umask(0o022)
    os.umask(umask_before)
    sock = bind_unix_socket(str(path), mode)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == mode
        assert sock.getblocking() is False  # handed to the event loop as-is
        assert sock.family == socket.AF_UNIX
        _round_trip(sock, path)
    finally:
        sock.close()
    umask_after = os.umask(umask_before)
    assert umask_after == umask_before  # the temporary umask was restored


def test_stale_socket_file_is_replaced(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"
    dead = _listen(path)
    dead.close()  # the file stays behind; nothing answers on it
    assert stat.S_ISSOCK(os.lstat(path).st_mode)

    # bind() onto an existing path fails with EADDRINUSE, so binding at all proves it was replaced
    # (the inode number cannot tell: the filesystem may hand the freed one straight back).
    sock = bind_unix_socket(str(path), 0o600)
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        _round_trip(sock, path)
    finally:
        sock.close()


def test_live_socket_raises_and_is_left_alone(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"
    other = _listen(path)
    try:
        ino = os.stat(path).st_ino
        with pytest.raises(SocketInUse, match=f"another process is serving on {path}") as info:
            bind_unix_socket(str(path), 0o660)
        assert isinstance(info.value, OSError)
        assert os.stat(path).st_ino == ino  # not unlinked or replaced
        _round_trip(other, path)  # the other server still accepts
    finally:
        other.close()


def test_regular_file_raises_and_is_kept(sock_dir: Path) -> None:
    path = sock_dir / "d.sock"
    path.write_text("not a socket")
    with pytest.raises(SocketInUse, match="is not a socket"):
        bind_unix_socket(str(path), 0o660)
    assert path.is_file()
    assert path.read_text() == "not a socket"


def test_symlink_to_live_socket_is_refused_and_kept(sock_dir: Path) -> None:
    target = sock_dir / "real.sock"
    other = _listen(target)
    try:
        link = sock_dir / "d.sock"
        link.symlink_to(target)
        with pytest.raises(SocketInUse, match="is not a socket"):
            bind_unix_socket(str(link), 0o660)
        assert link.is_symlink()
        _round_trip(other, target)
    finally:
        other.close()


def test_missing_parent_directory_is_created(sock_dir: Path) -> None:
    path = sock_dir / "run" / "hs" / "d.sock"
    sock = bind_unix_socket(str(path), 0o660)
    try:
        assert path.parent.is_dir()
        assert stat.S_ISSOCK(os.stat(path).st_mode)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        _round_trip(sock, path)
    finally:
        sock.close()
