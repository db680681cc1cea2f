"""Warm-up: the shapes the engine runs before serving, so no request compiles later, and the estimate of the
time it has left (what start-up progress shows). ``Engine.warm_up`` runs the plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class WarmupStep:
    """One warm-up step about to run: step ``k`` of ``total``; ``eta_s`` is None until one step has run."""

    k: int
    total: int
    batch: int
    length: int
    elapsed_s: float
    eta_s: float | None

    def describe(self) -> str:
        return f"step {self.k}/{self.total}: batch {self.batch}, prompt length {self.length}"


def warmup_plan(buckets: Sequence[int], max_seq_len: int, spans: Sequence[int] = ()) -> list[tuple[int, int]]:
    """(batch size, prompt length) of every step: each decode bucket, with short and long prompts, and a prompt
    whose decode steps (3 tokens) attend to each of ``spans`` (``kv_cache.spans_for``: on CUDA, a graph each; the
    short prompts' steps attend to the first). The longest prompt, ``max_seq_len - 4`` tokens, is longer than a
    prefill chunk whenever prompts are chunked (``runner.resolve_prefill_chunk``): its rows run later chunks, for
    one row and for several."""
    lengths = {2, 3, max(3, max_seq_len - 4)} | {max(3, s - 4) for s in spans[1:]}
    return [(b, n) for b in buckets for n in sorted(lengths)]


def estimate(
    left: list[tuple[int, int]], took: list[tuple[float, bool]], seen: set[int], dynamic: bool
) -> float | None:
    """Seconds the steps ``left`` should take, from the steps done (``took``: seconds, whether it compiled a
    graph) and the batch sizes they ran (``seen``). Nearly all the time goes into the steps that compile: the
    first step of each batch size (its decode graph; with dynamic shapes prefill is symbolic in the prompt
    length), and without dynamic shapes every step. None until a compiling step is done."""
    compiling = [t for t, compiled in took if compiled]
    if not compiling:
        return None
    fast = sorted(t for t, compiled in took if not compiled)
    per_fast = fast[len(fast) // 2] if fast else 0.05
    new, total = set(seen), 0.0
    for bsz, _ in left:
        compiles = not dynamic or bsz not in new
        new.add(bsz)
        total += sum(compiling) / len(compiling) if compiles else per_fast
    return total
