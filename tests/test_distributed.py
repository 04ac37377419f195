"""mriflow.distributed: the device choice, a world of one without torchrun, and two gloo processes gathering."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch import nn

from mriflow import distributed

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
needs_no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@needs_no_cuda
def test_auto_is_the_cpu_without_cuda_and_cpu_is_always_the_cpu():
    assert distributed.resolve_device("auto") == torch.device("cpu")
    assert distributed.resolve_device("auto", local_rank=3) == torch.device("cpu")
    assert distributed.resolve_device("cpu") == distributed.resolve_device(torch.device("cpu")) == torch.device("cpu")


@needs_no_cuda
@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda")])
def test_cuda_without_cuda_is_refused_in_one_line(device):
    with pytest.raises(ValueError) as error:
        distributed.resolve_device(device)
    message = str(error.value)
    assert "\n" not in message and "CUDA is not available" in message and "--device cpu" in message
    assert message.startswith(f"--device {torch.device(device)}:")


@needs_no_cuda
def test_the_cli_says_so_in_one_line_instead_of_a_traceback(tmp_path, capsys):
    from mriflow.cli import main

    assert main(["generate", "--out", str(tmp_path / "out"), "--num-samples", "1", "--device", "cuda"]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "CUDA is not available" in error and "Traceback" not in error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_takes_the_local_rank_unless_an_index_is_given():
    assert distributed.resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)
    assert distributed.resolve_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert distributed.resolve_device("cuda:0", local_rank=5) == torch.device("cuda", 0)


def test_without_torchrun_the_process_is_a_world_of_one(no_torchrun):
    context = distributed.setup("cpu")
    try:
        assert context == distributed.Distributed(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"))
        assert context.is_main and not context.enabled and not dist.is_initialized()
        network = nn.Linear(2, 1)
        assert distributed.wrap(network, context) is network and distributed.unwrap(network) is network
        assert distributed.all_gather_objects({"rank": 0}) == [{"rank": 0}]
        distributed.barrier()  # returns at once: nothing to wait for
        value = torch.tensor([1.0, 3.0])
        mean = distributed.all_reduce_mean(value)
        assert torch.equal(mean, value) and mean is not value  # a copy, the input left alone
        assert torch.equal(distributed.all_reduce_min(value), value)
    finally:
        distributed.teardown()
    distributed.teardown()  # a second teardown (or one without a group) is harmless
    assert not dist.is_initialized()


def test_only_rank_zero_is_main_and_a_world_above_one_is_enabled():
    assert not distributed.Distributed(1, 1, 2, torch.device("cpu")).is_main
    assert distributed.Distributed(0, 0, 2, torch.device("cpu")).enabled


def test_no_sync_without_ddp_changes_nothing():
    network = nn.Linear(2, 1)
    with distributed.no_sync([network], skip=True):
        network(torch.ones(1, 2)).sum().backward()
    assert network.weight.grad is not None


WORKER = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch import nn
    from mriflow import distributed

    torch.set_num_threads(1)
    context = distributed.setup("cpu")
    gathered = distributed.all_gather_objects({"rank": context.rank, "name": f"process-{context.rank}"})
    distributed.barrier()
    mean = distributed.all_reduce_mean(torch.tensor([float(context.rank) * 2.0]))
    low = distributed.all_reduce_min(torch.tensor([float(context.rank) + 5.0]))
    wrapped = distributed.wrap(nn.Linear(2, 1), context)
    record = {"context": [context.rank, context.local_rank, context.world_size, str(context.device), context.is_main,
                          context.enabled],
              "backend": torch.distributed.get_backend(), "gathered": gathered, "mean": mean.item(), "min": low.item(),
              "wrapped": type(wrapped).__name__, "unwrapped": type(distributed.unwrap(wrapped)).__name__}
    distributed.teardown()
    record["initialised_after_teardown"] = torch.distributed.is_initialized()
    with open(sys.argv[1] + f"/rank{context.rank}.json", "w") as stream:
        json.dump(record, stream)
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_gloo_processes_gather_each_others_objects_in_rank_order(tmp_path):
    import json

    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    environment = {**{k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}, "OMP_NUM_THREADS": "1",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    workers = [subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env={**environment, "RANK": str(rank), "LOCAL_RANK": str(rank)})
               for rank in (1, 0)]  # rank 1 starts first: the order of the result is the ranks', not the start's
    for worker in workers:
        _, stderr = worker.communicate(timeout=120)
        assert worker.returncode == 0, stderr[-3000:]
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    expected = [{"rank": 0, "name": "process-0"}, {"rank": 1, "name": "process-1"}]
    for rank, record in enumerate(records):
        assert record["context"] == [rank, rank, 2, "cpu", rank == 0, True]
        assert record["backend"] == "gloo"
        assert record["gathered"] == expected
        assert record["mean"] == pytest.approx(1.0) and record["min"] == pytest.approx(5.0)
        assert record["wrapped"] == "DistributedDataParallel" and record["unwrapped"] == "Linear"
        assert record["initialised_after_teardown"] is False
