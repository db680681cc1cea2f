"""Read and check a safetensors header without reading tensor data.

The format (https://github.com/huggingface/safetensors#format): a u64 little-endian header length, that
many bytes of JSON mapping each tensor name to ``{dtype, shape, data_offsets}`` (plus an optional
``__metadata__``), then the data region the offsets point into.

``read_header`` refuses a bad file with ``AdapterRejected`` and one of the ``truncated``, ``too_large``,
``unreadable``, ``changed`` or ``malformed`` codes of ``hotswap_core.errors.REASONS``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

from hotswap_core.config import ValidationConfig
from hotswap_core.errors import reject

# Bytes per element of every safetensors dtype, to check data_offsets.
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


class SafetensorsEntry(NamedTuple):
    """One tensor as the header describes it."""

    dtype: str  # safetensors dtype name, e.g. "BF16"
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header, and the hashes of the file it was read from.

    ``sha256`` is the hex SHA-256 of ``hash_prefix`` followed by the file; ``file_sha256`` that of the
    file alone. ``stat`` is what ``fstat`` said about the open file that was read.
    """

    entries: dict[str, SafetensorsEntry]
    stat: os.stat_result
    sha256: str
    file_sha256: str


def _open_rb(path: Path) -> BinaryIO:
    return open(path, "rb")


def read_header(
    path: Path,
    validation: ValidationConfig,
    *,
    hash_prefix: bytes = b"",
    opener: Callable[[Path], BinaryIO] = _open_rb,
) -> SafetensorsHeader:
    """Check the header of the safetensors file at ``path`` and hash the file, in one pass over one open file.

    One pass, so the header and the hashes see the same bytes. The file must fit
    ``validation.max_adapter_bytes`` and its header ``validation.max_header_bytes``; the header is
    checked with ``parse_header`` once the whole file has been read. ``opener`` opens it (the
    directory source's confines it to the watched folder).
    """
    combined, alone = hashlib.sha256(hash_prefix), hashlib.sha256()
    try:
        with opener(path) as f:
            st = os.fstat(f.fileno())
            if st.st_size > validation.max_adapter_bytes:
                limit = validation.max_adapter_bytes
                reject("too_large", path, f"{st.st_size} bytes exceed validation.max_adapter_bytes={limit}")
            if st.st_size < 8:
                reject("truncated", path, f"{st.st_size} bytes, shorter than the 8-byte header length")
            prefix = f.read(8)
            (header_len,) = struct.unpack("<Q", prefix)  # u64 little-endian header length
            if header_len > validation.max_header_bytes:
                limit = validation.max_header_bytes
                reject("too_large", path, f"header of {header_len} bytes exceeds validation.max_header_bytes={limit}")
            if 8 + header_len > st.st_size:
                reject("truncated", path, f"header of {header_len} bytes, but the file is {st.st_size} bytes")
            header = f.read(header_len)
            read = 0
            for chunk in itertools.chain((prefix, header), iter(lambda: f.read(1 << 20), b"")):
                combined.update(chunk)
                alone.update(chunk)
                read += len(chunk)
    except OSError as exc:
        reject("unreadable", path, exc.strerror or str(exc))
    if read != st.st_size:
        reject("changed", path, f"size changed while reading ({st.st_size} -> {read} bytes)")
    entries = parse_header(header, st.st_size - 8 - header_len, path)
    return SafetensorsHeader(entries, st, combined.hexdigest(), alone.hexdigest())


def parse_header(raw: bytes, data_len: int, path: Path) -> dict[str, SafetensorsEntry]:
    """Check every entry of the JSON header ``raw``, and that the tensors tile the ``data_len`` data bytes exactly.

    Tiling also catches a key listed twice: JSON keeps the last, so the other's bytes become a hole.
    ``path`` only names the file in a refusal.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        reject("malformed", path, f"header is not valid JSON: {exc}")
    if not isinstance(header, dict):
        reject("malformed", path, "header is not a JSON object")
    header.pop("__metadata__", None)
    entries: dict[str, SafetensorsEntry] = {}
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        fields: dict[str, Any] = info if isinstance(info, dict) else {}
        dtype, shape, offsets = fields.get("dtype"), fields.get("shape", ()), fields.get("data_offsets", ())
        shape_ok = isinstance(shape, list) and all(_is_count(d) for d in shape)
        offsets_ok = isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
        if dtype not in DTYPE_SIZES or not shape_ok or not offsets_ok:
            reject("malformed", path, f"header entry {key!r} is not {{dtype, shape, data_offsets}}: {info!r}")
        nbytes = math.prod(shape) * DTYPE_SIZES[dtype]
        if offsets[1] - offsets[0] != nbytes:
            reject("malformed", path, f"{key}: {dtype}{shape} is {nbytes} bytes, data_offsets {offsets} disagree")
        entries[key] = SafetensorsEntry(dtype, tuple(shape))
        spans.append((offsets[0], offsets[1], key))
    end = 0
    for start, stop, key in sorted(spans):
        if start != end:
            gap = "a hole" if start > end else "an overlap"
            reject("malformed", path, f"{key} starts at data offset {start}: {gap} after offset {end}")
        end = stop
    if end > data_len:
        reject("truncated", path, f"the header needs {end} data bytes, the file holds {data_len}")
    if end < data_len:
        reject("malformed", path, f"{data_len - end} trailing bytes after the last tensor")
    return entries


def _is_count(value: object) -> bool:
    """A JSON integer >= 0 (not a bool, which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
