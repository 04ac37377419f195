"""The one training loop shared by every stage (autoencoder, latent flow, diffusion baseline).

Over 400 lines on purpose: `train` reads top to bottom in one pass (as nanoGPT's train.py), and the
pieces it calls below it (the resumable sampler, logs, montages, validation) are read with it; the save
and restore of every network, optimizer and random state that exact resume needs are in
mriflow.train.checkpointing; a stage's own logic lives in its stage module, not here.

It reads top to bottom: processes and devices, run folder, networks and optimizers, EMA,
resume, data, then the loop (learning rate, micro-batches x phases, optimizer steps, EMA,
log, montage, checkpoint). Everything specific to a stage sits behind a small contract:

    class Stage(Protocol):
        networks: dict[str, nn.Module]      # trained networks by name. The loop moves them to the device and
                                            # wraps them in DDP in place, so call self.networks[name] in `loss`;
                                            # distributed.unwrap(...) gives the bare module when needed.
        phases: dict[str, list[dict]]       # phase -> AdamW parameter groups ({"params": [...]}, optional "lr",
                                            # "betas", "weight_decay"). One optimizer per phase. On each
                                            # micro-batch the phases run in this order; while one runs, only
                                            # its parameters require gradients.
        ema_networks: tuple[str, ...]       # networks of which the loop keeps an EMA copy; the copies are the
                                            # inference weights written to model.safetensors
        metric_names: tuple[str, ...]       # the columns of the log, in order; the first is shown in the progress bar

        def loss(self, phase: str, batch: dict, step: int) -> tuple[Tensor, dict[str, Tensor]] | None:
            # the scalar to minimise in this phase and the metrics to log (names from metric_names),
            # or None to skip the phase at this step (e.g. the critic before the adversarial start).
            # Runs under bf16 autocast on CUDA; a stage disables autocast where it needs fp32.
            # A stage may keep what one phase computed for the next (the generator's output for the critic).
        def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, ndarray] | None:
            # named 3D volumes to show in three planes (e.g. real, reconstruction), computed with
            # `networks` (EMA copies in eval mode); called on rank 0 only, without gradients
        def validate(self, networks: dict[str, nn.Module]) -> dict[str, float]:   # optional
            # figures on held-out data, computed with `networks` (as montage), before every checkpoint;
            # the first is minimised: the loop logs them (validation.csv) and keeps the best
            # checkpoint ("best" in its meta and the run's result) however many newer ones follow

    A flow stage: networks={"velocity": net}, phases={"velocity": [{"params": net.parameters()}]},
    ema_networks=("velocity",). The autoencoder stage: networks={"autoencoder", "volume_critic",
    "slice_critic"}, phases={"generator": [...], "critic": [...]}. The GAN family's stage: networks={"velocity",
    "critic"}, one phase each, only "velocity" averaged (the critic lives in train_state only).

What the loop does for every stage: AdamW with linear warm-up then cosine decay of the
learning rate, gradient clipping, gradient accumulation, EMA (torch's AveragedModel) with decay
min(ema_decay, (1 + step) / (10 + step)) (a longer one, ema_long_decay, stretched to stay longer), bf16
autocast on CUDA, DDP under `torchrun` (DistributedSampler order, gloo on CPU, nccl on CUDA, rank 0
writes), a stop with a clear message on a non-finite loss (checkpoints already written stay untouched), CSV + TensorBoard
logs, montages, a tqdm bar, and checkpoints that resume exactly: network, EMA and optimizer
tensors, each process's torch/numpy/python/CUDA random states, and the data position
(epoch and offset follow from the step); for a stage that validates, model selection (the best
checkpoint is kept). Augmentation randomness is a function of (seed, epoch, item), so it is the
same with or without data-loading workers or a resume.

    >>> train(stage, dataset, LoopConfig(max_steps=1000), "runs/ae", meta={"stage": "autoencoder", "config": {...}})
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import torch
import yaml
from torch import nn
from torch.optim.swa_utils import AveragedModel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from mriflow import checkpoint as ckpt
from mriflow import distributed
from mriflow.config import LoopConfig
from mriflow.distributed import Distributed, unwrap
from mriflow.train.checkpointing import LONG, restore_training, save_training, warm_start_weights
from mriflow.utils.seeding import item_seed, seed_everything
from mriflow.utils.text import counted


class Stage(Protocol):
    networks: dict[str, nn.Module]
    phases: dict[str, list[dict[str, Any]]]
    ema_networks: tuple[str, ...]
    metric_names: tuple[str, ...]

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None: ...

    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray] | None: ...

    # optional: def validate(self, networks: dict[str, nn.Module]) -> dict[str, float] (see the module docstring)




class StopRequest:
    """Ctrl+C (SIGINT) or SIGTERM while training: the step under way finishes, a checkpoint is written and `train`
    returns with "interrupted", so no more than that step is lost; a second signal stops at once (KeyboardInterrupt).
    Handlers are installed only in the main thread (signals are delivered there) and restored on exit."""

    def __init__(self):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            for number in (signal.SIGINT, signal.SIGTERM):
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        import signal

        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number, frame) -> None:
        import signal

        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(number).name
        print(f"\n{self.received}: finishing this step and writing a checkpoint (again to stop at once)", flush=True)


class NonFiniteLossError(ValueError):
    """A loss or gradient became NaN or infinite; the run stopped before using it. A ValueError, so the
    command line shows its message (what was kept and what to do) as one line."""


def learning_rate_factor(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Linear warm-up (step + 1) / warmup_steps, then 0.5 * (1 + cos(pi * progress)) decay to min_ratio."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_ema(network: nn.Module, decay: float, stretch: float = 1.0) -> AveragedModel:
    """torch's AveragedModel of `network` whose n-th update (after optimizer step n) is

        theta_ema <- d_n theta_ema + (1 - d_n) theta,   d_n = min(decay, 1 - 9 / ((10 + n) stretch))

    so early steps, when the initial weights are far from useful, weigh little: with stretch 1, d_n =
    min(decay, (1 + n) / (10 + n)), an average over about the last ninth of training until the decay caps it.
    A longer EMA kept beside it passes stretch = (1 - short decay) / (1 - its decay), so it is that many times
    longer through the warm-up too (with stretch 1 both would be the same average until the shorter one's cap,
    step 9 000 for 0.999, as they were until 2026-12-07). Buffers (batch-norm statistics) are copied, not
    averaged (use_buffers=False). The average starts as a copy of `network` (n_averaged = 1, so update n is the
    n-th average). The averaged network is `.module`.
    """
    if stretch < 1.0:
        raise ValueError(f"EMA stretch must be >= 1, got {stretch}")

    @torch.no_grad()
    def warmed_up_ema(averages: list[torch.Tensor], currents: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        step = int(num_averaged)
        torch._foreach_lerp_(averages, currents, 1.0 - min(decay, 1.0 - 9.0 / ((10 + step) * stretch)))

    ema = AveragedModel(network, multi_avg_fn=warmed_up_ema, use_buffers=False)
    ema.update_parameters(network)  # the first update copies, which is where it starts
    return ema.eval().requires_grad_(False)


def train(
    stage: Stage,
    dataset: Dataset,
    config: LoopConfig,
    out: str | Path,
    meta: dict[str, Any],
    resume: bool = False,
    context: Distributed | None = None,
    stop_at_step: int | None = None,
    warm_start: str | Path | None = None,
) -> dict[str, Any]:
    """Train `stage` on `dataset` into run folder `out`; returns {"step", "metrics", "checkpoint", "best"}
    ("best": {"step", "checkpoint", "validation"} of the lowest first validation figure; None without `validate`).

    `meta` (JSON-serialisable; "config" = the full resolved config) goes into every checkpoint
    and config.yaml. `stop_at_step` ends the run early with a checkpoint, as an interruption
    would, leaving the schedule (max_steps) unchanged; `resume` continues the latest checkpoint.
    `warm_start` (a checkpoint folder, e.g. an exported model's flow/) starts a run that has no checkpoint from that
    checkpoint's inference weights (network and EMA alike) at its step, with fresh optimizer moments: what is left of
    a run whose folder was lost (the CPU long-run queue on a new machine). The learning rate then warms up again over
    warmup_steps from that step (meta["warm_start"]["step"], kept through later resumes).
    """
    # ---- processes, device, run folder ---------------------------------------------------------
    context = context or distributed.setup(config.device)
    device, is_main = context.device, context.is_main
    out = Path(out)
    if not resume and ckpt.latest_checkpoint(out) is not None:
        raise FileExistsError(f"{out} already holds checkpoints; pass --resume to continue, or choose another --out")
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        for leftover in ckpt.remove_partial_checkpoints(out):
            print(f"removed {leftover}: left incomplete by an interrupted write")
        _write_config(out, meta.get("config", {}))
    seed_everything(config.seed + context.rank)  # each process draws its own noise
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=config.amp and device.type == "cuda")

    # ---- networks (DDP), one AdamW per phase, EMA copies -----------------------------------------
    for name, network in stage.networks.items():
        stage.networks[name] = distributed.wrap(network.to(device), context)
    optimizers: dict[str, torch.optim.Optimizer] = {}
    phase_parameters: dict[str, list[nn.Parameter]] = {}
    for phase, groups in stage.phases.items():
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
        for group in groups:
            group["base_lr"] = group.get("lr", config.lr)
        optimizers[phase] = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        phase_parameters[phase] = [p for g in groups for p in g["params"]]
    ema = {name: make_ema(unwrap(stage.networks[name]), config.ema_decay) for name in stage.ema_networks}
    if config.ema_long_decay > 0:  # "velocity@long": the same network averaged over longer (validated beside it)
        stretch = max(1.0, (1.0 - config.ema_decay) / (1.0 - config.ema_long_decay))  # as much longer from step 1
        ema.update({name + LONG: make_ema(unwrap(stage.networks[name]), config.ema_long_decay, stretch)
                    for name in stage.ema_networks})

    # ---- resume ---------------------------------------------------------------------------------
    step, log_rows, validation_rows, best = 0, [], [], None
    if resume and (latest := ckpt.latest_checkpoint(out)) is not None:
        step, best = restore_training(latest, stage, ema, optimizers, context)
        log_rows = _read_log(out / "log.csv", up_to_step=step)
        validation_rows = _read_log(out / "validation.csv", up_to_step=step)
        if is_main:
            print(f"resuming {out} from {latest.name} (step {step})")
    elif warm_start is not None:
        step = warm_start_weights(Path(warm_start), stage, ema)
        if is_main:
            print(f"{out}: warm start from {warm_start} (step {step}; optimizer moments start afresh)")
    elif resume and is_main:
        print(f"{out}: no checkpoint to resume from; starting from step 0")
    rewarm_from = (meta.get("warm_start") or {}).get("step")  # a warm-started run warms its learning rate up again

    # ---- data: every process reads its own share, in an order fixed by (seed, epoch) -------------
    sampler = _ResumableSampler(dataset, context, config.seed)
    per_epoch = len(sampler) // config.batch_size
    if per_epoch == 0:
        raise ValueError(
            f"the training set has {counted(len(dataset), 'volume')}, fewer than batch_size ({config.batch_size}) x "
            f"processes ({context.world_size}); lower loop.batch_size"
        )
    loader = DataLoader(_SeededItems(dataset, config.seed), batch_size=config.batch_size, sampler=sampler,
                        num_workers=config.num_workers, drop_last=True, pin_memory=device.type == "cuda",
                        generator=torch.Generator())  # its own generator: making an iterator must not draw from torch's
    batches = _batches(loader, sampler, per_epoch, config.batch_size, step * config.grad_accumulation)

    # ---- logging --------------------------------------------------------------------------------
    columns = ["step", *stage.metric_names, "lr", "volumes_per_second", "elapsed_seconds", "cpu_seconds"]
    writer = _tensorboard(out, step) if is_main else None
    progress = tqdm(total=config.max_steps, initial=step, disable=not is_main, unit="step", dynamic_ncols=True)
    sums = torch.zeros(len(stage.metric_names), device=device, dtype=torch.float64)
    counts = torch.zeros_like(sums)
    volumes_per_step = config.batch_size * config.grad_accumulation * context.world_size
    elapsed = float(log_rows[-1]["elapsed_seconds"]) if log_rows else 0.0
    cpu_before = float(log_rows[-1].get("cpu_seconds") or 0.0) if log_rows else 0.0  # earlier calls' CPU time
    interval_seconds, interval_steps, started = 0.0, 0, time.perf_counter()
    cpu_started = time.process_time()
    last_saved = ckpt.latest_checkpoint(out)
    saved_at = time.perf_counter()
    final_step = min(config.max_steps, stop_at_step or config.max_steps)
    metrics: dict[str, float] = {}

    # ---- the loop (Ctrl+C or SIGTERM: finish the step, checkpoint, return) --------------------------
    with StopRequest() as stop:
        while step < final_step:
            tick = time.perf_counter()
            lr_factor = learning_rate_factor(step, config.warmup_steps, config.max_steps, config.min_lr_ratio)
            if rewarm_from is not None:
                lr_factor *= min(1.0, (step - rewarm_from + 1) / config.warmup_steps)
            for optimizer in optimizers.values():
                for group in optimizer.param_groups:
                    group["lr"] = group["base_lr"] * lr_factor

            stepped: set[str] = set()
            for micro in range(config.grad_accumulation):
                epoch, batch = next(batches)
                batch = _to_device(batch, device)
                last_micro = micro == config.grad_accumulation - 1
                with distributed.no_sync(list(stage.networks.values()), skip=not last_micro):
                    for phase in stage.phases:
                        _only_phase_requires_grad(phase_parameters, phase)
                        with torch.autocast(**autocast):
                            result = stage.loss(phase, batch, step)
                        if result is None:
                            continue
                        loss, values = result
                        if distributed.all_reduce_min(torch.isfinite(loss.detach()).float()).item() == 0:
                            raise NonFiniteLossError(_non_finite_message(out, step, phase, loss, last_saved))
                        (loss / config.grad_accumulation).backward()
                        stepped.add(phase)
                        for index, name in enumerate(stage.metric_names):
                            if name in values:
                                sums[index] += torch.as_tensor(values[name], dtype=torch.float64).to(device)
                                counts[index] += 1
            _only_phase_requires_grad(phase_parameters, None)

            for phase in stepped:
                optimizer = optimizers[phase]
                if config.grad_clip > 0:
                    norm = torch.nn.utils.clip_grad_norm_(phase_parameters[phase], config.grad_clip)
                    if not torch.isfinite(norm):
                        raise NonFiniteLossError(_non_finite_message(out, step, phase, norm, last_saved, "gradient norm"))
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            for name, average in ema.items():
                average.update_parameters(unwrap(stage.networks[name.removesuffix(LONG)]))
            interval_seconds += time.perf_counter() - tick
            interval_steps += 1

            # -- stop early on the wall-clock or CPU budget, checkpoint on the clock (the same decision on every process),
            #    decided before the log, the montage and the checkpoint, which all write the last step
            if config.max_minutes > 0 or config.max_cpu_minutes > 0:
                over = ((config.max_minutes > 0 and time.perf_counter() - started > 60 * config.max_minutes)
                        or (config.max_cpu_minutes > 0 and time.process_time() - cpu_started > 60 * config.max_cpu_minutes))
                if distributed.all_reduce_min(torch.tensor(float(over), device=device)).item() > 0:
                    final_step = step
            if distributed.all_reduce_min(torch.tensor(float(stop.received is None), device=device)).item() == 0:
                final_step = step  # a signal in any process: checkpoint now and return
            due = torch.tensor(float(config.checkpoint_minutes > 0
                                     and time.perf_counter() - saved_at > 60 * config.checkpoint_minutes), device=device)
            due = config.checkpoint_minutes > 0 and distributed.all_reduce_min(due).item() > 0

            # -- log (all processes reduce, rank 0 writes)
            if step % config.log_every == 0 or step == final_step:
                reduced_sums = distributed.all_reduce_mean(sums)
                reduced_counts = distributed.all_reduce_mean(counts)
                means = (reduced_sums / reduced_counts.clamp_min(1)).tolist()
                metrics = {n: m for n, m, c in zip(stage.metric_names, means, reduced_counts.tolist()) if c > 0}
                speed = volumes_per_step * interval_steps / max(interval_seconds, 1e-9)
                elapsed += interval_seconds
                row = {"step": step, **metrics, "lr": config.lr * lr_factor, "volumes_per_second": speed,
                       "elapsed_seconds": elapsed, "cpu_seconds": cpu_before + time.process_time() - cpu_started}
                log_rows.append(row)
                if is_main:
                    _write_log(out / "log.csv", columns, log_rows)
                    for name, value in row.items():
                        if name != "step" and writer is not None:
                            writer.add_scalar(name, value, step)
                    first = stage.metric_names[0] if stage.metric_names else None
                    progress.set_postfix({**({first: f"{metrics[first]:.4f}"} if first in metrics else {}),
                                          "vol/s": f"{speed:.2f}"})
                sums.zero_()
                counts.zero_()
                interval_seconds, interval_steps = 0.0, 0
            progress.update(1)

            # -- montage of real vs output (rank 0)
            if is_main and (step % config.montage_every == 0 or step == final_step):
                _write_montage(stage, batch, ema, out, step, writer)

            # -- checkpoint (all processes gather their random states; rank 0 writes), validated first (rank 0)
            if step % config.checkpoint_every == 0 or step == final_step or due:
                if is_main and hasattr(stage, "validate"):
                    best = _validate(stage, ema, out, step, validation_rows, best, writer)
                last_saved = save_training(out, stage, ema, optimizers, context, config, meta, step, epoch, metrics, best)
                saved_at = time.perf_counter()
                distributed.barrier()

    progress.close()
    if writer is not None:
        writer.close()
    return {"step": step, "metrics": metrics, "checkpoint": str(last_saved) if last_saved else None, "best": best,
            **({"interrupted": stop.received} if stop.received else {})}


# ---- the pieces the loop calls ------------------------------------------------------------------


class _ResumableSampler(Sampler):
    """DistributedSampler order (shuffled by seed + epoch, this process's share), started at an offset.

    Yields (epoch, index) pairs so each item's augmentation can be seeded by its own identity.
    """

    def __init__(self, dataset: Dataset, context: Distributed, seed: int):
        self.inner = DistributedSampler(dataset, num_replicas=context.world_size, rank=context.rank,
                                        shuffle=True, seed=seed, drop_last=True)
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start
        self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter([(self.epoch, index) for index in list(self.inner)[self.start:]])

    def __len__(self) -> int:
        return len(self.inner) - self.start


class _SeededItems(Dataset):
    """Item (epoch, index) of `dataset`, with torch's generator seeded by item_seed(seed, epoch, index) while it is made."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(item_seed(self.seed, epoch, index))
            return self.dataset[index]


def _batches(loader: DataLoader, sampler: _ResumableSampler, per_epoch: int, batch_size: int,
             done: int) -> Iterator[tuple[int, Any]]:
    """Endless (epoch, batch) stream that skips the `done` micro-batches already consumed."""
    epoch, offset = divmod(done, per_epoch)
    while True:
        sampler.set_position(epoch, offset * batch_size)
        for batch in loader:
            yield epoch, batch
        epoch, offset = epoch + 1, 0


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


def _only_phase_requires_grad(phase_parameters: dict[str, list[nn.Parameter]], phase: str | None) -> None:
    """Freeze every optimised parameter outside `phase` (None: unfreeze all), so a phase's backward
    reaches only its own parameters (e.g. the generator's loss through a frozen critic)."""
    for name, parameters in phase_parameters.items():
        for parameter in parameters:
            parameter.requires_grad_(phase is None or name == phase)


def _non_finite_message(out: Path, step: int, phase: str, value: torch.Tensor, last_saved: Path | None,
                        what: str = "loss") -> str:
    kept = (f"the last good checkpoint, {last_saved}, is kept; continue from it with --resume and a lower --lr"
            if last_saved else "no checkpoint was written yet; start again with a lower --lr")
    return f"{out}: the {phase} {what} became {value.detach().float().item()} at step {step + 1}; training stopped; {kept}"


def _write_config(out: Path, config: dict[str, Any]) -> None:
    ckpt.write_text_atomic(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    ckpt.write_text_atomic(out / "config.json", json.dumps(config, indent=2))


def _read_log(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Rows of an earlier log up to the resumed step (rows logged after that checkpoint are dropped)."""
    if not path.is_file():
        return []
    with open(path, newline="") as stream:
        return [row for row in csv.DictReader(stream) if int(row["step"]) <= up_to_step]


def _write_log(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    ckpt.write_text_atomic(path, text.getvalue())


def _tensorboard(out: Path, step: int):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is a dependency, but a missing one must not stop training
        print("tensorboard is not installed; TensorBoard logs are off (log.csv is still written)")
        return None
    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=step + 1 if step else None)


@contextlib.contextmanager
def _inference_networks(stage: Stage, ema: dict[str, AveragedModel], suffix: str = "") -> Iterator[dict[str, nn.Module]]:
    """The EMA copies (other networks bare; `suffix` LONG: the longer EMA), in eval mode while in use, without
    gradients."""
    networks = {name: ema[name + suffix].module if name + suffix in ema else unwrap(net)
                for name, net in stage.networks.items()}
    modes = {name: net.training for name, net in networks.items()}
    for net in networks.values():
        net.eval()
    try:
        with torch.no_grad():
            yield networks
    finally:
        for name, net in networks.items():
            net.train(modes[name])


def _write_montage(stage: Stage, batch: dict, ema: dict[str, AveragedModel], out: Path, step: int, writer) -> None:
    from mriflow.utils.montage import three_plane_montage

    with _inference_networks(stage, ema) as networks:
        volumes = stage.montage(batch, networks)
    if not volumes:
        return
    image = three_plane_montage(volumes, out / "montages" / f"step-{step:08d}.png", title=f"step {step}")
    if writer is not None:
        writer.add_image("montage", image, step, dataformats="HWC")


def _validate(stage: Stage, ema: dict[str, AveragedModel], out: Path, step: int, rows: list[dict[str, Any]],
              best: dict[str, Any] | None, writer) -> dict[str, Any] | None:
    """Run `stage.validate`, append its figures to validation.csv (and TensorBoard's val/), and return the best
    so far: {"step", "checkpoint", "validation"} with the lowest finite first figure (ties keep the earlier step)."""
    with _inference_networks(stage, ema) as networks:
        figures = {name: float(value) for name, value in stage.validate(networks).items()}
    if not figures:  # a stage that validates only where it has held-out data
        return best
    if any(name.endswith(LONG) for name in ema):  # the longer EMA's figures beside, to choose its length afterwards
        with _inference_networks(stage, ema, LONG) as networks:
            figures.update({f"{name}_ema_long": float(value) for name, value in stage.validate(networks).items()})
    rows.append({"step": step, **figures})
    _write_log(out / "validation.csv", ["step", *figures], rows)
    for name, value in figures.items():
        if writer is not None:
            writer.add_scalar(f"val/{name}", value, step)
    score = next(iter(figures.values()))
    if math.isfinite(score) and (best is None or score < next(iter(best["validation"].values()))):
        best = {"step": step, "checkpoint": str(out / ckpt.CHECKPOINTS_DIR / f"step-{step:08d}"), "validation": figures}
    return best
