"""The serving engine's figures (``bench.serving``) as JSON sections and table lines, one contender per model
and measurement: contender names are ``MODEL/what`` (``demo/alone``, ``qwen2.5-1.5b-geometry/behind_long``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hotswapd.bench.serving import LONG_CLIENTS, MIXED_CLIENTS, SHORT_TOKENS, ModelFigures
from hotswapd.bench.stats import ratio, summarize

SECTIONS = (
    "head_of_line",
    "ttft_under_load",
    "commit_to_live_under_load_seconds",
    "sampling_cost",
    "vs_transformers_generate",
)
HOL_TARGET = 3.0  # median behind long generations / alone
COMMIT_STEPS_TARGET = 2.0  # commit median in decode steps under load (p99: in the ratios)
TTFT_TARGET = 3.0  # TTFT median under 8 mixed clients / TTFT alone median
SAMPLING_TARGET = 0.9  # temperature-1 tokens/s / greedy tokens/s
GENERATE_TARGET = 1.5  # hotswapd 8 clients / transformers generate() batch of 8, tokens/s


def _target(what: str, measured: float, met: bool) -> dict[str, Any]:
    from hotswapd.bench.report import _target as target

    return target(what, measured, met)


def _per_model(
    figures: dict[str, ModelFigures], pick: Callable[[ModelFigures], dict[str, list[float]]]
) -> dict[str, dict[str, Any]]:
    return {f"{m}/{name}": summarize(v) for m, f in figures.items() for name, v in pick(f).items()}


def head_of_line(figures: dict[str, ModelFigures]) -> dict[str, Any]:
    c = _per_model(figures, lambda f: f.head_of_line)
    ratios = {
        f"{m}/behind_long/alone": ratio(c[f"{m}/behind_long"]["median"], c[f"{m}/alone"]["median"]) for m in figures
    }
    return {
        "contenders": c,
        "ratios": ratios,
        "targets": [
            _target(f"{m}: head-of-line (median behind long / alone) <= {HOL_TARGET:g}x", r, r <= HOL_TARGET)
            for m, r in ((k.split("/")[0], v) for k, v in ratios.items())
        ],
        "notes": f"latency of a {SHORT_TOKENS}-token request (greedy, ignore_eos) over the socket, alone and while "
        f"{LONG_CLIENTS} clients keep long streaming generations running",
    }


def ttft(figures: dict[str, ModelFigures]) -> dict[str, Any]:
    c = _per_model(figures, lambda f: f.ttft)
    loaded = f"{MIXED_CLIENTS}_clients_mixed"
    ratios: dict[str, float] = {}
    for m in figures:
        alone = c[f"{m}/alone"]["median"]
        ratios[f"{m}/{loaded}_p50/alone"] = ratio(c[f"{m}/{loaded}"]["median"], alone)
        ratios[f"{m}/{loaded}_p99/alone"] = ratio(c[f"{m}/{loaded}"]["p99"], alone)
    return {
        "contenders": c,
        "ratios": ratios,
        "targets": [
            _target(f"{m}: TTFT p50 with {MIXED_CLIENTS} mixed clients <= {TTFT_TARGET:g}x alone", r, r <= TTFT_TARGET)
            for m in figures
            for r in [ratios[f"{m}/{loaded}_p50/alone"]]
        ],
        "notes": f"request sent -> first streamed text; loaded: the requests sent in the steady-state window of "
        f"{MIXED_CLIENTS} streaming clients cycling through the mixed workload (vs_transformers_generate's run)",
    }


def commit_to_live(figures: dict[str, ModelFigures]) -> dict[str, Any]:
    c = _per_model(figures, lambda f: f.commit)
    ratios: dict[str, float] = {}
    for m in figures:
        step = c[f"{m}/decode_step"]["median"]
        ratios[f"{m}/commit_p99/decode_step"] = ratio(c[f"{m}/commit"]["p99"], step)
        ratios[f"{m}/commit_median/decode_step"] = ratio(c[f"{m}/commit"]["median"], step)
        ratios[f"{m}/stage_median/decode_step"] = ratio(c[f"{m}/stage"]["median"], step)
    return {
        "contenders": c,
        "ratios": ratios,
        "recompilations": {m: f.recompilations for m, f in figures.items()},
        "targets": [
            *(
                _target(
                    f"{m}: commit -> live median <= {COMMIT_STEPS_TARGET:g} decode steps under load",
                    r,
                    r <= COMMIT_STEPS_TARGET,
                )
                for m in figures
                for r in [ratios[f"{m}/commit_median/decode_step"]]
            ),
            *(
                _target(f"{m}: recompilations in the daemon == 0", f.recompilations, not f.recompilations)
                for m, f in figures.items()
            ),
        ],
        "notes": f"admin swaps while {LONG_CLIENTS} clients keep long generations running; commit = the swap "
        "record's commit phase (asked the worker -> new requests get the new slot); decode_step = each long "
        "generation's first chunk to its last / the chunks between, meanwhile; stage = the wait for rows pinned "
        "to standby plus the copy (the long generations restart before each swap: a swap landing within one "
        "generation of the previous one waits for it)",
    }


def sampling(figures: dict[str, ModelFigures]) -> dict[str, Any]:
    c = _per_model(figures, lambda f: f.sampling)
    ratios: dict[str, float] = {}
    for m in figures:
        greedy = c[f"{m}/temperature_0"]["median"]
        ratios[f"{m}/temperature_1/temperature_0"] = ratio(c[f"{m}/temperature_1"]["median"], greedy)
        for other in ("temperature_1_top_p_top_k", "temperature_0_logprobs_5"):
            ratios[f"{m}/{other}/temperature_0"] = ratio(c[f"{m}/{other}"]["median"], greedy)
    return {
        "contenders": c,
        "ratios": ratios,
        "targets": [
            _target(f"{m}: temperature 1 tokens/s >= {SAMPLING_TARGET:g}x greedy", r, r >= SAMPLING_TARGET)
            for m in figures
            for r in [ratios[f"{m}/temperature_1/temperature_0"]]
        ],
        "notes": f"tokens/s of {MIXED_CLIENTS // 2} closed-loop clients, fixed length (ignore_eos), in turns",
    }


def vs_generate(figures: dict[str, ModelFigures]) -> dict[str, Any]:
    c = _per_model(figures, lambda f: f.throughput)
    ours, theirs = f"hotswapd_{MIXED_CLIENTS}_clients", f"transformers_generate_batch_{MIXED_CLIENTS}"
    ratios = {f"{m}/{ours}/{theirs}": ratio(c[f"{m}/{ours}"]["median"], c[f"{m}/{theirs}"]["median"]) for m in figures}
    targets = [
        _target(f"{m}: {MIXED_CLIENTS} mixed clients >= {GENERATE_TARGET:g}x generate()", r, r >= GENERATE_TARGET)
        for m, r in ((k.split("/")[0], v) for k, v in ratios.items())
    ]
    for m in figures:  # generate() on the daemon's own CPU linears, where they are packed: no target, the batching
        same = f"{m}/{theirs}_onednn"
        if same in c:
            ratios[f"{m}/{ours}/{theirs}_onednn"] = ratio(c[f"{m}/{ours}"]["median"], c[same]["median"])
    return {
        "contenders": c,
        "ratios": ratios,
        "targets": targets,
        "cpu_threads": {m: f.cpu_threads for m, f in figures.items()},
        "notes": "tokens/s over the same mixed workload (prompts and lengths): hotswapd over its socket with "
        f"{MIXED_CLIENTS} closed-loop streaming clients, tokens that arrived in a steady-state window; "
        "transformers' generate() in process on the same base + adapter, "
        f"compiled, static cache, greedy, padded batches of {MIXED_CLIENTS} (a batch runs to its longest request); "
        "the _onednn contender, where the daemon packs its CPU linears (model.cpu_linear), is generate() on the "
        "same oneDNN linears, so that ratio is the batching's gain alone; generate() runs on the daemon's intra-op "
        "thread count (cpu_threads)",
    }


def sections(figures: dict[str, ModelFigures]) -> dict[str, Any]:
    return {
        "head_of_line": head_of_line(figures),
        "ttft_under_load": ttft(figures),
        "commit_to_live_under_load_seconds": commit_to_live(figures),
        "sampling_cost": sampling(figures),
        "vs_transformers_generate": vs_generate(figures),
    }


def render(f: dict[str, Any], first: int) -> list[str]:
    """Table lines for the serving sections, numbered from ``first``."""
    from hotswapd.bench.report import _header, _rate, _rows, _seconds, _targets, _times

    titles = {
        "head_of_line": ("head-of-line blocking, latency of a short request", _seconds),
        "ttft_under_load": ("time to first token", _seconds),
        "commit_to_live_under_load_seconds": ("commit -> live under long generations", _seconds),
        "sampling_cost": ("sampling cost, tokens/s", _rate),
        "vs_transformers_generate": ("mixed workload vs transformers generate(), tokens/s", _rate),
    }
    lines: list[str] = []
    for k, name in enumerate(SECTIONS, first):
        if name not in f:
            continue
        title, fmt = titles[name]
        section = f[name]
        lines += ["", _header(f"{k}. {title}")]
        notes = {key.rsplit("/", 1)[0]: f"{_times(v)} {key.rsplit('/', 1)[1]}" for key, v in section["ratios"].items()}
        lines += _rows(section["contenders"], fmt, notes)
        for m, threads in section.get("cpu_threads", {}).items():
            lines.append(f"  {m}: intra-op threads, " + ", ".join(f"{k} {v:g}" for k, v in threads.items()))
        lines += _targets(section)
    return lines
