"""The watched folder's observer: watchdog events turned into hints for the directory source.

An event only asks the source to look soon (it reads the folder itself); what it reports is one of
``EVENT_KINDS``, counted by the daemon. Events inside a top-level dot-entry (a producer's ``.incoming``
copy) are not hints, unless a ``current`` symlink may point into one (Kubernetes ``..data``). The observer
is armed on the folder's identity (device, inode, path, polling): a folder deleted and made again, or a
reload that changes how it is watched, re-arms it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserver

from hotswap_core.config import DirectorySourceConfig

log = logging.getLogger("hotswapd.source.directory")

CURRENT_NAME = "current"
# watchdog event type -> kind counted; "closed" (a write finished) is only a hint. Our own reads
# (opened, closed_no_write) must be neither, or every look would trigger the next one.
_EVENTS = {"created": "created", "modified": "modified", "attrib": "modified", "deleted": "deleted",
           "moved": "moved", "closed": None}  # fmt: skip
EVENT_KINDS = ("created", "modified", "deleted", "moved", "rescan", "missing")  # what on_event reports

Hint = Callable[[str | None], None]  # called with the kind (or None: a hint not counted), from watchdog's thread


def folder_key(config: DirectorySourceConfig) -> tuple[object, ...]:
    """What the observer watches: the folder's identity, and how. () while it is missing."""
    try:
        st = os.stat(config.path)
    except OSError:
        return ()
    return st.st_dev, st.st_ino, config.path, config.polling, config.rescan_seconds if config.polling else None


class Watch:
    """One observer on the watched folder (or none: missing, or it could not start)."""

    def __init__(self, hint: Hint) -> None:
        self._hint = hint
        self._observer: BaseObserver | None = None
        self.armed: tuple[object, ...] | None = None  # the folder_key watched; None: nothing is

    @property
    def observer(self) -> BaseObserver | None:
        return self._observer

    def dead(self) -> bool:
        """watchdog's emitter stops when its folder is deleted: then what is there now is all new."""
        emitters = self._observer.emitters if self._observer is not None else set()
        return not all(e.is_alive() for e in emitters)

    def arm(self, root: Path, key: tuple[object, ...], config: DirectorySourceConfig) -> None:
        self.disarm()
        if not key:
            return
        # With polling the periodic look does the work; the observer adds hints at the same pace.
        observer = PollingObserver(timeout=config.rescan_seconds) if config.polling else Observer()
        try:
            observer.schedule(_Hints(self._hint, root), str(root), recursive=True)
            observer.start()
        except OSError as exc:
            log.warning("cannot watch %s (%s); relying on rescans until it can", root, exc)
            return
        self._observer, self.armed = observer, key

    def disarm(self) -> None:
        observer, self._observer, self.armed = self._observer, None, None
        if observer is not None:
            observer.stop()
            if observer.is_alive():
                observer.join()


class _Hints(FileSystemEventHandler):
    def __init__(self, hint: Hint, root: Path) -> None:
        self._hint, self._root = hint, os.fsdecode(root) + os.sep

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _EVENTS:
            return
        paths = [os.fsdecode(p) for p in (event.src_path, getattr(event, "dest_path", "")) if p]
        if all(self._in_dot_entry(p) for p in paths) and not os.path.islink(self._root + CURRENT_NAME):
            return  # a producer writing its .incoming copy: only the rename in is news
        self._hint(_EVENTS[event.event_type])

    def _in_dot_entry(self, path: str) -> bool:
        """True for a path inside (or being) a top-level entry whose name starts with a dot."""
        return path.startswith(self._root) and path[len(self._root) :].startswith(".")
