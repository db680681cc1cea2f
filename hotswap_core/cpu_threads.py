"""How many intra-op threads run the engine's CPU kernels (``model.cpu_threads``).

torch gives every CPU operator one thread per physical core, and inductor compiles that count into its
kernels (``#pragma omp parallel num_threads(N)``, part of the cache key). Each parallel region is a fork and a
join: at Qwen2.5-1.5B's geometry the second core pays (2 cores: a decode step of 8 rows 138 ms on 1 thread,
81 ms on 2), but a model whose matrices are all small spends the step waking threads. On the demo model
(hidden 64) one thread made a decode step of 4 rows 5.05 -> 0.68 ms, and the daemon's 2-client latency
19.8 -> 13.9 ms, because a join also waits whenever the other core is busy with the event loop or a swap.

``auto``: one thread when no linear of the base model reaches ``prepack.MIN_WEIGHTS`` entries (the size at
which a matrix is worth oneDNN's blocked layout is also where splitting it starts to pay), else torch's own
count. An operator's ``OMP_NUM_THREADS`` is left alone, as torch leaves it. On CUDA ``auto`` changes nothing;
a number is applied on any device (the host-side operators).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from hotswap_core import prepack

log = logging.getLogger("hotswapd.engine")

ENV_OVERRIDES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# torch's own count, as this process started: what "leave torch's count" restores in a process that loads more
# than one model (the bench), and the same as leaving it alone in a daemon.
STARTUP_THREADS = torch.get_num_threads()


def largest_linear(model: nn.Module) -> int:
    """Entries of the largest ``nn.Linear`` weight in ``model`` (0 if it has none)."""
    return max((m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear)), default=0)


def choose(choice: str | int, model: nn.Module, device: torch.device) -> tuple[int | None, str]:
    """The intra-op thread count for ``model.cpu_threads: choice`` and why; None: torch's own count."""
    if not isinstance(choice, str):
        return choice, "model.cpu_threads"
    if device.type != "cpu":
        return None, f"auto on {device.type}"
    env = next((f"{k}={os.environ[k]}" for k in ENV_OVERRIDES if os.environ.get(k)), None)
    if env is not None:
        return None, f"auto: {env} set"
    largest = largest_linear(model)
    if largest < prepack.MIN_WEIGHTS:
        return 1, f"auto: the largest linear has {largest:,} weights (< {prepack.MIN_WEIGHTS:,})"
    return None, f"auto: the largest linear has {largest:,} weights"


def apply(choice: str | int, model: nn.Module, device: torch.device) -> int:
    """Set the process's intra-op threads for ``choice`` before anything is compiled; returns the count in use."""
    threads, why = choose(choice, model, device)
    threads = STARTUP_THREADS if threads is None else threads
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    used = torch.get_num_threads()
    log.info("cpu_threads: %d intra-op thread%s (%s)", used, "" if used == 1 else "s", why)
    return used
