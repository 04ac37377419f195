"""Discriminators for the autoencoder's adversarial loss: a 3D patch critic and a 2D one on random slices.

Both are MONAI's PatchDiscriminator (Pix2PixHD-style: strided 4^n convolutions, LeakyReLU,
normalisation; the forward pass returns every layer's features, the last being the patch
logits, which the feature-matching loss reuses). What is added here is the slicing: the 2D
critic sees `num_slices` slices per volume along one randomly chosen axis, drawn from the
central part of the volume where the brain is, the same slices for real and reconstructed
volumes so the two are comparable.

    >>> volume_critic = volume_discriminator(DiscriminatorConfig())
    >>> slice_critic = slice_discriminator(DiscriminatorConfig())
    >>> axis, index = random_slices(real.shape, num_slices=8)
    >>> features = slice_critic(take_slices(fake, axis, index))   # list of tensors, [-1] = logits
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from monai.networks.nets import PatchDiscriminator


@dataclass(frozen=True)
class DiscriminatorConfig:
    volume_channels: int = 16  # first-layer channels of the 3D critic (doubled per layer)
    volume_layers: int = 3
    slice_channels: int = 32  # first-layer channels of the 2D slice critic
    slice_layers: int = 3
    num_slices: int = 8  # slices per volume shown to the 2D critic
    slice_range: tuple[float, float] = (0.2, 0.8)  # fraction of each axis the slices are drawn from
    norm: str = "BATCH"


def volume_discriminator(config: DiscriminatorConfig) -> PatchDiscriminator:
    """3D patch critic on whole volumes (B, 1, D, H, W)."""
    return PatchDiscriminator(spatial_dims=3, channels=config.volume_channels, in_channels=1,
                              num_layers_d=config.volume_layers, norm=config.norm)


def slice_discriminator(config: DiscriminatorConfig) -> PatchDiscriminator:
    """2D patch critic on slices (N, 1, S, T)."""
    return PatchDiscriminator(spatial_dims=2, channels=config.slice_channels, in_channels=1,
                              num_layers_d=config.slice_layers, norm=config.norm)


def random_slices(
    shape: torch.Size | tuple[int, ...], num_slices: int, slice_range: tuple[float, float] = (0.2, 0.8),
    generator: torch.Generator | None = None,
) -> tuple[int, torch.Tensor]:
    """(spatial axis 0..2, slice indices (B, num_slices)) drawn uniformly from `slice_range` of that axis."""
    batch = shape[0]
    axis = int(torch.randint(0, 3, (), generator=generator))
    size = shape[2 + axis]
    low = int(slice_range[0] * size)
    high = max(low + 1, int(round(slice_range[1] * size)))
    index = torch.randint(low, high, (batch, num_slices), generator=generator)
    return axis, index


def take_slices(volume: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    """volume (B, C, D, H, W), index (B, K) along spatial `axis` -> slices (B*K, C, ., .)."""
    moved = volume.movedim(2 + axis, 2)  # (B, C, N, S, T) with N the sliced axis
    batch = torch.arange(volume.shape[0], device=volume.device)[:, None].expand_as(index)
    slices = moved.permute(0, 2, 1, 3, 4)[batch, index.to(volume.device)]  # (B, K, C, S, T)
    return slices.flatten(0, 1)
