"""``hotswapd bench``: one run that measures hotswapd against the alternatives, contender by contender
in turns (A B A B ...), and returns the figures (JSON-able) with a rendered table.

Order matters and is fixed: restarts first (a cold start needs a fresh cache, and the last warm start
stays up as the daemon under test); then the in-process engine on the cache the cold start filled;
hotswapd's recompilation count; throughput, latency under swaps, landed -> live and the arrival lag under
sustained arrivals on the daemon; and
last the swap stalls, because the PEFT models compile into this process (dynamo's counters are
process-wide, and their graphs share code objects with the engine's).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import cycle
from pathlib import Path
from typing import Any, Literal

import yaml

from hotswap_core.config import Config
from hotswapd.bench import report, serving_report
from hotswapd.bench.adapters import write_pool
from hotswapd.bench.daemon import PROMPT, DaemonBench
from hotswapd.bench.generate import TransformersGenerate
from hotswapd.bench.inprocess import HotswapdInProcess, PeftCompiled, configure_dynamo, on_own_thread
from hotswapd.bench.serving import ModelFigures, Sizes, measure
from hotswapd.bench.stats import LoadWindow, closed_loop, interleave

Mode = Literal["full", "quick", "tiny"]
# A decode step of this model costs ~30x the demo's on 2 CPU cores: fewer samples, shorter mixed requests.
GEOMETRY = Sizes(rounds=2, short_requests=6, mixed_requests=16, mixed_window_s=30.0, swaps=6, sampling_window_s=4.0,
                 sampling_tokens=16, mixed_lengths=(4, 16, 32, 64))  # fmt: skip
ARRIVE_EVERY = 0.8  # arrival lag: versions land every 0.8 x settle_seconds, faster than they settle


@dataclass(frozen=True)
class BenchConfig:
    """How much of each comparison to run. ``preset`` gives the full, ``--quick`` and tiny (test) sizes."""

    model: str = "demo"  # "demo", a model folder or Hub id, or a hotswapd config file (.yaml)
    mode: Mode = "full"
    workdir: Path | None = None  # default: a temp dir, removed afterwards
    compile: bool = True  # tiny: off, so the test runs in seconds (same code paths, no inductor)
    restarts: int = 3  # per cache state (cold, warm)
    stall_swaps: int = 100  # per in-process contender
    load_set_swaps: int = 5  # load_adapter + set_adapter recompiles every time: fewer turns
    recompile_swaps: int = 250
    landed_swaps: int = 30  # per kind of arrival (isolated, back to back)
    arrival_seconds: float = 60.0  # arrival lag: a version every 0.8 x settle for this long
    load_clients: int = 2
    latency_rounds: int = 4
    latency_window_s: float = 4.0
    latency_max_tokens: int = 8
    throughput_rounds: int = 3
    throughput_window_s: float = 3.0
    throughput_max_tokens: int = 32
    concurrency: tuple[int, ...] = (1, 2, 4, 8)
    pool_size: int = 12
    settle_seconds: float | None = None  # None: the model config's source.directory.settle_seconds
    start_timeout_s: float = 900.0
    # The engine's figures (head-of-line, TTFT, commit -> live, sampling, vs generate()), on the demo model and,
    # with ``geometry``, on Qwen2.5-1.5B's geometry (``bench.geometry``: a step costs 30x the demo's, so fewer).
    serving: Sizes = field(default_factory=Sizes)
    geometry: bool = True
    geometry_serving: Sizes = field(default_factory=lambda: GEOMETRY)

    @classmethod
    def preset(cls, mode: Mode, **overrides: Any) -> BenchConfig:
        return cls(mode=mode, **{**_PRESETS[mode], **overrides})


_PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": dict(
        restarts=1, stall_swaps=30, load_set_swaps=2, recompile_swaps=150, landed_swaps=6, latency_rounds=4,
        latency_window_s=2.5, throughput_rounds=3, throughput_window_s=1.5, arrival_seconds=15.0,
        serving=Sizes(rounds=2, short_requests=6, mixed_requests=16, mixed_window_s=3.0, swaps=8,
                      sampling_window_s=1.5, sampling_tokens=32),
        geometry=False,  # its cold compile alone is 2.5 minutes on 2 cores: --quick --geometry adds it
        geometry_serving=Sizes(rounds=1, short_requests=4, mixed_requests=16, mixed_window_s=20.0, swaps=4,
                               sampling_window_s=3.0, sampling_tokens=8, mixed_lengths=(4, 16, 32, 64)),
    ),
    "tiny": dict(
        compile=False, restarts=1, stall_swaps=3, load_set_swaps=1, recompile_swaps=6, landed_swaps=1,
        latency_rounds=1, latency_window_s=0.5, throughput_rounds=1, throughput_window_s=0.3,
        throughput_max_tokens=4, concurrency=(1, 2, 4, 8), pool_size=4, settle_seconds=0.2, start_timeout_s=300.0,
        arrival_seconds=2.0, geometry=False,
        serving=Sizes(rounds=1, short_requests=2, mixed_requests=8, mixed_window_s=0.5, swaps=2, sampling_window_s=0.3,
                      sampling_tokens=4, long_tokens=24, mixed_lengths=(2, 4, 8)),
    ),
}  # fmt: skip


@dataclass
class BenchResult:
    figures: dict[str, Any]  # the JSON document: exactly report.SECTIONS as keys
    table: str

    def to_json(self) -> str:
        return json.dumps(report.finite_or_null(self.figures), indent=2)


def run_bench(config: BenchConfig, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Run every comparison of ``config``; ``progress`` gets one line per step (the CLI prints them)."""
    started = time.perf_counter()

    def say(line: str) -> None:
        if progress is not None:
            progress(f"[{time.perf_counter() - started:5.0f} s] {line}")

    load_before = os.getloadavg()
    work = config.workdir or Path(tempfile.mkdtemp(prefix="hotswapd-bench-"))
    sock_dir = Path(tempfile.mkdtemp(prefix="hsb-", dir="/tmp"))  # AF_UNIX paths: < 108 bytes
    run = _Run(config, work, sock_dir, say)
    try:
        figures = run.all()
    finally:
        run.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        if config.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    figures["machine"] = report.machine(
        run.device, run.dtype, config, time.perf_counter() - started, load_before, os.getloadavg()
    )
    return BenchResult(figures, report.render(figures))


class _Run:
    def __init__(self, config: BenchConfig, work: Path, sock_dir: Path, say: Callable[[str], None]) -> None:
        self.config, self.work, self.sock_dir, self.say = config, work, sock_dir, say
        self.daemon: DaemonBench | None = None
        self.inproc: HotswapdInProcess | None = None
        self.device, self.dtype = "?", "?"
        self.settle = 0.0

    def close(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
        if self.inproc is not None:
            self.inproc.stop()

    def all(self) -> dict[str, Any]:
        from hotswap_core.config import load_config
        from hotswap_core.layout import layout_from_config

        c, say = self.config, self.say
        raw = self._base_config()
        self.raw_model = raw["model"]
        probe = load_config(self._write(raw, "layout.yaml"))
        layout = layout_from_config(probe)
        pool = write_pool(layout, self.work / "adapters", c.pool_size, base_model=probe.model.path)
        paths = [p for _, p in pool]
        peft_paths = [p for r, p in pool if r.peft_hotswappable]
        raw["adapter"] = {**raw["adapter"], "initial": str(peft_paths[0])}

        say(f"restarts: {c.restarts} cold and {c.restarts} warm compile caches, to READY and first token")
        daemon = self.daemon = DaemonBench(raw, self.work / "daemon", self.sock_dir, c.start_timeout_s)
        restart = interleave(
            {
                "restart_cold_cache": (daemon.restart_turn(cold=True), c.restarts),
                "restart_warm_cache": (daemon.restart_turn(cold=False), c.restarts),
            }
        )  # the last turn is a warm start: that daemon stays up for the socket measurements
        assert daemon.warm_cache is not None
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(daemon.warm_cache)  # read by inductor on first use

        inproc_raw = {**raw, "model": {**raw["model"], "compile": {**raw["model"]["compile"]}}}
        inproc_raw["model"]["compile"]["cache_dir"] = str(daemon.warm_cache)
        inproc_raw["state_dir"] = str(self.work / "inprocess-state")
        inproc_config = load_config(self._write(inproc_raw, "inprocess.yaml"))
        say("in-process engine: load, compile (warm cache), warm up")
        hs = self.inproc = on_own_thread(lambda: HotswapdInProcess(inproc_config, self.work / "inprocess-state"))
        self.device, self.dtype = str(hs.engine.device), str(hs.engine.dtype).removeprefix("torch.")

        say(f"recompilations: {c.recompile_swaps} swaps of {len(pool)} mixed adapters, varied batches and lengths")
        recompiles = on_own_thread(lambda: hs.recompilations(pool, c.recompile_swaps))

        say("throughput: in-process vs the daemon over its socket, 1 to 8 clients")
        same = peft_paths[0]  # both serve the same adapter
        on_own_thread(lambda: hs.swap(same))
        daemon.swap(same)
        throughput = self._throughput(hs, daemon)

        say(f"latency under swaps: {c.load_clients} clients, steady vs a swap every 200 ms")
        latency, windows = self._latency(daemon, paths)

        say(f"landed -> live: {2 * c.landed_swaps} folders renamed into the watched folder")
        landed, phases = self._landed(daemon, paths)

        every = ARRIVE_EVERY * self.settle
        say(f"arrival lag: a version every {every * 1000:.0f} ms for {c.arrival_seconds:g} s, newest settled goes live")
        arrivals = daemon.arrivals(paths, every, c.arrival_seconds, timeout=60.0 + 4 * self.settle)

        label = "demo" if c.model == "demo" else Path(c.model).stem
        serving = {label: self._serving(daemon, c.serving, paths, str(probe.model.path))}
        daemon.stop()

        # The PEFT models compile into this process (their graphs would count as the engine's).
        stall, graphs = on_own_thread(lambda: self._stall(hs, inproc_config, peft_paths))
        stall.update(restart)
        if c.geometry:
            serving.update(self._geometry(raw, probe.model.path))
        return {
            "stall_seconds": report.stall(stall),
            "landed_to_live_seconds": report.landed(landed, phases, self.settle),
            "latency_under_swaps": report.latency(latency, windows, c),
            "recompilations": report.recompilations(recompiles, graphs),
            "throughput_tokens_per_second": report.throughput(throughput, c),
            "startup_seconds": report.startup(daemon.ready_seconds, restart),
            "arrival_lag": report.arrival_lag(arrivals, self.settle, ARRIVE_EVERY, c.arrival_seconds),
            **serving_report.sections(serving),
        }

    def _serving(self, daemon: DaemonBench, sizes: Sizes, paths: list[Path], model_path: str) -> ModelFigures:
        max_seq_len = int(self.raw_model["max_seq_len"])

        def generate(cpu_linear: str) -> TransformersGenerate:
            threads = self.raw_model.get("cpu_threads", "auto")
            return TransformersGenerate(
                model_path, paths[0], self.dtype, self.device, max_seq_len, self.config.compile, cpu_linear, threads
            )

        return measure(daemon, sizes, paths, generate, self.say)

    def _geometry(self, raw: dict[str, Any], demo_base: str) -> dict[str, ModelFigures]:
        """The serving figures again on Qwen2.5-1.5B's geometry (2 layers), with its own daemon and adapters."""
        from hotswap_core.config import load_config
        from hotswap_core.layout import layout_from_config
        from hotswapd.bench.geometry import MODEL_NAME, build_geometry_model

        self.say(f"building {MODEL_NAME} (Qwen2.5-1.5B's shapes, 2 layers, random weights)")
        folder = build_geometry_model(self.work / MODEL_NAME, Path(demo_base))
        geo = {**raw, "model": {**raw["model"], "path": str(folder)}}
        layout = layout_from_config(load_config(self._write(geo, "geometry.yaml")))
        paths = [p for _, p in write_pool(layout, self.work / "geometry-adapters", 4, base_model=str(folder))]
        geo["adapter"] = {**geo["adapter"], "initial": str(paths[0])}
        self.say(f"{MODEL_NAME}: hotswapd run (cold compile cache)")
        daemon = DaemonBench(geo, self.work / "geometry-daemon", self.sock_dir, self.config.start_timeout_s)
        try:
            daemon.restart_turn(cold=True)()
            return {MODEL_NAME: self._serving(daemon, self.config.geometry_serving, paths, str(folder))}
        finally:
            daemon.stop()

    def _stall(
        self, hs: HotswapdInProcess, config: Config, peft_paths: list[Path]
    ) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        """hotswapd's commit vs PEFT's ways, in turns; (stall samples, graphs compiled per PEFT swap)."""
        c = self.config
        self.say("stall: compiling PEFT models (hotswap_adapter-prepared, and plain for load_adapter+set_adapter)")
        configure_dynamo(config)
        hs.swap(peft_paths[0])
        prepared = PeftCompiled(config, hs.engine, peft_paths[0], prepare_for_hotswap=True)
        plain = PeftCompiled(config, hs.engine, peft_paths[0], prepare_for_hotswap=False)
        turns = peft_paths[1:] + peft_paths[:1]  # every turn changes the adapter
        self.say(f"stall: {c.stall_swaps} swaps per contender, {c.load_set_swaps} load_adapter+set_adapter")
        stall = interleave(
            {
                "hotswapd_commit": (hs.stall_turn(turns), c.stall_swaps),
                "peft_hotswap_copy": (prepared.hotswap_turn(turns, preloaded=True), c.stall_swaps),
                "peft_hotswap_adapter": (prepared.hotswap_turn(turns, preloaded=False), c.stall_swaps),
                "peft_load_set_adapter": (plain.load_set_turn(turns), c.load_set_swaps),
            }
        )
        stall["hotswapd_commit_and_verify"] = hs.commit_and_verify
        return stall, {"peft_hotswap_adapter": prepared.graphs_per_swap, "peft_load_set_adapter": plain.graphs_per_swap}

    def _latency(
        self, daemon: DaemonBench, paths: list[Path]
    ) -> tuple[dict[str, list[float]], dict[str, list[LoadWindow]]]:
        c = self.config
        windows: dict[str, list[LoadWindow]] = {"steady": [], "swap_every_200ms": []}

        def turn(name: str, swap_paths: list[Path] | None) -> Callable[[], list[float]]:
            def run() -> list[float]:
                w = daemon.latency_window(c.load_clients, c.latency_window_s, c.latency_max_tokens, swap_paths)
                windows[name].append(w)
                return w.latencies

            return run

        samples = interleave(
            {
                "steady": (turn("steady", None), c.latency_rounds),
                "swap_every_200ms": (turn("swap_every_200ms", paths), c.latency_rounds),
            }
        )
        return samples, windows

    def _throughput(self, hs: HotswapdInProcess, daemon: DaemonBench) -> dict[str, list[float]]:
        c = self.config
        window, max_tokens = c.throughput_window_s, c.throughput_max_tokens
        hs.generate(PROMPT, max_tokens)  # untimed: first call of each path
        daemon.tokens(max_tokens)()

        def inproc() -> float:
            return closed_loop(lambda: hs.generate(PROMPT, max_tokens), 1, window).tokens_per_second

        def over_socket(clients: int) -> Callable[[], float]:
            return lambda: closed_loop(daemon.tokens(max_tokens), clients, window).tokens_per_second

        turns: dict[str, tuple[Callable[[], float], int]] = {"in_process": (inproc, c.throughput_rounds)}
        for n in c.concurrency:
            turns[report.clients_key(n)] = (over_socket(n), c.throughput_rounds)
        return interleave(turns)

    def _landed(
        self, daemon: DaemonBench, paths: list[Path]
    ) -> tuple[dict[str, list[float]], dict[str, dict[str, list[float]]]]:
        """Folders renamed into the watched folder, in turns: isolated arrivals, and back-to-back ones
        (each right after the previous went live)."""
        live = daemon.client.get("/v1/adapters")["live"]["version"]
        order = cycle([p for p in paths if p.name != live])  # content equal to the live one is "unchanged"
        timeout = 60.0 + 4 * self.settle
        phases: dict[str, dict[str, list[float]]] = {"isolated": {}, "back_to_back": {}}
        count = 0

        def turn(kind: str) -> Callable[[], float]:
            def run() -> float:
                nonlocal count
                count += 1
                if kind == "isolated":
                    # The source looks at most every settle_seconds / 2: an arrival this long after the
                    # last look (typical: adapters land minutes apart) is looked at at once.
                    time.sleep(self.settle)
                seconds, split = daemon.landed_to_live(next(order), f"landed-{count:03d}", timeout)
                for phase, value in [*split.items(), ("other", seconds - sum(split.values()))]:
                    phases[kind].setdefault(phase, []).append(value)
                return seconds

            return run

        n = self.config.landed_swaps
        samples = interleave({"isolated": (turn("isolated"), n), "back_to_back": (turn("back_to_back"), n)})
        return samples, phases

    # ---- the config the daemon and the in-process engine share --------------------------------------
    def _base_config(self) -> dict[str, Any]:
        from hotswapd.demo import CONFIG_YAML

        model = self.config.model
        if model == "demo":
            from hotswapd.demo import build_demo

            self.say("building the demo model and adapters")
            assets = build_demo(self.work / "demo")
            raw = yaml.safe_load(CONFIG_YAML)
            raw["model"]["path"] = str(assets.base)
        elif model.endswith((".yaml", ".yml")):
            from hotswap_core.config import load_config

            user = load_config(model)  # relative paths resolved against the file
            raw = {k: _plain(getattr(user, k)) for k in ("model", "adapter", "validation")}
            raw["source"] = {"kind": "directory", "directory": _plain(user.source.directory)}
        else:
            raw = yaml.safe_load(CONFIG_YAML)  # the demo's serving settings, on this model
            raw["model"].update(path=model, dtype="auto")
        raw["model"]["compile"]["enabled"] = bool(raw["model"]["compile"]["enabled"] and self.config.compile)
        if self.config.settle_seconds is not None:
            raw["source"]["directory"]["settle_seconds"] = self.config.settle_seconds
        self.settle = float(raw["source"]["directory"]["settle_seconds"])
        raw["adapter"].pop("initial", None)
        raw.pop("state_dir", None)
        raw["server"] = {"socket": str(self.sock_dir / "unused.sock")}
        return raw

    def _write(self, raw: dict[str, Any], name: str) -> Path:
        path = self.work / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({**raw, "state_dir": raw.get("state_dir", str(self.work / "state"))}))
        return path


def _plain(obj: Any) -> Any:
    """A config dataclass as YAML-safe plain data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(obj)))
