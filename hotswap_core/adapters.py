"""Read, inspect and validate a PEFT LoRA adapter folder against the serving layout.

Two steps, so a swap can refuse a bad candidate before it touches tensor data:

* ``inspect_adapter`` reads ``adapter_config.json`` and the safetensors *header* (keys, dtypes, shapes,
  offsets; see ``hotswap_core.safetensors_header``) and streams the weights once for the sha256;
* ``load_adapter`` reads the weights into host memory, proves they are the bytes that were inspected
  (same sha256) and checks that every value is finite.

Every refusal is an ``AdapterRejected(reason, message)``. ``REASONS`` lists the reason codes; they are
stable (they label ``hotswapd_adapter_validation_failures_total``). Nothing is ever unpickled unless
``validation.allow_pickle`` is set, and then only through ``torch.load(weights_only=True)``.

With ``within`` (the directory source's watched folder), every file is opened through ``open_within``:
one that resolves outside that folder is refused (``outside_watched_folder``), checked on the open
file itself, so no symlink flipped between a check and the read can slip another file in.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, NoReturn

import torch
from peft.utils.other import get_pattern_key
from safetensors.torch import load as load_safetensors_bytes

from hotswap_core.config import ValidationConfig
from hotswap_core.errors import AdapterRejected
from hotswap_core.layout import Layout, module_name_from_key
from hotswap_core.safetensors_header import SafetensorsEntry, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"

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

# Only float weights are accepted. F64 is accepted: staging copy_()s into the slot's dtype anyway, and the
# finite check runs after that cast.
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_TORCH_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}

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


@dataclass(frozen=True)
class FileStamp:
    """What ``os.stat`` said about a file when it was read."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


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
    folder = _resolve_folder(Path(path))
    if root is not None and not is_inside(str(folder), root):
        _reject("outside_watched_folder", path, f"resolves outside the watched folder {root} (to {folder})")
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        _reject("missing_file", config_path, "no such file")
    weights_path, weights_format = _find_weights(folder, validation)
    config_bytes, config_stamp = _read_file(config_path, validation.max_header_bytes, "max_header_bytes", within=root)
    config = _parse_config(config_bytes, config_path)
    _check_base_model(config, layout, validation, config_path)
    if weights_format == "safetensors":
        header = read_header(weights_path, validation, hash_prefix=config_bytes, opener=lambda p: open_within(p, root))
        entries, weights_stamp = header.entries, FileStamp.of(header.stat)
        sha, weights_sha = header.sha256, header.file_sha256
    else:
        data, weights_stamp = _read_file(weights_path, validation.max_adapter_bytes, "max_adapter_bytes", within=root)
        sha, weights_sha = _sha256(config_bytes, data), _sha256(data)
        tensors = _unpickle(data, weights_path)
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
    config_bytes, _ = _read_file(
        spec.path / CONFIG_NAME, validation.max_header_bytes, "max_header_bytes", "changed", within=root
    )
    data, stamp = _read_file(where, validation.max_adapter_bytes, "max_adapter_bytes", "changed", within=root)
    if stamp.size < spec.weights_stamp.size:
        _reject("truncated", where, f"{stamp.size} bytes now, {spec.weights_stamp.size} when inspected")
    if _sha256(config_bytes, data) != spec.sha256:
        _reject("changed", spec.path, f"{CONFIG_NAME} or {where.name} changed since inspection (sha256 differs)")
    if spec.weights_format == "pickle":
        tensors = _unpickle(data, where)
    else:
        try:
            tensors = load_safetensors_bytes(data)
        except Exception as exc:  # the header passed inspection, so the body is corrupt
            _reject("malformed", where, str(exc))
    del data
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, m in spec.modules.items():
        a, b = tensors[m.a_key], tensors[m.b_key]  # a: [rank, in], b: [out, rank]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != m.rank or b.shape[1] != m.rank:
            _reject("changed", where, f"{name}: shapes differ from inspection")
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


def _reject(reason: str, where: object, message: str) -> NoReturn:
    assert reason in REASONS, reason
    raise AdapterRejected(reason, f"{where}: {message}") from None


def _resolve_folder(path: Path) -> Path:
    try:
        folder = path.resolve(strict=True)
    except FileNotFoundError:
        _reject("missing_file", path, "no such folder")
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        _reject("unreadable", path, str(exc))
    if not folder.is_dir():
        _reject("missing_file", path, "not a folder")
    return folder


def _find_weights(folder: Path, validation: ValidationConfig) -> tuple[Path, Literal["safetensors", "pickle"]]:
    """Pick the weights file. Pickle files are only listed here, never opened."""
    if (folder / WEIGHTS_NAME).is_file():
        return folder / WEIGHTS_NAME, "safetensors"
    if (folder / WEIGHTS_NAME).exists():
        _reject("unreadable", folder / WEIGHTS_NAME, "exists but is not a regular file")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        _reject("missing_file", folder / WEIGHTS_NAME, "no such file")
    if not validation.allow_pickle:
        how = "save with safe_serialization=True, or set validation.allow_pickle"
        _reject("pickle_refused", folder, f"only pickle weights {pickles}, which hotswapd does not open ({how})")
    if PICKLE_WEIGHTS_NAME not in pickles:
        _reject("pickle_refused", folder, f"with allow_pickle only {PICKLE_WEIGHTS_NAME} is read, found {pickles}")
    return folder / PICKLE_WEIGHTS_NAME, "pickle"


def open_within(path: Path, within: Path | None) -> BinaryIO:
    """``open(path, "rb")``, refusing (``outside_watched_folder``) a file that resolves outside the
    folder ``within`` (a resolved path; None: no limit).

    The check is on the file actually opened (its ``/proc/self/fd`` link, where there is one), not on
    the path before opening: a symlink flipped after any earlier check cannot slip another file in.
    Hard links are not symlinks: a hard link inside the folder is inside it.
    """
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if within is None:
        return f
    try:
        real = _opened_path(f, path)
    except BaseException:
        f.close()
        raise
    if real is None or not is_inside(real, within):
        f.close()
        where = f"to {real}" if real is not None else "it changed while being opened"
        _reject("outside_watched_folder", path, f"resolves outside the watched folder {within} ({where})")
    return f


def _opened_path(f: BinaryIO, path: Path) -> str | None:
    """Where the open file ``f`` really is; None if that cannot be told for certain."""
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}").removesuffix(" (deleted)")
    except OSError:  # no /proc: resolve the name, and accept it only if it names the very file opened
        real = os.path.realpath(path)
        try:
            same = os.path.samestat(os.stat(real), os.fstat(f.fileno()))
        except OSError:
            return None
        return real if same else None


def is_inside(real: str, root: Path) -> bool:
    """True if the resolved path ``real`` is ``root`` or lies below it."""
    return real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep)


def _read_file(
    path: Path, limit: int, limit_name: str, missing: str = "missing_file", *, within: Path | None = None
) -> tuple[bytes, FileStamp]:
    """Read a whole file, refusing before reading when fstat says it is over ``limit``."""
    try:
        with open_within(path, within) as f:
            st = os.fstat(f.fileno())
            if st.st_size > limit:
                _reject("too_large", path, f"{st.st_size} bytes exceed validation.{limit_name}={limit}")
            data = f.read(st.st_size + 1)  # +1: notice a file that grew
    except FileNotFoundError:
        _reject(missing, path, "no such file")
    except OSError as exc:
        _reject("unreadable", path, exc.strerror or str(exc))
    if len(data) != st.st_size:
        _reject("changed", path, f"size changed while reading ({st.st_size} -> {len(data)} bytes)")
    return data, FileStamp.of(st)


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def _parse_config(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        _reject("bad_config", path, f"not valid JSON: {exc}")
    if not isinstance(config, dict):
        _reject("bad_config", path, f"expected a JSON object, got {type(config).__name__}")
    peft_type = config.get("peft_type")
    if peft_type is None:
        _reject("bad_config", path, "peft_type is missing (expected 'LORA')")
    if peft_type != "LORA":
        _reject("unsupported_feature", path, f"peft_type is {peft_type!r}; hotswapd serves 'LORA' only")
    if not _is_int(config.get("r")) or config["r"] < 1:
        _reject("bad_config", path, f"r must be an integer >= 1, got {config.get('r')!r}")
    if not _is_number(config.get("lora_alpha")):
        _reject("bad_config", path, f"lora_alpha must be a finite number, got {config.get('lora_alpha')!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        _reject("bad_config", path, f"use_rslora must be true or false, got {config['use_rslora']!r}")
    for key, valid, expected in (
        ("rank_pattern", lambda v: _is_int(v) and v >= 1, "integers >= 1"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pattern = config.get(key) or {}
        if not isinstance(pattern, dict) or not all(valid(v) for v in pattern.values()):
            _reject("bad_config", path, f"{key} must map module patterns to {expected}, got {pattern!r}")
    if not isinstance(config.get("base_model_name_or_path") or "", str):
        _reject("bad_config", path, f"base_model_name_or_path must be a string: {config['base_model_name_or_path']!r}")
    if config.get("bias", "none") != "none":
        _reject("unsupported_feature", path, f"bias={config['bias']!r} trains base biases; only 'none' is served")
    init = config.get("init_lora_weights", True)
    if not isinstance(init, bool) and init not in _PLAIN_INITS:
        how = "save it with path_initial_model_for_weight_conversion to get plain LoRA"
        _reject("unsupported_feature", path, f"init_lora_weights={init!r} rewrites the base weights; {how}")
    for key, value in config.items():
        if key not in _NEUTRAL_KEYS and value:
            what = _FEATURE_NAMES.get(key, "a LoRA variant or option hotswapd does not serve")
            _reject("unsupported_feature", path, f"{key}={value!r} needs {what}; only plain LoRA is served")
    return config


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_base_model(config: dict[str, Any], layout: Layout, validation: ValidationConfig, path: Path) -> None:
    base = (config.get("base_model_name_or_path") or "").rstrip("/")
    if validation.base_model_must_match and base and not {base, os.path.basename(base)} & layout.base_ids:
        known = ", ".join(sorted(layout.base_ids)) or "(none)"
        _reject("base_mismatch", path, f"base_model_name_or_path={base!r} is not the served base ({known})")


def _unpickle(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The allow_pickle path: torch's weights-only unpickler, which builds tensors and nothing else."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        _reject("pickle_refused", path, f"the weights-only unpickler refused it: {exc}")
    except Exception as exc:
        _reject("malformed", path, f"cannot read as a torch state dict: {exc}")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        _reject("malformed", path, "expected a dict of name -> tensor")
    return state


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
            _reject(reason, path, message)
        if dtype not in _FLOAT_DTYPES:
            _reject("bad_dtype", path, f"{key} has dtype {dtype}, expected one of {', '.join(_FLOAT_DTYPES)}")
        module, part = parsed
        if module not in layout.modules:
            targets = list(layout.target_modules)
            _reject("unknown_module", path, f"{key}: {module!r} is not in the layout (target_modules {targets})")
        pairs.setdefault(module, {})[part] = key
    if not pairs:
        _reject("missing_weights", path, "holds no LoRA weights")
    rank_pattern: dict[str, int] = config.get("rank_pattern") or {}
    alpha_pattern: dict[str, float] = config.get("alpha_pattern") or {}
    specs: dict[str, ModuleSpec] = {}
    for module, parts in sorted(pairs.items()):
        if len(parts) != 2:
            (have,) = parts
            _reject("missing_weights", path, f"{parts[have]} has no {'lora_B' if have == 'lora_A' else 'lora_A'}")
        a_key, b_key = parts["lora_A"], parts["lora_B"]
        a_shape, b_shape = entries[a_key][1], entries[b_key][1]
        for key, shape in ((a_key, a_shape), (b_key, b_shape)):
            if len(shape) != 2:
                _reject("shape_mismatch", path, f"{key} has shape {list(shape)}, expected a matrix")
        # PEFT's own rule (LoraModel._create_and_replace), keyed by the module's path in the base model.
        rank: int = rank_pattern.get(get_pattern_key(list(rank_pattern), module), config["r"])
        alpha = float(alpha_pattern.get(get_pattern_key(list(alpha_pattern), module), config["lora_alpha"]))
        # Ranks before shapes: an r=16 adapter on an r=8 layout is "too big", not "misshapen".
        for what, value in (("configured rank", rank), (f"{a_key} rank", a_shape[0]), (f"{b_key} rank", b_shape[1])):
            if value > layout.target_rank:
                limit = f"adapter.target_rank={layout.target_rank}"
                _reject("rank_exceeds_target", path, f"{module}: {what} {value} exceeds {limit}")
        base = layout.modules[module]
        for key, shape, expected in (
            (a_key, a_shape, (rank, base.in_features)),
            (b_key, b_shape, (base.out_features, rank)),
        ):
            if shape != expected:
                _reject("shape_mismatch", path, f"{key}: shape {list(shape)}, expected {list(expected)} (rank {rank})")
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
        _reject("non_finite", where, f"{key} holds {int((~torch.isfinite(tensor)).sum())} NaN/Inf values")
    # copy=True: tensors from the safetensors buffer alias it; the caller gets memory of its own.
    out = tensor.to(device=device, dtype=dtype or tensor.dtype, copy=True)
    if validation.check_finite and out.dtype != tensor.dtype and not bool(torch.isfinite(out).all()):
        _reject("non_finite", where, f"{key} overflows {out.dtype}")
    return out
