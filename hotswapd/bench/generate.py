"""The contender of the serving figures' throughput comparison: transformers' own ``generate()`` on the same base
and adapter, in this process, compiled with a static cache, on the daemon's CPU linears or transformers' own and
on the daemon's intra-op thread count."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from hotswap_core import cpu_threads, prepack
from hotswapd.bench.errors import BenchError


class TransformersGenerate:
    """transformers' own ``generate()`` on the same base + adapter: compiled, static cache (one size, so one
    graph), greedy, EOS ignored, the workload in padded batches of ``batch``."""

    def __init__(
        self,
        model_path: str,
        adapter: Path,
        dtype: str,
        device: str,
        max_seq_len: int,
        compiled: bool = True,
        cpu_linear: str = "aten",
        threads: str | int = "auto",
    ) -> None:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
        from transformers.generation.configuration_utils import CompileConfig

        self.torch = torch
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        base: Any = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
        base = base.to(self.device)
        # The daemon's intra-op threads for this model (``model.cpu_threads``), set before anything compiles: this
        # process serves several models in turn, and inductor keeps the count it compiled with.
        self.threads = cpu_threads.apply(threads)
        self.model: Any = PeftModel.from_pretrained(base, str(adapter)).eval()
        # "aten": transformers as users run it. "auto": the daemon's own CPU linears (hotswap_core.prepack), so
        # the comparison can also be made kernel for kernel; ``packed`` says how many it packed.
        self.packed = 0
        if prepack.use_onednn(cpu_linear, self.device, getattr(torch, dtype)):
            self.packed, _ = prepack.prepack_linears(self.model)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.pad = pad
        # transformers compiles the decode step on its own only on accelerators; on CPU it must be asked to.
        compile_config = CompileConfig(mode="reduce-overhead" if self.device.type == "cuda" else "default")
        compile_config._compile_all_devices = True  # type: ignore[assignment]  # a class attribute, None by default
        self.config = GenerationConfig(
            do_sample=False,
            cache_implementation="static",
            max_cache_len=max_seq_len,
            pad_token_id=pad,
            eos_token_id=None,  # ignore_eos, as the daemon's requests
            compile_config=compile_config,
            disable_compile=not compiled,  # the tiny bench (a test) runs without inductor, as the engine does there
        )

    def batch(self, items: list[tuple[str, int]]) -> int:
        """One padded batch (left padding, as generate wants); returns the tokens the requests asked for."""
        torch = self.torch
        ids = [self.tokenizer.encode(p, add_special_tokens=False) for p, _ in items]
        width = max(len(i) for i in ids)
        input_ids = torch.tensor([[self.pad] * (width - len(i)) + i for i in ids], device=self.device)
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=self.device)
        longest = max(n for _, n in items)
        self.config.max_new_tokens = longest
        with torch.inference_mode():
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=self.config)
        if out.shape[1] != width + longest:
            raise BenchError(f"generate() returned {out.shape[1] - width} new tokens, asked {longest}")
        return sum(n for _, n in items)

    def throughput(self, work: list[tuple[str, int]], batch: int) -> float:
        t0, tokens = time.perf_counter(), 0
        for i in range(0, len(work), batch):
            tokens += self.batch(work[i : i + batch])
        return tokens / (time.perf_counter() - t0)
