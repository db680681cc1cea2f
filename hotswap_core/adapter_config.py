"""``adapter_config.json``: what a plain LoRA adapter may say, and the served base it must name.

Keys that change the forward math beyond plain LoRA on a Linear (DoRA, biases, modules_to_save, init methods
that rewrite the base weights, variants a newer PEFT adds) are refused as ``unsupported_feature``, never
misserved; malformed values are ``bad_config``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from hotswap_core.config import ValidationConfig
from hotswap_core.errors import reject
from hotswap_core.layout import Layout

# adapter_config.json keys that do not change the forward math of plain LoRA on a Linear at inference.
# Every other key must be absent or falsy, so a variant added by a newer PEFT is refused, not misserved.
_NEUTRAL_KEYS = frozenset(
    {
        "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
        "inference_mode", "r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "target_modules",
        "exclude_modules", "layers_to_transform", "layers_pattern", "lora_dropout", "fan_in_fan_out",
        "megatron_config", "megatron_core", "loftq_config", "eva_config", "corda_config", "lora_ga_config",
        "qalora_group_size", "runtime_config", "ensure_weight_tying", "bias", "init_lora_weights",
    }
)  # fmt: skip
_FEATURE_NAMES = {
    "use_dora": "DoRA",
    "modules_to_save": "modules_to_save (full copies of base modules)",
    "trainable_token_indices": "trainable token embeddings",
    "target_parameters": "LoRA on nn.Parameter targets",
    "layer_replication": "layer replication",
    "lora_bias": "LoRA bias terms",
    "use_qalora": "QA-LoRA",
}
# pissa/olora/corda/loftq/lora-ga rewrite the base weights at init, so the adapter only fits that rewritten base.
_PLAIN_INITS = ("gaussian", "eva", "orthogonal")  # or a bool


def parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        reject("bad_config", path, f"not valid JSON: {exc}")
    if not isinstance(config, dict):
        reject("bad_config", path, f"expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type is None:
        reject("bad_config", path, "peft_type is missing (expected 'LORA')")
    if peft_type != "LORA":
        reject("unsupported_feature", path, f"peft_type is {peft_type!r}; hotswapd serves 'LORA' only")
    if not _is_int(config.get("r")) or config["r"] < 1:
        reject("bad_config", path, f"r must be an integer >= 1, got {config.get('r')!r}")
    if not _is_number(config.get("lora_alpha")):
        reject("bad_config", path, f"lora_alpha must be a finite number, got {config.get('lora_alpha')!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        reject("bad_config", path, f"use_rslora must be true or false, got {config['use_rslora']!r}")
    for key, valid, expected in (
        ("rank_pattern", lambda v: _is_int(v) and v >= 1, "integers >= 1"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
            reject("bad_config", path, f"{key} must map module patterns to {expected}, got {pattern!r}")
    if not isinstance(config.get("base_model_name_or_path") or "", str):
        reject("bad_config", path, f"base_model_name_or_path must be a string: {config['base_model_name_or_path']!r}")
    if config.get("bias", "none") != "none":
        reject("unsupported_feature", path, f"bias={config['bias']!r} trains base biases; only 'none' is served")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _PLAIN_INITS:
        how = "save it with path_initial_model_for_weight_conversion to get plain LoRA"
        reject("unsupported_feature", path, f"init_lora_weights={init!r} rewrites the base weights; {how}")
    for key, value in config.items():
        if key not in _NEUTRAL_KEYS and value:
            what = _FEATURE_NAMES.get(key, "a LoRA variant or option hotswapd does not serve")
            reject("unsupported_feature", path, f"{key}={value!r} needs {what}; only plain LoRA is served")
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_base_model(config: dict[str, Any], layout: Layout, validation: ValidationConfig, path: Path) -> None:
    base = (config.get("base_model_name_or_path") or "").rstrip("/")
    if validation.base_model_must_match and base and not {base, os.path.basename(base)} & layout.base_ids:
        known = ", ".join(sorted(layout.base_ids)) or "(none)"
        reject("base_mismatch", path, f"base_model_name_or_path={base!r} is not the served base ({known})")
