"""The thread count follows the free cores, and --threads overrides it."""

from __future__ import annotations

import pytest
import torch

from mriflow.utils import threads


@pytest.mark.parametrize("cpus, load, processes, expected", [
    (1, 0.5, 1, 1),   # one core: "1 usable CPU"
    (2, 0.0, 1, 2),   # an idle 2-core machine: both
    (2, 1.1, 1, 1),   # another job on one core: the free one
    (2, 3.0, 1, 1),   # fully busy: still one
    (16, 0.2, 4, 4),  # torchrun's 4 processes share the node
    (16, 8.0, 4, 2),  # ... and what is free of it
])
def test_threads_are_the_free_cores_per_local_process(monkeypatch, cpus, load, processes, expected):
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda _: set(range(cpus)), raising=False)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (load, load, load), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(processes))
    count, why = threads.free_cpus()
    assert count == expected and f"load average {load:.1f}" in why
    assert why.split(",")[0].split(" shared")[0] == f"{cpus} usable {'CPU' if cpus == 1 else 'CPUs'}"


def test_set_threads_applies_the_request_or_the_free_count_and_says_so(monkeypatch):
    monkeypatch.setattr(threads, "free_cpus", lambda: (1, "2 usable CPUs, load average 1.0"))
    assert threads.set_threads(None).startswith("torch uses 1 CPU thread (2 usable CPUs")
    assert torch.get_num_threads() == 1
    assert threads.set_threads(2) == "torch uses 2 CPU threads (--threads)" and torch.get_num_threads() == 2
    with pytest.raises(ValueError, match="--threads must be >= 1"):
        threads.set_threads(0)
