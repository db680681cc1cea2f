"""The Grafana dashboard (configs/grafana/hotswapd.json) and its PromQL, with the dashboard's variables filled in,
ready to send to a Prometheus (tests/daemon/test_fleet.py) or to ``promtool`` (tests/daemon/test_grafana.py)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "hotswapd.json"

# $name, ${name} and ${name:format}; a format (Grafana's :regex, :pipe, ...) is refused: the values put in here
# are already PromQL regexes, and a format would change what Grafana sends.
_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::([^}]*))?\}|(\w+))")


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, rows included, with the panels inside rows (a collapsed row nests its panels)."""

    def walk(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard.get("panels", []))


def load(path: Path = DASHBOARD) -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(path.read_text())
    return dashboard


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with each ``$name``/``${name}`` replaced; an unknown variable or a ``:format`` raises ValueError."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(3)
        if m.group(2) is not None:
            raise ValueError(f"variable format ${{{name}:{m.group(2)}}} is not supported: {expr}")
        if name not in values:
            raise ValueError(f"unknown variable ${name} in {expr}")
        return values[name]

    return _VARIABLE.sub(one, expr)


def queries(
    path: Path = DASHBOARD,
    *,
    cohort: str = ".+",
    instance: str = ".+",
    rate_interval: str = "1m",
    interval: str = "1m",
    time_range: str = "5m",
) -> list[tuple[str, str]]:
    """(``"<panel title> [<refId>]"``, expr) for every target of every panel, variables substituted:
    ``$cohort`` and ``$instance`` (regexes: ``=~`` matchers), ``$__rate_interval``, ``$__interval``, ``$__range``."""
    values = {
        "cohort": cohort,
        "instance": instance,
        "__rate_interval": rate_interval,
        "__interval": interval,
        "__range": time_range,
    }
    found = []
    for panel in panels(load(path)):
        for target in panel.get("targets", []):
            if target.get("expr"):
                found.append((f"{panel['title']} [{target['refId']}]", substitute(target["expr"], values)))
    return found
