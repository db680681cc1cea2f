from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hotswap_core.config import config_from_dict, load_config
from hotswap_core.errors import ConfigError

MINIMAL = {
    "model": {"path": "org/model"},
    "adapter": {"target_modules": ["q_proj", "v_proj"], "target_rank": 8},
    "source": {"kind": "directory", "directory": {"path": "/srv/adapters"}},
}


def with_(overrides: dict, base: dict | None = None) -> dict:
    """Deep-merge ``overrides`` into a copy of ``base`` (MINIMAL by default)."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (base or MINIMAL).items()}
    for key, value in overrides.items():
        out[key] = (
            with_(value, out.get(key, {})) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


def problems(raw: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw)
    return info.value.problems


def test_minimal_config_gets_defaults() -> None:
    c = config_from_dict(MINIMAL)
    assert c.model.path == "org/model"
    assert c.adapter.target_modules == ("q_proj", "v_proj")
    assert c.source.directory.settle_seconds == 1.0
    assert c.metrics.listen == "127.0.0.1:9464"  # loopback by default
    assert c.server.listen_tcp is None  # inference over TCP only when asked for
    assert c.source.hub.poll_jitter == 0.1
    assert c.validation.allow_pickle is False
    with pytest.raises(AttributeError):
        c.model.path = "x"  # type: ignore[misc]  # frozen


def test_listeners_may_be_any_host_when_asked_for() -> None:
    c = config_from_dict(with_({"metrics": {"listen": "0.0.0.0:9464"}, "server": {"listen_tcp": "[::]:8000"}}))
    assert (c.metrics.listen, c.server.listen_tcp) == ("0.0.0.0:9464", "[::]:8000")  # a pod: probes and scrapes


def test_wrong_type_names_the_key_path() -> None:
    got = problems(with_({"source": {"directory": {"settle_seconds": "soon"}}}))
    assert got == ["source.directory.settle_seconds: expected a number, got 'soon'"]


def test_unknown_keys_are_errors_with_their_path() -> None:
    got = problems(with_({"model": {"compile": {"enabeld": True}}, "extra": 1}))
    assert "model.compile.enabeld: unknown key" in got
    assert "extra: unknown key" in got


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"adapter": {"target_rank": 0}}, "adapter.target_rank: must be >= 1, got 0"),
        ({"model": {"path": ""}}, "model.path: required"),
        (
            {"model": {"max_batch_size": 8}, "server": {"max_queue": 4}},
            "server.max_queue: must be >= model.max_batch_size (8), got 4",
        ),
        ({"validation": {"max_adapter_bytes": -1}}, "validation.max_adapter_bytes: must be > 0, got -1"),
        ({"model": {"device": "tpu"}}, "model.device: expected one of 'auto', 'cuda', 'cpu', got 'tpu'"),
        ({"model": {"max_batch_size": True}}, "model.max_batch_size: expected an integer, got True"),
        ({"metrics": {"listen": "9464"}}, "metrics.listen: expected HOST:PORT"),
        ({"source": {"kind": "hub"}}, "source.hub.repo_id: required"),
        (
            {"server": {"listen_tcp": "8000"}},
            "server.listen_tcp: expected HOST:PORT such as 127.0.0.1:8000, got '8000'",
        ),
        ({"server": {"listen_tcp": "[::1]:99999"}}, "server.listen_tcp: expected HOST:PORT"),
        ({"source": {"hub": {"poll_jitter": 1.0}}}, "source.hub.poll_jitter: must be >= 0 and < 1"),
        ({"source": {"hub": {"poll_jitter": -0.1}}}, "source.hub.poll_jitter: must be >= 0 and < 1"),
        ({"model": {"prefill_chunk_tokens": 8}}, "model.prefill_chunk_tokens: must be 'auto', null or >= 16, got 8"),
        ({"model": {"prefill_chunk_tokens": "big"}}, "model.prefill_chunk_tokens: expected 'auto' or an integer"),
    ],
)
def test_impossible_values(override: dict, expected: str) -> None:
    assert any(p.startswith(expected) for p in problems(with_(override))), problems(with_(override))


def test_missing_model_section_is_an_error() -> None:
    raw = {k: v for k, v in MINIMAL.items() if k != "model"}
    assert any(p.startswith("model.path: required") for p in problems(raw))


def test_every_problem_is_reported_at_once() -> None:
    got = problems(with_({"adapter": {"target_rank": "eight"}, "server": {"max_queue": "many"}}))
    assert len(got) == 2


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "base").mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "model: {path: base}\nadapter: {target_modules: [q_proj], target_rank: 4}\n"
        "source: {directory: {path: adapters}}\nstate_dir: state\n"
    )
    c = load_config(cfg)
    assert c.model.path == str(tmp_path / "base")
    assert c.source.directory.path == str(tmp_path / "adapters")
    assert c.state_dir == str(tmp_path / "state")


def test_hub_id_is_not_treated_as_a_path(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: org/model}\nadapter: {target_modules: [q_proj]}\nsource: {kind: none}\n")
    assert load_config(cfg).model.path == "org/model"


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "hotswapd.cli", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


def test_check_config_cli(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("model: {path: org/model}\nadapter: {target_modules: [q_proj]}\nsource: {kind: none}\n")
    out = _check_config(good)
    assert out.returncode == 0 and out.stdout.startswith("OK"), out
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "model: {path: org/model}\nadapter: {target_modules: [q_proj]}\n"
        "source: {directory: {path: x, settle_seconds: soon}}\n"
    )
    out = _check_config(bad)
    assert out.returncode == 2
    assert "source.directory.settle_seconds: expected a number, got 'soon'" in out.stdout
    missing = _check_config(tmp_path / "nope.yaml")
    assert missing.returncode == 2 and "no such file" in missing.stdout


@pytest.mark.parametrize("value", ["auto", True, False])
def test_cpp_wrapper_is_auto_or_a_boolean(value: object) -> None:
    assert config_from_dict(with_({"model": {"compile": {"cpp_wrapper": value}}})).model.compile.cpp_wrapper == value


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_cpp_wrapper_refuses_anything_else(value: object) -> None:
    got = problems(with_({"model": {"compile": {"cpp_wrapper": value}}}))
    assert got == [f"model.compile.cpp_wrapper: expected 'auto' or true or false, got {value!r}"]


@pytest.mark.parametrize(("value", "device", "chunk"), [("auto", "cuda", 2048), ("auto", "cpu", 128), (100, "cpu", 100),
                                                        (None, "cpu", 4096), (10_000, "cuda", 4096),
                                                        (4088, "cpu", 4088), (4090, "cpu", 4096)])  # fmt: skip
def test_prefill_chunk_tokens(value: object, device: str, chunk: int) -> None:
    """auto: 2048 on CUDA, 128 elsewhere; null: a whole prompt at once; a chunk within 8 tokens of the context (or
    past it) is none: the sliver it would split off is a shape warm-up does not run."""
    import torch

    from hotswap_core.runner import resolve_prefill_chunk

    config = config_from_dict(with_({"model": {"prefill_chunk_tokens": value, "max_seq_len": 4096}}))
    assert config.model.prefill_chunk_tokens == value
    assert resolve_prefill_chunk(value, torch.device(device), 4096) == chunk  # type: ignore[arg-type]
