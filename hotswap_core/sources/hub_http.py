"""The Hub source's HTTP plumbing: capped timeouts on huggingface_hub's shared client, no progress bars, the
endpoint and token a config names, and a failure's 429 ``Retry-After`` and one-line description."""

from __future__ import annotations

import os
import time
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import httpx2
from huggingface_hub import constants, get_session
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import tqdm as hf_tqdm

from hotswap_core.config import HubSourceConfig
from hotswap_core.errors import SourceError


class TimeoutCap:
    """httpx request hook on the library's shared client: caps each timeout of one repo's requests."""

    def __init__(self) -> None:
        self.prefixes: tuple[str, ...] = ()
        self.seconds = 10.0

    def __call__(self, request: httpx2.Request) -> None:
        if str(request.url).startswith(self.prefixes):
            old = request.extensions.get("timeout") or {}
            request.extensions["timeout"] = {
                k: self.seconds if old.get(k) is None else min(old[k], self.seconds)
                for k in ("connect", "read", "write", "pool")
            }

    def arm(self, prefixes: tuple[str, ...], seconds: float) -> None:
        """Attach to the shared client, again after the library replaced it (it does on a connection error)."""
        self.prefixes, self.seconds = prefixes, seconds
        self._set(attached=True)

    def detach(self) -> None:
        self._set(attached=False)

    def _set(self, *, attached: bool) -> None:
        session = get_session()
        hooks = session.event_hooks
        if (self in hooks["request"]) != attached:
            # New lists rather than append()/remove(): another thread may be iterating the old one.
            others = [h for h in hooks["request"] if h is not self]
            session.event_hooks = {"request": [*others, self] if attached else others, "response": hooks["response"]}


class Quiet(hf_tqdm):  # type: ignore[misc]
    """No progress bars in a daemon's log."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)


def endpoint_of(config: HubSourceConfig) -> str:
    return (config.endpoint or constants.ENDPOINT).rstrip("/")


def token_of(config: HubSourceConfig) -> str | bool:
    """``token_file`` (read at each poll, so a rotated token is picked up), else ``$HF_TOKEN``, else none (False:
    not even the token ``hf auth login`` saved for the user)."""
    if config.token_file:
        try:
            token = Path(config.token_file).read_text().strip()
        except OSError as exc:
            raise SourceError(f"cannot read token_file {config.token_file}: {exc.strerror or exc}") from exc
        if not token:
            raise SourceError(f"token_file {config.token_file} is empty")
        return token
    return os.environ.get("HF_TOKEN", "").strip() or False


def rate_limit(exc: BaseException) -> tuple[bool, float | None]:
    """(a 429?, its Retry-After in seconds: delay-seconds or an HTTP-date), through the causes the library chains."""
    seen: BaseException | None = exc
    while seen is not None and not (isinstance(seen, HfHubHTTPError) and seen.response.status_code == 429):
        seen = seen.__cause__ or seen.__context__
    if seen is None:
        return False, None
    value = seen.response.headers.get("Retry-After", "")
    try:
        return True, max(0.0, float(value))
    except ValueError:
        pass
    try:
        return True, max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return True, None


def describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()  # the library's messages run to several lines (request id, URL)
    return f"{type(exc).__name__}: {lines[0] if lines else ''}".rstrip(": ")
