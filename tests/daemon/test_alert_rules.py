"""The example alert rules in configs/ (shown in the README) fire when they should: ``promtool test rules``.
The fleet rules (per cohort) too, and the Kubernetes PrometheusRule carries exactly both files' groups."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

import yaml

CONFIGS = Path(__file__).parents[2] / "configs"
RULES = CONFIGS / "hotswapd-alerts.yml"
FLEET_RULES = CONFIGS / "hotswapd-fleet-alerts.yml"
PROMETHEUS_RULE = CONFIGS / "kubernetes" / "prometheusrule.yaml"
README = Path(__file__).parents[2] / "README.md"


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def test_rules_are_valid_and_shown_verbatim_in_the_readme() -> None:
    out = _promtool("check", "rules", str(RULES))
    assert out.returncode == 0 and "SUCCESS: 3 rules found" in out.stdout, out.stdout + out.stderr
    assert RULES.read_text().strip() in README.read_text()


def _expect(alert: str, value: float = 0, rules: Path = RULES, **labels: str) -> dict[str, object]:
    """An expected alert, its annotations rendered from the rules file (promtool compares them too)."""
    (rule,) = [r for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if r["alert"] == alert]
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
    _test_rules(RULES, cases, tmp_path)


def _test_rules(rules: Path, cases: Mapping[str, object], tmp_path: Path) -> None:
    spec = tmp_path / "test.yml"
    spec.write_text(yaml.safe_dump({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [cases]}))
    out = _promtool("test", "rules", str(spec))
    assert out.returncode == 0 and "SUCCESS" in out.stdout, out.stdout + out.stderr


def test_fleet_rules_are_valid_and_every_one_is_tested() -> None:
    out = _promtool("check", "rules", str(FLEET_RULES))
    assert out.returncode == 0 and "SUCCESS: 4 rules found" in out.stdout, out.stdout + out.stderr
    alerts = {r["alert"] for g in yaml.safe_load(FLEET_RULES.read_text())["groups"] for r in g["rules"]}
    assert alerts == set(FLEET_ALERTS)


def _fleet(alert: str, value: float = 0, **labels: str) -> dict[str, object]:
    return _expect(alert, value, FLEET_RULES, **labels)


FLEET_ALERTS = (
    "HotswapdCohortVersionSplit",
    "HotswapdCohortHeadRejected",
    "HotswapdCohortHeadPending",
    "HotswapdReplicaDown",
)


def _head(cohort: str, instance: str, version: str, state: str) -> str:
    return (
        f'hotswapd_source_head_info{{cohort="{cohort}", instance="{instance}", version="{version}", state="{state}"}}'
    )


def test_fleet_rules_fire_on_split_cohorts_rejected_or_stuck_heads_and_down_replicas(tmp_path: Path) -> None:
    split, rejected, pending, down = FLEET_ALERTS
    info = "hotswapd_adapter_info"
    bad, new, old = "acme/a@bad", "acme/a@new", "acme/a@old"
    cases = {
        "interval": "1m",
        "input_series": [
            # stable: a rollout (c reaches v1 at minute 3, under the 5m of HotswapdCohortVersionSplit);
            # canary: d on v2 and e on v1 for 20 minutes, a split that fires.
            {"series": f'{info}{{cohort="stable", instance="a", version="v1"}}', "values": "1x20"},
            {"series": f'{info}{{cohort="stable", instance="b", version="v1"}}', "values": "1x20"},
            {"series": f'{info}{{cohort="stable", instance="c", version="v0"}}', "values": "1 1 1 stale"},
            {"series": f'{info}{{cohort="stable", instance="c", version="v1"}}', "values": "_ _ _ 1x17"},
            {"series": f'{info}{{cohort="canary", instance="d", version="v2"}}', "values": "1x20"},
            {"series": f'{info}{{cohort="canary", instance="e", version="v1"}}', "values": "1x20"},
            # canary d rejects the head from minute 2; e had rolled back from an older head (no alert for that).
            {"series": _head("canary", "d", bad, "rejected"), "values": "_ _ 1x18"},
            {"series": _head("canary", "e", old, "rolled_back"), "values": "1x20"},
            # stable: the head is live on a; b stays pending on it for 20 minutes, c for 10, then live.
            {"series": _head("stable", "a", new, "live"), "values": "1x20"},
            {"series": _head("stable", "b", new, "pending"), "values": "1x20"},
            {"series": _head("stable", "c", new, "pending"), "values": "1x9 stale"},
            {"series": _head("stable", "c", new, "live"), "values": "_x10 1x10"},
            # Scrapes: e (PodMonitor job) down from minute 2, p (plain scrape config job) from the start;
            # a node exporter down is not hotswapd's to report.
            {"series": 'up{job="hotswapd/hotswapd", cohort="stable", instance="a"}', "values": "1x20"},
            {"series": 'up{job="hotswapd/hotswapd", cohort="canary", instance="e"}', "values": "1 1 0x18"},
            {"series": 'up{job="hotswapd", cohort="stable", instance="p"}', "values": "0x20"},
            {"series": 'up{job="node", instance="n"}', "values": "0x20"},
        ],
        "alert_rule_test": [
            {"eval_time": "4m", "alertname": split, "exp_alerts": []},
            {"eval_time": "6m", "alertname": split, "exp_alerts": [_fleet(split, 2, cohort="canary")]},
            {"eval_time": "2m", "alertname": rejected, "exp_alerts": []},
            {"eval_time": "4m", "alertname": rejected,
             "exp_alerts": [_fleet(rejected, 1, cohort="canary", version=bad)]},
            {"eval_time": "14m", "alertname": pending, "exp_alerts": []},
            {"eval_time": "16m", "alertname": pending,
             "exp_alerts": [_fleet(pending, 1, cohort="stable", version=new)]},
            {"eval_time": "4m", "alertname": down, "exp_alerts": []},
            {"eval_time": "8m", "alertname": down, "exp_alerts": [
                _fleet(down, 0, job="hotswapd/hotswapd", cohort="canary", instance="e"),
                _fleet(down, 0, job="hotswapd", cohort="stable", instance="p"),
            ]},
        ],
    }  # fmt: skip
    _test_rules(FLEET_RULES, cases, tmp_path)


def test_the_kubernetes_prometheus_rule_carries_both_rule_files() -> None:
    """configs/kubernetes/prometheusrule.yaml is a copy: it must not drift from the files promtool tests."""
    groups = [g for f in (RULES, FLEET_RULES) for g in yaml.safe_load(f.read_text())["groups"]]
    (rule,) = [d for d in yaml.safe_load_all(PROMETHEUS_RULE.read_text()) if d]
    assert rule["kind"] == "PrometheusRule" and rule["spec"]["groups"] == groups
