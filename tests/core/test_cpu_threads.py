"""``model.cpu_threads``: how many intra-op threads the engine's CPU kernels get, set before anything compiles."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from hotswap_core import cpu_threads
from hotswap_core.config import ConfigError, config_from_dict


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


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


def test_a_number_sets_the_process_count_and_auto_gives_torchs_back(restore_threads: None) -> None:
    assert cpu_threads.apply(1) == 1 == torch.get_num_threads()
    assert cpu_threads.apply(3) == 3 == torch.get_num_threads()
    # The bench loads several models in one process: auto restores what torch chose at start.
    assert cpu_threads.apply("auto") == cpu_threads.STARTUP_THREADS == torch.get_num_threads()


def test_the_engine_reports_the_count_it_compiled_with(engine: object) -> None:
    assert engine.runner.cpu_threads == cpu_threads.STARTUP_THREADS  # type: ignore[attr-defined]


def _native_threads() -> set[int]:
    """Threads of this process that Python did not start: OpenMP's team workers among them."""
    return {int(tid) for tid in os.listdir("/proc/self/task")} - {t.native_id for t in threading.enumerate()}


def _threads_started_by(work: Callable[[], None]) -> set[int]:
    """Native threads that appear when ``work`` runs on a thread that outlives it (as a swap's executor thread
    does) and end with that thread, as its OpenMP team does. A thread of anything else that happens to start
    meanwhile lives on, so it is not counted."""
    before = _native_threads()
    done, release = threading.Event(), threading.Event()

    def run() -> None:
        work()
        done.set()
        release.wait(30)

    helper = threading.Thread(target=run)
    helper.start()
    try:
        assert done.wait(30)
        appeared = _native_threads() - before
    finally:
        release.set()
        helper.join()
    deadline = time.monotonic() + 10.0  # the team's threads exit as their master does, a moment later
    while appeared & _native_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    return appeared - _native_threads()


def test_tensor_work_in_serial_starts_no_openmp_team_where_unguarded_work_does(restore_threads: None) -> None:
    """A second team in the process makes GNU OpenMP stop spinning in every team, the engine's too
    (``cpu_threads.py``): a swap's tensor work runs in ``serial()``, which starts none."""
    torch.set_num_threads(2)  # the count a new thread starts with: a team of 2 whatever the machine's cores
    n = 1 << 20  # far past at::parallel_for's grain of 32,768 elements
    counts: list[int] = []

    def copy() -> None:
        counts.append(torch.get_num_threads())
        torch.empty(n).copy_(torch.ones(n))

    def copy_in_serial() -> None:
        with cpu_threads.serial():
            copy()
        counts.append(torch.get_num_threads())  # put back on the way out

    assert len(_threads_started_by(copy)) >= 1  # unguarded: a team of its own (what the check below would see)
    assert _threads_started_by(copy_in_serial) == set()
    assert counts == [2, 1, 2]
