"""The weight-free intensity descriptor: a sanity backbone, not comparable with the literature."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from mriflow.evaluate.backbones.base import as_tensor

class IntensityBackbone:
    """A fixed, weight-free descriptor: a sanity backbone, NOT comparable with published FD/KID values.

    Three groups, each scaled to a norm of about one, then all multiplied by sqrt(F / 3)
    so dimensions are of order one (the polynomial KID kernel x.y / F + 1 then sees
    values near 1, as with Inception features):
      * block means: the volume average-pooled to a 10 x 12 x 10 grid, / sqrt(1200);
      * sqrt of the 32-bin intensity histogram of non-zero voxels on [0, 1];
      * sqrt of the 32-bin histogram of gradient magnitudes (central differences,
        per voxel) of non-zero voxels on [0, 0.5] (larger values in the last bin).
    Block means see anatomy and misplaced tissue, the intensity histogram sees
    contrast and noise, the gradient histogram sees blur and noise.
    """

    name = "intensity-v1"
    weights_sha256 = None
    grid = (10, 12, 10)
    bins = 32
    gradient_range = 0.5

    def features(self, volumes: np.ndarray | torch.Tensor) -> np.ndarray:
        x = as_tensor(volumes)  # (N, 1, D, H, W)
        blocks = F.adaptive_avg_pool3d(x, self.grid).flatten(1) / math.sqrt(math.prod(self.grid))
        gradients = torch.stack(torch.gradient(x[:, 0], dim=(1, 2, 3)), 0).pow(2).sum(0).sqrt()  # (N, D, H, W)
        intensity_histograms, gradient_histograms = [], []
        for volume, gradient in zip(x[:, 0], gradients):
            foreground = volume > 0
            intensity_histograms.append(self._sqrt_histogram(volume[foreground].clamp(0, 1), 1.0))
            steepness = gradient[foreground].clamp(max=self.gradient_range)
            gradient_histograms.append(self._sqrt_histogram(steepness, self.gradient_range))
        features = torch.cat([blocks, torch.stack(intensity_histograms), torch.stack(gradient_histograms)], dim=1)
        return (features * math.sqrt(features.shape[1] / 3)).numpy().astype(np.float32)

    def _sqrt_histogram(self, values: torch.Tensor, top: float) -> torch.Tensor:
        counts = torch.histc(values, bins=self.bins, min=0.0, max=top)
        return (counts / counts.sum().clamp(min=1)).sqrt()
