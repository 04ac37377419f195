"""The save and restore that exact resume needs (mriflow.train.loop): every network, EMA copy, optimizer and each
process's random states into a checkpoint's training state, the inference weights (EMA) into model.safetensors, and
back; and a warm start from another checkpoint's inference weights."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from mriflow import checkpoint as ckpt
from mriflow import distributed
from mriflow.config import LoopConfig
from mriflow.distributed import Distributed, unwrap

if TYPE_CHECKING:
    from mriflow.train.loop import Stage

LONG = "@long"  # the suffix of a network's longer EMA copy (loop.ema_long_decay) in the EMA dict and training state


def save_training(out: Path, stage: Stage, ema: dict[str, AveragedModel], optimizers: dict[str, torch.optim.Optimizer],
          context: Distributed, config: LoopConfig, meta: dict[str, Any], step: int, epoch: int,
          metrics: dict[str, float], best: dict[str, Any] | None = None) -> Path:
    """Write RUN/checkpoints/step-XXXXXXXX (rank 0) and prune old ones but the best; every process contributes
    its RNG state."""
    states = distributed.all_gather_objects(rng_state())
    directory = out / ckpt.CHECKPOINTS_DIR / f"step-{step:08d}"
    if not context.is_main:
        return directory
    exported = {name: ema[name].module if name in ema else unwrap(stage.networks[name])
                for name in (stage.ema_networks or stage.networks)}
    weights = {f"{name}.{key}": value for name, net in exported.items() for key, value in net.state_dict().items()}
    state: dict[str, torch.Tensor] = {}
    for name, network in stage.networks.items():
        state.update({f"network.{name}.{k}": v for k, v in unwrap(network).state_dict().items()})
    for name, average in ema.items():  # the bare module's names, as before AveragedModel; n_averaged is the step
        state.update({f"ema.{name}.{k}": v for k, v in average.module.state_dict().items()})
    optimizer_groups = {}
    for phase, optimizer in optimizers.items():
        saved = optimizer.state_dict()
        optimizer_groups[phase] = saved["param_groups"]
        for index, values in saved["state"].items():
            state.update({f"optimizer.{phase}.{index}.{k}": torch.as_tensor(v) for k, v in values.items()})
    rng_meta = []
    for rank, rng in enumerate(states):
        state[f"rng.{rank}.torch"] = rng["torch"]
        state[f"rng.{rank}.numpy"] = torch.from_numpy(rng["numpy"][1].astype(np.int64))
        for index, cuda_state in enumerate(rng["cuda"]):
            state[f"rng.{rank}.cuda.{index}"] = cuda_state
        rng_meta.append({"python": rng["python"], "numpy": [rng["numpy"][0], *rng["numpy"][2:]], "cuda": len(rng["cuda"])})
    full_meta = {**meta, "step": step, "epoch": epoch, "world_size": context.world_size,
                 "batch_size": config.batch_size, "grad_accumulation": config.grad_accumulation,
                 "optimizer": optimizer_groups, "rng": rng_meta, "metrics": metrics,
                 **({"best": best} if best is not None else {})}
    ckpt.save_checkpoint(directory, weights, full_meta, train_state=state, weights_dtype=config.weights_dtype)
    complete = sorted((p for p in (out / ckpt.CHECKPOINTS_DIR).glob("step-*") if (p / ckpt.META_FILE).is_file()),
                      key=lambda p: int(p.name.split("-")[1]))
    for old in complete[: -config.keep_checkpoints]:
        if best is None or old.name != Path(best["checkpoint"]).name:
            shutil.rmtree(old, ignore_errors=True)
    return directory


def restore_training(directory: Path, stage: Stage, ema: dict[str, AveragedModel], optimizers: dict[str, torch.optim.Optimizer],
             context: Distributed) -> tuple[int, dict[str, Any] | None]:
    """Load networks, EMA, optimizers and this process's random states; returns the checkpoint's step and its
    record of the best validated checkpoint (None when the stage does not validate)."""
    _, meta = ckpt.load_checkpoint(directory)
    state = ckpt.load_train_state(directory)
    for name, network in stage.networks.items():
        ckpt.load_weights_into(unwrap(network), state, f"network.{name}.", str(directory))
    for name, average in ema.items():
        prefix = f"ema.{name}."
        if name.endswith(LONG) and not any(key.startswith(prefix) for key in state):  # enabled on this resume
            prefix = f"ema.{name.removesuffix(LONG)}."
        ckpt.load_weights_into(average.module, state, prefix, str(directory))
        average.n_averaged.fill_(int(meta["step"]) + 1)  # 1 for the starting copy, 1 per step
    for phase, optimizer in optimizers.items():
        prefix = f"optimizer.{phase}."
        values: dict[int, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            if key.startswith(prefix):
                index, name = key[len(prefix):].split(".", 1)
                values.setdefault(int(index), {})[name] = tensor
        optimizer.load_state_dict({"state": values, "param_groups": meta["optimizer"][phase]})
    if meta.get("world_size") == context.world_size:
        rank, rng = context.rank, meta["rng"][context.rank]
        numpy_state = state[f"rng.{rank}.numpy"].numpy().astype(np.uint32)
        random.setstate((rng["python"][0], tuple(rng["python"][1]), rng["python"][2]))
        np.random.set_state((rng["numpy"][0], numpy_state, *rng["numpy"][1:]))
        torch.set_rng_state(state[f"rng.{rank}.torch"])
        if torch.cuda.is_available() and rng["cuda"]:
            torch.cuda.set_rng_state_all([state[f"rng.{rank}.cuda.{i}"] for i in range(rng["cuda"])])
    elif context.is_main:
        print(f"{directory}: saved with {meta.get('world_size')} process(es), resumed with {context.world_size}; "
              "random streams restart from the seed (the loss curve will differ slightly)")
    return int(meta["step"]), meta.get("best")


def warm_start_weights(directory: Path, stage: Stage, ema: dict[str, AveragedModel]) -> int:
    """Load a checkpoint's inference weights (model.safetensors) into each averaged network and its EMA copy; its step."""
    weights, meta = ckpt.load_checkpoint(directory)
    for name, average in ema.items():
        base = name.removesuffix(LONG)
        ckpt.load_weights_into(unwrap(stage.networks[base]), weights, f"{base}.", str(directory))
        ckpt.load_weights_into(average.module, weights, f"{base}.", str(directory))
        average.n_averaged.fill_(int(meta.get("step", 0)) + 1)
    return int(meta.get("step", 0))


def rng_state() -> dict[str, Any]:
    python = random.getstate()
    return {
        "python": [python[0], list(python[1]), python[2]],
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
