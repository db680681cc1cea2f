"""Batched sampling on the logits' device: greedy, temperature, top-k and top-p for every row at once, and one
device -> host transfer of the chosen ids per step.

A random row draws by inverse transform: one uniform ``u`` from the row's own stream, and the first token
whose cumulative probability (of ``softmax(logits / T)``, after top-k and top-p) passes ``u`` times the total.
Each row's stream is its own ``random.Random`` seeded from the request's ``seed``, so a seeded request gets the
same tokens whatever else shares its batch: no other row's draws, count or order touch its stream. One number a
row per step, where a race of noise (Gumbel-max) draws a vocabulary's worth (at 152k entries that was 2 ms a row
on a CPU); the step's numbers go to the device in one copy that does not wait for it (a generator per row on
the device was a kernel per row), and the rest is the same few tensor operations for every row.

Where the draw runs: ``draw`` (argmax or inverse transform, at each row's temperature) is traced into the
runner's compiled forwards, so a step returns its tokens and sampling adds no operation of its own on the
serving thread (in eager it was a dozen, each giving the GIL away; on the demo model that made temperature 1
cost about 7% of greedy's tokens/s over the socket, against 1% inside the step). Rows that filter (top-k,
top-p) or mask EOS (``min_tokens``) are drawn after the step from its logits (``sample``); a row always takes
the same path for the same parameters and position, so seeded rows stay reproducible.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch

from hotswap_core.generation import Scored

log = logging.getLogger("hotswapd.engine")

# Below this temperature a draw is the argmax (logits / T overflows long before T reaches 0 in float32).
MIN_TEMPERATURE = 1e-5
# The largest uniform a draw uses, exact in float32: u * total then stays below the total after rounding, so the
# search always lands on an entry with mass (the last 2**-20 of it is never drawn).
UNIFORM_CEILING = 1.0 - 2.0**-20
# A row's number for a step where it takes the argmax (temperature 0).
GREEDY = -1.0
# What a log-probability of -inf (a token the model rules out) is reported as: JSON has no infinity (vLLM's value).
LOGPROB_FLOOR = -9999.0


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
    @property
    def adjusted(self) -> bool: ...
    @property
    def params(self) -> Any: ...  # generation.SamplingParams: the penalties and the logit bias

    prompt_ids: list[int]

    def uniform(self) -> float: ...


def uniforms(rows: Sequence[Row]) -> list[float]:
    """This step's number of every row: the next of its own stream where it draws, ``GREEDY`` where it takes the
    argmax. Taken once per row per step, before the forward (``draw`` runs inside it)."""
    return [r.uniform() if r.temperature >= MIN_TEMPERATURE else GREEDY for r in rows]


def draw_inputs(rows: Sequence[Row], numbers: Sequence[float], size: int, index: Sequence[int]) -> torch.Tensor:
    """``draw``'s inputs for a forward of ``size`` rows, ``rows[i]`` at ``index[i]``: [size, 2] float32, each
    row's uniform and its 1 / temperature (``GREEDY`` and 1 for the rows nobody holds). One tensor: one copy."""
    out = [[GREEDY, 1.0] for _ in range(size)]
    for at, row, u in zip(index, rows, numbers, strict=True):
        if u >= 0:
            out[at] = [u, 1.0 / row.temperature]
    return torch.tensor(out, dtype=torch.float32)


def draw(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """The next token of every row [B] from its logits [B, V] and ``draw_inputs`` [B, 2]: the argmax where the
    uniform is ``GREEDY``, else the inverse transform of ``softmax(logits / T)``. Only tensor operations, no
    data-dependent control flow: the runner traces it into the compiled forwards, so a step's sampling is part
    of the step's graph (a CUDA graph on CUDA) and costs the serving thread no operation of its own."""
    return _choose(logits.float() * inputs[:, 1:], inputs[:, 0])


def sample(
    logits: torch.Tensor,
    rows: Sequence[Row],
    numbers: Sequence[float] | None = None,
    drawn: Sequence[int] | None = None,
    at: Sequence[int] | None = None,
) -> list[int]:
    """The next token of every row. ``logits``: [B, V], any device and dtype, ``rows[i]``'s at ``at[i]``
    (default ``i``). ``numbers``: this step's ``uniforms(rows)`` (taken here when None). ``drawn``: what
    ``draw`` chose in the forward, kept for every row that neither filters (top-k, top-p) nor must not end yet
    (``min_tokens``); those are drawn here."""
    if numbers is None:
        numbers = uniforms(rows)
    vocab = logits.shape[-1]
    special = [i for i, (r, u) in enumerate(zip(rows, numbers, strict=True)) if _filters(r, u, vocab)]
    at = range(len(rows)) if at is None else at
    if drawn is None:
        every = draw(logits, draw_inputs(rows, numbers, logits.shape[0], at).to(logits.device)).tolist()
        drawn = [every[i] for i in at]  # the one transfer to the host when nothing is special
    if not special:
        return list(drawn)
    tokens = list(drawn)
    index = torch.tensor([at[i] for i in special], device=logits.device)
    chosen = _filtered(logits.index_select(0, index), [rows[i] for i in special], [numbers[i] for i in special])
    for i, token in zip(special, chosen.tolist(), strict=True):
        tokens[i] = token
    return tokens


def logprobs(logits: torch.Tensor, at: Sequence[int], tokens: Sequence[int], top: Sequence[int]) -> list[Scored]:
    """For the rows of ``logits`` [B, V] at ``at``: the log-probability of the token each took (``tokens``) and its
    ``top[i]`` most likely tokens with theirs, under the model's own distribution (``log_softmax`` of the raw
    logits: before temperature, top-k and top-p, as vLLM reports by default). Only for rows that ask: one
    ``log_softmax`` over their vocabulary and one more device -> host transfer, in the steps they run."""
    device = logits.device
    lp = torch.log_softmax(logits.index_select(0, torch.tensor(list(at), device=device)).float(), dim=-1)  # [R, V]
    chosen = lp.gather(1, torch.tensor(list(tokens), device=device)[:, None])  # [R, 1]
    k = max(top)
    values, ids = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0])  # [R, k], most likely first
    # One transfer: float64 holds every token id exactly.
    packed = torch.cat([chosen.double(), values.double(), ids.double()], dim=1).tolist()  # [R, 1 + 2k]
    out = []
    for row, n in zip(packed, top, strict=True):
        alternatives = tuple((int(row[1 + k + j]), _finite(row[1 + j])) for j in range(n))
        out.append((_finite(row[0]), alternatives))
    return out


def _finite(logprob: float) -> float:
    """A token the model gives no probability at all has -inf, which JSON cannot carry: vLLM's floor instead; so
    does NaN (non-finite logits), which JSON cannot carry either."""
    return logprob if logprob >= LOGPROB_FLOOR else LOGPROB_FLOOR


def _filters(row: Row, number: float, vocab: int) -> bool:
    """Whether ``row`` is drawn outside the forward this step: EOS is still masked for it, or it draws with a
    top-k or top-p bound (the argmax is the same with or without those)."""
    if (row.eos_ids and len(row.ids) < row.min_tokens) or row.adjusted:
        return True
    return number >= 0 and (0 < row.top_k < vocab or row.top_p < 1.0)


def _filtered(logits: torch.Tensor, rows: Sequence[Row], numbers: Sequence[float]) -> torch.Tensor:
    """The next token [R] of rows that mask EOS or filter: greedy rows take the masked argmax, the others draw
    from what their top-k and top-p leave (the same inverse transform as ``draw``, over the candidates)."""
    logits = _adjust(_mask_early_eos(logits, rows), rows)
    inputs = draw_inputs(rows, numbers, len(rows), range(len(rows))).to(logits.device, non_blocking=True)
    drawing = [u >= 0 for u in numbers]
    values, order = _top_k_top_p(
        logits.float() * inputs[:, 1:],
        [r.top_k if d else 0 for r, d in zip(rows, drawing, strict=True)],
        [r.top_p if d else 1.0 for r, d in zip(rows, drawing, strict=True)],
    )
    choice = _choose(values, inputs[:, 0])  # [R], into values
    return choice if order is None else order.gather(1, choice[:, None])[:, 0]


def _choose(scaled: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Per row of ``scaled`` [R, W] (logits over the temperature): its argmax where ``uniform`` is ``GREEDY``,
    else ``_inverse_cdf``."""
    return torch.where(uniform < 0, scaled.argmax(dim=-1), _inverse_cdf(scaled, uniform))


def _inverse_cdf(values: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of ``values`` [R, W] (logits, -inf for what is filtered out), the first index whose
    cumulative softmax mass passes ``uniform`` [R] (at most ``UNIFORM_CEILING``) times the row's total. A
    filtered entry (probability 0) is never chosen: its cumulative mass equals the one before it, and the
    target stays below the total. Counting the entries at or below the target is ``searchsorted(right=True)``
    in operations a compiler fuses."""
    cdf = torch.softmax(values, dim=-1).cumsum(dim=-1)
    target = uniform.clamp(max=UNIFORM_CEILING)[:, None] * cdf[:, -1:]
    return (cdf <= target).sum(dim=-1).clamp(max=values.shape[-1] - 1)


def _adjust(logits: torch.Tensor, rows: Sequence[Row]) -> torch.Tensor:
    """Each adjusted row's logits [R, V] after its logit bias and penalties, in vLLM's order: the bias added, then
    the repetition penalty over the tokens of its prompt and output (a positive logit divided by it, a negative one
    multiplied), then ``frequency x count + presence x (count > 0)`` subtracted, counting its output tokens."""
    marked = [(i, r) for i, r in enumerate(rows) if r.adjusted]
    if not marked:
        return logits
    logits = logits.float().clone()  # [R, V]
    device = logits.device
    for i, r in marked:  # one row at a time: each has its own tokens
        p = r.params
        if p.logit_bias:
            tokens = torch.tensor([t for t, _ in p.logit_bias], dtype=torch.long, device=device)
            logits[i, tokens] += torch.tensor([b for _, b in p.logit_bias], device=device)
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(r.prompt_ids) | set(r.ids)), dtype=torch.long, device=device)
            picked = logits[i, seen]
            logits[i, seen] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if r.ids and (p.frequency_penalty or p.presence_penalty):
            counts = torch.bincount(torch.tensor(r.ids, dtype=torch.long, device=device), minlength=logits.shape[-1])
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
    return logits


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
