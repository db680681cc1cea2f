"""``model.compile.cache_dir``: inductor's caches go where the config says (an environment value still wins)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hotswapd.demo import DemoAssets

# A process of its own: which directory inductor uses is decided per process, by the environment at the time.
_LOAD = """
import dataclasses, json, os, sys
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
from hotswap_core.config import load_config
from hotswap_core.engine import Engine
config = load_config(sys.argv[1])
compile_cfg = dataclasses.replace(config.model.compile, cache_dir=sys.argv[2])
engine = Engine(dataclasses.replace(config, model=dataclasses.replace(config.model, compile=compile_cfg)))
engine.load()
torch.compile(lambda x: x * 2 + 1)(torch.ones(3))  # one small kernel, written to the cache in use
print(json.dumps({"inductor": cache_dir(), "env": os.environ["TORCHINDUCTOR_CACHE_DIR"]}))
"""


def _load(demo: DemoAssets, cache: Path, env: dict[str, str]) -> dict[str, str]:
    argv = [sys.executable, "-c", _LOAD, str(demo.config), str(cache)]
    run = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    return dict(json.loads(run.stdout.strip().splitlines()[-1]))


def test_the_configured_cache_dir_is_the_one_inductor_writes(demo_assets: DemoAssets, tmp_path: Path) -> None:
    """Importing torch writes torch's default into TORCHINDUCTOR_CACHE_DIR; the config must still win over that
    default (it did not: every compile went to /tmp/torchinductor_<user>, which PrivateTmp empties at restart)."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    cache = tmp_path / "configured"
    got = _load(demo_assets, cache, env)
    assert got == {"inductor": str(cache), "env": str(cache)}
    assert any(files for _, _, files in os.walk(cache)), "nothing was written to compile.cache_dir"


def test_a_cache_dir_from_the_environment_wins(demo_assets: DemoAssets, tmp_path: Path) -> None:
    """The systemd units set TORCHINDUCTOR_CACHE_DIR themselves; an operator's environment is not overridden."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "from-env")}
    got = _load(demo_assets, tmp_path / "configured", env)
    assert got == {"inductor": str(tmp_path / "from-env"), "env": str(tmp_path / "from-env")}
    assert not (tmp_path / "configured").exists()
