"""Is a version folder complete, still arriving, broken, or reaching outside the watched folder?

Judged from sizes and headers only (the config, the safetensors header; the weights' sha256 only for
a marker that carries a digest), so a look over thousands of folders stays cheap. See the directory
source's docstring for what each state means to the offering rule.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Literal

from hotswap_core.adapter_files import CONFIG_NAME, PICKLE_SUFFIXES, WEIGHTS_NAME, is_inside, open_within
from hotswap_core.config import ValidationConfig
from hotswap_core.errors import AdapterRejected
from hotswap_core.safetensors_header import parse_header

State = Literal["complete", "arriving", "broken", "outside"]
OUTSIDE = "outside_watched_folder"  # the reason code of a refusal (hotswap_core.errors.REASONS)
NO_MARKER = "no marker file"  # the producer has not said "complete": wait for it however long
_MAX_HEADER = ValidationConfig().max_header_bytes
_DIGEST = re.compile(r"(?:sha256:)?([0-9a-fA-F]{64})\b")


def classify(folder: Path, marker: str | None, within: Path | None) -> tuple[State, str]:
    """complete / arriving / broken / outside (see the module docstring), and why. OSError: look again later."""
    if within is not None:
        escape = _escaping_entry(folder, within)
        if escape is not None:
            return "outside", escape
    try:
        return _classify_files(folder, marker, lambda p: open_within(p, within))
    except AdapterRejected as exc:  # a link flipped to point outside since the check above
        if exc.reason != OUTSIDE:
            raise
        return "outside", f"{exc.message}; set source.directory.follow_symlinks: true to allow it"


def _escaping_entry(folder: Path, within: Path) -> str | None:
    """Why ``folder`` is refused if an entry in it resolves outside ``within``, else None."""
    with os.scandir(folder) as it:
        for entry in it:
            if not entry.is_symlink():
                continue  # a plain entry of a folder inside ``within`` is inside it
            target = os.path.realpath(entry.path)
            if not is_inside(target, within):
                return (
                    f"{entry.path} points outside the watched folder (to {target}); the version is refused "
                    "(set source.directory.follow_symlinks: true to allow it)"
                )
    return None


def _classify_files(folder: Path, marker: str | None, opener: Callable[[Path], BinaryIO]) -> tuple[State, str]:
    weights = folder / WEIGHTS_NAME
    if marker and not (folder / marker).is_file():
        return "arriving", f"{NO_MARKER} {marker}"
    has_pickle = any(p.suffix in PICKLE_SUFFIXES and p.is_file() for p in folder.iterdir())
    if not weights.is_file() and not has_pickle:
        return "arriving", f"no {WEIGHTS_NAME} yet"
    if not (folder / CONFIG_NAME).is_file():
        return "arriving", f"no {CONFIG_NAME} yet"
    weights_state, why = _check_weights(weights, opener) if weights.is_file() else ("broken", "pickle weights only")
    if weights_state == "arriving":
        return "arriving", why
    if marker and weights_state == "complete":
        with opener(folder / marker) as f:
            expected = _DIGEST.match(f.read(200).decode("ascii", "replace").strip())
        if expected and expected.group(1).lower() != _sha256(weights, opener):
            return "arriving", f"{WEIGHTS_NAME} does not match the sha256 in {marker} yet"
    try:
        with opener(folder / CONFIG_NAME) as f:
            config = json.loads(f.read(_MAX_HEADER + 1))
    except (ValueError, RecursionError) as exc:
        return "broken", f"{CONFIG_NAME}: {exc}"
    if not isinstance(config, dict):
        return "broken", f"{CONFIG_NAME} is not a JSON object"
    return weights_state, why


def _check_weights(path: Path, opener: Callable[[Path], BinaryIO]) -> tuple[State, str]:
    """Read only the safetensors header: shorter than it says is still arriving, otherwise wrong is broken."""
    with opener(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            return "arriving", f"{path.name} has {size} bytes"
        (header_len,) = struct.unpack("<Q", f.read(8))  # u64 little-endian header length
        if header_len > _MAX_HEADER:
            return "broken", f"{path.name} header of {header_len} bytes"
        if 8 + header_len > size:
            return "arriving", f"{path.name} is shorter than its header"
        raw = f.read(header_len)
    try:
        parse_header(raw, size - 8 - header_len, path)
    except AdapterRejected as exc:
        return ("arriving" if exc.reason == "truncated" else "broken"), exc.message
    return "complete", ""


def _sha256(path: Path, opener: Callable[[Path], BinaryIO]) -> str:
    digest = hashlib.sha256()
    with opener(path) as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
