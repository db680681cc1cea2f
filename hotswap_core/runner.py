"""The model runner: the base model with its two-slot LoRA layout and the static KV cache, prefill and decode
compiled, and one forward over a set of rows (gpt-fast's ``prefill`` and ``decode_one_token``).

The runner knows rows only as cache indices, prompts, last tokens and positions; which requests hold which rows,
and when, is the scheduler's (``scheduler.RowTable``) and the engine's worker's. Only that worker calls it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hotswap_core import cpu_threads, kv_cache, prepack
from hotswap_core.config import Config
from hotswap_core.errors import EngineError
from hotswap_core.generation import Scored
from hotswap_core.kv_cache import KVCache, StepView, decode_view, spans_for
from hotswap_core.layout import Layout, base_identities, layout_from_model
from hotswap_core.sampling import draw, draw_inputs, logprobs, sampling_defaults
from hotswap_core.scheduler import Row, buckets_for
from hotswap_core.slots import SlotBank

log = logging.getLogger("hotswapd.engine")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The same optimisation without CUDA graphs: for prefill, whose shapes change with every batch.
_NO_GRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


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


def resolve_mode(name: str, device: torch.device) -> str:
    """``auto``: CUDA graphs (``reduce-overhead``) on CUDA, ``default`` elsewhere; CPU never captures graphs."""
    if name == "auto":
        name = "reduce-overhead" if device.type == "cuda" else "default"
    return name if device.type == "cuda" else _NO_GRAPHS.get(name, name)


def use_compile_cache(path: str) -> None:
    """Point inductor's caches (FX graph, AOTAutograd, kernels) at ``compile.cache_dir``.

    Inductor reads ``TORCHINDUCTOR_CACHE_DIR`` whenever it needs its cache, but importing ``torch._dynamo``
    already writes torch's default (``$TMPDIR/torchinductor_<user>``) there when it is unset, so setting it only
    when absent never took: the key was ignored and every compile went to the temporary directory (under systemd's
    ``PrivateTmp``, gone at every restart). A value the environment gave (the systemd units set one) still wins.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current is None or current == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current = os.path.abspath(path)
    os.makedirs(current, exist_ok=True)


def resolve_prefill_chunk(choice: str | int | None, device: torch.device, max_seq_len: int) -> int:
    """``model.prefill_chunk_tokens``: ``auto`` is 2048 on CUDA, 128 elsewhere; None never splits a prompt
    (``max_seq_len``: then nothing limits a step's prompt tokens either, see ``Runner.prefill_budget``)."""
    if choice is None:
        return max_seq_len
    chunk = (2048 if device.type == "cuda" else 128) if choice == "auto" else int(choice)
    # A chunk within a few tokens of the context would split off a sliver that warm-up's longest prompt
    # (max_seq_len - 4 tokens) does not: no chunks.
    return chunk if chunk <= max_seq_len - 8 else max_seq_len


def resolve_cpp_wrapper(choice: str | bool, device: torch.device) -> bool:
    """``auto``: inductor's C++ wrapper on CPU (a step runs as one call without the GIL), not on CUDA."""
    return device.type == "cpu" if choice == "auto" else bool(choice)


def compile_options(mode: str, cpp_wrapper: bool) -> dict[str, Any]:
    """``torch.compile`` options for ``mode`` (it takes a mode or options, not both), plus the C++ wrapper."""
    import torch._inductor

    return {**torch._inductor.list_mode_options(mode), "cpp_wrapper": cpp_wrapper}


def without_graphs(mode: str) -> str:
    """The same optimisation without CUDA graphs (for forwards whose shapes change: prefill, PEFT's own)."""
    return _NO_GRAPHS.get(mode, mode)


# A compiled forward: (logits [B, V], ``_outcome`` [2, B]) and, from prefill, the hidden states [B, L, H].
Forward = Callable[..., tuple[torch.Tensor, ...]]
# The most float32 log-probabilities one piece of a prompt's scoring holds at once (64 MiB): at a 151,936-token
# vocabulary, 110 positions a piece.
_SCORE_ELEMENTS = 2**24


@dataclass(frozen=True)
class StepOutput:
    """One forward over rows: ``logits`` [B, V] with ``rows[i]``'s at ``at[i]`` (a decode's holes stay in),
    and per row, in the order of the rows, the token drawn in the forward and whether its logits were finite;
    a prefill's ``hidden`` states [B, L, H] (rows in order, right-padded) score prompts (``score_prompt``)."""

    logits: torch.Tensor
    at: list[int]
    tokens: list[int]
    finite: list[bool]
    hidden: torch.Tensor | None = None

    def only(self, kept: list[int]) -> StepOutput:
        """The output of the rows at ``kept`` (indices into this output's rows), in that order."""
        at, tokens, finite = self.at, self.tokens, self.finite
        return StepOutput(self.logits, [at[i] for i in kept], [tokens[i] for i in kept], [finite[i] for i in kept])

    @classmethod
    def read(
        cls, logits: torch.Tensor, outcome: torch.Tensor, at: list[int], hidden: torch.Tensor | None = None
    ) -> StepOutput:
        """A forward's ``(logits, _outcome)`` for the rows at ``at``: the step's one device -> host transfer."""
        tokens, finite = outcome.tolist()
        return cls(logits, at, [tokens[i] for i in at], [bool(finite[i]) for i in at], hidden)


class ModelRunner:
    """Owns the model, its slots and its KV cache on one device; runs prefill and decode forwards."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.device = resolve_device(config.model.device)
        self.dtype = resolve_dtype(config.model.dtype, self.device)
        self.mode = resolve_mode(config.model.compile.mode, self.device)
        self.cpp_wrapper = resolve_cpp_wrapper(config.model.compile.cpp_wrapper, self.device)
        self.max_batch_size = config.model.max_batch_size
        self.max_seq_len = config.model.max_seq_len
        self.buckets = buckets_for(self.max_batch_size)  # decode batch sizes, a graph each
        self.spans = spans_for(self.max_seq_len)  # the positions a decode step attends to
        # Prompt tokens a row prefills per step: a longer prompt takes several, decode steps in between. They are
        # also the budget of a step, all rows together (scheduler.plan_prefill); a prompt never split, none.
        self.prefill_chunk = resolve_prefill_chunk(config.model.prefill_chunk_tokens, self.device, self.max_seq_len)
        self.prefill_budget = self.prefill_chunk if self.prefill_chunk < self.max_seq_len else None
        self.sampling_defaults: dict[str, float | int] = {}  # from generation_config.json, set by load()

    def load(self) -> None:
        """Model, tokenizer, layout, slots and KV cache on the device; prefill and decode compiled (lazily: the
        engine's warm-up runs every shape)."""
        from peft import get_peft_model
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap
        from transformers import AutoModelForCausalLM, AutoTokenizer

        m = self.config.model
        log.info("loading %s (revision %s) on %s as %s", m.path, m.revision, self.device, self.dtype)
        kw: dict[str, Any] = {"revision": m.revision, "trust_remote_code": m.trust_remote_code}
        kv_cache.register()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(m.path, **kw)
            base = AutoModelForCausalLM.from_pretrained(m.path, dtype=self.dtype, attn_implementation="sdpa", **kw)
        except (OSError, ValueError) as exc:
            raise EngineError(f"cannot load model {m.path!r}: {exc}") from exc
        base = base.to(self.device).eval()  # type: ignore[arg-type]  # transformers' stub wants a model
        self.model_config = base.config
        _check_attention(base.config)
        base.set_attn_implementation(kv_cache.ATTENTION)
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
        self.slots = SlotBank(peft_model, self.layout, self.device, self.dtype, rows=self.max_batch_size)
        peft_model.eval()
        # Run the transformers model's own decoder and head: PeftModel's wrapper adds Python glue, no math.
        self.model: torch.nn.Module = peft_model.base_model.model  # type: ignore[assignment]
        self.cpu_threads = cpu_threads.apply(m.cpu_threads)  # before anything compiles
        if prepack.use_onednn(m.cpu_linear, self.device, self.dtype):
            packed, nbytes = prepack.prepack_linears(self.model)
            log.info("cpu_linear: %d linears on oneDNN prepacked weights (%.1f MiB)", packed, nbytes / 2**20)
        self._decoder = self.model.get_decoder()  # type: ignore[operator]
        self._head = self.model.get_output_embeddings()  # type: ignore[operator]
        self.cache = KVCache.for_model(base.config, self.max_batch_size, self.max_seq_len, self.device, self.dtype)
        log.info(
            "static KV cache: %d rows x %d positions, %.1f MiB",
            self.max_batch_size,
            self.max_seq_len,
            self.cache.nbytes / 2**20,
        )
        # arange(span) per span, what a decode step attends to. The span is a symbolic size of each bucket's one
        # graph (on CUDA a graph recorded per span), not a graph per span.
        self._seen = {s: torch.arange(s, device=self.device) for s in self.spans}
        for seen in self._seen.values():
            torch._dynamo.mark_dynamic(seen, 0, min=2, max=self.max_seq_len)
        self._prefill_fn, self._decode_fn = self._compile()

    def _compile(self) -> tuple[Forward, Forward]:
        c = self.config.model.compile
        if not c.enabled:
            return self._prefill_forward, self._decode_forward
        if c.cache_dir:
            use_compile_cache(c.cache_dir)
        self.configure_dynamo()
        log.info(
            "compiling decode with mode %r (one graph per batch size %s), prefill with %r; C++ wrapper %s",
            self.mode,
            list(self.buckets),
            without_graphs(self.mode),
            "on" if self.cpp_wrapper else "off",
        )
        prefill_options = compile_options(without_graphs(self.mode), self.cpp_wrapper)
        decode_options = compile_options(self.mode, self.cpp_wrapper)
        # One CUDA graph per span is expected, not a sign of shapes gone wrong (inductor warns past 8).
        decode_options["triton.cudagraph_dynamic_shape_warn_limit"] = len(self.spans) + 1
        prefill = torch.compile(self._prefill_forward, options=prefill_options, dynamic=c.dynamic)
        # Decode shapes never change within a bucket: static, so each bucket is one graph (a CUDA graph on CUDA).
        decode = torch.compile(self._decode_forward, options=decode_options, dynamic=False)
        return prefill, decode

    def configure_dynamo(self) -> None:
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
        # The model's float attributes (norm epsilons, attention scaling) are constants. Under dynamic shapes dynamo
        # would trace them as symbolic floats, then restart the whole analysis to specialise them again: about 5 s
        # of every start-up, warm cache or not.
        torch._dynamo.config.specialize_float = True

    # ---- the two forwards (what gets compiled) ------------------------------------------------
    def _prefill_forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        last: torch.Tensor,
        draws: torch.Tensor,
        past: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt chunks ``ids`` [B, L] (right-padded) at ``positions`` into cache ``rows`` [B]; next-token logits
        [B, V] at ``last``, ``_outcome`` [2, B] (``draws`` [B, 2]: ``sampling.draw_inputs``), and every position's
        hidden state [B, L, H] (the head's input: what scoring a prompt needs; computed anyway, so returning it is
        free). First chunks start at 0; later ones read their rows' cached positions ``past`` (``arange(S)``)."""
        view = StepView(self.cache, rows, positions, past=past)
        states = self._decoder(input_ids=ids, position_ids=self._rope(positions), use_cache=False, hotswap_kv=view)
        hidden = states.last_hidden_state
        logits = self._head(hidden[torch.arange(ids.shape[0], device=ids.device), last])  # [B, V]
        return logits, _outcome(logits, draws), hidden

    def _decode_forward(
        self, ids: torch.Tensor, positions: torch.Tensor, seen: torch.Tensor, draws: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per cache row ``0 .. n-1``: ``ids`` and ``positions`` [n, 1], attending to the positions
        ``seen`` (``arange(span)``); logits [n, V] and ``_outcome`` [2, n] (``draws`` [n, 2]:
        ``sampling.draw_inputs``)."""
        view = decode_view(self.cache, positions, seen)
        hidden = self._decoder(input_ids=ids, position_ids=self._rope(positions), use_cache=False, hotswap_kv=view)
        logits = self._head(hidden.last_hidden_state[:, -1])
        return logits, _outcome(logits, draws)

    def _rope(self, positions: torch.Tensor) -> torch.Tensor:
        """The positions the model's rotary embedding sees: the spare position (padding, rows nobody decodes) as
        the context's last, so no step looks longer than ``max_seq_len`` (dynamic and long-context RoPE variants
        choose their frequencies from the longest position of the batch)."""
        return positions.clamp(max=self.max_seq_len - 1)

    # ---- one forward over rows ------------------------------------------------------------------------
    def chunk_end(self, row: Row) -> int:
        """Where the next chunk of ``row``'s prompt ends (it starts at ``row.filled``)."""
        return min(len(row.state.prompt_ids), row.filled + self.prefill_chunk)

    def prefill(self, rows: list[Row], ends: list[int], numbers: list[float]) -> StepOutput:
        """The next chunk of each row's prompt (``row.filled`` to its ``ends``, ``scheduler.plan_prefill``'s) into
        its cache row, with this step's ``numbers`` (``sampling.uniforms``; the next token is drawn at each chunk's
        last position, and read only after a prompt's last chunk). Rows are all first chunks or all later ones."""
        chunks = [(r.filled, end) for r, end in zip(rows, ends, strict=True)]
        # At least 2 positions: dynamo specialises size-1 dims, and a 1-token prefill would be one more graph.
        bsz, length = len(rows), max(2, *(end - start for start, end in chunks))
        ids = torch.full((bsz, length), self.pad_id, dtype=torch.long)
        for i, (r, (start, end)) in enumerate(zip(rows, chunks, strict=True)):
            ids[i, : end - start] = torch.tensor(r.state.prompt_ids[start:end])
        starts = torch.tensor([start for start, _ in chunks])
        # Padding past the context goes to the cache's spare position (see StepView).
        positions = (starts[:, None] + torch.arange(length)).clamp(max=self.max_seq_len)
        index = torch.tensor([r.index for r in rows])
        last = torch.tensor([end - start - 1 for start, end in chunks])
        draws = draw_inputs([r.state for r in rows], numbers, bsz, range(bsz)).to(self.device)
        # Its width (2) is a constant: symbolic, it would be duck-sized with a batch of 2 and recompile at 3.
        torch._dynamo.mark_static(draws, 1)
        past = None
        if any(start for start, _ in chunks):
            past = torch.arange(max(end for _, end in chunks), device=self.device)  # below max_seq_len: never all
            torch._dynamo.mark_dynamic(past, 0, min=2, max=self.max_seq_len)
        self.slots.assign([r.slot for r in rows])
        dev = self.device
        logits, outcome, hidden = self._prefill_fn(
            ids.to(dev), positions.to(dev), index.to(dev), last.to(dev), draws, past
        )
        return StepOutput.read(logits, outcome, list(range(bsz)), hidden)

    def score_prompt(self, row: Row, hidden: torch.Tensor, top: int, start: int, end: int) -> tuple[Scored, ...]:
        """The prompt tokens after positions ``start`` .. ``end - 1`` (a chunk), each scored in the context before
        it: its log-probability and the ``top`` most likely tokens' (``sampling.logprobs``), from the chunk's
        ``hidden`` states of ``row`` [L, H] (position ``start`` first). The head runs eagerly, outside the compiled
        graphs (whose shapes stay as they are), on the row's slot (a LoRA head), a piece at a time."""
        prompt = row.state.prompt_ids
        self.slots.assign([row.slot])
        piece = max(1, _SCORE_ELEMENTS // self.vocab_size)
        scored: list[Scored] = []
        stop = min(end, len(prompt) - 1)  # the last position predicts no prompt token
        for first in range(start, stop, piece):
            upto = min(first + piece, stop)
            logits = self._head(hidden[None, first - start : upto - start])[0]  # positions first .. upto - 1
            scored += logprobs(logits, range(upto - first), prompt[first + 1 : upto + 1], [top] * (upto - first))
        return tuple(scored)

    def decode(self, rows: list[Row], n: int, span: int, numbers: list[float]) -> StepOutput:
        """One token for each of ``rows``, over cache rows ``0 .. n-1`` (``n`` a decode bucket) and their first
        ``span`` positions (one of ``spans``, above every row's position), with this step's ``numbers``
        (``sampling.uniforms``); the logits stay [n, V], ``rows[i]`` at ``r.index``."""
        # Rows nobody decodes (free, or still prefilling) write at the spare position, which nothing reads.
        ids, positions, slots = [self.pad_id] * n, [self.max_seq_len] * n, [0] * n
        for r in rows:
            ids[r.index], positions[r.index], slots[r.index] = r.state.ids[-1], r.position, r.slot
        at = [r.index for r in rows]
        draws = draw_inputs([r.state for r in rows], numbers, n, at)
        self.slots.assign(slots)
        if self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        dev = self.device
        seen = self._seen[span]
        logits, outcome = self._decode_fn(
            torch.tensor(ids, device=dev)[:, None], torch.tensor(positions, device=dev)[:, None], seen, draws.to(dev)
        )  # [n, V], [2, n]
        return StepOutput.read(logits, outcome, at)


def _outcome(logits: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """What a step tells the host, in one tensor [2, B]: each row's next token (``sampling.draw``), and 1 where
    every logit of the row is finite (a swap's smoke prompts check it) else 0."""
    finite = torch.isfinite(logits).all(dim=-1)
    return torch.stack([draw(logits, draws), finite.to(torch.long)])


def _check_attention(config: Any) -> None:
    """The static cache keeps every position: models with sliding-window or other non-global layers are refused."""
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"}:
        raise EngineError(f"hotswapd's KV cache serves full-attention models only; this one has {sorted(kinds)} layers")
