"""Every Prometheus metric hotswapd exports, created once in one registry and passed where needed.

Names and labels are a contract (DESIGN.md): dashboards and alerts rely on them. Label values are
bounded sets (result, reason, phase, endpoint, code, source, kind); a version, sha256 or path appears
only on the ``_info`` metric. Series known to exist are exported at 0 from the start, so that
``rate()`` and ``absent()`` behave from the first scrape.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from hotswap_core.errors import REASONS

if TYPE_CHECKING:
    from hotswap_core.generation import GenerationResult

SWAP_RESULTS = ("success", "rejected", "failed", "rolled_back")
SWAP_PHASES = ("detect", "validate", "load", "stage", "verify", "commit")
ENDPOINTS = ("completions", "chat_completions", "models", "tokenize", "adapters", "admin", "health", "other")
HUB_POLL_RESULTS = ("unchanged", "changed", "error", "rate_limited")
# hotswapd_source_head_info's state: is the version at the source's head live here, and if not, why not.
HEAD_STATES = ("live", "pending", "rejected", "rolled_back")

# Swap phases and the commit stall: tens of microseconds (a flip) to seconds (loading a big adapter).
_SWAP_BUCKETS = (1e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Landed -> live: dominated by settle_seconds (default 1 s) plus validation and load.
_LANDED_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 30, 60, 120, 300)
# Requests: 10 ms to minutes (long generations on a slow device).
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Between two tokens of one output: a decode step (a millisecond on a small model, tens on a large one) and
# what shared it (prefills, other rows).
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
# Tokens per prompt or per output.
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072)
FINISH_REASONS = ("stop", "length")


class Metrics:
    """The metric set. ``registry`` is what the metrics endpoint serves."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No "_created" series: they double the exposition and no dashboard or alert here uses them.
        disable_created_metrics()
        self.registry = r = registry or CollectorRegistry(auto_describe=True)
        self.swaps = Counter("hotswapd_swaps", "Swap transactions by result.", ["result"], registry=r)
        self.swap_duration = Histogram(
            "hotswapd_swap_duration_seconds",
            "From a candidate first seen (event or rescan) to the first batch served by it.",
            buckets=_LANDED_BUCKETS,
            registry=r,
        )
        self.swap_phase = Histogram(
            "hotswapd_swap_phase_duration_seconds",
            "Duration of each phase of a swap transaction.",
            ["phase"],
            buckets=_SWAP_BUCKETS,
            registry=r,
        )
        self.swap_stall = Histogram(
            "hotswapd_swap_stall_seconds",
            "Time serving was paused by a commit (the slot flip between batches).",
            buckets=_SWAP_BUCKETS,
            registry=r,
        )
        self.adapter_info = Gauge(
            "hotswapd_adapter_info", "The live adapter version (value 1).", ["version", "sha256", "source"], registry=r
        )
        self.last_swap = Gauge(
            "hotswapd_last_swap_timestamp_seconds", "Unix time of the last successful swap or rollback.", registry=r
        )
        self.validation_failures = Counter(
            "hotswapd_adapter_validation_failures",
            "Rejected adapter candidates by reason code.",
            ["reason"],
            registry=r,
        )
        self.requests = Counter(
            "hotswapd_requests", "HTTP requests on the Unix socket.", ["endpoint", "code"], registry=r
        )
        self.request_duration = Histogram(
            "hotswapd_request_duration_seconds",
            "HTTP request duration, until the last byte of the response.",
            ["endpoint"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "hotswapd_time_to_first_token_seconds",
            "From a completion request queued to its first generated token.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.generated_tokens = Counter("hotswapd_generated_tokens", "Completion tokens generated.", registry=r)
        self.prompt_tokens = Counter(
            "hotswapd_prompt_tokens", "Prompt tokens of answered completion requests (each prompt once).", registry=r
        )
        self.queue_time = Histogram(
            "hotswapd_request_queue_time_seconds",
            "From a completion request queued to its admission into a row of the KV cache.",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.time_per_output_token = Histogram(
            "hotswapd_time_per_output_token_seconds",
            "Per completion of two tokens or more: the mean time between its tokens after the first.",
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.request_prompt_tokens = Histogram(
            "hotswapd_request_prompt_tokens", "Tokens per prompt.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.request_generation_tokens = Histogram(
            "hotswapd_request_generation_tokens", "Tokens per completion (choice).", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.finished = Counter(
            "hotswapd_completions_finished",
            "Completions (choices) answered, by finish_reason: stop (EOS or a stop string) or length.",
            ["finish_reason"],
            registry=r,
        )
        self.inflight = Gauge("hotswapd_inflight_requests", "Completion requests being served.", registry=r)
        self.queue_depth = Gauge("hotswapd_queue_depth", "Requests waiting for a batch.", registry=r)
        self.running_rows = Gauge(
            "hotswapd_running_rows",
            "Rows of the KV cache running a generation (a request with several prompts or choices holds several).",
            registry=r,
        )
        self.kv_cache_usage = Gauge(
            "hotswapd_kv_cache_usage_ratio",
            "KV-cache positions held by running requests / the engine's capacity "
            "(max_batch_size x max_seq_len), 0 to 1; for fleet routers (GIE's KV utilisation).",
            registry=r,
        )
        self.batch_size = Histogram(
            "hotswapd_batch_size",
            "Rows per generation batch.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=r,
        )
        self.source_events = Counter(
            "hotswapd_source_events", "Adapter source events by kind.", ["source", "kind"], registry=r
        )
        self.hub_polls = Counter("hotswapd_hub_polls", "Hub revision polls by result.", ["result"], registry=r)
        self.build_info = Gauge(
            "hotswapd_build_info",
            "Versions of hotswapd and its stack (value 1).",
            ["version", "torch", "transformers", "peft", "device", "python"],
            registry=r,
        )
        self.cpu_threads = Gauge(
            "hotswapd_engine_cpu_threads",
            "Intra-op threads of the engine's CPU kernels (model.cpu_threads).",
            registry=r,
        )
        self._recompilations = _CounterFromFunction(
            "hotswapd_recompilations", "Graphs compiled after warm-up (must stay 0).", lambda: 0
        )
        self._state_write_failures = _CounterFromFunction(
            "hotswapd_state_write_failures", "Failed writes of the persisted state in state_dir.", lambda: 0
        )
        self._source_head = _SourceHead()
        r.register(self._recompilations)
        r.register(self._state_write_failures)
        r.register(self._source_head)
        for result in SWAP_RESULTS:
            self.swaps.labels(result)
        for phase in SWAP_PHASES:
            self.swap_phase.labels(phase)
        for result in HUB_POLL_RESULTS:
            self.hub_polls.labels(result)
        for reason in REASONS:
            self.validation_failures.labels(reason)
        for endpoint in ("completions", "chat_completions"):
            self.requests.labels(endpoint, "200")
        for reason in FINISH_REASONS:
            self.finished.labels(reason)

    def watch_source(self, source: str, kinds: Iterable[str]) -> None:
        """Export the configured source's event kinds at 0 from the start."""
        for kind in kinds:
            self.source_events.labels(source, kind)

    def watch_history(self, persist_failures: Callable[[], int]) -> None:
        self._state_write_failures.read = persist_failures

    def watch_engine(
        self,
        recompilations: Callable[[], int],
        queue_depth: Callable[[], int],
        kv_cache_usage: Callable[[], float],
        running_rows: Callable[[], int],
    ) -> None:
        """Read these at scrape time (no polling thread)."""
        self._recompilations.read = recompilations
        self.queue_depth.set_function(lambda: float(queue_depth()))
        self.kv_cache_usage.set_function(kv_cache_usage)
        self.running_rows.set_function(lambda: float(running_rows()))

    def observe_completions(self, results: Sequence[GenerationResult], n: int) -> None:
        """An answered request's choices (``n`` a prompt, prompt ``i``'s at ``i * n`` onwards): each choice's
        tokens, timings and finish reason; each prompt once."""
        for i, r in enumerate(results):
            if i % n == 0:
                self.prompt_tokens.inc(r.prompt_tokens)
                self.request_prompt_tokens.observe(r.prompt_tokens)
            self.generated_tokens.inc(r.completion_tokens)
            self.request_generation_tokens.observe(r.completion_tokens)
            self.ttft.observe(r.time_to_first_token_s)
            self.queue_time.observe(r.queue_time_s)
            if (tpot := r.time_per_output_token_s) is not None:
                self.time_per_output_token.observe(tpot)
            if r.finish_reason in FINISH_REASONS:
                self.finished.labels(r.finish_reason).inc()

    def watch_source_head(self, head: Callable[[], tuple[str, str] | None]) -> None:
        """``head()``: (version, state) of the source's head, read at scrape time; None: nothing seen yet."""
        self._source_head.read = head

    def set_build_info(self, device: str) -> None:
        import peft
        import torch
        import transformers

        from hotswap_core import __version__

        self.build_info.labels(
            __version__,
            torch.__version__,
            transformers.__version__,
            peft.__version__,
            device,
            platform.python_version(),
        ).set(1)

    def set_live(self, version: str, sha256: str, source: str) -> None:
        """Exactly one ``hotswapd_adapter_info`` series: the live version."""
        self.adapter_info.clear()
        self.adapter_info.labels(version, sha256, source).set(1)


class _SourceHead(Collector):
    """``hotswapd_source_head_info{version,state}``: one series, the version the source points at now
    (the Hub revision's commit, or the directory's newest offer) and whether it is live here (HEAD_STATES).
    Across a fleet, ``state="rejected"`` names a cohort stuck on a commit it refused."""

    name, documentation = "hotswapd_source_head_info", "The version at the adapter source's head and its state here."

    def __init__(self) -> None:
        self.read: Callable[[], tuple[str, str] | None] = lambda: None

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [GaugeMetricFamily(self.name, self.documentation, labels=["version", "state"])]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["version", "state"])
        head = self.read()
        if head is not None:
            family.add_metric(list(head), 1)
        return [family]


class _CounterFromFunction(Collector):
    def __init__(self, name: str, documentation: str, read: Callable[[], int]) -> None:
        self.name, self.documentation, self.read = name, documentation, read

    def describe(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation)]

    def collect(self) -> Iterable[CounterMetricFamily]:
        return [CounterMetricFamily(self.name, self.documentation, value=self.read())]
