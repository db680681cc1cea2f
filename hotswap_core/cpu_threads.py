"""How many intra-op threads run the engine's CPU kernels (``model.cpu_threads``).

torch gives every CPU operator one thread per physical core, and inductor compiles that count into its
kernels (``#pragma omp parallel num_threads(N)``, part of its cache key), so the count is set at load, before
anything compiles. ``auto`` keeps torch's count (an ``OMP_NUM_THREADS`` in the environment sets it, as torch
reads it); a number sets it outright, on any device (on CUDA it only concerns host-side operators).

Measured on 2 cores, float32. The geometry model (Qwen2.5-1.5B's shapes, 2 layers), in process: a decode step
of 8 rows 81 ms on 2 threads, 138 ms on 1. The demo model (hidden 64), in process: a decode step of 4 rows
0.64-0.67 ms on 2 threads, 0.43 ms on 1 (an earlier 5.05 ms on 2 was measured with a second team alive, see
below). The demo daemon over its socket, two daemons side by side in turns:
8 mixed streaming clients 2,994 tokens/s on 2 threads against 2,030 on 1, using 1.86 cores against 1.05
(an earlier pair of runs: 3,632 against 3,560). So the default stays torch's, and 1 is the setting for a
sidecar that should leave the machine's other cores to its neighbours.

One thread runs the kernels. Each thread that enters an OpenMP parallel region gets a team of its own, kept
until that thread ends; once the teams' threads outnumber the CPUs, GNU OpenMP stops spinning between regions
(``gomp_throttled_spin_count_var``: 100 spins instead of 300,000) and every region wakes its workers through the
kernel, which costs each of a small model's many short regions. So the engine loads, compiles, warms up and
serves on its own thread (``Engine``), and tensor work on any other thread (a swap's load, checks and staging)
runs inside ``serial()``, which keeps that thread out of OpenMP. Measured on 2 cores, the demo model in process:
an 8-token prefill took 0.64 ms on a thread whose team was the only one and 3.9 ms on the serving thread while
the thread that had loaded and warmed up (and so had a team) lived on; a decode step 0.39 ms against 0.89 ms.
One copy of 100,000 floats on a helper thread that outlives the copy (a swap's executor thread) was enough to
start the slowdown. A geometry-model daemon lost 12% of its 1-client tokens/s after its first swaps.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch

log = logging.getLogger("hotswapd.engine")

# torch's own count, as this process started: what ``auto`` restores in a process that loads more than one model
# with different settings (the bench), and the same as leaving it alone in a daemon.
STARTUP_THREADS = torch.get_num_threads()


def apply(choice: str | int) -> int:
    """Set the process's intra-op threads for ``model.cpu_threads: choice`` before anything is compiled; returns
    the count in use."""
    threads = STARTUP_THREADS if choice == "auto" else int(choice)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    why = "model.cpu_threads" if choice != "auto" else "auto: torch's count"
    log.info("cpu_threads: %d intra-op thread%s (%s)", threads, "" if threads == 1 else "s", why)
    return threads


@contextmanager
def serial() -> Iterator[None]:
    """Tensor work on a thread that is not the engine's, on that thread alone: it never starts an OpenMP team
    (``at::parallel_for`` runs inline at one thread), so the engine's team keeps spinning between its regions.

    torch's count is per thread under OpenMP; setting it also changes the count a thread that has not yet run
    parallel work starts with, so the count is put back on the way out. The engine's thread sets its own at load.
    """
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
