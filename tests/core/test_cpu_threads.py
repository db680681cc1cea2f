"""``model.cpu_threads``: how many intra-op threads the engine's CPU kernels get, set before anything compiles."""

from __future__ import annotations

from collections.abc import Iterator
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
