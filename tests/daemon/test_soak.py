"""Soak: a real ``hotswapd run`` serving 8 concurrent clients while a producer drops a new adapter
version into its watched folder every 500 ms, one in five of them broken in a different way each time.

What must hold for the whole run: no request fails; every response is exactly the greedy output of
an independent eager model (transformers + PEFT) for the version it names, streams included, so no
response is torn between versions; no bad candidate ever goes live, and each one that is tried is
rejected with its reason code; nothing recompiles; the daemon's memory does not keep growing.

CI runs about a minute; ``HOTSWAPD_SOAK_SECONDS=3600`` makes it an hour. ``pytest -s`` shows the summary.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import struct
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from hotswapd.client import Client
from hotswapd.demo import BROKEN_REASONS, DemoAssets

from .harness import DaemonProcess, drop_adapter, metric, wait_until, write_config
from .test_metrics import EventFollower, _get

SOAK_SECONDS = float(os.environ.get("HOTSWAPD_SOAK_SECONDS", "60"))
pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.timeout(int(SOAK_SECONDS) + 900)]

# Short settle so a version dropped every 500 ms is tried before the next lands (newest wins).
SETTLE, RESCAN = 0.2, 2.0
DROP_EVERY = 0.5
CATCH_UP_GAP = 0.05  # after a wait for a bad candidate, good ones follow this fast until on schedule
KEEP = 30  # the producer removes older version folders, as a real one would (bounds the folder)
CLIENTS = 8  # half of them stream
MAX_TOKENS = 8
PROMPTS = (
    "Hello =>",
    "What is the capital of France? =>",
    "x =>",
    "2 + 2 =>",
    "The quick brown fox jumps over the lazy dog =>",
    "héllo wörld 🙂 =>",
)
# A copy in progress looks like these two (no config yet; shorter than the header says): the source
# judges them only once unchanged for rescan_seconds, so nothing newer may land before that.
ARRIVING = ("truncated", "missing_file")
OUTSIDE, TOO_LARGE, DELETED = "outside_watched_folder", "too_large", "deleted"
BAD_KINDS = (*BROKEN_REASONS, OUTSIDE, TOO_LARGE, DELETED)
# A folder deleted while (or before) it is read: whichever file the read misses first.
DELETED_REASONS = {"missing_file", "changed", "unreadable", "truncated"}
RSS_SLACK_KB = 64 * 1024
TERMINAL = {"committed", "rejected", "failed", "unchanged"}


@dataclass
class Drop:
    version: str
    kind: str  # "good" or one of BAD_KINDS
    content: str | None  # "alpha" / "bravo": what a response naming it must say; None: must never be live
    landed: float  # time.time()
    gone: float | None = None  # DELETED: time.time() once its folder was removed completely


class Events(EventFollower):
    """The swap-event stream, noticing when it ends: the daemon drops a subscriber 1000 events behind."""

    def __init__(self, sock: Path) -> None:
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._indexed = 0
        self._by_version: dict[str, list[dict[str, Any]]] = {}
        super().__init__(sock)

    def _read(self) -> None:
        try:
            super()._read()
        finally:
            self.ended.set()

    def of(self, version: str) -> list[dict[str, Any]]:
        """The events naming ``version`` so far (indexed as they come: an hour's run has thousands)."""
        with self._lock:
            new = self.events[self._indexed :]
            self._indexed += len(new)
            for e in new:
                self._by_version.setdefault(e["version"], []).append(e)
            return list(self._by_version.get(version, ()))


def _sha256(folder: Path) -> str:
    """The daemon's version identity: sha256 of adapter_config.json followed by the weights."""
    return hashlib.sha256(
        (folder / "adapter_config.json").read_bytes() + (folder / "adapter_model.safetensors").read_bytes()
    ).hexdigest()


@torch.no_grad()
def _references(assets: DemoAssets) -> dict[tuple[str, str], str]:
    """(content, prompt) -> greedy completion by an eager PeftModel, independent of the daemon's engine."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.base)
    refs = {}
    for content, folder in (("alpha", assets.alpha), ("bravo", assets.bravo)):
        base = AutoModelForCausalLM.from_pretrained(assets.base, dtype=torch.float32).eval()
        model = PeftModel.from_pretrained(base, str(folder)).eval()
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=MAX_TOKENS, do_sample=False)  # [1, T + new]
            refs[content, prompt] = tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
    return refs


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


class Producer:
    """Drops v0001, v0002, ... every DROP_EVERY on average; every fifth is the next bad kind in turn.

    After a bad drop it waits until the daemon has started trying it (its ``seen`` event): of
    versions arriving within one settle window only the newest is tried, so without the wait a bad
    one could be passed over. The good drops after the wait catch up with the schedule.
    """

    def __init__(self, assets: DemoAssets, workdir: Path, events: Events, drops: dict[str, Drop]) -> None:
        self.assets, self.events, self.drops = assets, events, drops
        self.watched, self.outside = workdir / "adapters", workdir / "outside"
        self.outside.mkdir()
        self.too_large = workdir / "too-large"
        shutil.copytree(assets.alpha, self.too_large)
        # A header length of 2**40 bytes in a 72-byte file: refused before anything is parsed or allocated.
        (self.too_large / "adapter_model.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{}" * 32)
        self.rng = random.Random(4242)
        self.stop = threading.Event()
        self.in_folder: deque[str] = deque()
        self.missed: list[str] = []  # bad drops not tried within the wait (a later one of the kind must be)
        self.count = 0
        self.first: float | None = None
        self.last = 0.0

    @staticmethod
    def content(i: int) -> str:
        return "alpha" if i % 2 else "bravo"

    def drop(self, version: str, kind: str, content: str | None, put: Callable[[], None]) -> Drop:
        d = self.drops[version] = Drop(version, kind, content, time.time())  # known before any response names it
        put()
        self.count += 1
        self.last = time.monotonic()
        self.first = self.first or self.last
        if kind != DELETED:
            self.in_folder.append(version)
        while len(self.in_folder) > KEEP:
            old = self.watched / self.in_folder.popleft()
            if old.is_symlink():
                old.unlink()
            else:
                shutil.rmtree(old, ignore_errors=True)
        return d

    def good(self, version: str, content: str) -> None:
        src = self.assets.alpha if content == "alpha" else self.assets.bravo
        self.drop(version, "good", content, lambda: drop_adapter(src, self.watched, version))

    def bad(self, version: str, kind: str) -> None:
        watched = self.watched
        if kind == OUTSIDE:
            # A valid adapter, but outside: were the symlink followed, "escape-…" would go live.
            target = self.outside / f"escape-{version}"
            shutil.copytree(self.assets.bravo, target)

            def put() -> None:
                os.symlink(target, watched / f".tmp-{version}")
                os.rename(watched / f".tmp-{version}", watched / version)

            self.drop(version, kind, None, put)
            return
        if kind == DELETED:
            content = self.content(self.count)
            src = self.assets.alpha if content == "alpha" else self.assets.bravo
            # Valid content: it may go live, but only if the daemon read it all before it was deleted.
            d = self.drop(version, kind, content, lambda: drop_adapter(src, watched, version))
            time.sleep(self.rng.uniform(0.05, 0.3))
            shutil.rmtree(watched / version)
            d.gone = time.time()
            return
        src = self.too_large if kind == TOO_LARGE else self.assets.broken[kind]
        self.drop(version, kind, None, lambda: drop_adapter(src, watched, version))
        t0 = time.monotonic()
        limit = SETTLE + (2 * RESCAN if kind in ARRIVING else 0) + 8
        while not any(e["event"] == "seen" for e in self.events.of(version)):
            if self.stop.is_set() or time.monotonic() - t0 > limit:
                self.missed.append(version)
                break
            time.sleep(0.02)

    def run(self) -> None:
        start, i = time.monotonic(), 0
        self.count, self.first = 0, None  # the cadence counts the storm's drops only
        while not self.stop.is_set():
            i += 1
            version = f"v{i:04d}"
            if i % 5 == 0:
                self.bad(version, BAD_KINDS[(i // 5 - 1) % len(BAD_KINDS)])
            else:
                self.good(version, self.content(i))
            due = start + i * DROP_EVERY
            self.stop.wait(max(due - time.monotonic(), CATCH_UP_GAP))


class Clients:
    """CLIENTS threads, half streaming, each checking every answer against the reference output."""

    def __init__(self, sock: Path, refs: dict[tuple[str, str], str], shas: dict[str, str], drops: dict[str, Drop]):
        self.sock, self.refs, self.shas, self.drops = sock, refs, shas, drops
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.served: Counter[str] = Counter()  # version -> responses naming it
        self.failures: list[str] = []
        self.torn: list[str] = []
        self.bad_live: list[str] = []
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(CLIENTS)]

    def _run(self, n: int) -> None:
        client, rng, stream = Client(str(self.sock), timeout=120), random.Random(n), n % 2 == 1
        while not self.stop.is_set():
            prompt = rng.choice(PROMPTS)
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            try:
                if stream:
                    chunks = list(client.stream("/v1/completions", body))
                    adapters = {(c["adapter"]["version"], c["adapter"]["sha256"]) for c in chunks}
                    text = "".join(c["choices"][0]["text"] for c in chunks)
                    if len(adapters) != 1:
                        self.note(self.torn, f"stream for {prompt!r}: chunks name {sorted(adapters)}")
                        continue
                    ((version, sha),) = adapters
                else:
                    status, answer, headers = client.request("POST", "/v1/completions", body)
                    version, sha = answer["adapter"]["version"], answer["adapter"]["sha256"]
                    text = answer["choices"][0]["text"]
                    if status != 200 or headers.get("X-Hotswapd-Adapter") != f"{version}; sha256={sha}":
                        self.note(self.torn, f"{status} {headers.get('X-Hotswapd-Adapter')!r} for {version}")
                        continue
            except Exception as exc:  # anything but a complete 200 answer
                self.note(self.failures, f"{'stream' if stream else 'plain'} {prompt!r}: {exc!r}")
                continue
            self._check(prompt, version, sha, text, "stream" if stream else "plain")

    def _check(self, prompt: str, version: str, sha: str, text: str, kind: str) -> None:
        content = _content(self.drops, version)
        with self.lock:
            self.counts[kind] += 1
            self.served[version] += 1
        if content is None:
            drop = self.drops.get(version)
            self.note(self.bad_live, f"{kind} answer from {version} ({drop.kind if drop else 'never dropped'})")
        elif sha != self.shas[content] or text != self.refs[content, prompt]:
            expected = f"{self.refs[content, prompt]!r} ({content} {self.shas[content][:12]})"
            self.note(self.torn, f"{kind} {prompt!r} on {version} {sha[:12]}: {text!r}, expected {expected}")

    def note(self, where: list[str], what: str) -> None:
        with self.lock:
            where.append(what)


def _content(drops: dict[str, Drop], version: str) -> str | None:
    """What a response naming ``version`` must say; None if no response may name it."""
    if version == "alpha":  # adapter.initial
        return "alpha"
    drop = drops.get(version)
    return drop.content if drop is not None else None


def _outcome(drop: Drop, events: list[dict[str, Any]], listed: str | None) -> tuple[str, list[str]]:
    """What became of one drop ("committed", "unchanged", "rejected:<reason>", "failed", "never tried")
    and what is wrong with that. ``listed``: the reason /v1/adapters lists for its folder, if any."""
    name = f"{drop.version} ({drop.kind})"
    ends = [e for e in events if e["event"] in TERMINAL]
    problems = [f"{name} was tried but has no outcome: {[e['event'] for e in events]}"] if events and not ends else []
    end = ends[-1] if ends else None
    outcome = "never tried" if end is None else end["event"]
    if end is not None and outcome == "rejected":
        outcome = f"rejected:{end['reason']}"
    if outcome == "failed":
        problems.append(f"{name}: swap failed: {end and end['message']}")
    if drop.kind == OUTSIDE:  # refused by the source itself: never offered, so no swap events
        if events:
            problems.append(f"{name} reached the swapper: {[e['event'] for e in events]}")
        if listed is not None:
            outcome = f"rejected:{listed}"
    if drop.kind == "good" and outcome.startswith("rejected"):
        problems.append(f"good {name} was {outcome}: {end and end['message']}")
    elif drop.kind == DELETED:
        # It may go live, but only if the daemon started reading it before the folder was gone.
        if outcome == "committed" and events[0]["ts"] > (drop.gone or 0):
            problems.append(f"{name} went live though its folder was gone before it was tried")
        if outcome.startswith("rejected") and outcome.split(":")[1] not in DELETED_REASONS:
            problems.append(f"{name} was {outcome}: {end and end['message']}")
    elif drop.kind != "good" and outcome not in ("never tried", f"rejected:{drop.kind}"):
        problems.append(f"BAD {name} was {outcome}: {end and end['message']}")
    if drop.content is None and any(e["event"] == "staged" for e in events):
        problems.append(f"BAD {name} was staged")
    return outcome, problems


def test_soak(demo_assets: DemoAssets, cli_env: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix="hs-soak-", dir="/tmp") as tmp:  # short: AF_UNIX paths < 108 bytes
        _soak(demo_assets, Path(tmp), cli_env)


def _soak(assets: DemoAssets, workdir: Path, env: dict[str, str]) -> None:
    (workdir / "adapters").mkdir()
    sock = workdir / "s.sock"
    overrides = {"source.directory.settle_seconds": SETTLE, "source.directory.rescan_seconds": RESCAN}
    d = DaemonProcess(write_config(assets, workdir, sock, **overrides), sock, workdir / "d.log", env)
    try:
        refs = _references(assets)  # while the daemon compiles
        d.wait_ready()
        summary = _storm(d, assets, workdir, refs)
    except BaseException:
        print(d.log[-6000:])
        raise
    finally:
        rc = d.stop()
    assert rc == 0, f"hotswapd exited with {rc}\n{d.log[-4000:]}\n{summary}"


def _storm(d: DaemonProcess, assets: DemoAssets, workdir: Path, refs: dict[tuple[str, str], str]) -> str:
    shas = {"alpha": _sha256(assets.alpha), "bravo": _sha256(assets.bravo)}
    drops: dict[str, Drop] = {}
    events = Events(d.sock)
    producer = Producer(assets, workdir, events, drops)
    clients = Clients(d.sock, refs, shas, drops)

    # Sanity: the daemon's greedy output is the eager reference, for both contents, plain and streamed.
    for content, version in (("alpha", "alpha"), ("bravo", "v0000")):
        if content == "bravo":
            producer.good(version, content)
            wait_until(lambda: d.live() == "v0000", SETTLE + 5, "v0000 (bravo) to go live")
        for prompt in PROMPTS:
            answer = d.complete(prompt, max_tokens=MAX_TOKENS)
            adapter, text = answer["adapter"], answer["choices"][0]["text"]
            assert (adapter["version"], adapter["sha256"], text) == (version, shas[content], refs[content, prompt])
            body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0}
            chunks = list(d.client.stream("/v1/completions", body))
            assert {c["adapter"]["version"] for c in chunks} == {version}
            assert "".join(c["choices"][0]["text"] for c in chunks) == refs[content, prompt]

    # The storm. A monitor samples the daemon's RSS and what /v1/adapters says every second.
    rss: list[tuple[float, int]] = []
    live_seen: Counter[str] = Counter()
    rejected: dict[str, str] = {}  # version (folder name) -> reason, as /v1/adapters lists them
    monitor_stop = threading.Event()

    def monitor() -> None:
        while not monitor_stop.wait(1.0):
            try:
                rss.append((time.monotonic(), _rss_kb(d.proc.pid)))
                adapters = d.client.get("/v1/adapters")
            except Exception as exc:
                clients.note(clients.failures, f"monitor: {exc!r}")
                continue
            live_seen[adapters["live"]["version"]] += 1
            for r in adapters["rejected"]:
                rejected[Path(r["path"]).name] = r["reason"]

    started = time.monotonic()
    workers = [threading.Thread(target=producer.run, daemon=True), threading.Thread(target=monitor, daemon=True)]
    for t in [*clients.threads, *workers]:
        t.start()
    time.sleep(SOAK_SECONDS)
    producer.stop.set()
    clients.stop.set()
    for t in [*clients.threads, workers[0]]:
        t.join(150)
        assert not t.is_alive(), "a client or the producer hangs"
    elapsed = time.monotonic() - started

    # Let whatever the source has started finish: every "seen" gets its outcome.
    def settled() -> bool:
        seen = [e["version"] for e in list(events.events) if e["event"] == "seen"]
        done = Counter(e["version"] for e in list(events.events) if e["event"] in TERMINAL)
        return all(done[v] >= n for v, n in Counter(seen).items())

    wait_until(settled, 60, "every swap the source started to finish")
    time.sleep(1.5)  # one more monitor round, for the last rejections
    monitor_stop.set()
    workers[1].join(10)
    metrics, _ = _get(d.metrics_url)
    recompilations = metric(metrics, "hotswapd_recompilations_total")
    failed_swaps = metric(metrics, 'hotswapd_swaps_total{result="failed"}')
    stream_ended = events.ended.is_set()
    events.close()

    # What became of each drop, from the event stream (complete: the follower joined before v0000).
    problems: list[str] = []
    outcomes: dict[str, str] = {}
    for drop in drops.values():
        outcomes[drop.version], wrong = _outcome(drop, events.of(drop.version), rejected.get(drop.version))
        problems += wrong
    unknown = {e["version"] for e in list(events.events)} - set(drops)
    problems += [f"the swapper tried {v}, which the producer never dropped (a symlink followed?)" for v in unknown]
    problems += [f"/v1/adapters showed {v} live" for v in live_seen if v != "alpha" and _content(drops, v) is None]
    tally = Counter(outcomes.values())
    reasons = {o.split(":")[1]: n for o, n in sorted(tally.items()) if o.startswith("rejected:")}
    deleted = Counter(outcomes[d.version] for d in drops.values() if d.kind == DELETED)
    expected = {f"rejected:{k}" for k in BAD_KINDS if k != DELETED}
    missing_kinds = sorted(o.split(":")[1] for o in expected - set(tally))

    n_plain, n_stream = clients.counts["plain"], clients.counts["stream"]
    third = elapsed / 3
    first = [kb for t, kb in rss if t - started <= third]
    last = [kb for t, kb in rss if t - started >= 2 * third]
    mib = [round(x / 1024) for x in (rss[0][1], rss[-1][1], max(kb for _, kb in rss))] if rss else []
    cadence = (producer.last - (producer.first or 0)) / max(producer.count - 1, 1)
    summary = (
        f"soak {elapsed:.0f}s: requests={n_plain + n_stream} (plain={n_plain}, stream={n_stream}), "
        f"versions served={len(clients.served)}, drops={producer.count} (every {cadence * 1000:.0f} ms on average, "
        f"bad={sum(d.kind != 'good' for d in drops.values())}), "
        f"swaps committed={tally['committed']} unchanged={tally['unchanged']}, rejected by reason={reasons}, "
        f"deleted drops={dict(deleted)}, "
        f"failures={len(clients.failures)}, torn={len(clients.torn)}, bad live={len(clients.bad_live)}, "
        f"recompilations={recompilations:g}, RSS first/last/max={'/'.join(map(str, mib))} MiB"
    )
    print(summary)
    assert not clients.failures, f"{clients.failures[:20]}\n{summary}"
    assert not clients.torn, f"{clients.torn[:20]}\n{summary}"
    assert not clients.bad_live, f"{clients.bad_live[:20]}\n{summary}"
    assert not problems, f"{problems[:30]}\n{summary}"
    assert not missing_kinds, f"no rejection recorded for {missing_kinds} (missed: {producer.missed})\n{summary}"
    assert recompilations == 0 and failed_swaps == 0, summary
    assert not stream_ended, f"the swap-event stream ended early (subscriber dropped?)\n{summary}"
    assert tally["committed"] >= SOAK_SECONDS / 10, f"too few swaps went live\n{summary}"
    assert min(n_plain, n_stream) >= SOAK_SECONDS / 2, f"too few requests\n{summary}"
    # Memory: the highest RSS in the last third against the highest in the first third. Maxima, not
    # single samples or a fitted slope: the allocator's sawtooth and a busy machine make single
    # samples noisy, while a leak keeps raising the peak. 64 MiB is well above the sawtooth seen here
    # (a few MiB) and far below what a leak of a slot, a batch's KV cache or a copy of the adapter
    # per swap would add over a run of this many requests and swaps.
    assert len(first) >= 3 and len(last) >= 3, f"too few RSS samples: {rss}"
    assert max(last) <= max(first) + RSS_SLACK_KB, f"RSS keeps growing: {rss}\n{summary}"
    return summary
