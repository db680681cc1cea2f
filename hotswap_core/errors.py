"""The exception tree. The library raises these; only the CLI turns them into exit codes."""

from __future__ import annotations

from typing import NoReturn

# The reason codes of ``AdapterRejected``: stable, machine-readable (they label
# ``hotswapd_adapter_validation_failures_total`` and the swap history).
REASONS: dict[str, str] = {
    "missing_file": "the folder, adapter_config.json or adapter_model.safetensors is missing",
    "bad_config": "adapter_config.json is not a JSON object with valid r, lora_alpha and patterns",
    "unsupported_feature": "the adapter needs more than plain LoRA on Linear (DoRA, bias, modules_to_save, ...)",
    "unknown_module": "a weight names a module outside the serving layout, or is not a LoRA weight at all",
    "shape_mismatch": "a lora_A/lora_B shape disagrees with the base module or with the configured rank",
    "rank_exceeds_target": "a module's rank is above adapter.target_rank",
    "base_mismatch": "base_model_name_or_path names a different base model",
    "truncated": "the weights file is shorter than its header says (cut off, or still being written)",
    "malformed": "the safetensors header is invalid: not JSON, a bad entry, holes, overlaps or trailing bytes",
    "too_large": "a file exceeds validation.max_adapter_bytes, or the header exceeds validation.max_header_bytes",
    "non_finite": "a weight holds NaN or Inf, or overflows the serving dtype",
    "pickle_refused": "only pickle weights (.bin, .pt, ...) are present, and hotswapd does not unpickle them",
    "bad_dtype": "a weight is not a floating-point tensor (F16, BF16, F32 or F64)",
    "missing_weights": "the adapter holds no weights, or a module has lora_A without lora_B (or the reverse)",
    "changed": "the files changed between inspection and loading",
    "unreadable": "a file exists but cannot be read (permissions, I/O error)",
    "outside_watched_folder": "an entry of the watched folder, or a file in a version folder, resolves outside it",
    "empty_output": "a smoke prompt produced no text on the staged adapter",
}


class HotswapError(Exception):
    """Base class of every error hotswapd raises on purpose."""


class ConfigError(HotswapError):
    """The configuration is invalid. ``problems`` lists every ``key.path: message`` found."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class AdapterRejected(HotswapError):
    """An adapter candidate failed inspection or validation.

    ``reason`` is a stable, machine-readable code (one of ``REASONS``);
    ``message`` says what is wrong in words a person understands.
    """

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason}: {message}")


def reject(reason: str, where: object, message: str) -> NoReturn:
    """Raise ``AdapterRejected(reason, "<where>: <message>")``; ``reason`` must be one of ``REASONS``."""
    assert reason in REASONS, reason
    raise AdapterRejected(reason, f"{where}: {message}") from None


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
