"""A small real filesystem for out-of-space tests: a tmpfs of a few MiB, mounted for one test (needs root)."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def small_fs(size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` (``mount -t tmpfs -o size=``) on a fresh folder, unmounted after; skips the test where
    mounting is not allowed."""
    with tempfile.TemporaryDirectory(prefix="hs-fs-", dir="/tmp") as d:
        mnt = Path(d)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", d],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        try:
            yield mnt
        finally:
            # Lazily: a daemon killed by a failed test may still hold a file open on it.
            subprocess.run(["umount", "-l", d], check=True)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(where: Path, leave: int = 0) -> Path:
    """Write ``where/filler`` until at most ``leave`` bytes are free on its filesystem (0: until ENOSPC)."""
    filler = where / "filler"
    chunk = b"\0" * 65536
    with open(filler, "ab", buffering=0) as f:
        try:
            while (free := free_bytes(where)) > leave:
                f.write(chunk[: max(1, min(len(chunk), free - leave))])
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler
