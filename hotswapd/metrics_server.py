"""The metrics listener (``metrics.listen``): ``/metrics`` for Prometheus, and ``/healthz`` and ``/readyz`` for
Kubernetes probes, which reach a pod over TCP and not over its Unix socket.

It runs on its own threads (not the event loop), so a scrape or a probe still answers while the loop is busy;
the answers mean the same as on the socket: ``/healthz`` 200 while the process is up, ``/readyz`` 503 until
warm-up is done and again while draining. Read-only: nothing here changes the daemon.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

# (status code, JSON body): what /readyz answers now.
Readiness = Callable[[], tuple[int, dict[str, Any]]]
StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a slow scraper never holds up the exit


class _IPv6Server(_Server):
    address_family = socket.AF_INET6


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per scrape and probe: not in the journal
        pass


class MetricsServer:
    """Serves ``registry`` and the probes on ``host:port`` (port 0: a free one) until ``shutdown()``."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, readiness: Readiness) -> None:
        metrics_app = make_wsgi_app(registry)

        def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
            path = environ.get("PATH_INFO", "/")
            if path == "/healthz":
                return _json(start_response, 200, {"status": "ok"})
            if path == "/readyz":
                return _json(start_response, *readiness())
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]

        server_class = _IPv6Server if ":" in host else _Server
        self.httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
        self.address: tuple[str, int] = self.httpd.server_address[:2]  # type: ignore[assignment]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hotswapd-metrics", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _json(start_response: StartResponse, status: int, body: dict[str, Any]) -> list[bytes]:
    data = json.dumps(body).encode()
    reason = {200: "OK", 503: "Service Unavailable"}.get(status, "")
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    if status == 503:
        headers.append(("Retry-After", "5"))
    start_response(f"{status} {reason}", headers)
    return [data]
