"""systemd integration without libsystemd: sd_notify(3) and sd_listen_fds(3), both tiny protocols.

Notify: one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace). Socket activation: inherited listening sockets start at fd 3; ``$LISTEN_PID``
must be ours, ``$LISTEN_FDS`` counts them, ``$LISTEN_FDNAMES`` names them (``FileDescriptorName=``).
Without these variables everything here is silent and does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import MutableMapping

log = logging.getLogger("hotswapd.systemd")

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; a no-op when ``$NOTIFY_SOCKET`` is unset."""

    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address: str | bytes | None = None
        if address.startswith("@"):
            self._address = b"\0" + address[1:].encode()  # abstract namespace, unix(7)
        elif address.startswith("/"):
            self._address = address
        self._sock: socket.socket | None = None
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval = _watchdog_interval(env)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> None:
        if self._sock is None or self._address is None:
            return
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as exc:  # systemd gone or socket full: never a reason to stop serving
            log.debug("sd_notify failed: %s", exc)

    def ready(self, status: str) -> None:
        self.notify("READY=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def reloading(self) -> None:
        # systemd.service(5), Type=notify-reload: RELOADING=1 with the CLOCK_MONOTONIC time of the request.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.notify("STOPPING=1", "STATUS=draining in-flight requests")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_interval(env: MutableMapping[str, str]) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when not asked for us."""
    usec = env.get("WATCHDOG_USEC")
    pid = env.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(usec) / 2 / 1e6
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r", usec)
        return None


def listen_socket(name: str = "api", environ: MutableMapping[str, str] | None = None) -> socket.socket | None:
    """The listening Unix stream socket systemd passed us (the one named ``name``, or the only one), or None.

    The variables are removed from the environment once read (sd_listen_fds(3) with unset_environment),
    so that processes we start do not think the sockets are theirs.
    """
    env = os.environ if environ is None else environ
    pid, count, names = env.get("LISTEN_PID"), env.get("LISTEN_FDS"), env.get("LISTEN_FDNAMES")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    if not pid or not count or pid != str(os.getpid()):
        return None
    n = int(count)
    labels = names.split(":") if names else []
    if n < 1:
        return None
    if name in labels:
        fd = SD_LISTEN_FDS_START + labels.index(name)
    elif n == 1:
        fd = SD_LISTEN_FDS_START
    else:
        raise OSError(f"systemd passed {n} sockets ({names or 'unnamed'}) and none is named {name!r}")
    for other in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(other, False)
    sock = socket.socket(fileno=fd)  # family and type are read from the fd
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise OSError(f"the socket systemd passed (fd {fd}) is not a Unix stream socket")
    sock.setblocking(False)
    log.info("serving on the socket passed by systemd: %s (fd %d)", sock.getsockname() or "unnamed", fd)
    return sock
