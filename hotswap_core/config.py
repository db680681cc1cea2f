"""Typed, frozen configuration built once from YAML and passed down through constructors.

Every problem is reported with its key path, e.g.
``source.directory.settle_seconds: expected a number, got 'soon'``. Unknown keys are errors.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from hotswap_core.errors import ConfigError


@dataclass(frozen=True)
class CompileConfig:
    enabled: bool = True
    # auto: reduce-overhead (decode replayed as CUDA graphs) on CUDA, default on CPU.
    mode: Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "auto"
    # None lets dynamo decide; True traces symbolic shapes from the first call, which keeps the
    # number of graphs small when prompt lengths and batch sizes vary.
    dynamic: bool | None = True
    # Persistent inductor/FX cache; a warm cache turns a cold compile of minutes into seconds.
    cache_dir: str | None = None
    recompile_limit: int = 64
    # Inductor's C++ wrapper: the whole compiled graph is one call that runs without the GIL, so the event loop
    # and a swap's Python no longer stall it (the step's own Python around it still takes turns with them).
    # auto: on for CPU, off on CUDA (there CUDA graphs replay the step).
    cpp_wrapper: Literal["auto"] | bool = "auto"


@dataclass(frozen=True)
class ModelConfig:
    path: str = ""  # local folder or Hugging Face Hub id
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    compile: CompileConfig = field(default_factory=CompileConfig)
    max_batch_size: int = 8
    max_seq_len: int = 512
    trust_remote_code: bool = False
    # The base model's linears on a CPU: auto (oneDNN prepacked weights in float32, where torch has oneDNN) |
    # onednn (also bfloat16; an error without oneDNN) | aten (F.linear, as transformers runs them). No effect on CUDA.
    cpu_linear: Literal["auto", "onednn", "aten"] = "auto"
    # Intra-op threads of the CPU kernels: auto (torch's count: one per physical core, or OMP_NUM_THREADS) | a
    # number (1: a sidecar that leaves the other cores to its neighbours). See cpu_threads.py.
    cpu_threads: Literal["auto"] | int = "auto"
    # Prompt positions one engine step prefills, all rows together, padding included (vLLM's
    # max_num_batched_tokens, less the decode rows): a longer prompt is prefilled a chunk of this many a step, between
    # which the running rows decode, so no prompt, and no number of prompts arriving at once, stalls the streams for
    # longer than one such chunk's forward (scheduler.plan_prefill). auto: 2048 on CUDA, 128 on CPU; null: every
    # prompt whole in the step it is admitted, however long and however many.
    prefill_chunk_tokens: Literal["auto"] | int | None = "auto"


@dataclass(frozen=True)
class AdapterConfig:
    target_modules: tuple[str, ...] = ()
    target_rank: int = 8
    initial: str | None = None


@dataclass(frozen=True)
class DirectorySourceConfig:
    path: str = ""
    settle_seconds: float = 1.0
    rescan_seconds: float = 30.0
    polling: bool = False
    marker: str | None = None
    # A file inside a version folder that resolves outside the watched folder (a symlink to
    # /etc/shadow, say) is refused (outside_watched_folder) unless this is true.
    follow_symlinks: bool = False


@dataclass(frozen=True)
class HubSourceConfig:
    repo_id: str = ""
    revision: str = "main"
    poll_seconds: float = 60.0
    token_file: str | None = None
    endpoint: str | None = None
    # Downloads kept on disk: the live commit plus the newest previous ones of the rollback chain;
    # every other snapshot is deleted once a new commit is live.
    keep_versions: int = 3
    # Each wait between polls is poll_seconds x a random factor in [1 - poll_jitter, 1 + poll_jitter], so the
    # replicas of a fleet spread their polls instead of hitting the Hub in lockstep (the mean stays poll_seconds).
    poll_jitter: float = 0.1


@dataclass(frozen=True)
class SourceConfig:
    kind: Literal["directory", "hub", "none"] = "directory"
    directory: DirectorySourceConfig = field(default_factory=DirectorySourceConfig)
    hub: HubSourceConfig = field(default_factory=HubSourceConfig)


@dataclass(frozen=True)
class ValidationConfig:
    base_model_must_match: bool = True
    max_adapter_bytes: int = 2 * 1024**3
    max_header_bytes: int = 16 * 1024**2
    allow_pickle: bool = False
    check_finite: bool = True
    smoke_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    socket: str = "/run/hotswapd/hotswapd.sock"
    socket_mode: int = 0o660
    admin_uids: tuple[int, ...] | None = None  # None: the daemon's own uid and root
    max_queue: int = 64
    request_timeout_s: float = 120.0
    max_body_bytes: int = 1024 * 1024
    # SIGTERM: stop accepting, then wait this long for in-flight requests before cancelling them.
    drain_timeout_s: float = 30.0
    # Folders an admin ``POST /v1/adapters/swap`` may take adapters from. None: the watched folder
    # and the folder holding adapter.initial.
    swap_roots: tuple[str, ...] | None = None
    # HOST:PORT serving the inference endpoints (completions, chat, models, health) over TCP for a fleet
    # router; None: the Unix socket only. Admin verbs (swap, rollback, refresh) are never served over TCP.
    listen_tcp: str | None = None


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    listen: str = "127.0.0.1:9464"


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    state_dir: str = "/var/lib/hotswapd"


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, type-check and validate a YAML config file. Raises ConfigError naming every problem.

    Relative paths inside the file are resolved against the file's directory.
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such file"]) from None
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError([f"{path}: cannot parse YAML: {exc}"]) from None
    return config_from_dict(raw if raw is not None else {}, base_dir=path.parent.resolve())


def config_from_dict(raw: Any, base_dir: Path | None = None) -> Config:
    problems: list[str] = []
    config = _build(Config, raw, "", problems)
    if not problems:
        problems.extend(_check_values(config))
    if problems:
        raise ConfigError(problems)
    assert isinstance(config, Config)
    config = _resolve_paths(config, base_dir) if base_dir is not None else config
    check_socket_path("server.socket", config.server.socket)
    return config


# sun_path in unix(7) is 108 bytes, NUL included: a longer path fails only at bind() time.
MAX_SOCKET_PATH_BYTES = 107


def check_socket_path(key: str, path: str) -> None:
    """Raise ConfigError naming ``key`` when ``path`` is too long to bind as a Unix socket."""
    size = len(os.fsencode(path))
    if size > MAX_SOCKET_PATH_BYTES:
        raise ConfigError(
            [f"{key}: the socket path {path} is {size} bytes; Unix socket paths must be at most "
             f"{MAX_SOCKET_PATH_BYTES} bytes (unix(7)): choose a shorter folder"]
        )  # fmt: skip


def split_host_port(value: str) -> tuple[str, int] | None:
    """``HOST:PORT`` (``[::1]:9464`` for IPv6) as ``(host, port)``; None when it is not one."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        return None
    return host.strip("[]"), int(port)


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _expected(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _build(tp: Any, value: Any, key: str, problems: list[str]) -> Any:
    """Convert ``value`` to the annotated type ``tp``, appending ``key: message`` on mismatch."""
    where = key or "<top level>"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            problems.append(f"{where}: expected a mapping, got {_describe(value)}")
            return tp()
        hints = typing.get_type_hints(tp)
        names = {f.name for f in dataclasses.fields(tp)}
        for unknown in sorted(set(map(str, value)) - names):
            problems.append(f"{key + '.' if key else ''}{unknown}: unknown key")
        kwargs = {
            name: _build(hints[name], value[name], f"{key + '.' if key else ''}{name}", problems)
            for name in names
            if name in value
        }
        return tp(**kwargs)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _build(inner[0], value, key, problems)
        for alternative in inner:  # the first that takes the value; else one problem naming them all
            tried: list[str] = []
            built = _build(alternative, value, key, tried)
            if not tried:
                return built
        problems.append(f"{where}: expected {' or '.join(map(_expected, inner))}, got {_describe(value)}")
        return None  # a config with problems is never built
    if origin is Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            problems.append(f"{where}: expected one of {choices}, got {_describe(value)}")
            return args[0]
        return value
    if origin is tuple:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item where a list is expected is common in hand-written YAML
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {_describe(value)}")
            return ()
        return tuple(_build(args[0], v, f"{key}[{i}]", problems) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            problems.append(f"{where}: expected true or false, got {_describe(value)}")
            return False
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{where}: expected an integer, got {_describe(value)}")
            return 0
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            problems.append(f"{where}: expected a number, got {_describe(value)}")
            return 0.0
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            problems.append(f"{where}: expected a string, got {_describe(value)}")
            return ""
        return value
    raise TypeError(f"unsupported config type {tp!r} at {where}")  # programming error


def _check_values(c: Config) -> list[str]:
    """Impossible values, once the types are right."""
    p: list[str] = []
    if not c.model.path:
        p.append("model.path: required (a local model folder or a Hugging Face Hub id)")
    positive = {
        "model.max_batch_size": c.model.max_batch_size,
        "model.max_seq_len": c.model.max_seq_len,
        "model.compile.recompile_limit": c.model.compile.recompile_limit,
        "validation.max_adapter_bytes": c.validation.max_adapter_bytes,
        "validation.max_header_bytes": c.validation.max_header_bytes,
        "server.max_queue": c.server.max_queue,
        "server.request_timeout_s": c.server.request_timeout_s,
        "server.max_body_bytes": c.server.max_body_bytes,
        "server.drain_timeout_s": c.server.drain_timeout_s,
        "source.directory.rescan_seconds": c.source.directory.rescan_seconds,
        "source.hub.poll_seconds": c.source.hub.poll_seconds,
        "source.hub.keep_versions": c.source.hub.keep_versions,
    }
    p += [f"{k}: must be > 0, got {v!r}" for k, v in positive.items() if v <= 0]
    if 0 < c.server.max_queue < c.model.max_batch_size:  # else a request with that many prompts x n waits forever
        p.append(
            f"server.max_queue: must be >= model.max_batch_size ({c.model.max_batch_size}), got "
            f"{c.server.max_queue}: a request's prompts and choices are queued together"
        )
    chunk = c.model.prefill_chunk_tokens
    if isinstance(chunk, int) and chunk < 16:
        p.append(f"model.prefill_chunk_tokens: must be 'auto', null or >= 16, got {chunk}")
    if isinstance(c.model.cpu_threads, int) and c.model.cpu_threads < 1:
        p.append(f"model.cpu_threads: must be 'auto' or >= 1, got {c.model.cpu_threads}")
    if c.adapter.target_rank < 1:
        p.append(f"adapter.target_rank: must be >= 1, got {c.adapter.target_rank}")
    if not c.adapter.target_modules:
        p.append("adapter.target_modules: required (e.g. [q_proj, v_proj])")
    if c.source.directory.settle_seconds < 0:
        p.append(f"source.directory.settle_seconds: must be >= 0, got {c.source.directory.settle_seconds}")
    if c.source.kind == "directory" and not c.source.directory.path:
        p.append("source.directory.path: required when source.kind is 'directory'")
    if c.source.kind == "hub" and not c.source.hub.repo_id:
        p.append("source.hub.repo_id: required when source.kind is 'hub'")
    if not 0 <= c.server.socket_mode <= 0o777:
        p.append(f"server.socket_mode: must be a file mode such as 0o660, got {c.server.socket_mode!r}")
    if any(uid < 0 for uid in c.server.admin_uids or ()):
        p.append("server.admin_uids: uids must be >= 0")
    if not 0 <= c.source.hub.poll_jitter < 1:
        p.append(
            f"source.hub.poll_jitter: must be >= 0 and < 1 (a fraction of poll_seconds), got {c.source.hub.poll_jitter}"
        )
    listeners = {
        "metrics.listen": (c.metrics.listen, "127.0.0.1:9464"),
        "server.listen_tcp": (c.server.listen_tcp, "127.0.0.1:8000"),
    }
    for key, (value, example) in listeners.items():
        if value is not None and split_host_port(value) is None:
            p.append(f"{key}: expected HOST:PORT such as {example}, got {value!r}")
    if not c.state_dir:
        p.append("state_dir: required")
    return p


def _resolve(base_dir: Path, value: str | None) -> str | None:
    if not value:
        return value
    expanded = Path(os.path.expanduser(value))
    return str(expanded if expanded.is_absolute() else (base_dir / expanded).resolve())


def _resolve_paths(c: Config, base_dir: Path) -> Config:
    """Relative paths in a config file mean "relative to that file", not to the working directory."""
    model_path = c.model.path
    # A Hub id ("org/name") is not a path; only resolve what exists or looks like a path.
    if model_path.startswith((".", "/", "~")) or (base_dir / model_path).exists():
        model_path = _resolve(base_dir, model_path) or model_path
    compile_cfg = dataclasses.replace(c.model.compile, cache_dir=_resolve(base_dir, c.model.compile.cache_dir))
    initial = c.adapter.initial
    if initial and not initial.startswith("hub:"):
        initial = _resolve(base_dir, initial)
    return dataclasses.replace(
        c,
        model=dataclasses.replace(c.model, path=model_path, compile=compile_cfg),
        adapter=dataclasses.replace(c.adapter, initial=initial),
        source=dataclasses.replace(
            c.source,
            directory=dataclasses.replace(c.source.directory, path=_resolve(base_dir, c.source.directory.path) or ""),
            hub=dataclasses.replace(c.source.hub, token_file=_resolve(base_dir, c.source.hub.token_file)),
        ),
        server=dataclasses.replace(
            c.server,
            socket=_resolve(base_dir, c.server.socket) or "",
            swap_roots=None
            if c.server.swap_roots is None
            else tuple(_resolve(base_dir, r) or r for r in c.server.swap_roots),
        ),
        state_dir=_resolve(base_dir, c.state_dir) or "",
    )


# What SIGHUP may change in a running daemon; everything else needs a restart.
LIVE_SERVER_KEYS = ("admin_uids", "request_timeout_s", "drain_timeout_s", "swap_roots")


def apply_reload(old: Config, new: Config) -> tuple[Config, list[str]]:
    """The config a reload leads to: ``new``'s source (same kind), validation and live server keys on
    top of ``old``; and the key paths that changed but cannot be applied without a restart."""
    refused = [k for k in ("model", "adapter", "state_dir", "metrics") if getattr(new, k) != getattr(old, k)]
    refused += [
        f"server.{f.name}"
        for f in dataclasses.fields(old.server)
        if f.name not in LIVE_SERVER_KEYS and getattr(new.server, f.name) != getattr(old.server, f.name)
    ]
    source = new.source
    if new.source.kind != old.source.kind:
        refused.append("source.kind")
        source = old.source
    server = dataclasses.replace(old.server, **{k: getattr(new.server, k) for k in LIVE_SERVER_KEYS})
    return dataclasses.replace(old, source=source, validation=new.validation, server=server), refused


def swap_roots(c: Config) -> tuple[str, ...]:
    """Where admin swaps may read adapters from (``server.swap_roots``, or its default)."""
    if c.server.swap_roots is not None:
        return c.server.swap_roots
    roots = [c.source.directory.path] if c.source.kind == "directory" and c.source.directory.path else []
    if c.adapter.initial:
        roots.append(str(Path(c.adapter.initial).parent))
    return tuple(roots)
