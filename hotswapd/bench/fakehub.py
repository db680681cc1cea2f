"""A local stand-in for the Hugging Face Hub API: real HTTP on 127.0.0.1, the routes huggingface_hub 2.4.0 calls.

What ``HfApi.model_info`` and ``snapshot_download`` send (read from the library and logged against this server):

* ``GET  /api/models/{repo_id}/revision/{revision}``: repo info; ``sha`` is the commit the revision points to.
  The revision is URL-quoted with ``safe=""`` (``refs%2Fpr%2F1``).
* ``GET  /api/models/{repo_id}/tree/{sha}?recursive=true&expand=false``: the file listing (paths, sizes, LFS info).
  One page; the real Hub pages with a ``Link: <...>; rel="next"`` header.
* ``HEAD /{repo_id}/resolve/{sha}/{path}``: ``X-Repo-Commit``, ``ETag`` (or ``X-Linked-Etag`` and
  ``X-Linked-Size`` for LFS files), ``Content-Length``.
* ``GET  /{repo_id}/resolve/{sha}/{path}``: the bytes; honours ``Range: bytes=N-`` (the client resumes with it).

And what a release pipeline calls to move a branch (``HfApi.create_branch``, ``delete_branch``, ``list_repo_refs``):

* ``POST   /api/models/{repo_id}/branch/{branch}`` with JSON ``{"startingPoint": revision}`` (optional: the
  default branch's head): 409 if the branch exists. Promoting = ``delete_branch`` + ``create_branch(revision=sha)``.
* ``DELETE /api/models/{repo_id}/branch/{branch}``: 404 if there is no such branch.
* ``GET    /api/models/{repo_id}/refs``: branches and tags with their target commits.

Writes are not authenticated: this stand-in serves one test or one benchmark on loopback.

Repos are branch/tag name -> commit sha -> {path: bytes}. Faults apply to the next matching requests, in the order
they were added: ``"500"``, ``"429"`` (with ``Retry-After``), ``"stall"`` (read the request, answer nothing for
``stall_s`` or until ``close()``, then drop the connection) and ``"truncate"`` (declare the full ``Content-Length``,
send a fraction of it, close).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass(frozen=True)
class Seen:
    """One request the stand-in received (``path`` without the query, URL-decoded)."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    at: float  # time.monotonic() when it arrived


@dataclass
class Fault:
    kind: str  # "500" | "429" | "stall" | "truncate"
    times: int
    method: str | None = None
    path: str | None = None  # substring of the decoded path, e.g. "/resolve/" or "/revision/"
    retry_after: str | None = None
    stall_s: float = 30.0
    fraction: float = 0.5  # truncate: share of the declared body actually sent

    def matches(self, method: str, path: str) -> bool:
        return (self.method is None or self.method == method) and (self.path is None or self.path in path)


@dataclass
class _Repo:
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> files
    tags: set[str] = field(default_factory=set)  # which refs are tags (the rest are branches)


class FakeHub:
    """The stand-in. ``with FakeHub() as hub: ... hub.url`` is the ``endpoint`` to give the client."""

    LFS_SUFFIXES = (".safetensors", ".bin")

    def __init__(self) -> None:
        self.repos: dict[str, _Repo] = {}
        self.seen: list[Seen] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._counter = 0
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fakehub", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing.set()  # stalled handlers give up at once
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # ---- what tests call --------------------------------------------------------------------------
    def commit(self, repo_id: str, branch: str, files: dict[str, bytes]) -> str:
        """A new commit on ``branch`` (created if new): its parent's files, updated with ``files``. Returns its sha."""
        with self._lock:
            repo = self.repos.setdefault(repo_id, _Repo())
            parent = repo.refs.get(branch)
            tree = {**(repo.commits[parent] if parent else {}), **files}
            self._counter += 1
            digest = hashlib.sha1(f"{repo_id}:{branch}:{parent}:{self._counter}".encode())
            for name in sorted(tree):
                digest.update(name.encode() + b"\0" + tree[name])
            sha = digest.hexdigest()
            repo.commits[sha], repo.refs[branch] = tree, sha
            return sha

    def tag(self, repo_id: str, name: str, sha: str) -> None:
        """Point tag ``name`` at ``sha`` (moving it if it exists, as ``git tag -f`` would)."""
        with self._lock:
            repo = self.repos[repo_id]
            assert sha in repo.commits, sha
            repo.refs[name] = sha
            repo.tags.add(name)

    def head(self, repo_id: str, ref: str) -> str | None:
        """The commit ``ref`` points to now, or None."""
        with self._lock:
            repo = self.repos.get(repo_id)
            return repo.refs.get(ref) if repo else None

    def fail(
        self,
        kind: str,
        times: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        retry_after: str | None = None,
        stall_s: float = 30.0,
        fraction: float = 0.5,
    ) -> None:
        """Make the next ``times`` requests matching ``method``/``path`` fail with ``kind``."""
        assert kind in ("500", "429", "stall", "truncate"), kind
        with self._lock:
            self._faults.append(Fault(kind, times, method, path, retry_after, stall_s, fraction))

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """Requests received so far, optionally only those with ``method`` and ``path`` in their path."""
        with self._lock:
            return [s for s in self.seen if (method in (None, s.method)) and (path is None or path in s.path)]

    def clear_requests(self) -> None:
        with self._lock:
            self.seen.clear()

    def pending_faults(self) -> int:
        """How many faulty answers are still to be given."""
        with self._lock:
            return sum(f.times for f in self._faults)

    # ---- what the handler calls -------------------------------------------------------------------
    def _record(self, seen: Seen) -> Fault | None:
        with self._lock:
            self.seen.append(seen)
            for fault in self._faults:
                if fault.times > 0 and fault.matches(seen.method, seen.path):
                    fault.times -= 1
                    self._faults = [f for f in self._faults if f.times > 0]
                    return fault
        return None

    def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        with self._lock:
            repo = self.repos.get(repo_id)
            if repo is None:
                return None
            sha = repo.refs.get(revision, revision)
            files = repo.commits.get(sha)
            return (sha, files) if files is not None else None


def _oid(data: bytes) -> str:
    """The git blob id, as the Hub reports it for a file."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as the Hub serves it; every answer has a Content-Length

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._serve()

    def do_HEAD(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        split = urlsplit(self.path)
        path = unquote(split.path)
        headers = {k.lower(): v for k, v in self.headers.items()}
        fault = self.fake._record(Seen(self.command, path, split.query, headers, time.monotonic()))
        if fault is not None and fault.kind == "stall":
            self.fake._closing.wait(fault.stall_s)
            self.close_connection = True
            return
        if fault is not None and fault.kind in ("500", "429"):
            extra = {"Retry-After": fault.retry_after} if fault.retry_after else {}
            message = "Internal Error" if fault.kind == "500" else "Too Many Requests"
            return self._json(int(fault.kind), {"error": message}, extra)
        if self.command in ("POST", "DELETE") or path.endswith("/refs"):
            return self._refs(path)
        route = self._route(split.path)
        if route is None:
            return self._json(404, {"error": f"no route {path}"}, {"X-Error-Code": "EntryNotFound"})
        kind, repo_id, revision, file_path = route
        found = self.fake._lookup(repo_id, revision)
        if found is None:
            code = "RepoNotFound" if repo_id not in self.fake.repos else "RevisionNotFound"
            return self._json(404, {"error": f"{code}: {repo_id}@{revision}"}, {"X-Error-Code": code})
        sha, files = found
        if kind == "info":
            siblings = [{"rfilename": name} for name in sorted(files)]
            return self._json(200, {"id": repo_id, "sha": sha, "private": False, "siblings": siblings}, {}, fault)
        if kind == "tree":
            return self._json(200, [self._entry(name, files[name]) for name in sorted(files)], {}, fault)
        if file_path not in files:
            return self._json(
                404, {"error": "entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}
            )
        self._file(sha, file_path, files[file_path], fault)

    def _refs(self, path: str) -> None:
        """Branch create/delete and the refs listing (``api/models/{ns}/{name}/branch/{branch}`` or ``.../refs``)."""
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        parts = path.strip("/").split("/")
        if parts[:2] != ["api", "models"] or len(parts) < 5:
            return self._json(404, {"error": f"no route {path}"}, {})
        repo_id = f"{parts[2]}/{parts[3]}"
        fake = self.fake
        with fake._lock:
            repo = fake.repos.get(repo_id)
            if repo is None:
                return self._json(404, {"error": f"RepoNotFound: {repo_id}"}, {"X-Error-Code": "RepoNotFound"})
            if parts[4:] == ["refs"] and self.command == "GET":

                def ref(name: str, kind: str) -> dict[str, str]:
                    return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": repo.refs[name]}

                listing = {
                    "branches": [ref(n, "heads") for n in sorted(repo.refs) if n not in repo.tags],
                    "tags": [ref(n, "tags") for n in sorted(repo.tags)],
                    "converts": [],
                    "pullRequests": [],
                }
                return self._json(200, listing, {})
            if len(parts) != 6 or parts[4] != "branch":
                return self._json(404, {"error": f"no route {path}"}, {})
            branch = parts[5]
            if self.command == "DELETE":
                if branch not in repo.refs or branch in repo.tags:
                    return self._json(404, {"error": f"Invalid rev id: {branch}"}, {"X-Error-Code": "RevisionNotFound"})
                del repo.refs[branch]
                return self._json(200, {}, {})
            if branch in repo.refs:
                return self._json(409, {"error": f"Reference already exists: refs/heads/{branch}"}, {})
            start = json.loads(body or b"{}").get("startingPoint") or "main"
            sha = repo.refs.get(start, start)
            if sha not in repo.commits:
                return self._json(400, {"error": f"Invalid rev id: {start}"}, {"X-Error-Code": "RevisionNotFound"})
            repo.refs[branch] = sha
            return self._json(200, {}, {})

    @staticmethod
    def _route(raw_path: str) -> tuple[str, str, str, str] | None:
        """(kind, repo_id, revision, file path) of a request path; repo ids are ``namespace/name``."""
        parts = [unquote(p) for p in raw_path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo_id, kind = f"{parts[2]}/{parts[3]}", "info" if parts[4] == "revision" else "tree"
            return kind, repo_id, parts[5], "/".join(parts[6:])
        if len(parts) >= 5 and parts[2] == "resolve":
            return "file", f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:])
        return None

    def _entry(self, name: str, data: bytes) -> dict[str, object]:
        entry: dict[str, object] = {"type": "file", "path": name, "size": len(data), "oid": _oid(data)}
        if name.endswith(FakeHub.LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _file(self, sha: str, name: str, data: bytes, fault: Fault | None) -> None:
        lfs = name.endswith(FakeHub.LFS_SUFFIXES)
        etag = hashlib.sha256(data).hexdigest() if lfs else _oid(data)
        start, status = 0, 200
        byte_range = self.headers.get("Range", "")
        if byte_range.startswith("bytes=") and byte_range.endswith("-"):
            start, status = int(byte_range[6:-1]), 206
            if start >= len(data):
                return self._json(416, {"error": "range not satisfiable"}, {"Content-Range": f"bytes */{len(data)}"})
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("X-Repo-Commit", sha)
        self.send_header("ETag", f'"{etag}"')
        if lfs:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if self.command == "GET":
            self._body(body, fault)

    def _json(self, status: int, payload: object, headers: dict[str, str], fault: Fault | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self._body(body, fault)

    def _body(self, body: bytes, fault: Fault | None) -> None:
        if fault is not None and fault.kind == "truncate":
            body = body[: int(len(body) * fault.fraction)]
            self.close_connection = True
        self.wfile.write(body)
