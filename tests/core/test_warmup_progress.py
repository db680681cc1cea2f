"""Warm-up: what it compiles, and its estimate of the time left (built from the steps that compiled, not from
the mean step)."""

from __future__ import annotations

import json
import subprocess
import sys

from hotswap_core.warmup import WarmupStep, estimate, warmup_plan
from hotswapd.demo import DemoAssets

BATCHES, LENGTHS = (1, 2, 4, 8), (2, 3, 124, 252)
PLAN = [(b, n) for b in BATCHES for n in LENGTHS]


def test_the_plan_runs_every_decode_bucket_with_short_and_long_prompts_and_every_span() -> None:
    # 2 and 3 tokens decode at positions 2-5: span 64; 124 at 124-126: span 128; 252 at 252-254: span 256.
    assert warmup_plan(BATCHES, 256, (64, 128, 256)) == PLAN
    assert warmup_plan(BATCHES, 4096, (64, 128, 256, 512, 1024, 2048, 4096)) == [
        (b, n) for b in BATCHES for n in (2, 3, 124, 252, 508, 1020, 2044, 4092)
    ]
    assert warmup_plan(BATCHES, 256) == [(b, n) for b in BATCHES for n in (2, 3, 252)]
    assert warmup_plan((1,), 6, (6,)) == [(1, 2), (1, 3)]  # tiny contexts: no duplicate lengths


def test_no_estimate_before_a_compiling_step_is_done() -> None:
    assert estimate(PLAN, [], set(), dynamic=True) is None
    assert estimate(PLAN[2:], [(0.01, False), (0.01, False)], {1}, dynamic=True) is None


def test_estimate_counts_the_compiles_still_to_come() -> None:
    """Measured on a cold cache (2 cores): the first step of each batch size compiles (its decode graph, and
    prefill for batch 1 and 2), everything else takes milliseconds. After step 1 the estimate must be the
    three batch sizes still to come, not 15 x the first step (what the mean step time gave)."""
    eta = estimate(PLAN[1:], [(30.0, True)], {1}, dynamic=True)
    assert eta is not None and 3 * 29 < eta < 3 * 31
    # After batch 2 compiled, batches 4 and 8 still do, once each.
    took = [(30.0, True), (0.01, False), (0.01, False), (0.02, False), (20.0, True)]
    eta = estimate(PLAN[5:], took, {1, 2}, dynamic=True)
    assert eta is not None and 2 * 24 < eta < 2 * 26
    # Without dynamic shapes, every prefill shape compiles: every step left, at 25 s each.
    eta = estimate(PLAN[5:], took, {1, 2}, dynamic=False)
    assert eta is not None and 11 * 24 < eta < 11 * 26


def test_step_describes_itself() -> None:
    step = WarmupStep(k=3, total=16, batch=2, length=128, elapsed_s=1.0, eta_s=None)
    assert step.describe() == "step 3/16: batch 2, prompt length 128"


# In a process of its own: dynamo's counters are process-wide, and this session's engine has its own graphs.
_WARM_UP = """
import json, sys
import torch._dynamo.utils as du
from hotswap_core.config import load_config
from hotswap_core.engine import Engine, compiled_graph_count
engine = Engine(load_config(sys.argv[1]))
engine.load()
engine.warm_up()
print(json.dumps({"graphs": compiled_graph_count(), "buckets": list(engine.buckets),
                  "analyses": sorted(k for k in du.compilation_time_metrics if k.startswith("compile_attempt"))}))
"""


def test_warm_up_compiles_each_graph_once_and_restarts_no_analysis(demo_assets: DemoAssets) -> None:
    """Prefill for one row and for several (dynamo specialises a size-1 batch), the same for a prompt's later
    chunks (the demo prefills 64 tokens a step: its warm-up prompts of 124 and 252 tokens take several), decode
    once per bucket whatever its attention span: the
    cache's sizes must not become symbols a prompt length is equated with (a 2-token prompt on a model with 2 KV
    heads cost a graph), and the model's float constants must not be traced as symbols (dynamo restarted the
    prefill's analysis to specialise them). Each was seconds of every start-up, warm cache or not."""
    run = subprocess.run(
        [sys.executable, "-c", _WARM_UP, str(demo_assets.config)],  # the demo's own compile cache
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["graphs"] == 2 + 2 + len(got["buckets"]), got
    assert got["analyses"] == ["compile_attempt_0"], got
