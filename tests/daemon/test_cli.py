"""The real ``hotswapd`` command line in subprocesses: validate, demo."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from hotswapd.demo import BROKEN_REASONS

from ..conftest import run_cli


def _validate(adapter: Path, config: Path, env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    out = subprocess.run(
        run_cli("validate", str(adapter), "--config", str(config), "--json"),
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    return out.returncode, json.loads(out.stdout)


def test_validate_rejects_every_broken_demo_example_with_its_reason(demo_assets: Any, cli_env: dict) -> None:
    cases = {
        **{r: demo_assets.broken[r] for r in BROKEN_REASONS},
        "alpha": demo_assets.alpha,
        "bravo": demo_assets.bravo,
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(
            zip(cases, pool.map(lambda p: _validate(p, demo_assets.config, cli_env), cases.values()), strict=True)
        )
    for name in ("alpha", "bravo"):
        code, report = results[name]
        assert (code, report["valid"], report["version"]) == (0, True, name), report
        assert len(report["sha256"]) == 64
    for reason in BROKEN_REASONS:
        code, report = results[reason]
        assert (code, report["valid"], report["reason"]) == (1, False, reason), report
        assert report["message"]


def test_validate_human_report_and_missing_folder(demo_assets: Any, cli_env: dict, tmp_path: Path) -> None:
    out = subprocess.run(
        run_cli("validate", str(demo_assets.broken["truncated"]), "--config", str(demo_assets.config)),
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env,
    )
    assert out.returncode == 1
    assert out.stdout.startswith("REJECTED") and "reason:  truncated" in out.stdout
    code, report = _validate(tmp_path / "does-not-exist", demo_assets.config, cli_env)
    assert (code, report["reason"]) == (1, "missing_file")


def test_validate_with_a_bad_config_exits_2(demo_assets: Any, cli_env: dict, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {path: x}\nadapter: {target_modules: [q_proj], target_rank: 0}\nsource: {kind: none}\n")
    out = subprocess.run(
        run_cli("validate", str(demo_assets.alpha), "--config", str(bad)),
        capture_output=True,
        text=True,
        timeout=120,
        env=cli_env,
    )
    assert out.returncode == 2
    assert "adapter.target_rank: must be >= 1, got 0" in out.stderr


@pytest.mark.slow
def test_demo_no_serve_builds_assets_in_the_given_dir(tmp_path: Path, cli_env: dict) -> None:
    out = subprocess.run(
        run_cli("demo", "--dir", str(tmp_path / "d"), "--no-serve"),
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env,
    )
    assert out.returncode == 0, out.stderr
    for rel in (
        "base/config.json",
        "base/tokenizer.json",
        "examples/alpha/adapter_model.safetensors",
        "examples/bravo/adapter_config.json",
        "examples/broken/pickle_refused/adapter_model.bin",
        "hotswapd.yaml",
    ):
        assert (tmp_path / "d" / rel).is_file(), rel
    assert (tmp_path / "d" / "adapters").is_dir() and not any((tmp_path / "d" / "adapters").iterdir())
    check = subprocess.run(
        run_cli("check-config", str(tmp_path / "d" / "hotswapd.yaml")),
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env,
    )
    assert check.returncode == 0, check.stdout


@pytest.mark.slow
def test_demo_serves_prints_three_lines_and_visibly_flips(demo_assets: Any, cli_env: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="hs-demo-", dir="/tmp") as d:  # short: the socket lives in it
        root = Path(d) / "demo"
        # The built assets and their warm inductor cache, without the session's adapters/ and state/.
        shutil.copytree(demo_assets.root, root, ignore=shutil.ignore_patterns("adapters", "state", "*.sock"))
        proc = subprocess.Popen(
            run_cli("demo", "--dir", str(root)),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=cli_env,
        )
        lines: list[str] = []

        def read_until(pred: Any, timeout: float) -> str:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                line = proc.stdout.readline() if proc.stdout else ""
                if not line and proc.poll() is not None:
                    break
                lines.append(line)
                if pred(line):
                    return line
            raise AssertionError("demo output so far:\n" + "".join(lines))

        try:
            assert "alpha" in read_until(lambda s: s.startswith("live:"), 300)
            commands = [s.strip() for s in lines if s.startswith("  curl") or s.startswith("  cp")]
            curl, drop, metrics = commands  # the three lines a newcomer needs, in that order
            answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
            assert json.loads(answer.stdout)["choices"][0]["text"].startswith(" alpha")
            subprocess.run(["bash", "-c", drop], timeout=60, check=True)
            assert "' bravo" in read_until(lambda s: s.startswith("live: bravo"), 30)
            scraped = subprocess.run(["bash", "-c", metrics], capture_output=True, text=True, timeout=60)
            assert 'hotswapd_swaps_total{result="success"}' in scraped.stdout
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
