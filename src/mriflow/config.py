"""Typed configuration shared by every stage: the template-space grids, the training loop's settings
and the YAML presets."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from importlib import resources
from typing import Any, Mapping, TypeVar

import dacite
import yaml


@dataclass(frozen=True)
class Grid:
    """A template-space voxel grid: isotropic spacing (mm) and shape (voxels), RAS."""

    name: str
    voxel_mm: float
    shape: tuple[int, int, int]


GRIDS: dict[str, Grid] = {
    "4mm": Grid("4mm", 4.0, (40, 48, 40)),
    "2mm": Grid("2mm", 2.0, (80, 96, 80)),
    "1mm": Grid("1mm", 1.0, (160, 192, 160)),
}


def get_grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ValueError(f"unknown preset grid {name!r}; choose one of {', '.join(GRIDS)}")
    return GRIDS[name]


WEIGHT_DTYPES = ("float32", "float16", "bfloat16")  # what model.safetensors may be written in


@dataclass(frozen=True)
class LoopConfig:
    max_steps: int = 1000  # optimizer steps; the cosine schedule ends here
    batch_size: int = 2  # volumes per process per micro-batch
    grad_accumulation: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # peak learning rate of parameter groups that set none
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.99)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05  # the cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max gradient norm per phase; 0 disables
    ema_decay: float = 0.999
    ema_long_decay: float = 0.0  # > 0: a second, longer EMA of the same networks, validated beside the first and kept in
                                 # the training state, so the length is chosen after training (export ..., ema="long")
    amp: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    log_every: int = 10
    montage_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # older checkpoints are deleted after a new one is complete
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit
    max_cpu_minutes: float = 0.0  # stop (with a checkpoint) after this much CPU time of the process in this call
                                  # (thread-minutes: a budget that a busy or paused machine does not shrink); 0 = none
    checkpoint_minutes: float = 0.0  # also checkpoint whenever this much wall time passed since the last one; 0 = off
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    weights_dtype: str = "float32"  # dtype of model.safetensors: float32 | float16 | bfloat16

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accumulation", "log_every", "montage_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if min(self.max_minutes, self.max_cpu_minutes, self.checkpoint_minutes) < 0:
            raise ValueError("loop.max_minutes, loop.max_cpu_minutes and loop.checkpoint_minutes must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0 or not 0.0 <= self.ema_long_decay < 1.0:
            raise ValueError(f"loop.ema_decay and loop.ema_long_decay must lie in [0, 1), got {self.ema_decay} and "
                             f"{self.ema_long_decay}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"loop.weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weights_dtype!r}")


T = TypeVar("T")
_DACITE = dacite.Config(strict=True, cast=[tuple])  # unknown keys refused; YAML/JSON lists become tuples


def from_dict(cls: type[T], values: Mapping[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` (nested dataclasses too) from a dict with dacite, checking every value's type.

    Errors are one line that starts with `where` (a file or "config") and names the key:
    "<where>.objective: unknown field(s) los; valid fields are loss, ..." or
    "<where>: wrong value type for field "loop.lr" - should be "float" instead of value "1e-4" ...".
    """
    try:
        return dacite.from_dict(cls, dict(values), _DACITE)
    except dacite.UnexpectedDataError as error:
        place, owner = _holder_of(cls, values, error.keys, where)
        valid = ", ".join(f.name for f in dataclasses.fields(owner))
        raise ValueError(f"{place}: unknown field(s) {', '.join(sorted(error.keys))}; valid fields are {valid}") from None
    except dacite.DaciteError as error:
        raise ValueError(f"{where}: {error}") from None


def _holder_of(cls: type, values: Mapping[str, Any], keys: set[str], where: str) -> tuple[str, type]:
    """The dotted place and dataclass of the (nested) dict in `values` that holds `keys`, which
    dacite's UnexpectedDataError does not name."""
    hints = typing.get_type_hints(cls)
    if keys <= set(values) - set(hints):
        return where, cls
    for name, value in values.items():
        if isinstance(value, Mapping) and dataclasses.is_dataclass(hints.get(name)):
            try:
                return _holder_of(hints[name], value, keys, f"{where}.{name}")
            except LookupError:
                continue
    raise LookupError(keys)


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON/YAML-ready dict of a (nested) dataclass config; tuples become lists."""

    def plain(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def load_preset(stage: str, name: str) -> dict[str, Any]:
    """Read `presets/<stage>-<name>.yaml` shipped in the package."""
    path = resources.files("mriflow") / "presets" / f"{stage}-{name}.yaml"
    if not path.is_file():
        available = sorted(
            p.name[len(stage) + 1 : -5] for p in (resources.files("mriflow") / "presets").iterdir()
            if p.name.startswith(stage + "-") and p.name.endswith(".yaml")
        )
        raise ValueError(f"unknown {stage} preset {name!r}; available: {', '.join(available) or 'none'}")
    return yaml.safe_load(path.read_text()) or {}
