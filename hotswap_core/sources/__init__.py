"""Adapter sources: where new versions come from (a watched folder, a Hub revision)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any


def call_back(log: logging.Logger, fn: Callable[[Any], object], arg: object) -> Any:
    """Call back into the daemon from a source's thread; what it raises is logged, never kills the thread."""
    try:
        return fn(arg)
    except Exception:
        log.exception("%s(%r) raised; the source carries on", getattr(fn, "__name__", fn), arg)
        return None
