"""Each shipped service unit's own ``ExecStart=`` line, run as a real process: the command the unit
names must start a daemon that becomes ready. Only the paths are swapped for this machine's: the
unit's ``/usr/local/bin/hotswapd`` for this Python's console script, its config for a test config.
(tests/daemon/test_real_systemd.py runs the same lines under a real systemd.)"""

from __future__ import annotations

import json
import shlex
import shutil
import sysconfig
from pathlib import Path

import pytest

from hotswapd.demo import DemoAssets

from .harness import DaemonProcess, write_config

UNITS = Path(__file__).parents[2] / "systemd"
UNIT_EXEC = "/usr/local/bin/hotswapd"
UNIT_CONFIGS = {"hotswapd.service": "/etc/hotswapd/hotswapd.yaml", "hotswapd@.service": "/etc/hotswapd/%i.yaml"}


def exec_start(unit: str) -> list[str]:
    """The unit's one ``ExecStart=`` line, split as systemd splits it (no prefixes, no variables used)."""
    lines = [line for line in (UNITS / unit).read_text().splitlines() if line.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    command = lines[0].removeprefix("ExecStart=")
    assert command[:1] not in "-@:+!", f"{unit}: ExecStart= prefixes are not expected here: {command}"
    assert "$" not in command, f"{unit}: environment variables in ExecStart= are not expected here: {command}"
    return shlex.split(command)


def console_script() -> str:
    """This Python's ``hotswapd`` entry point (what pip installs; the units run a link to it)."""
    candidate = Path(sysconfig.get_path("scripts")) / "hotswapd"
    found = str(candidate) if candidate.is_file() else shutil.which("hotswapd")
    assert found, f"no hotswapd console script in {candidate.parent} or on PATH: is the project installed?"
    return found


@pytest.fixture
def workdir(short_tmp: Path) -> Path:
    """A short folder (the daemon's socket lives in it) with an empty watched folder."""
    (short_tmp / "adapters").mkdir()
    return short_tmp


@pytest.mark.slow
@pytest.mark.parametrize("unit", sorted(UNIT_CONFIGS))
def test_units_execstart_line_starts_a_ready_daemon(
    unit: str, demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    argv = exec_start(unit)
    print(f"{unit}: ExecStart={shlex.join(argv)}")
    assert argv[0] == UNIT_EXEC and UNIT_CONFIGS[unit] in argv, argv
    config = write_config(demo_assets, workdir, workdir / "s.sock")
    substituted = [console_script() if a == UNIT_EXEC else str(config) if a == UNIT_CONFIGS[unit] else a for a in argv]
    assert not any("%" in a for a in substituted), substituted  # every specifier was in a substituted path
    print(f"runs: {shlex.join(substituted)}")

    d = DaemonProcess(config, workdir / "s.sock", workdir / "d.log", cli_env, argv=substituted)
    try:
        d.wait_ready()
        answer = d.complete()
        assert answer["choices"][0]["text"].startswith(" alpha") and answer["adapter"]["version"] == "alpha"
    finally:
        rc = d.stop()
        print(d.log[-2000:])
    assert rc == 0
    if "--log-format" in argv and argv[argv.index("--log-format") + 1] == "json":
        records = [json.loads(line) for line in d.log.splitlines() if line.strip()]  # every line one JSON object
        assert any(r["logger"] == "hotswapd.daemon" and r["message"].startswith("ready in ") for r in records)
