"""The step's prompt-token budget (``scheduler.plan_prefill``), step by step over synthetic rows: no model.

What it must hold whatever arrives: no step's forwards cover more positions than the budget (padding included); a
chunk's boundaries are its prompt's own; the oldest prompt still prefilling gets a chunk at least every other step
(its prefill is bounded under a steady stream of arrivals); every prompt is eventually whole.
"""

from __future__ import annotations

import random
from types import SimpleNamespace
from typing import Any

import pytest

from hotswap_core.scheduler import SHARED_PROMPT_TOKENS, Row, RowTable, plan_prefill, prefill_cost, share_prompts

CHUNK = 64


def _row(table: RowTable, length: int) -> Row:
    row = Row(-1, SimpleNamespace(prompt_ids=[7] * length), 0, None, 0.0)  # type: ignore[arg-type]
    table.place(row)
    return row


def _end(row: Row) -> int:
    return min(len(row.state.prompt_ids), row.filled + CHUNK)


def _step(table: RowTable, budget: int | None) -> list[tuple[Row, int]]:
    """One step's prefill: plan it, check it, and advance the rows as the engine does (whole rows retire)."""
    prefilling = [r for r in table.active if r.prefilling]
    plan = plan_prefill(prefilling, _end, budget)
    assert plan or not prefilling, "a step with prompts to prefill must prefill something"
    assert [r.seq for r, _ in plan] == sorted(r.seq for r, _ in plan), "chunks come in admission order"
    if budget is not None:
        assert prefill_cost(plan) <= budget, "a step's forwards cover more positions than its budget"
    for row, end in plan:
        assert end == _end(row) and row.filled % CHUNK == 0, "a chunk starts and ends where its prompt's own do"
        row.filled = end
        if not row.prefilling:
            table.retire(row)
    return plan


def test_a_long_prompt_alone_takes_whole_chunks_every_step() -> None:
    table = RowTable(8)
    row = _row(table, 200)
    ends = []
    while row.prefilling:
        ((got, end),) = _step(table, CHUNK)
        assert got is row
        ends.append(end)
    assert ends == [64, 128, 192, 200]


def test_long_prompts_together_are_prefilled_one_after_another_within_the_budget() -> None:
    table = RowTable(8)
    rows = [_row(table, 150) for _ in range(3)]
    whole_at = {}
    for step in range(20):
        for row, _ in _step(table, CHUNK):
            if not row.prefilling:
                whole_at[row.seq] = step
        if not any(r.prefilling for r in rows):
            break
    assert whole_at == {0: 2, 1: 5, 2: 8}  # first come, first served: 3 chunks each, one chunk a step
    # Without a budget each row takes a chunk every step: all three whole after 3 steps, 3 chunks a step.
    table = RowTable(8)
    rows = [_row(table, 150) for _ in range(3)]
    assert [len(_step(table, None)) for _ in range(3)] == [3, 3, 3] and not any(r.prefilling for r in rows)


def test_a_short_prompt_is_whole_the_step_it_arrives_beside_a_long_one_with_its_turn_to_come() -> None:
    table = RowTable(8)
    long = _row(table, 500)
    _step(table, CHUNK)  # the long prompt's first chunk
    short = _row(table, 10)
    assert [r for r, _ in _step(table, CHUNK)] == [short]  # the smallest chunk first; the long one's does not fit
    assert [r for r, _ in _step(table, CHUNK)] == [long]  # it got none last step: it goes first


def test_padding_counts_toward_the_budget() -> None:
    """First chunks of 5 and 50 tokens run in one batch 50 wide: 100 positions, over a budget of 64. The 5-token
    one goes alone; the other the step after."""
    table = RowTable(8)
    small, wide = _row(table, 5), _row(table, 50)
    assert [r for r, _ in _step(table, CHUNK)] == [small]
    assert [r for r, _ in _step(table, CHUNK)] == [wide]


@pytest.mark.parametrize("seed", range(5))
def test_a_steady_stream_of_short_prompts_never_starves_the_oldest(seed: int) -> None:
    """A new 5-60-token prompt every step, forever, beside a 2,000-token one: the long one gets a chunk at least
    every other step, so it is whole within 2 steps a chunk (63 steps), and no step exceeds the budget."""
    rng = random.Random(seed)
    table = RowTable(64)
    long = _row(table, 2000)
    gaps, since, steps = [], 0, 0
    while long.prefilling:
        if table.free:
            _row(table, rng.randint(5, 60))
        got = [r for r, _ in _step(table, CHUNK)]
        since = 0 if long in got else since + 1
        gaps.append(since)
        steps += 1
        assert steps <= 2 * 32, "the long prompt starved"
    assert max(gaps) <= 1


@pytest.mark.parametrize("seed", range(20))
def test_random_arrivals_hold_the_budget_and_all_finish(seed: int) -> None:
    """Prompts of 1-400 tokens arrive at random over 60 steps: every step within the budget (``_step`` checks),
    the oldest never skipped twice in a row, and all are whole within a bound of their chunks."""
    rng = random.Random(seed)
    budget = rng.choice([CHUNK, 2 * CHUNK])
    table = RowTable(16)
    arrived = chunks = 0
    for step in range(10_000):
        if step < 60 and table.free and rng.random() < 0.5:
            length = rng.randint(1, 400)
            _row(table, length)
            arrived, chunks = arrived + 1, chunks + -(-length // CHUNK)
        prefilling = [r for r in table.active if r.prefilling]
        oldest: Any = min(prefilling, key=lambda r: r.seq, default=None)
        skipped_before = oldest is not None and oldest.waited > 0
        got = [r for r, _ in _step(table, budget)]
        if skipped_before:
            assert oldest in got, "the oldest waited a step and was skipped again"
        if step >= 60 and not table.active:
            break
    assert not table.active and arrived > 10
    assert step <= 60 + chunks  # a step with prompts to prefill runs at least one chunk


# ---- a request's choices share their prompt (share_prompts) -------------------------------------------------
def _choices(table: RowTable, prompts: list[list[int]], prompt_logprobs: int | None = None) -> list[Row]:
    rows = []
    for ids in prompts:
        state = SimpleNamespace(prompt_ids=ids, params=SimpleNamespace(prompt_logprobs=prompt_logprobs))
        rows.append(Row(-1, state, 0, None, 0.0))  # type: ignore[arg-type]
        table.place(rows[-1])
    share_prompts(rows)
    return rows


def test_the_choices_of_one_prompt_follow_its_first_row_and_other_prompts_their_own() -> None:
    a, b = [1] * SHARED_PROMPT_TOKENS, [2] * (SHARED_PROMPT_TOKENS + 5)
    rows = _choices(RowTable(8), [a, a, b, a, b])
    assert [r.leader for r in rows] == [None, rows[0], None, rows[0], rows[2]]
    assert rows[0].followers == [rows[1], rows[3]] and rows[2].followers == [rows[4]]


@pytest.mark.parametrize(
    ("length", "prompt_logprobs"), [(SHARED_PROMPT_TOKENS - 1, None), (SHARED_PROMPT_TOKENS * 2, 0)]
)
def test_short_prompts_and_rows_that_score_their_prompt_prefill_their_own(length: int, prompt_logprobs: Any) -> None:
    rows = _choices(RowTable(8), [[3] * length] * 3, prompt_logprobs)
    assert all(r.leader is None and not r.followers for r in rows)


def test_a_follower_gone_is_never_copied_into_and_a_leader_gone_lets_its_followers_prefill() -> None:
    table = RowTable(8)
    leader, first, second, third = _choices(table, [[4] * 100] * 4)
    table.retire(second)  # its client went away while it waited: its cache row may be someone else's next step
    assert leader.followers == [first, third] and second.leader is None
    table.retire(leader)  # cancelled before its prompt was whole: the others prefill their own, from position 0
    assert first.leader is None and third.leader is None and not leader.followers
    assert first.filled == third.filled == 0 and first.prefilling
