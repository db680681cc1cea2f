"""A fleet on one machine: N ``hotswapd run`` replicas, each following one branch (its cohort) of a Hub repo,
and ``hotswapd bench --fleet``: how long a promotion takes to be live on every replica.

The Hub is the local stand-in (``hotswapd.bench.fakehub``); a promotion is what README "Running a fleet"
tells a release pipeline to do with the real ``huggingface_hub`` client: ``delete_branch`` then
``create_branch(revision=sha)``. Convergence is measured from just before the branch moved (so the moment a
replica's poll finds no branch at all is included) to the latest swap record's ``finished_at`` on any replica.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hotswap_core.sources.hub import ALLOW_PATTERNS
from hotswapd.bench.daemon import DaemonRun
from hotswapd.bench.errors import BenchError
from hotswapd.bench.fakehub import FakeHub
from hotswapd.bench.stats import ratio, summarize
from hotswapd.client import Client

REPO = "hotswapd/fleet-adapter"
_WATCH_S = 0.05  # pause between looks at the replicas while waiting for a version
_START_TIMEOUT_S = 900.0  # the first replica may compile cold: minutes on 2 CPU cores
DEFAULT_REPLICAS = (("stable-0", "stable"), ("stable-1", "stable"), ("canary-0", "canary"))


def adapter_files(folder: Path, revision: str | None = None) -> dict[str, bytes]:
    """The files of an adapter folder that the Hub source downloads, as a Hub commit. ``revision`` is written into
    the config so that every commit is a distinct adapter (the daemon does not swap in content equal to the live
    one)."""
    files = {name: (folder / name).read_bytes() for name in ALLOW_PATTERNS if (folder / name).is_file()}
    if revision is not None:
        config = json.loads(files["adapter_config.json"])
        files["adapter_config.json"] = json.dumps({**config, "revision": revision}, indent=2).encode()
    return files


def promote(endpoint: str, repo_id: str, branch: str, sha: str) -> None:
    """Move ``branch`` to ``sha`` as a pipeline would with ``huggingface_hub``: delete it, create it at ``sha``."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token="hf_fleet_bench")  # the stand-in takes any token
    api.delete_branch(repo_id, branch=branch)
    api.create_branch(repo_id, branch=branch, revision=sha)


@dataclass
class Replica:
    name: str
    cohort: str  # also the Hub branch it follows
    run: DaemonRun

    @property
    def client(self) -> Client:
        return self.run.client

    @property
    def metrics_address(self) -> str:
        """``host:port`` of its metrics listener (``metrics.listen: 127.0.0.1:0``: read from its log)."""
        found = re.search(r"metrics on http://([^/\s]+)", self.run.log_path.read_text(errors="replace"))
        if not found:
            raise BenchError(f"{self.name} logged no metrics address ({self.run.log_path})")
        return found[1]

    def live(self) -> str:
        return str(self.client.get("/v1/adapters")["live"]["version"])

    def went_live_at(self, version: str) -> float | None:
        """``finished_at`` of the newest successful swap to ``version`` in ``GET /v1/adapters``, if any."""
        adapters = self.client.get("/v1/adapters")
        if adapters["live"]["version"] != version:
            return None
        times = [r["finished_at"] for r in adapters["history"] if r["version"] == version and r["result"] == "success"]
        return max(times) if times else None


class Fleet:
    """``replicas`` (name, cohort) of ``hotswapd run`` on ``raw_config`` (the model, adapter and validation
    sections of a hotswapd config), each following branch ``cohort`` of ``repo_id`` on ``endpoint``."""

    def __init__(
        self,
        raw_config: dict[str, Any],
        work: Path,
        sock_dir: Path,
        endpoint: str,
        repo_id: str = REPO,
        replicas: Sequence[tuple[str, str]] = DEFAULT_REPLICAS,
        poll_seconds: float = 5.0,
        poll_jitter: float = 0.1,
        cache_dir: Path | None = None,
        start_timeout: float = _START_TIMEOUT_S,
    ) -> None:
        self.raw, self.work, self.sock_dir = raw_config, work, sock_dir
        self.endpoint, self.repo_id = endpoint, repo_id
        self.poll_seconds, self.poll_jitter = poll_seconds, poll_jitter
        self.cache_dir = cache_dir or Path(raw_config["model"]["compile"].get("cache_dir") or work / "inductor")
        self.start_timeout = start_timeout
        self.spec = list(replicas)
        self.replicas: dict[str, Replica] = {}

    def __enter__(self) -> Fleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def config(self, name: str, cohort: str) -> Path:
        """The config replica ``name`` runs: its own socket, state and metrics port; its cohort's branch."""
        home = self.work / name
        home.mkdir(parents=True, exist_ok=True)
        raw = json.loads(json.dumps(self.raw))  # a deep copy
        raw["model"]["compile"]["cache_dir"] = str(self.cache_dir)
        raw["adapter"] = {**raw.get("adapter", {}), "initial": None}
        hub = {"repo_id": self.repo_id, "revision": cohort, "endpoint": self.endpoint,
               "poll_seconds": self.poll_seconds, "poll_jitter": self.poll_jitter}  # fmt: skip
        raw["source"] = {"kind": "hub", "hub": hub}
        raw["server"] = {**raw.get("server", {}), "socket": str(self.sock_dir / f"{name}.sock")}
        raw["metrics"] = {"enabled": True, "listen": "127.0.0.1:0"}
        raw["state_dir"] = str(home / "state")
        path = home / "hotswapd.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    def start(self) -> None:
        """Start the first replica alone (it may compile cold and fill the cache), then the rest together."""
        first, *rest = self.spec
        for group in ([first], rest):
            for name, cohort in group:
                config = self.config(name, cohort)
                run = DaemonRun(config, self.sock_dir / f"{name}.sock", config.parent / "hotswapd.log", self.cache_dir)
                self.replicas[name] = Replica(name, cohort, run)
            for name, _ in group:
                self.replicas[name].run.wait_ready(self.start_timeout)

    def stop(self) -> list[int]:
        """SIGTERM every replica; their exit codes."""
        codes = []
        for replica in self.replicas.values():
            replica.run.stop()
            codes.append(replica.run.proc.returncode)
        return codes

    def cohort(self, cohort: str) -> list[Replica]:
        return [r for r in self.replicas.values() if r.cohort == cohort]

    def live(self) -> dict[str, str]:
        return {name: r.live() for name, r in self.replicas.items()}

    def version(self, sha: str) -> str:
        """The version name a replica gives the commit ``sha`` of this fleet's repo."""
        return f"{self.repo_id}@{sha}"

    def wait_live(self, replicas: Iterable[Replica], version: str, timeout: float) -> dict[str, float]:
        """Wait until each of ``replicas`` serves ``version``; replica name -> its swap's ``finished_at``."""
        pending = {r.name: r for r in replicas}
        done: dict[str, float] = {}
        deadline = time.monotonic() + timeout
        while pending:
            for name, replica in list(pending.items()):
                at = replica.went_live_at(version)
                if at is not None:
                    done[name] = at
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise BenchError(f"{version} not live on {sorted(pending)} after {timeout:g}s (live: {self.live()})")
            if pending:
                time.sleep(_WATCH_S)
        return done


@dataclass
class Promotion:
    sha: str
    moved_at: float  # time.time() just before delete_branch
    live_at: dict[str, float]  # replica -> swap finished_at

    @property
    def converged(self) -> float:
        """Seconds from the branch move to live on every replica."""
        return max(self.live_at.values()) - self.moved_at


def promotions(
    fleet: Fleet,
    hub: FakeHub,
    adapters: Sequence[Path],
    count: int,
    branch: str = "stable",
    say: Callable[[str], None] = lambda line: None,
    rng: random.Random | None = None,
) -> list[Promotion]:
    """``count`` promotions of ``branch``: each a new commit (pushed to ``release-<n>``, a branch no replica
    follows), then ``branch`` moved to it; waits for every replica of the cohort. Between promotions a
    random pause of up to one poll period, so promotions land at every phase of the replicas' polls."""
    rng = rng or random.Random(0)
    cohort = fleet.cohort(branch)
    timeout = 10 * fleet.poll_seconds + 60
    done: list[Promotion] = []
    for n in range(count):
        sha = hub.commit(fleet.repo_id, f"release-{n:03d}", adapter_files(adapters[n % len(adapters)], f"r{n:03d}"))
        moved = time.time()
        promote(hub.url, fleet.repo_id, branch, sha)
        live = fleet.wait_live(cohort, fleet.version(sha), timeout)
        done.append(Promotion(sha, moved, live))
        say(f"promotion {n + 1}/{count}: {sha[:10]} live on {len(live)} replicas in {done[-1].converged:.2f} s")
        time.sleep(rng.uniform(0, fleet.poll_seconds))
    return done


def report(done: Sequence[Promotion], poll_seconds: float, replicas: int) -> dict[str, Any]:
    """The ``fleet_convergence`` section: contenders, ratios and targets like the other bench sections."""
    converged = [p.converged for p in done]
    each = [at - p.moved_at for p in done for at in p.live_at.values()]
    c = {"all_replicas": summarize(converged), "each_replica": summarize(each)}
    limit = 1.2 * poll_seconds + 1.0
    p99 = c["all_replicas"]["p99"]
    return {
        "contenders": c,
        "poll_seconds": poll_seconds,
        "replicas": replicas,
        "promotions": len(done),
        "ratios": {
            "all_replicas_p50/poll_seconds": ratio(c["all_replicas"]["median"], poll_seconds),
            "all_replicas_p99/poll_seconds": ratio(p99, poll_seconds),
            "each_replica_p50/poll_seconds": ratio(c["each_replica"]["median"], poll_seconds),
        },
        "targets": [
            {
                "target": f"p99 <= 1.2 x poll_seconds + 1 s = {limit:.1f} s (branch moved -> live on all replicas)",
                "measured": p99,
                "met": bool(p99 <= limit),
            }
        ],
        "notes": "a promotion is delete_branch + create_branch(revision=sha) with huggingface_hub on a local Hub "
        "stand-in; live = the latest replica's swap record finished_at (GET /v1/adapters); polls jittered "
        "+-poll_jitter; a random pause of up to poll_seconds between promotions",
    }


def render(section: dict[str, Any]) -> str:
    c = section["contenders"]
    lines = [
        f"fleet convergence: {section['replicas']} replicas, {section['promotions']} promotions, "
        f"poll_seconds {section['poll_seconds']:g}",
        f"  {'':<44}{'p50':>9}{'p99':>9}{'p50/poll':>10}{'p99/poll':>10}",
    ]
    labels = {
        "all_replicas": "branch moved -> live on every replica",
        "each_replica": "branch moved -> live, per replica",
    }
    for key, label in labels.items():
        s = c[key]
        lines.append(
            f"  {label:<44}{s['median']:>8.2f}s{s['p99']:>8.2f}s"
            f"{s['median'] / section['poll_seconds']:>9.2f}x{s['p99'] / section['poll_seconds']:>9.2f}x"
        )
    for t in section["targets"]:
        lines.append(f"  target: {t['target']}: {t['measured']:.2f} s {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines)


def run_fleet_bench(
    model: str = "demo",
    replicas: int = 3,
    count: int = 10,
    poll_seconds: float = 5.0,
    workdir: Path | None = None,
    say: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """``hotswapd bench --fleet``: ``replicas`` replicas on branch ``stable``, ``count`` promotions.
    Returns ``{"fleet_convergence": ..., "table": ...}``."""
    from hotswap_core.config import load_config
    from hotswap_core.layout import layout_from_config
    from hotswapd.bench.adapters import write_pool
    from hotswapd.bench.runner import BenchConfig, _Run

    if replicas < 1 or count < 1 or poll_seconds <= 0:
        raise BenchError("--replicas and --promotions must be >= 1 and --poll-seconds > 0")
    started = time.perf_counter()
    work = workdir or Path(tempfile.mkdtemp(prefix="hotswapd-fleet-"))
    sock_dir = Path(tempfile.mkdtemp(prefix="hsf-", dir="/tmp"))  # AF_UNIX paths: < 108 bytes
    try:
        base = _Run(BenchConfig(model=model), work, sock_dir, say)
        raw = base._base_config()
        compiled = raw["model"]["compile"]
        if not compiled.get("cache_dir") or not Path(compiled["cache_dir"]).is_absolute():  # the demo's is relative
            compiled["cache_dir"] = str(work / "inductor")
        layout = layout_from_config(load_config(base._write(raw, "layout.yaml")))
        pool = [p for _, p in write_pool(layout, work / "adapters", 4, base_model=str(raw["model"]["path"]))]
        with FakeHub() as hub:
            hub.commit(REPO, "stable", adapter_files(pool[0], "initial"))
            spec = [(f"stable-{i}", "stable") for i in range(replicas)]
            fleet = Fleet(raw, work / "fleet", sock_dir, hub.url, replicas=spec, poll_seconds=poll_seconds)
            say(f"starting {replicas} replicas on branch stable (the first may compile cold)")
            with fleet:
                say(f"{count} promotions of stable, each delete_branch + create_branch")
                done = promotions(fleet, hub, pool[1:], count, say=say)
        section = report(done, poll_seconds, replicas)
        section["seconds"] = time.perf_counter() - started
        return {"fleet_convergence": section, "table": render(section)}
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
        if workdir is None:
            shutil.rmtree(work, ignore_errors=True)
