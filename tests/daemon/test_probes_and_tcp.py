"""What a pod needs from one real ``hotswapd run``: probes on the metrics listener (503 while warming, 200 once
ready), ``server.listen_tcp`` serving inference to the real ``openai`` client while refusing every admin verb,
``hotswapd refresh`` making a Hub source look now, and the gauges fleet routers and alerts read."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import torch

from hotswapd.bench.fakehub import FakeHub
from hotswapd.bench.fleet import adapter_files
from hotswapd.demo import DemoAssets

from ..conftest import run_cli
from .harness import START_TIMEOUT, DaemonProcess, free_port, listening_tcp_ports, metric, wait_until, write_config

pytestmark = pytest.mark.slow
REPO = "acme/support-adapters"


def _sha256(proc: DaemonProcess) -> str:
    return str(proc.client.get("/v1/adapters")["live"]["sha256"])


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_tcp(port: int, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", data=json.dumps(body or {}).encode(), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.fixture(scope="module")
def fleet_member(
    demo_assets: DemoAssets, cli_env: dict[str, str]
) -> Iterator[tuple[DaemonProcess, FakeHub, int, list[tuple[int, str]], str]]:
    """A daemon on a Hub branch polled every 10 minutes (so only refresh makes it look), with listen_tcp on.
    Also yields the /readyz answers the metrics port gave from its first moment until ready."""
    with FakeHub() as hub, tempfile.TemporaryDirectory(prefix="hs-pod-", dir="/tmp") as d:
        work, tcp_port = Path(d), free_port()
        first = hub.commit(REPO, "main", adapter_files(demo_assets.alpha))
        config = write_config(
            demo_assets, work, work / "s.sock",
            **{"adapter.initial": None, "source.kind": "hub", "server.listen_tcp": f"127.0.0.1:{tcp_port}",
               "source.hub": {"repo_id": REPO, "revision": "main", "poll_seconds": 600, "endpoint": hub.url}},
        )  # fmt: skip
        env = {k: v for k, v in cli_env.items() if not k.startswith(("HF_TOKEN", "HF_HUB_CACHE", "HF_HUB_OFFLINE"))}
        proc = DaemonProcess(config, work / "s.sock", work / "d.log", env)
        try:
            url = wait_until(lambda: re.search(r"metrics on (http://\S+)/metrics", proc.log), 120, "the metrics line")[
                1
            ]
            answers: list[tuple[int, str]] = []

            def ready() -> bool:
                assert proc.proc.poll() is None, proc.log[-3000:]
                status, body = _get(url + "/readyz")
                if not answers or answers[-1] != (status, body["status"]):
                    answers.append((status, body["status"]))
                if status == 503:  # alive while warming: liveness must not kill a pod that compiles
                    assert _get(url + "/healthz") == (200, {"status": "ok"})
                return status == 200

            wait_until(ready, START_TIMEOUT, "/readyz on the metrics port to answer 200", interval=0.1)
            yield proc, hub, tcp_port, answers, first
        finally:
            print(proc.log[-3000:])
            assert proc.stop() == 0


def test_readyz_on_the_metrics_port_is_503_while_warming_and_200_once_ready(
    fleet_member: tuple[DaemonProcess, FakeHub, int, list[tuple[int, str]], str],
) -> None:
    proc, _, _, answers, first = fleet_member
    assert answers[0] == (503, "starting") and answers[-1] == (200, "ready"), answers
    base = proc.metrics_url.rsplit("/", 1)[0]
    status, body = _get(base + "/readyz")
    assert status == 200 and body["adapter"]["version"] == f"{REPO}@{first}"  # the same answer as on the socket
    assert body == proc.client.get("/readyz")


def test_listen_tcp_serves_inference_to_the_openai_client_and_refuses_admin_verbs(
    fleet_member: tuple[DaemonProcess, FakeHub, int, list[tuple[int, str]], str], demo_assets: DemoAssets
) -> None:
    proc, _, port, _, first = fleet_member
    metrics_port = int(proc.metrics_url.rsplit(":", 1)[1].split("/")[0])
    assert listening_tcp_ports(proc.proc.pid) == {metrics_port, port}

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    answer = client.completions.create(model=model, prompt="Hello =>", max_tokens=8, temperature=0)
    assert answer.choices[0].text.startswith(" alpha")

    for path, body in (("/v1/adapters/swap", {"path": str(demo_assets.bravo)}), ("/v1/adapters/rollback", None),
                       ("/v1/adapters/refresh", None)):  # fmt: skip
        status, error = _post_tcp(port, path, body)
        assert status == 403 and error["error"]["code"] == "unix_socket_only", (path, error)
    status, error = _get(f"http://127.0.0.1:{port}/v1/adapters")
    assert status == 403 and error["error"]["code"] == "unix_socket_only"
    assert _get(f"http://127.0.0.1:{port}/readyz")[0] == 200
    status, tokenized = _post_tcp(port, "/tokenize", {"prompt": "Hello =>"})  # inference-side: served over TCP
    assert status == 200 and tokenized["count"] == len(tokenized["tokens"]) > 0, tokenized
    assert _get(f"http://127.0.0.1:{port}/v1/models/{model}")[0] == 200
    assert proc.live() == f"{REPO}@{first}"  # nothing the TCP side asked for happened

    # What a fleet router's endpoint picker scrapes on the port it routes to (GIE: the InferencePool target port).
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = response.read().decode()
    for series in ("hotswapd_queue_depth", "hotswapd_inflight_requests", "hotswapd_kv_cache_usage_ratio"):
        assert metric(text, series) is not None, series
    assert metric(text, f'hotswapd_adapter_info{{sha256="{_sha256(proc)}",source="hub",version="{REPO}@{first}"}}') == 1
    assert metric(text, 'hotswapd_requests_total{code="200",endpoint="completions"}') is not None


def test_lm_evaluation_harness_scores_and_generates_over_tcp(
    fleet_member: tuple[DaemonProcess, FakeHub, int, list[tuple[int, str]], str], demo_assets: DemoAssets
) -> None:
    """lm-evaluation-harness's own ``local-completions`` model against ``listen_tcp``, as the README points it:
    each continuation's log-likelihood equals a fresh eager PeftModel's on the live version (alpha), and whether
    it is the greedy continuation agrees; a rolling (perplexity) request and ``generate_until`` run too."""
    import yaml
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoTokenizer

    from ..core.factory import eager_logprobs

    proc, _, port, _, first = fleet_member
    assert proc.live() == f"{REPO}@{first}"  # alpha's files
    max_seq_len = yaml.safe_load(proc.config.read_text())["model"]["max_seq_len"]
    lm = LocalCompletionsAPI(
        base_url=f"http://127.0.0.1:{port}/v1/completions", model="m", tokenizer_backend="huggingface",
        tokenizer=str(demo_assets.base), max_length=max_seq_len,  # as the README says
        num_concurrent=1, max_retries=1, batch_size=4,
    )  # fmt: skip
    pairs = [("Hello =>", " alpha"), ("Hello =>", " bravo"), ("The quick brown fox", " jumps over"), ("日本", "語")]
    got = lm.loglikelihood(
        [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i) for i, pair in enumerate(pairs)]
    )
    tokenizer = AutoTokenizer.from_pretrained(demo_assets.base)
    for (context, continuation), (loglikelihood, is_greedy) in zip(pairs, got, strict=True):
        whole = tokenizer.encode(context + continuation, add_special_tokens=False)
        ctx = tokenizer.encode(context, add_special_tokens=False)
        want = eager_logprobs(demo_assets.base, demo_assets.alpha, ctx, whole[len(ctx) :])  # [continuation, V]
        chosen = want.gather(1, torch.tensor(whole[len(ctx) :])[:, None])
        assert loglikelihood == pytest.approx(float(chosen.sum()), abs=1e-3), (context, continuation)
        assert is_greedy == bool((want.argmax(dim=1) == torch.tensor(whole[len(ctx) :])).all())
    assert [greedy for _, greedy in got] == [True, False, False, False]  # alpha's demo adapter says " alpha"
    long_text = "The quick brown fox jumps over the lazy dog. " * 12  # past max_length: full-length windows
    assert len(tokenizer.encode(long_text, add_special_tokens=False)) > max_seq_len
    rolling = lm.loglikelihood_rolling(
        [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(long_text,), idx=0)]
    )
    assert len(rolling) == 1 and rolling[0] < 0
    text = lm.generate_until(
        [
            Instance(
                request_type="generate_until",
                doc={},
                arguments=("Hello =>", {"until": ["\n"], "max_gen_toks": 8}),
                idx=0,
            )
        ]
    )
    assert text[0].startswith(" alpha"), text


def test_refresh_makes_the_hub_source_look_now_and_head_info_follows(
    fleet_member: tuple[DaemonProcess, FakeHub, int, list[tuple[int, str]], str],
    demo_assets: DemoAssets,
    cli_env: dict[str, str],
) -> None:
    proc, hub, _, _, first = fleet_member

    def head() -> dict[str, str]:
        found = re.findall(r'hotswapd_source_head_info\{state="(\w+)",version="([^"]+)"\} 1', proc.metrics())
        assert len(found) == 1, found
        return {"state": found[0][0], "version": found[0][1]}

    def refresh() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            run_cli("refresh", "--socket", str(proc.sock)), capture_output=True, text=True, timeout=120, env=cli_env
        )

    assert head() == {"state": "live", "version": f"{REPO}@{first}"}
    good = hub.commit(REPO, "main", adapter_files(demo_assets.bravo))
    out = refresh()  # the next poll is 10 minutes away: only the refresh can find it
    assert out.returncode == 0 and f"offered {REPO}@{good}" in out.stdout, out.stdout + out.stderr
    assert proc.live() == f"{REPO}@{good}"  # the answer comes once the look (and the swap it started) is done
    assert head() == {"state": "live", "version": f"{REPO}@{good}"}

    broken = hub.commit(REPO, "main", adapter_files(demo_assets.broken["non_finite"]))
    out = refresh()
    assert out.returncode == 0 and f"offered {REPO}@{broken}" in out.stdout
    assert head() == {"state": "rejected", "version": f"{REPO}@{broken}"}  # a cohort stuck on it alerts on this
    assert proc.live() == f"{REPO}@{good}" and proc.complete()["choices"][0]["text"].startswith(" bravo")
    again = json.loads(
        subprocess.run(run_cli("refresh", "--json", "--socket", str(proc.sock)), capture_output=True, text=True,
                       timeout=120, env=cli_env).stdout
    )  # fmt: skip
    assert again["result"] == "unchanged" and again["offered"] is None and again["sha"] == broken


def test_kv_cache_usage_rises_while_generating_and_falls_back_to_zero(
    fleet_member: tuple[DaemonProcess, FakeHub, int, list[tuple[int, str]], str],
) -> None:
    proc = fleet_member[0]
    usage = "hotswapd_kv_cache_usage_ratio"
    assert metric(proc.metrics(), usage) == 0.0
    stop = threading.Event()

    def generate() -> None:
        while not stop.is_set():  # back to back, so that some scrapes land mid-batch
            proc.complete(prompt="Hello => " * 8, max_tokens=64)

    workers = [threading.Thread(target=generate, daemon=True) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        peak = wait_until(lambda: metric(proc.metrics(), usage), 60, "a scrape to see the running batch's KV cache")
    finally:
        stop.set()
        for w in workers:
            w.join(120)
    assert 0 < peak <= 1
    wait_until(lambda: metric(proc.metrics(), usage) == 0.0, 10, "the gauge back at 0 once idle")
    print(f"[probes] hotswapd_kv_cache_usage_ratio mid-generation: {peak:.4f}", file=sys.__stderr__)
