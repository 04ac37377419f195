from __future__ import annotations

import pytest
import torch
from torch.distributions import Normal, kl_divergence as torch_kl

from mriflow.models.losses import (
    adaptive_weight,
    discriminator_loss,
    feature_matching_loss,
    generator_loss,
    kl_divergence,
    load_perceptual_network,
)


def test_kl_matches_the_closed_form_of_torch_distributions():
    torch.manual_seed(0)
    mean, logvar = torch.randn(3, 2, 4, 5, 4), torch.randn(3, 2, 4, 5, 4)
    expected = torch_kl(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).flatten(1).sum(1).mean()
    assert kl_divergence(mean, logvar).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kl_divergence(torch.zeros(2, 3), torch.zeros(2, 3)).item() == 0.0


def test_adversarial_losses_follow_their_formulas():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 3.0])
    hinge = torch.relu(1 - real).mean() + torch.relu(1 + fake).mean()
    assert discriminator_loss("hinge", real, fake).item() == pytest.approx(hinge.item())
    assert generator_loss("hinge", fake).item() == pytest.approx(-fake.mean().item())
    least_squares = 0.5 * (((real - 1) ** 2).mean() + (fake**2).mean())
    assert discriminator_loss("least_squares", real, fake).item() == pytest.approx(least_squares.item())
    assert generator_loss("least_squares", fake).item() == pytest.approx(((fake - 1) ** 2).mean().item())
    # A perfect hinge critic (real >= 1, fake <= -1) has zero loss.
    assert discriminator_loss("hinge", torch.tensor([1.5]), torch.tensor([-1.2])).item() == 0.0
    with pytest.raises(ValueError, match="adversarial loss"):
        discriminator_loss("wasserstein", real, fake)


def test_adaptive_weight_is_the_clamped_ratio_of_gradient_norms_at_the_last_layer():
    torch.manual_seed(0)
    layer = torch.nn.Conv3d(2, 1, 3, padding=1)
    h = torch.randn(1, 2, 4, 4, 4)
    out = layer(h)
    reconstruction = out.abs().mean()
    adversarial = -(3.0 * out).mean()
    weight = adaptive_weight(reconstruction, adversarial, layer.weight)
    rec_grad = torch.autograd.grad(reconstruction, layer.weight, retain_graph=True)[0]
    adv_grad = torch.autograd.grad(adversarial, layer.weight, retain_graph=True)[0]
    assert weight.item() == pytest.approx((rec_grad.norm() / (adv_grad.norm() + 1e-6)).item(), rel=1e-5)
    assert not weight.requires_grad
    assert adaptive_weight(reconstruction, 1e-9 * adversarial, layer.weight, maximum=5.0).item() == 5.0
    (reconstruction + adversarial).backward()  # the graphs are still usable afterwards


def test_feature_matching_compares_intermediate_features_only():
    real = [torch.ones(1, 2, 3), torch.zeros(1, 1)]
    assert feature_matching_loss(real, [torch.ones(1, 2, 3), torch.ones(1, 1)]).item() == 0.0  # logits ignored
    assert feature_matching_loss(real, [torch.full((1, 2, 3), 3.0), torch.zeros(1, 1)]).item() == pytest.approx(2.0)


def test_perceptual_loss_from_a_local_file_checked_by_sha256(tmp_path):
    from monai.networks.nets import resnet10
    from safetensors.torch import save_file

    from mriflow.checkpoint import sha256

    torch.manual_seed(0)
    network = resnet10(spatial_dims=3, n_input_channels=1, conv1_t_stride=2, shortcut_type="B",
                       bias_downsample=False, feed_forward=False)
    path = tmp_path / "resnet_10.safetensors"
    # MedicalNet files carry DataParallel's "module." prefix and a segmentation head; both must be handled.
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(1)
    save_file(state, str(path))
    loss, digest = load_perceptual_network(path, depth=10, sha256=sha256(path))
    assert digest == sha256(path)
    assert not any(p.requires_grad for p in loss.parameters())
    x = torch.rand(1, 1, 16, 24, 16)
    x_hat = (x + 0.2 * torch.rand_like(x)).requires_grad_(True)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    value = loss(x, x_hat)
    assert value.item() > 0
    value.backward()
    assert x_hat.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sha256"):
        load_perceptual_network(path, depth=10, sha256="0" * 64)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_perceptual_network(tmp_path / "absent.pth")
