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
    # The serving engine's figures, per model (--tiny: the demo model only).
    "head_of_line": {"demo/alone", "demo/behind_long"},
    "ttft_under_load": {"demo/alone", "demo/8_clients_mixed"},
    "commit_to_live_under_load_seconds": {"demo/commit", "demo/decode_step", "demo/stage",
                                          "demo/swap_answered_to_completion"},
    "sampling_cost": {
        "demo/temperature_0", "demo/temperature_1", "demo/temperature_1_top_p_top_k", "demo/temperature_0_logprobs_5"
    },
    "vs_transformers_generate": {"demo/hotswapd_8_clients", "demo/transformers_generate_batch_8"},
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
                    "5. throughput", "6. start-up", "7. arrival lag", "8. head-of-line", "9. time to first token",
                    "10. commit -> live", "11. sampling cost", "12. mixed workload vs transformers"):  # fmt: skip
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


def test_the_geometry_model_has_qwen25_15b_shapes_and_serves_text(tmp_path: Path) -> None:
    """The bench's realistic-geometry model: Qwen2.5-1.5B's widths, heads and vocabulary over 2 layers, built
    locally, loadable by transformers, and greedy text from it is never empty (the smoke prompts need text)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hotswapd.bench.geometry import LAYERS, QWEN25_15B, build_geometry_model
    from hotswapd.demo import build_demo

    demo = build_demo(tmp_path / "demo")
    folder = build_geometry_model(tmp_path / "geometry", demo.base)
    config = json.loads((folder / "config.json").read_text())
    shapes = {k: v for k, v in QWEN25_15B.items() if k != "rope_theta"}  # transformers 5: under rope_parameters
    assert {k: config[k] for k in shapes} == shapes and config["num_hidden_layers"] == LAYERS == 2
    assert config["rope_parameters"]["rope_theta"] == QWEN25_15B["rope_theta"]
    assert build_geometry_model(tmp_path / "geometry", demo.base) == folder  # complete: reused, not rebuilt
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.get_output_embeddings().weight.shape == (151936, 1536)
    ids = torch.tensor([tokenizer.encode("Hello =>", add_special_tokens=False)])
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
