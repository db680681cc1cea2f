"""``model.cpu_linear``: the base model's linears on oneDNN prepacked weights, against ``F.linear`` and eager PEFT."""

from __future__ import annotations

import dataclasses
import gc
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from hotswap_core import prepack
from hotswap_core.errors import EngineError
from hotswap_core.generation import SamplingParams
from hotswap_core.history import History
from hotswap_core.swap import Swapper

from .factory import eager_last_logits, make_adapter

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["Hello =>", "a", "The quick brown fox jumps over the lazy dog =>"]


def _layers() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 384, bias=False), nn.Linear(384, 8))


# Compiled in a process of its own: dynamo's graph counter is process-wide, and the session's engine counts
# every graph compiled after its warm-up as a recompilation of its own.
_COMPILED = """
import torch
from torch import nn
from hotswap_core import prepack

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 384, bias=False), nn.Linear(384, 8))
xs = [torch.randn(b, n, 256) for b, n in ((1, 1), (8, 1), (3, 17))]
with torch.inference_mode():
    want = [model(x) for x in xs]
    count, nbytes = prepack.prepack_linears(model, min_weights=256 * 384)
    assert (count, nbytes) == (2, (256 * 512 + 512 * 384) * 4), (count, nbytes)
    kinds = [type(m).__name__ for m in model]
    assert kinds == ["PackedLinear", "GELU", "PackedLinear", "Linear"], kinds  # 384 x 8 stays
    for x, w in zip(xs, want):
        torch.testing.assert_close(model(x), w, atol=1e-5, rtol=1e-5)
    compiled = torch.compile(model, dynamic=True)
    got = [compiled(x) for x in xs]  # compiles (symbolic shapes)
    with torch.compiler.set_stance("fail_on_recompile"):
        got = [compiled(x) for x in xs]  # the packed op is opaque to dynamo: nothing new to trace
for g, w in zip(got, want):
    torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
print("packed linears equal F.linear, eager and compiled")
"""


def test_packed_linears_compute_what_f_linear_computes_eager_and_compiled(tmp_path: Path) -> None:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    done = subprocess.run([sys.executable, "-c", _COMPILED], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "packed linears equal F.linear, eager and compiled" in done.stdout


def test_a_packed_weight_is_freed_with_its_module() -> None:
    model = _layers()
    prepack.prepack_linears(model, min_weights=1)
    handles = [m.handle for m in model if isinstance(m, prepack.PackedLinear)]
    assert len(handles) == 3 and all(h in prepack._PACKED for h in handles)
    del model
    gc.collect()
    assert not any(h in prepack._PACKED for h in handles)


def test_which_models_are_packed() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert prepack.use_onednn("auto", cpu, torch.float32)
    assert not prepack.use_onednn("auto", cpu, torch.bfloat16)  # auto: float32 only
    if torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert prepack.use_onednn("onednn", cpu, torch.bfloat16)
    else:  # this CPU: a clear refusal at load, not a failing first step
        with pytest.raises(EngineError, match="no oneDNN bfloat16 support"):
            prepack.use_onednn("onednn", cpu, torch.bfloat16)
    assert not prepack.use_onednn("aten", cpu, torch.float32)
    assert not prepack.use_onednn("onednn", cuda, torch.bfloat16)  # CUDA: cuBLAS, never packed
    with pytest.raises(EngineError, match=r"not torch\.float16"):
        prepack.use_onednn("onednn", cpu, torch.float16)


def test_an_unknown_cpu_linear_is_a_config_error(tmp_path: Path) -> None:
    from hotswap_core.config import config_from_dict
    from hotswap_core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model\.cpu_linear: expected one of 'auto', 'onednn', 'aten', got 'mkl'"):
        config_from_dict({"model": {"path": "base", "cpu_linear": "mkl"}}, tmp_path)


@pytest.fixture(scope="module")
def packed_engine(demo_config: Any, monkeypatch_module: pytest.MonkeyPatch) -> Any:
    """The demo model with every linear packed (its matrices are below ``MIN_WEIGHTS``), eager for speed: the
    compiled op is covered above, and by the geometry bench's recompilation count."""
    from hotswap_core.engine import Engine

    monkeypatch_module.setattr(prepack, "MIN_WEIGHTS", 1)
    model = dataclasses.replace(
        demo_config.model,
        cpu_linear="onednn",
        compile=dataclasses.replace(demo_config.model.compile, enabled=False),
    )
    eng = Engine(dataclasses.replace(demo_config, model=model))
    eng.load()
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Any:
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_a_packed_engine_serves_each_version_as_eager_peft_does(
    packed_engine: Any, demo_config: Any, demo_assets: Any, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    linears = [m for m in packed_engine.runner.model.modules() if isinstance(m, prepack.PackedLinear)]
    assert len(linears) == 2 * 7 + 1, "every base projection of both layers and the head"
    assert not any(type(m) is nn.Linear for m in packed_engine.runner.model.modules())
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base)
    swapper = Swapper(packed_engine, demo_config.validation, History(None))
    first = make_adapter(demo_assets.base, tmp_path / "r4", r=4, alpha=8, targets=ALL, seed=1)
    second = make_adapter(demo_assets.base, tmp_path / "r8", r=8, alpha=16, targets=ALL[:4], seed=2)
    for adapter in (first, second, first):
        assert swapper.swap(adapter).result == "success"
        want = eager_last_logits(demo_assets.base, adapter, PROMPTS, tokenizer)
        torch.testing.assert_close(packed_engine.last_logits(PROMPTS), want, atol=2e-4, rtol=1e-4)
    answers = packed_engine.generate(["Hello =>"], SamplingParams(max_tokens=6))
    assert answers[0].adapter.version == first.name and answers[0].completion_tokens >= 1
