"""The contract of a generative family: how a latent generator learns and how it samples.

Both go through the family's probability path (`path`, mriflow.flow.path.ProbabilityPath): the
loss builds x_t and the target with it, the sampler reads the network's output through it.
Everything else is shared by every family: the network (VelocityNet, whatever its output
means), the cached latents, the training loop, checkpoints, and what `generate` writes.

    family = FAMILIES["flow"](config)                    # config: the family's training config
    loss = family.loss(net, latents, covariates, present)                # one scalar to minimise
    latents, nfe = family.sample(net, shape, covariates, settings, device, sample_seeds)

A family that trains more than the generator (the GAN's critic) brings those networks with
`extra_networks` and their losses with `phase_loss`: each is a training phase with its own optimizer,
saved with the training state but never with the inference weights (the generator's EMA copy alone).
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
             family that is no path between noise and data (a one-step regressor, a GAN)
    metric_names  the columns of its training log, the first shown in the progress bar (default: "loss")
    label_conditioning  whether `train --label-condition` can train it (False: refused before anything is made)
    space    "latent": it samples the autoencoder's latents, which `generate` decodes (every family but one);
             "image": it samples image intensities in [-1, 1] itself and has no autoencoder (the slice model,
             trained by mriflow.train.slices)
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    Config: ClassVar[type]
    solvers: ClassVar[tuple[str, ...]]
    path: ProbabilityPath | None = None
    metric_names: ClassVar[tuple[str, ...]] = ("loss",)
    label_conditioning: ClassVar[bool] = True
    space: ClassVar[str] = "latent"  # "latent" | "image"

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

    def check_sampling(self, settings: Mapping[str, Any]) -> None:
        """Refuse sampler settings the family has no use for (e.g. guidance without classifier-free training), in one
        line naming the option; `generate` calls it before anything is written. Default: accept."""

    # ---- optional: networks trained beside the generator (default: none) ----

    def init_generator(self, net: nn.Module) -> None:
        """Change the freshly built generator's initial weights in place, before training (default: as built)."""

    def extra_networks(self, latent_shape: Sequence[int]) -> dict[str, nn.Module]:
        """Networks trained beside the generator, by name (a GAN's {"critic": ...}), for latents (C, d, h, w).

        Each is a training phase of its own, run after the generator's phase ("velocity") on every batch with one
        optimizer (the loop's learning rate and betas) and its loss from `phase_loss`. Checkpoints keep them in
        train_state.safetensors (network, optimizer), so a resumed run continues exactly; model.safetensors holds
        the generator's EMA weights alone, which is all `generate` loads. Default: none."""
        return {}

    def phase_loss(self, phase: str, networks: Mapping[str, nn.Module], latents: torch.Tensor,
                   covariates: torch.Tensor | None, covariates_present: torch.Tensor | None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """The loss of training phase `phase` and its metrics to log (names from `metric_names`), or None to skip the
        phase at this step. Phase "velocity" trains the generator networks["velocity"], any other phase the network
        of `extra_networks` by that name; `networks` are the training networks (DDP-wrapped under torchrun;
        mriflow.distributed.unwrap gives the bare module). Default: `loss`, logged as "loss"."""
        loss = self.loss(networks["velocity"], latents, covariates, covariates_present)
        return loss, {"loss": loss.detach()}
