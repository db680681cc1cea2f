"""Makes real PEFT adapters for the demo base model (``save_pretrained``), with random non-zero weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM


def make_adapter(
    base: Path,
    out: Path,
    *,
    r: int,
    alpha: float,
    targets: list[str],
    seed: int = 0,
    std: float = 0.15,
    save_embedding_layers: bool | str = "auto",
    **lora_kwargs: Any,
) -> Path:
    """``save_embedding_layers``: PEFT saves the whole output head beside a LoRA on it unless told not to."""
    model = AutoModelForCausalLM.from_pretrained(base)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, **lora_kwargs)
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    peft_model.save_pretrained(out, save_embedding_layers=save_embedding_layers)
    return out


def eager_last_logits(base: Path, adapter: Path | None, prompts: list[str], tokenizer: Any) -> torch.Tensor:
    """Reference: a fresh eager model (PeftModel.from_pretrained when ``adapter``), one prompt at a time."""
    model: Any = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    rows = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([tokenizer.encode(p, add_special_tokens=False)])
            rows.append(model(input_ids=ids).logits[0, -1].float())
    return torch.stack(rows)  # [B, V]


def eager_logprobs(base: Path, adapter: Path | None, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Reference: a fresh eager model's log-softmax [T, V] at each position of ``completion`` after ``prompt``,
    by teacher forcing (one forward over the prompt and the completion)."""
    model: Any = AutoModelForCausalLM.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()  # [L, V]
    return torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(completion)], dim=-1)
