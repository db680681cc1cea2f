"""Batched sampling on the logits' device: greedy, temperature, top-k and top-p for every row at once, and one
device -> host transfer of the chosen ids per step.

Random rows draw by the exponential race (the Gumbel-max trick): ``argmax(logits / T - log(E))`` with ``E`` a
standard exponential per vocabulary entry is a draw from ``softmax(logits / T)``. Each row's ``E`` comes from
its own generator on the device, seeded from the request's ``seed``, so a seeded request gets the same tokens
whatever else shares its batch: no other row's draws, count or order touch its stream.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

log = logging.getLogger("hotswapd.engine")

# Below this temperature a draw is the argmax (logits / T overflows long before T reaches 0 in float32).
MIN_TEMPERATURE = 1e-5
_TINY = torch.finfo(torch.float32).tiny  # U(0, 1) clamped away from 0 before -log(U)


class Row(Protocol):
    """What sampling reads from a row (``generation.RowState``)."""

    ids: list[int]
    eos_ids: frozenset[int]

    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_tokens(self) -> int: ...
    def generator(self, device: torch.device) -> torch.Generator: ...


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """The next token of every row. ``logits``: [B, V], any device and dtype."""
    logits = _mask_early_eos(logits, rows)
    picked = logits.argmax(dim=-1)  # [B]
    drawn = [i for i, r in enumerate(rows) if r.temperature >= MIN_TEMPERATURE]
    if drawn:
        index = torch.tensor(drawn, device=logits.device)
        scaled = logits.index_select(0, index).float()  # [R, V]
        temperature = torch.tensor([rows[i].temperature for i in drawn], device=logits.device)  # [R]
        scaled = (scaled - scaled.amax(dim=-1, keepdim=True)) / temperature[:, None]
        scaled = _top_k_top_p(scaled, [rows[i].top_k for i in drawn], [rows[i].top_p for i in drawn])
        vocab = scaled.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=rows[i].generator(logits.device), device=logits.device) for i in drawn]
        )  # [R, V]: each row's own stream
        race = scaled - torch.log(-torch.log(uniform.clamp_min(_TINY)))  # scaled + Gumbel noise
        picked = picked.index_copy(0, index, race.argmax(dim=-1))
    return [int(t) for t in picked.tolist()]  # the one transfer to the host


def _mask_early_eos(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """``min_tokens``: EOS cannot be picked by a row that has fewer tokens than that."""
    early = [(i, sorted(r.eos_ids)) for i, r in enumerate(rows) if r.eos_ids and len(r.ids) < r.min_tokens]
    if not early:
        return logits
    rows_index = torch.tensor([i for i, eos in early for _ in eos], device=logits.device)
    eos_index = torch.tensor([e for _, eos in early for e in eos], device=logits.device)
    masked = logits.clone()
    masked[rows_index, eos_index] = float("-inf")
    return masked


def _top_k_top_p(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Entries outside each row's top-k, then outside its top-p nucleus (of the renormalised rest), to -inf.
    The most likely entry always stays. One sort for all rows, and none when no row filters; when every row
    has a top-k, only the largest k are sorted (``topk``: at a 152k vocabulary a full sort costs far more)."""
    vocab = scaled.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in top_p):
        return scaled
    width = max(ks)
    if width < vocab:
        values, order = scaled.topk(width, dim=-1)  # [R, width], descending
    else:
        values, order = scaled.sort(dim=-1, descending=True)  # [R, V]
    rank = torch.arange(width, device=scaled.device)
    keep = rank[None, :] < torch.tensor(ks, device=scaled.device)[:, None]
    values = values.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(values, dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass of the entries ranked above each one
    nucleus = torch.tensor([p if p < 1.0 else float("inf") for p in top_p], device=scaled.device)  # 1: no filter
    keep &= before < nucleus[:, None]
    keep[:, 0] = True
    values = values.masked_fill(~keep, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter_(-1, order, values)


def sampling_defaults(generation_config: Any) -> dict[str, float | int]:
    """The sampling values a model's ``generation_config.json`` sets explicitly (temperature, top_p, top_k): the
    defaults for requests that leave them out, as vLLM does. Values a request could not send are dropped."""
    if generation_config is None:
        return {}
    diff = generation_config.to_diff_dict()
    checks: dict[str, Callable[[Any], bool]] = {
        "temperature": lambda v: isinstance(v, (int, float)) and 0 <= v <= 2,
        "top_p": lambda v: isinstance(v, (int, float)) and 0 < v <= 1,
        "top_k": lambda v: isinstance(v, int) and v >= 0,
    }
    out: dict[str, float | int] = {}
    for key, valid in checks.items():
        value = diff.get(key)
        if value is None:
            continue
        if valid(value) and not isinstance(value, bool):
            out[key] = value
        else:
            log.warning("generation_config.%s=%r is not a usable default; ignored", key, value)
    return out
