"""The real ``hotswapd`` command line in subprocesses: validate, demo."""

from __future__ import annotations

import json
import os
import shlex
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


def run_cli_line() -> str:
    """``hotswapd`` as a shell word, for running a printed command line with this Python."""
    return " ".join(shlex.quote(a) for a in run_cli())


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
    # Group-readable, so that a producer's `cp -r` of an example gives files a daemon in the group can read.
    for f in [*(tmp_path / "d" / "examples").rglob("*"), *(tmp_path / "d" / "base").rglob("*")]:
        assert f.stat().st_mode & 0o040, f"{f} is {oct(f.stat().st_mode)}"
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
            commands = [s.strip() for s in lines if s.startswith(("  export", "  curl", "  cp", "  hotswapd"))]
            export, curl, drop, metrics, status = commands  # what a newcomer needs, in that order
            assert export.startswith(f"export HOTSWAPD_SOCKET={root}/hotswapd.sock")
            answer = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60, check=True)
            assert json.loads(answer.stdout)["choices"][0]["text"].startswith(" alpha")
            subprocess.run(["bash", "-c", drop], timeout=60, check=True)
            assert "' bravo" in read_until(lambda s: s.startswith("live: bravo"), 30)
            scraped = subprocess.run(["bash", "-c", metrics], capture_output=True, text=True, timeout=60)
            assert 'hotswapd_swaps_total{result="success"}' in scraped.stdout
            # The client verbs find the socket through the exported variable, without --socket.
            shown = subprocess.run(
                ["bash", "-c", f"{export.split('#')[0]}; {status.replace('hotswapd', run_cli_line(), 1)}"],
                capture_output=True, text=True, timeout=60, env=cli_env,
            )  # fmt: skip
            assert shown.returncode == 0 and "bravo" in shown.stdout, shown
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_global_options_work_before_and_after_the_verb(demo_assets: Any, cli_env: dict) -> None:
    """The units' ExecStart= writes `run --config … --log-format json`; argparse used to refuse it (exit 2)."""
    for argv in (
        ("check-config", str(demo_assets.config), "--log-format", "json", "--log-level", "DEBUG"),
        ("--log-format", "json", "check-config", str(demo_assets.config)),
        ("--log-level", "WARNING", "check-config", str(demo_assets.config), "--log-format", "text"),
    ):
        out = subprocess.run(run_cli(*argv), capture_output=True, text=True, timeout=60, env=cli_env)
        assert (out.returncode, out.stdout.strip()) == (0, f"OK {demo_assets.config}"), (argv, out.stderr)
    bad = subprocess.run(run_cli("check-config", "x", "--log-format", "yaml"), capture_output=True, text=True)
    assert bad.returncode == 2 and "invalid choice: 'yaml'" in bad.stderr


def test_help_is_for_users() -> None:
    out = subprocess.run(run_cli("--help"), capture_output=True, text=True, timeout=60, check=True)
    assert "hotswapd demo" in out.stdout and "Exit codes" in out.stdout
    assert "The only place that prints" not in out.stdout  # the module's docstring is for developers


def test_a_closed_pipe_ends_quietly(demo_assets: Any, cli_env: dict) -> None:
    """`hotswapd … | head -1`: no BrokenPipeError traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is written
    try:
        out = subprocess.run(
            run_cli("validate", str(demo_assets.alpha), "--config", str(demo_assets.config)),
            stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120, env=cli_env,
        )  # fmt: skip
    finally:
        os.close(write_end)
    assert out.returncode == 141, out.stderr
    assert "Traceback" not in out.stderr and "BrokenPipeError" not in out.stderr, out.stderr


def test_a_socket_path_too_long_fails_before_the_demo_builds(tmp_path: Path, cli_env: dict) -> None:
    deep = tmp_path / ("d" * (120 - len(str(tmp_path))))
    started = time.monotonic()
    out = subprocess.run(run_cli("demo", "--dir", str(deep)), capture_output=True, text=True, timeout=60, env=cli_env)
    assert out.returncode == 2, out
    assert "Unix socket paths must be at most 107 bytes" in out.stderr and "--dir" in out.stderr
    assert not deep.exists()  # nothing was built
    assert time.monotonic() - started < 30  # no asset build (which takes ~5-15 s) and no compile


def test_check_config_names_a_socket_path_that_is_too_long(tmp_path: Path, cli_env: dict) -> None:
    config = tmp_path / "c.yaml"
    long_sock = "/tmp/" + "s" * 110 + ".sock"
    config.write_text(
        "model: {path: x}\nadapter: {target_modules: [q_proj]}\nsource: {kind: none}\n"
        f"server: {{socket: {long_sock}}}\n"
    )
    out = subprocess.run(run_cli("check-config", str(config)), capture_output=True, text=True, timeout=60, env=cli_env)
    assert out.returncode == 2 and out.stdout.startswith("server.socket: the socket path"), out


@pytest.mark.slow
def test_warm_up_progress_bar_on_a_terminal_and_log_lines_otherwise(
    demo_assets: Any, cli_env: dict, short_tmp: Path
) -> None:
    """A cold compile is minutes of silence otherwise: on a TTY a bar with the step and an estimate."""
    import pty

    from .harness import wait_until, write_config

    config = write_config(demo_assets, short_tmp, short_tmp / "s.sock")
    leader, follower = pty.openpty()
    proc = subprocess.Popen(run_cli("run", "--config", str(config)), stdin=follower, stdout=follower,
                            stderr=follower, env=cli_env, close_fds=True)  # fmt: skip
    os.close(follower)
    seen = bytearray()

    def read_some() -> bool:
        try:
            seen.extend(os.read(leader, 65536))
        except OSError:  # EIO: the daemon closed its end
            return True
        return b"ready in" in seen

    try:
        wait_until(read_some, 300, "the daemon to become ready on a terminal", interval=0)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        os.close(leader)
    text = seen.decode(errors="replace")
    bars = [b for b in text.split("\r") if b.startswith("warming up [")]
    # One redraw per warm-up step, in place: the demo config has 4 decode buckets x 4 prompt lengths (2 and 3,
    # 124 for attention span 128, 252 for span 256 and later prefill chunks).
    assert len(bars) == 16, text[-3000:]
    assert bars[0].startswith("warming up [........................] step 1/16: batch 1, prompt length 2"), bars[0]
    assert "step 16/16: batch 8, prompt length 252" in bars[-1] and "\x1b[K" in bars[-1]
    assert "warm-up step" not in text  # the bar replaces the per-step log lines

    # Not a terminal (systemd, a log file): one log line per step instead, with the same facts.
    log = short_tmp / "plain.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(run_cli("run", "--config", str(config)), stdout=out, stderr=subprocess.STDOUT,
                                env=cli_env)  # fmt: skip
        try:
            wait_until(lambda: b"ready in" in log.read_bytes(), 300, "the daemon to become ready")
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
    lines = [line for line in log.read_text().splitlines() if "warm-up step" in line]
    assert len(lines) == 16 and "\r" not in log.read_text()
    assert "warm-up step 16/16: batch 8, prompt length 252" in lines[-1] and "s so far" in lines[-1]
