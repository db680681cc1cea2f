"""What a long ``model.max_seq_len`` costs short requests: decode steps of the Qwen2.5-1.5B-geometry model (2
layers) with 8 rows at positions 4 to 51, in process, with each context length given, in turns (A B A B ...).

A decode step attends to a span of the cache (``kv_cache.spans_for``), not to every position, so a step early in
its context costs the same whatever ``max_seq_len`` allows. Run it from a checkout::

    python -m hotswapd.bench.spans --contexts 512 4096 [--json spans.json]

It builds the demo assets and the geometry model in a temporary folder (or ``--work``), compiles one engine per
context (about a minute each on 2 cores, cold) and prints the median time per decode step of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROWS, PROMPT, TOKENS = 8, 4, 48


def _engine(model: Path, work: Path, max_seq_len: int) -> Any:
    from hotswap_core.config import load_config
    from hotswap_core.engine import Engine

    raw = {
        "model": {"path": str(model), "dtype": "float32", "max_batch_size": ROWS, "max_seq_len": max_seq_len,
                  "compile": {"cache_dir": str(work / "inductor")}},
        "source": {"kind": "directory", "directory": {"path": str(work / "adapters")}},
        "validation": {"smoke_prompts": []},
        "server": {"socket": str(work / f"unused-{max_seq_len}.sock")},
        "state_dir": str(work / f"state-{max_seq_len}"),
    }  # fmt: skip
    path = work / f"spans-{max_seq_len}.yaml"
    path.write_text(yaml.safe_dump(raw))
    engine = Engine(load_config(str(path)))
    engine.load()
    engine.start()
    return engine


def _round(engine: Any) -> float:
    """Seconds per decode step while ``ROWS`` rows decode ``TOKENS`` tokens after ``PROMPT``-token prompts."""
    from hotswap_core.generation import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True, temperature=0)
    steps, started = engine.steps, time.perf_counter()
    futures = [engine.submit(GenerationRequest([40 + i, *range(41, 40 + PROMPT)], params)) for i in range(ROWS)]
    for f in futures:
        f.result(600)
    return (time.perf_counter() - started) / (engine.steps - steps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hotswapd.bench.spans", description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096], help="model.max_seq_len values")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, help="where to build the models (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    from hotswapd.bench.geometry import MODEL_NAME, build_geometry_model
    from hotswapd.demo import build_demo

    with tempfile.TemporaryDirectory(prefix="hs-spans-") as tmp:
        work = (args.work or Path(tmp)).absolute()
        (work / "adapters").mkdir(parents=True, exist_ok=True)
        model = build_geometry_model(work / MODEL_NAME, build_demo(work / "demo").base)
        engines = {n: _engine(model, work, n) for n in args.contexts}
        try:
            for engine in engines.values():  # compile and warm each, outside the timed rounds
                _round(engine)
                _round(engine)
            times: dict[int, list[float]] = {n: [] for n in engines}
            for _ in range(args.rounds):
                for n, engine in engines.items():
                    times[n].append(_round(engine))
        finally:
            for engine in engines.values():
                engine.stop()
    first = args.contexts[0]
    figures = {
        "rows": ROWS, "positions": [PROMPT, PROMPT + TOKENS - 1], "model": MODEL_NAME,
        "step_ms": {str(n): {"median": statistics.median(t) * 1e3, "min": min(t) * 1e3} for n, t in times.items()},
        "ratios": {f"{n}/{first}": statistics.median(t) / statistics.median(times[first]) for n, t in times.items()},
    }  # fmt: skip
    for n, t in times.items():
        ratio = statistics.median(t) / statistics.median(times[first])
        print(f"max_seq_len {n:>6}: {statistics.median(t) * 1e3:.1f} ms per decode step (median of {len(t)}; "
              f"min {min(t) * 1e3:.1f}), {ratio:.2f}x max_seq_len {first}")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
