"""mriflow.models.discriminators: the 3D patch critic and the 2D critic on random slices, as the presets build them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import tiny_config
from mriflow.config import get_grid
from mriflow.models.discriminators import DiscriminatorConfig, random_slices, slice_discriminator, take_slices, volume_discriminator
from mriflow.train.autoencoder import AutoencoderStage, load_config

# the grid each autoencoder preset trains on (its header); autoencoder-small trains on crops of it
PRESET_GRIDS = {"tiny": "4mm", "small": "2mm", "base": "2mm", "large": "1mm"}


def critic_shapes(size: int, layers: int) -> list[int]:
    """One spatial size through the critic: a stride-2 first convolution, `layers` 4^n convolutions (stride 2 but
    the last, stride 1) and a stride-1 logits convolution; kernel 4, padding 1."""
    sizes = [size // 2]
    for layer in range(layers):
        sizes.append(sizes[-1] // 2 if layer < layers - 1 else sizes[-1] - 1)
    return sizes + [sizes[-1] - 1]


def critic_parameters(channels: int, layers: int, dims: int) -> int:
    """Weights the config asks for: channels doubled per layer, biases on the first and last convolution only
    (the others are followed by batch norm, with its scale and shift)."""
    kernel = 4**dims
    widths = [channels * 2**layer for layer in range(layers + 1)]
    count = 1 * widths[0] * kernel + widths[0]
    for before, after in zip(widths, widths[1:]):
        count += before * after * kernel + 2 * after
    return count + widths[-1] * kernel + 1


@pytest.mark.parametrize("preset", sorted(PRESET_GRIDS))
def test_the_preset_critics_have_the_configured_widths_depths_and_output_shapes(preset):
    config = load_config(preset)
    critic = config.loss.critic
    shape = tuple(config.crop_size or get_grid(PRESET_GRIDS[preset]).shape)
    with torch.device("meta"):  # shapes and parameter counts without computing a 1 mm volume on the CPU
        volume_critic, slice_critic = volume_discriminator(critic), slice_discriminator(critic)
        volume_features = volume_critic(torch.empty(2, 1, *shape))
        slice_features = slice_critic(torch.empty(2 * critic.num_slices, 1, *shape[1:]))
    assert len(volume_features) == critic.volume_layers + 2  # every layer's features, the logits last
    expected = [critic_shapes(n, critic.volume_layers) for n in shape]
    for index, features in enumerate(volume_features[:-1]):
        assert tuple(features.shape) == (2, critic.volume_channels * 2**index, *(e[index] for e in expected))
    logits = volume_features[-1]
    assert tuple(logits.shape) == (2, 1, *(e[-1] for e in expected)) and min(logits.shape[2:]) >= 2  # a patch map
    expected = [critic_shapes(n, critic.slice_layers) for n in shape[1:]]
    assert tuple(slice_features[-1].shape) == (2 * critic.num_slices, 1, *(e[-1] for e in expected))
    assert slice_features[-2].shape[1] == critic.slice_channels * 2**critic.slice_layers
    assert sum(p.numel() for p in volume_critic.parameters()) == critic_parameters(critic.volume_channels, critic.volume_layers, 3)
    assert sum(p.numel() for p in slice_critic.parameters()) == critic_parameters(critic.slice_channels, critic.slice_layers, 2)


def test_slices_are_taken_at_the_drawn_positions_and_the_slice_critic_accepts_them():
    volume = torch.rand(2, 1, 16, 20, 12)
    generator = torch.Generator().manual_seed(3)
    for _ in range(6):
        axis, index = random_slices(volume.shape, 4, (0.25, 0.75), generator)
        size = volume.shape[2 + axis]
        assert index.shape == (2, 4) and index.min() >= int(0.25 * size) and index.max() < round(0.75 * size)
        slices = take_slices(volume, axis, index)
        assert slices.shape[:2] == (8, 1)
        expected = volume[1, 0].select(axis, int(index[1, 2]))
        assert torch.equal(slices[4 + 2, 0], expected)
    critic = slice_discriminator(DiscriminatorConfig(slice_channels=4, slice_layers=2))
    assert critic(take_slices(volume, 0, torch.zeros(2, 3, dtype=torch.long)))[-1].shape[0] == 6


def test_every_axis_is_drawn_and_a_narrow_range_still_gives_a_slice():
    generator = torch.Generator().manual_seed(0)
    axes = {random_slices((1, 1, 8, 8, 8), 2, generator=generator)[0] for _ in range(60)}
    assert axes == {0, 1, 2}
    _, index = random_slices((3, 1, 4, 4, 4), 5, (0.5, 0.5), torch.Generator().manual_seed(1))
    assert index.shape == (3, 5) and torch.all(index == 2)  # an empty range is widened to one slice, not refused


def test_the_stage_shows_the_slice_critic_num_slices_slices_per_volume():
    config = tiny_config(adversarial_start=0)
    config = dataclasses.replace(config, loss=dataclasses.replace(
        config.loss, critic=dataclasses.replace(config.loss.critic, num_slices=3)))
    torch.manual_seed(0)
    stage = AutoencoderStage(config)
    seen = {}
    for name in stage.critics:
        stage.networks[name].register_forward_pre_hook(lambda module, args, name=name: seen.setdefault(name, []).append(args[0].shape))
    real = torch.rand(2, 1, 16, 20, 16)
    stage.loss("generator", {"image": real}, step=0)
    stage.loss("critic", {"image": real}, step=0)
    axis, _ = stage._slices
    plane = tuple(n for i, n in enumerate(real.shape[2:]) if i != axis)
    assert set(seen["slice_critic"]) == {torch.Size((2 * 3, 1, *plane))}  # fake, fake features and real, real
    assert set(seen["volume_critic"]) == {real.shape}


@pytest.mark.parametrize("kind", ["volume", "slice"])
def test_the_critics_pass_gradients_to_their_input(kind):
    """The adversarial loss trains the autoencoder through the critic: its logits must depend on every voxel it
    sees, and on no voxel of a volume's slices it was not shown."""
    torch.manual_seed(0)
    config = DiscriminatorConfig(volume_channels=4, volume_layers=2, slice_channels=4, slice_layers=2)
    volume = torch.rand(2, 1, 16, 20, 16, requires_grad=True)
    if kind == "volume":
        logits = volume_discriminator(config)(volume)[-1]
    else:
        index = torch.tensor([[3, 9], [5, 5]])
        logits = slice_discriminator(config)(take_slices(volume, 1, index))[-1]
    logits.sum().backward()
    gradient = volume.grad
    assert torch.isfinite(gradient).all()
    if kind == "volume":
        assert (gradient[:, :, 1:-1, 1:-1, 1:-1] != 0).float().mean() > 0.9
    else:
        shown = torch.zeros_like(gradient, dtype=torch.bool)
        shown[0, :, :, [3, 9]] = shown[1, :, :, 5] = True
        assert (gradient[~shown] == 0).all()
        assert gradient[0, 0, :, 3].abs().sum() > 0 and gradient[0, 0, :, 9].abs().sum() > 0
        assert gradient[1, 0, :, 5].abs().sum() > 0
