"""Read, inspect and validate a PEFT LoRA adapter folder against the serving layout.

Two steps, so a swap can refuse a bad candidate before it touches tensor data:

* ``inspect_adapter`` reads ``adapter_config.json`` and the safetensors *header* (keys, dtypes, shapes,
  offsets; see ``hotswap_core.safetensors_header``) and streams the weights once for the sha256;
* ``load_adapter`` reads the weights into host memory, proves they are the bytes that were inspected
  (same sha256) and checks that every value is finite.

Every refusal is an ``AdapterRejected(reason, message)`` with a stable code from ``errors.REASONS``. How the
files are read (size limits, hashing, staying inside the watched folder, never unpickling unless
``validation.allow_pickle``) is ``adapter_files``'s; what ``adapter_config.json`` may say is ``adapter_config``'s;
what is left here is the adapter as a whole: its spec, its weights against the layout, and their values.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors_bytes

from hotswap_core.adapter_config import check_base_model, parse_config
from hotswap_core.adapter_files import (
    CONFIG_NAME,
    FileStamp,
    find_weights,
    is_inside,
    open_within,
    read_file,
    resolve_folder,
    sha256_of,
    unpickle_weights,
)
from hotswap_core.config import ValidationConfig
from hotswap_core.errors import reject
from hotswap_core.layout import Layout, module_name_from_key
from hotswap_core.safetensors_header import SafetensorsEntry, read_header

# Only float weights are accepted. F64 is accepted: staging copy_()s into the slot's dtype anyway, and the
# finite check runs after that cast.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}


@dataclass(frozen=True)
class ModuleSpec:
    """One LoRA-carrying module of an adapter, with PEFT's per-module rank, alpha and scaling."""

    name: str  # layout module name, e.g. "model.layers.0.self_attn.q_proj"
    rank: int
    alpha: float
    scaling: float
    a_key: str  # lora_A: [rank, in_features]
    b_key: str  # lora_B: [out_features, rank]


@dataclass(frozen=True)
class AdapterSpec:
    """An inspected adapter.

    ``sha256`` is the hex SHA-256 of the bytes of ``adapter_config.json`` followed directly by the bytes
    of the weights file, i.e. ``cat adapter_config.json adapter_model.safetensors | sha256sum``.
    ``weights_sha256`` is the SHA-256 of the weights file alone (what a manifest would list).
    ``size_bytes`` is the size of both files together. The stamps let a caller notice a change cheaply;
    ``load_adapter`` trusts only the sha256.
    """

    path: Path
    version: str
    sha256: str
    weights_sha256: str
    size_bytes: int
    base_model: str | None
    peft_config: dict[str, Any]
    modules: dict[str, ModuleSpec]
    weights_file: Path
    weights_format: Literal["safetensors", "pickle"]
    config_stamp: FileStamp
    weights_stamp: FileStamp
    within: Path | None = None  # every file read must resolve inside this folder (see ``open_within``)

    @property
    def scalings(self) -> dict[str, float]:
        """Module name -> LoRA scaling (``rank_pattern``/``alpha_pattern``/``use_rslora`` applied)."""
        return {name: m.scaling for name, m in self.modules.items()}


def inspect_adapter(
    path: str | os.PathLike[str],
    layout: Layout,
    validation: ValidationConfig,
    *,
    version: str | None = None,
    within: str | os.PathLike[str] | None = None,
) -> AdapterSpec:
    """Check an adapter folder against ``layout`` without reading its tensor data.

    Reads ``adapter_config.json`` and the safetensors header, and streams the weights once for the
    sha256. The folder is resolved first, so a ``current`` symlink yields its target; ``version``
    defaults to the resolved folder's name. With ``within``, the folder and every file read must
    resolve inside that folder (``open_within``); ``load_adapter`` keeps to it too.
    Raises ``AdapterRejected`` with a code from ``REASONS``.
    """
    root = Path(os.path.realpath(within)) if within is not None else None
    folder = resolve_folder(Path(path))
    if root is not None and not is_inside(str(folder), root):
        reject("outside_watched_folder", path, f"resolves outside the watched folder {root} (to {folder})")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        reject("missing_file", config_path, "no such file")
    weights_path, weights_format = find_weights(folder, validation)
    config_bytes, config_stamp = read_file(config_path, validation.max_header_bytes, "max_header_bytes", within=root)
    config = parse_config(config_bytes, config_path)
    check_base_model(config, layout, validation, config_path)
    if weights_format == "safetensors":
        header = read_header(weights_path, validation, hash_prefix=config_bytes, opener=lambda p: open_within(p, root))
        entries, weights_stamp = header.entries, FileStamp.of(header.stat)
        sha, weights_sha = header.sha256, header.file_sha256
    else:
        data, weights_stamp = read_file(weights_path, validation.max_adapter_bytes, "max_adapter_bytes", within=root)
        sha, weights_sha = sha256_of(config_bytes, data), sha256_of(data)
        tensors = unpickle_weights(data, weights_path)
        entries = {
            k: SafetensorsEntry(_TORCH_DTYPES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in tensors.items()
        }
    return AdapterSpec(
        path=folder,
        version=version or folder.name,
        sha256=sha,
        weights_sha256=weights_sha,
        size_bytes=config_stamp.size + weights_stamp.size,
        base_model=config.get("base_model_name_or_path"),
        peft_config=config,
        modules=_match_layout(entries, config, layout, weights_path),
        weights_file=weights_path,
        weights_format=weights_format,
        config_stamp=config_stamp,
        weights_stamp=weights_stamp,
        within=root,
    )


def load_adapter(
    spec: AdapterSpec,
    validation: ValidationConfig,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Read the weights of an inspected adapter: module name -> (A [rank, in], B [out, rank]).

    Both files are read whole and hashed; anything but the inspected sha256 is refused ("changed", or
    "truncated" when the weights file shrank), so the tensors are exactly the bytes that were inspected.
    With ``validation.check_finite`` every value is checked, before and after the cast to ``dtype``.
    The returned tensors own their memory (nothing aliases the read buffer).
    """
    where, root = spec.weights_file, spec.within
    config_bytes, _ = read_file(
        spec.path / CONFIG_NAME, validation.max_header_bytes, "max_header_bytes", "changed", within=root
    )
    data, stamp = read_file(where, validation.max_adapter_bytes, "max_adapter_bytes", "changed", within=root)
    if stamp.size < spec.weights_stamp.size:
        reject("truncated", where, f"{stamp.size} bytes now, {spec.weights_stamp.size} when inspected")
    if sha256_of(config_bytes, data) != spec.sha256:
        reject("changed", spec.path, f"{CONFIG_NAME} or {where.name} changed since inspection (sha256 differs)")
    if spec.weights_format == "pickle":
        tensors = unpickle_weights(data, where)
    else:
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as exc:  # the header passed inspection, so the body is corrupt
            reject("malformed", where, str(exc))
    del data
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, m in spec.modules.items():
        a, b = tensors[m.a_key], tensors[m.b_key]  # a: [rank, in], b: [out, rank]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != m.rank or b.shape[1] != m.rank:
            reject("changed", where, f"{name}: shapes differ from inspection")
        out[name] = (
            _finite(a, m.a_key, where, validation, device, dtype),
            _finite(b, m.b_key, where, validation, device, dtype),
        )
    return out


def validate_adapter(
    path: str | os.PathLike[str],
    layout: Layout,
    validation: ValidationConfig,
    *,
    version: str | None = None,
    within: str | os.PathLike[str] | None = None,
) -> AdapterSpec:
    """Full offline validation (inspect, then load and check every value); returns the spec."""
    spec = inspect_adapter(path, layout, validation, version=version, within=within)
    load_adapter(spec, validation)
    return spec


def _foreign_key_problem(key: str) -> tuple[str, str]:
    """(reason, message) for a key that is not ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    for marker, what in (
        ("lora_magnitude_vector", "a DoRA magnitude vector"),
        ("lora_embedding_", "LoRA on an embedding"),
        ("modules_to_save", "a modules_to_save copy"),
        ("trainable_tokens", "trainable token embeddings"),
        ("lora_A.bias", "a LoRA bias"),
        ("lora_B.bias", "a LoRA bias"),
    ):
        if marker in key:
            return "unsupported_feature", f"{key} is {what}; only plain LoRA is served"
    if key.endswith(".bias"):
        return "unsupported_feature", f"{key} is a trained bias; only plain LoRA is served"
    return "unknown_module", f"{key} is not a LoRA weight (expected <module>.lora_A.weight / <module>.lora_B.weight)"


def _match_layout(
    entries: dict[str, SafetensorsEntry], config: dict[str, Any], layout: Layout, path: Path
) -> dict[str, ModuleSpec]:
    """Pair lora_A/lora_B per module and check them against the layout and the configured ranks."""
    pairs: dict[str, dict[str, str]] = {}
    for key, (dtype, _) in sorted(entries.items()):
        parsed = module_name_from_key(key)
        if parsed is None:
            reason, message = _foreign_key_problem(key)
            reject(reason, path, message)
        if dtype not in _FLOAT_DTYPES:
            reject("bad_dtype", path, f"{key} has dtype {dtype}, expected one of {', '.join(_FLOAT_DTYPES)}")
        module, part = parsed
        if module not in layout.modules:
            targets = list(layout.target_modules)
            reject("unknown_module", path, f"{key}: {module!r} is not in the layout (target_modules {targets})")
        pairs.setdefault(module, {})[part] = key
    if not pairs:
        reject("missing_weights", path, "holds no LoRA weights")
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    specs: dict[str, ModuleSpec] = {}
    for module, parts in sorted(pairs.items()):
        if len(parts) != 2:
            (have,) = parts
            reject("missing_weights", path, f"{parts[have]} has no {'lora_B' if have == 'lora_A' else 'lora_A'}")
        a_key, b_key = parts["lora_A"], parts["lora_B"]
        a_shape, b_shape = entries[a_key][1], entries[b_key][1]
        for key, shape in ((a_key, a_shape), (b_key, b_shape)):
            if len(shape) != 2:
                reject("shape_mismatch", path, f"{key} has shape {list(shape)}, expected a matrix")
        # PEFT's own rule (LoraModel._create_and_replace), keyed by the module's path in the base model.
        rank: int = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
        alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"]))
        # Ranks before shapes: an r=16 adapter on an r=8 layout is "too big", not "misshapen".
        for what, value in (("configured rank", rank), (f"{a_key} rank", a_shape[0]), (f"{b_key} rank", b_shape[1])):
            if value > layout.target_rank:
                limit = f"adapter.target_rank={layout.target_rank}"
                reject("rank_exceeds_target", path, f"{module}: {what} {value} exceeds {limit}")
        base = layout.modules[module]
        for key, shape, expected in (
            (a_key, a_shape, (rank, base.in_features)),
            (b_key, b_shape, (base.out_features, rank)),
        ):
            if shape != expected:
                reject("shape_mismatch", path, f"{key}: shape {list(shape)}, expected {list(expected)} (rank {rank})")
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora", False) else alpha / rank
        specs[module] = ModuleSpec(module, rank, alpha, scaling, a_key, b_key)
    return specs


def _finite(
    tensor: torch.Tensor,
    key: str,
    where: Path,
    validation: ValidationConfig,
    device: str | torch.device,
    dtype: torch.dtype | None,
) -> torch.Tensor:
    if validation.check_finite and not bool(torch.isfinite(tensor).all()):
        reject("non_finite", where, f"{key} holds {int((~torch.isfinite(tensor)).sum())} NaN/Inf values")
    # copy=True: tensors from the safetensors buffer alias it; the caller gets memory of its own.
    out = tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)
    if validation.check_finite and out.dtype != tensor.dtype and not bool(torch.isfinite(out).all()):
        reject("non_finite", where, f"{key} overflows {out.dtype}")
    return out
