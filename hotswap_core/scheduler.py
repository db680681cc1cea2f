"""Iteration-level scheduling: which request occupies which row of the KV cache, step by step.

Requests wait in groups (the prompts of one HTTP request, admitted together so they run on one version).
Each engine step admits waiting groups into free rows (lowest free row first, so decode batches stay
small), prefills prompts a chunk at a time within the step's budget of prompt tokens (``plan_prefill``; a row
decodes once its whole prompt is in the cache; a request's choices prefill their prompt once, ``share_prompts``),
and a row is retired the step its request finishes: its future
resolves, its stream ends and the row is free for the next step. A row is pinned to the adapter slot that was
live when it was admitted (or to the standby slot, for a swap's smoke prompts) and keeps it to its last token.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hotswap_core.generation import GenerationRequest, RowState, Scored
from hotswap_core.slots import AdapterVersion

# From this many prompt tokens, a request's choices share one prefill (``share_prompts``). Below it, n rows of the
# prompt in one forward cost little more than one row, and sharing would add a forward and a step.
SHARED_PROMPT_TOKENS = 64


@dataclass(eq=False)
class Row:
    """A request running in cache row ``index``, on adapter ``slot`` (``version``)."""

    index: int
    state: RowState
    slot: int
    version: AdapterVersion
    started_at: float
    check_finite: bool = False  # smoke prompts: record whether every step's logits were finite
    capture: bool = False  # keep the first step's logits (``Engine.last_logits``)
    finite: bool = True
    logits: torch.Tensor | None = None
    filled: int = 0  # prompt tokens in the cache: a prompt longer than a chunk is prefilled over several steps
    scored: list[Scored] = field(default_factory=list)  # its prompt's log-probabilities so far (when asked)
    seq: int = 0  # admission order (``RowTable.place``)
    waited: int = 0  # steps in a row its prompt was prefilling and got no chunk (``plan_prefill``)
    leader: Row | None = None  # the row of its request whose prefill of the same prompt it copies (``share_prompts``)
    followers: list[Row] = field(default_factory=list)  # the rows waiting to copy this one's prompt

    @property
    def position(self) -> int:
        """Position of the token the next decode step feeds: the last one sampled."""
        return len(self.state.prompt_ids) + len(self.state.ids) - 1

    @property
    def prefilling(self) -> bool:
        """Its prompt is not all in the cache yet: it takes no decode step."""
        return self.filled < len(self.state.prompt_ids)


@dataclass(eq=False)
class Group:
    """The requests of one HTTP request; ``slot`` pins them to a slot (None: the live one at admission)."""

    requests: list[GenerationRequest]
    slot: int | None = None
    check_finite: bool = False
    capture: bool = False
    rows: list[Row] = field(default_factory=list)


class RowTable:
    """Waiting groups and the ``size`` rows of the cache. The engine's condition variable guards the queue
    (``waiting``, ``queued``); the rows are touched only by the thread that runs the steps."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.rows: list[Row | None] = [None] * size
        self.waiting: deque[Group] = deque()
        self.queued = 0  # requests waiting
        self._admitted = itertools.count()

    @property
    def free(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def active(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    def take_admissible(self) -> list[Group]:
        """Pop the waiting groups that fit in the free rows now, in arrival order (a group that does not fit
        waits, and so does everything behind it: first come, first served)."""
        free, out = self.free, []
        while self.waiting and len(self.waiting[0].requests) <= free:
            group = self.waiting.popleft()
            self.queued -= len(group.requests)
            free -= len(group.requests)
            out.append(group)
        return out

    def place(self, row: Row) -> None:
        """Put ``row`` in the lowest free row of the cache (admission made sure there is one)."""
        row.index = next(i for i, r in enumerate(self.rows) if r is None)
        row.seq = next(self._admitted)
        self.rows[row.index] = row

    def retire(self, row: Row) -> None:
        """Free ``row``'s cache row. A leader gone before its prompt was whole leaves its followers to prefill their
        own; a follower gone is not copied into (its cache row may be someone else's by then)."""
        self.rows[row.index] = None
        for follower in row.followers:
            follower.leader = None
        row.followers = []
        if row.leader is not None:
            row.leader.followers.remove(row)
            row.leader = None

    def bucket_rows(self, buckets: tuple[int, ...]) -> int:
        """Rows a decode step covers: the smallest bucket holding the highest occupied row."""
        top = max((r.index for r in self.rows if r is not None), default=-1) + 1
        return next(b for b in buckets if b >= top)

    def span(self, spans: tuple[int, ...]) -> int:
        """Positions a decode step attends to: the smallest span holding every running row's position."""
        furthest = max((r.position for r in self.rows if r is not None and not r.prefilling), default=0) + 1
        return next(s for s in spans if s >= furthest)


def share_prompts(rows: list[Row]) -> None:
    """The rows of one request (``rows``, just admitted) that have the same prompt, as its ``n`` choices do, prefill
    it once: the first runs it, each other waits for it (``Row.leader``: ``plan_prefill`` is not given it) and then
    copies its cache rows but the last position (``KVCache.copy_prefix``), prefilling only the last token itself
    (its own logits, its own first draw). Left alone: prompts shorter than ``SHARED_PROMPT_TOKENS`` (n rows of a
    short prompt cost about what one costs, in one forward; sharing would add a forward and a step), and rows that
    score their prompt (``prompt_logprobs``: each scores its own chunks)."""
    first: dict[tuple[int, ...], Row] = {}
    for row in rows:
        if len(row.state.prompt_ids) < SHARED_PROMPT_TOKENS or row.state.params.prompt_logprobs is not None:
            continue
        leader = first.setdefault(tuple(row.state.prompt_ids), row)
        if leader is not row:
            row.leader = leader
            leader.followers.append(row)


def plan_prefill(rows: list[Row], chunk_end: Callable[[Row], int], budget: int | None) -> list[tuple[Row, int]]:
    """The prompt chunks one step prefills: (row, where its chunk ends), in admission order, out of ``rows`` (those
    still prefilling). A row's next chunk is ``row.filled`` to ``chunk_end(row)``: chunk boundaries depend on the
    prompt alone, never on the rows beside it. ``budget``: the positions one step may prefill, all rows together and
    padding included (``prefill_cost``; ``model.prefill_chunk_tokens``, which no chunk exceeds; None: every row's
    chunk, every step). Within it:

    - the oldest prompt still prefilling goes first when it got no chunk last step, so it gets one at least every
      other step (a prompt's prefill is bounded whatever arrives after it: 2 steps a chunk, once the prompts admitted
      before it are in);
    - then the smallest chunks first (a short prompt admitted while a long one prefills is whole in the step it is
      admitted, or the next), then in admission order; a chunk that does not fit waits for a later step.

    Updates each row's ``waited``."""
    rows = sorted(rows, key=lambda r: r.seq)
    ends = {row: chunk_end(row) for row in rows}
    if budget is None:
        chosen = rows
    else:
        order = sorted(rows, key=lambda r: (ends[r] - r.filled, r.seq))
        if rows and rows[0].waited:
            order.remove(rows[0])
            order.insert(0, rows[0])
        chosen = []
        for row in order:
            # The first always goes (a budget below a chunk would stall).
            if not chosen or prefill_cost([(r, ends[r]) for r in (*chosen, row)]) <= budget:
                chosen.append(row)
    for row in rows:
        row.waited = 0 if row in chosen else row.waited + 1
    return [(row, ends[row]) for row in rows if row in chosen]


def prefill_forwards(chunks: list[tuple[Row, int]]) -> tuple[list[tuple[Row, int]], list[tuple[Row, int]]]:
    """``chunks`` (row, chunk end) as the step runs them: first chunks (causal over their own keys: whole prompts,
    when short) in one right-padded batch, and later chunks (which read their rows' cached positions) in another."""
    return [c for c in chunks if c[0].filled == 0], [c for c in chunks if c[0].filled > 0]


def prefill_cost(chunks: list[tuple[Row, int]]) -> int:
    """Positions the step's prefill forwards (``prefill_forwards``) cover for ``chunks``: each as wide as its longest
    chunk."""
    cost = 0
    for forward in prefill_forwards(chunks):
        cost += len(forward) * max((end - row.filled for row, end in forward), default=0)
    return cost


def buckets_for(max_rows: int) -> tuple[int, ...]:
    """Decode batch sizes that get a graph each: powers of two up to ``max_rows``, and ``max_rows``."""
    out, b = [], 1
    while b < max_rows:
        out.append(b)
        b *= 2
    return (*out, max_rows)
