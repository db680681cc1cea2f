"""The Grafana dashboard (configs/grafana/hotswapd.json), offline: it imports (datasource and variables as Grafana
expects), every query filters on the ``cohort`` and ``instance`` variables, names only metrics a real
``Metrics()`` registry exports, parses (``promtool check rules``) and answers with data from a synthetic fleet
built from that registry's own exposition (``promtool test rules``). tests/daemon/test_fleet.py runs the same
queries against a real fleet."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry

from hotswap_core.metrics import Metrics

from .grafana import DASHBOARD, load, panels, queries

DATASOURCE = "${datasource}"
FILTERS = ('cohort=~"$cohort"', 'instance=~"$instance"')
# A selector of one of hotswapd's metrics, with its matchers if it has any.
SELECTOR = re.compile(r"\b(hotswapd_[a-z_]+)\b(\{[^}]*\})?")
REPLICAS = (("stable", "stable-0:9464"), ("stable", "stable-1:9464"), ("canary", "canary-0:9464"))


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed (Debian package prometheus; .ci/system-packages)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load(DASHBOARD)


def _targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(p, t) for p in panels(dashboard) for t in p.get("targets", [])]


def _fresh_fleet_registry() -> CollectorRegistry:
    """A replica's registry as a freshly started daemon has it after serving one completion, and no swap yet."""
    m = Metrics()
    m.set_live("v0", "0" * 64, "hub")
    m.build_info.labels("0.1.0", "2.6", "5.0", "0.21", "cpu", "3.11").set(1)
    m.watch_source_head(lambda: ("adapters@v0", "live"))
    m.watch_source("hub", ("poll",))
    m.source_events.labels("hub", "poll").inc()
    m.hub_polls.labels("unchanged").inc()
    m.requests.labels("completions", "200").inc()
    m.request_duration.labels("completions").observe(0.2)
    m.ttft.observe(0.02)
    m.generated_tokens.inc(8)
    m.batch_size.observe(1)
    return m.registry


def _exported_names(registry: CollectorRegistry) -> set[str]:
    """Every series name the registry exports: its samples', and those its families' types imply (a labelled
    metric with no child yet has no sample)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
    names = set()
    for family in registry.collect():
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in suffixes.get(family.type, ("",))}
    return names


def test_dashboard_is_importable(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "hotswapd" and dashboard["title"] == "hotswapd fleet"
    assert dashboard["tags"] and 36 <= dashboard["schemaVersion"] <= 41
    assert "id" not in dashboard or dashboard["id"] is None  # an import creates it
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for name, query in (
        ("cohort", "label_values(hotswapd_adapter_info, cohort)"),
        ("instance", 'label_values(hotswapd_adapter_info{cohort=~"$cohort"}, instance)'),
    ):
        v = variables[name]
        assert v["type"] == "query" and v["multi"] and v["includeAll"], name
        assert v["datasource"]["uid"] == DATASOURCE and v["definition"] == query and v["query"]["query"] == query


def test_every_panel_has_an_id_a_place_and_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    every = list(panels(dashboard))
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids)), ids
    for p in every:
        assert {"h", "w", "x", "y"} <= set(p["gridPos"]) and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, p["title"]
        assert p["targets"] and p.get("description"), p["title"]
        for t in p["targets"]:
            assert t["datasource"] == {"type": "prometheus", "uid": DATASOURCE}, (p["title"], t["refId"])
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]


def test_every_selector_filters_on_cohort_and_instance(dashboard: dict[str, Any]) -> None:
    for p, t in _targets(dashboard):
        selectors = SELECTOR.findall(t["expr"])
        assert selectors, (p["title"], t["expr"])
        for name, matchers in selectors:
            assert all(f in matchers for f in FILTERS), (p["title"], name, t["expr"])


def test_every_metric_is_one_hotswapd_exports(dashboard: dict[str, Any]) -> None:
    exported = _exported_names(Metrics().registry)
    assert "hotswapd_request_duration_seconds_bucket" in exported and "hotswapd_recompilations_total" in exported
    used = {name for _, t in _targets(dashboard) for name, _ in SELECTOR.findall(t["expr"])}
    assert used - exported == set(), f"not exported by hotswap_core.metrics.Metrics: {sorted(used - exported)}"
    # The panels the dashboard promises, by the metric each rests on.
    for metric in (
        "hotswapd_adapter_info", "hotswapd_source_head_info", "hotswapd_swaps_total",
        "hotswapd_adapter_validation_failures_total", "hotswapd_swap_phase_duration_seconds_bucket",
        "hotswapd_swap_duration_seconds_bucket", "hotswapd_swap_stall_seconds_bucket", "hotswapd_requests_total",
        "hotswapd_request_duration_seconds_bucket", "hotswapd_time_to_first_token_seconds_bucket",
        "hotswapd_generated_tokens_total", "hotswapd_inflight_requests", "hotswapd_queue_depth",
        "hotswapd_kv_cache_usage_ratio", "hotswapd_hub_polls_total", "hotswapd_recompilations_total",
        "hotswapd_build_info", "hotswapd_time_per_output_token_seconds_bucket",
        "hotswapd_request_queue_time_seconds_bucket", "hotswapd_prompt_tokens_total", "hotswapd_running_rows",
        "hotswapd_completions_finished_total", "hotswapd_request_prompt_tokens_bucket",
        "hotswapd_request_generation_tokens_bucket",
    ):  # fmt: skip
        assert metric in used, metric


def test_queries_substitute_every_variable() -> None:
    found = queries(cohort="canary", instance="a|b", rate_interval="2m", interval="30s", time_range="1h")
    assert len(found) >= 20 and len({title for title, _ in found}) == len(found)
    for title, expr in found:
        assert "$" not in expr, (title, expr)
        assert 'cohort=~"canary"' in expr and 'instance=~"a|b"' in expr, (title, expr)
    assert any("[2m]" in expr for _, expr in found) and any("[1h]" in expr for _, expr in found)


def _rules(path: Path) -> list[tuple[str, str]]:
    found = queries(rate_interval="1m", interval="1m", time_range="5m")
    rules = [{"record": f"grafana:query_{i}", "expr": expr, "labels": {"panel": title}} for i, (title, expr) in
             enumerate(found)]  # fmt: skip
    path.write_text(yaml.safe_dump({"groups": [{"name": "grafana", "rules": rules}]}, sort_keys=False))
    return found


def test_every_query_parses(tmp_path: Path) -> None:
    rules = tmp_path / "dashboard.rules.yml"
    found = _rules(rules)
    out = _promtool("check", "rules", str(rules))
    assert out.returncode == 0 and f"SUCCESS: {len(found)} rules found" in out.stdout, out.stdout + out.stderr


def test_every_query_answers_for_a_fresh_fleet(tmp_path: Path) -> None:
    """Three replicas, 5 minutes, scraped every 15 s, each exporting what a real registry exports after one
    completion (counters growing by their value per scrape): every query returns at least one series, even where
    nothing failed and nothing was swapped (no 5xx series, swap histograms at 0)."""
    rules = tmp_path / "dashboard.rules.yml"
    found = _rules(rules)
    series = []
    for family in _fresh_fleet_registry().collect():
        for s in family.samples:
            growing = family.type in ("counter", "histogram") and not s.name.endswith("_created")
            labels = {**s.labels, "job": "hotswapd"}
            for cohort, instance in REPLICAS:
                matchers = ", ".join(
                    f'{k}="{v}"' for k, v in {**labels, "cohort": cohort, "instance": instance}.items()
                )
                values = f"0+{s.value:g}x20" if growing else f"{s.value:g}x20"
                series.append({"series": f"{s.name}{{{matchers}}}", "values": values})
    tests = {
        "rule_files": [rules.name],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": series,
                "promql_expr_test": [
                    {
                        "expr": f"(count({expr}) > bool 0) or vector(0)",
                        "eval_time": "4m",
                        "exp_samples": [{"labels": "{}", "value": 1}],
                    }
                    for _, expr in found
                ],
            }
        ],
    }
    spec = tmp_path / "dashboard.test.yml"
    spec.write_text(yaml.safe_dump(tests, sort_keys=False))
    out = _promtool("test", "rules", str(spec))
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
