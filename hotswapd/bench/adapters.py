"""Adapters for the bench: real PEFT folders of mixed ranks, alphas and targets, written from the layout.

Built from the layout's module shapes alone (no base model weights are read), so they exist for any
model in a fraction of a second: PEFT's ``LoraConfig.save_pretrained`` writes the config, and the
weights are random (seeded) ``lora_A``/``lora_B`` pairs sized by PEFT's own ``rank_pattern`` rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key
from safetensors.torch import save_file

from hotswap_core.adapter_files import WEIGHTS_NAME
from hotswap_core.layout import PEFT_KEY_PREFIX, Layout


@dataclass(frozen=True)
class AdapterRecipe:
    name: str
    r: int
    alpha: int
    targets: tuple[str, ...] | None = None  # None: every target module of the layout
    lora: dict[str, Any] = field(default_factory=dict)  # use_rslora, rank_pattern, alpha_pattern

    @property
    def peft_hotswappable(self) -> bool:
        """Swappable by PEFT's ``hotswap_adapter`` into a model prepared with an all-module adapter:
        same targets (or fewer) and none of the options it refuses to change (``CONFIG_KEYS_TO_CHECK``)."""
        return not self.lora


def recipes(layout: Layout, count: int) -> list[AdapterRecipe]:
    """``count`` distinct recipes; the first half PEFT-hotswappable (plain rank/alpha changes), the
    rest mixing rank patterns, rsLoRA and target subsets."""
    top, mods = layout.target_rank, layout.target_modules
    ranks = sorted({max(1, top * k // 8) for k in range(1, 9)})
    out: list[AdapterRecipe] = []
    for i in range(count):
        r = ranks[i % len(ranks)]
        alpha = (1, 2, 4, 8, 16, 32)[i % 6]
        if i < (count + 1) // 2:
            out.append(AdapterRecipe(f"plain-{i:02d}-r{r}", r, alpha))
            continue
        kind = i % 3
        if kind == 0:
            lora: dict[str, Any] = {"use_rslora": True}
        elif kind == 1:
            lora = {"rank_pattern": {mods[-1]: max(1, r // 2)}, "alpha_pattern": {mods[0]: alpha * 2}}
        else:
            lora = {}
        subset = tuple(mods[j] for j in range(len(mods)) if (i + j) % 2 == 0) or mods
        out.append(AdapterRecipe(f"mixed-{i:02d}-r{r}", r, alpha, subset if kind != 1 else None, lora))
    return out


def write_adapter(layout: Layout, recipe: AdapterRecipe, out: Path, base_model: str, seed: int) -> Path:
    """Write ``recipe`` as PEFT would save it: ``adapter_config.json`` + ``adapter_model.safetensors``."""
    targets = list(recipe.targets or layout.target_modules)
    config = LoraConfig(r=recipe.r, lora_alpha=recipe.alpha, target_modules=targets, lora_dropout=0.0, **recipe.lora)
    config.base_model_name_or_path = base_model
    probe = LoraConfig(target_modules=targets)
    rank_pattern: dict[str, int] = dict(config.rank_pattern or {})
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in layout.modules.items():
        if not check_target_module_exists(probe, name):
            continue
        rank = rank_pattern.get(get_pattern_key(list(rank_pattern), name), recipe.r)
        key = f"{PEFT_KEY_PREFIX}{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=gen) * 0.15
        tensors[f"{key}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=gen) * 0.15
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    return out


def write_pool(layout: Layout, root: Path, count: int, base_model: str) -> list[tuple[AdapterRecipe, Path]]:
    """``count`` adapters under ``root``, one folder per recipe."""
    return [
        (recipe, write_adapter(layout, recipe, root / recipe.name, base_model, seed=1000 + i))
        for i, recipe in enumerate(recipes(layout, count))
    ]
