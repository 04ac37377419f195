"""The contract of a generative family: how a latent generator learns and how it samples.

Both go through the family's probability path (`path`, mriflow.flow.path.ProbabilityPath): the
loss builds x_t and the target with it, the sampler reads the network's output through it.
Everything else is shared by every family: the network (VelocityNet, whatever its output
means), the cached latents, the training loop, checkpoints, and what `generate` writes.

    family = FAMILIES["flow"](config)                    # config: the family's training config
    loss = family.loss(net, latents, covariates, present)                # one scalar to minimise
    latents, nfe = family.sample(net, shape, covariates, settings, device, sample_seeds)
"""

from __future__ import annotations

from typing import Any, ClassVar, Mapping, Sequence

import torch
from torch import nn

from mriflow.config import from_dict, to_dict
from mriflow.flow.path import ProbabilityPath


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Refuse a config value outside its choices, naming the field and the valid ones."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


class Family:
    """One generative family. A subclass sets the class attributes and implements `loss` and `sample`.

    name     the stage name in checkpoints, presets (<name>-<preset>.yaml) and `mriflow train <name>`
    summary  one line for `mriflow train --help`
    Config   its frozen training-config dataclass with fields model (VelocityNetConfig), sampling
             (the default sampler: solver, steps, guidance and any family-specific keys) and loop
    solvers  the sampler names `generate --solver` accepts for it
    path     its probability path (set by __init__), shared by `loss` and `sample`: x_t, the target, and what
             the network's output means (path.prediction) with the conversions to the other kinds; None for a
             family that is no path between noise and data (a one-step regressor)
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    solvers: ClassVar[tuple[str, ...]]
    path: ProbabilityPath | None = None

    def __init__(self, config: Any):
        self.config = config

    @classmethod
    def from_config(cls, values: Mapping[str, Any], where: str = "config") -> "Family":
        """The family of a checkpoint's stored config (meta["config"]), refusing unknown fields."""
        return cls(from_dict(cls.Config, dict(values), where))

    def default_sampling(self) -> dict[str, Any]:
        """The trained model's default sampler settings (the config's `sampling`)."""
        return to_dict(self.config.sampling)

    def loss(self, net: nn.Module, latents: torch.Tensor, covariates: torch.Tensor | None,
             covariates_present: torch.Tensor | None) -> torch.Tensor:
        """Mean training loss over data latents (B, C, d, h, w); `net` drops covariates itself (guidance)."""
        raise NotImplementedError

    def sample(self, net: nn.Module, shape: Sequence[int], covariates: tuple[torch.Tensor, torch.Tensor] | None,
               settings: Mapping[str, Any], device: torch.device | str,
               sample_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        """Latents (B, C, d, h, w) from noise, one per seed (mriflow.utils.seeding.sample_seed; None: the
        seeds of samples 0 … B − 1 of seed 0), and the network evaluations per sample."""
        raise NotImplementedError
