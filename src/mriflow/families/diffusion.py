"""The DDPM/DDIM baseline: L = E ‖f(x_t, t, c) − (ε or v)‖ on the same network, sampled by DDIM or DDPM.

The path (VPDiffusionPath: β schedule, target, conversions), the loss and the samplers live in
mriflow.flow.diffusion; this module is their configuration and the `Family` that ties them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mriflow.config import from_dict
from mriflow.families.base import Family, check_choice
from mriflow.flow.diffusion import BETA_SCHEDULES, METHODS, PREDICTIONS, VPDiffusionPath, diffusion_loss, sample_diffusion
from mriflow.flow.objective import LOSSES
from mriflow.models.velocity import VelocityNetConfig
from mriflow.config import LoopConfig


@dataclass(frozen=True)
class DiffusionObjectiveConfig:
    """The VPDiffusionPath (β schedule, prediction target) and the regression loss of the baseline."""

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"  # "linear_beta" | "scaled_linear_beta" | "cosine"
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    prediction: str = "v"  # "v" | "epsilon"
    loss: str = "l2"

    def __post_init__(self) -> None:
        check_choice("diffusion.schedule", self.schedule, BETA_SCHEDULES)
        check_choice("diffusion.prediction", self.prediction, PREDICTIONS)
        check_choice("diffusion.loss", self.loss, LOSSES)

    def make_path(self) -> VPDiffusionPath:
        return VPDiffusionPath(self.num_train_timesteps, self.schedule, self.beta_start, self.beta_end, self.prediction)


@dataclass(frozen=True)
class DiffusionSamplingConfig:
    """Default sampler of a trained baseline (mriflow.flow.diffusion.sample_diffusion); also draws the montages."""

    solver: str = "ddim"  # "ddim" (η = 0) | "ddpm" (η = 1)
    steps: int = 50
    guidance: float = 1.0

    def __post_init__(self) -> None:
        check_choice("sampling.solver", self.solver, METHODS)
        if self.steps < 1:
            raise ValueError(f"sampling.steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class DiffusionTrainingConfig:
    model: VelocityNetConfig = VelocityNetConfig(time_scale=1.0)
    diffusion: DiffusionObjectiveConfig = DiffusionObjectiveConfig()
    sampling: DiffusionSamplingConfig = DiffusionSamplingConfig()
    loop: LoopConfig = LoopConfig()

    def __post_init__(self) -> None:
        if self.model.time_scale != 1.0:
            raise ValueError(f"model.time_scale must be 1.0 for diffusion (the network sees the integer timesteps "
                             f"0 … T − 1), got {self.model.time_scale}")


def diffusion_path(config: Mapping[str, Any], where: str = "config") -> VPDiffusionPath:
    """The VPDiffusionPath of a diffusion run's config["diffusion"]: either the path's fields
    themselves (beside other training fields) or {"schedule": {fields}, "prediction": "v" | "epsilon"}."""
    if "diffusion" not in config:
        raise ValueError(f"{where}: a diffusion checkpoint needs config.diffusion (its noise schedule)")
    section = config["diffusion"]
    fields = {f.name for f in dataclasses.fields(VPDiffusionPath)}
    if isinstance(section.get("schedule"), Mapping):
        values = {**section["schedule"], **({"prediction": section["prediction"]} if "prediction" in section else {})}
    else:
        values = {k: v for k, v in section.items() if k in fields}
    if "prediction" not in values:  # a wrong guess would decode noise: never default it
        raise ValueError(f"{where}: config.diffusion does not say what the network predicts ('prediction': 'v' or 'epsilon')")
    return from_dict(VPDiffusionPath, values, f"{where}: config.diffusion")


class Diffusion(Family):
    name = "diffusion"
    summary = "baseline: DDPM in the same latent space, same network and conditioning"
    Config = DiffusionTrainingConfig
    solvers = METHODS

    def __init__(self, config: DiffusionTrainingConfig, path: VPDiffusionPath | None = None):
        super().__init__(config)
        self.path = path or config.diffusion.make_path()

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str = "config") -> "Diffusion":
        """Also reads the nested {"schedule": {...}, "prediction": ...} form some checkpoints store."""
        path = diffusion_path(values, where)
        section = dict(values["diffusion"])
        if isinstance(section.get("schedule"), Mapping):
            section = {**section.pop("schedule"), **section}
        config = from_dict(cls.Config, {**values, "diffusion": section}, where)
        return cls(config, path)

    def loss(self, net, latents, covariates, covariates_present):
        return diffusion_loss(net, self.path, latents, covariates, covariates_present, loss=self.config.diffusion.loss)

    def sample(self, net: nn.Module, shape: Sequence[int], covariates, settings: Mapping[str, Any],
               device: torch.device | str, sample_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        return sample_diffusion(net, self.path, shape, covariates, method=settings["solver"], steps=settings["steps"],
                                guidance=settings["guidance"], device=device, sample_seeds=sample_seeds)
