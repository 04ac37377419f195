"""The 3D DiT backbone: shapes, adaLN-Zero start, conditioning paths, learning, and a flow run through generate."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_config, wake, write_prepared
from mriflow.config import LoopConfig
from mriflow.families.flow import FlowTrainingConfig, RectifiedFlow
from mriflow.models.dit import DiT, position_features
from mriflow.models.velocity import VelocityNet, VelocityNetConfig, num_parameters

DIT = dict(in_channels=2, backbone="dit", dit_patch_size=2, dit_hidden=32, dit_depth=2, dit_heads=4,
           covariate_names=("age", "sex"), covariate_kinds=("continuous", "categorical"), covariate_categories=(0, 2))


def test_any_latent_size_comes_back_and_the_network_starts_at_zero():
    net = VelocityNet(VelocityNetConfig(**DIT)).eval()
    x = torch.randn(3, 2, 5, 6, 5)  # odd sizes: padded to the patch and cropped back
    out = net(x, torch.rand(3), torch.tensor([[0.3, 0.0], [-1.0, 1.0], [2.0, 1.0]]), torch.ones(3, 2, dtype=torch.bool))
    assert out.shape == x.shape
    assert not out.any()  # adaLN-Zero and a zero output layer: v = 0 until trained


def test_time_covariates_and_position_reach_the_output():
    torch.manual_seed(0)
    net = wake(VelocityNet(VelocityNetConfig(**DIT))).eval()
    x, t = torch.randn(2, 2, 4, 6, 4), torch.full((2,), 0.3)
    covariates, present = torch.tensor([[0.5, 0.0], [0.5, 0.0]]), torch.ones(2, 2, dtype=torch.bool)
    with torch.no_grad():
        base = net(x, t, covariates, present)
        assert not torch.allclose(net(x, t + 0.4, covariates, present), base)
        assert not torch.allclose(net(x, t, covariates + 1, present), base)
        assert not torch.allclose(net(x, t, covariates, torch.zeros_like(present)), base)
        # translating the input does not just translate the output: tokens know where they are
        assert not torch.allclose(net(x.roll(2, dims=3), t, covariates, present), base.roll(2, dims=3), atol=1e-4)
    features = position_features((2, 3, 2), 32)
    assert features.shape == (12, 32) and torch.unique(features, dim=0).shape[0] == 12


def test_a_dit_flow_fits_a_fixed_batch():
    torch.manual_seed(0)
    net = VelocityNet(VelocityNetConfig(**{**DIT, "covariate_names": (), "covariate_kinds": (), "covariate_categories": ()}))
    family = RectifiedFlow(FlowTrainingConfig(model=net.config))
    latents = torch.randn(4, 2, 4, 4, 4)
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        torch.manual_seed(step % 4)  # a few fixed (t, noise) draws, so the loss can only fall by fitting them
        loss = family.loss(net, latents, None, None)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:4]) / 4


def test_the_dit_is_chosen_by_config_trained_and_sampled_through_generate(tmp_path):
    from mriflow.generate import generate, load_generator
    from mriflow.train.autoencoder import train_autoencoder
    from mriflow.train.generator import train_flow

    data = write_prepared(tmp_path / "data")
    train_autoencoder(data, tmp_path / "ae", config=tiny_config(max_steps=1, adversarial_start=100))
    model = VelocityNetConfig(**{k: v for k, v in DIT.items() if not k.startswith("covariate")})
    config = FlowTrainingConfig(model=model, loop=LoopConfig(max_steps=2, batch_size=2, device="cpu",
                                                             checkpoint_every=2, montage_every=1))
    train_flow(data, tmp_path / "ae", tmp_path / "dit", config=config)
    generator = load_generator(tmp_path / "dit", "cpu")
    assert generator.velocity_net.config.backbone == "dit" and hasattr(generator.velocity_net, "dit")
    assert num_parameters(generator.velocity_net) == num_parameters(VelocityNet(model))
    result = generate(tmp_path / "dit", tmp_path / "samples", n=2, device="cpu", progress=False)
    assert len(result.paths) == 2


def test_a_bad_backbone_or_head_count_is_refused():
    with pytest.raises(ValueError, match="model.backbone"):
        VelocityNet(VelocityNetConfig(backbone="vit"))
    with pytest.raises(ValueError, match="dit_heads"):
        DiT(2, 2, hidden=30, heads=4)
