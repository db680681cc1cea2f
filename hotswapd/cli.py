"""``hotswapd VERB``: the command line. The only place that prints and turns errors into exit codes.

Exit codes: 0 ok, 1 adapter rejected (``validate``), 2 bad config or usage, 3 runtime failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hotswap_core.errors import AdapterRejected, ConfigError, HotswapError
from hotswapd.client import DEFAULT_SOCKET, EXIT_CONFIG, EXIT_OK, EXIT_REJECTED, EXIT_RUNTIME, run_client_verb

if TYPE_CHECKING:
    from hotswap_core.warmup import WarmupStep
    from hotswapd.daemon import Daemon
    from hotswapd.demo import DemoAssets

CLIENT_VERBS = ("status", "generate", "swap", "rollback", "refresh")


DESCRIPTION = """\
Serve a torch.compile'd model over a Unix socket and hot-swap its LoRA adapter in place.

  hotswapd demo                         build a tiny local model and two adapters, then serve them
  hotswapd run --config FILE            the daemon (systemd: see systemd/hotswapd.service)
  hotswapd status | generate | swap | rollback | refresh   talk to a running daemon (--socket or $HOTSWAPD_SOCKET)
"""
EPILOG = "Exit codes: 0 ok, 1 adapter rejected, 2 bad config or usage, 3 runtime failure or daemon unreachable."


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """--log-level / --log-format, accepted before or after the verb (as a unit's ExecStart= writes them).

    The copies on each verb default to SUPPRESS, so they only override what was given before the verb.
    """
    level = "INFO" if defaults else argparse.SUPPRESS
    fmt = "text" if defaults else argparse.SUPPRESS
    parser.add_argument("--log-level", default=level, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    parser.add_argument("--log-format", default=fmt, choices=["text", "json"], help="json: one object per line")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hotswapd", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    _global_options(p, defaults=True)
    common = argparse.ArgumentParser(add_help=False)
    _global_options(common, defaults=False)
    subparsers = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    def verb(name: str, *, parents: Sequence[argparse.ArgumentParser] = (), **kw: Any) -> argparse.ArgumentParser:
        """A verb's parser; every verb also takes the global options."""
        return subparsers.add_parser(name, parents=[*parents, common], **kw)

    v = verb("run", help="the daemon: serve the model, watch for adapters, swap them in")
    v.add_argument("--config", required=True)

    v = verb("check-config", help="validate a config file: prints OK or every problem (exit 0 / 2)")
    v.add_argument("config")

    v = verb("validate", help="offline report on an adapter folder (exit 0 valid / 1 rejected)")
    v.add_argument("adapter_dir")
    v.add_argument("--config", required=True)
    v.add_argument("--json", action="store_true", help="machine-readable report")

    v = verb("demo", help="build a tiny local model, tokenizer and example adapters, then show a swap")
    v.add_argument("--dir", default="hotswapd-demo", help="where to put the demo assets (default: ./hotswapd-demo)")
    v.add_argument("--no-serve", action="store_true", help="only build the assets")
    v.add_argument("--force", action="store_true", help="rebuild the assets even if they exist")

    v = verb("bench", help="measure swaps, latency, throughput and start-up against the alternatives")
    v.add_argument("--model", default="demo", help="demo (default), a model folder or Hub id, or a hotswapd config")
    v.add_argument("--quick", action="store_true", help="fewer repetitions: a few minutes on 2 CPU cores")
    v.add_argument("--json", metavar="OUT", help="also write every figure to OUT as JSON")
    v.add_argument(
        "--geometry",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the serving figures on a Qwen2.5-1.5B-geometry model too (default: in the full run, not with --quick)",
    )
    v.add_argument("--workdir", help=argparse.SUPPRESS)  # keep the adapters, configs and daemon logs there
    v.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # seconds, no compile: for the test
    v.add_argument("--fleet", action="store_true", help="instead: fleet convergence (a branch moved -> live on all)")
    v.add_argument("--replicas", type=int, default=3, help="--fleet: replicas following the branch (default 3)")
    v.add_argument("--promotions", type=int, default=10, help="--fleet: branch moves to measure (default 10)")
    v.add_argument("--poll-seconds", type=float, default=5.0, help="--fleet: source.hub.poll_seconds (default 5)")

    client = argparse.ArgumentParser(add_help=False)
    client.add_argument(
        "--socket", default=None, help=f"the daemon's socket (default: $HOTSWAPD_SOCKET, else {DEFAULT_SOCKET})"
    )
    client.add_argument("--json", action="store_true", help="print the daemon's JSON answer")
    verb("status", parents=[client], help="readiness, live and standby versions, recent swaps")
    v = verb("generate", parents=[client], help="complete PROMPT with the live adapter")
    v.add_argument("prompt")
    v.add_argument("--max-tokens", type=int, default=32)
    v.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    v.add_argument("--stream", action="store_true", help="print text as it is generated")
    v = verb("swap", parents=[client], help="validate the adapter folder PATH and make it live (admin)")
    v.add_argument("path")
    verb("rollback", parents=[client], help="make the previous version live again (admin)")
    verb("refresh", parents=[client], help="make the adapter source look now, e.g. after a push to the Hub (admin)")
    return p


def _quiet_libraries() -> None:
    """Our own log lines and output only: no download/loading progress bars, no deprecation chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for name in ("httpx", "httpx2", "httpcore", "httpcore2"):  # huggingface_hub's HTTP stack: a line per request
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # `hotswapd status | head -4`: the reader went away. Quiet, as coreutils are; stdout goes to
        # /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for `cat` in the same place


def _main(argv: Sequence[str] | None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    _setup_logging(args.log_level, args.log_format)
    try:
        if args.verb in CLIENT_VERBS:
            return run_client_verb(args)
        if args.verb == "run":
            return _run(args.config, progress_bar=_progress_bar(args.log_format))
        if args.verb == "check-config":
            return _check_config(args.config)
        if args.verb == "validate":
            return _validate(args.adapter_dir, args.config, args.json)
        if args.verb == "demo":
            return _demo(Path(args.dir), serve=not args.no_serve, force=args.force, log_format=args.log_format)
        if args.verb == "bench":
            return _bench(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return EXIT_CONFIG
    except HotswapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except KeyboardInterrupt:
        return 130
    raise AssertionError(f"unhandled verb {args.verb}")


def _setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])


def _run(
    config_path: str,
    on_ready: Callable[[Daemon], None] | None = None,
    progress_bar: Callable[[WarmupStep | None], None] | None = None,
) -> int:
    from hotswap_core.config import load_config
    from hotswapd.daemon import Daemon

    daemon = Daemon(config_path, load_config(config_path))
    daemon.on_ready = on_ready
    daemon.on_warmup = progress_bar
    daemon.metrics_port_fallback = on_ready is not None  # the demo: a busy 9464 must not spoil it
    return daemon.run()


def _check_config(path: str) -> int:
    from hotswap_core.config import load_config

    try:
        load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return EXIT_CONFIG
    print(f"OK {path}")
    return EXIT_OK


def _validate(adapter_dir: str, config_path: str, as_json: bool) -> int:
    from hotswap_core.adapters import validate_adapter
    from hotswap_core.config import load_config
    from hotswap_core.layout import layout_from_config

    config = load_config(config_path)
    layout = layout_from_config(config)
    try:
        spec = validate_adapter(adapter_dir, layout, config.validation)
    except AdapterRejected as exc:
        report = {"adapter": adapter_dir, "valid": False, "reason": exc.reason, "message": exc.message}
        if as_json:
            print(json.dumps(report))
        else:
            print(f"REJECTED {adapter_dir}\n  reason:  {exc.reason}\n  message: {exc.message}")
        return EXIT_REJECTED
    ranks = sorted({m.rank for m in spec.modules.values()})
    report = {
        "adapter": adapter_dir,
        "valid": True,
        "version": spec.version,
        "sha256": spec.sha256,
        "size_bytes": spec.size_bytes,
        "base_model": spec.base_model,
        "modules": len(spec.modules),
        "layout_modules": len(layout.modules),
        "ranks": ranks,
    }
    if as_json:
        print(json.dumps(report))
    else:
        print(
            f"VALID {adapter_dir}\n  version: {spec.version}\n  sha256:  {spec.sha256}\n"
            f"  targets: {len(spec.modules)} of {len(layout.modules)} layout modules, ranks {ranks}"
            f" (target_rank {layout.target_rank})\n  base:    {spec.base_model}\n  size:    {spec.size_bytes} bytes"
        )
    return EXIT_OK


def _demo(root: Path, serve: bool, force: bool, log_format: str) -> int:
    from hotswap_core.config import check_socket_path
    from hotswapd.demo import DemoAssets, build_demo

    # Before the asset build: a folder too deep for a Unix socket path should fail in a second, not after it.
    check_socket_path("--dir", str(DemoAssets.at(root.absolute()).socket))
    t0 = time.monotonic()
    assets = build_demo(root, force=force)
    print(f"demo assets in {assets.root} ({time.monotonic() - t0:.1f}s)")
    print(f"  base model + tokenizer: {assets.base}\n  adapters: {assets.alpha}, {assets.bravo}")
    print(f"  broken examples: {', '.join(sorted(assets.broken))}\n  watched folder: {assets.watched}")
    print(f"  config: {assets.config}")
    if not serve:
        return EXIT_OK
    print("starting the daemon: the first start compiles the model (minutes on a small CPU), later starts reuse")
    print(f"the compile cache in {assets.root / 'cache'}", flush=True)
    return _run(str(assets.config), on_ready=_demo_ready(assets), progress_bar=_progress_bar(log_format))


def _bench(args: argparse.Namespace) -> int:
    from hotswapd.bench.runner import BenchConfig, Mode, run_bench

    if args.log_level == "INFO":  # hundreds of in-process swaps would each log a line; DEBUG shows them
        logging.getLogger("hotswapd").setLevel(logging.WARNING)
    workdir = Path(args.workdir).absolute() if args.workdir else None
    if args.fleet:
        return _bench_fleet(args, workdir)
    mode: Mode = "tiny" if args.tiny else "quick" if args.quick else "full"
    extra = {} if args.geometry is None else {"geometry": args.geometry}
    config = BenchConfig.preset(mode, model=args.model, workdir=workdir, **extra)
    result = run_bench(config, progress=lambda line: print(f"bench: {line}", file=sys.stderr, flush=True))
    print(result.table)
    if args.json:
        Path(args.json).write_text(result.to_json() + "\n")
        print(f"\nevery figure: {args.json}")
    return EXIT_OK


def _bench_fleet(args: argparse.Namespace, workdir: Path | None) -> int:
    from hotswapd.bench.fleet import run_fleet_bench
    from hotswapd.bench.report import finite_or_null

    started = time.perf_counter()
    figures = run_fleet_bench(
        args.model, args.replicas, args.promotions, args.poll_seconds, workdir,
        say=lambda line: print(f"bench: [{time.perf_counter() - started:5.0f} s] {line}", file=sys.stderr, flush=True),
    )  # fmt: skip
    print(figures.pop("table"))
    if args.json:
        Path(args.json).write_text(json.dumps(finite_or_null(figures), indent=2) + "\n")
        print(f"\nevery figure: {args.json}")
    return EXIT_OK


def _demo_ready(assets: DemoAssets) -> Callable[[Daemon], None]:
    """Print the three lines a newcomer needs, then show each swap as a completion that changes."""
    from hotswap_core.generation import SamplingParams

    prompt = "Hello =>"

    def show(daemon: Daemon) -> None:
        assert daemon.engine is not None
        (res,) = daemon.engine.generate([prompt], SamplingParams(max_tokens=8))
        print(f"live: {res.adapter.version:<8} {prompt!r} -> {res.text!r}", flush=True)

    def on_ready(daemon: Daemon) -> None:
        sock, watched = assets.socket, assets.watched
        body = json.dumps({"prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert daemon.swapper is not None
        # Suggest the example that is not live (a second run restores what the first left live).
        live_path = daemon.swapper.live.path or ""
        other = assets.alpha if Path(live_path).name.startswith("bravo") else assets.bravo
        print(f"\nhotswapd is serving on {sock}. In another terminal:\n", flush=True)
        print(f"  export HOTSWAPD_SOCKET={sock}   # for hotswapd status / generate / swap / rollback")
        print(f"  curl -s --unix-socket {sock} http://localhost/v1/completions -d '{body}'")
        print(f"  cp -r {other} {watched}/.incoming && mv {watched}/.incoming {watched}/{other.name}-$(date +%s)")
        print(f"  curl -s {daemon.metrics_url or '(metrics disabled)'} | grep '^hotswapd_swap'")
        print("  hotswapd status\n")
        print("Ctrl-C stops it.", flush=True)
        show(daemon)
        daemon.swapper.listeners.append(
            lambda result, rec: show(daemon) if result in ("success", "rolled_back") else None
        )

    return on_ready


def _progress_bar(log_format: str) -> Callable[[WarmupStep | None], None] | None:
    """A one-line warm-up bar on stderr when it is a terminal (text logs); else None: log lines per step."""
    if log_format != "text" or not sys.stderr.isatty():
        return None
    width = 24

    def show(step: WarmupStep | None) -> None:
        if step is None:
            sys.stderr.write("\n")
            sys.stderr.flush()
            return
        done = round(width * (step.k - 1) / step.total)
        eta = f", ~{step.eta_s:.0f}s left" if step.eta_s is not None else ", compiling (minutes when cold)"
        line = f"warming up [{'#' * done}{'.' * (width - done)}] {step.describe()}, {step.elapsed_s:.0f}s{eta}"
        sys.stderr.write(f"\r{line}\x1b[K")
        sys.stderr.flush()

    return show


class JsonFormatter(logging.Formatter):
    """One JSON object per line (journald / log shippers)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


if __name__ == "__main__":
    sys.exit(main())
