"""The engine: a model runner (``runner.py``: base model + fixed two-slot LoRA layout + static KV cache,
compiled once), warmed, and served by one worker thread that schedules at the granularity of one token
(continuous batching; which request holds which row is ``scheduler.py``'s).

Lifecycle: ``load()`` (model, tokenizer, layout, slots, KV cache, compile) -> ``warm_up()`` (every
shape the server will see) -> ``start()`` (serving) -> ``submit()`` / ``between_steps()`` -> ``stop()``.
All of it runs on one thread, the engine's, whichever thread calls: load and warm-up too, since on CPU a second
thread running the model's kernels slows every step (``cpu_threads.py``), and on CUDA inductor keeps the graphs it
records per thread (``cudagraph_trees``' tree managers are thread-local), so serving replays what warm-up recorded.

Each step of the worker: run control operations (a swap's commit); admit waiting requests into free
rows of the cache, each pinned to the slot that is live now; prefill prompts, a chunk at a time within the
step's budget of prompt tokens (``scheduler.plan_prefill``); one decode step
over every running row, whatever version it runs; sample on the device; retire finished rows at once (what a
forward's output does to its rows is ``outputs.py``'s).
A response never mixes versions because a row keeps its slot to its last token, and a slot that running
rows use is never staged into (``SlotBank.pin``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from hotswap_core.config import Config
from hotswap_core.detokenize import TokenTexts
from hotswap_core.errors import EngineError
from hotswap_core.generation import GenerationRequest, GenerationResult, RowState, SamplingParams
from hotswap_core.outputs import OutputProcessor
from hotswap_core.runner import ModelRunner, StepOutput, resolve_device, resolve_dtype, resolve_mode
from hotswap_core.sampling import GREEDY, uniforms
from hotswap_core.scheduler import Group, Row, RowTable, plan_prefill, prefill_forwards, share_prompts
from hotswap_core.warmup import WarmupStep, estimate, warmup_plan

log = logging.getLogger("hotswapd.engine")
T = TypeVar("T")
# A forward over rows, given their draws this step (``sampling.uniforms``).
StepForward = Callable[[list[Row], list[float]], StepOutput]

__all__ = ["Engine", "EngineBusy", "EngineStopped", "resolve_device", "resolve_dtype", "resolve_mode"]


class EngineBusy(EngineError):
    """The request queue is full; retry later."""


class EngineStopped(EngineError):
    """The engine is stopping or stopped and accepts no new work."""


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (process-wide counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.runner = ModelRunner(config)
        self.device, self.dtype, self.mode = self.runner.device, self.runner.dtype, self.runner.mode
        self.max_batch_size = config.model.max_batch_size
        self.max_seq_len = config.model.max_seq_len
        self.buckets, self.spans = self.runner.buckets, self.runner.spans
        self.prefill_budget = self.runner.prefill_budget  # prompt tokens a step prefills (None: no limit)
        self.ready = threading.Event()
        self.last_loop_at = time.monotonic()  # heartbeat: proves the serving loop turns
        self.steps = 0  # decode steps run (tests count latency in steps, not seconds)
        self.control_seconds = 0.0  # the worker's time in control operations: serving paused, all swaps together
        self._graphs_after_warmup: int | None = None
        self._cv = threading.Condition()  # guards the queue (table.waiting), _control and _stopping
        self.table = RowTable(self.max_batch_size)
        self.on_batch: Callable[[int], None] | None = None  # rows per decode step (metrics)
        self._control: list[tuple[Callable[[], Any], Future[Any]]] = []
        self._serving = False  # start() was called: the thread steps whenever rows wait or run
        self._stopping = False
        self._exited = False  # the thread has returned (after stop()): nothing queued would run
        self._thread: threading.Thread | None = None  # the engine's thread, from load() on

    # ---- load ----------------------------------------------------------------------------------------
    def load(self) -> None:
        """Load and compile the model (``ModelRunner.load``), on the engine's thread; what requests and swaps need of
        it is kept here."""
        self._on_engine_thread(self._load)

    def _load(self) -> None:
        r = self.runner
        r.load()
        self.tokenizer, self.model_config, self.vocab_size = r.tokenizer, r.model_config, r.vocab_size
        self.token_text = TokenTexts(lambda ids: str(self.tokenizer.decode(ids)))  # log-probabilities' token names
        self.eos_ids, self.pad_id, self.sampling_defaults = r.eos_ids, r.pad_id, r.sampling_defaults
        self.layout, self.slots = r.layout, r.slots
        self.outputs = OutputProcessor(self.table, r.slots, r)  # what each forward's output does to its rows

    # ---- warm-up ----------------------------------------------------------------------------------
    def warm_up(self, progress: Callable[[WarmupStep], None] | None = None) -> float:
        """Run every shape the server will see, so no request compiles later: each decode bucket, and
        prefill at batch sizes 1, 2 and more, short and long prompts; rows on both slots.

        ``progress`` is called before each step (on the engine's thread), with an estimate of the time left
        (``warmup.estimate``).
        """
        return self._on_engine_thread(lambda: self._warm_up(progress))

    def _warm_up(self, progress: Callable[[WarmupStep], None] | None) -> float:
        t0 = time.monotonic()
        self.runner.configure_dynamo()
        plan = warmup_plan(self.buckets, self.max_seq_len, self.spans)
        dynamic = self.config.model.compile.dynamic is not False
        took: list[tuple[float, bool]] = []  # (seconds, compiled a graph) per step done
        params = SamplingParams(max_tokens=3, ignore_eos=True)  # decode runs whatever the model emits
        # Without a step budget every row runs a chunk each step: a warm-up step's rows prefill their chunks in one
        # forward (first chunks for one row and several, later chunks the same), as a budget's subsets later do.
        budget, self.prefill_budget = self.prefill_budget, None
        try:
            for k, (bsz, length) in enumerate(plan, 1):
                if progress:
                    eta = estimate(plan[k - 1 :], took, {b for b, _ in plan[: k - 1]}, dynamic)
                    progress(WarmupStep(k, len(plan), bsz, length, time.monotonic() - t0, eta))
                step_t0, graphs = time.monotonic(), compiled_graph_count()
                # Rows of different lengths (padding is part of what is traced), on alternating slots.
                for slot in (0, 1):
                    lengths = [max(1, length - i) for i in range(slot, bsz, 2)]
                    if lengths:
                        requests = [GenerationRequest([self.pad_id + 1] * n, params) for n in lengths]
                        self._enqueue(Group(requests, slot=slot), bounded=False)
                self._run_until_idle()
                took.append((time.monotonic() - step_t0, compiled_graph_count() > graphs))
                log.debug("warm-up step %d/%d: %d graphs so far", k, len(plan), compiled_graph_count())
        finally:
            self.prefill_budget = budget
        self._graphs_after_warmup = compiled_graph_count()
        elapsed = time.monotonic() - t0
        log.info("warm-up done in %.1fs: %d graphs compiled", elapsed, self._graphs_after_warmup)
        return elapsed

    @property
    def recompilations(self) -> int:
        """Graphs compiled after warm-up. Must stay 0."""
        if self._graphs_after_warmup is None or not self.config.model.compile.enabled:
            return 0
        return compiled_graph_count() - self._graphs_after_warmup

    # ---- submitting work ----------------------------------------------------------------------------
    def start(self) -> None:
        """Serve: from now on the engine's thread admits and steps whatever is submitted."""
        with self._cv:
            self._serving = True
            self._ensure_thread()
            self._cv.notify()
        self.ready.set()

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Queue requests that must start together, hence run on one adapter version."""
        self._enqueue(Group(list(requests)))
        return [r.future for r in requests]

    def _enqueue(self, group: Group, bounded: bool = True) -> None:
        n = len(group.requests)
        if not 1 <= n <= self.max_batch_size:
            raise ValueError(f"a group holds 1 to {self.max_batch_size} requests (model.max_batch_size)")
        with self._cv:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if bounded and self.table.queued + n > self.config.server.max_queue:
                raise EngineBusy(f"request queue is full ({self.table.queued} waiting, server.max_queue)")
            self.table.waiting.append(group)
            self.table.queued += n
            self._cv.notify()

    def between_steps(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the engine's thread before its next step; its time counts as serving paused
        (``control_seconds``). Once that thread has ended (after ``stop()``) it runs at once, on the calling thread."""
        return self._queue(self._timed(fn))

    def _on_engine_thread(self, fn: Callable[[], T]) -> T:
        """``fn``'s result, run on the engine's thread (load, warm-up, rows run before ``start()``)."""
        return self._queue(fn).result()

    def _queue(self, fn: Callable[[], T]) -> Future[T]:
        """``fn`` for the engine's thread to run before its next step. It runs at once, on the calling thread, when
        that is the engine's thread (a control operation or a warm-up callback) or when that thread has ended or
        was never started and the engine is stopping: queued, it would never run."""
        fut: Future[T] = Future()
        with self._cv:
            would_never_run = self._exited or (self._stopping and self._thread is None)
            if not (threading.current_thread() is self._thread or would_never_run):
                self._ensure_thread()
                self._control.append((fn, fut))
                self._cv.notify()
                return fut
        _run_into(fn, fut)
        return fut

    def _ensure_thread(self) -> None:
        """Start the engine's thread if it is not running yet (caller holds ``_cv``)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._worker, name="hotswapd-engine", daemon=True)
            self._thread.start()

    def generate(
        self, prompts: list[str], params: SamplingParams | None = None, timeout: float | None = None
    ) -> list[GenerationResult]:
        """Blocking convenience: submit each prompt and wait for all results."""
        futures = [self.submit(GenerationRequest(p, params or SamplingParams())) for p in prompts]
        return [f.result(timeout) for f in futures]

    def _run_group(self, group: Group, timeout: float | None = None) -> Group:
        """Queue an internal group and wait until every request of it is done (before ``start()``, the engine's
        thread runs it, and whatever else waits, to the end)."""
        self._enqueue(group, bounded=False)
        if not self._serving:
            self._on_engine_thread(self._run_until_idle)
        for r in group.requests:
            r.future.result(timeout)
        return group

    def last_logits(self, prompts: list[str], slot: int | None = None) -> torch.Tensor:
        """Next-token logits [B, V] (float32, CPU) of ``prompts`` through the serving graph, on ``slot``
        (default: the live one), as rows of the next step."""
        requests = [GenerationRequest(p, SamplingParams(max_tokens=1)) for p in prompts]
        group = self._run_group(Group(requests, slot=slot, capture=True))
        return torch.stack([row.logits for row in group.rows if row.logits is not None])

    def probe(self, prompts: list[str], slot: int, max_tokens: int = 8) -> list[tuple[str, bool]]:
        """Greedy completions of ``prompts`` on ``slot`` (a swap's smoke prompts, on standby before the
        commit): (text, every step's logits finite). They run as ordinary rows, beside live traffic."""
        requests = [GenerationRequest(p, SamplingParams(max_tokens=max_tokens)) for p in prompts]
        group = self._run_group(Group(requests, slot=slot, check_finite=True), self.config.server.request_timeout_s)
        return [(row.state.text, row.finite) for row in group.rows]

    @property
    def kv_cache_usage(self) -> float:
        """KV positions held by running rows / (max_batch_size x max_seq_len), in [0, 1]."""
        held = sum(row.position + 1 for row in self.table.active)
        return min(1.0, held / (self.max_batch_size * self.max_seq_len))

    @property
    def queue_depth(self) -> int:
        return self.table.queued

    @property
    def running_rows(self) -> int:
        """Rows of the KV cache running a generation now (a request with several prompts or choices holds several)."""
        return len(self.table.active)

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting work, finish what is queued and running (bounded by ``drain_timeout``), stop the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
            thread, serving = self._thread, self._serving
        # Never started: nothing runs to drain, and a warm-up in progress (a stop during start-up) is not waited for.
        if thread is not None and serving:
            thread.join(drain_timeout)
            if thread.is_alive():  # the drain ran out: running rows end at their next token, as cancelled
                for row in self.table.active:
                    row.state.request.cancelled.set()
                thread.join(5.0)
        with self._cv:
            leftover = [r for group in self.table.waiting for r in group.requests]
            self.table.waiting.clear()
            self.table.queued = 0
        for req in leftover:
            req.cancelled.set()
            if not req.future.done():
                req.future.set_exception(EngineStopped("the engine stopped before this request ran"))

    # ---- the worker -------------------------------------------------------------------------------
    def _worker(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the loop itself failed (a row's failure never gets here): say so, hang nobody
            log.exception("the engine's thread failed; the engine serves no more")
            with self._cv:
                self._exited = True  # what is queued from now on runs on the calling thread
                orphans, self._control = self._control, []
            for _, fut in orphans:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(EngineStopped(f"the engine's thread failed: {exc!r}"))

    def _serve(self) -> None:
        self.runner.configure_dynamo()
        while True:
            with self._cv:
                while not (self._control or self._stopping or self._has_rows):
                    self._cv.wait(timeout=0.5)
                    self.last_loop_at = time.monotonic()
                control, self._control = self._control, []
                if self._stopping and not (control or self._has_rows):
                    self._exited = True  # under the lock that queues: nothing is queued after this
                    return
            self.last_loop_at = time.monotonic()
            for fn, fut in control:
                _run_into(fn, fut)
            if self._serving:
                self._step()

    @property
    def _has_rows(self) -> bool:
        """Rows to step: waiting or running, once serving (before ``start()`` only ``_run_group`` steps them)."""
        return self._serving and bool(self.table.waiting or self.table.active)

    def _timed(self, fn: Callable[[], T]) -> Callable[[], T]:
        """``fn``, adding its time to ``control_seconds`` before its future resolves."""

        def run() -> T:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                self.control_seconds += time.perf_counter() - t0

        return run

    def _run_until_idle(self) -> None:
        """Run steps until nothing waits or runs (warm-up, and before ``start()``), on the engine's thread."""
        while self.table.waiting or self.table.active:
            self._step()

    @torch.inference_mode()
    def _step(self) -> None:
        with self._cv:
            groups = self.table.take_admissible()
        for group in groups:
            self._admit(group)
        # A cancelled row ends here, a follower too; one waiting for its leader's prompt (``share_prompts``) gets no
        # chunk of its own.
        cancelled = self.outputs.cancelled_prefilling
        if prefilling := [r for r in self.table.active if r.prefilling and not cancelled(r) and r.leader is None]:
            for forward in prefill_forwards(plan_prefill(prefilling, self.runner.chunk_end, self.prefill_budget)):
                if forward:
                    self._prefill(forward)
        if decoding := [r for r in self.table.active if not r.prefilling]:
            self._run(decoding, self._decode)

    def _prefill(self, chunks: list[tuple[Row, int]]) -> None:
        """The next chunk of each row's prompt, to where it ends (``runner.prefill``); the rows whose prompt is then
        whole get their first token, scored and pushed as a decode step's are. A failure fails these rows alone."""
        rows, ends = [r for r, _ in chunks], [end for _, end in chunks]
        whole = [i for i, (r, end) in enumerate(zip(rows, ends, strict=True)) if end == len(r.state.prompt_ids)]
        try:
            numbers = [GREEDY] * len(rows)  # a row draws (from its own stream) only when its prompt is whole
            for i, u in zip(whole, uniforms([rows[i].state for i in whole]), strict=True):
                numbers[i] = u
            out = self.runner.prefill(rows, ends, numbers)
            failed = self.outputs.prefilled(rows, out, ends)
            for i, row in enumerate(rows):
                row.finite = row.finite and out.finite[i]
            done = [i for i in whole if i not in failed]
            if done:
                self.outputs.sample([rows[i] for i in done], out.only(done), [numbers[i] for i in done], set())
        except Exception as exc:
            log.exception("prefilling %d rows failed", len(rows))
            self.outputs.fail(rows, exc)
        self.last_loop_at = time.monotonic()

    def _decode(self, rows: list[Row], numbers: list[float]) -> StepOutput:
        out = self.runner.decode(rows, self.table.bucket_rows(self.buckets), self.table.span(self.spans), numbers)
        self.steps += 1
        if self.on_batch is not None:
            self.on_batch(len(rows))
        return out

    def _admit(self, group: Group) -> list[Row]:
        """Rows for the requests of ``group``, all pinned to one slot: the group's, or the live one now."""
        slot = self.slots.live if group.slot is None else group.slot
        for req in group.requests:
            if req.cancelled.is_set():  # the client went away before its turn
                req.future.cancel()
                req.future.set_running_or_notify_cancel()  # wakes concurrent.futures.wait(), which cancel() does not
                continue
            if not req.future.set_running_or_notify_cancel():
                continue
            try:
                state = self._row_state(req)
            except Exception as exc:  # a bad request fails alone, never the step
                req.future.set_exception(exc)
                continue
            row = Row(-1, state, slot, self.slots.pin(slot), time.monotonic(), group.check_finite, group.capture)
            self.table.place(row)
            group.rows.append(row)
            if req.on_start is not None:
                try:
                    req.on_start(row.version)
                except Exception:  # like a failing on_text: that request alone is cancelled
                    log.warning("on_start callback failed; cancelling that request", exc_info=True)
                    req.cancelled.set()
        share_prompts(group.rows)
        return group.rows

    def _run(self, rows: list[Row], forward: StepForward) -> None:
        """One forward over ``rows`` (sampling inside it), then push and retire; a failure fails those rows alone."""
        try:
            numbers = uniforms([r.state for r in rows])  # each row's draw this step, taken once
            out = forward(rows, numbers)
            self.outputs.sample(rows, out, numbers, set())
        except Exception as exc:
            log.exception("a step over %d rows failed", len(rows))
            self.outputs.fail(rows, exc)
        self.last_loop_at = time.monotonic()  # a long generation is still a turning worker

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        """The token ids a prompt runs as: an empty one runs as BOS (or the pad token), since a row needs one."""
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id]
        return ids

    def _row_state(self, request: GenerationRequest) -> RowState:
        ids = self.prompt_ids(request.prompt)
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside this model's vocabulary (0 to {self.vocab_size - 1})")
        biased = next((t for t, _ in request.params.logit_bias if t >= self.vocab_size), None)
        if biased is not None:  # indexing past the logits would fail the whole step, not this request
            raise ValueError(f"logit_bias: token id {biased} is outside this model's vocabulary")
        if len(ids) + request.params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) exceeds "
                f"model.max_seq_len ({self.max_seq_len})"
            )
        return RowState(request, ids, self.detokenize, self.eos_ids)

    def detokenize(self, ids: list[int]) -> str:
        """Token ids as text, special tokens left out: what a completion shows."""
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))


def _run_into(fn: Callable[[], T], fut: Future[T]) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as exc:
        fut.set_exception(exc)
