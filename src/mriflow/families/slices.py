"""The 2D slice model (as PHAROS's): a rectified flow over axial image slices, conditioned on the slice position.

It works in image space, not in an autoencoder's latents: a slice x1 is one axial slice of a prepared
volume with intensities mapped from [0, 1] to [−1, 1], and the objective is the latent flow's
(mriflow.flow: LinearPath, RectifiedFlowLoss, the solvers and sample_latents, all shape-agnostic)

    L = E_{t, x0, x1} ‖v(x_t, t, c, p) − (x1 − x0)‖,    p = k / (D − 1) ∈ [0, 1] the slice's position,

with c the subject's covariates. The axial axis of mriflow's RAS template grid is the last one (S-I:
the affine of mriflow.data.io.template_affine is diagonal), so a 4 mm volume (40, 48, 40) is 40 slices
of 40 × 48, and `volume[..., k]` is slice k from the bottom.

The position enters the network as one constant input channel 2p − 1 (VelocityNetConfig.spatial_channels
= 1, bound with SpatiallyConditioned), not as a covariate: classifier-free guidance drops every covariate
for its unconditional prediction, and that prediction must still know which slice it draws; a channel is
never dropped, and SpatiallyConditioned repeats it for guidance's doubled batch.

Sampling assembles volumes: all D slices of a volume are one batch of 2D samples, each with its position
and the volume's covariates, integrated together. Slice k of sample i starts from the noise stream
sample_seed(s_i, k) of the sample's own seed s_i (mriflow.utils.seeding), so a volume is the same whatever
the batch it is drawn in. Nothing ties neighbouring slices but the position: the inter-slice
inconsistency of 2D models, which mriflow.evaluate.consistency measures.

NFE per volume: the network evaluations on one volume's slices, steps × the solver's evaluations per step
(heun, midpoint: 2 per step), each one batch of the D slices (D times the work of one 2D evaluation).

    >>> family = SliceFlow(SliceTrainingConfig())
    >>> loss = family.loss(net, slices, covariates, present, positions=positions)   # slices (B, 1, H, W)
    >>> volumes, nfe = family.sample(net, (4, 1, 40, 48, 40), covariates, family.default_sampling(), "cpu")
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from mriflow.config import LoopConfig
from mriflow.families.flow import FlowObjectiveConfig, FlowSamplingConfig, RectifiedFlow
from mriflow.flow.sampling import broadcast_covariates, sample_latents
from mriflow.flow.solvers import FIXED_STEP_SOLVERS
from mriflow.models.velocity import SpatiallyConditioned, VelocityNetConfig
from mriflow.utils.seeding import sample_seed
from mriflow.utils.text import counted


@dataclass(frozen=True)
class SliceTrainingConfig:
    # a 2D U-Net on one image channel plus the position channel; covariates filled from `condition`
    model: VelocityNetConfig = VelocityNetConfig(in_channels=1, spatial_dims=2, spatial_channels=1,
                                                 attention_levels=(False, False, True), num_res_blocks=1)
    objective: FlowObjectiveConfig = FlowObjectiveConfig()
    sampling: FlowSamplingConfig = FlowSamplingConfig(solver="midpoint", steps=16)  # measured: slices-tiny.yaml
    loop: LoopConfig = LoopConfig()

    def __post_init__(self) -> None:
        model = self.model
        if (model.spatial_dims, model.in_channels, model.spatial_channels) != (2, 1, 1):
            raise ValueError("model: the slice model is a 2D network on one image channel and one position channel "
                             "(spatial_dims 2, in_channels 1, spatial_channels 1); got spatial_dims "
                             f"{model.spatial_dims}, in_channels {model.in_channels}, spatial_channels {model.spatial_channels}")
        if self.sampling.solver not in FIXED_STEP_SOLVERS:
            raise ValueError(f"sampling.solver must be one of {', '.join(FIXED_STEP_SOLVERS)}, got {self.sampling.solver!r}")


def slice_positions(depth: int) -> torch.Tensor:
    """The normalised positions k / (D − 1) of slices k = 0 … D − 1, (D,) in [0, 1]."""
    return torch.linspace(0.0, 1.0, depth) if depth > 1 else torch.zeros(1)


def with_positions(net: nn.Module, positions: torch.Tensor, size: Sequence[int]) -> SpatiallyConditioned:
    """`net` with each slice's position bound as a constant channel 2p − 1: positions (B,) -> (B, 1, H, W)."""
    channel = (2.0 * positions.float() - 1.0).reshape(-1, 1, *([1] * len(size)))
    return SpatiallyConditioned(net, channel.expand(-1, 1, *size))


class SliceFlow(RectifiedFlow):
    name = "slices"
    summary = "2D rectified flow over axial image slices, conditioned on slice position (no autoencoder)"
    Config = SliceTrainingConfig
    solvers = FIXED_STEP_SOLVERS  # adaptive dopri5 would integrate each slice apart from its volume
    space = "image"
    label_conditioning = False

    def loss(self, net: nn.Module, slices: torch.Tensor, covariates: torch.Tensor | None,
             covariates_present: torch.Tensor | None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Mean flow loss over slices (B, 1, H, W) in [−1, 1] at positions (B,) in [0, 1]."""
        if positions is None or positions.shape != slices.shape[:1]:
            raise ValueError(f"the slice model needs one position per slice: got {None if positions is None else tuple(positions.shape)} "
                             f"for {counted(slices.shape[0], 'slice')}")
        return self.objective(with_positions(net, positions, slices.shape[2:]), slices, covariates, covariates_present)

    @torch.no_grad()
    def sample(self, net: nn.Module, shape: Sequence[int], covariates, settings: Mapping[str, Any],
               device: torch.device | str, sample_seeds: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        """Volumes (B, 1, X, Y, Z) in [−1, 1], slice by slice along the last axis, and the NFE per volume (see the
        module docstring). `shape` is (B, 1, X, Y, Z); covariates (K,) or (B, K) as for the latent families."""
        if settings["solver"] not in self.solvers:
            raise ValueError(f"solver {settings['solver']!r}: the slice model samples with {', '.join(self.solvers)}")
        batch, channels, *size = shape
        depth = size[-1]
        if sample_seeds is not None and len(sample_seeds) != batch:
            raise ValueError(f"got {len(sample_seeds)} sample seeds for a batch of {batch}")
        volume_seeds = list(sample_seeds) if sample_seeds is not None else [sample_seed(0, i) for i in range(batch)]
        slice_seeds = [sample_seed(seed, k) for seed in volume_seeds for k in range(depth)]  # volume-major
        values, present = broadcast_covariates(covariates, batch, device)
        if values is not None:  # each volume's covariates for each of its slices
            values, present = values.repeat_interleave(depth, 0), present.repeat_interleave(depth, 0)
        positions = slice_positions(depth).repeat(batch).to(device)  # (B·Z,)
        slices, nfe = sample_latents(
            with_positions(net, positions, size[:-1]), (batch * depth, channels, *size[:-1]),
            None if values is None else (values, present), solver=settings["solver"], steps=settings["steps"],
            guidance=settings["guidance"], device=device, time_shift=settings.get("time_shift", 1.0),
            sample_seeds=slice_seeds, path=self.path)  # (B·Z, 1, X, Y)
        return slices.reshape(batch, depth, channels, *size[:-1]).movedim(1, -1), nfe


def image_to_model(volumes: torch.Tensor) -> torch.Tensor:
    """Intensities [0, 1] -> the model's [−1, 1]."""
    return volumes * 2.0 - 1.0


def model_to_image(samples: torch.Tensor) -> torch.Tensor:
    """The model's [−1, 1] -> intensities clamped to [0, 1]."""
    return ((samples + 1.0) / 2.0).clamp(0.0, 1.0)
