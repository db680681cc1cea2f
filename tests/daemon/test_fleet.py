"""A fleet on one machine: 3 real ``hotswapd run`` replicas (2 ``stable``, 1 ``canary``) following two branches of
one local Hub stand-in, scraped every second by one real Prometheus with both alert rule files loaded.

The rollout of README "Running a fleet", step by step, each step seen through Prometheus's query API:
a good commit pushed to ``canary`` goes live on the canary replica only; a broken one is rejected there while
it keeps serving; ``stable`` moved to the canary commit (``huggingface_hub``'s delete_branch + create_branch)
makes every replica converge; moved back, the stable cohort rolls back. Clients keep calling every replica
all along and none of their requests fails. Then every README gate query and every Grafana dashboard query
returns data, every alert rule evaluates, and a few promotions are timed as ``hotswapd bench --fleet`` does.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import HfApi

from hotswapd.bench.fakehub import FakeHub
from hotswapd.bench.fleet import REPO, Fleet, Replica, adapter_files, promote, promotions, report
from hotswapd.client import ClientError
from hotswapd.demo import DemoAssets

from .grafana import queries
from .harness import wait_until, write_config
from .prometheus import Prometheus

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
RULE_FILES = (ROOT / "configs" / "hotswapd-alerts.yml", ROOT / "configs" / "hotswapd-fleet-alerts.yml")
POLL_S = 1.0
STEP_TIMEOUT_S = 60.0  # a step is a poll (about 1 s), a download, validation and a swap, on 2 busy cores

# The gates README "Running a fleet" tells an operator to check before promoting (verbatim: the test reads them
# from the README too). Each must answer with data while the canary serves a new version.
GATES = {
    "rollout": "count by (cohort, version) (hotswapd_adapter_info)",
    "rejections": 'sum(increase(hotswapd_swaps_total{cohort="canary", result=~"rejected|failed"}[10m])) or vector(0)',
    "head_not_live": 'count(hotswapd_source_head_info{cohort="canary", state!="live"}) or vector(0)',
    "error_ratio": (
        '1 - sum by (cohort) (rate(hotswapd_requests_total{endpoint=~"completions|chat_completions", code!~"5.."}[5m]))'
        ' / sum by (cohort) (rate(hotswapd_requests_total{endpoint=~"completions|chat_completions"}[5m]))'
    ),
    "p99_ratio_by_version": (
        "histogram_quantile(0.99, sum by (le, version) ("
        'rate(hotswapd_request_duration_seconds_bucket{endpoint="completions"}[5m])'
        " * on (instance) group_left (version) hotswapd_adapter_info))"
        " / scalar(histogram_quantile(0.99, sum by (le) ("
        'rate(hotswapd_request_duration_seconds_bucket{cohort="stable", endpoint="completions"}[5m]))))'
    ),
}

pytestmark = pytest.mark.slow


def say(line: str) -> None:
    print(f"[fleet] {line}", file=sys.__stderr__, flush=True)


@dataclass
class Callers:
    """One client thread per replica, a completion every 0.1 s; every answer and failure is kept."""

    fleet: Fleet
    answers: list[tuple[str, str]] = field(default_factory=list)  # (replica, version that answered)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for replica in self.fleet.replicas.values():
            thread = threading.Thread(target=self._loop, args=(replica,), daemon=True)
            thread.start()
            self.threads.append(thread)

    def _loop(self, replica: Replica) -> None:
        body = {"prompt": "Hello =>", "max_tokens": 4, "temperature": 0}
        while not self.stop.wait(0.1):
            try:
                answer = replica.client.post("/v1/completions", body)
                self.answers.append((replica.name, answer["adapter"]["version"]))
            except (ClientError, OSError) as exc:
                self.failures.append(f"{replica.name}: {exc}")

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)


@dataclass
class World:
    hub: FakeHub
    fleet: Fleet
    prom: Prometheus
    callers: Callers
    first: str  # the sha both branches start at


@pytest.fixture(scope="module")
def world(demo_assets: DemoAssets) -> Iterator[World]:
    with FakeHub() as hub, tempfile.TemporaryDirectory(prefix="hs-fleet-", dir="/tmp") as d:
        work = Path(d)
        first = hub.commit(REPO, "stable", adapter_files(demo_assets.alpha, "v0"))
        HfApi(endpoint=hub.url, token="hf_test").create_branch(REPO, branch="canary", revision=first)
        raw = yaml.safe_load(write_config(demo_assets, work, work / "unused.sock").read_text())
        fleet = Fleet(raw, work / "replicas", work, hub.url, poll_seconds=POLL_S)
        say("starting 3 replicas (2 stable, 1 canary)")
        fleet.start()
        prom: Prometheus | None = None
        callers = Callers(fleet)
        try:
            targets = [(r.metrics_address, {"cohort": r.cohort, "replica": r.name}) for r in fleet.replicas.values()]
            prom = Prometheus(work / "prometheus", targets, RULE_FILES)
            callers.start()
            yield World(hub, fleet, prom, callers, first)
        finally:
            callers.join()
            codes = fleet.stop()
            if prom is not None:
                assert prom.stop() == 0, prom.log_path.read_text()[-3000:]
            for replica in fleet.replicas.values():
                print(f"--- {replica.name}\n{replica.run.log_path.read_text(errors='replace')[-2000:]}")
            assert codes == [0, 0, 0], codes


def _live_by_replica(prom: Prometheus) -> dict[str, str]:
    return {r["metric"]["replica"]: r["metric"]["version"] for r in prom.query("hotswapd_adapter_info")}


def test_fakehub_moves_branches_with_the_real_client() -> None:
    with FakeHub() as hub:
        a = hub.commit(REPO, "main", {"x": b"1"})
        b = hub.commit(REPO, "canary", {"x": b"2"})
        api = HfApi(endpoint=hub.url, token="hf_test")
        api.create_branch(REPO, branch="stable", revision=a)
        with pytest.raises(Exception, match="409"):
            api.create_branch(REPO, branch="stable", revision=b)
        promote(hub.url, REPO, "stable", b)
        assert api.model_info(REPO, revision="stable").sha == b == hub.head(REPO, "stable")
        refs = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO).branches}
        assert refs == {"main": a, "canary": b, "stable": b}
        with pytest.raises(Exception, match="404"):
            api.delete_branch(REPO, branch="nope")


def test_a_canary_rollout_promotion_and_fleet_rollback_seen_through_prometheus(
    world: World, demo_assets: DemoAssets
) -> None:
    hub, fleet, prom = world.hub, world.fleet, world.prom
    v = fleet.version
    prom.wait(f'count(hotswapd_adapter_info{{version="{v(world.first)}"}}) == 3', STEP_TIMEOUT_S, "3 replicas on v0")
    say(f"all 3 replicas live on {world.first[:10]} (PromQL)")

    # 1. A good commit on canary: the canary replica swaps, the stable ones do not.
    good = hub.commit(REPO, "canary", adapter_files(demo_assets.bravo, "v1"))
    prom.wait(f'hotswapd_adapter_info{{cohort="canary", version="{v(good)}"}}', STEP_TIMEOUT_S, "canary on v1")
    polls = prom.values('sum by (replica) (hotswapd_hub_polls_total{cohort="stable"})', "replica")
    prom.wait(  # the stable replicas looked at their branch twice more since: still v0
        " and ".join(f'sum(hotswapd_hub_polls_total{{replica="{r}"}}) >= {n + 2}' for r, n in polls.items()),
        STEP_TIMEOUT_S,
        "two more polls on each stable replica",
    )
    assert _live_by_replica(prom) == {"stable-0": v(world.first), "stable-1": v(world.first), "canary-0": v(good)}
    say(f"canary live on {good[:10]}, stable still on {world.first[:10]}")
    gates = {name: prom.query(expr) for name, expr in GATES.items()}
    assert all(gates.values()), {k: q for k, q in gates.items() if not q}
    assert float(gates["rejections"][0]["value"][1]) == 0 and float(gates["head_not_live"][0]["value"][1]) == 0
    assert {r["metric"]["cohort"]: float(r["value"][1]) for r in gates["error_ratio"]} == {"stable": 0, "canary": 0}
    assert {r["metric"]["version"] for r in gates["p99_ratio_by_version"]} == {v(world.first), v(good)}
    say("gates: 0 rejections, head live, error ratio 0, p99 ratio by version answered")

    # 2. A broken commit on canary: rejected there, the canary replica keeps serving v1.
    broken = hub.commit(REPO, "canary", adapter_files(demo_assets.broken["non_finite"]))
    head = prom.wait(
        f'hotswapd_source_head_info{{cohort="canary", version="{v(broken)}", state="rejected"}}',
        STEP_TIMEOUT_S,
        "the canary replica to report its branch head rejected",
    )
    assert len(head) == 1
    assert _live_by_replica(prom)["canary-0"] == v(good)
    assert fleet.replicas["canary-0"].client.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2})["adapter"][
        "version"
    ] == v(good)
    assert float(prom.query(GATES["rejections"])[0]["value"][1]) >= 1
    assert float(prom.query(GATES["head_not_live"])[0]["value"][1]) == 1
    say(f"broken {broken[:10]} rejected on canary, which still serves {good[:10]}")

    # 3. Promote: stable moved to the good canary commit; every replica converges on it.
    promote(hub.url, REPO, "stable", good)
    prom.wait(f'count(hotswapd_adapter_info{{version="{v(good)}"}}) == 3', STEP_TIMEOUT_S, "all 3 on v1")
    say(f"stable moved to {good[:10]}: all 3 replicas converged")

    # 4. Roll the fleet back: stable moved back to v0.
    promote(hub.url, REPO, "stable", world.first)
    prom.wait(
        f'count(hotswapd_adapter_info{{cohort="stable", version="{v(world.first)}"}}) == 2',
        STEP_TIMEOUT_S,
        "both stable replicas back on v0",
    )
    assert _live_by_replica(prom) == {"stable-0": v(world.first), "stable-1": v(world.first), "canary-0": v(good)}
    say(f"stable moved back: the stable cohort rolled back to {world.first[:10]}")

    answered = {version for _, version in world.callers.answers}
    assert {v(world.first), v(good)} <= answered and v(broken) not in answered
    assert world.callers.failures == [], world.callers.failures[:5]
    say(f"{len(world.callers.answers)} completions from the client loops, 0 failed")
    for replica in fleet.replicas.values():  # a poll is one log line at most, not one per HTTP request
        assert "HTTP Request:" not in replica.run.log_path.read_text(errors="replace"), replica.name


def test_the_readme_gives_the_gate_queries_verbatim() -> None:
    text = README.read_text()
    missing = [name for name, expr in GATES.items() if expr not in text]
    assert not missing, f"README 'Running a fleet' does not show these gate queries verbatim: {missing}"


def test_every_dashboard_query_returns_data_from_the_fleet(world: World) -> None:
    found = queries(rate_interval="5m", interval="1m")
    assert len(found) >= 15
    answers = {title: world.prom.query(expr) for title, expr in found}
    empty = [title for title, result in answers.items() if not result]
    assert not empty, empty
    # A quantile over a window with no observations is NaN: data, but nothing to see. After the rollout every
    # panel has something to show.
    blank = [title for title, result in answers.items() if not any(math.isfinite(float(r["value"][1])) for r in result)]
    assert not blank, blank
    say(f"{len(found)} dashboard queries, each answered with a number")


def test_every_alert_rule_loads_and_evaluates_against_the_fleet(world: World) -> None:
    groups = world.prom.api("rules", type="alert")["groups"]
    expected = {
        rule["alert"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"] if "alert" in rule
    }  # fmt: skip
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == expected
    wait_until(lambda: all(r.get("lastEvaluation", "").startswith("20") for r in rules_now(world)), 30, "evaluations")
    bad = {name: r.get("lastError") for name, r in ((r["name"], r) for r in rules_now(world)) if r["health"] != "ok"}
    assert not bad, bad
    firing = {r["name"] for r in rules_now(world) if r["state"] == "firing"}
    assert not firing & {"HotswapdReplicaDown", "HotswapdCohortVersionSplit"}, firing
    say(f"{len(rules)} alert rules loaded, each evaluated with health ok")


def rules_now(world: World) -> list[dict[str, Any]]:
    return [rule for group in world.prom.api("rules", type="alert")["groups"] for rule in group["rules"]]


def test_promotions_converge_within_the_fleet_target(world: World, demo_assets: DemoAssets) -> None:
    """What ``hotswapd bench --fleet`` measures, on this fleet's stable cohort: a few promotions."""
    pool = [demo_assets.alpha, demo_assets.bravo]
    done = promotions(world.fleet, world.hub, pool, 3, say=say)
    section = report(done, POLL_S, len(world.fleet.cohort("stable")))
    assert section["promotions"] == 3 and section["contenders"]["all_replicas"]["n"] == 3
    assert all(len(p.live_at) == 2 for p in done)
    assert all(0 < p.converged < STEP_TIMEOUT_S for p in done), [p.converged for p in done]
    json.dumps(section)  # JSON-able, as --json writes it
    say(f"3 promotions: p50 {section['contenders']['all_replicas']['median']:.2f} s at poll_seconds {POLL_S:g}")


def test_bench_fleet_cli_writes_its_json(demo_assets: DemoAssets, cli_env: dict[str, str]) -> None:
    """``hotswapd bench --fleet`` itself, small: 1 replica, 2 promotions, on the test's warm compile cache."""
    with tempfile.TemporaryDirectory(prefix="hs-bf-", dir="/tmp") as d:
        work = Path(d)
        config = write_config(demo_assets, work, work / "unused.sock")
        out = work / "fleet.json"
        argv = [sys.executable, "-m", "hotswapd.cli", "bench", "--fleet", "--model", str(config), "--replicas", "1",
                "--promotions", "2", "--poll-seconds", "0.5", "--json", str(out)]  # fmt: skip
        done = subprocess.run(argv, capture_output=True, text=True, env=cli_env, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        section = json.loads(out.read_text())["fleet_convergence"]
        assert section["promotions"] == 2 and section["replicas"] == 1
        assert set(section) >= {"contenders", "ratios", "targets"}
        assert re.search(r"fleet convergence: 1 replicas, 2 promotions", done.stdout), done.stdout
