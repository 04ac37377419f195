"""Few-step students of a trained flow: the teacher's ODE drawn once into pairs, then a copy of it trained to go from
noise to the teacher's sample in 1 or 2 network evaluations (issue 27).

Two objectives on the same pairs, both a velocity field v(x, t, c) of the teacher's network, family and path (a
network that predicts the data or EDM's preconditioned output is read as the velocity its path gives), initialised
from the teacher's weights and sampled by Euler's method on the teacher's time grid (its shift):

    reflow    2-rectified flow (Liu et al. 2023, InstaFlow): x_t = t·x1' + (1 − t)·x0 on the straight line between a
              pair's noise x0 and the teacher's sample x1' from it, at the teacher's training times; target x1' − x0.
              The pairs' lines do not cross the way independent noise/data lines do, so a few Euler steps follow them,
              and more steps still trade time for quality.
    distill   only at the `steps` grid times t_k of the student's sampler: from the teacher's own trajectory point
              x(t_k) the velocity that lands on its point x(t_k+1): (x(t_k+1) − x(t_k)) / (t_k+1 − t_k). One
              evaluation from noise to the sample at steps 1 (a direct distillation), Euler's k steps on the teacher's
              path beyond.

The pairs (PAIRS_DIR in the run folder: shards of each seed's trajectory at the grid points of 1, 2 and 4 steps, the
covariates it was drawn with) are drawn with the teacher's own sampler and guidance, covariates drawn at random from
the teacher's schema (ranges and categories, each left absent with ABSENT_PROBABILITY so the student also learns the
teacher's unconditional model); the last `validation_pairs` are held out: the student's samples from their noise
against the teacher's select the checkpoint (`val_latent_mse`). The student's covariates are never dropped in training
and it samples with guidance 1: the teacher's guidance is in its samples (config `fewstep`).

    >>> teacher = load_generator("2mm", device="cpu")
    >>> train_fewstep(teacher, "runs/fewstep", method="reflow", steps=2, pairs=512)
    >>> generate("runs/fewstep", out="samples", n=8)         # Euler, 2 steps, as the run's config says
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from mriflow import checkpoint as ckpt
from mriflow import distributed
from mriflow.config import LoopConfig, from_dict, to_dict
from mriflow.families import get_family
from mriflow.families.flow import FewStepConfig, FlowSamplingConfig
from mriflow.flow.guidance import guided_prediction
from mriflow.flow.path import sample_time, time_grid
from mriflow.flow.sampling import evaluating, integrate
from mriflow.flow.solvers import solve
from mriflow.models.velocity import VelocityNet
from mriflow.train import loop
from mriflow.utils.files import atomic_path
from mriflow.utils.seeding import per_sample_normal, sample_generators, sample_seed
from mriflow.utils.text import counted

PAIRS_DIR = "pairs"
STORED_STEPS = (1, 2, 4)  # the student grids whose points the pairs keep (each a subset of the teacher's grid)
ABSENT_PROBABILITY = 0.1  # each covariate of a pair is left absent this often (the teacher's unconditional model)
SHARD = 32  # pairs per file
METHODS = ("reflow", "distill")


# ---- the pairs ----------------------------------------------------------------------------------


def stored_indices(teacher_steps: int) -> list[int]:
    """Indices into the teacher's grid (teacher_steps + 1 points) of every point of the STORED_STEPS grids it contains."""
    return sorted({k * teacher_steps // n for n in STORED_STEPS if teacher_steps % n == 0 for k in range(n + 1)})


def random_requests(schema, count: int, seed: int) -> list[dict[str, Any]]:
    """`count` covariate requests {name: value} drawn from the schema: a continuous one uniform over its training range
    (its mean ± 2 sd when the range is unknown), a categorical one uniform over its categories; each absent with
    ABSENT_PROBABILITY. Request i depends on (seed, i) alone."""
    requests = []
    for index in range(count):
        rng = np.random.default_rng(sample_seed(seed, index))
        request: dict[str, Any] = {}
        for covariate in schema.covariates:
            if rng.random() < ABSENT_PROBABILITY:
                continue
            if covariate.kind == "categorical":
                request[covariate.name] = covariate.categories[int(rng.integers(len(covariate.categories)))]
            else:
                low, high = covariate.minimum, covariate.maximum
                if not (np.isfinite(low) and np.isfinite(high)):
                    low, high = covariate.mean - 2 * covariate.std, covariate.mean + 2 * covariate.std
                request[covariate.name] = float(rng.uniform(low, high))
        requests.append(request)
    return requests


def teacher_record(teacher) -> dict[str, Any]:
    """What the pairs were drawn from: the teacher's checkpoint, checksum and sampler settings."""
    settings = teacher.sampling_settings()
    return {"path": str(Path(teacher.path).resolve()), "model_sha256": teacher.model_checksum.removeprefix("sha256:"),
            "model_id": teacher.model_id, "sampling": settings}


def draw_pairs(teacher, directory: str | Path, count: int, seed: int = 0, batch_size: int = 8) -> dict[str, Any]:
    """Draw `count` teacher trajectories into `directory` (shards of SHARD; shards already there are kept, so an
    interrupted call continues); returns the index {"teacher", "count", "seed", "times", "indices", "shards"}.
    Pair i starts from the noise of sample_seed(seed, i), as `generate` draws sample i of seed `seed`."""
    from mriflow.models.conditioning import resolve_request

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    record = teacher_record(teacher)
    settings = record["sampling"]
    if settings["solver"] not in ("euler", "heun", "midpoint") or teacher.family.path is None:
        raise ValueError(f"the teacher {teacher.path} samples with {settings['solver']!r}; a few-step student needs a "
                         "flow sampled on a fixed grid (euler, heun or midpoint)")
    grid = time_grid(settings["steps"], settings.get("time_shift", 1.0))
    indices = stored_indices(settings["steps"])
    index_file = directory / "index.json"
    index = {"teacher": record, "count": count, "seed": seed, "times": [float(grid[i]) for i in indices],
             "indices": indices, "shards": []}
    if index_file.is_file():
        saved = json.loads(index_file.read_text())
        if saved.get("teacher", {}).get("model_sha256") != record["model_sha256"] or saved.get("seed") != seed:
            raise ValueError(f"{directory} holds pairs of another teacher or seed ({saved.get('teacher', {}).get('path')}); "
                             "use another --out for this teacher")
        index["shards"] = [s for s in saved.get("shards", []) if (directory / s["file"]).is_file()]
    done = sum(s["count"] for s in index["shards"])
    requests = random_requests(teacher.schema, count, seed)
    net, path = teacher.velocity_net, teacher.family.path
    progress = tqdm(total=count, initial=min(done, count), unit="pair", desc="teacher pairs", dynamic_ncols=True)
    with evaluating(net):
        while done < count:
            size = min(SHARD, count - done)
            points, values, present = [], [], []
            for first in range(done, done + size, batch_size):
                rows = range(first, min(first + batch_size, done + size))
                encoded = [resolve_request(teacher.schema, requests[i]) for i in rows]
                v = torch.stack([e[0] for e in encoded]).to(teacher.device, torch.float32)
                p = torch.stack([e[1] for e in encoded]).to(teacher.device)
                x = per_sample_normal(sample_generators(seed, first, len(rows)), teacher.latent_shape).to(teacher.device)
                predict = guided_prediction(net, v, p, settings["guidance"])
                trajectory = [x]
                for a, b in zip(indices[:-1], indices[1:]):  # the teacher's sampler, cut at the stored points
                    x = teacher_segment(predict, x, settings["solver"], path, grid[a:b + 1].to(teacher.device),
                                        last=b == indices[-1])
                    trajectory.append(x)
                points.append(torch.stack(trajectory, 1).float().cpu())
                values.append(v.cpu())
                present.append(p.cpu())
                progress.update(len(rows))
            name = f"shard-{len(index['shards']):05d}.safetensors"
            tensors = {"trajectory": torch.cat(points).contiguous(), "values": torch.cat(values).contiguous(),
                       "present": torch.cat(present).to(torch.uint8).contiguous()}
            with atomic_path(directory / name) as partial:
                save_file(tensors, str(partial))
            index["shards"].append({"file": name, "first": done, "count": size})
            done += size
            with atomic_path(index_file) as partial:
                partial.write_text(json.dumps(index, indent=1))
    progress.close()
    with atomic_path(index_file) as partial:
        partial.write_text(json.dumps(index, indent=1))
    return index


def teacher_segment(predict, x: torch.Tensor, solver: str, path, t_steps: torch.Tensor, last: bool) -> torch.Tensor:
    """The teacher's sampler (mriflow.flow.sampling.integrate) over one piece of its grid: the same steps as in one
    call, since its solvers are one-step methods; a data prediction's jump onto t = 1 only on the last piece."""
    if last or path.prediction != "data":
        return integrate(predict, x, solver, path, t_steps, 1e-5, 1e-5)[0]
    return solve(lambda y, t: path.convert(predict(y, t), y, t, "data", "velocity"), x, solver, t_steps=t_steps)[0]


class TeacherPairs(Dataset):
    """The pairs of a PAIRS_DIR as training items {"trajectory" (P, C, d, h, w), "covariates", "covariates_present"};
    `rows` selects pairs by their number."""

    def __init__(self, directory: str | Path, rows: Sequence[int] | None = None):
        directory = Path(directory)
        self.index = json.loads((directory / "index.json").read_text())
        shards = [load_file(str(directory / s["file"])) for s in self.index["shards"]]
        if not shards:
            raise ValueError(f"{directory}: no teacher pairs drawn yet")
        self.trajectory = torch.cat([s["trajectory"] for s in shards])
        self.values = torch.cat([s["values"] for s in shards])
        self.present = torch.cat([s["present"] for s in shards]).bool()
        self.rows = list(range(len(self.trajectory))) if rows is None else list(rows)
        self.times = torch.tensor(self.index["times"], dtype=torch.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        row = self.rows[index]
        return {"trajectory": self.trajectory[row], "covariates": self.values[row], "covariates_present": self.present[row]}


# ---- the student ---------------------------------------------------------------------------------


def grid_positions(times: Sequence[float], steps: int, shift: float) -> list[int]:
    """Positions in the pairs' stored `times` of the student's grid of `steps` Euler steps."""
    wanted = time_grid(steps, shift, dtype=torch.float64).tolist()
    positions = []
    for t in wanted:
        match = [i for i, stored in enumerate(times) if abs(stored - t) < 1e-6]
        if not match:
            raise ValueError(f"the pairs keep the teacher's trajectory at {', '.join(f'{s:.3f}' for s in times)}, not at "
                             f"the {steps}-step grid's t = {t:.3f}; choose --steps among those that divide the teacher's")
        positions.append(match[0])
    return positions


class FewStepStage:
    """A few-step student as a `loop.Stage` (see the module docstring for the two objectives)."""

    ema_networks = ("velocity",)
    metric_names = ("loss",)

    def __init__(self, family, student: VelocityNet, times: Sequence[float], decode=None,
                 validation: TeacherPairs | None = None):
        self.family, self.config = family, family.config
        self.networks: dict[str, nn.Module] = {"velocity": student}
        self.phases = {"velocity": [{"params": list(student.parameters())}]}
        fewstep, sampling = self.config.fewstep, self.config.sampling
        self.method, self.steps = fewstep.method, fewstep.steps
        self.grid = time_grid(fewstep.steps, sampling.time_shift)
        self.positions = grid_positions(times, fewstep.steps, sampling.time_shift)
        self.decode, self.validation = decode, validation

    def loss(self, phase: str, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        net, path = self.networks["velocity"], self.family.path
        trajectory = batch["trajectory"]  # (B, P, C, d, h, w)
        batch_size = trajectory.shape[0]
        if self.method == "reflow":
            objective = self.config.objective
            t = sample_time(batch_size, objective.time_distribution, objective.time_mean, objective.time_std,
                            objective.time_shift, device=trajectory.device)
            x0, x1 = trajectory[:, 0], trajectory[:, -1]
            x_t = path.sample_xt(x0, x1, t)
            target = x1 - x0
        else:
            k = torch.randint(self.steps, (batch_size,), device=trajectory.device)
            here = torch.tensor(self.positions[:-1], device=trajectory.device)[k]
            there = torch.tensor(self.positions[1:], device=trajectory.device)[k]
            rows = torch.arange(batch_size, device=trajectory.device)
            x_t = trajectory[rows, here]
            grid = self.grid.to(trajectory.device)
            t, dt = grid[k], (grid[k + 1] - grid[k])
            target = (trajectory[rows, there] - x_t) / dt.reshape(-1, *([1] * (x_t.ndim - 1)))
        prediction = net(x_t, t, batch["covariates"], batch["covariates_present"])
        velocity = path.convert(prediction.float(), x_t, t, path.prediction, "velocity")  # as the sampler reads it
        loss = (velocity - target.float()).square().flatten(1).mean(1).mean()
        return loss, {"loss": loss.detach()}

    def student_sample(self, net: nn.Module, x0: torch.Tensor, values: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Euler's `steps` steps from noise x0 (B, C, d, h, w) with the student."""
        predict = guided_prediction(net, values, present, 1.0)
        with evaluating(net):
            return integrate(predict, x0, "euler", self.family.path, self.grid.to(x0.device), 1e-5, 1e-5)[0]

    def validate(self, networks: dict[str, nn.Module]) -> dict[str, float]:
        """Mean squared latent error of the student's samples against the teacher's, on the held-out pairs."""
        if self.validation is None or len(self.validation) == 0:
            return {}
        net = networks["velocity"]
        device = next(net.parameters()).device
        errors = []
        for first in range(0, len(self.validation), 8):
            items = [self.validation[i] for i in range(first, min(first + 8, len(self.validation)))]
            trajectory = torch.stack([item["trajectory"] for item in items]).to(device)
            values = torch.stack([item["covariates"] for item in items]).to(device)
            present = torch.stack([item["covariates_present"] for item in items]).to(device)
            sample = self.student_sample(net, trajectory[:, 0], values, present)
            errors.append((sample - trajectory[:, -1]).square().flatten(1).mean(1))
        return {"val_latent_mse": float(torch.cat(errors).mean())}

    @torch.no_grad()
    def montage(self, batch: dict, networks: dict[str, nn.Module]) -> dict[str, np.ndarray] | None:
        if self.decode is None:
            return None
        trajectory = batch["trajectory"][:1].float()
        sample = self.student_sample(networks["velocity"], trajectory[:, 0], batch["covariates"][:1],
                                     batch["covariates_present"][:1])
        return {"teacher": self.decode(trajectory[:, -1])[0], f"student, {counted(self.steps, 'step')}": self.decode(sample)[0]}


def student_config(teacher_config: Mapping[str, Any], method: str, steps: int, teacher_guidance: float,
                   loop_config: LoopConfig):
    """The student's training config: the teacher's network and objective, covariates never dropped, sampled with
    Euler's `steps` steps on the teacher's grid shift, guidance 1, and the few-step record."""
    family = get_family("flow")
    config = from_dict(family.Config, dict(teacher_config), "teacher config")
    if config.fewstep.method:
        raise ValueError("the teacher is itself a few-step student; give the flow it was made from")
    return dataclasses.replace(
        config,
        model=dataclasses.replace(config.model, covariate_drop_prob=0.0),
        sampling=FlowSamplingConfig(solver="euler", steps=steps, guidance=1.0, time_shift=config.sampling.time_shift),
        loop=loop_config,
        fewstep=FewStepConfig(method=method, steps=steps, teacher_guidance=teacher_guidance),
    )


def train_fewstep(
    teacher,
    out: str | Path,
    method: str = "reflow",
    steps: int = 2,
    pairs: int = 512,
    validation_pairs: int | None = None,
    resume: bool = False,
    loop_overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train a few-step student of `teacher` (a loaded generator, mriflow.generator.load_generator) into run folder
    `out`: draw (or complete) its `pairs` teacher pairs in out/pairs (the last `validation_pairs` held out: by
    default a quarter, at most 16), then train with `method` ("reflow" | "distill")
    for `steps` Euler steps. `loop_overrides`: fields of the loop config (max_steps, lr, batch_size, max_minutes,
    max_cpu_minutes, checkpoint_minutes...). A resume keeps the run's own method, steps, pairs and loop config. Returns the
    loop's result ({"step", "metrics", "checkpoint", "best"})."""
    out = Path(out)
    if method not in METHODS:
        raise ValueError(f"--method must be one of {', '.join(METHODS)}; got {method!r}")
    if teacher.stage != "flow" or teacher.family.path is None:
        raise ValueError(f"the teacher {teacher.path} is a {teacher.stage} model; a few-step student is made from a flow")
    if validation_pairs is None:
        validation_pairs = min(16, pairs // 4)
    if validation_pairs < 0 or pairs <= validation_pairs:
        raise ValueError(f"--pairs ({pairs}) must exceed the held-out validation pairs ({validation_pairs})")
    latest = ckpt.latest_checkpoint(out) if resume else None
    if latest is not None:
        _, saved = ckpt.load_checkpoint(latest)
        fewstep = saved["config"].get("fewstep", {})
        if saved.get("fewstep_teacher", {}).get("model_sha256") != teacher.model_checksum.removeprefix("sha256:"):
            raise ValueError(f"{out} was trained from another teacher ({saved.get('fewstep_teacher', {}).get('path')}); "
                             "pass that model to resume")
        method, steps = fewstep.get("method", method), int(fewstep.get("steps", steps))
        record = saved.get("fewstep_teacher", {})  # the run's own pairs, whatever --pairs says now
        pairs, validation_pairs = int(record.get("pairs", pairs)), int(record.get("validation_pairs", validation_pairs))
        loop_config = from_dict(LoopConfig, saved["config"]["loop"], f"{latest}/checkpoint.json loop")
        if loop_overrides:
            loop_config = dataclasses.replace(loop_config, **{k: v for k, v in loop_overrides.items()
                                                              if k in ("max_minutes", "max_cpu_minutes")})
    else:
        defaults = {"max_steps": 1000, "batch_size": 8, "lr": 1e-4, "warmup_steps": 20, "log_every": 10,
                    "checkpoint_every": 100, "montage_every": 500, "checkpoint_minutes": 10.0, "ema_decay": 0.99}
        loop_config = from_dict(LoopConfig, {**defaults, **dict(loop_overrides or {})}, "few-step loop")
    settings = teacher.sampling_settings()
    shift = settings.get("time_shift", 1.0)
    teacher_grid = time_grid(int(settings["steps"]), shift, dtype=torch.float64)
    grid_positions([float(teacher_grid[i]) for i in stored_indices(int(settings["steps"]))], steps, shift)  # before any work
    config = student_config(teacher.meta["config"], method, steps, float(settings["guidance"]), loop_config)
    joined_group = torch.distributed.is_initialized()  # a caller's own process group is left alone
    context = distributed.setup(config.loop.device)
    try:
        if context.is_main:  # under torchrun rank 0 draws the pairs (DistributedSampler shares them out), the rest wait
            draw_pairs(teacher, out / PAIRS_DIR, pairs, seed)
        distributed.barrier()
        return _train(teacher, out, config, pairs, validation_pairs, resume, context)
    finally:
        if not joined_group:
            distributed.teardown()


def _train(teacher, out: Path, config, pairs: int, validation_pairs: int, resume: bool, context) -> dict[str, Any]:
    index = json.loads((out / PAIRS_DIR / "index.json").read_text())
    train_rows = range(0, pairs - validation_pairs)
    data = TeacherPairs(out / PAIRS_DIR, train_rows)
    validation = (TeacherPairs(out / PAIRS_DIR, range(pairs - validation_pairs, pairs))
                  if validation_pairs and context.is_main else None)
    family = get_family("flow")(config)
    student = VelocityNet(config.model)
    student.load_state_dict(teacher.velocity_net.state_dict())
    student.train()
    decode = (lambda z: teacher.decode(z.to(teacher.device))) if context.is_main else None
    stage = FewStepStage(family, student, index["times"], decode, validation)
    meta = {key: value for key, value in teacher.meta.items()
            if key not in ("path", "step", "metrics", "checksums", "exported_from", "model_id", "best", "epoch",
                           "warm_start", "world_size", "grad_accumulation", "batch_size")}
    meta.update({"stage": "flow", "config": to_dict(config), "fewstep_teacher": {**index["teacher"], "pairs": pairs,
                                                                                  "validation_pairs": validation_pairs}})
    if "autoencoder" in meta:  # where this machine has the teacher's autoencoder (an exported model's is relative)
        meta["autoencoder"] = {**meta["autoencoder"], "path": str(ckpt.resolve_checkpoint(
            Path(teacher.path) / meta["autoencoder"]["path"]).resolve())}
    return loop.train(stage, data, config.loop, out, meta, resume=resume, context=context)

