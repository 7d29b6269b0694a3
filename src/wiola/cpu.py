"""CPU threads: how many intra-op threads a Wiola process uses, shared by training, decoding and benchmarks.

Small models on a CPU are latency-bound: threads beyond the physical cores (SMT siblings) only add
synchronisation, and two processes that each take every core slow one another down by an order of
magnitude (docs/results.md#side-by-side). `cpu_threads()` therefore defaults to the physical cores this
process may run on, shared out among the processes torchrun starts on this machine, and leaves a choice
the user made through `OMP_NUM_THREADS` / `MKL_NUM_THREADS` alone.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (SMT siblings counted once)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = list(range(os.cpu_count() or 1))
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:  # no topology in /sys (macOS, Windows): count every CPU (Apple silicon has no SMT)
            return max(1, len(cpus))
    return max(1, len(cores))


def cpu_threads(threads: int | None = None, processes: int = 1) -> int:
    """Set torch's intra-op threads and return the count in use.

    `threads` given: exactly that many. Otherwise the physical cores shared out among `processes`
    processes on this machine (torchrun's LOCAL_WORLD_SIZE when training), unless OMP_NUM_THREADS /
    MKL_NUM_THREADS is set or `torch.set_num_threads` already chose fewer. Processes that each take
    every core slow one another down by an order of magnitude on a small machine (docs/results.md).
    """
    if threads is not None:
        torch.set_num_threads(threads)
        return torch.get_num_threads()
    if any(os.environ.get(name) for name in THREAD_ENV):
        return torch.get_num_threads()
    share = max(1, physical_cores() // max(1, processes))
    if torch.get_num_threads() > share:
        torch.set_num_threads(share)
    return torch.get_num_threads()
