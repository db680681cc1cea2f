"""On CUDA: bf16, ``compile.mode: reduce-overhead`` (decode replayed as CUDA graphs).

Run with ``python -m pytest -q -m gpu`` on a machine with a GPU (``.ci/gpu-check`` runs these and
``hotswapd bench --quick``). Deselected by default (``-m 'not gpu'`` in pyproject's addopts); skipped
where ``torch.cuda.is_available()`` is false.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from hotswap_core.generation import GenerationRequest, SamplingParams
from hotswap_core.history import History
from hotswap_core.swap import Swapper

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = ["Hello =>", "The quick brown fox =>", "x" * 60, "q"]


@pytest.fixture(scope="module")
def cuda_engine(demo_config: Any) -> Iterator[Any]:
    from hotswap_core.engine import Engine

    m = demo_config.model
    model = dataclasses.replace(m, device="cuda", dtype="bfloat16", compile=dataclasses.replace(m.compile, mode="auto"))
    engine = Engine(dataclasses.replace(demo_config, model=model))
    engine.load()
    engine.warm_up()
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def swapper(cuda_engine: Any, demo_config: Any, tmp_path: Path) -> Swapper:
    return Swapper(cuda_engine, demo_config.validation, History(str(tmp_path / "state")))


def _eager_logits(base: Path, adapter: Path | None, tokenizer: Any) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16).cuda().eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    rows = []
    with torch.inference_mode():
        for p in PROMPTS:
            ids = torch.tensor([tokenizer.encode(p, add_special_tokens=False)], device="cuda")
            rows.append(model(input_ids=ids).logits[0, -1].float().cpu())
    return torch.stack(rows)


def _cudagraph_counters() -> tuple[int, int]:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["cudagraph_skips"]), int(
        counters["inductor"]["cudagraph_recorded_non_static_inputs"]
    )


def test_auto_mode_is_cuda_graphs_in_bf16(cuda_engine: Any) -> None:
    assert (cuda_engine.mode, cuda_engine.dtype) == ("reduce-overhead", torch.bfloat16)
    assert _cudagraph_counters()[0] == 0, "inductor skipped CUDA graphs for the decode step"


def test_equivalent_to_eager_peft(cuda_engine: Any, swapper: Swapper, demo_assets: Any) -> None:
    for adapter in (demo_assets.alpha, demo_assets.bravo):
        assert swapper.swap(adapter).result in ("success", "unchanged")
        got = cuda_engine.last_logits(PROMPTS)
        want = _eager_logits(demo_assets.base, adapter, cuda_engine.tokenizer)
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.03 * scale, adapter.name
        assert (got.argmax(-1) == want.argmax(-1)).float().mean().item() >= 0.75


def test_hundred_swaps_no_recompile_no_rerecording(cuda_engine: Any, swapper: Swapper, demo_assets: Any) -> None:
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    reference = {}
    for adapter in (demo_assets.alpha, demo_assets.bravo):
        swapper.swap(adapter)
        reference[adapter.name] = [r.token_ids for r in cuda_engine.generate(PROMPTS, params)]
    before = _cudagraph_counters()
    torch.compiler.set_stance("fail_on_recompile")
    try:
        for i in range(100):
            adapter = (demo_assets.alpha, demo_assets.bravo)[i % 2]
            futures = [cuda_engine.submit(GenerationRequest(p, params)) for p in PROMPTS[: 1 + i % len(PROMPTS)]]
            assert swapper.swap(adapter).result == "success"
            for p, f in zip(PROMPTS, futures, strict=False):
                res = f.result(60)
                assert res.token_ids == reference[res.adapter.version][PROMPTS.index(p)]
    finally:
        torch.compiler.set_stance("default")
    assert cuda_engine.recompilations == 0
    assert _cudagraph_counters() == before, "CUDA graphs were skipped or re-recorded during the swaps"


def test_logprobs_read_from_the_replayed_graph(cuda_engine: Any, swapper: Swapper, demo_assets: Any) -> None:
    """Log-probabilities come from the decode graph's output before the next replay overwrites it: each entry
    is a fresh eager bf16 PeftModel's log-softmax at that position (teacher forcing), for a request beside rows
    that do not ask, whose tokens stay those of a run without it, on both adapters, without a recompile.
    (Written without a GPU to run it on: see the README.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    asking = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=3)
    plain = SamplingParams(max_tokens=12, ignore_eos=True)
    for adapter in (demo_assets.alpha, demo_assets.bravo):
        assert swapper.swap(adapter).result in ("success", "unchanged")
        before = [r.token_ids for r in cuda_engine.generate(PROMPTS, plain)]
        torch.compiler.set_stance("fail_on_recompile")
        try:
            requests = [GenerationRequest(p, asking if i == 1 else plain) for i, p in enumerate(PROMPTS)]
            results = [f.result(60) for f in cuda_engine.submit_group(requests)]
        finally:
            torch.compiler.set_stance("default")
        assert [r.token_ids for i, r in enumerate(results) if i != 1] == [t for i, t in enumerate(before) if i != 1]
        res = results[1]
        assert res.logprobs is not None and len(res.logprobs) == 12
        model: Any = AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.bfloat16).cuda()
        model = PeftModel.from_pretrained(model, adapter).eval()
        prompt = cuda_engine.tokenizer.encode(PROMPTS[1], add_special_tokens=False)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([prompt + list(res.token_ids)], device="cuda")).logits[0].float()
        want = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) + 11], dim=-1).cpu()  # [12, V]
        for t, e in enumerate(res.logprobs):
            assert e.logprob == e.top[0][1] <= 0 and len(e.top) == 3  # greedy; bf16 ties: the value, not the id
            assert abs(e.logprob - float(want[t, e.token_id])) <= 0.1, (adapter.name, t)  # bf16 vs bf16 eager


def test_prompt_logprobs_from_the_compiled_prefill(cuda_engine: Any, swapper: Swapper, demo_assets: Any) -> None:
    """``echo`` with ``logprobs``: the compiled prefill's hidden states, through the head run eagerly on the row's
    slot, score each prompt token as a fresh eager bf16 PeftModel does, without a recompile. (Written without a
    GPU to run it on: see the README.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert swapper.swap(demo_assets.bravo).result in ("success", "unchanged")
    params = SamplingParams(max_tokens=1, prompt_logprobs=2, logprobs=1)
    torch.compiler.set_stance("fail_on_recompile")
    try:
        results = cuda_engine.generate(PROMPTS, params)
    finally:
        torch.compiler.set_stance("default")
    model: Any = AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.bfloat16).cuda()
    model = PeftModel.from_pretrained(model, demo_assets.bravo).eval()
    for prompt, res in zip(PROMPTS, results, strict=True):
        ids = cuda_engine.tokenizer.encode(prompt, add_special_tokens=False)
        assert res.prompt_logprobs is not None and len(res.prompt_logprobs) == len(ids) - 1
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device="cuda")).logits[0].float()
        want = torch.log_softmax(logits[:-1], dim=-1).cpu()  # position t scores ids[t + 1]
        for t, (logprob, top) in enumerate(res.prompt_logprobs):
            assert abs(logprob - float(want[t, ids[t + 1]])) <= 0.1, (prompt, t)  # bf16 vs bf16 eager
            assert len(top) == 2 and top[0][1] >= top[1][1]


def test_spans_and_chunked_prefill_replay_what_warm_up_recorded(
    cuda_engine: Any, swapper: Swapper, demo_assets: Any
) -> None:
    """A 240-token generation moves through every attention span (64, 128, 256: a CUDA graph each, recorded during
    warm-up) while a 200-token prompt is prefilled in chunks of 64, without a recompile or a skipped or re-recorded
    graph; the chunked prompt's next-token logits are a fresh eager bf16 PeftModel's. (Not run: no GPU yet.)"""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert cuda_engine.spans == (64, 128, 256) and cuda_engine.runner.prefill_chunk == 64
    assert swapper.swap(demo_assets.alpha).result in ("success", "unchanged")
    prompt = ("The quick brown fox jumps over the lazy dog. " * 5)[:200]
    before = _cudagraph_counters()
    torch.compiler.set_stance("fail_on_recompile")
    try:
        running = cuda_engine.submit(GenerationRequest("ab", SamplingParams(max_tokens=240, ignore_eos=True)))
        got = cuda_engine.last_logits([prompt])[0]
        assert running.result(120).completion_tokens == 240
    finally:
        torch.compiler.set_stance("default")
    assert cuda_engine.recompilations == 0
    assert _cudagraph_counters() == before, "CUDA graphs were skipped or re-recorded"
    model: Any = AutoModelForCausalLM.from_pretrained(demo_assets.base, dtype=torch.bfloat16).cuda().eval()
    model = PeftModel.from_pretrained(model, demo_assets.alpha).eval()
    with torch.inference_mode():
        ids = torch.tensor([cuda_engine.tokenizer.encode(prompt, add_special_tokens=False)], device="cuda")
        want = model(input_ids=ids).logits[0, -1].float().cpu()
    assert (got - want).abs().max().item() <= 0.03 * want.abs().max().item()
    assert int(got.argmax()) == int(want.argmax())
