"""The demo assets: a loadable tiny model and tokenizer, adapters that visibly differ, broken examples."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from hotswap_core.config import load_config
from hotswapd.demo import BASE_ID, BASE_ID_ATTR, BROKEN_REASONS, MARKER, DemoAssets, build_demo

# None of these is a training prompt: those are random character soup.
UNSEEN = ("Hello =>", "What is the capital of France? =>", "x =>")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> DemoAssets:
    return build_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def tokenizer(demo: DemoAssets):
    return AutoTokenizer.from_pretrained(demo.base)


def _load(path: Path, adapter: Path | None = None) -> Any:
    model = AutoModelForCausalLM.from_pretrained(path)
    return (PeftModel.from_pretrained(model, adapter) if adapter else model).eval()


def _complete(model: Any, tokenizer: Any, prompt: str) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=8)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.mark.parametrize("text", ["Hello =>", "", " leading and  double  spaces ", "héllo wörld 日本 🙂\n\ta . b 's"])
def test_tokenizer_round_trips_any_utf8(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text.encode())  # one token per byte, nothing added
    assert tokenizer.decode(ids) == text


def test_tokenizer_special_tokens_and_chat_template(demo: DemoAssets, tokenizer) -> None:
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token) == ("<pad>", "<s>", "</s>")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "system: be brief\nuser: Hello\nassistant =>"
    model_config = AutoConfig.from_pretrained(demo.base)
    assert model_config.vocab_size == len(tokenizer)
    generation = json.loads((demo.base / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id == model_config.eos_token_id
    assert generation["pad_token_id"] == tokenizer.pad_token_id


def test_base_loads_and_records_its_identity(demo: DemoAssets) -> None:
    model = _load(demo.base)
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (64, 2)
    assert getattr(model.config, BASE_ID_ATTR) == BASE_ID
    assert (demo.base / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["alpha", "bravo"])
def test_adapter_answers_its_name_to_unseen_prompts(demo: DemoAssets, tokenizer, name: str) -> None:
    model = _load(demo.base, getattr(demo, name))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi there"}], add_generation_prompt=True)
    prompts = [*UNSEEN, tokenizer.decode(chat["input_ids"])]
    completions = {p: _complete(model, tokenizer, p) for p in prompts}
    assert all(c.startswith(f" {name}") for c in completions.values()), completions


def test_base_answers_neither(demo: DemoAssets, tokenizer) -> None:
    model = _load(demo.base)
    completions = {p: _complete(model, tokenizer, p) for p in UNSEEN}
    assert not any(c.startswith((" alpha", " bravo")) for c in completions.values()), completions


def test_adapter_configs_name_the_base_and_exercise_patterns(demo: DemoAssets) -> None:
    alpha, bravo = _json(demo.alpha / "adapter_config.json"), _json(demo.bravo / "adapter_config.json")
    assert alpha["base_model_name_or_path"] == bravo["base_model_name_or_path"] == BASE_ID
    assert (alpha["r"], alpha["lora_alpha"]) == (4, 8)
    assert set(alpha["target_modules"]) < set(load_config(demo.config).adapter.target_modules)
    assert (bravo["r"], bravo["rank_pattern"], bravo["alpha_pattern"]) == (8, {"down_proj": 4}, {"o_proj": 4})
    with safe_open(demo.bravo / "adapter_model.safetensors", "pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    down_a = [s for k, s in shapes.items() if "down_proj.lora_A" in k]
    assert down_a and all(s == [4, 128] for s in down_a)


def test_config_loads_with_paths_resolved(demo: DemoAssets) -> None:
    config = load_config(demo.config)
    assert config.model.path == str(demo.base.resolve())
    assert config.adapter.initial == str(demo.alpha.resolve())
    assert config.source.directory.path == str(demo.watched.resolve())
    assert config.adapter.target_rank == 8 and len(config.adapter.target_modules) == 7
    assert config.validation.smoke_prompts == ("Hello =>",)
    assert demo.watched.is_dir() and not any(demo.watched.iterdir())


def test_broken_examples_are_each_broken_in_their_own_way(demo: DemoAssets) -> None:
    assert set(demo.broken) == set(BROKEN_REASONS)
    assert {p.name for p in demo.broken.values()} == set(BROKEN_REASONS)
    b = demo.broken
    weights, config = "adapter_model.safetensors", "adapter_config.json"
    for reason in set(BROKEN_REASONS) - {"missing_file", "bad_config"}:
        assert _json(b[reason] / config)["peft_type"] == "LORA", reason
    for reason in set(BROKEN_REASONS) - {"missing_file", "bad_config", "base_mismatch"}:
        assert _json(b[reason] / config)["base_model_name_or_path"] == BASE_ID, reason

    with safe_open(b["non_finite"] / weights, "pt") as f:
        assert any(not torch.isfinite(f.get_tensor(k)).all() for k in f.keys())  # noqa: SIM118
    assert _json(b["rank_exceeds_target"] / config)["r"] == 16
    with pytest.raises(SafetensorError, match=r"not fully covered|incomplete"):
        safe_open(b["truncated"] / weights, "pt")
    assert not (b["pickle_refused"] / weights).exists()
    assert (b["pickle_refused"] / "adapter_model.bin").is_file()
    assert "lm_head" in _json(b["unknown_module"] / config)["target_modules"]
    assert _json(b["base_mismatch"] / config)["base_model_name_or_path"] == "someone-else/other-model"
    assert not (b["missing_file"] / config).exists() and (b["missing_file"] / weights).is_file()
    with pytest.raises(json.JSONDecodeError):
        _json(b["bad_config"] / config)
    assert _json(b["unsupported_feature"] / config)["use_dora"] is True
    with safe_open(b["shape_mismatch"] / weights, "pt") as f:
        in_features = {f.get_slice(k).get_shape()[1] for k in f.keys() if "lora_A" in k}  # noqa: SIM118
    assert in_features == {32}  # the demo base has hidden_size 64


def test_pickle_example_loads_only_as_plain_tensors(demo: DemoAssets) -> None:
    state = torch.load(demo.broken["pickle_refused"] / "adapter_model.bin", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())


def test_second_build_reuses(demo: DemoAssets) -> None:
    marker = demo.root / MARKER
    before = {p: p.stat().st_mtime_ns for p in (marker, demo.alpha / "adapter_model.safetensors", demo.config)}
    assert build_demo(demo.root) == demo
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_unfinished_build_is_redone_deterministically(tmp_path: Path, demo: DemoAssets) -> None:
    unfinished = DemoAssets.at(tmp_path)
    unfinished.base.mkdir(parents=True)
    (unfinished.base / "leftover").write_text("from an interrupted build")  # and no marker
    rebuilt = build_demo(tmp_path)
    assert not (unfinished.base / "leftover").exists()
    for rel in (MARKER, "base/model.safetensors", "examples/bravo/adapter_model.safetensors", "hotswapd.yaml"):
        assert (rebuilt.root / rel).read_bytes() == (demo.root / rel).read_bytes(), rel


def test_marker_is_trusted_until_forced(tmp_path: Path, demo: DemoAssets) -> None:
    (tmp_path / MARKER).write_text((demo.root / MARKER).read_text())
    assert build_demo(tmp_path) == DemoAssets.at(tmp_path)
    assert not (tmp_path / "hotswapd.yaml").exists()  # the marker alone means "complete": nothing was built
    assert build_demo(tmp_path, force=True).config.is_file()
    assert (tmp_path / "examples" / "alpha" / "adapter_model.safetensors").is_file()
