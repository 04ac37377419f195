"""A GAN baseline in the autoencoder's latent space: R3GAN's relativistic pairing loss with R1 and R2 penalties.

Latent space, not image space, and why: the GAN learns the same scaled latents (4 x 10 x 12 x 10 at
4 mm) of the same autoencoder as the flow, the diffusion baseline and the DiT, so comparing them
isolates the generative family (decoder, data and evaluation are shared); and a 3D image-space GAN
(HA-GAN's hierarchy, R3GAN's networks on 40 x 48 x 40 volumes and up) needs GPU-days, far beyond a
2-core CPU in the time a benchmark has.

The generator is the shared VelocityNet read as a one-step map from noise to data,
G(ε, c) = VelocityNet(ε, t = 0, c) with ε ~ N(0, I) of the latent's shape, so it has the other
families' covariate conditioning, checkpoint layout (EMA weights under "velocity."), export and
`generate`, at matched parameters; its zero-initialised layers (a regression's start) are given random
weights first (`init_generator`), since samples that all start as the same latent get no gradient that
tells them apart. The critic D is mriflow.models.critic.LatentCritic, with a minibatch standard-deviation
channel that lets it see a batch without variety (with neither of the two, every 4 mm sample came out
as nearly the same brain). Pairing the
i-th real latent z_i of a batch with the i-th fake x_i = G(ε_i, c_i) (R3GAN, Huang et al. 2024;
relativistic pairing, Jolicoeur-Martineau 2018; R1/R2, Mescheder et al. 2018), f = softplus:

    L_D = E[ f(D(x, c) − D(z, c)) ] + γ/2 · E[ ‖∇_z D(z, c)‖² + ‖∇_x D(x, c)‖² ]      (R1 on real, R2 on fake)
    L_G = E[ f(D(z, c) − D(x, c)) ]

The critic and both losses run in fp32 (autocast off); the penalties are differentiated through
(create_graph). Covariates are dropped with probability objective.covariate_drop_prob by this family,
the same mask for the generator and the critic (model.covariate_drop_prob must be 0), so G also learns
the distribution given fewer covariates, which `generate` draws when one is left out; there is no
classifier-free guidance. Each batch runs the phases "velocity" (G) then "critic"; the critic reuses
the G phase's fakes, and the loop steps both optimizers after both phases (simultaneous updates,
locally convergent with the zero-centred penalties, Mescheder et al. 2018).

    >>> train_generator("gan", "prepared/", "runs/ae", "runs/gan", condition=["age", "sex"], preset="tiny")
    >>> generate("runs/gan", "samples/", n=8, covariates={"age": 45})   # one network evaluation per sample
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mriflow.config import LoopConfig
from mriflow.distributed import unwrap
from mriflow.families.base import Family, check_choice
from mriflow.flow.sampling import broadcast_covariates
from mriflow.models.conditioning import drop_covariates
from mriflow.models.critic import CriticConfig, LatentCritic
from mriflow.models.velocity import VelocityNetConfig
from mriflow.utils.seeding import batch_generators, per_sample_normal

SOLVERS = ("generator",)  # one evaluation of G: nothing to integrate


def critic_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing loss of the critic, per pair: softplus(D(fake) − D(real))."""
    return F.softplus(fake_logits - real_logits)


def generator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing loss of the generator, per pair: softplus(D(real) − D(fake))."""
    return F.softplus(real_logits - fake_logits)


def gradient_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """‖∇_x D(x)‖² per sample (B,) of ∇ Σ_i D(x_i), differentiable (create_graph): R1 on real inputs, R2 on fake
    ones. `inputs` must require gradients and `logits` (B,) be computed from them."""
    gradient, = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return gradient.square().flatten(1).sum(1)


@dataclass(frozen=True)
class GanObjectiveConfig:
    gamma: float = 0.5  # weight of R1 + R2 (L_D adds γ/2 each); scales with the latent's size as in R3GAN
    covariate_drop_prob: float = 0.1  # each covariate dropped (for G and D alike) with this probability

    def __post_init__(self) -> None:
        if self.gamma < 0 or not 0.0 <= self.covariate_drop_prob < 1.0:
            raise ValueError(f"objective.gamma must be >= 0 and objective.covariate_drop_prob in [0, 1); got "
                             f"{self.gamma}, {self.covariate_drop_prob}")


@dataclass(frozen=True)
class GanSamplingConfig:
    """A GAN samples in one evaluation: no steps to choose, no guidance (see GAN.check_sampling)."""

    solver: str = "generator"
    steps: int = 1
    guidance: float = 1.0

    def __post_init__(self) -> None:
        check_choice("sampling.solver", self.solver, SOLVERS)
        if self.steps != 1 or self.guidance != 1.0:
            raise ValueError(f"sampling.steps and sampling.guidance must be 1 for a GAN, got {self.steps}, {self.guidance}")


@dataclass(frozen=True)
class GanTrainingConfig:
    # covariate_names/kinds/categories of the model (and so of the critic) are filled from `condition`
    model: VelocityNetConfig = VelocityNetConfig(covariate_drop_prob=0.0)
    critic: CriticConfig = CriticConfig()
    objective: GanObjectiveConfig = GanObjectiveConfig()
    sampling: GanSamplingConfig = GanSamplingConfig()
    loop: LoopConfig = LoopConfig(lr=2e-4, betas=(0.0, 0.99), warmup_steps=0, min_lr_ratio=0.25)

    def __post_init__(self) -> None:
        if self.model.covariate_drop_prob != 0.0:
            raise ValueError(f"model.covariate_drop_prob must be 0 for a GAN, got {self.model.covariate_drop_prob}: "
                             "it drops covariates itself (objective.covariate_drop_prob), the same for G and its critic")


class GAN(Family):
    name = "gan"
    summary = "baseline: a GAN (R3GAN losses, R1/R2) in the same latent space, same network and conditioning"
    Config = GanTrainingConfig
    solvers = SOLVERS
    metric_names = ("generator_loss", "critic_loss", "r1", "r2", "real_minus_fake")
    label_conditioning = False  # the critic does not see a label map, so nothing would hold G to it

    def __init__(self, config: GanTrainingConfig):
        super().__init__(config)
        self._fakes: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the G phase's, for the critic phase

    def init_generator(self, net: nn.Module) -> None:
        """Every all-zero weight (MONAI's U-Net and the DiT zero-initialise their output and residual layers, as a
        regression starts from 0) gets its layer's default initialisation: otherwise every sample starts as the
        same latent, no gradient tells them apart, and the generator stays collapsed."""
        for module in net.modules():
            if isinstance(module, (nn.Conv3d, nn.Linear)) and not module.weight.any():
                module.reset_parameters()

    def extra_networks(self, latent_shape: Sequence[int]) -> dict[str, nn.Module]:
        model = self.config.model
        return {"critic": LatentCritic(self.config.critic, latent_shape, model.covariate_kinds,
                                       model.covariate_categories)}

    def phase_loss(self, phase, networks, latents, covariates, covariates_present):
        if phase == "velocity":
            return self._generator_phase(networks, latents, covariates, covariates_present)
        if phase == "critic":
            return self._critic_phase(networks["critic"], latents, covariates)
        raise ValueError(f"the gan family has no training phase {phase!r}")

    def _generator_phase(self, networks: Mapping[str, nn.Module], latents: torch.Tensor,
                         covariates: torch.Tensor | None, present: torch.Tensor | None):
        if present is not None and self.config.objective.covariate_drop_prob > 0:
            present = drop_covariates(present.bool(), self.config.objective.covariate_drop_prob)
        noise = torch.randn_like(latents, dtype=torch.float32)  # (B, C, d, h, w)
        fake = networks["velocity"](noise, torch.zeros(len(latents), device=latents.device), covariates, present)
        critic = unwrap(networks["critic"])  # frozen in this phase: no DDP synchronisation
        with torch.autocast(latents.device.type, enabled=False):
            # real and fake batches apart: the critic may compare the samples of a batch (minibatch_std_group)
            real_logits = critic(latents.float(), covariates, present)
            fake_logits = critic(fake.float(), covariates, present)
            loss = generator_loss(real_logits, fake_logits).mean()
        self._fakes = (fake.detach().float(), present)
        return loss, {"generator_loss": loss.detach()}

    def _critic_phase(self, critic: nn.Module, latents: torch.Tensor, covariates: torch.Tensor | None):
        if self._fakes is None:
            raise RuntimeError("the critic phase needs the generator phase's fakes of the same batch; run it first")
        (fake, present), self._fakes = self._fakes, None
        gamma = self.config.objective.gamma
        with torch.autocast(latents.device.type, enabled=False):
            real = latents.detach().float().requires_grad_(True)
            fake = fake.requires_grad_(True)
            real_logits, fake_logits = critic(real, covariates, present), critic(fake, covariates, present)
            r1 = gradient_penalty(real_logits, real) if gamma > 0 else torch.zeros_like(real_logits)
            r2 = gradient_penalty(fake_logits, fake) if gamma > 0 else torch.zeros_like(fake_logits)
            loss = (critic_loss(real_logits, fake_logits) + gamma / 2 * (r1 + r2)).mean()
        return loss, {"critic_loss": loss.detach(), "r1": r1.detach().mean(), "r2": r2.detach().mean(),
                      "real_minus_fake": (real_logits - fake_logits).detach().mean()}

    def check_sampling(self, settings: Mapping[str, Any]) -> None:
        if float(settings["guidance"]) != 1.0:
            raise ValueError(f"--guidance {settings['guidance']:g}: a GAN has no classifier-free guidance; "
                             "leave --guidance out (or give 1)")
        if int(settings["steps"]) != 1:
            raise ValueError(f"--steps {settings['steps']}: a GAN draws a sample in one network evaluation; "
                             "leave --steps out (or give 1)")

    @torch.no_grad()
    def sample(self, net: nn.Module, shape: Sequence[int], covariates, settings: Mapping[str, Any],
               device: torch.device | str, sample_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        self.check_sampling(settings)
        noise = per_sample_normal(batch_generators(0, 0, shape[0], sample_seeds), shape[1:]).to(device)
        values, present = broadcast_covariates(covariates, shape[0], device)
        return net(noise, torch.zeros(shape[0], device=device), values, present), 1
