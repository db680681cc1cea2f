"""``model.cpu_threads``: how many intra-op threads the engine's CPU kernels get, chosen before anything compiles."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from hotswap_core import cpu_threads, prepack
from hotswap_core.config import ConfigError, config_from_dict

CPU = torch.device("cpu")


@pytest.fixture
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key in cpu_threads.ENV_OVERRIDES:
        monkeypatch.delenv(key, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _model(largest: int) -> nn.Module:
    """Linears whose largest weight has ``largest`` entries (one row by ``largest`` columns, on the meta device)."""
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(64, 64), nn.Linear(largest, 1, bias=False))


def _config(value: object) -> object:
    raw = {
        "model": {"path": "base", "cpu_threads": value},
        "adapter": {"target_modules": ["q_proj"]},
        "source": {"directory": {"path": "adapters"}},
        "state_dir": "state",
    }
    return config_from_dict(raw, Path("/srv")).model.cpu_threads  # type: ignore[attr-defined]


def test_auto_and_a_number_are_accepted_anything_else_is_named() -> None:
    assert _config("auto") == "auto"
    assert _config(3) == 3
    for bad, message in [
        ("many", r"model\.cpu_threads: expected 'auto' or an integer, got 'many'"),
        (2.5, r"model\.cpu_threads: expected 'auto' or an integer, got 2\.5"),
        (True, r"model\.cpu_threads: expected 'auto' or an integer, got True"),
        (0, r"model\.cpu_threads: must be 'auto' or >= 1, got 0"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _config(bad)


def test_auto_is_one_thread_below_the_packing_size_and_torchs_count_from_it(restore_threads: None) -> None:
    small, big = _model(prepack.MIN_WEIGHTS - 1), _model(prepack.MIN_WEIGHTS)
    threads, why = cpu_threads.choose("auto", small, CPU)
    assert threads == 1 and f"{prepack.MIN_WEIGHTS - 1:,} weights" in why
    assert cpu_threads.choose("auto", big, CPU)[0] is None  # torch's own count
    assert cpu_threads.choose(3, small, CPU) == (3, "model.cpu_threads")  # a number wins on any model


def test_auto_leaves_an_operators_omp_num_threads_and_cuda_alone(
    restore_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    small = _model(100)
    assert cpu_threads.choose("auto", small, torch.device("cuda")) == (None, "auto on cuda")
    assert cpu_threads.choose(2, small, torch.device("cuda"))[0] == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads.choose("auto", small, CPU) == (None, "auto: OMP_NUM_THREADS=2 set")


def test_apply_sets_the_process_count_and_restores_torchs_for_a_big_model(restore_threads: None) -> None:
    assert cpu_threads.apply("auto", _model(10), CPU) == 1 == torch.get_num_threads()
    assert cpu_threads.apply(3, _model(10), CPU) == 3 == torch.get_num_threads()
    # The bench loads several models in one process: a big one gets torch's count back.
    assert cpu_threads.apply("auto", _model(prepack.MIN_WEIGHTS), CPU) == cpu_threads.STARTUP_THREADS
    assert torch.get_num_threads() == cpu_threads.STARTUP_THREADS


def test_the_demo_engine_runs_on_one_thread(engine: object) -> None:
    """The demo's matrices are tiny (hidden 64): auto gave its compiled kernels one thread."""
    assert engine.runner.cpu_threads == 1  # type: ignore[attr-defined]
    assert cpu_threads.largest_linear(engine.runner.model) < prepack.MIN_WEIGHTS  # type: ignore[attr-defined]
