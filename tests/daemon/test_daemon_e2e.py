"""End to end: one real ``hotswapd run`` process on the demo assets, real files dropped into its
watched folder, real requests over its Unix socket (our client, the official ``openai`` client, curl).

The tests share one daemon and run in file order; each leaves the daemon serving.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotswapd.client import ClientError
from hotswapd.demo import BROKEN_REASONS, DemoAssets

from ..conftest import run_cli
from .harness import DaemonProcess, drop_adapter, listening_tcp_ports, running_daemon, wait_until, write_config

pytestmark = pytest.mark.slow

SETTLE = 0.3  # harness default
MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="hs-e2e-", dir="/tmp") as d:  # short: AF_UNIX paths < 108 bytes
        yield Path(d)


@pytest.fixture(scope="module")
def daemon(demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]) -> Iterator[DaemonProcess]:
    (workdir / "adapters").mkdir()
    config = write_config(demo_assets, workdir, workdir / "s.sock", **{"server.max_body_bytes": MAX_BODY})
    with running_daemon(config, workdir, cli_env) as d:
        yield d


def _reconfigure(d: DaemonProcess, demo_assets: DemoAssets, workdir: Path, **overrides: Any) -> None:
    """Rewrite the config file and SIGHUP; wait for the daemon to say it reloaded."""
    before = d.log.count("reloaded:")
    write_config(demo_assets, workdir, d.sock, **{"server.max_body_bytes": MAX_BODY, **overrides})
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log.count("reloaded:") > before, 10, "the reload to be logged")


def _records(d: DaemonProcess, version: str) -> list[dict[str, Any]]:
    return [r for r in d.client.get("/v1/adapters")["history"] if r["version"] == version]


def test_alpha_then_bravo_renamed_in(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    status, body, headers = daemon.client.request(
        "POST", "/v1/completions", {"prompt": "Hello =>", "max_tokens": 8, "temperature": 0}
    )
    assert status == 200 and body["choices"][0]["text"].startswith(" alpha"), body
    assert body["adapter"]["version"] == "alpha" and headers["X-Hotswapd-Adapter"].startswith("alpha; sha256=")

    drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-1")
    landed = time.monotonic()
    # The contract: live within settle + 2 s of landing.
    wait_until(lambda: daemon.complete()["adapter"]["version"] == "bravo-1", SETTLE + 2, "bravo-1 to serve")
    assert time.monotonic() - landed <= SETTLE + 2
    answer = daemon.complete()
    assert answer["choices"][0]["text"].startswith(" bravo"), answer
    wait_until(lambda: _records(daemon, "bravo-1"), 5, "the swap to be recorded")  # just after the flip
    adapters = daemon.client.get("/v1/adapters")
    assert adapters["live"]["version"] == "bravo-1" and adapters["standby"]["version"] == "alpha"
    results = {(r["version"], r["result"]) for r in adapters["history"]}
    assert {("alpha", "success"), ("bravo-1", "success")} <= results
    (record,) = _records(daemon, "bravo-1")
    assert set(record["phases_ms"]) >= {"detect", "validate", "load", "stage", "commit"}
    assert adapters["recompilations"] == 0


def test_slow_copy_is_not_swapped_before_complete(
    daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path
) -> None:
    dest = workdir / "adapters" / "slow"
    dest.mkdir()
    shutil.copy(demo_assets.alpha / "adapter_config.json", dest)
    time.sleep(3 * SETTLE)
    weights = (demo_assets.alpha / "adapter_model.safetensors").read_bytes()
    with open(dest / "adapter_model.safetensors", "wb") as f:
        f.write(weights[: len(weights) // 2])
        f.flush()
        time.sleep(3 * SETTLE)  # settled, but shorter than its header says: still arriving
        assert daemon.live() == "bravo-1" and not _records(daemon, "slow")
        f.write(weights[len(weights) // 2 :])
    wait_until(lambda: daemon.live() == "slow", SETTLE + 3, "the completed copy to go live")
    assert daemon.complete()["choices"][0]["text"].startswith(" alpha")
    # The engine serves it from the flip; the swap's thread records it a moment later.
    wait_until(lambda: _records(daemon, "slow"), 5, "the swap to be recorded")
    assert [r["result"] for r in _records(daemon, "slow")] == ["success"]


def test_every_broken_example_is_rejected_with_its_reason(
    daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path
) -> None:
    live = daemon.client.get("/v1/adapters")["live"]
    for reason in BROKEN_REASONS:  # one at a time: of simultaneous arrivals only the newest is tried
        path = drop_adapter(demo_assets.broken[reason], workdir / "adapters", f"broken-{reason}")

        def rejected(path: Path = path) -> dict[str, Any] | None:
            found = [r for r in daemon.client.get("/v1/adapters")["rejected"] if r["path"] == str(path)]
            return found[0] if found else None

        # Truncated or missing files look like a copy in progress until unchanged for rescan_seconds (2 s).
        entry = wait_until(rejected, SETTLE + 6, f"broken-{reason} to be rejected")
        assert entry["reason"] == reason, entry
        now = daemon.client.get("/v1/adapters")["live"]
        assert (now["version"], now["sha256"]) == (live["version"], live["sha256"])
    assert daemon.complete()["adapter"]["version"] == live["version"]


def test_reload_applies_settle_seconds_live(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    pid = daemon.proc.pid
    _reconfigure(daemon, demo_assets, workdir, **{"source.directory.settle_seconds": 2.0})
    assert daemon.client.get("/v1/adapters")["source"]["settle_seconds"] == 2.0
    drop_adapter(demo_assets.bravo, workdir / "adapters", "bravo-slow-settle")
    wait_until(lambda: _records(daemon, "bravo-slow-settle"), 2.0 + 3, "the swap after the longer settle")
    assert daemon.live() == "bravo-slow-settle"
    (record,) = _records(daemon, "bravo-slow-settle")
    assert record["phases_ms"]["detect"] >= 2000 * 0.95  # waited the new settle time, not 0.3 s
    assert daemon.proc.pid == pid and daemon.proc.poll() is None  # no restart
    _reconfigure(daemon, demo_assets, workdir)  # back to the harness's settle time


def test_current_symlink_flip(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    flip = workdir / "flip"
    flip.mkdir()
    shutil.copytree(demo_assets.alpha, flip / "v1")
    shutil.copytree(demo_assets.bravo, flip / "v2")
    os.symlink("v1", flip / "current")
    _reconfigure(daemon, demo_assets, workdir, **{"source.directory.path": str(flip)})
    wait_until(lambda: daemon.live() == "v1", SETTLE + 3, "current -> v1 to go live")
    os.symlink("v2", flip / ".current.new")
    os.replace(flip / ".current.new", flip / "current")  # the atomic flip (git-sync, ConfigMap ..data)
    wait_until(lambda: daemon.live() == "v2", SETTLE + 2, "the flipped target to go live")
    assert daemon.complete()["choices"][0]["text"].startswith(" bravo")


def test_watched_folder_deleted_and_recreated(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    flip = workdir / "flip"
    shutil.rmtree(flip)  # also deletes the live version's files
    wait_until(lambda: not daemon.client.get("/v1/adapters")["source"]["present"], 5, "the folder to be missed")
    wait_until(lambda: "is missing; still serving" in daemon.log, SETTLE + 3, "the source to notice")
    answer = daemon.complete()
    assert answer["adapter"]["version"] == "v2" and answer["choices"][0]["text"].startswith(" bravo")
    flip.mkdir()
    drop_adapter(demo_assets.alpha, flip, "again")
    wait_until(lambda: daemon.live() == "again", SETTLE + 4, "a version in the recreated folder to go live")


def test_openai_client_and_curl(daemon: DaemonProcess) -> None:
    import httpx2  # the openai client's HTTP library (3.x); plain httpx with openai 1.x/2.x
    import openai

    http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.sock)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    done = client.completions.create(model="hotswapd-demo-tiny-llama", prompt="Hello =>", max_tokens=8, temperature=0)
    assert done.choices[0].text.startswith(" alpha") and done.usage is not None and done.usage.completion_tokens > 0
    assert (done.model_extra or {})["adapter"]["version"] == "again"  # as the README shows
    parts = list(
        client.completions.create(model="m", prompt="Hello =>", max_tokens=8, temperature=0, stream=True, seed=1)
    )
    assert "".join(p.choices[0].text for p in parts).startswith(" alpha")
    assert parts[-1].choices[0].finish_reason in ("stop", "length")
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], temperature=0)
    assert chat.choices[0].message.content is not None and chat.choices[0].message.content.startswith(" alpha")
    models = client.models.list()
    assert "hotswapd-demo-tiny-llama" in [m.id for m in models.data]

    out = subprocess.run(
        ["curl", "-sS", "--unix-socket", str(daemon.sock), "http://localhost/v1/completions",
         "-H", "Content-Type: application/json", "-d", '{"prompt": "Hello =>", "max_tokens": 8, "temperature": 0}'],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert json.loads(out.stdout)["choices"][0]["text"].startswith(" alpha")


def test_the_readmes_openai_client_example_verbatim(daemon: DaemonProcess) -> None:
    """The README's ``openai`` example, as a user pastes it, with only the socket path changed."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("#### With the official `openai` Python client", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    assert "/run/hotswapd/hotswapd.sock" in code
    code = code.replace("/run/hotswapd/hotswapd.sock", str(daemon.sock))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(" alpha") and " again\n" in out.stdout, out.stdout  # the text, the live version
    choices = out.stdout.splitlines()[-2:]  # the texts as repr(): one line each
    assert [line.split(" ", 1)[0] for line in choices] == ["0", "1"], out.stdout
    assert all(line.count("{") == 1 and ": -" in line for line in choices), out.stdout  # log-probabilities


def test_what_load_generators_written_for_vllm_send(daemon: DaemonProcess) -> None:
    """``ignore_eos``/``min_tokens`` hold a generation at a fixed length, ``top_k`` narrows sampling, and
    ``GET /health`` is vLLM's liveness path; all through the real openai client and curl."""
    import httpx2
    import openai

    http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.sock)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    held = client.completions.create(
        model="m", prompt="Hello =>", max_tokens=120, temperature=0, extra_body={"ignore_eos": True}
    )
    assert held.usage is not None and held.usage.completion_tokens == 120
    assert held.choices[0].finish_reason == "length"
    free = client.completions.create(model="m", prompt="Hello =>", max_tokens=120, temperature=0)
    assert free.usage is not None and free.usage.completion_tokens < 120  # the demo model does end by itself
    floor = client.completions.create(
        model="m", prompt="Hello =>", max_tokens=120, temperature=0, extra_body={"min_tokens": 100}
    )
    assert floor.usage is not None and floor.usage.completion_tokens >= 100
    greedy = client.completions.create(model="m", prompt="Hello =>", max_tokens=16, temperature=0)
    narrowed = client.completions.create(
        model="m", prompt="Hello =>", max_tokens=16, temperature=1.0, seed=3, extra_body={"top_k": 1}
    )
    assert narrowed.choices[0].text == greedy.choices[0].text
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        client.completions.create(model="m", prompt="x", max_tokens=4, extra_body={"min_tokens": 5})

    curl = ["curl", "-sS", "-w", " %{http_code}", "--unix-socket", str(daemon.sock), "http://localhost/health"]
    out = subprocess.run(curl, capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout == '{"status": "ok"} 200', out.stdout


def test_tokenize_detokenize_models_retrieve_and_version_as_vllm_clients_call_them(daemon: DaemonProcess) -> None:
    """vLLM's ``/tokenize`` and ``/detokenize`` (a count that is the completion's ``usage.prompt_tokens``, for a
    prompt and for chat messages), the openai client's ``models.retrieve``, and ``GET /version``."""
    import httpx2
    import openai

    c, prompt = daemon.client, "Hello => and a longer prompt"
    tokenized = c.post("/tokenize", {"prompt": prompt})
    assert tokenized["count"] == len(tokenized["tokens"]) == daemon.complete(prompt)["usage"]["prompt_tokens"]
    assert tokenized["max_model_len"] == 256 and tokenized["token_strs"] is None  # the demo's model.max_seq_len
    by_ids = c.post("/v1/completions", {"prompt": tokenized["tokens"], "max_tokens": 8, "temperature": 0})
    assert by_ids["choices"][0]["text"] == daemon.complete(prompt)["choices"][0]["text"]  # the same run
    assert c.post("/detokenize", {"tokens": tokenized["tokens"]}) == {"prompt": prompt}
    strs = c.post("/tokenize", {"prompt": prompt, "return_token_strs": True})["token_strs"]
    assert len(strs) == tokenized["count"] and all(isinstance(t, str) and t for t in strs), strs
    empty = c.post("/tokenize", {"prompt": ""})  # an empty prompt runs as one token (BOS)
    assert empty["count"] == daemon.complete("", max_tokens=1)["usage"]["prompt_tokens"] == 1

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    rendered = c.post("/tokenize", {"messages": messages})
    chat = c.post("/v1/chat/completions", {"messages": messages, "max_tokens": 1})
    assert rendered["count"] == chat["usage"]["prompt_tokens"] > tokenized["count"] // 4, (rendered, chat["usage"])
    for path, body, param in (("/detokenize", {"tokens": [10**6]}, "tokens"), ("/tokenize", {"text": "x"}, "prompt")):
        with pytest.raises(ClientError) as err:
            c.post(path, body)
        assert err.value.status == 400 and err.value.body["error"]["param"] == param, err.value.body

    http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.sock)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    base, live = (m.id for m in client.models.list().data)
    assert client.models.retrieve(base).id == base
    adapter = client.models.retrieve(live)
    assert adapter.id == daemon.live() and (adapter.model_extra or {}).get("parent") == base
    with pytest.raises(openai.NotFoundError, match="no model 'no-such-model' here"):
        client.models.retrieve("no-such-model")
    with pytest.raises(ClientError) as err:  # a Hub id has a slash: matched whole, answered as JSON
        c.get("/v1/models/Qwen/Qwen2.5-1.5B-Instruct")
    assert err.value.status == 404 and err.value.code == "model_not_found", err.value.body

    curl = ["curl", "-sS", "--unix-socket", str(daemon.sock), "http://localhost/version"]
    out = subprocess.run(curl, capture_output=True, text=True, timeout=30, check=True)
    from hotswap_core import __version__

    assert json.loads(out.stdout) == {"version": __version__}


def test_n_choices_and_logprobs_through_the_openai_client(daemon: DaemonProcess) -> None:
    """``n`` choices per prompt and each token's log-probabilities with its top alternatives, whole and
    streamed (the same values either way), through the real openai client. A long prompt's choices, which prefill
    it once, answer what the prompt alone does: greedy, and seeded (choice ``j`` as ``seed + j``)."""
    import httpx2
    import openai

    http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.sock)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    whole = client.completions.create(
        model="m", prompt=["Hello =>", "abc"], max_tokens=8, temperature=0, n=2, logprobs=3
    )
    assert [c.index for c in whole.choices] == [0, 1, 2, 3]
    assert whole.choices[0].text == whole.choices[1].text != whole.choices[2].text == whole.choices[3].text
    alone = client.completions.create(model="m", prompt="Hello =>", max_tokens=8, temperature=0, logprobs=3)
    assert alone.usage is not None and whole.usage is not None
    assert whole.usage.prompt_tokens == alone.usage.prompt_tokens + 3  # each prompt once ("abc": 3 bytes, 3 tokens)
    lps = [c.logprobs for c in whole.choices]
    assert whole.usage.completion_tokens == sum(len(lp.tokens or []) for lp in lps if lp is not None)
    lp = lps[0]
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset is not None
    eos = whole.choices[0].finish_reason == "stop"  # no stop strings: the EOS ended it, scored but not shown
    assert "".join(lp.tokens[: len(lp.tokens) - eos]) == whole.choices[0].text
    assert all(t <= 0 for t in lp.token_logprobs)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == chosen == max(top.values()) and len(top) <= 4  # texts may collide (U+FFFD bytes)
    parts = list(client.completions.create(model="m", prompt="Hello =>", max_tokens=8, temperature=0, logprobs=3,
                                           stream=True))  # fmt: skip
    tokens = [t for p in parts if p.choices[0].logprobs for t in p.choices[0].logprobs.tokens or []]
    offsets = [o for p in parts if p.choices[0].logprobs for o in p.choices[0].logprobs.text_offset or []]
    assert "".join(p.choices[0].text for p in parts) == "".join(tokens[: len(tokens) - eos])
    assert offsets == lp.text_offset
    single = alone.choices[0].logprobs  # the same prompt alone (another decode bucket): the same values
    assert single is not None and single.tokens == lp.tokens and single.token_logprobs is not None
    assert single.token_logprobs == pytest.approx(lp.token_logprobs, abs=1e-4)

    seeded = [
        [c.text for c in client.completions.create(model="m", prompt="Hello =>", max_tokens=12, temperature=1.8,
                                                   n=3, seed=5).choices]
        for _ in range(2)
    ]  # fmt: skip
    assert seeded[0] == seeded[1] and len(set(seeded[0])) > 1, seeded  # reproducible, and the choices differ

    long = "The quick brown fox jumps over the lazy dog; " * 3  # 135 tokens: the choices share one prefill
    shared = client.completions.create(model="m", prompt=long, max_tokens=8, temperature=0, n=3, logprobs=1)
    solo = client.completions.create(model="m", prompt=long, max_tokens=8, temperature=0, logprobs=1)
    assert [c.text for c in shared.choices] == [solo.choices[0].text] * 3
    for c in shared.choices:
        assert c.logprobs is not None and solo.choices[0].logprobs is not None
        assert c.logprobs.token_logprobs == pytest.approx(solo.choices[0].logprobs.token_logprobs, abs=1e-4)
    drawn = client.completions.create(model="m", prompt=long, max_tokens=12, temperature=1.8, n=3, seed=11)
    each = [client.completions.create(model="m", prompt=long, max_tokens=12, temperature=1.8, seed=11 + j)
            for j in range(3)]  # fmt: skip
    assert [c.text for c in drawn.choices] == [e.choices[0].text for e in each], "choice j draws what seed + j does"
    assert len({c.text for c in drawn.choices}) > 1

    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(
        model="m", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, n=2
    )  # type: ignore[call-overload]
    content = chat.choices[1].logprobs.content  # type: ignore[union-attr]
    eos = chat.choices[1].finish_reason == "stop"
    shown = content[: len(content) - eos] if content else content
    assert shown is not None and "".join(t.token for t in shown) == chat.choices[1].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert all(bytes(t.bytes or []) == t.token.encode() for t in content)
    none = client.chat.completions.create(model="m", messages=messages, max_tokens=4, logprobs=True)
    assert none.choices[0].logprobs is not None and none.choices[0].logprobs.content is not None
    assert all(t.top_logprobs == [] for t in none.choices[0].logprobs.content)  # top_logprobs left out: none
    streamed: dict[int, list[Any]] = {0: [], 1: []}
    for part in client.chat.completions.create(
        model="m", messages=messages, max_tokens=8, temperature=0, logprobs=True, top_logprobs=2, n=2, stream=True
    ):  # type: ignore[call-overload]
        for choice in part.choices:
            streamed[choice.index] += choice.logprobs.content if choice.logprobs else []
    assert [t.token for t in streamed[1]] == [t.token for t in content]
    assert [t.logprob for t in streamed[1]] == pytest.approx([t.logprob for t in content], abs=1e-4)
    assert [t.token for t in streamed[0]] == [t.token for t in streamed[1]]  # n=2 greedy: the same text


def test_logit_bias_through_the_openai_client(daemon: DaemonProcess) -> None:
    """OpenAI's ``logit_bias``: +100 on a token makes greedy decoding repeat it; -100 bans what greedy said."""
    import httpx2
    import openai

    http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.sock)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    forced = client.completions.create(model="m", prompt="Hello =>", max_tokens=5, temperature=0,
                                       logit_bias={"120": 100}, logprobs=0)  # fmt: skip
    assert forced.choices[0].text == "xxxxx"  # byte 120 of the demo's byte-level vocabulary
    free = client.completions.create(model="m", prompt="Hello =>", max_tokens=1, temperature=0, logprobs=0)
    first = free.choices[0].logprobs.tokens[0]  # type: ignore[index, union-attr]
    assert len(first) == 1  # a byte: its token id is its value
    one = {"prompt": "Hello =>", "max_tokens": 1, "temperature": 0, "logprobs": 1}
    banned = daemon.client.request("POST", "/v1/completions", {**one, "logit_bias": {str(ord(first)): -100}})[1]
    assert banned["choices"][0]["logprobs"]["tokens"][0] != first
    same = daemon.client.request("POST", "/v1/completions", {**one, "logit_bias": {}})[1]
    assert same["choices"][0]["logprobs"]["tokens"][0] == first  # an empty bias changes nothing
    messages = [{"role": "user", "content": "hi"}]
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0,
                                          logit_bias={"121": 100})  # type: ignore[arg-type]  # fmt: skip
    assert chat.choices[0].message.content == "yyy"
    with pytest.raises(openai.BadRequestError, match="outside this model's vocabulary"):
        client.completions.create(model="m", prompt="x", logit_bias={"999999": 1})


def test_echo_scores_prompts_as_lm_eval_asks(daemon: DaemonProcess, demo_assets: DemoAssets) -> None:
    """lm-eval's loglikelihood request (its ``local-completions`` model: token-id prompts, ``echo``, ``logprobs``
    1, ``max_tokens`` 1, temperature 0) through the real openai client: every prompt token after the first gets the
    live version's log-probability as a fresh eager PeftModel computes it. ``max_tokens: 0`` shows the prompt
    alone; a stream shows the same prompt, tokens and offsets as the whole answer."""
    import httpx2
    import openai
    from transformers import AutoTokenizer

    from ..core.factory import eager_logprobs

    http = httpx2.Client(transport=httpx2.HTTPTransport(uds=str(daemon.sock)))
    client = openai.OpenAI(base_url="http://localhost/v1", api_key="unused", http_client=http)
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base)
    texts = ["The quick brown fox => jumps", "Hello => 日本"]
    prompts = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    live = daemon.client.get("/v1/adapters")["live"]
    scored = client.completions.create(
        model="m", prompt=prompts, echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234
    )
    for ids, text, choice in zip(prompts, texts, scored.choices, strict=True):
        lp = choice.logprobs
        assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
        assert len(lp.tokens) == len(ids) + 1 and choice.text.startswith(text)  # the prompt, then one token
        assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # the first token has no context
        want = eager_logprobs(demo_assets.base, Path(live["path"]), ids[:1], ids[1:])  # [len - 1, V]
        got = lp.token_logprobs[1 : len(ids)]
        assert got == pytest.approx([float(want[t, ids[t + 1]]) for t in range(len(ids) - 1)], abs=2e-4)
        greedy = [max(top.values()) == chosen for chosen, top in zip(got, lp.top_logprobs[1 : len(ids)], strict=True)]
        assert greedy == [ids[t + 1] == int(want[t].argmax()) for t in range(len(ids) - 1)]  # lm-eval's is_greedy
        assert lp.text_offset[: len(ids)] == sorted(lp.text_offset[: len(ids)]) and lp.text_offset[-1] == len(text)
    assert scored.model_extra and scored.model_extra["adapter"]["version"] == live["version"]

    alone = client.completions.create(model="m", prompt=texts[0], echo=True, logprobs=0, max_tokens=0)
    assert alone.choices[0].text == texts[0] and alone.choices[0].finish_reason == "length"
    assert alone.usage is not None and alone.usage.completion_tokens == 0
    lp0 = alone.choices[0].logprobs
    assert lp0 is not None and lp0.token_logprobs is not None and len(lp0.token_logprobs) == len(prompts[0])
    assert lp0.token_logprobs[1:] == pytest.approx(scored.choices[0].logprobs.token_logprobs[1:-1], abs=1e-4)  # type: ignore[union-attr]
    plain = client.completions.create(model="m", prompt=texts[1], echo=True, max_tokens=4, temperature=0)
    assert plain.choices[0].text.startswith(texts[1]) and plain.choices[0].logprobs is None

    whole = client.completions.create(model="m", prompt=texts[1], echo=True, logprobs=2, max_tokens=6, temperature=0)
    parts = list(client.completions.create(model="m", prompt=texts[1], echo=True, logprobs=2, max_tokens=6,
                                           temperature=0, stream=True))  # fmt: skip
    assert parts[0].choices[0].text == texts[1]  # the prompt leads the stream
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    streamed = [p.choices[0].logprobs for p in parts if p.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.tokens or []] == whole.choices[0].logprobs.tokens  # type: ignore[union-attr]
    assert [o for lp in streamed for o in lp.text_offset or []] == whole.choices[0].logprobs.text_offset  # type: ignore[union-attr]
    none = list(client.completions.create(model="m", prompt=texts[0], echo=True, max_tokens=0, stream=True,
                                          stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(p.choices[0].text for p in none if p.choices) == texts[0]
    assert none[-2].choices[0].finish_reason == "length" and none[-1].usage is not None
    assert none[-1].usage.completion_tokens == 0 and none[-1].usage.prompt_tokens == len(prompts[0])

    both = {"model": "m", "prompt": texts, "echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0, "n": 2}
    whole2 = client.completions.create(**both)  # type: ignore[call-overload]
    texts2: dict[int, str] = {}
    entries: dict[int, list[Any]] = {}
    for part in client.completions.create(**both, stream=True):  # type: ignore[call-overload]
        for c in part.choices:
            if c.index not in texts2:
                assert c.text == texts[c.index // 2], "each choice's prompt leads its stream"
            texts2[c.index] = texts2.get(c.index, "") + c.text
            entries.setdefault(c.index, []).extend(c.logprobs.token_logprobs if c.logprobs else [])
    for c in whole2.choices:
        assert texts2[c.index] == c.text and c.text.startswith(texts[c.index // 2])
        assert entries[c.index] == pytest.approx(c.logprobs.token_logprobs, abs=1e-4)  # type: ignore[union-attr]

    empty = client.completions.create(model="m", prompt="", echo=True, logprobs=1, max_tokens=2)
    lp = empty.choices[0].logprobs  # an empty prompt runs as BOS: one prompt token, no score, then two
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs and lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 3
    assert lp.token_logprobs[0] is None


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("POST", "/v1/completions", b"{not json", 400, None),
        ("POST", "/v1/completions", b"[1, 2]", 400, None),
        ("POST", "/v1/completions", b'{"prompt": 5}', 400, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 10000000000000000000000}', 400, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": "8"}', 400, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 400, "temperature"),
        ("POST", "/v1/completions", b'{"prompt": "x", "n": 9}', 400, "n"),  # more choices than rows
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
            400,
            "top_logprobs",
        ),  # without logprobs: true
        ("POST", "/v1/completions", b'{"prompt": "x", "logprobs": 21}', 400, "logprobs"),
        ("POST", "/v1/chat/completions", b'{"messages": "hi"}', 400, "messages"),
        ("POST", "/v1/completions", b'{"prompt": "' + b"x" * MAX_BODY + b'"}', 413, None),
        ("POST", "/v1/completions", b'{"prompt": "\xff\xfe"}', 400, None),
        ("GET", "/v1/nope", None, 404, None),
        ("GET", "/v1/completions", None, 405, None),
        ("POST", "/v1/adapters/swap", b'{"path": "relative/dir"}', 400, "path"),
        ("POST", "/v1/adapters/swap", b'{"path": "/etc"}', 403, "path"),  # outside server.swap_roots
    ],
)
def test_bad_requests_get_openai_shaped_4xx(
    daemon: DaemonProcess, method: str, path: str, body: bytes | None, status: int, param: str | None
) -> None:
    response = daemon.client._open(method, path, None) if body is None else _raw(daemon, method, path, body)
    data = json.loads(response.read())
    assert response.status == status, data
    assert set(data["error"]) >= {"message", "type", "param", "code"} and data["error"]["message"]
    assert data["error"]["param"] == param
    assert "Traceback" not in json.dumps(data)
    assert daemon.complete()["choices"][0]["text"]  # still serving


def _raw(daemon: DaemonProcess, method: str, path: str, body: bytes) -> Any:
    from hotswapd.client import _UnixConnection

    conn = _UnixConnection(str(daemon.sock), 60)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    return conn.getresponse()


def test_admin_verbs_need_an_admin_uid(daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path) -> None:
    _reconfigure(daemon, demo_assets, workdir, **{"source.directory.path": str(workdir / "flip"),
                                                  "server.admin_uids": [os.getuid() + 4242]})  # fmt: skip
    try:
        for path, body in (("/v1/adapters/swap", {"path": str(demo_assets.bravo)}), ("/v1/adapters/rollback", {})):
            with pytest.raises(ClientError) as err:
                daemon.client.post(path, body)
            assert err.value.status == 403 and err.value.code == "forbidden"
        assert daemon.live() == "again"
    finally:
        _reconfigure(daemon, demo_assets, workdir, **{"source.directory.path": str(workdir / "flip")})


def test_client_verbs(daemon: DaemonProcess, demo_assets: DemoAssets, cli_env: dict[str, str]) -> None:
    env = {**cli_env, "HOTSWAPD_SOCKET": str(daemon.sock)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(run_cli(*args), capture_output=True, text=True, timeout=120, env=env)

    status = cli("status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["live"]["version"] == "again"
    swapped = cli("swap", str(demo_assets.bravo), "--json")
    assert swapped.returncode == 0 and json.loads(swapped.stdout)["live"]["version"] == "bravo"
    generated = cli("generate", "Hello =>", "--max-tokens", "8", "--socket", str(daemon.sock))
    assert generated.returncode == 0 and generated.stdout.startswith(" bravo") and "[adapter bravo" in generated.stderr
    streamed = cli("generate", "Hello =>", "--max-tokens", "8", "--stream")
    assert streamed.returncode == 0 and streamed.stdout.startswith(" bravo")
    rejected = cli("swap", str(demo_assets.broken["non_finite"]))
    assert rejected.returncode == 1 and "non_finite" in rejected.stderr
    rolled = cli("rollback")
    assert rolled.returncode == 0 and "live is again" in rolled.stdout
    human = cli("status")
    assert human.returncode == 0 and "live:      again" in human.stdout and "non_finite" in human.stdout
    missing = cli("status", "--socket", str(daemon.sock) + ".nope")
    assert missing.returncode == 3 and "no hotswapd socket" in missing.stderr


def test_refresh_looks_now_and_nothing_but_metrics_listens_on_tcp_by_default(
    daemon: DaemonProcess, demo_assets: DemoAssets, workdir: Path, cli_env: dict[str, str]
) -> None:
    env = {**cli_env, "HOTSWAPD_SOCKET": str(daemon.sock)}
    refreshed = subprocess.run(run_cli("refresh", "--json"), capture_output=True, text=True, timeout=120, env=env)
    assert refreshed.returncode == 0, refreshed.stderr
    answer = json.loads(refreshed.stdout)
    assert answer["source"] == "directory" and answer["live"]["version"] == daemon.live()
    human = subprocess.run(run_cli("refresh"), capture_output=True, text=True, timeout=120, env=env)
    assert human.returncode == 0 and "looked: directory" in human.stdout and "live is" in human.stdout

    # server.listen_tcp is off by default: the metrics listener is the only TCP socket, and it answers the probes.
    metrics_port = int(daemon.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert listening_tcp_ports(daemon.proc.pid) == {metrics_port}
    base = daemon.metrics_url.rsplit("/", 1)[0]
    for path, status in (("/healthz", "ok"), ("/readyz", "ready")):
        with urllib.request.urlopen(base + path, timeout=10) as response:
            assert response.status == 200 and json.loads(response.read())["status"] == status


def test_second_daemon_on_the_live_socket_refuses(daemon: DaemonProcess, cli_env: dict[str, str]) -> None:
    out = subprocess.run(
        run_cli("run", "--config", str(daemon.config)), capture_output=True, text=True, timeout=120, env=cli_env
    )
    assert out.returncode == 3
    assert f"another process is serving on {daemon.sock}" in out.stderr
    assert daemon.complete()["choices"][0]["text"]  # the first one is untouched
