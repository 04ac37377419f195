"""MedicalNet 3D ResNets (Chen et al. 2019) from the user's local weights file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from monai.networks.nets import resnet10, resnet18, resnet34, resnet50

from mriflow.evaluate.backbones.base import as_tensor, load_into, load_state_dict, verify_weights

def medicalnet_resnet(depth: int) -> nn.Module:
    """MONAI's 3D ResNet arranged as MedicalNet's encoder: 7^3 stem with stride 2, shortcut B,
    no downsample bias, and layer3/layer4 at stride 1 with dilation 2 and 4 (MedicalNet
    keeps the resolution there for segmentation; MONAI's ResNet has no dilation option,
    so the convolutions are set after construction). Output: global-average-pooled
    features, 512 (ResNet-10) or 2048 (ResNet-50)."""
    constructors = {10: resnet10, 18: resnet18, 34: resnet34, 50: resnet50}
    if depth not in constructors:
        raise ValueError(f"MedicalNet depth {depth} is not supported here; choose one of {sorted(constructors)}")
    shortcut = "A" if depth in (18, 34) else "B"
    net = constructors[depth](spatial_dims=3, n_input_channels=1, feed_forward=False, shortcut_type=shortcut,
                              bias_downsample=depth in (18, 34), conv1_t_stride=2)
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for module in layer.modules():
            if isinstance(module, nn.Conv3d):
                module.stride = (1, 1, 1)
                if module.kernel_size == (3, 3, 3):
                    module.dilation = (dilation,) * 3
                    module.padding = (dilation,) * 3
    return net.eval()


class MedicalNetBackbone:
    """MedicalNet 3D ResNet features. Input normalisation as MedicalNet (and MONAI's
    MedicalNet perceptual loss): each volume z-scored, (x - mean) / std."""

    def __init__(self, depth: int, weights: str | Path, weights_sha256: str | None = None, device: str = "cpu",
                 batch_size: int = 4):
        self.name = f"medicalnet-resnet{depth}"
        self.weights_sha256 = verify_weights(weights, self.name, weights_sha256)
        self.network = medicalnet_resnet(depth)
        # conv_seg / fc: MedicalNet's task heads, not part of the encoder.
        load_into(self.network, load_state_dict(weights), Path(weights), ignore_prefixes=("conv_seg.", "fc."))
        self.device, self.batch_size = torch.device(device), batch_size
        self.network.to(self.device)

    @torch.no_grad()
    def features(self, volumes: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_tensor(volumes)
        outputs = []
        for start in range(0, len(x), self.batch_size):
            batch = x[start : start + self.batch_size].to(self.device)
            mean = batch.mean(dim=(1, 2, 3, 4), keepdim=True)
            std = batch.std(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-6)
            outputs.append(self.network((batch - mean) / std).cpu())
        return torch.cat(outputs).numpy().astype(np.float32)
