"""The LoRA layout: which base modules carry a LoRA slot, and their shapes.

The layout is fixed at start from config (``adapter.target_modules``, ``adapter.target_rank``),
never from whichever adapter came first. Validation checks candidates against it without loading
the model's weights (a meta-device model gives names and shapes for free).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists

from hotswap_core.config import Config
from hotswap_core.errors import ConfigError

# PEFT saves keys as "base_model.model.<module>.lora_A.weight"; this is the part before <module>.
PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LayoutModule:
    name: str  # module path in the base model, e.g. "model.layers.0.self_attn.q_proj"
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Layout:
    modules: dict[str, LayoutModule]
    target_rank: int
    target_modules: tuple[str, ...]
    # Strings an adapter's base_model_name_or_path may carry to count as "the same base".
    base_ids: frozenset[str]

    def lora_config(self) -> LoraConfig:
        """The PEFT config the engine injects: every slot at target_rank, zero B (= base behaviour)."""
        return LoraConfig(
            r=self.target_rank,
            lora_alpha=self.target_rank,
            target_modules=list(self.target_modules),
            lora_dropout=0.0,
            bias="none",
        )


def base_identities(model_path: str, model_config: Any = None) -> frozenset[str]:
    """Names under which an adapter may refer to this base model: the configured path or Hub id,
    its folder name, the config's ``_name_or_path``, and an id the model declares itself
    (``hotswapd_base_id`` in config.json, as the demo model does)."""
    names = [model_path, getattr(model_config, "_name_or_path", None), getattr(model_config, "hotswapd_base_id", None)]
    ids: set[str] = set()
    for name in names:
        if isinstance(name, str) and name.strip("/"):
            ids |= {name.rstrip("/"), os.path.basename(name.rstrip("/"))}
    return frozenset(ids)


def layout_from_model(
    model: torch.nn.Module, target_modules: tuple[str, ...], target_rank: int, base_ids: frozenset[str]
) -> Layout:
    """Enumerate the Linear modules of ``model`` matched by PEFT's own target-module rules."""
    probe = LoraConfig(target_modules=list(target_modules))
    modules: dict[str, LayoutModule] = {}
    for name, module in model.named_modules():
        if name and isinstance(module, torch.nn.Linear) and check_target_module_exists(probe, name):
            modules[name] = LayoutModule(name, module.in_features, module.out_features)
    if not modules:
        raise ConfigError([f"adapter.target_modules: {list(target_modules)} match no Linear module of the base model"])
    return Layout(modules, target_rank, tuple(target_modules), base_ids)


def layout_from_config(config: Config) -> Layout:
    """Build the layout from the base model's config alone (no weights read, nothing compiled)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(
            config.model.path, revision=config.model.revision, trust_remote_code=config.model.trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ConfigError([f"model.path: cannot load a model config from {config.model.path!r}: {exc}"]) from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    ids = base_identities(config.model.path, model_config)
    return layout_from_model(model, config.adapter.target_modules, config.adapter.target_rank, ids)


def module_name_from_key(key: str) -> tuple[str, str] | None:
    """Split a PEFT LoRA key into (module name, "lora_A" | "lora_B"); None if it is not a plain LoRA weight."""
    for part in ("lora_A", "lora_B"):
        suffix = f".{part}.weight"
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            module = module[len(PEFT_KEY_PREFIX) :] if module.startswith(PEFT_KEY_PREFIX) else module
            return module, part
    return None
