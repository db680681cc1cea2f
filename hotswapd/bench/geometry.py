"""A "realistic-geometry" model for the bench, built locally in seconds: Qwen2.5-1.5B's shapes (vocabulary,
hidden and MLP widths, 12 query heads over 2 KV heads, tied embeddings) with 2 layers instead of 28 and
random weights, float32, saved with ``save_pretrained`` beside the demo's tokenizer.

The demo model is 64 wide with a 259-token vocabulary: its steps are all Python and launch overhead. This
one spends a step the way a real model does, in the matmuls and in reading a 151,936 x 1,536 head, so the
engine's per-step overheads show at their real proportion. The demo tokenizer spells 259 of the 151,936
ids; the embedding rows of every other id (and of the special tokens) are zero, so their logits are 0 and
greedy text is never empty (the swap's smoke prompts reject an empty completion).
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

from hotswapd.demo import BOS, EOS, PAD, SEED

logger = logging.getLogger("hotswapd.bench")

MODEL_NAME = "qwen2.5-1.5b-geometry-2-layers"
MARKER = ".hotswapd-geometry"  # written last: a folder with it is complete
# Qwen/Qwen2.5-1.5B's config.json, but for the layer count.
QWEN25_15B: dict[str, Any] = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
)  # fmt: skip
LAYERS = 2


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer's files in a ``save_pretrained`` folder (what ``AutoTokenizer`` reads)."""
    return sorted(p for p in folder.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "chat_template")))


def build_geometry_model(out: Path, tokenizer_from: Path) -> Path:
    """Write the model to ``out`` (config, weights, generation config, and the tokenizer copied from
    ``tokenizer_from``, a demo base folder); an ``out`` that is already complete is reused as it is."""
    out = Path(out).absolute()
    if (out / MARKER).is_file():
        return out
    started = time.monotonic()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    config = Qwen2Config(
        **QWEN25_15B, num_hidden_layers=LAYERS, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, dtype="float32"
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Qwen2ForCausalLM(config).eval()
    spelled = min(PAD, config.vocab_size)  # ids the tokenizer spells as text: the 256 bytes
    with torch.no_grad():
        model.get_input_embeddings().weight[spelled:].zero_()  # tied: the head's rows too, so those logits are 0
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    model.name_or_path = MODEL_NAME
    model.save_pretrained(out)
    for path in tokenizer_files(Path(tokenizer_from)):
        shutil.copy2(path, out / path.name)
    (out / MARKER).write_text(MODEL_NAME + "\n")
    params = sum(p.numel() for p in model.parameters())
    took = time.monotonic() - started
    logger.info("geometry model (%.0fM parameters) written to %s in %.1f s", params / 1e6, out, took)
    return out
