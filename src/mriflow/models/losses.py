"""Losses of the autoencoder stage: reconstruction, KL, adversarial, adaptive weight, feature matching, perceptual.

Formulas (x real, x_hat reconstruction, D a critic returning patch logits):

    L1            mean |x - x_hat|
    KL            0.5 * sum_{c,d,h,w} (mean^2 + exp(logvar) - 1 - logvar), averaged over the batch
    hinge         L_D = mean relu(1 - D(x)) + mean relu(1 + D(x_hat)),      L_G = -mean D(x_hat)
    least squares L_D = 0.5 * (mean (D(x) - 1)^2 + mean D(x_hat)^2),       L_G = mean (D(x_hat) - 1)^2
    adaptive      lambda = ||grad_w L_rec|| / (||grad_w L_GAN|| + 1e-6), w = the decoder's last layer,
                  clamped to [0, maximum] and detached (Esser et al., taming transformers)
    feature match mean over critic layers l of mean |D_l(x) - D_l(x_hat)|  (real features detached)
    perceptual    sum over layers l of mean_{voxels} sum_c (f_l(x) - f_l(x_hat))^2, f_l channel-normalised
                  features of a pretrained 3D ResNet (LPIPS without learned weights)

The adversarial losses are written out rather than taken from MONAI's PatchAdversarialLoss,
which passes hinge logits through tanh and least-squares logits through a LeakyReLU and so
optimises a different objective than the textbook losses above.

Perceptual networks. Only local weights are used; nothing is downloaded, and the loss is
off when no weights file is configured. Supported: MedicalNet 3D ResNets (Chen et al. 2019,
https://github.com/Tencent/MedicalNet; ``resnet_10.pth``, ``resnet_10_23dataset.pth``,
``resnet_18*.pth``, ``resnet_34*.pth``, ``resnet_50*.pth``) loaded into
``monai.networks.nets.resnet{10,18,34,50}`` with MedicalNet's stem (7^3 convolution,
stride 2) and shortcut type; a ``.safetensors`` or a ``.pth``/``.pt`` state dict (read with
``torch.load(weights_only=True)``: tensors only, no code), keys with or without the
``module.`` prefix, the segmentation head (``conv_seg.*``) ignored. The file is verified
against the sha256 given in the config before use; with no sha256 given, the digest is
computed and returned so the run can record it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ADVERSARIAL_LOSSES = ("hinge", "least_squares")
PERCEPTUAL_DEPTHS = (10, 18, 34, 50)


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
    kl = 0.5 * (mean.float() ** 2 + torch.exp(logvar.float()) - 1.0 - logvar.float())
    return kl.flatten(1).sum(1).mean()


def discriminator_loss(kind: str, real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The critic's loss on real and reconstructed logits ("hinge" or "least_squares")."""
    if kind == "hinge":
        return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
    if kind == "least_squares":
        return 0.5 * (((real_logits - 1.0) ** 2).mean() + (fake_logits**2).mean())
    raise ValueError(f"adversarial loss must be one of {', '.join(ADVERSARIAL_LOSSES)}, got {kind!r}")


def generator_loss(kind: str, fake_logits: torch.Tensor) -> torch.Tensor:
    """The generator's adversarial loss on the critic's logits of reconstructions."""
    if kind == "hinge":
        return -fake_logits.mean()
    if kind == "least_squares":
        return ((fake_logits - 1.0) ** 2).mean()
    raise ValueError(f"adversarial loss must be one of {', '.join(ADVERSARIAL_LOSSES)}, got {kind!r}")


def adaptive_weight(
    reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor, last_layer: torch.Tensor, maximum: float = 1e4
) -> torch.Tensor:
    """lambda = ||grad_w L_rec|| / (||grad_w L_GAN|| + 1e-6) at w = last_layer, clamped to [0, maximum], detached.

    Balances the two gradients where they meet the image, so the adversarial term never
    swamps reconstruction whatever the losses' scales. Both losses must still have graphs.
    """
    (rec_grad,) = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)
    (adv_grad,) = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)
    weight = rec_grad.norm() / (adv_grad.norm() + 1e-6)
    return torch.clamp(weight, 0.0, maximum).detach()


def feature_matching_loss(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean over the critic's intermediate layers of mean |D_l(x) - D_l(x_hat)|; the last entry (logits) is skipped."""
    pairs = list(zip(real_features[:-1], fake_features[:-1]))
    if not pairs:
        return fake_features[-1].new_zeros(())
    return torch.stack([F.l1_loss(fake, real.detach()) for real, fake in pairs]).mean()


class PerceptualLoss3D(nn.Module):
    """LPIPS-style distance between channel-normalised features of a frozen MedicalNet 3D ResNet.

    Inputs are (B, 1, D, H, W) in [0, 1]; each volume is standardised (zero mean, unit variance),
    as MedicalNet was trained. The network is frozen and kept in eval mode.
    """

    def __init__(self, network: nn.Module):
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss3D":
        return super().train(False)  # batch-norm statistics of the pretrained network stay fixed

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        net = self.network
        x = (x - x.mean(dim=(1, 2, 3, 4), keepdim=True)) / (x.std(dim=(1, 2, 3, 4), keepdim=True) + 1e-6)
        h = net.act(net.bn1(net.conv1(x)))
        if not net.no_max_pool:
            h = net.maxpool(h)
        out = []
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            h = layer(h)
            out.append(h)
        return out

    def forward(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        total = x.new_zeros(())
        for real, fake in zip(self.features(x.float()), self.features(x_hat.float())):
            real = real / (real.norm(dim=1, keepdim=True) + 1e-10)
            fake = fake / (fake.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((real.detach() - fake) ** 2).sum(1).mean()
        return total


def load_perceptual_network(path: str | Path, depth: int = 10, sha256: str = "") -> tuple[PerceptualLoss3D, str]:
    """(PerceptualLoss3D, sha256 of the file) from a local MedicalNet state dict; refuses a wrong checksum."""
    from monai.networks.nets import resnet
    from monai.networks.nets.resnet import get_medicalnet_pretrained_resnet_args

    from mriflow.utils.files import sha256 as file_sha256

    path = Path(path)
    if depth not in PERCEPTUAL_DEPTHS:
        raise ValueError(f"perceptual network depth must be one of {PERCEPTUAL_DEPTHS}, got {depth}")
    if not path.is_file():
        raise FileNotFoundError(f"perceptual weights {path} not found; give a local MedicalNet file or disable the loss")
    digest = file_sha256(path)
    if sha256 and digest != sha256.lower():
        raise ValueError(f"perceptual weights {path}: sha256 is {digest}, the config expects {sha256}; wrong or damaged file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.removeprefix("module.").startswith(("conv_seg", "fc"))}
    bias_downsample, shortcut_type = get_medicalnet_pretrained_resnet_args(depth)
    network = getattr(resnet, f"resnet{depth}")(
        spatial_dims=3, n_input_channels=1, conv1_t_stride=2, shortcut_type=shortcut_type,
        bias_downsample=bias_downsample, feed_forward=False,
    )
    missing, unexpected = network.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"perceptual weights {path} do not fit a MedicalNet ResNet-{depth}: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}; check the depth setting"
        )
    return PerceptualLoss3D(network), digest
