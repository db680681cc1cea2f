"""Batched sampling on the logits' device (hotswap_core.sampling): seeded rows reproducible whatever shares the
batch, draws distributed as softmax(logits / T), top-k and top-p bounds, greedy at temperature 0."""

from __future__ import annotations

import math
import random

import torch

from hotswap_core.generation import GenerationRequest, RowState, SamplingParams
from hotswap_core.sampling import sample, sampling_defaults

VOCAB = 64


def _row(**params: object) -> RowState:
    return RowState(GenerationRequest("x", SamplingParams(max_tokens=4096, **params)), [0], lambda ids: "", frozenset())  # type: ignore[arg-type]


def _logits(seed: int, rows: int = 1) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_a_seeded_row_draws_the_same_tokens_in_any_batch() -> None:
    steps = [_logits(100 + t)[0] for t in range(60)]  # what the model gives this row at each step
    params = dict(temperature=1.0, top_p=0.9, top_k=20, seed=5)

    def run(batch: int, position: int, others: list[dict[str, object]]) -> list[int]:
        mine = _row(**params)
        company = [_row(**o) for o in others]
        out = []
        for t, row_logits in enumerate(steps):
            batch_logits = _logits(7 * t + batch, batch)
            batch_logits[position] = row_logits
            rows = [*company[:position], mine, *company[position:]]
            out.append(sample(batch_logits, rows)[position])
            mine.ids.append(out[-1])
        return out

    alone = run(1, 0, [])
    assert len(set(alone)) > 5  # it did draw
    assert run(4, 2, [{"temperature": 0.0}, {"temperature": 1.0, "seed": 9}, {"temperature": 0.5}]) == alone
    assert run(8, 7, [{"temperature": 1.0, "seed": 5 + i, "top_k": i} for i in range(7)]) == alone
    assert run(2, 0, [{"temperature": 1.0, "seed": 5}]) == alone  # the same seed on another row: its own stream
    assert run(1, 0, []) == alone and _draws(seed=6) != _draws(seed=5)


def _draws(seed: int) -> list[int]:
    row = _row(temperature=1.0, seed=seed)
    return [sample(_logits(t), [row])[0] for t in range(20)]


def test_draws_follow_softmax_of_logits_over_temperature() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0] + [-30.0] * (VOCAB - 5)])
    for temperature in (1.0, 0.5, 2.0):
        row = _row(temperature=temperature, seed=1)
        counts = [0] * VOCAB
        n = 6000
        for _ in range(n):
            counts[sample(logits, [row])[0]] += 1
        expected = torch.softmax(logits[0] / temperature, dim=-1).tolist()
        for token in range(5):
            sd = math.sqrt(expected[token] * (1 - expected[token]) / n)
            assert abs(counts[token] / n - expected[token]) < 5 * sd + 1e-3, (temperature, token, counts[:5])


def test_top_k_and_top_p_bound_what_is_drawn() -> None:
    rng = random.Random(0)
    for trial in range(30):
        logits = _logits(trial, 3)
        k, p = rng.randrange(1, 10), rng.uniform(0.05, 0.95)
        rows = [_row(temperature=1.5, top_k=k, seed=trial), _row(temperature=1.5, top_p=p, seed=trial), _row()]
        probs = torch.softmax(logits[1] / 1.5, dim=-1)
        ranked = probs.argsort(descending=True).tolist()
        mass, nucleus = 0.0, set()
        for token in ranked:  # the smallest set of most likely tokens whose mass reaches p
            nucleus.add(token)
            mass += float(probs[token])
            if mass >= p:
                break
        top = set(logits[0].topk(k).indices.tolist())
        for _ in range(40):
            a, b, c = sample(logits, rows)
            assert a in top and b in nucleus and c == int(logits[2].argmax())


def test_rows_that_all_have_a_top_k_filter_as_a_full_sort_would() -> None:
    """When every row has a top-k, only the top k are sorted (topk); the kept entries and their values are
    those of the full-sort path, with and without a top-p on top."""
    from hotswap_core.sampling import _top_k_top_p

    gen = torch.Generator().manual_seed(7)
    for trial in range(20):
        scaled = torch.randn(4, 5000, generator=gen) * 3
        ks = [int(k) for k in torch.randint(1, 60, (4,), generator=gen)]
        ps = [1.0, 0.5, 0.9, float(torch.rand((), generator=gen))]
        partial = _spread(*_top_k_top_p(scaled, ks, ps))  # topk path
        full = _spread(*_top_k_top_p(torch.cat([scaled, scaled[:1]]), [*ks, 0], [*ps, 1.0]))[:4]  # one row without
        assert torch.equal(partial, full), trial
        kept = torch.isfinite(partial).sum(dim=-1).tolist()
        assert all(1 <= n <= k for n, k in zip(kept, ks, strict=True)) and kept[0] == ks[0], (kept, ks)


def _spread(values: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """Candidates back over the whole vocabulary (-inf where filtered out); [R, 5000]."""
    assert order is not None
    return torch.full((values.shape[0], 5000), float("-inf")).scatter_(-1, order, values)


def test_temperature_zero_or_tiny_is_greedy_and_never_nan() -> None:
    logits = _logits(3, 2) * 1e4
    rows = [_row(temperature=0.0), _row(temperature=1e-7, seed=1)]
    assert sample(logits, rows) == logits.argmax(dim=-1).tolist()
    row = _row(temperature=1e-4, seed=2)  # above the greedy cut-off: the race still picks the argmax
    assert sample(logits[:1], [row]) == [int(logits[0].argmax())]


def test_generation_config_values_become_defaults_only_when_set_and_valid() -> None:
    from transformers import GenerationConfig

    assert sampling_defaults(None) == {} and sampling_defaults(GenerationConfig()) == {}
    qwen_like = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.05)
    assert sampling_defaults(qwen_like) == {"temperature": 0.7, "top_p": 0.8, "top_k": 20}
    odd = GenerationConfig(do_sample=True, temperature=5.0, top_p=0.9)
    assert sampling_defaults(odd) == {"top_p": 0.9}  # a temperature no request could send is not a default


def test_inverse_cdf_never_lands_on_a_filtered_entry() -> None:
    """u * total rounding up to the total (or past it) chooses the last entry with mass, not the -inf tail."""
    from hotswap_core.sampling import _inverse_cdf

    inf = float("inf")
    values = torch.tensor([[2.0, 1.0, -inf, -inf], [-inf, 0.0, -inf, 3.0], [0.0, 0.0, 0.0, 0.0]])
    assert _inverse_cdf(values, torch.tensor([1.0, 1.0, 1.0])).tolist() == [1, 3, 3]
    assert _inverse_cdf(values, torch.tensor([0.0, 0.0, 0.0])).tolist() == [0, 1, 0]
    assert _inverse_cdf(values, torch.tensor([0.72, 0.5, 0.49])).tolist() == [0, 3, 1]  # 0.731 / 0.047 / 0.25
