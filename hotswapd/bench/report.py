"""The bench's figures as JSON sections (contenders with median/p99, ratios, targets) and as a table."""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hotswapd.bench import serving_report
from hotswapd.bench.stats import LoadWindow, ratio, summarize

if TYPE_CHECKING:
    from hotswapd.bench.daemon import Arrivals
    from hotswapd.bench.runner import BenchConfig

SECTIONS = (
    "stall_seconds",
    "landed_to_live_seconds",
    "latency_under_swaps",
    "recompilations",
    "throughput_tokens_per_second",
    "startup_seconds",
    "arrival_lag",
    *serving_report.SECTIONS,
    "machine",
)

# What each contender's sample is, for the table and the JSON.
LABELS = {
    "hotswapd_commit": "hotswapd commit (slot flip between batches)",
    "hotswapd_commit_and_verify": "hotswapd serving paused per swap, verify included",
    "peft_hotswap_copy": "PEFT hotswap_adapter_from_state_dict (copy only)",
    "peft_hotswap_adapter": "PEFT hotswap_adapter (read + copy)",
    "peft_load_set_adapter": "PEFT load_adapter+set_adapter -> 1st token",
    "restart_cold_cache": "restart -> 1st token, cold compile cache",
    "restart_warm_cache": "restart -> 1st token, warm compile cache",
    "isolated": "rename -> 1st completion on it, isolated arrivals",
    "back_to_back": "rename -> 1st completion on it, back to back",
    "went_live": "arrival -> live, versions that went live",
    "newest_behind": "arrival -> it or a newer version live, every one",
    "steady": "no swaps",
    "swap_every_200ms": "a swap every 200 ms",
    "in_process": "in-process compiled generation",
    "cold_cache": "hotswapd run -> READY, cold cache",
    "warm_cache": "hotswapd run -> READY, warm cache",
}


def clients_key(n: int) -> str:
    return f"daemon_{n}_client" + ("s" if n > 1 else "")


def _target(what: str, measured: float, met: bool) -> dict[str, Any]:
    return {"target": what, "measured": measured, "met": bool(met) if math.isfinite(measured) else False}


def _contenders(samples: dict[str, list[float]]) -> dict[str, dict[str, Any]]:
    return {name: summarize(values) for name, values in samples.items()}


def _vs(contenders: dict[str, dict[str, Any]], base: str, stat: str = "median") -> dict[str, float]:
    return {f"{name}/{base}": ratio(c[stat], contenders[base][stat]) for name, c in contenders.items() if name != base}


def stall(samples: dict[str, list[float]]) -> dict[str, Any]:
    c = _contenders(samples)
    ours, peft = c["hotswapd_commit"], c["peft_hotswap_copy"]
    return {
        "contenders": c,
        "ratios": _vs(c, "hotswapd_commit"),
        "ratios_p99": _vs(c, "hotswapd_commit", "p99"),
        "targets": [
            _target("hotswapd commit p99 <= 1 ms (CPU)", ours["p99"], ours["p99"] <= 1e-3),
            _target(
                "PEFT in-place copy / hotswapd commit (median) >= 4x",
                r := ratio(peft["median"], ours["median"]),
                r >= 4,
            ),
            _target(
                "serving paused per swap, verify included, p99 <= 100 µs",
                paused := c["hotswapd_commit_and_verify"]["p99"],
                paused <= 100e-6,
            ),
        ],
        "notes": "blocking calls are timed alone; load_adapter+set_adapter until the first token after it; "
        "restarts from spawning the new process to its first token (stopping the old one not counted)",
    }


def landed(samples: dict[str, list[float]], phases: dict[str, dict[str, list[float]]], settle: float) -> dict[str, Any]:
    c = _contenders(samples)
    limit = settle + 0.05
    alone, burst = c["isolated"]["median"], c["back_to_back"]["median"]
    return {
        "contenders": c,
        "phases": {name: _contenders(split) for name, split in phases.items()},
        "settle_seconds": settle,
        "ratios": {
            "isolated/(settle+50ms)": ratio(alone, limit),
            "back_to_back/(settle+50ms)": ratio(burst, limit),
            "back_to_back/isolated": ratio(burst, alone),
        },
        "targets": [
            _target(f"p50 <= settle + 50 ms = {limit * 1000:.0f} ms (isolated arrivals)", alone, alone <= limit),
            _target(f"p50 <= settle + 50 ms = {limit * 1000:.0f} ms (back to back)", burst, burst <= limit),
        ],
        "notes": "the README's producer protocol (copy into a dot-folder, rename); isolated: renamed "
        "settle_seconds after the previous swap, back_to_back: at once; phases from GET /v1/adapters: detect = "
        "first seen until the swap starts (includes the settle wait), validate = inspect; other = rename -> first "
        "seen, plus commit -> the completion naming the version",
    }


def arrival_lag(run: Arrivals, settle: float, every: float, seconds: float) -> dict[str, Any]:
    c = _contenders({"went_live": run.went_live(), "newest_behind": run.newest_behind()})
    limit = 2 * settle
    live, behind = c["went_live"]["p99"], c["newest_behind"]["p99"]
    return {
        "contenders": c,
        "settle_seconds": settle,
        "arrive_every_seconds": every * settle,
        "seconds": seconds,
        "arrivals": len(run.landed),
        "went_live": len(run.live),
        "superseded_listed": run.superseded,
        "ratios": {
            "went_live_p99/(2*settle)": ratio(live, limit),
            "newest_behind_p99/(2*settle)": ratio(behind, limit),
            "went_live/arrivals": ratio(len(run.live), len(run.landed)),
        },
        "targets": [
            _target(f"p99 <= 2 x settle = {limit * 1000:.0f} ms (arrival -> live)", live, live <= limit),
            _target(f"p99 <= 2 x settle = {limit * 1000:.0f} ms (newest arrival not live)", behind, behind <= limit),
        ],
        "notes": f"a version renamed in every {every:g} x settle_seconds, faster than one settles; the newest "
        "settled one goes live, those it beat in the same look are superseded; live = the swap record's "
        "finished_at (GET /v1/adapters), arrival = the rename",
    }


def latency(
    samples: dict[str, list[float]], windows: dict[str, list[LoadWindow]], config: BenchConfig
) -> dict[str, Any]:
    c = _contenders(samples)
    p99 = ratio(c["swap_every_200ms"]["p99"], c["steady"]["p99"])
    swapping = windows["swap_every_200ms"]
    seconds = sum(w.elapsed for w in swapping)
    return {
        "contenders": c,
        "ratios": {"p99": p99, "median": ratio(c["swap_every_200ms"]["median"], c["steady"]["median"])},
        "swaps": sum(w.swaps for w in swapping),
        "swaps_per_second": ratio(sum(w.swaps for w in swapping), seconds),
        "errors": sum(len(w.errors) for ws in windows.values() for w in ws),
        "clients": config.load_clients,
        "max_tokens": config.latency_max_tokens,
        "targets": [_target("p99 under swaps <= 1.05x steady p99", p99, p99 <= 1.05)],
    }


def recompilations(found: dict[str, Any], graphs: dict[str, list[float]]) -> dict[str, Any]:
    c = {"hotswapd": {**summarize(found["per_swap"]), "total": found["total"], "swaps": found["swaps"]}}
    for name, per_swap in graphs.items():
        c[name] = {**summarize(per_swap), "total": sum(per_swap), "swaps": len(per_swap)}
    return {
        "contenders": c,
        "ratios": {f"{name}_per_swap": ratio(v["total"], v["swaps"]) for name, v in c.items()},
        "workload": {k: v for k, v in found.items() if k not in ("per_swap", "total")},
        "targets": [_target("hotswapd recompilations == 0", float(found["total"]), found["total"] == 0)],
        "notes": "graphs dynamo compiled per swap (the swap and the serving that follows it)",
    }


def throughput(samples: dict[str, list[float]], config: BenchConfig) -> dict[str, Any]:
    c = _contenders(samples)
    one, top = clients_key(1), clients_key(max(config.concurrency))
    ratios = {f"{one}/in_process": ratio(c[one]["median"], c["in_process"]["median"])}
    ratios.update(
        {
            f"{clients_key(n)}/{one}": ratio(c[clients_key(n)]["median"], c[one]["median"])
            for n in config.concurrency
            if n > 1
        }
    )
    return {
        "contenders": c,
        "ratios": ratios,
        "max_tokens": config.throughput_max_tokens,
        "window_seconds": config.throughput_window_s,
        "targets": [
            _target(
                "daemon 1 client >= 0.9x in-process", ratios[f"{one}/in_process"], ratios[f"{one}/in_process"] >= 0.9
            ),
            _target(
                f"{max(config.concurrency)} clients >= 3x one client", r := ratios.get(f"{top}/{one}", math.nan), r >= 3
            ),
        ],
    }


def startup(ready: dict[str, list[float]], restart: dict[str, list[float]]) -> dict[str, Any]:
    c = _contenders(ready)
    warm = ratio(c["warm_cache"]["median"], c["cold_cache"]["median"])
    return {
        "contenders": c,
        "first_token": _contenders(
            {"cold_cache": restart["restart_cold_cache"], "warm_cache": restart["restart_warm_cache"]}
        ),
        "ratios": {"warm_cache/cold_cache": warm},
        "targets": [_target("warm start <= 40% of cold", warm, warm <= 0.4)],
        "notes": "cold: fresh compile.cache_dir and TORCHINDUCTOR_CACHE_DIR (torch's global precompiled headers stay)",
    }


def machine(
    device: str,
    dtype: str,
    config: BenchConfig,
    seconds: float,
    load_before: tuple[float, ...],
    load_after: tuple[float, ...],
) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_before": list(load_before),
        "load_average_after": list(load_after),
        "bench": {"mode": config.mode, "model": config.model, "compile": config.compile, "seconds": seconds},
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def finite_or_null(obj: Any) -> Any:
    """JSON has no NaN/Infinity: a figure that could not be computed is null."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_null(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_null(v) for v in obj]
    return obj


# ---- the table --------------------------------------------------------------------------------------
def _seconds(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    if x < 1e-3:
        return f"{x * 1e6:.1f} µs"
    if x < 1:
        return f"{x * 1e3:.1f} ms"
    return f"{x:.2f} s"


def _times(x: float) -> str:
    if not math.isfinite(x):
        return "-"
    return f"{x:,.0f}x" if x >= 100 else f"{x:.2f}x"


def _header(title: str) -> str:
    return f"{title:<54} {'median':>11} {'p99':>11} {'n':>5}"


def _rows(contenders: dict[str, dict[str, Any]], fmt: Callable[[float], str], notes: dict[str, str]) -> list[str]:
    out = []
    for name, s in contenders.items():
        label = LABELS.get(name, name.replace("_", " "))
        out.append(
            f"  {label:<52} {fmt(s['median']):>11} {fmt(s['p99']):>11} {s['n']:>5}  {notes.get(name, '')}".rstrip()
        )
    return out


def _targets(section: dict[str, Any], fmt: Callable[[float], str] = _times) -> list[str]:
    return [
        f"  target: {t['target']}: {fmt(t['measured'])} {'met' if t['met'] else 'MISSED'}" for t in section["targets"]
    ]


def _count(x: float) -> str:
    return f"{x:g}" if math.isfinite(x) else "-"


def _rate(x: float) -> str:
    return f"{x:,.0f}" if math.isfinite(x) else "-"


def render(f: dict[str, Any]) -> str:
    """The figures as the table ``hotswapd bench`` prints (and the README quotes)."""
    m = f["machine"]
    lines = [
        f"hotswapd bench ({m['bench']['mode']}, model {m['bench']['model']}) in {m['bench']['seconds']:.0f} s on "
        f"{m['cpu']}, {m['usable_cores']} cores, {m['device']} {m['dtype']}",
        f"torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
        f"load average {m['load_average_before'][0]:.1f} before, {m['load_average_after'][0]:.1f} after",
    ]
    s = f["stall_seconds"]
    lines += ["", _header("1. serving stall per swap")]
    lines += _rows(
        s["contenders"], _seconds, {k.split("/")[0]: f"{_times(v)} hotswapd" for k, v in s["ratios"].items()}
    )
    lines += _targets(s, _seconds_or_times)

    ll = f["landed_to_live_seconds"]
    lines += ["", _header(f"2. landed -> live, watched folder with settle_seconds {ll['settle_seconds']:g}")]
    for name, stats in ll["contenders"].items():
        lines += _rows({name: stats}, _seconds, {})
        split = " · ".join(f"{phase} {_seconds(p['median'])}" for phase, p in ll["phases"][name].items())
        lines.append(f"    medians: {split}")
    lines += _targets(ll, _seconds)

    lat = f["latency_under_swaps"]
    lines += ["", _header(f"3. request latency ({lat['clients']} clients, {lat['max_tokens']} tokens each)")]
    note = f"{lat['swaps']} swaps; p99 {_times(lat['ratios']['p99'])} steady"
    lines += _rows(lat["contenders"], _seconds, {"swap_every_200ms": note})
    lines += _targets(lat)

    rc = f["recompilations"]
    w = rc["workload"]
    lines += ["", _header("4. graphs compiled per swap")]
    lines += _rows(rc["contenders"], _count, {k: f"{v['total']:g} in all" for k, v in rc["contenders"].items()})
    lines.append(
        f"  hotswapd workload: {w['adapters']} adapters, ranks {w['ranks']}, alphas {[_count(a) for a in w['alphas']]},"
        f" prompt lengths {w['prompt_lengths'][0]}-{w['prompt_lengths'][1]}, batch sizes {w['batch_sizes']}"
    )
    lines += _targets(rc, _count)

    tp = f["throughput_tokens_per_second"]
    lines += ["", _header(f"5. throughput, tokens/s (up to {tp['max_tokens']} tokens a request)")]
    notes = {k.split("/")[0]: f"{_times(v)} {k.split('/')[1].replace('_', ' ')}" for k, v in tp["ratios"].items()}
    lines += _rows(tp["contenders"], _rate, notes)
    lines += _targets(tp)

    st = f["startup_seconds"]
    lines += ["", _header("6. start-up")]
    lines += _rows(st["contenders"], _seconds, {"warm_cache": f"{_times(st['ratios']['warm_cache/cold_cache'])} cold"})
    lines += _targets(st)

    al = f["arrival_lag"]
    every_ms = al["arrive_every_seconds"] * 1000
    title = f"7. arrival lag, one every {every_ms:.0f} ms for {al['seconds']:g} s, settle {al['settle_seconds']:g} s"
    lines += ["", _header(title)]
    note = f"{al['went_live']} of {al['arrivals']} went live"
    lines += _rows(al["contenders"], _seconds, {"went_live": note})
    lines += _targets(al, _seconds)
    lines += serving_report.render(f, 8)
    return "\n".join(lines)


def _seconds_or_times(x: float) -> str:
    return _seconds(x) if math.isfinite(x) and x < 1e-2 else _times(x)
