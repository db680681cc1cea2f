"""The swap transaction: atomic under injected faults, no recompilation, consistent responses, rollback."""

from __future__ import annotations

import random
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from hotswap_core.generation import GenerationRequest, SamplingParams
from hotswap_core.history import History
from hotswap_core.swap import Swapper

from .factory import make_adapter

pytestmark = pytest.mark.slow

PROMPTS = ["Hello =>", "The quick brown fox =>", "z"]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIX: dict[str, dict[str, Any]] = {
    "m_r1": dict(r=1, alpha=2, targets=ALL),
    "m_r8": dict(r=8, alpha=8, targets=ALL),
    "m_r4_sub": dict(r=4, alpha=16, targets=["q_proj", "v_proj", "down_proj"]),
    "m_r2_mlp": dict(r=2, alpha=1, targets=["gate_proj", "up_proj"]),
    "m_rslora": dict(r=6, alpha=12, targets=ALL, use_rslora=True),
    "m_pattern": dict(r=8, alpha=16, targets=ALL, rank_pattern={"o_proj": 3}, alpha_pattern={"k_proj": 2}),
}


@pytest.fixture(scope="module")
def mix(demo_assets: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mix")
    return {n: make_adapter(demo_assets.base, root / n, seed=100 + i, **kw) for i, (n, kw) in enumerate(MIX.items())}


@pytest.fixture
def swapper(engine: Any, demo_config: Any, tmp_path: Path) -> Swapper:
    return Swapper(engine, demo_config.validation, History(str(tmp_path / "state")))


class LiveSnapshot:
    """Everything observable about the live slot, compared bitwise."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.version = engine.slots.live_version
        self.logits = engine.last_logits(PROMPTS)
        self.tensors = {k: tuple(t.clone() for t in v) for k, v in engine.slots.slot_tensors(engine.slots.live).items()}

    def assert_unchanged(self) -> None:
        e = self.engine
        assert e.slots.live_version == self.version
        assert torch.equal(e.last_logits(PROMPTS), self.logits)
        now = e.slots.slot_tensors(e.slots.live)
        assert all(torch.equal(a, b) for k in self.tensors for a, b in zip(now[k], self.tensors[k], strict=True))


class FailingWeights(dict):
    """Loaded weights whose n-th module raises when the stage copies it: a failure mid-copy."""

    def __init__(self, weights: dict, fail_at: int) -> None:
        super().__init__(weights)
        self.fail_at, self.reads = fail_at, 0

    def __getitem__(self, key: str) -> Any:
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError("injected: device copy failed")
        return super().__getitem__(key)


def _inject(monkeypatch: pytest.MonkeyPatch, engine: Any, phase: str, mix: dict[str, Path]) -> tuple[Path, str]:
    """Arrange for the next swap to fail in ``phase``; returns (candidate, expected result)."""
    import hotswap_core.swap as swap_module

    real_load = swap_module.load_adapter
    if phase == "validate":
        monkeypatch.setattr(swap_module, "inspect_adapter", _raiser(OSError("injected: disk error")))
    elif phase == "load":
        monkeypatch.setattr(swap_module, "load_adapter", _raiser(MemoryError("injected: out of host memory")))
    elif phase == "stage":
        monkeypatch.setattr(swap_module, "load_adapter", lambda *a, **k: FailingWeights(real_load(*a, **k), 9))
    elif phase == "verify":
        monkeypatch.setattr(engine, "probe", lambda prompts, slot: [("garbage", False)] * len(prompts))
        return mix["m_r8"], "rejected"
    elif phase == "commit":
        monkeypatch.setattr(engine.slots, "flip", _raiser(RuntimeError("injected: flip failed")))
    return mix["m_r8"], "failed"


def _raiser(exc: BaseException) -> Any:
    def fail(*_a: Any, **_k: Any) -> Any:
        raise exc

    return fail


@pytest.mark.parametrize("phase", ["validate", "load", "stage", "verify", "commit"])
def test_failure_in_any_phase_leaves_live_bitwise_untouched(
    phase: str, engine: Any, swapper: Swapper, mix: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert swapper.swap(mix["m_r4_sub"]).result in ("success", "unchanged")
    before = LiveSnapshot(engine)
    candidate, expected = _inject(monkeypatch, engine, phase, mix)
    record = swapper.swap(candidate)
    assert record.result == expected, record
    assert record.reason and record.message
    before.assert_unchanged()
    monkeypatch.undo()
    # The next valid swap works, and serves the new version.
    assert swapper.swap(mix["m_rslora"]).result == "success"
    assert engine.generate(["Hello =>"])[0].adapter.version == "m_rslora"


@pytest.mark.parametrize(
    "reason", ["shape_mismatch", "non_finite", "truncated", "pickle_refused", "rank_exceeds_target"]
)
def test_broken_demo_adapters_are_rejected_without_touching_live(
    reason: str, engine: Any, swapper: Swapper, demo_assets: Any, mix: dict[str, Path]
) -> None:
    assert swapper.swap(mix["m_r1"]).result in ("success", "unchanged")
    before = LiveSnapshot(engine)
    record = swapper.swap(demo_assets.broken[reason])
    assert (record.result, record.reason) == ("rejected", reason)
    assert str(demo_assets.broken[reason]) in swapper.history.rejected
    before.assert_unchanged()


def test_overflowing_adapter_is_caught_by_verify(
    engine: Any, swapper: Swapper, demo_assets: Any, tmp_path: Path
) -> None:
    """Finite weights, non-finite logits: only the smoke prompts on standby can catch this one."""
    huge = make_adapter(demo_assets.base, tmp_path / "huge", r=8, alpha=8, targets=ALL, std=1e18)
    before = LiveSnapshot(engine)
    record = swapper.swap(huge)
    assert (record.result, record.reason) == ("rejected", "non_finite")
    assert "verify" in record.phases
    before.assert_unchanged()


def test_rollback_flips_back_and_restages_when_standby_was_overwritten(
    engine: Any, swapper: Swapper, mix: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert swapper.swap(mix["m_r4_sub"]).result in ("success", "unchanged")
    for name in ("m_r1", "m_r8"):
        assert swapper.swap(mix[name]).result == "success"
    rec = swapper.rollback()
    assert (rec.result, rec.version) == ("rolled_back", "m_r1")
    assert "load" not in rec.phases  # standby still held m_r1: a flip, nothing re-read
    assert engine.generate(["x =>"])[0].adapter.version == "m_r1"

    assert swapper.swap(mix["m_r2_mlp"]).result == "success"
    import hotswap_core.swap as swap_module

    real_load = swap_module.load_adapter
    monkeypatch.setattr(swap_module, "load_adapter", lambda *a, **k: FailingWeights(real_load(*a, **k), 3))
    assert swapper.swap(mix["m_pattern"]).result == "failed"  # standby now dirty (half-staged)
    monkeypatch.undo()
    assert engine.slots.contents[engine.slots.standby] is None
    reference = LiveSnapshot(engine)
    rec = swapper.rollback()
    assert (rec.result, rec.version) == ("rolled_back", "m_r1")
    assert "stage" in rec.phases  # re-staged from its recorded files
    assert swapper.history.live.version == "m_r1"
    assert not torch.equal(engine.last_logits(PROMPTS), reference.logits)


def test_the_record_lands_with_the_chain_before_the_save(
    swapper: Swapper, mix: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reader that sees the new live version in the chain also sees the swap that made it live:
    the save (a disk write, slow on a busy disk) comes after both, not between them."""
    history, seen = swapper.history, []
    real_save = history.save

    def save() -> bool:
        seen.append((history.live.version, [(r.version, r.result) for r in history.recent(1)]))
        return real_save()

    monkeypatch.setattr(history, "save", save)
    assert swapper.swap(mix["m_r1"]).result in ("success", "unchanged")
    assert swapper.swap(mix["m_r8"]).result == "success"
    assert seen[-1] == ("m_r8", [("m_r8", "success")])
    back = swapper.rollback()  # to m_r1, or to what was live before if m_r1 already was
    assert back.result == "rolled_back"
    assert seen[-1] == (back.version, [(back.version, "rolled_back")])


def test_fifty_swaps_under_load_no_recompilation_no_torn_response(
    engine: Any, swapper: Swapper, mix: dict[str, Path]
) -> None:
    prompts = ["Hello =>", "ab", "x" * 40, "The quick brown fox jumps =>", "q" * 120, "Zürich =>"]
    params = SamplingParams(max_tokens=6)
    reference: dict[str, dict[str, str]] = {}
    for adapter in mix.values():
        assert swapper.swap(adapter).result in ("success", "unchanged")
        reference[adapter.name] = {p: engine.generate([p], params)[0].text for p in prompts}
    assert len({tuple(v.values()) for v in reference.values()}) == len(mix), "adapters must be distinguishable"

    rng = random.Random(0)
    order = [rng.choice(list(mix.values())) for _ in range(60)]
    done = threading.Event()
    records: list[Any] = []

    def producer() -> None:
        try:
            for adapter in order:
                records.append(swapper.swap(adapter))
        finally:
            done.set()

    torch.compiler.set_stance("fail_on_recompile")
    try:
        thread = threading.Thread(target=producer)
        thread.start()
        results = []
        while not done.is_set() or len(results) < 60:
            batch = rng.sample(prompts, rng.randint(1, len(prompts)))
            futures = [engine.submit(GenerationRequest(p, params)) for p in batch]
            results += [(p, f.result(60)) for p, f in zip(batch, futures, strict=True)]
        thread.join()
    finally:
        torch.compiler.set_stance("default")

    assert sum(r.result == "success" for r in records) >= 50
    assert engine.recompilations == 0
    versions = {res.adapter.version for _p, res in results}
    assert len(versions) >= 3, "requests should have been served by several versions during the storm"
    torn = [(p, res.adapter.version, res.text) for p, res in results if res.text != reference[res.adapter.version][p]]
    assert torn == []


def test_a_swap_loads_checks_and_stages_at_one_thread(
    swapper: Swapper, mix: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A swap's tensor work runs off the engine's thread, so it must not start an OpenMP team there
    (``cpu_threads.serial``): the adapter's load and finite checks, and the staging copies, see one thread."""
    import hotswap_core.swap as swap_module

    counts: list[tuple[str, int]] = []
    load, stage = swap_module.load_adapter, type(swapper.engine.slots).stage

    def counted_load(*args: Any, **kwargs: Any) -> Any:
        counts.append(("load", torch.get_num_threads()))
        return load(*args, **kwargs)

    def counted_stage(slots: Any, *args: Any, **kwargs: Any) -> None:
        counts.append(("stage", torch.get_num_threads()))
        stage(slots, *args, **kwargs)

    monkeypatch.setattr(swap_module, "load_adapter", counted_load)
    monkeypatch.setattr(type(swapper.engine.slots), "stage", counted_stage)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        target = "m_r4_sub" if swapper.live.version != "m_r4_sub" else "m_r1"
        assert swapper.swap(mix[target]).result == "success"
        assert counts == [("load", 1), ("stage", 1)]
        assert torch.get_num_threads() == 2  # the calling thread's count, put back
    finally:
        torch.set_num_threads(before)
