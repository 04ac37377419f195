"""Typed configuration shared by every stage: the template-space grids and YAML presets."""

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
