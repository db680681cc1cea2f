"""The serving engine's figures, measured from outside on a running daemon (its Unix socket), per model:
head-of-line blocking, time to first token under mixed load, commit -> live under long generations, the
cost of sampling, and throughput against transformers' own ``generate()`` on the same requests.

Everything here goes through the socket as a client would (streams for token times), so the same code
measures any ``hotswapd run``: the engine of this checkout, or another checkout's for a before/after table
(``HOTSWAPD_BENCH_DAEMON_PYTHONPATH``, see ``bench.daemon``).
"""

from __future__ import annotations

import contextlib
import http.client
import itertools
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotswapd.bench.daemon import PROMPT, DaemonBench
from hotswapd.bench.errors import BenchError
from hotswapd.bench.generate import TransformersGenerate
from hotswapd.bench.stats import interleave
from hotswapd.client import _UnixConnection

SHORT_TOKENS = 4  # the short request of the head-of-line figure
LONG_TOKENS = 240  # what the long generations run (ignore_eos: the same length whatever the model emits)
LONG_CLIENTS = 2
MIXED_CLIENTS = 8
# The mixed workload: prompts of 2 to 46 tokens (demo tokenizer: one a byte) and max_tokens drawn uniformly from
# these, so the longest request fits the demo's max_seq_len of 256.
MIXED_LENGTHS = (4, 16, 64, 192)
MIXED_PROMPTS = ("Hello =>", "The quick brown fox jumps over the lazy dog =>", "ab", "Zürich, Genève, Köln =>")


@dataclass(frozen=True)
class Sizes:
    """How many samples each figure takes (``BenchConfig`` presets fill these per mode)."""

    rounds: int = 3  # turns of each contender (A B A B ...)
    short_requests: int = 10  # per head-of-line turn
    mixed_requests: int = 32  # the mixed workload: requests per generate() run (a multiple of 8)
    mixed_window_s: float = 6.0  # hotswapd's steady-state window on the same workload
    swaps: int = 12  # commit -> live under load
    sampling_window_s: float = 3.0
    sampling_tokens: int = 64
    long_tokens: int = LONG_TOKENS
    mixed_lengths: tuple[int, ...] = MIXED_LENGTHS


def _body(prompt: str, max_tokens: int, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, **extra}


class Stream:
    """One ``stream: true`` completion on its own connection: when each chunk of text arrived."""

    def __init__(self, sock: str, body: dict[str, Any], timeout: float = 300.0) -> None:
        self.conn = _UnixConnection(sock, timeout)
        self.sent = time.perf_counter()
        self.conn.request(
            "POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"}
        )
        self.response = self.conn.getresponse()
        if self.response.status != 200:
            raise BenchError(f"stream answered {self.response.status}: {self.response.read()[:300]!r}")
        self.version: str | None = None

    def chunks(self) -> Iterator[float]:
        """perf_counter() at each chunk that carries text, until ``[DONE]``."""
        for line in self.response:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                return
            chunk = json.loads(payload)
            if "error" in chunk:
                raise BenchError(f"stream failed: {chunk['error']}")
            self.version = (chunk.get("adapter") or {}).get("version", self.version)
            if any(c.get("text") for c in chunk.get("choices", [])):
                yield time.perf_counter()
        raise BenchError("the stream ended without [DONE]")

    def abort(self) -> None:
        """Hang up (from any thread): the daemon cancels the request at its next token."""
        sock = self.conn.sock
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.conn.close()


class LongGenerations:
    """``clients`` clients that keep ``tokens``-token streaming generations running (each starts a new one
    when its last ends) until ``close()``. ``steps``: per generation, its first chunk to its last ÷ the chunks
    between, the decode step under load. Not the median gap: chunks reach a client in bursts when the event
    loop writes two at once (gaps of microseconds beside gaps of two steps), which moves the median gap, not
    the mean."""

    def __init__(self, sock: str, clients: int, tokens: int) -> None:
        self.sock, self.tokens = sock, tokens
        self.steps: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._streams: dict[int, Stream] = {}
        self._started = [threading.Event() for _ in range(clients)]
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]
        for t in self._threads:
            t.start()

    def _client(self, i: int) -> None:
        while not self._stop.is_set():
            try:
                stream = Stream(self.sock, _body(PROMPT, self.tokens))
            except (BenchError, OSError) as exc:
                self.errors.append(str(exc))
                return
            with self._lock:
                self._streams[i] = stream
            if self._stop.is_set():
                stream.abort()
            first = last = None
            chunks = 0
            try:
                for at in stream.chunks():
                    if first is None:
                        first = at
                        self._started[i].set()
                    last, chunks = at, chunks + 1
            except (BenchError, OSError, ValueError, http.client.HTTPException) as exc:
                if not self._stop.is_set():
                    self.errors.append(f"long generation: {exc}")
            finally:
                stream.close()
                if first is not None and last is not None and chunks >= 2:
                    with self._lock:
                        self.steps.append((last - first) / (chunks - 1))

    def wait_started(self, timeout: float = 300.0) -> None:
        for event in self._started:
            if not event.wait(timeout):
                raise BenchError(f"the long generations did not start within {timeout:g}s: {self.errors}")

    def close(self) -> None:
        self._stop.set()
        with self._lock:
            for stream in self._streams.values():
                stream.abort()
        for t in self._threads:
            t.join(60)
        if self.errors:
            raise BenchError(f"long generations failed: {self.errors[:3]}")


@dataclass
class MixedRun:
    """The mixed workload served by streaming clients in a steady-state window: time to first token per
    request sent in it, and the tokens that arrived in it."""

    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    elapsed: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.elapsed


def mixed_workload(n: int, lengths: tuple[int, ...], seed: int = 0) -> list[tuple[str, int]]:
    """``n`` (prompt, max_tokens) pairs: the prompts and lengths of the TTFT and throughput figures."""
    rng = random.Random(seed)
    return [(rng.choice(MIXED_PROMPTS), rng.choice(lengths)) for _ in range(n)]


class ServingBench:
    """The engine's figures on one daemon (one model), each a dict of contender -> samples."""

    def __init__(self, daemon: DaemonBench, sizes: Sizes, paths: list[Path], say: Callable[[str], None]) -> None:
        self.daemon, self.sizes, self.paths, self.say = daemon, sizes, paths, say
        assert daemon.current is not None
        self.sock = str(daemon.current.sock)

    def _short(self) -> float:
        t0 = time.perf_counter()
        answer = self.daemon.client.post("/v1/completions", _body(PROMPT, SHORT_TOKENS))
        if answer["usage"]["completion_tokens"] != SHORT_TOKENS:
            raise BenchError(f"a {SHORT_TOKENS}-token request came back with {answer['usage']}")
        return time.perf_counter() - t0

    def head_of_line(self) -> dict[str, list[float]]:
        """Latency of a short request alone, and while ``LONG_CLIENTS`` clients keep long generations running."""
        n = self.sizes.short_requests
        self._short()  # untimed: the first request of a fresh connection pool

        def alone() -> list[float]:
            return [self._short() for _ in range(n)]

        def behind() -> list[float]:
            longs = LongGenerations(self.sock, LONG_CLIENTS, self.sizes.long_tokens)
            try:
                longs.wait_started()
                return [self._short() for _ in range(n)]
            finally:
                longs.close()

        return interleave({"alone": (alone, self.sizes.rounds), "behind_long": (behind, self.sizes.rounds)})

    @property
    def workload(self) -> list[tuple[str, int]]:
        return mixed_workload(self.sizes.mixed_requests, self.sizes.mixed_lengths)

    def ttft_alone(self) -> list[float]:
        """Time to the first token of the workload's prompts, one request at a time."""
        out = []
        for prompt, _ in self.workload[: max(4, self.sizes.mixed_requests // 4)]:
            stream = Stream(self.sock, _body(prompt, SHORT_TOKENS))
            try:
                out.append(next(stream.chunks()) - stream.sent)
            finally:
                stream.abort()
                stream.close()
        return out

    def mixed(self, work: list[tuple[str, int]], clients: int, seconds: float) -> MixedRun:
        """``clients`` streaming clients cycling through ``work`` (closed loop); once every client has its first
        token, a window of ``seconds``: the tokens that arrived in it (steady state, no ramp-up or drain), and
        the TTFT of every request sent in it."""
        run, lock, stop = MixedRun(), threading.Lock(), threading.Event()
        order = itertools.cycle(work)
        started = [threading.Event() for _ in range(clients)]
        window: list[float] = []  # [start, end] once known
        arrivals: list[tuple[float, int]] = []  # (time, tokens) of every chunk
        errors: list[str] = []
        streams: dict[int, Stream] = {}

        def client(i: int) -> None:
            while not stop.is_set():
                with lock:
                    prompt, max_tokens = next(order)
                try:
                    stream = Stream(self.sock, _body(prompt, max_tokens))
                    with lock:
                        streams[i] = stream
                    times = []
                    for at in stream.chunks():
                        times.append(at)
                        started[i].set()
                    stream.close()
                except (BenchError, OSError, ValueError, http.client.HTTPException) as exc:
                    if not stop.is_set():
                        errors.append(str(exc))
                    continue
                # A chunk is one token but for a character split across tokens: the last one takes the rest.
                tokens = [1] * len(times)
                tokens[-1] += max_tokens - len(times)
                with lock:
                    arrivals.extend(zip(times, tokens, strict=True))
                    if window and stream.sent >= window[0]:
                        run.ttft.append(times[0] - stream.sent)

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
        for t in threads:
            t.start()
        for event in started:
            if not event.wait(300):
                raise BenchError(f"a client of the mixed workload got no token within 300 s: {errors[:3]}")
        with lock:
            window.append(time.perf_counter())
        time.sleep(seconds)
        with lock:
            window.append(time.perf_counter())
            stop.set()
            for stream in streams.values():
                stream.abort()
        for t in threads:
            t.join(60)
        if errors:
            raise BenchError(f"{len(errors)} requests of the mixed workload failed: {errors[:3]}")
        run.tokens = sum(n for at, n in arrivals if window[0] <= at <= window[1])
        run.elapsed = window[1] - window[0]
        return run

    def commit_to_live(self) -> dict[str, list[float]]:
        """Admin swaps while long generations run: the commit phase (asked -> flipped, from the swap record), the
        decode step meanwhile, the stage phase, and swap answered -> a completion on the new version.

        The long generations are restarted for each swap: rows admitted before the previous commit hold the
        standby slot until they end, and a swap landing within one generation of the previous one waits for them
        (``server.request_timeout_s`` at most); this measures swaps that land further apart, as releases do."""
        out: dict[str, list[float]] = {"commit": [], "decode_step": [], "stage": [], "swap_answered_to_completion": []}
        live = self.daemon.client.get("/v1/adapters")["live"]["version"]
        order = [p for p in self.paths if p.name != live]
        for i in range(self.sizes.swaps):
            longs = LongGenerations(self.sock, LONG_CLIENTS, self.sizes.long_tokens)
            try:
                longs.wait_started()
                record = self.daemon.swap(order[i % len(order)])["record"]
                answered = time.perf_counter()
                got = self.daemon.client.post("/v1/completions", _body(PROMPT, 1))["adapter"]["version"]
                out["swap_answered_to_completion"].append(time.perf_counter() - answered)
            finally:
                longs.close()
            if got != record["version"]:
                raise BenchError(f"a completion after the swap to {record['version']} ran on {got}")
            out["commit"].append(record["phases_ms"]["commit"] / 1000)
            out["stage"].append(record["phases_ms"]["stage"] / 1000)
            out["decode_step"] += longs.steps
        return out

    def sampling_cost(self) -> dict[str, list[float]]:
        """Tokens/s of ``MIXED_CLIENTS`` // 2 clients at temperature 0 and at temperature 1 (no top-k/top-p),
        1 with top_p 0.9 and top_k 50 (the sort), and greedy with 5 log-probabilities a token, in turns."""
        from hotswapd.bench.stats import closed_loop

        s = self.sizes
        client = self.daemon.client

        def turn(**extra: Any) -> Callable[[], float]:
            def request() -> int:
                body = {**_body(PROMPT, s.sampling_tokens), **extra}
                return int(client.post("/v1/completions", body)["usage"]["completion_tokens"])

            return lambda: closed_loop(request, MIXED_CLIENTS // 2, s.sampling_window_s).tokens_per_second

        return interleave(
            {
                "temperature_0": (turn(), s.rounds),
                "temperature_1": (turn(temperature=1.0, top_p=1.0, top_k=0), s.rounds),
                "temperature_1_top_p_top_k": (turn(temperature=1.0, top_p=0.9, top_k=50), s.rounds),
                "temperature_0_logprobs_5": (turn(logprobs=5), s.rounds),
            }
        )


@dataclass
class ModelFigures:
    """Samples of every serving figure for one model (contender -> values)."""

    head_of_line: dict[str, list[float]]
    ttft: dict[str, list[float]]
    commit: dict[str, list[float]]
    sampling: dict[str, list[float]]
    throughput: dict[str, list[float]]  # tokens/s per run of the mixed workload
    cpu_threads: dict[str, float]  # intra-op threads: the daemon's (its gauge), generate()'s
    recompilations: float  # the daemon's hotswapd_recompilations_total after all of the above (must be 0)


def measure(
    daemon: DaemonBench,
    sizes: Sizes,
    paths: list[Path],
    generate: Callable[[str], TransformersGenerate],
    say: Callable[[str], None],
) -> ModelFigures:
    """Every serving figure on ``daemon``; ``paths[0]`` is served for the throughput comparison, and ``generate``
    builds transformers' contender on the same model and adapter (in this process, on a thread of its own), given
    its CPU linears: ``aten`` (as transformers runs), and ``auto`` (the daemon's: a second contender, where
    that packs anything, so the batching's gain shows apart from the kernels')."""
    from hotswapd.bench.inprocess import on_own_thread

    bench = ServingBench(daemon, sizes, paths, say)
    say(f"head-of-line: a {SHORT_TOKENS}-token request alone vs behind {LONG_CLIENTS} {sizes.long_tokens}-token ones")
    hol = bench.head_of_line()
    say("time to first token: alone, then under 8 clients of mixed lengths vs transformers' generate()")
    alone = bench.ttft_alone()
    daemon.swap(paths[0])
    work = bench.workload
    contenders = {f"transformers_generate_batch_{MIXED_CLIENTS}": on_own_thread(lambda: generate("aten"))}
    same_kernels = on_own_thread(lambda: generate("auto"))
    if same_kernels.packed:
        contenders[f"transformers_generate_batch_{MIXED_CLIENTS}_onednn"] = same_kernels

    def warm(contender: TransformersGenerate) -> Callable[[], int]:
        return lambda: contender.batch(work[:MIXED_CLIENTS])

    for contender in contenders.values():
        on_own_thread(warm(contender))  # compiles: untimed
    runs: list[MixedRun] = []

    def ours() -> float:
        runs.append(bench.mixed(work, MIXED_CLIENTS, sizes.mixed_window_s))
        return runs[-1].tokens_per_second

    def theirs(contender: TransformersGenerate) -> Callable[[], float]:
        return lambda: on_own_thread(lambda: contender.throughput(work, MIXED_CLIENTS))

    throughput = interleave(
        {
            f"hotswapd_{MIXED_CLIENTS}_clients": (ours, sizes.rounds),
            **{name: (theirs(contender), sizes.rounds) for name, contender in contenders.items()},
        }
    )
    say(f"commit -> live: {sizes.swaps} swaps while {LONG_CLIENTS} long generations run")
    commit = bench.commit_to_live()
    say("sampling cost: temperature 0 vs 1 vs top-p/top-k, tokens/s")
    sampling = bench.sampling_cost()
    ttft = {"alone": alone, f"{MIXED_CLIENTS}_clients_mixed": [t for r in runs for t in r.ttft]}
    threads = {"hotswapd": gauge(daemon, "hotswapd_engine_cpu_threads"), "transformers_generate": same_kernels.threads}
    recompiled = gauge(daemon, "hotswapd_recompilations_total")
    return ModelFigures(hol, ttft, commit, sampling, throughput, threads, recompiled)


def gauge(daemon: DaemonBench, name: str) -> float:
    """A series without labels from the daemon's ``GET /metrics`` on its socket."""
    response = daemon.client._open("GET", "/metrics", None)
    for line in response.read().decode().splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise BenchError(f"GET /metrics has no {name}")
