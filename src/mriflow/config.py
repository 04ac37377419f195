"""Typed configuration shared by every stage: the template-space grids, the training loop's settings
and the YAML presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from importlib import resources
from typing import Any, TypeVar

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
    amp: bool = True  # bf16 autocast on CUDA (no effect on CPU)
    log_every: int = 10
    montage_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # older checkpoints are deleted after a new one is complete
    max_minutes: float = 0.0  # stop (with a checkpoint) after this much wall time; 0 = no limit
    seed: int = 0
    num_workers: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    weights_dtype: str = "float32"  # dtype of model.safetensors: float32 | float16 | bfloat16

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accumulation", "log_every", "montage_every",
                     "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"loop.{name} must be >= 1, got {getattr(self, name)}")
        if self.weights_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"loop.weights_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {self.weights_dtype!r}")


T = TypeVar("T")


def from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build dataclass `cls` from a dict, refusing unknown keys with a message that names them."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)}; valid fields are {', '.join(fields)}")
    kwargs = {}
    for name, value in values.items():
        default = getattr(cls, name, None)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = from_dict(type(default), value, f"{where}.{name}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


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
