"""The Unix socket hotswapd binds when systemd does not pass one in, and who is on the other end.

Binding never clobbers: a stale socket file (nothing answers on it) is replaced, a live one or a
path that is not a socket is an error. The peer's uid comes from the kernel (SO_PEERCRED, unix(7)).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from pathlib import Path

from aiohttp import web

log = logging.getLogger("hotswapd.server")


class SocketInUse(OSError):
    """Another process answers on the configured socket path."""


def bind_unix_socket(path: str, mode: int) -> socket.socket:
    """Bind and listen on ``path`` with ``mode``. A stale socket file (nothing answers) is replaced;
    a live one, or a path that is not a socket, is an error."""
    p = Path(path)
    try:
        st = p.lstat()
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketInUse(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("replacing stale socket %s (nothing answers on it)", path)
            p.unlink(missing_ok=True)
        except OSError as exc:
            raise SocketInUse(errno.EADDRINUSE, f"cannot tell whether {path} is in use: {exc}") from exc
        else:
            raise SocketInUse(errno.EADDRINUSE, f"another process is serving on {path}; is hotswapd already running?")
        finally:
            probe.close()
    p.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # umask first, so the socket is never briefly reachable with looser permissions than asked.
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def peer_uid(request: web.Request) -> int | None:
    """The connecting process's uid (SO_PEERCRED, unix(7)), or None if the transport has none."""
    sock = request.transport.get_extra_info("socket") if request.transport else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)
