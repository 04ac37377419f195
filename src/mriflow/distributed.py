"""DistributedDataParallel helpers: the few lines that let one training loop run under `torchrun`.

`torchrun --nproc_per_node N ...` sets RANK, LOCAL_RANK and WORLD_SIZE; without them the
process is a world of one and nothing distributed is initialised. The backend is nccl on
CUDA and gloo on CPU. Only rank 0 writes files.

    >>> context = setup("auto")          # Distributed(rank, local_rank, world_size, device)
    >>> net = wrap(net, context)         # DDP when world_size > 1
    >>> mean = all_reduce_mean(tensor)   # average over processes
    >>> teardown()
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():  # else torch's AssertionError, deep in a .to()
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", built without CUDA")
        raise ValueError(f"--device {device}: CUDA is not available on this machine ({build}); "
                         "use --device cpu, or auto to take a GPU when there is one")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def setup(device: str | torch.device = "auto") -> Distributed:
    """Join the process group started by torchrun (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    resolved = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if resolved.type == "cuda":
            torch.cuda.set_device(resolved)
        dist.init_process_group(backend="nccl" if resolved.type == "cuda" else "gloo")
    return Distributed(rank, local_rank, world_size, resolved)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(module: nn.Module, context: Distributed) -> nn.Module:
    """DistributedDataParallel around `module` when there is more than one process."""
    if not context.enabled or not any(p.requires_grad for p in module.parameters()):
        return module
    device_ids = [context.device] if context.device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def unwrap(module: nn.Module) -> nn.Module:
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def no_sync(modules: list[nn.Module], skip: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce for these modules (gradient accumulation) when `skip`."""
    with contextlib.ExitStack() as stack:
        if skip:
            for module in modules:
                if isinstance(module, DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        yield


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average of `tensor` over all processes (a copy; the input is left alone)."""
    tensor = tensor.clone()
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor /= dist.get_world_size()
    return tensor


def all_reduce_min(tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.clone()
    if dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor


def all_gather_objects(value: object) -> list[object]:
    """`value` from every process, in rank order (a list of one without DDP)."""
    if not dist.is_initialized():
        return [value]
    gathered: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
