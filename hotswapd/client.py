"""A small HTTP client over the daemon's Unix socket (stdlib only), behind the CLI's client verbs."""

from __future__ import annotations

import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

DEFAULT_SOCKET = "/run/hotswapd/hotswapd.sock"


def default_socket() -> str:
    return os.environ.get("HOTSWAPD_SOCKET") or DEFAULT_SOCKET


class ClientError(Exception):
    """The daemon could not be reached, or answered with an error."""

    def __init__(self, message: str, status: int | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status, self.body = status, body or {}

    @property
    def code(self) -> str | None:
        error = self.body.get("error")
        return error.get("code") if isinstance(error, dict) else None


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Client:
    def __init__(self, socket_path: str | None = None, timeout: float = 300.0) -> None:
        self.socket_path = socket_path or default_socket()
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict[str, Any] | None) -> http.client.HTTPResponse:
        conn = _UnixConnection(self.socket_path, self.timeout)
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        try:
            conn.request(method, path, body=payload, headers=headers)
            return conn.getresponse()
        except FileNotFoundError as exc:
            raise ClientError(f"no hotswapd socket at {self.socket_path} (is the daemon running? --socket?)") from exc
        except ConnectionRefusedError as exc:
            raise ClientError(f"nothing answers on {self.socket_path} (the daemon is not running)") from exc
        except PermissionError as exc:
            raise ClientError(f"permission denied on {self.socket_path} (socket group / server.socket_mode)") from exc
        except OSError as exc:
            raise ClientError(f"cannot talk to hotswapd on {self.socket_path}: {exc}") from exc

    def request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, headers); raises ClientError for an error status."""
        response = self._open(method, path, body)
        raw = response.read()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError as exc:
            raise ClientError(f"the daemon answered {response.status} with non-JSON: {raw[:200]!r}") from exc
        if response.status >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            message = error.get("message") if isinstance(error, dict) else None
            raise ClientError(message or f"HTTP {response.status}", response.status, data)
        return response.status, data, dict(response.getheaders())

    def get(self, path: str) -> dict[str, Any]:
        return self.request("GET", path)[1]

    def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        return self.request("POST", path, body or {})[1]

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """Server-sent events of a ``stream: true`` request, as parsed JSON chunks (until ``[DONE]``)."""
        response = self._open("POST", path, {**body, "stream": True})
        if response.status >= 400:
            data = json.loads(response.read() or b"{}")
            raise ClientError(data.get("error", {}).get("message", f"HTTP {response.status}"), response.status, data)
        for line in response:
            if not line.startswith(b"data: "):
                continue
            payload = line[6:].strip()
            if payload == b"[DONE]":
                return
            chunk = json.loads(payload)
            if "error" in chunk:
                raise ClientError(chunk["error"].get("message", "stream failed"), 500, chunk)
            yield chunk
        raise ClientError("the stream ended without [DONE]")


# ---- the CLI's client verbs -----------------------------------------------------------------------
EXIT_OK, EXIT_REJECTED, EXIT_CONFIG, EXIT_RUNTIME = 0, 1, 2, 3


def run_client_verb(args: Any) -> int:
    """The client verbs (status, generate, swap, rollback, refresh): print for people, or ``--json`` for scripts."""
    client = Client(args.socket)
    try:
        if args.verb == "status":
            return _status(client, args.json)
        if args.verb == "generate":
            return _generate(client, args)
        if args.verb == "swap":
            return _admin(client, "/v1/adapters/swap", {"path": os.path.abspath(args.path)}, args.json)
        if args.verb == "rollback":
            return _admin(client, "/v1/adapters/rollback", {}, args.json)
        if args.verb == "refresh":
            return _refresh(client, args.json)
    except ClientError as exc:
        if args.json and exc.body:
            print(json.dumps(exc.body))
        else:
            print(f"error: {exc}" + (f" ({exc.code})" if exc.code else ""), file=sys.stderr)
        return EXIT_REJECTED if exc.status == 422 else EXIT_RUNTIME
    raise AssertionError(f"not a client verb: {args.verb}")


def _status(client: Client, as_json: bool) -> int:
    try:
        ready = client.get("/readyz")
    except ClientError as exc:
        if exc.status != 503:  # 503: starting or draining, still worth showing
            raise
        ready = exc.body
    adapters = client.get("/v1/adapters")
    if as_json:
        print(json.dumps({"ready": ready.get("status") == "ready", **adapters}))
        return EXIT_OK
    live, standby, src = adapters["live"], adapters["standby"], adapters["source"]
    print(f"hotswapd on {client.socket_path}: {ready.get('status', '?')}")
    since = _when(live["since"])
    print(f"  live:      {live['version']}  sha256 {live['sha256'][:12]}  ({live['source']}, since {since})")
    print(f"  standby:   {standby['version']}  sha256 {standby['sha256'][:12]}")
    where = src.get("path", "")
    print(f"  source:    {src['kind']} {where}" + ("" if src.get("present", True) else "  (missing)"))
    print(f"  recompilations after warm-up: {adapters['recompilations']}")
    if adapters["history"]:
        print("  recent swaps:")
        for r in adapters["history"][:10]:
            phases = " ".join(f"{k} {v:.1f}ms" for k, v in r["phases_ms"].items())
            why = f" {r['reason']}" if r["reason"] else ""
            print(f"    {_when(r['finished_at'])}  {r['version']:<20} {r['result']}{why}  {phases}")
    if adapters["rejected"]:
        print("  rejected candidates (not retried until their content changes):")
        for r in adapters["rejected"][:10]:
            print(f"    {r['path']}: {r['reason']}: {r['message']}")
    superseded = adapters.get("superseded") or []  # an older daemon has no such list
    if superseded:
        print(f"  superseded (a newer version won the same look; {len(superseded)} most recent):")
        for s in superseded[:5]:
            print(f"    {_when(s['at'])}  {s['version']:<20} by {s['by']}")
        if len(superseded) > 5:
            print(f"    ... and {len(superseded) - 5} more (GET /v1/adapters)")
    return EXIT_OK


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def _generate(client: Client, args: Any) -> int:
    body = {"prompt": args.prompt, "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.stream:
        adapter = None
        for chunk in client.stream("/v1/completions", body):
            if args.json:
                print(json.dumps(chunk), flush=True)
                continue
            adapter = chunk.get("adapter", adapter)
            sys.stdout.write(chunk["choices"][0]["text"])
            sys.stdout.flush()
        if not args.json:
            print(f"\n[adapter {adapter['version'] if adapter else '?'}]", file=sys.stderr)
        return EXIT_OK
    answer = client.post("/v1/completions", body)
    if args.json:
        print(json.dumps(answer))
    else:
        print(answer["choices"][0]["text"])
        print(
            f"[adapter {answer['adapter']['version']}, {answer['usage']['completion_tokens']} tokens]", file=sys.stderr
        )
    return EXIT_OK


def _refresh(client: Client, as_json: bool) -> int:
    answer = client.post("/v1/adapters/refresh", {})
    if as_json:
        print(json.dumps(answer))
        return EXIT_OK
    if answer["source"] == "hub":
        found = f"at {answer['sha']}" if answer["sha"] else "not reached"
        print(f"looked: hub {answer['result']} ({found})" + (f": {answer['error']}" if answer["error"] else ""))
    else:
        print(f"looked: {answer['source']}")
    if answer["offered"]:
        print(f"  offered {answer['offered']}")
    print(f"live is {answer['live']['version']} (sha256 {answer['live']['sha256'][:12]})")
    return EXIT_OK if answer["result"] not in ("error", "rate_limited") else EXIT_RUNTIME


def _admin(client: Client, path: str, body: dict[str, Any], as_json: bool) -> int:
    answer = client.post(path, body)
    if as_json:
        print(json.dumps(answer))
        return EXIT_OK
    r = answer["record"]
    phases = ", ".join(f"{k} {v:.1f} ms" for k, v in r["phases_ms"].items())
    stall = f", stall {r['stall_us']:.0f} us" if r["stall_us"] is not None else ""
    print(f"{r['result']}: live is {answer['live']['version']} (sha256 {answer['live']['sha256'][:12]}){stall}")
    if phases:
        print(f"  {phases}")
    return EXIT_OK
