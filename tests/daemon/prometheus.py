"""A real Prometheus server (Debian's ``prometheus``) scraping static targets every second, with rule files,
answering PromQL over its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from .harness import free_port, wait_until


class Prometheus:
    """``targets``: (``host:port``, extra labels) scraped as job ``hotswapd`` every ``scrape_interval``."""

    def __init__(
        self,
        work: Path,
        targets: Sequence[tuple[str, dict[str, str]]],
        rule_files: Sequence[Path] = (),
        scrape_interval: str = "1s",
    ) -> None:
        binary = shutil.which("prometheus")
        assert binary, "the prometheus server is not installed (Debian package prometheus; .ci/system-packages)"
        work.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {
                    "job_name": "hotswapd",
                    "static_configs": [{"targets": [address], "labels": labels} for address, labels in targets],
                }
            ],
        }
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        self._log = open(work / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.log_path = work / "prometheus.log"
        self.proc = subprocess.Popen(
            [binary, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_until(self._ready, 60, "Prometheus to be ready", interval=0.2)

    def _ready(self) -> bool:
        assert self.proc.poll() is None, self.log_path.read_text(errors="replace")[-3000:]
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (OSError, urllib.error.HTTPError):
            return False

    def api(self, path: str, **params: str) -> Any:
        """``data`` of one API answer; a PromQL error fails with Prometheus's own message."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read())
        assert body["status"] == "success", f"{params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector: [{"metric": {...}, "value": [t, "v"]}, ...]."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def values(self, expr: str, by: str) -> dict[str, float]:
        """An instant query as {label ``by``: value}."""
        return {r["metric"].get(by, ""): float(r["value"][1]) for r in self.query(expr)}

    def wait(self, expr: str, timeout: float, what: str) -> list[dict[str, Any]]:
        """Wait until ``expr`` returns a non-empty vector (write the condition into the PromQL)."""
        return wait_until(lambda: self.query(expr), timeout, f"{what} (PromQL: {expr})", interval=0.25)

    def stop(self) -> int:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        return int(self.proc.returncode)
