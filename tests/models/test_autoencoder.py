from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import head_phantom
from mriflow.models.autoencoder import Autoencoder, AutoencoderConfig

SMALL = dict(channels=(8, 16), num_res_blocks=(1, 1), attention_levels=(False, False), latent_channels=3,
             norm_num_groups=4, num_embeddings=32)


def phantom_batch(shape=(16, 24, 16), batch=2):
    volumes = [head_phantom(shape, seed)[0] for seed in range(batch)]
    return torch.stack([torch.from_numpy(v / v.max()) for v in volumes])[:, None]  # (B, 1, D, H, W)


@pytest.mark.parametrize("patch_size, channels, factor", [(1, (8,), 1), (2, (8,), 2), (2, (8, 16), 4), (1, (8, 16), 2),
                                                          (2, (8, 16, 16), 8), (1, (8, 16, 16), 4)])
def test_latent_shapes_follow_the_downsampling_factor(patch_size, channels, factor):
    if factor not in (2, 4, 8):
        with pytest.raises(ValueError, match="must be one of"):
            AutoencoderConfig(patch_size=patch_size, channels=channels, num_res_blocks=(1,) * len(channels),
                              attention_levels=(False,) * len(channels), norm_num_groups=4)
        return
    config = AutoencoderConfig(**{**SMALL, "patch_size": patch_size, "channels": channels,
                                  "num_res_blocks": (1,) * len(channels), "attention_levels": (False,) * len(channels)})
    assert config.downsampling_factor == factor
    model = Autoencoder(config).eval()
    x = torch.rand(2, 1, 16, 24, 16)
    latent = model.encode(x)
    assert latent.mean.shape == (2, *config.latent_shape((16, 24, 16)))
    assert latent.mean.shape[2:] == (16 // factor, 24 // factor, 16 // factor)
    assert latent.logvar.shape == latent.mean.shape
    assert model.decode(latent.mean).shape == x.shape


def test_kl_posterior_sampling_and_deterministic_reconstruction():
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(kind="kl", patch_size=2, **SMALL)).eval()
    x = phantom_batch()
    latent = model.encode(x)
    first, second = latent.sample(), latent.sample()
    assert not torch.equal(first, second)
    spread = (first - latent.mean) / torch.exp(0.5 * latent.logvar)  # standard normal when the formula holds
    assert abs(spread.std().item() - 1.0) < 0.1
    assert torch.equal(model.reconstruct(x), model.reconstruct(x))
    assert torch.allclose(model.reconstruct(x), model.decode(latent.mean))


def test_vq_quantises_with_a_straight_through_gradient_and_an_ema_codebook():
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(kind="vq", patch_size=2, **SMALL)).eval()
    x = phantom_batch()
    latent = model.encode(x)
    assert latent.logvar is None
    codebook = model.quantizer.embedding.weight
    quantized, loss, indices = model.quantize(latent.mean)
    nearest = codebook[indices].permute(0, 4, 1, 2, 3)  # (B, C, d, h, w) codebook vectors chosen
    assert torch.allclose(quantized, nearest, atol=1e-5)
    distances = torch.cdist(latent.mean.permute(0, 2, 3, 4, 1).reshape(-1, 3), codebook)
    assert torch.equal(indices.flatten(), distances.argmin(1))
    assert loss.item() > 0

    before = codebook.clone()
    output = model.train()(x)  # training mode: the EMA moves the codebook
    assert not torch.equal(before, model.quantizer.embedding.weight)
    F.l1_loss(output.reconstruction, x).backward()
    assert model.encoder.blocks[0].conv.weight.grad.abs().sum() > 0  # gradients pass the quantiser

    model.eval()
    frozen = model.quantizer.embedding.weight.clone()
    decoded = model.decode(latent.mean.detach())
    assert torch.equal(frozen, model.quantizer.embedding.weight)
    assert torch.allclose(decoded, model._decode_quantized(model.quantize(latent.mean.detach())[0]))


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    config = AutoencoderConfig(kind="kl", patch_size=2, **SMALL)
    torch.manual_seed(0)
    plain = Autoencoder(config)
    checkpointed = Autoencoder(dataclasses.replace(config, gradient_checkpointing=True))
    checkpointed.load_state_dict(plain.state_dict())
    x = phantom_batch()
    losses = []
    for model in (plain, checkpointed):
        output = model(x, sample_posterior=False)
        loss = F.l1_loss(output.reconstruction, x)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)
    assert torch.allclose(plain.last_layer.grad, checkpointed.last_layer.grad, rtol=1e-4, atol=1e-7)


def test_a_small_model_learns_to_reconstruct_a_phantom():
    torch.manual_seed(0)
    model = Autoencoder(AutoencoderConfig(kind="kl", patch_size=2, **SMALL))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = phantom_batch(batch=1)
    first = None
    for _ in range(20):
        loss = F.l1_loss(model(x).reconstruction, x)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.3 * first


def test_bad_configs_and_shapes_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="model.kind"):
        AutoencoderConfig(kind="gan")
    with pytest.raises(ValueError, match="norm_num_groups"):
        AutoencoderConfig(channels=(12, 16), num_res_blocks=(1, 1), attention_levels=(False, False), norm_num_groups=8)
    with pytest.raises(ValueError, match="one entry per level"):
        AutoencoderConfig(channels=(8, 16), num_res_blocks=(1,), attention_levels=(False, False))
    with pytest.raises(ValueError, match="not divisible"):
        AutoencoderConfig(patch_size=2, **SMALL).latent_shape((40, 48, 42))


@pytest.mark.parametrize("preset", ["tiny", "base", "large"])
def test_preset_inference_weights_stay_under_16_megabytes(preset):
    from mriflow.checkpoint import MAX_TRAVELLING_BYTES, WEIGHT_DTYPES
    from mriflow.train.autoencoder import load_config

    config = load_config(preset)
    model = Autoencoder(config.model)
    bytes_per_value = torch.finfo(WEIGHT_DTYPES[config.loop.weights_dtype]).bits // 8
    tensors = sum(t.numel() for t in model.state_dict().values())
    assert tensors * bytes_per_value < MAX_TRAVELLING_BYTES - 200_000  # room for the safetensors header
    grid = {"tiny": (40, 48, 40), "base": (80, 96, 80), "large": (160, 192, 160)}[preset]
    assert config.model.latent_shape(grid)[1:] == tuple(n // config.model.downsampling_factor for n in grid)
