"""One repo's downloads in a Hugging Face cache, and their garbage collection.

What huggingface_hub 2.4.0 writes for a repo (``snapshot_download(cache_dir=...)``)::

    cache/models--org--name/blobs/<etag>                       the files' bytes, shared by content between commits
    cache/models--org--name/blobs/<etag>.<8 hex>.incomplete    a download in flight (or one killed midway)
    cache/models--org--name/snapshots/<sha>/<path> -> ../../blobs/<etag>
    cache/models--org--name/refs/<revision>                    a branch or tag -> sha (only when not asked by sha)
    cache/models--org--name/trees/<sha>.json (and *.tmp)       the commit's file listing
    cache/.locks/models--org--name/<etag>.lock                 flock(2) held while <etag> is downloaded and linked

Why not ``scan_cache_dir`` + ``delete_revisions``: the scan walks every repo of the cache (a shared
``$HF_HUB_CACHE`` may hold hundreds); a repo it finds "corrupted" (a ref to a commit whose snapshot is gone,
a broken link: what an interrupted download or a crash leaves) is only reported, so nothing of it can be
deleted; the strategy never deletes a blob no snapshot links to, nor ``trees/``, lock or ``.incomplete`` files;
and it takes no lock, so it would delete a blob another process is downloading or linking right now.
``collect`` touches one repo's folder (and its lock folder) only, and skips every blob whose download lock
another process holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.file_download import repo_folder_name

log = logging.getLogger("hotswapd.source.hub")


@dataclass(frozen=True)
class Collected:
    """What one ``collect`` deleted: snapshot folders, files (blobs, partial downloads, listings, refs, locks),
    and the bytes those held."""

    snapshots: int = 0
    files: int = 0
    bytes: int = 0


def repo_folder(cache_dir: str | os.PathLike[str], repo_id: str) -> Path:
    """``cache_dir/models--org--name``: where ``repo_id``'s downloads live."""
    return Path(cache_dir) / repo_folder_name(repo_id=repo_id, repo_type="model")


def snapshot_shas(cache_dir: str | os.PathLike[str], repo_id: str) -> set[str]:
    """The commits of ``repo_id`` with a snapshot folder in the cache."""
    return {p.name for p in _entries(repo_folder(cache_dir, repo_id) / "snapshots")}


def kept_commits(chain: list[str], keep_versions: int) -> dict[str, set[str]]:
    """repo_id -> shas: the newest ``keep_versions`` distinct ``repo@sha`` versions of ``chain`` (oldest first);
    entries of another form (the base model, a folder's name) neither count nor are kept."""
    newest: list[str] = []
    for version in reversed(chain):
        repo, at, sha = version.rpartition("@")
        if at and repo and sha and version not in newest:
            newest.append(version)
        if len(newest) >= keep_versions:
            break
    kept: dict[str, set[str]] = {}
    for version in newest:
        repo, _, sha = version.rpartition("@")
        kept.setdefault(repo, set()).add(sha)
    return kept


def collect(cache_dir: str | os.PathLike[str], repo_id: str, keep: Collection[str]) -> Collected:
    """Delete every download of ``repo_id`` in ``cache_dir`` but the commits (shas) in ``keep``: their snapshot
    folders, the blobs no kept snapshot links to, partial downloads, listings and refs of other commits, and the
    lock files of blobs gone. A blob whose download lock is held (another process is fetching it) is left alone.
    Errors on single entries are logged and skipped; the next collect tries again."""
    repo = repo_folder(cache_dir, repo_id)
    locks = Path(cache_dir) / ".locks" / repo.name
    tally = _Tally()
    kept: list[Path] = []
    for snapshot in _entries(repo / "snapshots"):
        if snapshot.name in keep and snapshot.is_dir() and not snapshot.is_symlink():
            kept.append(snapshot)
        else:
            tally.tree(snapshot)
    linked = {_link_target(p) for s in kept for p in s.rglob("*") if p.is_symlink()}
    blobs = repo / "blobs"
    for blob in _entries(blobs):
        if blob in linked:
            continue
        with _unlocked(locks / f"{blob.name.split('.', 1)[0]}.lock") as free:
            if free:
                tally.file(blob)
    for ref in sorted((repo / "refs").rglob("*")) if (repo / "refs").is_dir() else []:
        if ref.is_file() and _read(ref) not in keep:
            tally.file(ref)
    for listing in _entries(repo / "trees"):
        if not (listing.suffix == ".json" and listing.stem in keep):
            tally.file(listing)  # an orphan *.tmp is harmless to delete: its writer ignores a failed rename
    for lock in _entries(locks):
        if lock.suffix == ".lock" and (blobs / lock.stem) not in linked:
            with _unlocked(lock) as free:
                if free:
                    tally.file(lock)
    return Collected(tally.snapshots, tally.files, tally.bytes)


class _Tally:
    def __init__(self) -> None:
        self.snapshots = self.files = self.bytes = 0

    def file(self, path: Path) -> None:
        try:
            size = path.lstat().st_size if path.is_file() and not path.is_symlink() else 0
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot delete %s from the Hub cache: %s", path, exc.strerror or exc)
            return
        self.files += 1
        self.bytes += size

    def tree(self, path: Path) -> None:
        if not path.is_dir() or path.is_symlink():
            return self.file(path)
        size = sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
        try:
            shutil.rmtree(path)  # links inside are unlinked, never followed
        except OSError as exc:
            log.warning("cannot delete all of %s from the Hub cache: %s", path, exc)
            return
        self.snapshots += 1
        self.bytes += size


@contextlib.contextmanager
def _unlocked(lock: Path) -> Iterator[bool]:
    """Yields True while nobody holds ``lock`` (huggingface_hub's per-blob download lock), holding it meanwhile."""
    try:
        fd = os.open(lock, os.O_RDWR)
    except FileNotFoundError:
        yield True
        return
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _entries(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError:
        return []


def _link_target(link: Path) -> Path:
    """Where a snapshot link points, one hop only: a blob may itself link into a shared store, which is not ours."""
    return Path(os.path.normpath(link.parent / os.readlink(link)))


def _read(ref: Path) -> str:
    try:
        return ref.read_text().strip()
    except OSError:
        return ""
