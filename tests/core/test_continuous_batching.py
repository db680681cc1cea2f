"""Continuous batching with per-request adapter pinning, against an independent eager PEFT model.

Latency is counted in decode steps (``Engine.steps``), never in seconds. Outputs are compared token for
token with a fresh eager ``PeftModel`` decoding greedily, one prompt at a time, for the version each
response names.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hotswap_core.generation import GenerationRequest, GenerationResult, SamplingParams
from hotswap_core.history import History
from hotswap_core.swap import Swapper

from .factory import make_adapter

pytestmark = pytest.mark.slow

PROMPTS = ["Hello =>", "ab", "x" * 40, "The quick brown fox jumps =>", "q" * 90, "Zürich =>"]
LONGEST = 40
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
POOL: dict[str, dict[str, Any]] = {
    "p_r8": dict(r=8, alpha=8, targets=ALL),
    "p_r4_sub": dict(r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"]),
    "p_rslora": dict(r=6, alpha=12, targets=ALL, use_rslora=True),
}


@pytest.fixture(scope="module")
def pool(demo_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pool")
    return {n: make_adapter(demo_assets.base, root / n, seed=300 + i, **kw) for i, (n, kw) in enumerate(POOL.items())}


@pytest.fixture(scope="module")
def eager(demo_assets: Any, pool: dict[str, Path], engine: Any) -> dict[str, dict[str, list[int]]]:
    """Greedy tokens (EOS ignored, ``LONGEST`` of them) per adapter and prompt, from a fresh eager PeftModel."""
    out = {name: _eager_greedy(demo_assets, path, engine.tokenizer, PROMPTS, LONGEST) for name, path in pool.items()}
    assert len({tuple(map(tuple, v.values())) for v in out.values()}) == len(pool), "adapters must differ"
    return out


def _eager_greedy(
    demo_assets: Any, adapter: Path, tokenizer: Any, prompts: Iterable[str], n: int
) -> dict[str, list[int]]:
    """``n`` greedy tokens (EOS ignored) per prompt from a fresh eager PeftModel of ``adapter``."""
    model: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.base), adapter).eval()
    return {p: _greedy(model, tokenizer.encode(p, add_special_tokens=False), n) for p in prompts}


@torch.inference_mode()
def _greedy(model: Any, ids: list[int], n: int) -> list[int]:
    from transformers import DynamicCache

    cache, tokens = DynamicCache(config=model.config), []
    step = torch.tensor([ids])
    for _ in range(n):
        logits = model(input_ids=step, past_key_values=cache, use_cache=True).logits[0, -1]
        tokens.append(int(logits.argmax()))
        step = torch.tensor([[tokens[-1]]])
    return tokens


@pytest.fixture
def swapper(engine: Any, demo_config: Any, tmp_path: Path) -> Swapper:
    return Swapper(engine, demo_config.validation, History(str(tmp_path / "state")))


def _fixed(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, ignore_eos=True)


def _after_tokens(n: int) -> tuple[threading.Event, Any]:
    """An event set once a stream has delivered ``n`` chunks (demo tokenizer: one character per token)."""
    seen, count = threading.Event(), [0]

    def on_text(_t: str, _logprobs: Any) -> None:
        count[0] += 1
        if count[0] >= n:
            seen.set()

    return seen, on_text


def _live_and_eager(swapper: Swapper, pool: dict[str, Path], demo_assets: Any, name: str, version: str) -> Any:
    """``pool[name]`` made live as ``version``, and a fresh eager PEFT model of it (the reference)."""
    assert swapper.swap(pool[name], version=version).result in ("success", "unchanged")
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.base), pool[name]).eval()


def _prompt(engine: Any, text: str, length: int) -> tuple[str, list[int]]:
    """The first ``length`` characters of ``text`` and their token ids (the demo tokenizer: one a character)."""
    ids = engine.tokenizer.encode(text[:length], add_special_tokens=False)
    assert len(ids) == length
    return text[:length], ids


@contextmanager
def _beside_a_running_row(engine: Any, prefill: Any, decode: Any) -> Iterator[Any]:
    """A 200-token generation running (3 tokens in), then ``prefill`` and ``decode`` in place of the runner's, under
    ``fail_on_recompile``; yields the running request's future. The runner and the stance are restored after."""
    started, on_text = _after_tokens(3)
    running = engine.submit(GenerationRequest("Hello =>", _fixed(200), on_text=on_text))
    assert started.wait(60)
    saved = engine.runner.prefill, engine.runner.decode
    engine.runner.prefill, engine.runner.decode = prefill, decode
    torch.compiler.set_stance("fail_on_recompile")
    try:
        yield running
    finally:
        torch.compiler.set_stance("default")
        engine.runner.prefill, engine.runner.decode = saved


def test_a_short_request_gets_its_tokens_within_a_few_steps_of_long_generations(engine: Any) -> None:
    """Admitted at the next step, answered in 4 decode steps, while two 240-token generations keep running."""
    started, on_text = _after_tokens(5)
    longs = [GenerationRequest("Hello =>", _fixed(240), on_text=on_text) for _ in range(2)]
    long_futures = [engine.submit(r) for r in longs]
    assert started.wait(60)
    at_submit = engine.steps
    steps: dict[str, int] = {}
    short = GenerationRequest("abc", _fixed(4), on_start=lambda _v: steps.setdefault("admitted", engine.steps))
    short.future.add_done_callback(lambda _f: steps.setdefault("done", engine.steps))
    assert engine.submit(short).result(60).completion_tokens == 4
    assert not any(f.done() for f in long_futures), "the long generations should still be running"
    # Admitted before the next decode step; then its prefill gives token 1 and 3 decode steps tokens 2-4.
    assert steps["admitted"] - at_submit <= 1, steps
    assert steps["done"] - steps["admitted"] <= 3, steps
    assert all(f.result(120).completion_tokens == 240 for f in long_futures)


def test_rows_of_two_versions_share_steps_and_each_matches_eager_peft(
    engine: Any, swapper: Swapper, pool: dict[str, Path], eager: dict[str, dict[str, list[int]]]
) -> None:
    """55 swaps under 3 clients of mixed lengths, compile stance ``fail_on_recompile``: every response equals the
    eager PEFT model's greedy tokens for the version it names; a request sent after a commit returned runs on that
    version or a newer one; and many requests admitted before a commit finished after it, on their old version."""
    rng = random.Random(5)
    names = list(pool)
    order = [names[0]]
    while len(order) < 56:
        order.append(rng.choice([n for n in names if n != order[-1]]))  # never "unchanged"
    version_of: dict[str, tuple[int, str]] = {}  # version name -> (commit index, adapter)
    commits = [0]  # commits returned so far
    assert swapper.swap(pool[order[0]], version="c00").result in ("success", "unchanged")
    version_of["c00"] = (0, order[0])
    done = threading.Event()
    records: list[Any] = []

    def producer() -> None:
        try:
            for i, name in enumerate(order[1:], 1):
                version_of[f"c{i:02d}"] = (i, name)
                records.append(swapper.swap(pool[name], version=f"c{i:02d}"))
                commits[0] = i
        finally:
            done.set()

    results: list[tuple[str, int, GenerationResult, str]] = []  # prompt, commits at submit, result, live at end
    errors: list[BaseException] = []

    def client(seed: int) -> None:
        r = random.Random(seed)
        while not done.is_set():
            prompt, n = r.choice(PROMPTS), r.choice([1, 3, 8, 20, LONGEST])
            at_submit = commits[0]
            req = GenerationRequest(prompt, _fixed(n))
            live_at_end: list[str] = []

            def note_live(_f: Any, into: list[str] = live_at_end) -> None:
                into.append(engine.slots.live_version.version)

            req.future.add_done_callback(note_live)
            try:
                res = engine.submit(req).result(120)
            except BaseException as exc:  # reported below, with the rest
                errors.append(exc)
                return
            results.append((prompt, at_submit, res, live_at_end[0]))

    torch.compiler.set_stance("fail_on_recompile")
    try:
        threads = [threading.Thread(target=client, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        producer()
        for t in threads:
            t.join(180)
    finally:
        torch.compiler.set_stance("default")

    assert errors == []
    assert [r.result for r in records].count("success") == len(order) - 1 >= 50
    assert engine.recompilations == 0
    wrong = []
    for prompt, at_submit, res, _ in results:
        index, adapter = version_of[res.adapter.version]
        if list(res.token_ids) != eager[adapter][prompt][: res.completion_tokens]:
            wrong.append((res.adapter.version, adapter, prompt, res.completion_tokens))
        assert index >= at_submit, f"sent after commit {at_submit} returned, yet served by {res.adapter.version}"
    assert wrong == []
    spanned = [res for _, _, res, live in results if live != res.adapter.version]
    assert len(spanned) >= 10, f"only {len(spanned)} of {len(results)} requests finished after a newer commit"
    assert len({res.adapter.version for _, _, res, _ in results}) >= 20


# Long enough that B's whole swap (its smoke prompt shares the rows' steps) ends while they run, with a wide margin
# even on a loaded machine: at 40 tokens a second test worker's load once let them finish first.
PINNED_TOKENS = 200


@pytest.fixture(scope="module")
def eager_pinned(demo_assets: Any, pool: dict[str, Path], engine: Any) -> dict[str, list[int]]:
    """``PINNED_TOKENS`` greedy tokens (EOS ignored) of p_r8 for the two prompts the staging test runs."""
    return _eager_greedy(demo_assets, pool["p_r8"], engine.tokenizer, ("Hello =>", "ab"), PINNED_TOKENS)


def test_staging_waits_for_rows_pinned_to_the_standby_slot(
    engine: Any, swapper: Swapper, pool: dict[str, Path], eager_pinned: dict[str, list[int]]
) -> None:
    """Rows on version A keep running after B's commit; C's staging (into A's slot) waits for them, and their
    outputs stay exactly A's. Staging into a pinned slot directly is refused."""
    a, b, c = pool["p_r8"], pool["p_r4_sub"], pool["p_rslora"]
    assert swapper.swap(a).result in ("success", "unchanged")
    started, on_text = _after_tokens(3)
    rows = [GenerationRequest(p, _fixed(PINNED_TOKENS), on_text=on_text) for p in ("Hello =>", "ab")]
    futures = [engine.submit(r) for r in rows]
    assert started.wait(60)
    assert swapper.swap(b).result == "success"
    slots = engine.slots
    assert slots.contents[slots.standby].version == "p_r8" and slots.pinned(slots.standby) == 2
    with pytest.raises(RuntimeError, match="running rows use it"):
        slots.stage(slots.standby, slots.contents[slots.standby], {}, {})
    order: list[str] = []
    for f in futures:
        f.add_done_callback(lambda _f: order.append("row done"))
    record = swapper.swap(c)
    order.append("C committed")
    assert record.result == "success"
    assert order == ["row done", "row done", "C committed"]
    for prompt, f in zip(("Hello =>", "ab"), futures, strict=True):
        res = f.result()
        assert res.adapter.version == "p_r8"
        assert list(res.token_ids) == eager_pinned[prompt]


def test_a_swap_gives_up_on_a_pinned_slot_after_request_timeout(
    engine: Any, swapper: Swapper, pool: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wait is bounded by server.request_timeout_s: the swap fails in stage, the live version serves on."""
    assert swapper.swap(pool["p_r8"]).result in ("success", "unchanged")
    started, on_text = _after_tokens(3)
    future = engine.submit(GenerationRequest("Hello =>", _fixed(240), on_text=on_text))
    assert started.wait(60)
    assert swapper.swap(pool["p_r4_sub"]).result == "success"
    server = dataclasses.replace(engine.config.server, request_timeout_s=0.05)
    monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, server=server))
    record = swapper.swap(pool["p_rslora"])
    assert (record.result, record.reason) == ("failed", "stage_failed"), record
    assert "server.request_timeout_s" in (record.message or "")
    assert engine.slots.live_version.version == "p_r4_sub"
    assert future.result(120).adapter.version == "p_r8"
    assert engine.generate(["Hello =>"], _fixed(3))[0].adapter.version == "p_r4_sub"


def test_a_generation_crosses_every_attention_span_and_matches_eager_peft(
    engine: Any, swapper: Swapper, pool: dict[str, Path], demo_assets: Any
) -> None:
    """A decode step attends to the smallest span holding its furthest row (64, 128 or 256 positions of the
    demo's 256): a 240-token generation beside short ones moves through all three, under ``fail_on_recompile``,
    and equals the eager PEFT model's greedy tokens."""
    assert engine.spans == (64, 128, 256)
    assert swapper.swap(pool["p_r8"], version="spans").result in ("success", "unchanged")
    model: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.base), pool["p_r8"])
    want = _greedy(model.eval(), engine.tokenizer.encode("ab", add_special_tokens=False), 240)
    spans: list[int] = []
    decode = engine.runner.decode

    def spy(rows: Any, n: int, span: int, numbers: Any) -> Any:
        spans.append(span)
        return decode(rows, n, span, numbers)

    engine.runner.decode = spy
    torch.compiler.set_stance("fail_on_recompile")
    try:
        long = engine.submit(GenerationRequest("ab", _fixed(240)))
        shorts = [engine.submit(GenerationRequest("Hello =>", _fixed(8))) for _ in range(3)]
        got = long.result(120)
        assert all(f.result(120).completion_tokens == 8 for f in shorts)
    finally:
        torch.compiler.set_stance("default")
        engine.runner.decode = decode
    assert list(got.token_ids) == want
    assert set(spans) == {64, 128, 256} and spans == sorted(spans), spans  # widening as the long row advances
    assert engine.recompilations == 0


def test_a_long_prompt_is_prefilled_in_chunks_while_running_rows_decode(
    engine: Any, swapper: Swapper, pool: dict[str, Path], demo_assets: Any
) -> None:
    """A 250-token prompt arrives while a generation runs: it is prefilled 64 tokens a step (the demo's
    ``prefill_chunk_tokens``) in 4 steps, each followed by a decode step of the running row, not in one forward
    that stalls it; its text equals the eager PEFT model's greedy tokens, under ``fail_on_recompile``."""
    assert engine.runner.prefill_chunk == 64
    model = _live_and_eager(swapper, pool, demo_assets, "p_rslora", "chunks")
    prompt, ids = _prompt(engine, "The quick brown fox jumps over the lazy dog. " * 6, 250)
    want = _greedy(model, ids, 6)
    events: list[tuple[str, int, int]] = []  # ("prefill", chunk start, chunk end) / ("decode", rows, 0)
    prefill, decode = engine.runner.prefill, engine.runner.decode

    def spy_prefill(rows: Any, ends: list[int], numbers: Any) -> Any:
        for r, end in zip(rows, ends, strict=True):
            if len(r.state.prompt_ids) == 250:
                events.append(("prefill", r.filled, end))
        return prefill(rows, ends, numbers)

    def spy_decode(rows: Any, n: int, span: int, numbers: Any) -> Any:
        events.append(("decode", len(rows), 0))
        return decode(rows, n, span, numbers)

    with _beside_a_running_row(engine, spy_prefill, spy_decode) as running:
        got = engine.submit(GenerationRequest(prompt, _fixed(6))).result(120)
    assert list(got.token_ids) == want
    chunks = [(a, b) for kind, a, b in events if kind == "prefill"]
    assert chunks == [(0, 64), (64, 128), (128, 192), (192, 250)], events
    first = events.index(("prefill", 0, 64))
    between = events[first : events.index(("prefill", 192, 250))]
    # After each of the first three chunks, a decode step of the running row alone (the long one is not in it).
    assert [e for e in between if e[0] == "decode"] == [("decode", 1, 0)] * 3, events
    assert not running.done() and running.result(120).completion_tokens == 200
    assert engine.recompilations == 0


def test_a_step_prefills_at_most_a_chunk_of_prompt_tokens_first_come_first_served(
    engine: Any, swapper: Swapper, pool: dict[str, Path], demo_assets: Any
) -> None:
    """Three 150-token prompts arrive together while a generation runs, then a 5-token one: no step's prefill covers
    more than 64 positions (the demo's ``prefill_chunk_tokens``), padding included, where each prompt's own chunks
    would make 192; chunk boundaries are the prompt's own (0-64-128-150); the prompts are prefilled first come,
    first served (the first is whole 3 or 4 steps after it arrived; without a budget all three would be, together,
    after 3); the short prompt, admitted while they prefill, is whole within 2 steps; the running row decodes after
    every step; every text equals the eager PEFT model's greedy tokens, under ``fail_on_recompile``."""
    assert engine.prefill_budget == 64
    assert swapper.swap(pool["p_r8"], version="budget").result in ("success", "unchanged")
    model: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.base), pool["p_r8"])
    prompts = [(f"{k} the quick brown fox jumps over the lazy dog. " * 4)[:150] for k in range(3)] + ["ab cd"]
    ids = [engine.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
    assert [len(i) for i in ids] == [150, 150, 150, 5]
    want = [_greedy(model.eval(), i, 4) for i in ids]
    steps: list[list[tuple[int, int, int]]] = [[]]  # per step: (prompt, chunk start, chunk end)
    covered = [0]  # per step: positions its prefill forwards covered, padding included
    firsts: dict[int, int] = {}  # prompt -> the step its prompt was whole
    prefill, decode = engine.runner.prefill, engine.runner.decode
    by_ids = {tuple(i): k for k, i in enumerate(ids)}

    def spy_prefill(rows: Any, ends: list[int], numbers: Any) -> Any:
        covered[-1] += len(rows) * max(end - r.filled for r, end in zip(rows, ends, strict=True))
        for r, end in zip(rows, ends, strict=True):
            if (k := by_ids.get(tuple(r.state.prompt_ids))) is not None:
                steps[-1].append((k, r.filled, end))
                if end == len(r.state.prompt_ids):
                    firsts[k] = len(steps) - 1
        return prefill(rows, ends, numbers)

    chunked = threading.Event()  # a step with a chunk of the long prompts has ended

    def spy_decode(rows: Any, n: int, span: int, numbers: Any) -> Any:
        if steps[-1]:
            chunked.set()
        steps.append([])
        covered.append(0)
        return decode(rows, n, span, numbers)

    with _beside_a_running_row(engine, spy_prefill, spy_decode) as running:
        longs = engine.submit_group([GenerationRequest(p, _fixed(4)) for p in prompts[:3]])
        assert chunked.wait(60)
        arrived = len(steps) - 1
        short = engine.submit(GenerationRequest(prompts[3], _fixed(4)))
        got = [f.result(120) for f in [*longs, short]]
    assert [list(g.token_ids) for g in got] == want
    chunks = [c for step in steps for c in step]
    for k in range(3):
        assert [(a, b) for j, a, b in chunks if j == k] == [(0, 64), (64, 128), (128, 150)], steps
    assert max(covered) <= 64, (covered, steps)
    long_steps = [i for i, step in enumerate(steps) if any(j < 3 for j, _, _ in step)]
    # Its 3 chunks in 3 steps in a row (4 when the short prompt took the second's turn); the others waited.
    assert firsts[0] - long_steps[0] <= 3, steps
    assert firsts[0] < firsts[1] < firsts[2], firsts
    assert firsts[3] - arrived <= 2, (arrived, steps)
    assert not running.done() and running.result(120).completion_tokens == 200
    assert engine.recompilations == 0


def test_a_requests_choices_prefill_their_prompt_once(
    engine: Any, swapper: Swapper, pool: dict[str, Path], demo_assets: Any
) -> None:
    """A request's 4 greedy choices of a 150-token prompt, beside a running generation: the first prefills the prompt
    (0-64-128-150), the other three copy its cache rows and prefill its last token (149-150), together, the step
    after it was whole: 153 prompt positions, not 600. Every text equals the eager PEFT model's greedy tokens, under
    ``fail_on_recompile``. Seeded temperature-1 choices draw the same tokens as the same seeds do in requests of their
    own (which share nothing)."""
    model = _live_and_eager(swapper, pool, demo_assets, "p_r8", "shared")
    prompt, ids = _prompt(engine, "the quick brown fox jumps over the lazy dog. " * 4, 150)
    want = _greedy(model, ids, 4)
    choices = [GenerationRequest(prompt, _fixed(4)) for _ in range(4)]
    chunks: dict[int, list[tuple[int, int, int]]] = {k: [] for k in range(4)}  # choice -> (step, start, end)
    steps = [0]
    prefill, decode = engine.runner.prefill, engine.runner.decode

    def spy_prefill(rows: Any, ends: list[int], numbers: Any) -> Any:
        for r, end in zip(rows, ends, strict=True):
            for k, req in enumerate(choices):
                if r.state.request is req:
                    chunks[k].append((steps[0], r.filled, end))
        return prefill(rows, ends, numbers)

    def spy_decode(rows: Any, n: int, span: int, numbers: Any) -> Any:
        steps[0] += 1
        return decode(rows, n, span, numbers)

    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=6, ignore_eos=True, temperature=1.0, seed=seed)

    with _beside_a_running_row(engine, spy_prefill, spy_decode) as running:
        got = [f.result(120) for f in engine.submit_group(choices)]
        shared = engine.submit_group([GenerationRequest(prompt, seeded(7 + j)) for j in range(3)])
        shared_ids = [list(f.result(120).token_ids) for f in shared]
        alone_ids = [
            list(engine.submit(GenerationRequest(prompt, seeded(7 + j))).result(120).token_ids) for j in range(3)
        ]
    assert [list(g.token_ids) for g in got] == [want] * 4
    assert [(a, b) for _, a, b in chunks[0]] == [(0, 64), (64, 128), (128, 150)], chunks
    whole_at = chunks[0][-1][0]
    assert all(chunks[k] == [(whole_at + 1, 149, 150)] for k in (1, 2, 3)), chunks
    assert shared_ids == alone_ids and len({tuple(i) for i in shared_ids}) > 1, (shared_ids, alone_ids)
    assert not running.done() and running.result(120).completion_tokens == 200
    assert engine.recompilations == 0
    assert engine.table.free == engine.max_batch_size


def test_a_choice_gone_while_it_waits_for_the_shared_prompt_is_not_copied_into(engine: Any) -> None:
    """Of 3 choices of a 150-token prompt, the second's client goes away after the first chunk: it ends cancelled and
    the third still gets the prompt copied; then a leader cancelled after its first chunk leaves its two followers
    to prefill the prompt themselves (0-64-128-150), both with the greedy text of the first request."""
    prompt, _ = _prompt(engine, "the quick brown fox jumps over the lazy dog. " * 4, 150)
    prefill = engine.runner.prefill
    chunks: list[tuple[int, int, int]] = []  # (choice, start, end)
    current: list[GenerationRequest] = []
    cancel_after_first_chunk: list[GenerationRequest] = []

    def spy(rows: Any, ends: list[int], numbers: Any) -> Any:
        out = prefill(rows, ends, numbers)
        for r, end in zip(rows, ends, strict=True):
            if r.state.request in current:
                chunks.append((current.index(r.state.request), r.filled, end))
                for req in cancel_after_first_chunk:
                    req.cancelled.set()
        return out

    engine.runner.prefill = spy
    try:
        current[:] = [GenerationRequest(prompt, _fixed(4)) for _ in range(3)]
        cancel_after_first_chunk[:] = [current[1]]
        first = [f.result(60) for f in engine.submit_group(current)]
        first_chunks = list(chunks)
        chunks.clear()
        current[:] = [GenerationRequest(prompt, _fixed(4)) for _ in range(3)]
        cancel_after_first_chunk[:] = [current[0]]
        second = [f.result(60) for f in engine.submit_group(current)]
    finally:
        engine.runner.prefill = prefill
    assert first[1].finish_reason == "cancelled" and first[1].token_ids == ()
    assert first[0].token_ids == first[2].token_ids and len(first[0].token_ids) == 4
    assert [c for c in first_chunks if c[0] != 0] == [(2, 149, 150)], first_chunks
    assert second[0].finish_reason == "cancelled"
    assert second[1].token_ids == second[2].token_ids == first[0].token_ids
    for k in (1, 2):
        assert [(a, b) for j, a, b in chunks if j == k] == [(0, 64), (64, 128), (128, 150)], chunks
    assert engine.table.free == engine.max_batch_size and engine.slots.pinned(0) == engine.slots.pinned(1) == 0


def test_a_client_gone_while_its_prompt_prefills_frees_its_row(engine: Any) -> None:
    """Cancelled between two chunks of its prompt: it ends there as cancelled, its row and slot pin are free."""
    prefill = engine.runner.prefill
    gone = GenerationRequest("q" * 200, _fixed(4))
    chunks: list[int] = []

    def spy(rows: Any, ends: list[int], numbers: Any) -> Any:
        out = prefill(rows, ends, numbers)
        if any(r.state.request is gone for r in rows):
            chunks.append(len(chunks))
            gone.cancelled.set()  # after its first chunk
        return out

    engine.runner.prefill = spy
    try:
        result = engine.submit(gone).result(60)
    finally:
        engine.runner.prefill = prefill
    assert result.finish_reason == "cancelled" and result.token_ids == ()
    assert chunks == [0], "the other three chunks of its prompt should not have run"
    assert engine.table.free == engine.max_batch_size and engine.slots.pinned(0) == engine.slots.pinned(1) == 0


@pytest.mark.parametrize("std", [1e19, 1e18])
def test_a_candidate_whose_activations_overflow_leaves_nothing_non_finite_in_the_cache(
    std: float, engine: Any, swapper: Swapper, pool: dict[str, Path], demo_assets: Any, tmp_path: Path
) -> None:
    """Finite weights whose products overflow: the candidate passes validation and fails its smoke prompt
    (non_finite), whose rows wrote into their rows of the cache infinities and NaN (1e19), or keys near 1e38 (1e18:
    finite, but a score against them overflows). The next requests placed in those rows attend to those positions,
    masked (their span is 64), and a masked NaN or overflowing score would still poison them (0 x NaN, inf - inf):
    they must equal the eager PEFT model's greedy tokens."""
    assert swapper.swap(pool["p_r4_sub"], version="clean").result in ("success", "unchanged")
    model: Any = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(demo_assets.base), pool["p_r4_sub"])
    want = _greedy(model.eval(), engine.tokenizer.encode("ab", add_special_tokens=False), 6)
    overflow = make_adapter(demo_assets.base, tmp_path / "overflow", r=8, alpha=8, targets=ALL, std=std)
    record = swapper.swap(overflow, version="overflow")
    assert (record.result, record.reason) == ("rejected", "non_finite"), record
    got = [engine.submit(GenerationRequest("ab", _fixed(6))) for _ in range(4)]  # rows 0-3: the smoke rows' too
    assert [list(f.result(60).token_ids) for f in got] == [want] * 4
