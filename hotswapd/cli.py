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
from collections.abc import Sequence
from pathlib import Path

from hotswap_core.errors import AdapterRejected, ConfigError, HotswapError

EXIT_OK, EXIT_REJECTED, EXIT_CONFIG, EXIT_RUNTIME = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hotswapd", description=__doc__)
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    verbs = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    v = verbs.add_parser("check-config", help="validate a config file: prints OK or every problem (exit 0 / 2)")
    v.add_argument("config")

    v = verbs.add_parser("validate", help="offline report on an adapter folder (exit 0 valid / 1 rejected)")
    v.add_argument("adapter_dir")
    v.add_argument("--config", required=True)
    v.add_argument("--json", action="store_true", help="machine-readable report")

    v = verbs.add_parser("demo", help="build a tiny local model, tokenizer and example adapters, then show a swap")
    v.add_argument("--dir", default="hotswapd-demo", help="where to put the demo assets (default: ./hotswapd-demo)")
    v.add_argument("--no-serve", action="store_true", help="only build the assets")
    v.add_argument("--force", action="store_true", help="rebuild the assets even if they exist")
    return p


def _quiet_libraries() -> None:
    """Our own log lines and output only: no download/loading progress bars, no deprecation chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        if args.verb == "check-config":
            return _check_config(args.config)
        if args.verb == "validate":
            return _validate(args.adapter_dir, args.config, args.json)
        if args.verb == "demo":
            return _demo(Path(args.dir), serve=not args.no_serve, force=args.force)
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


def _demo(root: Path, serve: bool, force: bool) -> int:
    from hotswapd.demo import build_demo

    t0 = time.monotonic()
    assets = build_demo(root, force=force)
    print(f"demo assets in {assets.root} ({time.monotonic() - t0:.1f}s)")
    print(f"  base model + tokenizer: {assets.base}\n  adapters: {assets.alpha}, {assets.bravo}")
    print(f"  broken examples: {', '.join(sorted(assets.broken))}\n  watched folder: {assets.watched}")
    print(f"  config: {assets.config}")
    if not serve:
        return EXIT_OK
    return _demo_swap(assets.config, assets.bravo)


def _demo_swap(config_path: Path, bravo: Path) -> int:
    """In-process tour of the core: compile, serve alpha, swap bravo in atomically, roll back."""
    from hotswap_core.config import load_config
    from hotswap_core.engine import Engine
    from hotswap_core.history import History
    from hotswap_core.swap import Swapper

    config = load_config(config_path)
    engine = Engine(config)
    print("loading and compiling (cold: about a minute on 2 CPU cores; warm cache: seconds)...")
    engine.load()
    engine.warm_up()
    engine.start()
    try:
        swapper = Swapper(engine, config.validation, History(None))
        assert config.adapter.initial is not None
        swapper.swap(config.adapter.initial, source="initial")
        prompt = "Hello =>"
        for step in ("initial", "swap", "rollback"):
            if step == "swap":
                rec = swapper.swap(bravo)
                print(
                    f"swapped in {rec.version}: {rec.result}, stall {1e6 * (rec.stall_s or 0):.0f} us, "
                    + ", ".join(f"{k} {v * 1000:.1f} ms" for k, v in rec.phases.items())
                )
            elif step == "rollback":
                rec = swapper.rollback()
                print(f"rolled back to {rec.version}")
            (res,) = engine.generate([prompt])
            print(f"  [{res.adapter.version}] {prompt!r} -> {res.text!r}")
        print(f"recompilations after warm-up: {engine.recompilations}")
    finally:
        engine.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
