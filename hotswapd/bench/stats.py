"""Statistics for the bench: percentiles, summaries, ratios, and the A B A B interleaving of contenders.

Absolute times on a shared machine drift with whatever else runs; contenders measured in turns
(A B A B ...) see the same drift, so their ratios stay meaningful.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

Sample = float | list[float]  # one contender turn: one value, or many (the requests of a load window)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between ranks (numpy's default)."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(values: list[float]) -> dict[str, Any]:
    """median, p99, mean, min, max and n of ``values`` (NaN where there are none)."""
    return {
        "median": percentile(values, 50),
        "p99": percentile(values, 99),
        "mean": sum(values) / len(values) if values else math.nan,
        "min": min(values, default=math.nan),
        "max": max(values, default=math.nan),
        "n": len(values),
    }


def ratio(numerator: float, denominator: float) -> float:
    """``numerator / denominator``; NaN when either is missing or the denominator is 0."""
    if not (math.isfinite(numerator) and math.isfinite(denominator)) or denominator == 0:
        return math.nan
    return numerator / denominator


def interleave(turns: Mapping[str, tuple[Callable[[], Sample], int]]) -> dict[str, list[float]]:
    """Run each contender ``reps`` times, in turns (A B C A B C ...), until all are done.

    Contenders with fewer reps drop out early, so an expensive one (a restart) still alternates with
    the cheap ones while it lasts.
    """
    samples: dict[str, list[float]] = {name: [] for name in turns}
    done = dict.fromkeys(turns, 0)
    while any(done[name] < reps for name, (_, reps) in turns.items()):
        for name, (fn, reps) in turns.items():
            if done[name] < reps:
                value = fn()
                samples[name].extend(value if isinstance(value, list) else [value])
                done[name] += 1
    return samples


@dataclass
class LoadWindow:
    """What ``closed_loop`` saw: per-request latencies and tokens, over ``elapsed`` seconds."""

    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed: float = 0.0
    errors: list[str] = field(default_factory=list)
    swaps: int = 0  # swaps committed during the window

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else math.nan


def closed_loop(request: Callable[[], int], clients: int, seconds: float) -> LoadWindow:
    """``clients`` threads each send one request after another for ``seconds``; ``request`` returns
    the tokens it generated. A request started before the deadline counts in full, so the window
    ends when the last one finishes."""
    window = LoadWindow()
    lock = threading.Lock()
    start = time.perf_counter()
    deadline = start + seconds

    def client() -> None:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                tokens = request()
            except Exception as exc:  # counted, reported; the window goes on
                with lock:
                    window.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.01)  # an overloaded daemon answers 429/503 at once: do not spin
                continue
            with lock:
                window.latencies.append(time.perf_counter() - t0)
                window.tokens += tokens

    threads = [threading.Thread(target=client, name=f"bench-client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    window.elapsed = time.perf_counter() - start
    return window
