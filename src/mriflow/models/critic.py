"""The critic of the GAN family: R3GAN-style residual 3D convolutions over latents, conditioned by projection.

    D(z, c) = ψ · φ(z) + e(c) · φ(z) / √F

φ(z) ∈ R^F: a 1x1x1 stem, then at each level residual blocks without normalisation (1x1x1 expand, grouped
3x3x3, 1x1x1 back, leaky ReLU 0.2 between; the last convolution zero-initialised so each block starts as the
identity, the others He-initialised and scaled by L^(-1/4) for L blocks, as R3GAN's fix-up initialisation)
and a 2x average pool with a 1x1x1 widening to the next level; at the coarsest level a minibatch
standard-deviation channel (StyleGAN's: the spread of the features over a group of consecutive
samples, mixed back by a 1x1x1 convolution) lets the critic see a batch without variety, and a
depthwise convolution over the whole grid (R3GAN's "basis") gives the features, so where in template
space a pattern sits counts.
ψ is a linear head; e(c) is mriflow's CovariateEmbedding (the generator's covariate kinds, each absent
covariate its learned null), so the projection term (Miyato & Koyama, 2018) makes the critic judge
whether a latent fits its covariates, not only whether it looks real. Huang et al. 2024 (R3GAN) for
the blocks; written here because MONAI has no critic of this kind.

    >>> critic = LatentCritic(CriticConfig(), (4, 10, 12, 10), ("continuous", "categorical"), (0, 2))
    >>> logits = critic(z, covariates, covariates_present)   # z (B, 4, 10, 12, 10) -> (B,)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mriflow.models.conditioning import CovariateEmbedding

NEGATIVE_SLOPE = 0.2


@dataclass(frozen=True)
class CriticConfig:
    channels: tuple[int, ...] = (32, 64)  # width per level; the latent grid is halved between levels
    blocks_per_level: int = 1
    expansion: int = 2  # a block's inner width is channels x expansion
    group_channels: int = 16  # channels per group of the 3x3x3 convolution (R3GAN's cardinality)
    minibatch_std_group: int = 4  # samples whose feature spread is shown to the critic; 0 = none (rows independent)

    def __post_init__(self) -> None:
        if not self.channels or self.blocks_per_level < 1 or self.expansion < 1 or self.minibatch_std_group < 0:
            raise ValueError(f"critic: channels must be non-empty, blocks_per_level and expansion >= 1 and "
                             f"minibatch_std_group >= 0; got {list(self.channels)}, {self.blocks_per_level}, "
                             f"{self.expansion}, {self.minibatch_std_group}")
        bad = [c for c in self.channels if (c * self.expansion) % self.group_channels]
        if bad:
            raise ValueError(f"critic: channels {bad} x expansion {self.expansion} are not multiples of "
                             f"group_channels={self.group_channels}")


def _he_init(layer: nn.Conv3d | nn.Linear, gain: float) -> nn.Module:
    """weight ~ N(0, gain² / fan_in), bias 0 (fan_in counts one group's inputs)."""
    fan_in = layer.weight[0].numel()
    nn.init.normal_(layer.weight, 0.0, gain / math.sqrt(fan_in))
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class ResidualBlock(nn.Module):
    """x + conv1x1(act(grouped conv3x3(act(conv1x1(x))))), no normalisation; starts as the identity."""

    def __init__(self, channels: int, expansion: int, group_channels: int, total_blocks: int):
        super().__init__()
        inner = channels * expansion
        gain = math.sqrt(2.0 / (1.0 + NEGATIVE_SLOPE**2)) * total_blocks ** (-1.0 / 4.0)
        self.expand = _he_init(nn.Conv3d(channels, inner, 1), gain)
        self.spatial = _he_init(nn.Conv3d(inner, inner, 3, padding=1, groups=inner // group_channels), gain)
        self.reduce = nn.Conv3d(inner, channels, 1)
        nn.init.zeros_(self.reduce.weight)
        nn.init.zeros_(self.reduce.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.leaky_relu(self.expand(x), NEGATIVE_SLOPE)
        y = F.leaky_relu(self.spatial(y), NEGATIVE_SLOPE)
        return x + self.reduce(y)


def minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """(N, C, d, h, w) -> (N, 1, d, h, w): per group of consecutive samples (size gcd(N, group)), the standard
    deviation of each feature over the group, averaged over features and positions, given to every member."""
    size = math.gcd(x.shape[0], group)
    grouped = x.reshape(x.shape[0] // size, size, *x.shape[1:])
    spread = (grouped.var(1, unbiased=False) + 1e-8).sqrt().mean(dim=(1, 2, 3, 4))  # (N / size,)
    return spread.repeat_interleave(size)[:, None, None, None, None].expand(-1, 1, *x.shape[2:])


class LatentCritic(nn.Module):
    """D(z (B, C, d, h, w), covariates (B, K), covariates_present (B, K)) -> logits (B,), for latents of `latent_shape`.

    Unconditional when `covariate_kinds` is empty; with covariates None every covariate is absent. With
    minibatch_std_group, a logit depends on the other samples of its group: score real and fake batches apart."""

    def __init__(self, config: CriticConfig, latent_shape: Sequence[int], covariate_kinds: Sequence[str] = (),
                 covariate_categories: Sequence[int] = ()):
        super().__init__()
        channels, grid = config.channels, [int(n) for n in latent_shape[1:]]
        total_blocks = config.blocks_per_level * len(channels)
        self.stem = _he_init(nn.Conv3d(int(latent_shape[0]), channels[0], 1), 1.0)
        self.levels = nn.ModuleList()
        self.widen = nn.ModuleList()
        for level, width in enumerate(channels):
            self.levels.append(nn.Sequential(*(ResidualBlock(width, config.expansion, config.group_channels, total_blocks)
                                               for _ in range(config.blocks_per_level))))
            if level + 1 < len(channels):
                self.widen.append(_he_init(nn.Conv3d(width, channels[level + 1], 1), 1.0))
                grid = [math.ceil(n / 2) for n in grid]  # the pool below, ceil_mode
        features = channels[-1]
        self.std_group = config.minibatch_std_group
        if self.std_group:
            self.mix = _he_init(nn.Conv3d(features + 1, features, 1), 1.0)
        self.basis = _he_init(nn.Conv3d(features, features, tuple(grid), groups=features, bias=False), 1.0)
        self.head = _he_init(nn.Linear(features, 1), 1.0)
        self.num_covariates = len(covariate_kinds)
        # drop_prob 0: the GAN family drops covariates itself, the same ones for the generator and the critic
        self.conditioning = (CovariateEmbedding(covariate_kinds, covariate_categories, features, drop_prob=0.0)
                             if self.num_covariates else None)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        """φ(z): (B, C, d, h, w) -> (B, F)."""
        x = self.stem(z)
        for level, blocks in enumerate(self.levels):
            x = blocks(x)
            if level < len(self.widen):
                x = self.widen[level](F.avg_pool3d(x, 2, ceil_mode=True))
        if self.std_group:
            x = self.mix(torch.cat([x, minibatch_std(x, self.std_group)], 1))
        return self.basis(x).flatten(1)

    def forward(self, z: torch.Tensor, covariates: torch.Tensor | None = None,
                covariates_present: torch.Tensor | None = None) -> torch.Tensor:
        features = self.features(z)  # (B, F)
        logits = self.head(features)[:, 0]
        if self.conditioning is None:
            return logits
        if covariates is None:
            covariates = z.new_zeros(z.shape[0], self.num_covariates)
            covariates_present = torch.zeros(z.shape[0], self.num_covariates, dtype=torch.bool, device=z.device)
        elif covariates_present is None:
            covariates_present = torch.ones_like(covariates, dtype=torch.bool)
        embedding = self.conditioning(covariates.to(features.dtype), covariates_present)  # (B, F)
        return logits + (embedding * features).sum(1) / math.sqrt(features.shape[1])
