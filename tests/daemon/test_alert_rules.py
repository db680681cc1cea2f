"""The example alert rules in configs/ (shown in the README) fire when they should: ``promtool test rules``."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).parents[2] / "configs" / "hotswapd-alerts.yml"
README = Path(__file__).parents[2] / "README.md"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_rules_are_valid_and_shown_verbatim_in_the_readme() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0 and "SUCCESS: 3 rules found" in out.stdout, out.stdout + out.stderr
    assert RULES.read_text().strip() in README.read_text()


def _expect(alert: str, value: float = 0, **labels: str) -> dict[str, object]:
    """An expected alert, its annotations rendered from the rules file (promtool compares them too)."""
    (rule,) = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if r["alert"] == alert]
    annotations = {}
    for key, template in rule.get("annotations", {}).items():
        for name, v in labels.items():
            template = template.replace("{{ $labels." + name + " }}", v)
        annotations[key] = template.replace("{{ $value }}", f"{value:g}")
    return {"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}


def test_rules_fire_on_rejections_stuck_swaps_and_recompilations(tmp_path: Path) -> None:
    hour = 60  # samples, one per minute
    rejected, stuck = "HotswapdAdapterRejected", "HotswapdNoSuccessfulSwap"
    cases = {
        "interval": "1m",
        "input_series": [
            # instance a: one rejection at minute 2, recompiles at minute 3.
            {"series": 'hotswapd_swaps_total{instance="a", result="rejected"}', "values": "0 0 1 1 1"},
            {"series": 'hotswapd_swaps_total{instance="a", result="success"}', "values": "1 1 1 1 1"},
            {"series": 'hotswapd_recompilations_total{instance="a"}', "values": "0 0 0 2 2"},
            # instance b: a rejection every minute for 7 h, no success; instance c: the same, one success at 5 h.
            {"series": 'hotswapd_swaps_total{instance="b", result="rejected"}', "values": f"0+1x{7 * hour}"},
            {"series": 'hotswapd_swaps_total{instance="b", result="success"}', "values": f"3x{7 * hour}"},
            {"series": 'hotswapd_swaps_total{instance="c", result="rejected"}', "values": f"0+1x{7 * hour}"},
            {"series": 'hotswapd_swaps_total{instance="c", result="success"}', "values": f"3x{5 * hour} 4x{2 * hour}"},
            {"series": 'hotswapd_recompilations_total{instance="b"}', "values": f"0x{7 * hour}"},
        ],
        "alert_rule_test": [
            {"eval_time": "3m", "alertname": rejected,
             "exp_alerts": [_expect(rejected, instance=i, result="rejected") for i in "abc"]},
            {"eval_time": "1m", "alertname": "HotswapdRecompiled", "exp_alerts": []},
            {"eval_time": "4m", "alertname": "HotswapdRecompiled",
             "exp_alerts": [_expect("HotswapdRecompiled", 2, instance="a")]},
            {"eval_time": "10m", "alertname": stuck, "exp_alerts": [_expect(stuck, instance=i) for i in "abc"]},
            {"eval_time": "7h", "alertname": stuck, "exp_alerts": [_expect(stuck, instance="b")]},  # c had a success
        ],
    }  # fmt: skip
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": [cases]}))
    out = _promtool("test", "rules", str(spec))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr
