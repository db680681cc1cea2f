"""Long contexts on the Qwen2.5-1.5B-geometry model (2 layers), in process, engines in turns (A B A B ...):

- ``spans``: what a long ``model.max_seq_len`` costs short requests. Decode steps of 8 rows at positions 4 to
  51, with each context length given. A decode step attends to a span of the cache (``kv_cache.spans_for``), not
  to every position, so a step early in its context costs the same whatever ``max_seq_len`` allows.
- ``chunks``: what a long prompt costs the rows already generating. Two rows decode while 4 prompts of 480
  tokens arrive at once; with each ``model.prefill_chunk_tokens`` given (0: a prompt in one forward), the
  longest gap between two decode steps of the running rows meanwhile, and the long prompts' time to first token
  (median, first, last). ``--per-row`` adds, for each chunk size, an engine without the step's budget (every
  prompt a chunk every step, as before the budget: ``Engine.prefill_budget`` None).
- ``choices``: what a request's ``n`` choices cost. Two rows decode while one request with 4 choices of a
  480-token prompt arrives (its choices prefill the prompt once: ``scheduler.share_prompts``), against 4 requests
  of that prompt arriving at once (each prefills its own), on the same engine, for each ``prefill_chunk_tokens``
  given: the same figures as ``chunks``.

Run from a checkout::

    python -m hotswapd.bench.long_context spans --values 512 4096 [--json out.json]
    python -m hotswapd.bench.long_context chunks --values 0 128 [--per-row] [--json out.json]
    python -m hotswapd.bench.long_context choices --values 128 [--json out.json]

It builds the demo assets and the geometry model in a temporary folder (or ``--work``) and compiles one engine
per value (about a minute each on 2 cores, cold).
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

ROWS = 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _engine(model: Path, work: Path, name: str, max_seq_len: int, chunk: int | None) -> Any:
    from hotswap_core.config import load_config
    from hotswap_core.engine import Engine

    raw = {
        "model": {"path": str(model), "dtype": "float32", "max_batch_size": ROWS, "max_seq_len": max_seq_len,
                  "prefill_chunk_tokens": chunk, "compile": {"cache_dir": str(work / "inductor")}},
        "adapter": {"target_modules": TARGETS, "target_rank": 8, "initial": None},
        "source": {"kind": "directory", "directory": {"path": str(work / "adapters")}},
        "validation": {"smoke_prompts": []},
        "server": {"socket": str(work / f"unused-{name}.sock")},
        "state_dir": str(work / f"state-{name}"),
    }  # fmt: skip
    path = work / f"long-context-{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    engine = Engine(load_config(str(path)))
    engine.load()
    engine.start()
    return engine


def _params(tokens: int) -> Any:
    from hotswap_core.generation import SamplingParams

    return SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)


def _submit(engine: Any, prompt: list[int], tokens: int) -> Any:
    from hotswap_core.generation import GenerationRequest

    return engine.submit(GenerationRequest(prompt, _params(tokens)))


def _span_round(engine: Any) -> dict[str, float]:
    """Seconds per decode step while 8 rows decode 48 tokens after 4-token prompts."""
    steps, started = engine.steps, time.perf_counter()
    futures = [_submit(engine, [40 + i, 41, 42, 43], 48) for i in range(ROWS)]
    for f in futures:
        f.result(600)
    return {"step_s": (time.perf_counter() - started) / (engine.steps - steps)}


def _chunk_round(engine: Any, same_prompt: bool | None = None) -> dict[str, float]:
    """Two rows decode; 4 prompts of 480 tokens arrive: the longest gap between decode steps until their first
    tokens, the median gap, and their median time to first token. ``same_prompt``: one prompt 4 times, as the 4
    choices of one request (True) or as 4 requests (False)."""
    stamps: list[float] = []
    seen = threading.Event()

    def on_step(_rows: int) -> None:
        stamps.append(time.perf_counter())
        if len(stamps) >= 5:
            seen.set()

    engine.on_batch = on_step
    try:
        running = [_submit(engine, [40 + i, 41, 42, 43], 160) for i in range(2)]
        if not seen.wait(600):
            raise RuntimeError("the running rows did not decode")
        arrived = time.perf_counter()
        prompts = [[33 + ((0 if same_prompt is not None else i) + k) % 90 for k in range(480)] for i in range(4)]
        if same_prompt:
            from hotswap_core.generation import GenerationRequest

            longs = engine.submit_group([GenerationRequest(p, _params(4)) for p in prompts])
        else:
            longs = [_submit(engine, p, 4) for p in prompts]
        results = [f.result(600) for f in longs]
        first = arrived + max(r.time_to_first_token_s for r in results)
        for f in running:
            f.result(600)
    finally:
        engine.on_batch = None
    window = [b - a for a, b in itertools.pairwise(stamps) if b > arrived and a < first]
    ttfts = sorted(r.time_to_first_token_s for r in results)
    return {
        "max_gap_s": max(window),
        "median_gap_s": statistics.median(window),
        "ttft_s": statistics.median(ttfts),
        "first_ttft_s": ttfts[0],
        "last_ttft_s": ttfts[-1],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hotswapd.bench.long_context", description=__doc__.split(":")[0])
    parser.add_argument("experiment", choices=["spans", "chunks", "choices"])
    parser.add_argument("--values", type=int, nargs="+", help="spans: max_seq_len values (default 512 4096); "
                        "chunks: prefill_chunk_tokens values, 0 for none (default 0 128)")  # fmt: skip
    parser.add_argument("--per-row", action="store_true", help="chunks: also each chunk size without the step's "
                        "budget of prompt tokens (every prompt a chunk every step)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--work", type=Path, help="where to build the models (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    spans = args.experiment == "spans"
    values = args.values or ([512, 4096] if spans else [0, 128])

    from hotswapd.bench.geometry import MODEL_NAME, build_geometry_model
    from hotswapd.demo import build_demo

    turn: Callable[[Any], dict[str, float]] = _span_round if spans else _chunk_round
    with tempfile.TemporaryDirectory(prefix="hs-long-") as tmp:
        work = (args.work or Path(tmp)).absolute()
        (work / "adapters").mkdir(parents=True, exist_ok=True)
        model = build_geometry_model(work / MODEL_NAME, build_demo(work / "demo").base)
        engines = {
            str(v): _engine(model, work, f"{args.experiment}-{v}", v if spans else 512, None if spans or not v else v)
            for v in values
        }
        for v in values if args.per_row and not spans else []:
            if v:
                engines[f"{v}/row"] = engine = _engine(model, work, f"{args.experiment}-{v}-row", 512, v)
                engine.prefill_budget = None
        contenders = {v: (engine, turn) for v, engine in engines.items()}
        if args.experiment == "choices":
            contenders = {
                f"{v}/{kind}": (engine, functools.partial(_chunk_round, same_prompt=same))
                for v, engine in engines.items()
                for kind, same in (("n=4", True), ("4_requests", False))
            }
        try:
            for engine, run in contenders.values():  # compile and warm each, outside the timed rounds
                run(engine)
                run(engine)
            rounds: dict[str, list[dict[str, float]]] = {v: [] for v in contenders}
            for _ in range(args.rounds):
                for v, (engine, run) in contenders.items():
                    rounds[v].append(run(engine))
        finally:
            for engine in engines.values():
                engine.stop()
    name = "max_seq_len" if spans else "prefill_chunk_tokens"
    figures: dict[str, Any] = {"experiment": args.experiment, "model": MODEL_NAME, "rounds": args.rounds, name: {}}
    for v, got in rounds.items():
        medians = {key: statistics.median(r[key] for r in got) * 1e3 for key in got[0]}
        figures[name][v] = {f"{key[:-2]}_ms": ms for key, ms in medians.items()}
        shown = ", ".join(f"{key[:-2]} {ms:.1f} ms" for key, ms in medians.items())
        print(f"{name} {v:>8}: {shown} (medians of {len(got)} rounds)")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
