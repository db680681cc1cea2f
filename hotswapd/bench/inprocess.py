"""In-process contenders: hotswapd's swap on a compiled ``Engine``, and PEFT's ways on a compiled PeftModel.

The PEFT models are compiled the way the engine compiles its own (the transformers model's
``forward``, same mode and ``dynamic``), so the comparison is about swapping, not compiling.
dynamo's counters are process-wide: graphs compiled for the PEFT models would show up in
``Engine.recompilations``, so ``Bench`` runs the hotswapd recompilation count before any PEFT model
exists, and counts each contender's graphs around its own turns.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from itertools import cycle
from pathlib import Path
from typing import Any, TypeVar

import torch

from hotswap_core.config import Config
from hotswap_core.engine import Engine, compiled_graph_count
from hotswap_core.generation import GenerationRequest, SamplingParams
from hotswap_core.history import History, SwapRecord
from hotswap_core.runner import without_graphs
from hotswap_core.swap import Swapper
from hotswapd.bench.adapters import AdapterRecipe
from hotswapd.bench.errors import BenchError

PROMPT = "Hello =>"
T = TypeVar("T")


def configure_dynamo(config: Config) -> None:
    """The engine's dynamo limits, for the calling thread (torch keeps them per thread): past the
    default limit dynamo would silently run a recompiling PEFT model eagerly and flatter it."""
    import torch._dynamo

    limit = config.model.compile.recompile_limit
    torch._dynamo.config.recompile_limit = limit
    torch._dynamo.config.accumulated_recompile_limit = max(256, limit * 4)
    torch._dynamo.config.fail_on_recompile_limit_hit = True


def on_own_thread(fn: Callable[[], T]) -> T:
    """Run ``fn`` on a new thread and wait for it: the bench's torch work outside the engine (PEFT models,
    transformers' ``generate()``).

    libgomp keeps an OpenMP pool per thread that ran a parallel region, and once a process holds more
    pool threads than cores it stops spinning between regions: the engine's thread then generated
    2.6x slower on 2 cores (a tiny model is all short regions). A thread that ends takes its pool with
    it. The engine keeps to its own thread and a swap runs in ``cpu_threads.serial()``, so the runner's calls of the
    in-process engine through this (load, recompilations, a swap) no longer need it; they are left as they were.
    """
    box: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            box.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, name="bench-torch")
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return box[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class HotswapdInProcess:
    """A compiled, warmed engine with a swapper: what the daemon runs, without the process around it."""

    def __init__(self, config: Config, state_dir: Path) -> None:
        self.config = config
        self.engine = Engine(config)
        self.engine.load()
        self.warmup_seconds = self.engine.warm_up()
        self.engine.start()
        self.swapper = Swapper(self.engine, config.validation, History(str(state_dir)))
        self.commit_and_verify: list[float] = []  # the worker's time away from serving per swap, verify included

    def stop(self) -> None:
        self.engine.stop(5.0)

    def swap(self, path: Path) -> SwapRecord:
        record = self.swapper.swap(path)
        if record.result not in ("success", "unchanged"):
            raise BenchError(f"hotswapd swap of {path} ended {record.result}: {record.reason} {record.message}")
        return record

    def stall_turn(self, paths: list[Path]) -> Callable[[], float]:
        """One swap per turn, cycling through ``paths``; the sample is the commit's stall."""
        order = cycle(paths)

        def turn() -> float:
            paused = self.engine.control_seconds
            record = self.swap(next(order))
            assert record.stall_s is not None, record
            # Everything the swap ran on the serving worker (smoke prompts run as rows of ordinary steps).
            self.commit_and_verify.append(self.engine.control_seconds - paused)
            return record.stall_s

        return turn

    def recompilations(self, pool: list[tuple[AdapterRecipe, Path]], swaps: int, seed: int = 0) -> dict[str, Any]:
        """``swaps`` swaps through the mixed pool, each followed by one batch of random size and
        prompt lengths; graphs compiled per swap (must all be 0)."""
        rng = random.Random(seed)
        engine = self.engine
        before = engine.recompilations
        per_swap: list[float] = []
        lengths: list[int] = []
        batches: list[int] = []
        max_tokens = 2
        longest = engine.max_seq_len - max_tokens
        for i in range(swaps):
            _, path = pool[i % len(pool)]
            graphs = compiled_graph_count()
            self.swap(path)
            bsz = rng.randint(1, engine.max_batch_size)
            group = []
            for _ in range(bsz):
                n = rng.choice((1, 2, 3, rng.randint(1, longest), longest))
                lengths.append(n)
                ids = [rng.randrange(engine.vocab_size) for _ in range(n)]
                group.append(GenerationRequest(ids, SamplingParams(max_tokens=max_tokens)))
            batches.append(bsz)
            for fut in engine.submit_group(group):
                fut.result(timeout=120)
            per_swap.append(float(compiled_graph_count() - graphs))
        recipes = [r for r, _ in pool]
        return {
            "per_swap": per_swap,
            "total": engine.recompilations - before,
            "swaps": swaps,
            "prompt_lengths": [min(lengths), max(lengths)],
            "batch_sizes": sorted(set(batches)),
            "ranks": sorted({r.r for r in recipes}),
            "alphas": sorted({r.alpha for r in recipes}),
            "adapters": len(recipes),
        }

    def generate(self, prompt: str, max_tokens: int) -> int:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)  # as the daemon's requests: fixed length
        (result,) = self.engine.generate([prompt], params, timeout=120)
        return result.completion_tokens


class PeftCompiled:
    """A PeftModel on the same base, compiled like the engine's model; serves one prompt's first token."""

    def __init__(self, config: Config, engine: Engine, first_adapter: Path, *, prepare_for_hotswap: bool) -> None:
        from peft import PeftModel
        from peft.utils.hotswap import prepare_model_for_compiled_hotswap
        from transformers import AutoModelForCausalLM

        m = config.model
        self.device = engine.device
        base = AutoModelForCausalLM.from_pretrained(m.path, dtype=engine.dtype, revision=m.revision)
        base = base.to(self.device).eval()  # type: ignore[arg-type]
        model: Any = PeftModel.from_pretrained(base, str(first_adapter))
        model.eval()
        if prepare_for_hotswap:
            rank = config.adapter.target_rank
            prepare_model_for_compiled_hotswap(model, target_rank=rank, config=model.peft_config)
        self.model = model
        inner: Any = model.base_model.model
        c = m.compile
        # The engine's mode, without CUDA graphs: PEFT's forward runs transformers' dynamic cache (compile.mode
        # auto is the engine's choice, not one torch.compile knows).
        mode = without_graphs(engine.mode)
        self.forward = torch.compile(inner.forward, mode=mode, dynamic=c.dynamic) if c.enabled else inner.forward
        ids = engine.tokenizer.encode(PROMPT, add_special_tokens=False)
        self.ids = torch.tensor([ids], device=self.device)  # [1, L]
        self.mask = torch.ones_like(self.ids)
        self.positions = torch.arange(len(ids), device=self.device).unsqueeze(0)  # [1, L]
        self.adapter = "default"
        self._loaded = 0
        self.graphs_per_swap: list[float] = []
        self.first_token()  # compile (and warm) outside any timed turn

    @torch.inference_mode()
    def first_token(self) -> int:
        out = self.forward(
            input_ids=self.ids, attention_mask=self.mask, position_ids=self.positions, use_cache=False, logits_to_keep=1
        )
        return int(out.logits[0, -1].argmax())  # .item() waits for the device

    def hotswap_turn(self, paths: list[Path], *, preloaded: bool) -> Callable[[], float]:
        """PEFT's in-place ``hotswap_adapter`` into the compiled model: stop-the-world (no lock, no
        second copy), so serving waits for the whole call. ``preloaded``: the state dict is already in
        memory and only ``hotswap_adapter_from_state_dict`` (the copy itself) is timed."""
        from peft import LoraConfig
        from peft.utils.hotswap import hotswap_adapter, hotswap_adapter_from_state_dict
        from peft.utils.save_and_load import _insert_adapter_name_into_state_dict, load_peft_weights

        order = cycle(paths)

        def turn() -> float:
            path = str(next(order))
            graphs = compiled_graph_count()
            if preloaded:
                state = load_peft_weights(path, device=str(self.device))
                state = _insert_adapter_name_into_state_dict(state, adapter_name="default", parameter_prefix="lora_")
                config = LoraConfig.from_pretrained(path)
                t0 = time.perf_counter()
                hotswap_adapter_from_state_dict(self.model, state, "default", config)
            else:
                t0 = time.perf_counter()
                hotswap_adapter(self.model, path, adapter_name="default", torch_device=str(self.device))
            _sync(self.device)
            stall = time.perf_counter() - t0
            self.first_token()  # serving resumes; a recompile here would show in graphs_per_swap
            self.graphs_per_swap.append(float(compiled_graph_count() - graphs))
            return stall

        return turn

    def load_set_turn(self, paths: list[Path]) -> Callable[[], float]:
        """``load_adapter`` + ``set_adapter`` on the compiled model, timed until the next first token
        (new modules and a new active adapter: dynamo recompiles). The old adapter is deleted after."""
        order = cycle(paths)

        def turn() -> float:
            path = str(next(order))
            self._loaded += 1
            name = f"swap{self._loaded}"
            graphs = compiled_graph_count()
            t0 = time.perf_counter()
            self.model.load_adapter(path, adapter_name=name)
            self.model.set_adapter(name)
            self.first_token()
            stall = time.perf_counter() - t0
            self.graphs_per_swap.append(float(compiled_graph_count() - graphs))
            self.model.delete_adapter(self.adapter)
            self.adapter = name
            return stall

        return turn
