"""``hotswapd bench`` end to end in its tiny configuration (no compile, a few turns each): the command
runs, prints its table, and writes JSON with every figure. Shape only, never speed."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ..conftest import run_cli

pytestmark = pytest.mark.slow

CONTENDERS = {
    "stall_seconds": {
        "hotswapd_commit", "hotswapd_commit_and_verify", "peft_hotswap_copy", "peft_hotswap_adapter",
        "peft_load_set_adapter", "restart_cold_cache", "restart_warm_cache",
    },
    "landed_to_live_seconds": {"isolated", "back_to_back"},
    "latency_under_swaps": {"steady", "swap_every_200ms"},
    "recompilations": {"hotswapd", "peft_hotswap_adapter", "peft_load_set_adapter"},
    "throughput_tokens_per_second": {
        "in_process", "daemon_1_client", "daemon_2_clients", "daemon_4_clients", "daemon_8_clients",
    },
    "startup_seconds": {"cold_cache", "warm_cache"},
    "arrival_lag": {"went_live", "newest_behind"},
}  # fmt: skip
PHASES = {"detect", "validate", "load", "stage", "verify", "commit"}


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def test_tiny_bench_writes_every_figure(tmp_path: Path, cli_env: dict[str, str]) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        run_cli("bench", "--tiny", "--json", str(out)), env=cli_env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for heading in ("1. serving stall", "2. landed -> live", "3. request latency", "4. graphs compiled",
                    "5. throughput", "6. start-up", "7. arrival lag"):  # fmt: skip
        assert heading in proc.stdout, proc.stdout

    figures = json.loads(out.read_text())
    assert list(figures) == [*CONTENDERS, "machine"]
    for section, names in CONTENDERS.items():
        body = figures[section]
        assert set(body["contenders"]) == names, section
        for name, stats in body["contenders"].items():
            assert _finite(stats["median"]) and _finite(stats["p99"]) and stats["n"] >= 1, (section, name, stats)
        assert body["ratios"] and all(_finite(r) for r in body["ratios"].values()), (section, body["ratios"])
        assert body["targets"], section
        for target in body["targets"]:
            assert target["target"] and isinstance(target["met"], bool) and _finite(target["measured"]), target

    for split in figures["landed_to_live_seconds"]["phases"].values():
        assert set(split) >= PHASES
    assert figures["recompilations"]["contenders"]["hotswapd"]["total"] == 0
    machine = figures["machine"]
    for key in ("cpu", "cores", "device", "torch", "transformers", "peft"):
        assert machine[key], key
    assert machine["bench"]["mode"] == "tiny"
