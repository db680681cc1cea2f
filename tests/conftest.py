"""Shared, expensive fixtures: the demo assets and one compiled engine per test session."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hotswap_core.config import Config, load_config
from hotswapd.demo import DemoAssets, build_demo


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="session")
def demo_config(demo_assets: DemoAssets) -> Config:
    return load_config(demo_assets.config)


@pytest.fixture(scope="session")
def engine(demo_config: Config) -> Iterator[object]:
    """The demo model, compiled once (inductor cache inside the session's temp dir) and warmed."""
    from hotswap_core.engine import Engine

    eng = Engine(demo_config)
    eng.load()
    eng.warm_up()
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temp dir for AF_UNIX sockets (paths must stay under 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="hs-", dir="/tmp") as d:
        yield Path(d)


def run_cli(*args: str) -> list[str]:
    """argv for running the real console entry point in a subprocess."""
    return [sys.executable, "-m", "hotswapd.cli", *args]


@pytest.fixture(scope="session")
def cli_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}
