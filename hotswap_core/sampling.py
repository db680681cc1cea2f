"""Batched sampling on the logits' device: greedy, temperature, top-k and top-p for every row at once, and one
device -> host transfer of the chosen ids per step.

A random row draws by inverse transform: one uniform ``u`` from the row's own stream, and the first token
whose cumulative probability (of ``softmax(logits / T)``, after top-k and top-p) passes ``u`` times the total.
Each row's stream is its own ``random.Random`` seeded from the request's ``seed``, so a seeded request gets the
same tokens whatever else shares its batch: no other row's draws, count or order touch its stream. One number a
row per step, where a race of noise (Gumbel-max) draws a vocabulary's worth (at 152k entries that was 2 ms a row
on a CPU); the step's numbers go to the device in one copy that does not wait for it (a generator per row on
the device was a kernel per row), and the rest is the same few tensor operations for every row.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

log = logging.getLogger("hotswapd.engine")

# Below this temperature a draw is the argmax (logits / T overflows long before T reaches 0 in float32).
MIN_TEMPERATURE = 1e-5
# The largest uniform a draw uses, exact in float32: u * total then stays below the total after rounding, so the
# search always lands on an entry with mass (the last 2**-20 of it is never drawn).
UNIFORM_CEILING = 1.0 - 2.0**-20


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
    def uniform(self) -> float: ...


def sample(logits: torch.Tensor, rows: Sequence[Row]) -> list[int]:
    """The next token of every row. ``logits``: [B, V], any device and dtype."""
    logits = _mask_early_eos(logits, rows)
    device = logits.device
    drawn = [i for i, r in enumerate(rows) if r.temperature >= MIN_TEMPERATURE]
    if not drawn:
        return logits.argmax(dim=-1).tolist()  # type: ignore[no-any-return]  # the one transfer to the host
    every = len(drawn) == len(rows)
    index = None if every else torch.tensor(drawn, device=device)
    scaled = (logits if index is None else logits.index_select(0, index)).float()  # [R, V]
    temperature = [rows[i].temperature for i in drawn]
    if any(t != 1.0 for t in temperature):
        scaled = scaled / torch.tensor(temperature, device=device)[:, None]
    values, order = _top_k_top_p(scaled, [rows[i].top_k for i in drawn], [rows[i].top_p for i in drawn])
    uniform = torch.tensor([rows[i].uniform() for i in drawn], dtype=torch.float32)  # [R]: each row's own stream
    uniform = uniform.to(device, non_blocking=True)  # pageable: staged at once, the device not waited for
    choice = _inverse_cdf(values, uniform)  # [R], into values
    tokens = choice if order is None else order.gather(1, choice[:, None])[:, 0]
    if index is not None:
        tokens = logits.argmax(dim=-1).index_copy(0, index, tokens)
    return tokens.tolist()  # type: ignore[no-any-return]  # the one transfer to the host


def _inverse_cdf(values: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of ``values`` [R, W] (logits, -inf for what is filtered out), the first index whose
    cumulative softmax mass passes ``uniform`` [R] (at most ``UNIFORM_CEILING``) times the row's total. A
    filtered entry (probability 0) is never chosen: its cumulative mass equals the one before it, and the
    target stays below the total."""
    cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)  # float32 (on the CPU, summed in float64)
    target = uniform.clamp(max=UNIFORM_CEILING)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True)[:, 0]


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


def _top_k_top_p(
    scaled: torch.Tensor, top_k: list[int], top_p: list[float]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The candidates of each row: ``(values, order)``, ``values`` [R, W] the largest W logits in descending
    order with those outside the row's top-k, then outside its top-p nucleus (of the renormalised rest), at -inf,
    and ``order`` their vocabulary ids. The most likely entry always stays. ``(scaled, None)``, the whole
    vocabulary unsorted, when no row filters. When every row has a top-k, only the largest k are sorted
    (``topk``: at a 152k vocabulary a full sort costs far more), and what is drawn from is k wide."""
    vocab = scaled.shape[-1]
    ks = [k if 0 < k < vocab else vocab for k in top_k]
    if all(k == vocab for k in ks) and all(p >= 1.0 for p in top_p):
        return scaled, None
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
    return values.masked_fill(~keep, float("-inf")), order


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
