"""The engine: base model + fixed two-slot LoRA layout, compiled once, warmed, served by one worker.

Lifecycle: ``load()`` (model, tokenizer, layout, slots, compile) -> ``warm_up()`` (every shape class,
both slots) -> ``start()`` (worker thread) -> ``submit()`` / ``call_between_batches()`` -> ``stop()``.

The worker thread owns the model. Requests are batched dynamically (up to ``max_batch_size``) and
each batch runs to completion on one slot, so a response never mixes adapter versions; control
operations (the swap's commit, verify) run between batches.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from hotswap_core.config import Config
from hotswap_core.errors import EngineError
from hotswap_core.generation import GenerationRequest, GenerationResult, RowState, SamplingParams
from hotswap_core.layout import Layout, base_identities, layout_from_model
from hotswap_core.sampling import sample, sampling_defaults
from hotswap_core.slots import SlotBank

log = logging.getLogger("hotswapd.engine")
T = TypeVar("T")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WarmupStep:
    """One warm-up step about to run: step ``k`` of ``total``; ``eta_s`` is None until one step has run."""

    k: int
    total: int
    slot: int
    batch: int
    length: int
    elapsed_s: float
    eta_s: float | None

    def describe(self) -> str:
        return f"step {self.k}/{self.total}: slot {self.slot + 1}/2, batch {self.batch}, prompt length {self.length}"


class EngineBusy(EngineError):
    """The request queue is full; retry later."""


class EngineStopped(EngineError):
    """The engine is stopping or stopped and accepts no new work."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EngineError("model.device is 'cuda' but torch.cuda.is_available() is false")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def compiled_graph_count() -> int:
    """Graphs dynamo has compiled in this process (process-wide counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Engine:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.max_batch_size = config.model.max_batch_size
        self.max_seq_len = config.model.max_seq_len
        self.sampling_defaults: dict[str, float | int] = {}  # from generation_config.json, set by load()
        self.ready = threading.Event()
        self.last_loop_at = time.monotonic()  # heartbeat: proves the serving loop turns
        self._graphs_after_warmup: int | None = None
        self._cv = threading.Condition()
        # Groups of requests; a group (one HTTP request's prompts) always runs in one batch, so on one version.
        self._pending: deque[list[GenerationRequest]] = deque()
        self._queued = 0  # requests in _pending
        self.on_batch: Callable[[int], None] | None = None  # rows per batch (metrics)
        self._kv_positions = 0  # KV positions the running batch holds (rows x padded length); 0 between batches
        self._control: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ---- load and compile -------------------------------------------------------------------
    def load(self) -> None:
        from peft import get_peft_model
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = self.config.model
        log.info("loading %s (revision %s) on %s as %s", m.path, m.revision, self.device, self.dtype)
        kw: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(m.path, **kw)
            base = AutoModelForCausalLM.from_pretrained(m.path, dtype=self.dtype, **kw)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {m.path!r}: {exc}") from exc
        base = base.to(self.device).eval()  # type: ignore[arg-type]  # transformers' stub wants a model
        self.model_config = base.config
        # Token ids a client may send: one past the embedding is an out-of-bounds read in the compiled
        # graph (a RuntimeError for the whole batch on CPU, a device-side assert that poisons the context on CUDA).
        self.vocab_size = int(base.get_input_embeddings().num_embeddings)
        eos = base.generation_config.eos_token_id if base.generation_config is not None else None
        eos = eos if eos is not None else self.tokenizer.eos_token_id
        self.eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else min(self.eos_ids, default=0)
        )
        self.sampling_defaults = sampling_defaults(base.generation_config)
        if self.sampling_defaults:
            log.info("requests that leave them out sample with generation_config's %s", self.sampling_defaults)

        ids = base_identities(m.path, base.config)
        self.layout: Layout = layout_from_model(
            base, self.config.adapter.target_modules, self.config.adapter.target_rank, ids
        )
        # Layout fixed at start: every slot at target_rank, zero B == exact base behaviour.
        peft_model = get_peft_model(base, self.layout.lora_config())
        prepare_model_for_compiled_hotswap(peft_model, target_rank=self.layout.target_rank)
        self.slots = SlotBank(peft_model, self.layout, self.device, self.dtype)
        peft_model.eval()
        # Compile the transformers model itself: PeftModel's wrapper adds Python glue, no math.
        self.model: torch.nn.Module = peft_model.base_model.model  # type: ignore[assignment]
        self._forward = self._compile(self.model)

    def _compile(self, model: torch.nn.Module) -> Callable[..., Any]:
        c = self.config.model.compile
        if not c.enabled:
            return model.forward
        if c.cache_dir:
            os.makedirs(c.cache_dir, exist_ok=True)
            # Read by inductor when it first needs its cache dir; the FX graph cache makes warm starts fast.
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", c.cache_dir)
        self._configure_dynamo()
        return torch.compile(model.forward, mode=c.mode, dynamic=c.dynamic)

    def _configure_dynamo(self) -> None:
        """Apply our dynamo settings to the calling thread.

        torch keeps config overrides per thread (a ContextVar), so every thread that runs the
        compiled model must call this, or it silently gets the defaults (recompile_limit 8).
        """
        import torch._dynamo

        c = self.config.model.compile
        # Past the limit dynamo silently runs the frame eagerly; we want a loud failure instead.
        torch._dynamo.config.recompile_limit = c.recompile_limit
        torch._dynamo.config.accumulated_recompile_limit = max(256, c.recompile_limit * 4)
        torch._dynamo.config.fail_on_recompile_limit_hit = True

    def warm_up(self, progress: Callable[[WarmupStep], None] | None = None) -> float:
        """Run every shape class the server will see, on both slots, so no request compiles later.

        ``progress`` is called before each step, with an estimate of the time left (see ``_eta``).
        """
        t0 = time.monotonic()
        self._configure_dynamo()
        lengths = sorted({2, 3, max(3, self.max_seq_len // 2), max(3, self.max_seq_len - 4)})
        batches = sorted({1, 2, self.max_batch_size})
        plan = [(s, b, n) for s in (0, 1) for b in batches for n in lengths]
        took: list[tuple[float, bool]] = []  # (seconds, compiled a graph) per step done
        for k, (slot, bsz, length) in enumerate(plan, 1):
            if progress:
                eta = self._eta(plan[k - 1 :], took, {b for s, b, _ in plan[: k - 1] if s == 0})
                progress(WarmupStep(k, len(plan), slot, bsz, length, time.monotonic() - t0, eta))
            step_t0, graphs = time.monotonic(), compiled_graph_count()
            self.slots.select(slot)
            # Rows of different lengths, so left padding (a mask with zeros) is part of what is traced.
            rows = [
                self._row(GenerationRequest([self.pad_id + 1] * max(1, length - i), SamplingParams(max_tokens=3)))
                for i in range(bsz)
            ]
            self._generate(rows)
            took.append((time.monotonic() - step_t0, compiled_graph_count() > graphs))
            log.debug("warm-up step %d/%d: %d graphs so far", k, len(plan), compiled_graph_count())
        self.slots.select(self.slots.live)
        self._graphs_after_warmup = compiled_graph_count()
        elapsed = time.monotonic() - t0
        log.info("warm-up done in %.1fs: %d graphs compiled", elapsed, self._graphs_after_warmup)
        return elapsed

    def _eta(self, left: list[tuple[int, int, int]], took: list[tuple[float, bool]], seen: set[int]) -> float | None:
        """Seconds the steps ``left`` should take. Nearly all the time goes into the steps that compile:
        on slot 1, with ``compile.dynamic`` the first step of each of the first two batch sizes (then the
        dimensions are symbolic), without it every step; slot 2 reuses slot 1's graphs. None until a
        compiling step is done."""
        compiling = [t for t, compiled in took if compiled]
        if not compiling:
            return None
        fast = sorted(t for t, compiled in took if not compiled)
        per_fast = fast[len(fast) // 2] if fast else 0.05
        dynamic = self.config.model.compile.dynamic is not False
        new, total = set(seen), 0.0
        for slot, bsz, _ in left:
            compiles = slot == 0 and (not dynamic or (bsz not in new and len(new) < 2))
            new.add(bsz)
            total += sum(compiling) / len(compiling) if compiles else per_fast
        return total

    @property
    def recompilations(self) -> int:
        """Graphs compiled after warm-up. Must stay 0."""
        if self._graphs_after_warmup is None or not self.config.model.compile.enabled:
            return 0
        return compiled_graph_count() - self._graphs_after_warmup

    # ---- worker -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._worker, name="hotswapd-engine", daemon=True)
        self._thread.start()
        self.ready.set()

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        return self.submit_group([request])[0]

    def submit_group(self, requests: list[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Queue requests that must run in one batch, hence on one adapter version."""
        if not 1 <= len(requests) <= self.max_batch_size:
            raise ValueError(f"a group holds 1 to {self.max_batch_size} requests (model.max_batch_size)")
        with self._cv:
            if self._stopping:
                raise EngineStopped("the engine is shutting down")
            if self._queued + len(requests) > self.config.server.max_queue:
                raise EngineBusy(f"request queue is full ({self._queued} waiting, server.max_queue)")
            self._pending.append(list(requests))
            self._queued += len(requests)
            self._cv.notify()
        return [r.future for r in requests]

    def call_between_batches(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on the worker thread before the next batch starts (or now, if no worker runs)."""
        fut: Future[T] = Future()
        if self._thread is None or not self._thread.is_alive():
            _run_into(fn, fut)
            return fut
        with self._cv:
            self._control.append((fn, fut))
            self._cv.notify()
        return fut

    def generate(
        self, prompts: list[str], params: SamplingParams | None = None, timeout: float | None = None
    ) -> list[GenerationResult]:
        """Blocking convenience: submit each prompt and wait for all results."""
        futures = [self.submit(GenerationRequest(p, params or SamplingParams())) for p in prompts]
        return [f.result(timeout) for f in futures]

    @property
    def kv_cache_usage(self) -> float:
        """KV positions held by the running batch / (max_batch_size x max_seq_len), in [0, 1]."""
        return min(1.0, self._kv_positions / (self.max_batch_size * self.max_seq_len))

    @property
    def queue_depth(self) -> int:
        return self._queued

    def stop(self, drain_timeout: float = 30.0) -> None:
        """Stop accepting work, finish what is queued (bounded by ``drain_timeout``), stop the worker."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(drain_timeout)
        with self._cv:
            leftover = [r for group in self._pending for r in group]
            self._pending.clear()
            self._queued = 0
        for req in leftover:
            req.cancelled.set()
            if not req.future.done():
                req.future.set_exception(EngineStopped("the engine stopped before this request ran"))

    def _worker(self) -> None:
        self._configure_dynamo()
        while True:
            with self._cv:
                while not self._pending and not self._control and not self._stopping:
                    self._cv.wait(timeout=0.5)
                    self.last_loop_at = time.monotonic()
                control = list(self._control)
                self._control.clear()
                batch: list[GenerationRequest] = []
                while self._pending and len(batch) + len(self._pending[0]) <= self.max_batch_size:
                    group = self._pending.popleft()
                    batch += group
                    self._queued -= len(group)
                if self._stopping and not batch and not control:
                    return
            self.last_loop_at = time.monotonic()
            for fn, fut in control:
                _run_into(fn, fut)
            if batch:
                self._run_batch(batch)

    def _row(self, request: GenerationRequest) -> RowState:
        prompt = request.prompt
        ids = list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=False)
        if not ids:
            ids = [self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.pad_id]
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} is outside this model's vocabulary (0 to {self.vocab_size - 1})")
        if len(ids) + request.params.max_tokens > self.max_seq_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({request.params.max_tokens}) exceeds "
                f"model.max_seq_len ({self.max_seq_len})"
            )
        return RowState(request, ids, self._decode, self.eos_ids)

    def _decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _run_batch(self, batch: list[GenerationRequest]) -> None:
        rows: list[RowState] = []
        for req in batch:
            if req.cancelled.is_set():
                req.future.cancel()  # the client went away before its turn
                continue
            if not req.future.set_running_or_notify_cancel():
                continue
            try:
                rows.append(self._row(req))
            except Exception as exc:  # a bad request fails alone, never the batch
                req.future.set_exception(exc)
        if not rows:
            return
        if self.on_batch is not None:
            self.on_batch(len(rows))
        version = self.slots.live_version
        for row in rows:
            if row.request.on_start is not None:
                try:
                    row.request.on_start(version)
                except Exception:  # like a failing on_text: that request alone is cancelled
                    log.warning("on_start callback failed; cancelling that request", exc_info=True)
                    row.request.cancelled.set()
        start = time.monotonic()

        def finish(row: RowState) -> None:
            """Resolve a row's future the step it is done, not when the batch's longest row is."""
            ttft = (row.first_token_at or start) - row.request.created_at
            row.request.future.set_result(
                GenerationResult(
                    text=row.text,
                    token_ids=tuple(row.ids),
                    prompt_tokens=len(row.prompt_ids),
                    finish_reason=row.finish_reason or "length",
                    adapter=version,
                    time_to_first_token_s=ttft,
                    duration_s=time.monotonic() - row.request.created_at,
                )
            )

        try:
            self._generate(rows, on_done=finish)
        except Exception as exc:
            log.exception("batch of %d failed", len(rows))
            for row in rows:
                if not row.request.future.done():
                    row.request.future.set_exception(EngineError(f"generation failed: {exc}"))

    def _prefill_inputs(self, rows: list[RowState]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad the prompts to one length: input ids, attention mask and positions, each [B, L]."""
        # At least 2 positions: dynamo specialises size-1 dims, and a 1-token prefill would start a
        # chain of extra graphs (prefill, then decode with a constant past length of 1, ...).
        bsz, length = len(rows), max(2, *(len(r.prompt_ids) for r in rows))
        ids = torch.full((bsz, length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((bsz, length), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, length - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, length - len(r.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self.model_config)

    @torch.inference_mode()
    def _generate(
        self, rows: list[RowState], check_finite: bool = False, on_done: Callable[[RowState], None] | None = None
    ) -> bool:
        """Prefill, then decode until every row is done; ``on_done`` gets each row the step it finishes.
        Returns whether all logits were finite (only checked with ``check_finite``: a reduction per step)."""
        ids, mask, positions = self._prefill_inputs(rows)
        bsz = len(rows)
        cache = self._new_cache()
        logits = self._step(ids, mask, positions, cache)  # [B, V]
        finite = True
        try:
            while True:
                self._kv_positions = bsz * mask.shape[1]  # the dynamic cache holds every row at the padded length
                if check_finite:
                    finite = finite and bool(torch.isfinite(logits).all())
                for row, token in zip(rows, sample(logits, rows), strict=True):
                    if not row.done:
                        row.push(token)
                        if row.done and on_done is not None:
                            on_done(row)
                self.last_loop_at = time.monotonic()  # a long batch is still a turning worker
                if all(r.done for r in rows):
                    return finite
                next_ids = torch.tensor([[r.ids[-1] if r.ids else self.pad_id] for r in rows], device=self.device)
                mask = torch.cat([mask, torch.ones((bsz, 1), dtype=mask.dtype, device=self.device)], dim=1)
                positions = positions[:, -1:] + 1  # [B, 1]
                logits = self._step(next_ids, mask, positions, cache)
        finally:
            self._kv_positions = 0

    def _step(self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any) -> torch.Tensor:
        out = self._forward(
            input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
        )
        return out.logits[:, -1, :]  # [B, V]

    def last_logits(self, prompts: list[str], slot: int | None = None) -> torch.Tensor:
        """Next-token logits [B, V] (float32, CPU) of ``prompts`` through the serving graph."""

        def run() -> torch.Tensor:
            rows = [self._row(GenerationRequest(p, SamplingParams(max_tokens=1))) for p in prompts]
            return self._step(*self._prefill_inputs(rows), self._new_cache()).float().cpu()

        return self._on_slot(self.slots.live if slot is None else slot, run)

    def probe(self, prompts: list[str], slot: int, max_tokens: int = 8) -> list[tuple[str, bool]]:
        """Greedy completions of ``prompts`` on ``slot`` (e.g. standby, before commit): (text, logits finite)."""

        def run() -> list[tuple[str, bool]]:
            rows = [self._row(GenerationRequest(p, SamplingParams(max_tokens=max_tokens))) for p in prompts]
            finite = self._generate(rows, check_finite=True)
            return [(r.text, finite) for r in rows]

        return self._on_slot(slot, run)

    def _on_slot(self, slot: int, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker, between batches, with the forward pointed at ``slot``."""

        @torch.inference_mode()
        def run() -> T:
            self.slots.select(slot)
            try:
                return fn()
            finally:
                self.slots.select(self.slots.live)

        return self.call_between_batches(run).result()


def _run_into(fn: Callable[[], T], fut: Future[T]) -> None:
    if not fut.set_running_or_notify_cancel():
        return
    try:
        fut.set_result(fn())
    except BaseException as exc:
        fut.set_exception(exc)
