"""The swap transaction: validate -> load -> stage -> verify -> commit -> record.

Everything before commit touches only the standby slot while the live slot keeps serving, so any
failure leaves the live slot bitwise untouched: atomic by construction. Staging waits until no running
row is pinned to the standby slot (rows admitted before the previous commit), bounded by
``server.request_timeout_s``. Verify runs the smoke prompts as ordinary rows on standby, beside live
traffic. Commit changes which slot new rows get, run by the engine's worker before its next step; its
duration is the serving stall.
One transaction at a time (a lock); rollback is one more flip, or a re-stage from the recorded
files when a later staging has overwritten the standby slot.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from hotswap_core.adapters import AdapterSpec, inspect_adapter, load_adapter
from hotswap_core.config import ValidationConfig
from hotswap_core.cpu_threads import serial
from hotswap_core.engine import Engine
from hotswap_core.errors import AdapterRejected, SwapError
from hotswap_core.history import History, SwapRecord, fingerprint
from hotswap_core.slots import AdapterVersion

log = logging.getLogger("hotswapd.swap")


class _Timer:
    def __init__(self) -> None:
        self.phases: dict[str, float] = {}
        self.current = "validate"

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.current = name
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[name] = time.perf_counter() - t0


class Swapper:
    """Runs swap and rollback transactions against one engine."""

    def __init__(self, engine: Engine, validation: ValidationConfig, history: History) -> None:
        self.engine = engine
        self.validation = validation
        self.history = history
        # (kind, record): "seen" and "staged" as a transaction goes, then its result (success,
        # rejected, failed, rolled_back, unchanged) with the finished record.
        self.listeners: list[Callable[[str, SwapRecord], None]] = []
        self._lock = threading.Lock()

    @property
    def live(self) -> AdapterVersion:
        return self.engine.slots.live_version

    def swap(
        self,
        path: str | Path,
        *,
        version: str | None = None,
        source: str = "directory",
        seen_at: float | None = None,
        expect_sha256: str | None = None,
        within: str | Path | None = None,
    ) -> SwapRecord:
        """Validate the adapter folder at ``path`` and make it live. Never raises for a bad adapter:
        the returned record says ``rejected`` (with a reason code) or ``failed`` (with the phase).
        ``expect_sha256`` (restoring a recorded version) rejects the folder as ``changed`` if it differs.
        ``within``: every file read must resolve inside that folder, at the moment it is read
        (``outside_watched_folder`` otherwise; the directory source's watched folder)."""
        path = str(path)
        with self._lock, serial():  # tensor work off the engine's thread: cpu_threads.py
            started = time.time()
            timer = _Timer()
            if seen_at is not None:
                timer.phases["detect"] = max(0.0, time.monotonic() - seen_at)
            spec: AdapterSpec | None = None
            self._notify("seen", SwapRecord(version or Path(path).name, None, source, path, "seen", started_at=started))

            def outcome(
                result: str,
                reason: str | None = None,
                message: str | None = None,
                stall: float | None = None,
                committed: AdapterVersion | None = None,
            ) -> SwapRecord:
                name = spec.version if spec else (version or Path(path).name)
                sha = spec.sha256 if spec else None
                return self._finish(
                    SwapRecord(
                        name,
                        sha,
                        source,
                        path,
                        result,
                        reason,
                        message,
                        timer.phases,
                        stall_s=stall,
                        started_at=started,
                    ),
                    committed=committed,
                )

            try:
                with timer.phase("validate"):
                    spec = inspect_adapter(path, self.engine.layout, self.validation, version=version, within=within)
                if expect_sha256 is not None and spec.sha256 != expect_sha256:
                    raise AdapterRejected("changed", f"{path} no longer holds version {version} ({expect_sha256[:12]})")
                if spec.sha256 == self.live.sha256:
                    return outcome("unchanged")
                target = AdapterVersion(spec.version, spec.sha256, source, str(spec.path))
                with timer.phase("load"):
                    weights = load_adapter(spec, self.validation)
                stall = self._stage_verify_commit(target, spec, weights, timer)
            except AdapterRejected as exc:
                self.history.reject(path, fingerprint(path), exc.reason, exc.message)
                return outcome("rejected", exc.reason, exc.message)
            except Exception as exc:  # anything else is a failed transaction, never a dead daemon
                log.exception("swap of %s failed in phase %s", path, timer.current)
                return outcome("failed", f"{timer.current}_failed", str(exc))
            return outcome("success", stall=stall, committed=target)

    def restore(self, target: AdapterVersion) -> SwapRecord:
        """Make a recorded version live again from its files (start-up: the last committed version)."""
        if target.is_base:
            return SwapRecord(target.version, target.sha256, target.source, None, "unchanged")
        if target.path is None:
            raise SwapError("restore", f"version {target.version} has no recorded files")
        return self.swap(target.path, version=target.version, source=target.source, expect_sha256=target.sha256)

    def rollback(self) -> SwapRecord:
        """Make the previously committed version live again; it sticks across restarts."""
        with self._lock, serial():  # tensor work off the engine's thread: cpu_threads.py
            started = time.time()
            timer = _Timer()
            prev = self.history.previous()
            if prev is None:
                raise SwapError("rollback", "there is no previous version to roll back to")
            slots = self.engine.slots
            try:
                if slots.contents[slots.standby] != prev:
                    # A later staging overwrote standby: bring the previous version back from its files.
                    weights, scalings = self._reload(prev, timer)
                    self._stage(prev, weights, scalings, timer)
                stall = self._commit(timer)
            except AdapterRejected as exc:
                raise SwapError("rollback", f"previous version {prev.version} is no longer valid: {exc}") from exc
            return self._finish(
                SwapRecord(
                    prev.version,
                    prev.sha256,
                    prev.source,
                    prev.path,
                    "rolled_back",
                    phases=timer.phases,
                    stall_s=stall,
                    started_at=started,
                )
            )

    # ---- phases -----------------------------------------------------------------------------
    def _stage_verify_commit(self, target: AdapterVersion, spec: AdapterSpec, weights: dict, timer: _Timer) -> float:
        self._stage(target, weights, spec.scalings, timer)
        self._notify(
            "staged",
            SwapRecord(target.version, target.sha256, target.source, target.path, "staged", phases=dict(timer.phases)),
        )
        if self.validation.smoke_prompts:
            with timer.phase("verify"):
                self._verify(spec)
        return self._commit(timer)

    def _stage(self, version: AdapterVersion, weights: dict, scalings: dict[str, float], timer: _Timer) -> None:
        """Copy ``version`` into the standby slot once no running row uses it any more."""
        slots, timeout = self.engine.slots, self.engine.config.server.request_timeout_s
        with timer.phase("stage"):
            if not slots.wait_unpinned(slots.standby, timeout):
                raise SwapError(
                    "stage",
                    f"{slots.pinned(slots.standby)} requests still run on the standby slot's version after "
                    f"{timeout:g}s (server.request_timeout_s); not staging over them",
                )
            slots.stage(slots.standby, version, weights, scalings)

    def _verify(self, spec: AdapterSpec) -> None:
        outputs = self.engine.probe(list(self.validation.smoke_prompts), self.engine.slots.standby)
        for prompt, (text, finite) in zip(self.validation.smoke_prompts, outputs, strict=True):
            if not finite:
                raise AdapterRejected("non_finite", f"{spec.version}: non-finite logits for smoke prompt {prompt!r}")
            if not text:
                raise AdapterRejected("empty_output", f"{spec.version}: empty completion for smoke prompt {prompt!r}")

    def _commit(self, timer: _Timer) -> float:
        stall: list[float] = []

        def flip() -> None:
            t0 = time.perf_counter()
            self.engine.slots.flip()
            stall.append(time.perf_counter() - t0)

        with timer.phase("commit"):
            self.engine.between_steps(flip).result()
        return stall[0]

    def _reload(self, version: AdapterVersion, timer: _Timer) -> tuple[dict, dict[str, float]]:
        if version.is_base:
            return {}, {}
        assert version.path is not None
        with timer.phase("validate"):
            spec = inspect_adapter(version.path, self.engine.layout, self.validation, version=version.version)
        if spec.sha256 != version.sha256:
            raise AdapterRejected("changed", f"{version.path} no longer holds version {version.version}")
        with timer.phase("load"):
            weights = load_adapter(spec, self.validation)
        return weights, spec.scalings

    def _finish(self, record: SwapRecord, committed: AdapterVersion | None = None) -> SwapRecord:
        # The chain moves and the record lands in one step: who sees the new live version in the
        # history's chain also sees the swap that made it live (GET /v1/adapters reads both).
        if committed is not None:
            self.history.committed(committed, record)
        elif record.result == "rolled_back":
            self.history.rolled_back_to_previous(record)
        else:
            self.history.add(record)
        phases = " ".join(f"{k}={v * 1000:.1f}ms" for k, v in record.phases.items() if math.isfinite(v))
        level = logging.INFO if record.result in ("success", "rolled_back", "unchanged") else logging.WARNING
        log.log(
            level,
            "swap version=%s sha256=%s result=%s reason=%s %s%s",
            record.version,
            (record.sha256 or "-")[:12],
            record.result,
            record.reason or "-",
            phases,
            f" message={record.message!r}" if record.message else "",
        )
        self._notify(record.result, record)
        return record

    def _notify(self, kind: str, record: SwapRecord) -> None:
        for listener in self.listeners:
            try:
                listener(kind, record)
            except Exception:
                log.exception("swap listener failed")
