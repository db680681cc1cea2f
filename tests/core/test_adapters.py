"""hotswap_core.adapters against real PEFT adapters written by save_pretrained, and corrupted copies of them."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from hotswap_core.adapters import (
    AdapterSpec,
    inspect_adapter,
    load_adapter,
    validate_adapter,
)
from hotswap_core.config import ValidationConfig
from hotswap_core.errors import REASONS, AdapterRejected
from hotswap_core.layout import Layout, base_identities, layout_from_model

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BASE_PATH = "/models/tiny-llama"
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
Q0 = "model.layers.0.self_attn.q_proj"
Q0_A = f"base_model.model.{Q0}.lora_A.weight"
Q0_B = f"base_model.model.{Q0}.lora_B.weight"
STRICT = ValidationConfig()

pytestmark = [
    pytest.mark.filterwarnings("ignore:Could not find a config file"),  # PEFT, about our fake base path
    pytest.mark.filterwarnings("ignore:Detected pickle protocol"),  # torch, about the refused payloads
]


@pytest.fixture(scope="module")
def base() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=300,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def layout(base: LlamaForCausalLM) -> Layout:
    return layout_from_model(base, TARGETS, target_rank=8, base_ids=base_identities(BASE_PATH))


def make_adapter(base: LlamaForCausalLM, folder: Path, seed: int = 1, safe: bool = True, **lora: Any) -> PeftModel:
    """Save a PEFT LoRA adapter with non-zero B (PEFT initialises B to zero) into ``folder``."""
    model = copy.deepcopy(base)
    model.name_or_path = BASE_PATH  # becomes base_model_name_or_path in adapter_config.json
    lora.setdefault("target_modules", list(TARGETS))
    peft_model = get_peft_model(model, LoraConfig(**lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer):
                weight = module.lora_B["default"].weight
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(str(folder), safe_serialization=safe)
    return peft_model


@pytest.fixture(scope="module")
def good(base: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("adapters") / "good-v1"
    make_adapter(base, folder, r=4, lora_alpha=8)
    return folder


@pytest.fixture
def copy_of(good: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "candidate"
    shutil.copytree(good, folder)
    return folder


def rejected(
    folder: Path, layout: Layout, validation: ValidationConfig = STRICT, *, on_load: bool = False
) -> AdapterRejected:
    """The rejection, which must come from inspection (header only) unless ``on_load``."""
    spec = inspect_adapter(folder, layout, validation) if on_load else None
    with pytest.raises(AdapterRejected) as info:
        if spec is None:
            inspect_adapter(folder, layout, validation)
        else:
            load_adapter(spec, validation)
    assert info.value.reason in REASONS
    return info.value


def edit_config(folder: Path, **changes: Any) -> None:
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})


def split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(path: Path, header: dict[str, Any], data: bytes) -> None:
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def last_entry(header: dict[str, Any]) -> str:
    return max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def lora_layer(peft_model: PeftModel, name: str) -> LoraLayer:
    layer = peft_model.base_model.model.get_submodule(name)
    assert isinstance(layer, LoraLayer)
    return layer


# --- valid adapters ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", range(1, 9))
def test_valid_ranks_match_peft_and_load_exactly(base: LlamaForCausalLM, layout: Layout, tmp_path: Path, rank: int):
    peft_model = make_adapter(base, tmp_path / f"r{rank}", r=rank, lora_alpha=2 * rank + 1)
    spec = validate_adapter(tmp_path / f"r{rank}", layout, STRICT)

    assert set(spec.modules) == set(layout.modules)
    for name, module in spec.modules.items():
        layer = lora_layer(peft_model, name)
        assert (module.rank, module.alpha, module.scaling) == (
            layer.r["default"],
            layer.lora_alpha["default"],
            layer.scaling["default"],
        )
    saved = load_file(tmp_path / f"r{rank}" / WEIGHTS)
    loaded = load_adapter(spec, STRICT)
    assert set(loaded) == set(spec.modules)
    for name, (a, b) in loaded.items():
        lm = layout.modules[name]
        assert a.shape == (rank, lm.in_features) and b.shape == (lm.out_features, rank)
        assert torch.equal(a, saved[spec.modules[name].a_key])
        assert torch.equal(b, saved[spec.modules[name].b_key])
        assert torch.count_nonzero(b) > 0


@pytest.mark.parametrize(
    "lora",
    [
        {"r": 4, "lora_alpha": 16, "use_rslora": True},
        {"r": 4, "lora_alpha": 8, "rank_pattern": {"v_proj": 2, "model.layers.1.mlp.down_proj": 8},
         "alpha_pattern": {"q_proj": 3, "layers.0.self_attn.o_proj": 5.5}},
        {"r": 6, "lora_alpha": 12, "use_rslora": True, "rank_pattern": {"up_proj": 1, "layers.1.self_attn.k_proj": 7},
         "alpha_pattern": {"gate_proj": 1.5}},
    ],
    ids=["rslora", "patterns", "rslora+patterns"],
)  # fmt: skip
def test_rank_alpha_scaling_follow_peft(base: LlamaForCausalLM, layout: Layout, tmp_path: Path, lora: dict[str, Any]):
    peft_model = make_adapter(base, tmp_path / "a", **lora)
    spec = validate_adapter(tmp_path / "a", layout, STRICT)

    ranks = set()
    for name, module in spec.modules.items():
        layer = lora_layer(peft_model, name)
        assert module.rank == layer.r["default"], name
        assert module.alpha == layer.lora_alpha["default"], name
        assert module.scaling == pytest.approx(layer.scaling["default"], rel=0, abs=0), name
        ranks.add(module.rank)
    assert len(ranks) > 1 or not lora.get("rank_pattern")  # the patterns did apply somewhere
    loaded = load_adapter(spec, STRICT)
    for name, (a, _) in loaded.items():
        assert a.shape[0] == spec.modules[name].rank


def test_subset_of_layout_is_valid(base: LlamaForCausalLM, layout: Layout, tmp_path: Path):
    make_adapter(base, tmp_path / "sub", r=2, target_modules=["q_proj", "v_proj"], layers_to_transform=[1])
    spec = validate_adapter(tmp_path / "sub", layout, STRICT)
    assert set(spec.modules) == {"model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"}
    assert set(load_adapter(spec, STRICT)) == set(spec.modules)


def test_spec_identity_fields(good: Path, layout: Layout, tmp_path: Path):
    spec = inspect_adapter(good, layout, STRICT)
    config_bytes, weights_bytes = (good / CONFIG).read_bytes(), (good / WEIGHTS).read_bytes()
    assert spec.version == "good-v1"
    assert spec.path == good.resolve()
    assert spec.sha256 == hashlib.sha256(config_bytes + weights_bytes).hexdigest()
    assert spec.weights_sha256 == hashlib.sha256(weights_bytes).hexdigest()
    assert spec.size_bytes == len(config_bytes) + len(weights_bytes)
    assert spec.base_model == BASE_PATH
    assert spec.peft_config["r"] == 4
    assert inspect_adapter(good, layout, STRICT, version="v7").version == "v7"

    current = tmp_path / "current"
    current.symlink_to(good)  # the ConfigMap / git-sync layout: the symlink's target is the version
    assert inspect_adapter(current, layout, STRICT).version == "good-v1"


def test_load_casts_and_owns_memory(good: Path, layout: Layout):
    spec = inspect_adapter(good, layout, STRICT)
    loaded = load_adapter(spec, STRICT, dtype=torch.bfloat16)
    a, b = loaded[Q0]
    assert a.dtype == b.dtype == torch.bfloat16
    a.zero_()  # writable, and a second load is unaffected
    assert torch.count_nonzero(load_adapter(spec, STRICT)[Q0][0]) > 0


def test_load_of_mixed_dtypes_keeps_each_tensor(copy_of: Path, layout: Layout):
    # Each tensor keeps its own dtype (the slot's copy casts), values intact.
    edit_tensors(copy_of, lambda t: t.__setitem__(Q0_A, t[Q0_A].half()))
    saved = load_file(copy_of / WEIGHTS)
    spec = inspect_adapter(copy_of, layout, STRICT)
    loaded = load_adapter(spec, STRICT)
    a, b = loaded[Q0]
    assert a.dtype == torch.float16 and b.dtype == torch.float32
    assert torch.equal(a, saved[Q0_A]) and torch.equal(b, saved[Q0_B])
    assert all(torch.equal(x, saved[spec.modules[n].a_key]) for n, (x, _) in loaded.items())


def test_base_model_matching(copy_of: Path, layout: Layout):
    edit_config(copy_of, base_model_name_or_path="/elsewhere/tiny-llama/")  # same folder name counts
    validate_adapter(copy_of, layout, STRICT)
    edit_config(copy_of, base_model_name_or_path=None)  # unknown base: nothing to compare
    validate_adapter(copy_of, layout, STRICT)
    edit_config(copy_of, base_model_name_or_path="meta-llama/Llama-3.1-8B")
    error = rejected(copy_of, layout)
    assert error.reason == "base_mismatch" and "meta-llama/Llama-3.1-8B" in error.message
    validate_adapter(copy_of, layout, ValidationConfig(base_model_must_match=False))


def test_neutral_and_falsy_unknown_config_keys_are_accepted(copy_of: Path, layout: Layout):
    edit_config(copy_of, lora_dropout=0.1, fan_in_fan_out=False, some_future_option=None, init_lora_weights="gaussian")
    validate_adapter(copy_of, layout, STRICT)


# --- rejections -------------------------------------------------------------------------------------------


def test_missing_files(copy_of: Path, layout: Layout, tmp_path: Path):
    assert rejected(tmp_path / "nope", layout).reason == "missing_file"
    (copy_of / WEIGHTS).unlink()
    error = rejected(copy_of, layout)
    assert error.reason == "missing_file" and WEIGHTS in error.message
    (copy_of / CONFIG).unlink()
    error = rejected(copy_of, layout)
    assert error.reason == "missing_file" and CONFIG in error.message


@pytest.mark.parametrize(
    ("config", "reason", "named"),
    [
        (b"{not json", "bad_config", CONFIG),
        (b"[1, 2]", "bad_config", "JSON object"),
        ({"r": 0}, "bad_config", "r must be"),
        ({"r": "4"}, "bad_config", "r must be"),
        ({"r": True}, "bad_config", "r must be"),
        ({"lora_alpha": None}, "bad_config", "lora_alpha"),
        ({"lora_alpha": float("nan")}, "bad_config", "lora_alpha"),
        ({"rank_pattern": {"q_proj": 0}}, "bad_config", "rank_pattern"),
        ({"alpha_pattern": ["q_proj"]}, "bad_config", "alpha_pattern"),
        ({"use_rslora": "yes"}, "bad_config", "use_rslora"),
        ({"peft_type": None}, "bad_config", "peft_type"),
        ({"peft_type": "IA3"}, "unsupported_feature", "IA3"),
        ({"use_dora": True}, "unsupported_feature", "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "unsupported_feature", "modules_to_save"),
        ({"bias": "all"}, "unsupported_feature", "bias"),
        ({"bias": "lora_only"}, "unsupported_feature", "bias"),
        ({"lora_bias": True}, "unsupported_feature", "lora_bias"),
        ({"target_parameters": ["mlp.experts.down_proj"]}, "unsupported_feature", "target_parameters"),
        ({"layer_replication": [[0, 2], [1, 2]]}, "unsupported_feature", "layer_replication"),
        ({"use_qalora": True}, "unsupported_feature", "use_qalora"),
        ({"trainable_token_indices": [1, 2]}, "unsupported_feature", "trainable_token_indices"),
        ({"init_lora_weights": "pissa"}, "unsupported_feature", "pissa"),
        ({"alora_invocation_tokens": [5]}, "unsupported_feature", "alora_invocation_tokens"),
        ({"use_fancy_new_variant": True}, "unsupported_feature", "use_fancy_new_variant"),
    ],
)
def test_config_rejections(copy_of: Path, layout: Layout, config: bytes | dict[str, Any], reason: str, named: str):
    if isinstance(config, bytes):
        (copy_of / CONFIG).write_bytes(config)
    else:
        edit_config(copy_of, **config)
    error = rejected(copy_of, layout)
    assert (error.reason, named in error.message) == (reason, True), error.message


def test_real_dora_adapter_is_refused(base: LlamaForCausalLM, layout: Layout, tmp_path: Path):
    make_adapter(base, tmp_path / "dora", r=4, use_dora=True)
    assert rejected(tmp_path / "dora", layout).reason == "unsupported_feature"
    # Even if the config lies, the magnitude vectors in the weights give it away.
    edit_config(tmp_path / "dora", use_dora=False)
    error = rejected(tmp_path / "dora", layout)
    assert error.reason == "unsupported_feature" and "lora_magnitude_vector" in error.message


def test_rank_above_target(base: LlamaForCausalLM, layout: Layout, tmp_path: Path):
    make_adapter(base, tmp_path / "r16", r=16, target_modules=["q_proj"])
    error = rejected(tmp_path / "r16", layout)
    assert error.reason == "rank_exceeds_target" and "16" in error.message
    make_adapter(base, tmp_path / "pat", r=4, rank_pattern={"layers.1.self_attn.q_proj": 9})
    error = rejected(tmp_path / "pat", layout)
    assert error.reason == "rank_exceeds_target" and "model.layers.1.self_attn.q_proj" in error.message


def put(key: str, tensor: torch.Tensor) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda tensors: tensors.__setitem__(key, tensor)


def poison(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        tensors[key] = tensors[key].clone()
        tensors[key][0, 1] = value

    return change


@pytest.mark.parametrize(
    ("change", "reason", "named"),
    [
        (poison(Q0_B, float("nan")), "non_finite", Q0_B),
        (poison(Q0_A, float("inf")), "non_finite", Q0_A),
        (poison(Q0_A, float("-inf")), "non_finite", Q0_A),
        (put(Q0_A, torch.ones(4, 64, dtype=torch.int32)), "bad_dtype", Q0_A),
        (put("base_model.model.lm_head.weight", torch.zeros(300, 64)), "unknown_module", "lm_head.weight"),
        (put("base_model.model.lm_head.lora_A.weight", torch.zeros(4, 64)), "unknown_module", "lm_head"),
        (put("base_model.model.model.embed_tokens.lora_embedding_A", torch.zeros(4, 300)), "unsupported_feature",
         "lora_embedding_A"),
        (put(f"base_model.model.{Q0}.lora_magnitude_vector", torch.ones(64)), "unsupported_feature",
         "lora_magnitude_vector"),
        (put(f"base_model.model.{Q0}.lora_B.bias", torch.zeros(64)), "unsupported_feature", "lora_B.bias"),
        (put(f"base_model.model.{Q0}.bias", torch.zeros(64)), "unsupported_feature", f"{Q0}.bias"),
        (lambda t: t.pop(Q0_B), "missing_weights", Q0_A),
        (lambda t: t.pop(Q0_A), "missing_weights", Q0_B),
        (lambda t: t.clear(), "missing_weights", "no LoRA weights"),
        (put(Q0_A, torch.zeros(4, 65)), "shape_mismatch", Q0_A),
        (put(Q0_B, torch.zeros(63, 4)), "shape_mismatch", Q0_B),
        (put(Q0_A, torch.zeros(2, 64)), "shape_mismatch", Q0_A),
        (put(Q0_A, torch.zeros(4, 64, 1)), "shape_mismatch", Q0_A),
        (put(Q0_A, torch.zeros(12, 64)), "rank_exceeds_target", Q0_A),
    ],
    ids=["nan", "inf", "-inf", "int32", "full-weight", "lm_head-lora", "embedding-lora", "dora-magnitude",
         "lora-bias", "base-bias", "no-B", "no-A", "empty", "A-in-features", "B-out-features", "A-rank", "A-3d",
         "A-rank-12"],
)  # fmt: skip
def test_weight_rejections(copy_of: Path, layout: Layout, change: Callable[..., Any], reason: str, named: str):
    edit_tensors(copy_of, change)
    error = rejected(copy_of, layout, on_load=reason == "non_finite")
    assert (error.reason, named in error.message) == (reason, True), error.message
    assert str(copy_of) in error.message


def test_config_rank_disagreeing_with_tensors(copy_of: Path, layout: Layout):
    edit_config(copy_of, r=2)
    error = rejected(copy_of, layout)
    assert error.reason == "shape_mismatch" and "rank 2" in error.message


def test_validate_covers_load_and_check_finite_can_be_off(copy_of: Path, layout: Layout):
    edit_tensors(copy_of, poison(Q0_B, float("nan")))
    with pytest.raises(AdapterRejected, match="non_finite"):
        validate_adapter(copy_of, layout, STRICT)
    spec = validate_adapter(copy_of, layout, ValidationConfig(check_finite=False))
    assert torch.isnan(load_adapter(spec, ValidationConfig(check_finite=False))[Q0][1]).any()


def test_overflow_in_serving_dtype(copy_of: Path, layout: Layout):
    edit_tensors(copy_of, poison(Q0_B, 1e30))
    spec = inspect_adapter(copy_of, layout, STRICT)
    load_adapter(spec, STRICT)  # finite in float32
    with pytest.raises(AdapterRejected) as info:
        load_adapter(spec, STRICT, dtype=torch.float16)
    assert info.value.reason == "non_finite" and "overflows" in info.value.message


# --- the safetensors file itself ----------------------------------------------------------------------------


def truncate(by: Callable[[int], int]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        raw = path.read_bytes()
        path.write_bytes(raw[: by(len(raw))])

    return change


def set_header_length(n: int) -> Callable[[Path], None]:
    return lambda path: path.write_bytes(struct.pack("<Q", n) + path.read_bytes()[8:])


def shift_last(delta: int) -> Callable[[Path], None]:
    """Move the last tensor's offsets by ``delta`` bytes: a hole (> 0) or an overlap (< 0), sizes kept consistent."""

    def change(path: Path) -> None:
        header, data = split(path)
        key = last_entry(header)
        start, end = header[key]["data_offsets"]
        header[key]["data_offsets"] = [start + delta, end + delta]
        join(path, header, data[:start] + b"\0" * delta + data[start:] if delta > 0 else data[: len(data) + delta])

    return change


def rewrite_header(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Path], None]:
    def change(path: Path) -> None:
        header, data = split(path)
        edit(header)
        join(path, header, data)

    return change


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (truncate(lambda n: n - 1), "truncated"),
        (truncate(lambda n: n // 2), "truncated"),
        (truncate(lambda n: 100), "truncated"),
        (truncate(lambda n: 5), "truncated"),
        (truncate(lambda n: 0), "truncated"),
        (set_header_length(2**62), "too_large"),
        (set_header_length(STRICT.max_header_bytes + 1), "too_large"),
        (set_header_length(1_000_000), "truncated"),  # under the cap, past the end of the file
        (lambda p: p.write_bytes(struct.pack("<Q", 8) + b"garbage!" + b"\0" * 16), "malformed"),
        (lambda p: p.write_bytes(struct.pack("<Q", 4) + b"\xff\xfe{}"), "malformed"),
        (lambda p: p.write_bytes(struct.pack("<Q", 2) + b"[]"), "malformed"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\0" * 4), "malformed"),
        (shift_last(4), "malformed"),
        (shift_last(-4), "malformed"),
        (rewrite_header(lambda h: h[Q0_A].update(data_offsets=[0, 3])), "malformed"),
        (rewrite_header(lambda h: h[Q0_A].update(shape=[4, -64])), "malformed"),
        (rewrite_header(lambda h: h[Q0_A].update(dtype="F128")), "malformed"),
        (rewrite_header(lambda h: h[Q0_A].update(dtype="I32")), "bad_dtype"),
        (rewrite_header(lambda h: h.pop(Q0_A)), "malformed"),  # its bytes become a hole
    ],
    ids=[
        "cut-1-byte",
        "cut-half",
        "cut-to-100",
        "cut-to-5",
        "empty",
        "header-len-2**62",
        "header-len-over-cap",
        "header-len-past-eof",
        "header-not-json",
        "header-not-utf8",
        "header-not-object",
        "trailing-bytes",
        "hole",
        "overlap",
        "offsets-vs-shape",
        "negative-dim",
        "unknown-dtype",
        "int-dtype",
        "entry-dropped",
    ],
)
def test_file_rejections(copy_of: Path, layout: Layout, change: Callable[[Path], None], reason: str):
    change(copy_of / WEIGHTS)
    error = rejected(copy_of, layout)
    assert error.reason == reason, error.message
    assert WEIGHTS in error.message


def test_header_with_metadata_and_padding_is_valid(copy_of: Path, layout: Layout):
    header, data = split(copy_of / WEIGHTS)
    header["__metadata__"] = {"format": "pt", "note": "x" * 13}
    join(copy_of / WEIGHTS, header, data)
    validate_adapter(copy_of, layout, STRICT)


def test_size_caps(copy_of: Path, layout: Layout):
    size = (copy_of / WEIGHTS).stat().st_size
    assert rejected(copy_of, layout, ValidationConfig(max_adapter_bytes=size - 1)).reason == "too_large"
    assert rejected(copy_of, layout, ValidationConfig(max_header_bytes=64)).reason == "too_large"
    validate_adapter(copy_of, layout, ValidationConfig(max_adapter_bytes=size))


def test_unreadable(copy_of: Path, layout: Layout):
    # An I/O error on open (here: a directory where the weights file should be; chmod 0 would not
    # stop root, who runs CI).
    (copy_of / WEIGHTS).unlink()
    (copy_of / WEIGHTS).mkdir()
    rejection = rejected(copy_of, layout)
    assert rejection.reason == "unreadable", rejection


# --- never unpickle -------------------------------------------------------------------------------------------


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


def test_payload_would_run_if_unpickled(tmp_path: Path):
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))  # the control: so the marker tests can fail
    assert (tmp_path / "control").exists()


@pytest.mark.parametrize("name", ["adapter_model.bin", "weights.pt", "adapter.pth", "state.pkl"])
@pytest.mark.parametrize("allow_pickle", [False, True])
@pytest.mark.parametrize("writer", ["pickle", "torch.save"])
def test_pickle_is_never_unpickled(
    copy_of: Path, layout: Layout, tmp_path: Path, name: str, allow_pickle: bool, writer: str
):
    marker = tmp_path / "marker"
    (copy_of / WEIGHTS).unlink()
    if writer == "pickle":
        (copy_of / name).write_bytes(pickle.dumps({Q0_A: _Payload(marker)}))
    else:
        torch.save({Q0_A: _Payload(marker)}, copy_of / name)
    error = rejected(copy_of, layout, ValidationConfig(allow_pickle=allow_pickle))
    assert error.reason == "pickle_refused" and (allow_pickle or name in error.message)
    assert not marker.exists()


def test_allow_pickle_reads_a_plain_peft_bin(base: LlamaForCausalLM, layout: Layout, tmp_path: Path):
    peft_model = make_adapter(base, tmp_path / "bin", r=3, safe=False)
    assert (tmp_path / "bin" / "adapter_model.bin").exists() and not (tmp_path / "bin" / WEIGHTS).exists()
    assert rejected(tmp_path / "bin", layout).reason == "pickle_refused"
    allow = ValidationConfig(allow_pickle=True)
    spec = validate_adapter(tmp_path / "bin", layout, allow)
    assert spec.weights_format == "pickle"
    a, b = load_adapter(spec, allow)[Q0]
    layer = lora_layer(peft_model, Q0)
    assert torch.equal(a, layer.lora_A["default"].weight) and torch.equal(b, layer.lora_B["default"].weight)


def test_safetensors_wins_over_a_stray_pickle(copy_of: Path, layout: Layout, tmp_path: Path):
    (copy_of / "training_args.bin").write_bytes(pickle.dumps(_Payload(tmp_path / "marker")))
    validate_adapter(copy_of, layout, STRICT)
    assert not (tmp_path / "marker").exists()


# --- changes between inspect and load ------------------------------------------------------------------------


def _inspect(folder: Path, layout: Layout) -> AdapterSpec:
    return inspect_adapter(folder, layout, STRICT)


def test_weights_rewritten_in_place_after_inspect(copy_of: Path, layout: Layout):
    spec = _inspect(copy_of, layout)
    edit_tensors(copy_of, lambda t: t[Q0_B].mul_(2))  # same size, different content
    assert (copy_of / WEIGHTS).stat().st_size == spec.weights_stamp.size
    with pytest.raises(AdapterRejected) as info:
        load_adapter(spec, STRICT)
    assert info.value.reason == "changed"


def test_weights_replaced_by_rename_after_inspect(
    copy_of: Path, layout: Layout, base: LlamaForCausalLM, tmp_path: Path
):
    spec = _inspect(copy_of, layout)
    make_adapter(base, tmp_path / "other", seed=2, r=4, lora_alpha=8)
    os.replace(tmp_path / "other" / WEIGHTS, copy_of / WEIGHTS)
    with pytest.raises(AdapterRejected, match="changed"):
        load_adapter(spec, STRICT)


def test_weights_truncated_after_inspect(copy_of: Path, layout: Layout):
    spec = _inspect(copy_of, layout)
    truncate(lambda n: n - 1)(copy_of / WEIGHTS)
    with pytest.raises(AdapterRejected) as info:
        load_adapter(spec, STRICT)
    assert info.value.reason == "truncated"


def test_config_changed_after_inspect(copy_of: Path, layout: Layout):
    spec = _inspect(copy_of, layout)
    edit_config(copy_of, lora_alpha=64)  # would change every scaling
    with pytest.raises(AdapterRejected) as info:
        load_adapter(spec, STRICT)
    assert info.value.reason == "changed"


def test_files_removed_after_inspect(copy_of: Path, layout: Layout):
    spec = _inspect(copy_of, layout)
    (copy_of / WEIGHTS).unlink()
    with pytest.raises(AdapterRejected) as info:
        load_adapter(spec, STRICT)
    assert info.value.reason == "changed"


def test_touch_without_change_still_loads(copy_of: Path, layout: Layout):
    spec = _inspect(copy_of, layout)
    os.utime(copy_of / WEIGHTS, ns=(1, 1))
    assert set(load_adapter(spec, STRICT)) == set(spec.modules)  # the sha256 decides, not the mtime
