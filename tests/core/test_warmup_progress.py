"""The warm-up's estimate of the time left: built from the steps that compiled, not from the mean step."""

from __future__ import annotations

import dataclasses

from hotswap_core.config import Config
from hotswap_core.engine import Engine, WarmupStep

BATCHES, LENGTHS = (1, 2, 8), (2, 3, 128, 252)
PLAN = [(s, b, n) for s in (0, 1) for b in BATCHES for n in LENGTHS]


def _engine(demo_config: Config, dynamic: bool | None = True) -> Engine:
    compile_cfg = dataclasses.replace(demo_config.model.compile, dynamic=dynamic)
    return Engine(dataclasses.replace(demo_config, model=dataclasses.replace(demo_config.model, compile=compile_cfg)))


def test_no_estimate_before_a_compiling_step_is_done(demo_config: Config) -> None:
    assert _engine(demo_config)._eta(PLAN, [], set()) is None
    assert _engine(demo_config)._eta(PLAN[2:], [(0.01, False), (0.01, False)], {1}) is None


def test_estimate_counts_the_compiles_still_to_come(demo_config: Config) -> None:
    """As measured on a cold cache (2 cores): step 1 compiled for 54 s, batch 2's first step for 50 s,
    everything else took milliseconds. After step 1 the estimate must be about one more compile, not
    23 x 54 s (what the mean step time gave: "about 1233s left")."""
    eta = _engine(demo_config)._eta(PLAN[1:], [(54.0, True)], {1})
    assert eta is not None and 50 < eta < 60
    # After batch 2 compiled, nothing compiles any more: batch 8 and slot 2 reuse the symbolic graphs.
    took = [(54.0, True), (0.01, False), (0.01, False), (0.02, False), (50.0, True)]
    eta = _engine(demo_config)._eta(PLAN[5:], took, {1, 2})
    assert eta is not None and eta < 1.0
    # Without dynamic shapes, every shape on slot 1 compiles: 7 steps left there, at 52 s each.
    eta = _engine(demo_config, dynamic=False)._eta(PLAN[5:], took, {1, 2})
    assert eta is not None and 7 * 50 < eta < 7 * 55


def test_step_describes_itself() -> None:
    step = WarmupStep(k=3, total=24, slot=0, batch=2, length=128, elapsed_s=1.0, eta_s=None)
    assert step.describe() == "step 3/24: slot 1/2, batch 2, prompt length 128"
