"""Rectified flow (mriflow's generator): L = E ‖v(x_t, t, c) − (x1 − x0)‖, sampled by an ODE solver; the network
predicts the velocity, or the clean data from which the velocity is read (objective.prediction "data").

The path (LinearPath), the time convention and the objective live in mriflow.flow (path,
objective, solvers, sampling); this module is their configuration and the `Family` that ties them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mriflow.families.base import Family, check_choice
from mriflow.flow.objective import LOSSES, WEIGHTINGS, RectifiedFlowLoss
from mriflow.flow.path import TIME_DISTRIBUTIONS, LinearPath
from mriflow.flow.sampling import sample_latents
from mriflow.flow.solvers import SOLVERS
from mriflow.models.velocity import VelocityNetConfig
from mriflow.config import LoopConfig

PREDICTIONS = ("velocity", "data", "preconditioned")


@dataclass(frozen=True)
class FlowObjectiveConfig:
    """The fields of RectifiedFlowLoss: loss kind, training-time distribution and its shift."""

    loss: str = "l2"  # "l2" | "l1" | "l1_l2" | "pseudo_huber"
    time_distribution: str = "logit_normal"  # "logit_normal" | "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0  # t' = t / (t + s (1 - t)); > 1 for larger latents (mriflow.flow.path.resolution_shift)
    huber_c: float | None = None
    prediction: str = "velocity"  # the network's output: "velocity" | "data" (x-prediction, for image-space bands) |
                                  # "preconditioned" (EDM's skip: data at the noise end, x_t passed through at the data end)
    weighting: str = "none"  # "none" | "min_snr" (min-SNR-γ, mriflow.flow.objective.min_snr_weight)
    min_snr_gamma: float = 5.0
    sigma_floor: float = 0.05  # x-prediction only: the smallest 1 − t a data prediction is divided by

    def __post_init__(self) -> None:
        check_choice("objective.loss", self.loss, LOSSES)
        check_choice("objective.time_distribution", self.time_distribution, TIME_DISTRIBUTIONS)
        check_choice("objective.prediction", self.prediction, PREDICTIONS)
        check_choice("objective.weighting", self.weighting, WEIGHTINGS)
        if self.time_shift <= 0:
            raise ValueError(f"objective.time_shift must be > 0, got {self.time_shift}")
        if self.min_snr_gamma <= 0 or not 0 < self.sigma_floor < 1:
            raise ValueError(f"objective.min_snr_gamma must be > 0 and objective.sigma_floor in (0, 1), got "
                             f"{self.min_snr_gamma}, {self.sigma_floor}")


@dataclass(frozen=True)
class AlignmentConfig:
    """REPA-style feature alignment (mriflow.train.alignment): weight 0 turns it off (REPA's default weight is 0.5); `block`: which U-Net down block is aligned."""

    weight: float = 0.0
    block: int = 0

    def __post_init__(self) -> None:
        if self.weight < 0 or self.block < 0:
            raise ValueError(f"alignment.weight must be >= 0 and alignment.block >= 0, got {self.weight}, {self.block}")


@dataclass(frozen=True)
class FlowSamplingConfig:
    """Default sampler of a trained flow (mriflow.flow.sampling.sample_latents); also draws the montages."""

    solver: str = "heun"
    steps: int = 8
    guidance: float = 1.0
    time_shift: float = 1.0  # the training shift, so the sampling grid matches the times the network learned

    def __post_init__(self) -> None:
        check_choice("sampling.solver", self.solver, SOLVERS)
        if self.steps < 1 or self.time_shift <= 0:
            raise ValueError(f"sampling.steps must be >= 1 and sampling.time_shift > 0, got {self.steps}, {self.time_shift}")


FEWSTEP_METHODS = ("", "reflow", "distill")


@dataclass(frozen=True)
class FewStepConfig:
    """A student drawn in few network evaluations from a trained flow, its teacher (mriflow.train.fewstep): `method`
    "" (not a student), "reflow" (a velocity field trained on the straight lines between the teacher's noise and its
    samples; any number of Euler steps) or "distill" (trained only at the `steps` grid times to jump to the teacher's
    trajectory point at the next). `teacher_guidance`: the guidance scale the teacher's samples were drawn with, which
    the student has learned, so it samples with guidance 1."""

    method: str = ""
    steps: int = 1
    teacher_guidance: float = 1.0

    def __post_init__(self) -> None:
        check_choice("fewstep.method", self.method, FEWSTEP_METHODS)
        if self.steps < 1:
            raise ValueError(f"fewstep.steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class FlowTrainingConfig:
    # covariate_names/kinds/categories of the model are filled from `condition` and the training split
    model: VelocityNetConfig = VelocityNetConfig()
    objective: FlowObjectiveConfig = FlowObjectiveConfig()
    sampling: FlowSamplingConfig = FlowSamplingConfig()
    loop: LoopConfig = LoopConfig()
    representation: str = ""  # "" learns an autoencoder's latents (--autoencoder); "haar2" etc. the images behind a
                              # fixed transform (mriflow.representations), without an autoencoder
    band_equalisation: float = 1.0  # a Haar representation's bands: 1 each scaled to unit sd (noise drowns all at
                                    # once), 0 their natural energies beside the coarsest (fine detail drowns first)
    alignment: AlignmentConfig = AlignmentConfig()  # REPA-style feature alignment (image-space runs; weight 0: off)
    fewstep: FewStepConfig = FewStepConfig()  # a few-step student of a teacher flow (method "": not one)


class RectifiedFlow(Family):
    name = "flow"
    summary = "stage 2: rectified flow in the autoencoder's latent space"
    Config = FlowTrainingConfig
    solvers = SOLVERS

    def __init__(self, config: FlowTrainingConfig):
        super().__init__(config)
        objective = config.objective
        self.path = LinearPath(objective.prediction, objective.sigma_floor if objective.prediction == "data" else 0.0)
        self.objective = RectifiedFlowLoss(**dataclasses.asdict(objective), path=self.path)

    def loss(self, net, latents, covariates, covariates_present):
        return self.objective(net, latents, covariates, covariates_present)

    def check_sampling(self, settings: Mapping[str, Any]) -> None:
        fewstep = getattr(self.config, "fewstep", None)  # the slice model's config has none
        if fewstep is not None and fewstep.method and float(settings["guidance"]) != 1.0:
            raise ValueError(f"--guidance {settings['guidance']:g}: this few-step model learned its teacher's samples at "
                             f"guidance {fewstep.teacher_guidance:g}, which it draws with guidance 1; leave --guidance out, "
                             "or sample the teacher for another scale")

    def sample(self, net: nn.Module, shape: Sequence[int], covariates, settings: Mapping[str, Any],
               device: torch.device | str, sample_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        return sample_latents(net, shape, covariates, solver=settings["solver"], steps=settings["steps"],
                              guidance=settings["guidance"], device=device,
                              time_shift=settings.get("time_shift", 1.0), sample_seeds=sample_seeds, path=self.path)
