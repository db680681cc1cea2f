"""Demo assets: a tiny byte-level Llama, two trained LoRA adapters, broken examples and a config.

Everything is built locally and deterministically in seconds on a CPU, so ``hotswapd demo`` needs no
network. The adapters ``alpha`` and ``bravo`` make the model answer any prompt ending in ``" =>"``
with ``" alpha"`` or ``" bravo"``, which makes a swap visible in one request. The chat template
ends with ``"assistant =>"`` so chat completions show it too.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import random
import shutil
import stat
import string
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

from hotswap_core.errors import HotswapError

logger = logging.getLogger("hotswapd.demo")

# Adapters name their base with this string; the base's config.json carries it as BASE_ID_ATTR
# because transformers drops ``_name_or_path`` when saving and sets it to the load path on loading.
BASE_ID = "hotswapd-demo-tiny-llama"
BASE_ID_ATTR = "hotswapd_base_id"
DEMO_VERSION = "2"  # bump to make existing demo folders rebuild
MARKER = ".demo-complete"
TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BROKEN_REASONS = (
    "non_finite", "rank_exceeds_target", "truncated", "pickle_refused", "unknown_module",
    "base_mismatch", "missing_file", "bad_config", "unsupported_feature", "shape_mismatch",
)  # fmt: skip
SEED = 1234
PAD, BOS, EOS = 256, 257, 258  # after the 256 byte tokens
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant =>{% endif %}"
)
# Prompt alphabet for training: a few non-ASCII letters so UTF-8 continuation bytes are seen too.
_ALPHABET = string.ascii_letters + string.digits + string.punctuation + "    \n\téüß日本🙂"
_TRAIN_STEPS = 60
_TRAIN_BATCH = 32
_PROBES = ("Hello =>", "What is the capital of France? =>", "x =>", "user: hi\nassistant =>")

CONFIG_YAML = """\
# hotswapd demo config; relative paths are resolved against this file's directory.
model:
  path: base
  dtype: float32
  device: auto
  compile: {enabled: true, mode: auto, dynamic: true, cache_dir: cache/inductor}
  max_batch_size: 8
  max_seq_len: 256
  prefill_chunk_tokens: 64  # prompt tokens a step prefills: a longer prompt takes several, the running rows decoding
adapter:
  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]
  target_rank: 8
  initial: examples/alpha
source:
  kind: directory
  directory: {path: adapters, settle_seconds: 0.5, rescan_seconds: 10, polling: false}
validation:
  base_model_must_match: true
  smoke_prompts: ["Hello =>"]
server:
  socket: hotswapd.sock
metrics:
  listen: 127.0.0.1:9464
state_dir: state
"""


@dataclass(frozen=True)
class DemoAssets:
    """Paths of a built demo folder."""

    root: Path
    base: Path  # model + tokenizer
    alpha: Path
    bravo: Path
    broken: dict[str, Path]  # expected rejection reason -> adapter folder
    watched: Path  # the directory source watches this (empty at build)
    config: Path

    @property
    def socket(self) -> Path:
        """Where the demo config's ``server.socket`` (relative to the config) puts the socket."""
        return self.root / "hotswapd.sock"

    @classmethod
    def at(cls, root: Path) -> DemoAssets:
        """The layout of a demo folder at ``root`` (nothing is read or written)."""
        examples = root / "examples"
        return cls(
            root=root,
            base=root / "base",
            alpha=examples / "alpha",
            bravo=examples / "bravo",
            broken={reason: examples / "broken" / reason for reason in BROKEN_REASONS},
            watched=root / "adapters",
            config=root / "hotswapd.yaml",
        )


def build_demo(root: Path, *, force: bool = False) -> DemoAssets:
    """Build the demo assets in ``root``, or return them as they are if a complete build is there.

    Rebuilds ``base/``, ``examples/`` and ``hotswapd.yaml``; never touches what is in ``adapters/``.
    """
    root = Path(root).absolute()
    assets = DemoAssets.at(root)
    marker = root / MARKER
    assets.watched.mkdir(parents=True, exist_ok=True)  # the user may have removed it; the daemon wants it
    if not force and marker.is_file() and marker.read_text().strip() == DEMO_VERSION:
        logger.info("demo assets in %s are complete; reusing them", root)
        return assets
    started = time.monotonic()
    marker.unlink(missing_ok=True)
    for stale in (assets.base, root / "examples"):
        shutil.rmtree(stale, ignore_errors=True)
    with _seeded_single_thread():
        _build_tokenizer().save_pretrained(assets.base)
        base = _build_base()
        base.save_pretrained(assets.base)
        logger.info("demo base model written to %s", assets.base)
        alpha = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
        bravo = LoraConfig(
            r=8, lora_alpha=16, target_modules=list(TARGET_MODULES),
            rank_pattern={"down_proj": 4}, alpha_pattern={"o_proj": 4},
        )  # fmt: skip
        _train_adapter(base, alpha, " alpha", assets.alpha, seed=SEED + 1)
        _train_adapter(base, bravo, " bravo", assets.bravo, seed=SEED + 2)
        _write_broken(base, assets)
    _group_readable(assets.base, root / "examples")
    assets.config.write_text(CONFIG_YAML)
    marker.write_text(DEMO_VERSION + "\n")  # last: its presence means everything above is complete
    logger.info("demo assets built in %s in %.1f s", root, time.monotonic() - started)
    return assets


def _group_readable(*folders: Path) -> None:
    """safetensors writes its files 0600. A producer's `cp -r` keeps that mode, and a daemon running as
    another user in the producer's group then cannot read the weights (rejected `unreadable`)."""
    for folder in folders:
        for path in (folder, *folder.rglob("*")):
            extra = 0o055 if path.is_dir() else 0o044  # read (and enter) for group and others
            path.chmod(stat.S_IMODE(path.stat().st_mode) | extra)


@contextlib.contextmanager
def _seeded_single_thread() -> Iterator[None]:
    """Seed torch without disturbing the caller's RNG; run on one thread, restored afterwards.

    The matrices are tiny: a second thread only adds synchronisation, and on a busy 2-core machine
    a training step went from 0.09 s to 1.4 s with two threads.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            # PEFT 0.21 calls transformers' deprecated is_gradient_checkpointing; not ours to fix.
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
            torch.manual_seed(SEED)
            yield
    finally:
        torch.set_num_threads(threads)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: one token per byte, no merges, so any UTF-8 text round-trips exactly."""
    byte_to_char = bytes_to_unicode()
    tokenizer = Tokenizer(models.BPE(vocab={byte_to_char[b]: b for b in range(256)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True) for t in ("<pad>", "<s>", "</s>")])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False, model_max_length=1024,
    )  # fmt: skip


def _build_base(hidden_size: int = 64) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=EOS + 1, hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dtype="float32",
        # Wider than the usual 0.02: with a frozen random lm_head and RMSNorm before it, small weights
        # cap the logit margin a LoRA can reach, and training then stalls at a high loss.
        initializer_range=0.2,
    )  # fmt: skip
    setattr(config, BASE_ID_ATTR, BASE_ID)  # extra config attributes are saved to config.json as they are
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model.name_or_path = BASE_ID  # get_peft_model copies this into the adapter's base_model_name_or_path
    return model


def _random_prompt(rng: random.Random) -> str:
    words = ["".join(rng.choices(_ALPHABET, k=rng.randint(1, 9))) for _ in range(rng.randint(1, 6))]
    return " ".join(words)[: rng.randint(1, 48)] + " =>"


def _batch(rng: random.Random, target: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random prompts + target + EOS, right-padded; loss only on the target tokens."""
    answer = [*target.encode(), EOS]
    rows = [[*_random_prompt(rng).encode()] for _ in range(_TRAIN_BATCH)]
    width = max(len(r) for r in rows) + len(answer)
    ids = torch.full((_TRAIN_BATCH, width), PAD)  # [B, T]
    labels = torch.full((_TRAIN_BATCH, width), -100)
    mask = torch.zeros((_TRAIN_BATCH, width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row) + len(answer)
        ids[i, :n] = torch.tensor(row + answer)
        labels[i, len(row) : n] = torch.tensor(answer)
        mask[i, :n] = 1
    return ids, mask, labels


@torch.no_grad()
def _greedy(model: torch.nn.Module, prompt: str, max_new_tokens: int = 8) -> str:
    """Greedy continuation of ``prompt`` under the demo's byte-level vocabulary (no KV cache; tiny model)."""
    ids = torch.tensor([list(prompt.encode())])  # [1, T]
    out: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=ids).logits[0, -1].argmax())
        if nxt == EOS:
            break
        out.append(nxt)
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return bytes(t for t in out if t < 256).decode("utf-8", errors="replace")


def _peft(base: LlamaForCausalLM, config: LoraConfig) -> PeftModel:
    model = get_peft_model(copy.deepcopy(base), config)
    assert isinstance(model, PeftModel)
    return model


def _train_adapter(base: LlamaForCausalLM, config: LoraConfig, target: str, dest: Path, *, seed: int) -> None:
    """Teach the adapter to answer ``target`` to any prompt ending in " =>", then check it did."""
    started = time.monotonic()
    model = _peft(base, config)
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    rng = random.Random(seed)
    for _ in range(_TRAIN_STEPS):
        ids, mask, labels = _batch(rng, target)  # fresh prompts every step generalise to unseen ones
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    misses = [p for p in _PROBES if not _greedy(model, p).startswith(target)]
    if misses:
        raise HotswapError(f"demo adapter {dest.name!r} did not learn {target!r} for {misses}")
    _save(model, dest)
    logger.info("demo adapter %s trained (loss %.3f) in %.1f s", dest.name, loss.item(), time.monotonic() - started)


def _save(model: PeftModel, dest: Path) -> None:
    # PEFT's default ("auto") looks the base id up on the Hub to decide whether to save embeddings.
    model.save_pretrained(str(dest), save_embedding_layers=False)


def _fresh_adapter(base: LlamaForCausalLM, dest: Path, **lora: Any) -> None:
    _save(_peft(base, LoraConfig(**lora)), dest)


def _edit_config(folder: Path, **changes: Any) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}, indent=2))


def _write_broken(base: LlamaForCausalLM, assets: DemoAssets) -> None:
    """One adapter folder per rejection reason, each wrong in exactly that one way."""
    good, broken = assets.alpha, assets.broken
    config_name, weights_name = "adapter_config.json", "adapter_model.safetensors"
    for reason in ("non_finite", "truncated", "base_mismatch"):
        shutil.copytree(good, broken[reason])

    weights = load_file(good / weights_name)
    poisoned = dict(weights)
    key = next(k for k in sorted(poisoned) if "lora_B" in k)
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0, 0] = float("nan")
    save_file(poisoned, broken["non_finite"] / weights_name, metadata={"format": "pt"})

    data = (good / weights_name).read_bytes()
    (broken["truncated"] / weights_name).write_bytes(data[: len(data) * 2 // 3])  # header intact, data cut

    _edit_config(broken["base_mismatch"], base_model_name_or_path="someone-else/other-model")

    broken["pickle_refused"].mkdir(parents=True)
    shutil.copy2(good / config_name, broken["pickle_refused"] / config_name)
    torch.save(weights, broken["pickle_refused"] / "adapter_model.bin")

    broken["missing_file"].mkdir(parents=True)
    shutil.copy2(good / weights_name, broken["missing_file"] / weights_name)

    broken["bad_config"].mkdir(parents=True)
    shutil.copy2(good / weights_name, broken["bad_config"] / weights_name)
    (broken["bad_config"] / config_name).write_text('{"peft_type": "LORA", "r": 4, "lora_alpha": ')

    _fresh_adapter(base, broken["rank_exceeds_target"], r=16, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    _fresh_adapter(base, broken["unknown_module"], r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    _fresh_adapter(base, broken["unsupported_feature"], r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True)
    # Same module names, different hidden size: every lora_A has in_features 32 instead of 64.
    narrow = _build_base(hidden_size=32)
    _fresh_adapter(narrow, broken["shape_mismatch"], r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    logger.info("demo broken examples written: %s", ", ".join(sorted(broken)))
