"""A toy generative family, written as a user would add one: this file plus one line in FAMILIES.

One-step regression: the network maps noise x0 straight to data at t = 0, L = ‖f(x0, 0, c) − x1‖²,
and samples in one evaluation. It learns only the mean, which is enough to prove the plumbing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mriflow.families.base import Family
from mriflow.flow.sampling import broadcast_covariates
from mriflow.utils.seeding import batch_generators, per_sample_normal
from mriflow.models.velocity import VelocityNetConfig
from mriflow.config import LoopConfig


@dataclass(frozen=True)
class OneStepSampling:
    solver: str = "one_step"
    steps: int = 1
    guidance: float = 1.0


@dataclass(frozen=True)
class OneStepConfig:
    model: VelocityNetConfig = VelocityNetConfig()
    sampling: OneStepSampling = OneStepSampling()
    loop: LoopConfig = LoopConfig()


class OneStep(Family):
    name = "onestep"
    summary = "toy: noise to data in one network evaluation"
    Config = OneStepConfig
    solvers = ("one_step",)

    def loss(self, net, latents, covariates, covariates_present):
        noise = torch.randn_like(latents)
        zero = torch.zeros(latents.shape[0], device=latents.device)
        return (net(noise, zero, covariates, covariates_present) - latents).square().mean()

    @torch.no_grad()
    def sample(self, net, shape, covariates, settings, device, sample_seeds=None):
        noise = per_sample_normal(batch_generators(0, 0, shape[0], sample_seeds), shape[1:]).to(device)
        values, present = broadcast_covariates(covariates, shape[0], device)
        return net(noise, torch.zeros(shape[0], device=device), values, present), 1
