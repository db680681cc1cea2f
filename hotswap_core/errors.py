"""The exception tree. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations


class HotswapError(Exception):
    """Base class of every error hotswapd raises on purpose."""


class ConfigError(HotswapError):
    """The configuration is invalid. ``problems`` lists every ``key.path: message`` found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class AdapterRejected(HotswapError):
    """An adapter candidate failed inspection or validation.

    ``reason`` is a stable, machine-readable code (see ``hotswap_core.adapters.REASONS``);
    ``message`` says what is wrong in words a person understands.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


class SourceError(HotswapError):
    """A source (directory, Hub) could not be read."""


class SwapError(HotswapError):
    """A swap transaction failed after the candidate was accepted (staging, verify, commit)."""

    def __init__(self, phase: str, message: str) -> None:
        self.phase = phase
        self.message = message
        super().__init__(f"{phase}: {message}")


class EngineError(HotswapError):
    """The engine could not load, compile or serve."""
