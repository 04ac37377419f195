"""RadImageNet's 2D ResNet-50 (Mei et al. 2022) on axial, coronal and sagittal slices (2.5D, MAISI-style)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from mriflow.evaluate.backbones.base import as_tensor, load_into, load_state_dict, verify_weights

class _KerasBottleneck(nn.Module):
    """Keras ResNet50 bottleneck (RadImageNet was trained in Keras): the stride sits in
    the first 1x1 convolution, every convolution has a bias, batch norm eps 1.001e-5."""

    def __init__(self, in_channels: int, width: int, stride: int = 1):
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, stride=stride)
        self.bn1 = nn.BatchNorm2d(width, eps=1.001e-5)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(width, eps=1.001e-5)
        self.conv3 = nn.Conv2d(width, out_channels, 1)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=1.001e-5)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride),
                                            nn.BatchNorm2d(out_channels, eps=1.001e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class RadImageNetResNet50(nn.Module):
    """The convolutional part of RadImageNet's ResNet-50 (no top), with the parameter names of
    the PyTorch conversion MONAI uses (conv1, bn1, layer1..layer4). MONAI's ResNet places
    the stride in the 3x3 convolution and has no biases, so it cannot load these weights."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3)
        self.bn1 = nn.BatchNorm2d(64, eps=1.001e-5)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels, layers = 64, []
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            layer = [_KerasBottleneck(channels, width, stride)] + [_KerasBottleneck(4 * width, width) for _ in range(blocks - 1)]
            layers.append(nn.Sequential(*layer))
            channels = 4 * width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))  # (B, 2048, h, w)


class RadImageNetBackbone:
    """2.5D RadImageNet ResNet-50 features: for each plane (sagittal = axis 0, coronal = 1,
    axial = 2 in RAS), `slices_per_plane` slices evenly spaced over the central 80 % of
    the axis go through the 2D network at native resolution; each slice's map is
    global-average-pooled, slices are averaged, and the three planes concatenated
    (F = 3 x 2048). Input as MONAI's RadImageNet perceptual loss: grey repeated to
    three channels, BGR order, ImageNet channel means subtracted, no scaling."""

    channel_means_bgr = (0.406, 0.456, 0.485)

    def __init__(self, weights: str | Path, weights_sha256: str | None = None, device: str = "cpu",
                 slices_per_plane: int = 16, batch_size: int = 16):
        self.name = f"radimagenet-resnet50-2.5d-{slices_per_plane}"
        self.weights_sha256 = verify_weights(weights, "radimagenet-resnet50", weights_sha256)
        self.network = RadImageNetResNet50().eval()
        load_into(self.network, load_state_dict(weights), Path(weights), ignore_prefixes=("fc.",))
        self.device, self.slices_per_plane, self.batch_size = torch.device(device), slices_per_plane, batch_size
        self.network.to(self.device)

    def slice_indices(self, size: int) -> np.ndarray:
        return np.unique(np.round(np.linspace(0.1, 0.9, self.slices_per_plane) * (size - 1)).astype(int))

    @torch.no_grad()
    def features(self, volumes: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_tensor(volumes)[:, 0]  # (N, D, H, W)
        means = torch.tensor(self.channel_means_bgr).view(1, 3, 1, 1).to(self.device)
        rows = []
        for volume in x:
            planes = []
            for axis in (2, 1, 0):  # axial, coronal, sagittal
                indices = torch.from_numpy(self.slice_indices(volume.shape[axis]))
                slices = volume.index_select(axis, indices).movedim(axis, 0)  # (S, h, w)
                pooled = []
                for start in range(0, len(slices), self.batch_size):
                    batch = slices[start : start + self.batch_size, None].to(self.device).repeat(1, 3, 1, 1) - means
                    pooled.append(self.network(batch).mean(dim=(2, 3)).cpu())  # (s, 2048)
                planes.append(torch.cat(pooled).mean(0))
            rows.append(torch.cat(planes))
        return torch.stack(rows).numpy().astype(np.float32)
