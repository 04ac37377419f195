"""How many CPU threads torch uses: what is free, not what exists.

torch starts one thread per physical core. On a shared machine that is a bad default: two busy
threads on a core that another process also uses thrash (a 2-core machine trained at 5.5 s a step
with torch's default while another job ran, 1 s with one thread). The command line therefore
starts with the cores this process may use (its affinity, shared among the processes torchrun
started on this node) less the cores already busy (the 1-minute load average), at least one,
and says so; `--threads N` overrides.
"""

from __future__ import annotations

import os

import torch

from mriflow.utils.text import counted


def free_cpus() -> tuple[int, str]:
    """(threads for this process, why): the usable cores per local process less the busy ones, at least 1."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    share = max(1, usable // processes)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = max(1, min(share, round(usable - load) // processes))
    where = counted(usable, "usable CPU") + (f" shared by {processes} processes" if processes > 1 else "")
    return threads, f"{where}, load average {load:.1f}"


def set_threads(requested: int | None = None) -> str:
    """Set torch's intra-op threads to `requested`, or to free_cpus(); returns the line to print."""
    if requested is not None and requested < 1:
        raise ValueError(f"--threads must be >= 1, got {requested}")
    if requested is None:
        threads, why = free_cpus()
        text = f"torch uses {threads} CPU thread{'s' * (threads > 1)} ({why}; --threads N to choose)"
    else:
        threads, text = requested, f"torch uses {requested} CPU thread{'s' * (requested > 1)} (--threads)"
    torch.set_num_threads(threads)
    return text
