"""An adapter folder's files, read safely: whole, size-limited, hashed, and only from inside a given folder.

With ``within`` (the directory source's watched folder), every file is opened through ``open_within``: one
that resolves outside that folder is refused (``outside_watched_folder``), checked on the open file itself, so
no symlink flipped between a check and the read can slip another file in. Pickle weights are only listed here;
they are read only with ``validation.allow_pickle``, and then through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Literal

import torch

from hotswap_core.config import ValidationConfig
from hotswap_core.errors import reject

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"
PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt"}


@dataclass(frozen=True)
class FileStamp:
    """What ``os.stat`` said about a file when it was read."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileStamp:
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


def resolve_folder(path: Path) -> Path:
    try:
        folder = path.resolve(strict=True)
    except FileNotFoundError:
        reject("missing_file", path, "no such folder")
    except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop, before Python 3.13
        reject("unreadable", path, str(exc))
    if not folder.is_dir():
        reject("missing_file", path, "not a folder")
    return folder


def find_weights(folder: Path, validation: ValidationConfig) -> tuple[Path, Literal["safetensors", "pickle"]]:
    """Pick the weights file. Pickle files are only listed here, never opened."""
    if (folder / WEIGHTS_NAME).is_file():
        return folder / WEIGHTS_NAME, "safetensors"
    if (folder / WEIGHTS_NAME).exists():
        reject("unreadable", folder / WEIGHTS_NAME, "exists but is not a regular file")
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        reject("missing_file", folder / WEIGHTS_NAME, "no such file")
    if not validation.allow_pickle:
        how = "save with safe_serialization=True, or set validation.allow_pickle"
        reject("pickle_refused", folder, f"only pickle weights {pickles}, which hotswapd does not open ({how})")
    if PICKLE_WEIGHTS_NAME not in pickles:
        reject("pickle_refused", folder, f"with allow_pickle only {PICKLE_WEIGHTS_NAME} is read, found {pickles}")
    return folder / PICKLE_WEIGHTS_NAME, "pickle"


def open_within(path: Path, within: Path | None) -> BinaryIO:
    """``open(path, "rb")``, refusing (``outside_watched_folder``) a file that resolves outside the
    folder ``within`` (a resolved path; None: no limit).

    The check is on the file actually opened (its ``/proc/self/fd`` link, where there is one), not on
    the path before opening: a symlink flipped after any earlier check cannot slip another file in.
    Hard links are not symlinks: a hard link inside the folder is inside it.
    """
    f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
    if within is None:
        return f
    try:
        real = _opened_path(f, path)
    except BaseException:
        f.close()
        raise
    if real is None or not is_inside(real, within):
        f.close()
        where = f"to {real}" if real is not None else "it changed while being opened"
        reject("outside_watched_folder", path, f"resolves outside the watched folder {within} ({where})")
    return f


def _opened_path(f: BinaryIO, path: Path) -> str | None:
    """Where the open file ``f`` really is; None if that cannot be told for certain."""
    try:
        return os.readlink(f"/proc/self/fd/{f.fileno()}").removesuffix(" (deleted)")
    except OSError:  # no /proc: resolve the name, and accept it only if it names the very file opened
        real = os.path.realpath(path)
        try:
            same = os.path.samestat(os.stat(real), os.fstat(f.fileno()))
        except OSError:
            return None
        return real if same else None


def is_inside(real: str, root: Path) -> bool:
    """True if the resolved path ``real`` is ``root`` or lies below it."""
    return real == str(root) or real.startswith(str(root).rstrip(os.sep) + os.sep)


def read_file(
    path: Path, limit: int, limit_name: str, missing: str = "missing_file", *, within: Path | None = None
) -> tuple[bytes, FileStamp]:
    """Read a whole file, refusing before reading when fstat says it is over ``limit``."""
    try:
        with open_within(path, within) as f:
            st = os.fstat(f.fileno())
            if st.st_size > limit:
                reject("too_large", path, f"{st.st_size} bytes exceed validation.{limit_name}={limit}")
            data = f.read(st.st_size + 1)  # +1: notice a file that grew
    except FileNotFoundError:
        reject(missing, path, "no such file")
    except OSError as exc:
        reject("unreadable", path, exc.strerror or str(exc))
    if len(data) != st.st_size:
        reject("changed", path, f"size changed while reading ({st.st_size} -> {len(data)} bytes)")
    return data, FileStamp.of(st)


def sha256_of(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def unpickle_weights(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The allow_pickle path: torch's weights-only unpickler, which builds tensors and nothing else."""
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reject("pickle_refused", path, f"the weights-only unpickler refused it: {exc}")
    except Exception as exc:
        reject("malformed", path, f"cannot read as a torch state dict: {exc}")
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        reject("malformed", path, "expected a dict of name -> tensor")
    return state
