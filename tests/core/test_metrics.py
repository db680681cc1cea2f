"""What an answered request adds to the serving metrics (``Metrics.observe_completions``), read back from the
registry's own exposition."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from hotswap_core.generation import GenerationResult
from hotswap_core.metrics import Metrics
from hotswap_core.slots import AdapterVersion

AD = AdapterVersion("v1", "0" * 64, "directory", "/srv/adapters/v1")


def _result(prompt: int, tokens: int, reason: str, ttft: float, duration: float, queued: float) -> GenerationResult:
    return GenerationResult("x", tuple(range(tokens)), prompt, reason, AD, ttft, duration, queue_time_s=queued)


def _scrape(metrics: Metrics) -> dict[str, float]:
    out = {}
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def test_time_per_output_token_is_the_mean_gap_after_the_first() -> None:
    assert _result(3, 5, "length", 0.1, 0.5, 0.0).time_per_output_token_s == pytest.approx(0.1)  # 0.4 s / 4 gaps
    assert _result(3, 1, "length", 0.1, 0.1, 0.0).time_per_output_token_s is None  # no gap to measure
    assert _result(3, 0, "length", 0.1, 0.1, 0.0).time_per_output_token_s is None


def test_a_request_with_two_prompts_and_two_choices_each() -> None:
    metrics = Metrics()
    before = _scrape(metrics)
    assert before['hotswapd_completions_finished_total{finish_reason="stop"}'] == 0  # known series, at 0
    assert before['hotswapd_completions_finished_total{finish_reason="length"}'] == 0
    results = [  # prompt 0's two choices, then prompt 1's (n=2)
        _result(5, 4, "length", 0.02, 0.05, 0.010),
        _result(5, 1, "stop", 0.02, 0.02, 0.010),
        _result(30, 4, "length", 0.04, 0.10, 0.020),
        _result(30, 2, "stop", 0.04, 0.06, 0.020),
    ]
    metrics.observe_completions(results, n=2)
    got = _scrape(metrics)
    assert got["hotswapd_prompt_tokens_total"] == 35  # each prompt once, as usage.prompt_tokens counts them
    assert got["hotswapd_request_prompt_tokens_count"] == 2 and got["hotswapd_request_prompt_tokens_sum"] == 35
    assert got['hotswapd_request_prompt_tokens_bucket{le="8.0"}'] == 1  # 5 tokens; 30 is in le="32.0"
    assert got['hotswapd_request_prompt_tokens_bucket{le="32.0"}'] == 2
    assert got["hotswapd_generated_tokens_total"] == 11
    assert got["hotswapd_request_generation_tokens_count"] == 4
    assert got["hotswapd_request_generation_tokens_sum"] == 11
    assert got['hotswapd_completions_finished_total{finish_reason="stop"}'] == 2
    assert got['hotswapd_completions_finished_total{finish_reason="length"}'] == 2
    assert got["hotswapd_time_to_first_token_seconds_count"] == 4
    assert got["hotswapd_request_queue_time_seconds_count"] == 4
    assert got["hotswapd_request_queue_time_seconds_sum"] == pytest.approx(0.06)
    # The one-token choice has no gap; the others: 0.03 / 3, 0.06 / 3, 0.02 / 1.
    assert got["hotswapd_time_per_output_token_seconds_count"] == 3
    assert got["hotswapd_time_per_output_token_seconds_sum"] == pytest.approx(0.01 + 0.02 + 0.02)


def test_a_shown_nothing_echo_request_counts_its_prompt_and_no_tokens() -> None:
    # max_tokens 0 with echo: the response shows no token (completions._shown), and neither do the metrics.
    metrics = Metrics()
    metrics.observe_completions([_result(7, 0, "length", 0.01, 0.01, 0.001)], n=1)
    got = _scrape(metrics)
    assert got["hotswapd_prompt_tokens_total"] == 7 and got["hotswapd_generated_tokens_total"] == 0
    assert got["hotswapd_time_per_output_token_seconds_count"] == 0
