"""deepbet's brain-extraction network as a second, independent feature space (weights from the installed package)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mriflow.evaluate.backbones.base import as_tensor, verify_weights

def deepbet_weights() -> Path:
    """The whole-head network file inside the installed deepbet package (its wheel ships the weights)."""
    from deepbet.utils import DATA_PATH

    return Path(DATA_PATH) / "models" / "bbox_model.pt"


class DeepbetBackbone:
    """Features of deepbet's brain-extraction network (Fisch et al. 2024, "deepbet: Fast brain extraction of
    T1-weighted MRI using Convolutional Neural Networks", trained on 7837 T1 scans from 191 sites;
    MIT licence): an independent, brain-MRI-trained second opinion that ships with a maintained package.

    The network is deepbet's whole-head 3D LinkNet (bbox_model.pt, TorchScript). Each volume is
    resized to its 128^3 input (trilinear; deepbet itself stretches every head to that cube) and
    normalised as deepbet does (clip to the 0.5 / 99.5 % quantiles, z-score, x 0.226 + 0.449);
    features = the average-pooled output of its stem and four encoder levels (16 + 16 + 32 + 64 +
    128) + the per-channel sd of the stem and first level (16 + 16), 288 in all, unscaled.

    The file is TorchScript (code and weights), loaded from the installed package only after its
    SHA-256 matches the one recorded for deepbet 1.0.2 (or `weights_sha256`).
    """

    name = "deepbet-linknet3d-288"
    input_shape = (128, 128, 128)

    def __init__(self, weights: str | Path | None = None, weights_sha256: str | None = None, device: str = "cpu"):
        path = Path(weights) if weights is not None else deepbet_weights()
        self.weights_sha256 = verify_weights(path, "deepbet", weights_sha256)
        self.device = torch.device(device)
        with warnings.catch_warnings():  # deepbet ships TorchScript; torch 2.13 marks its loader deprecated
            warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.load")
            self.network = torch.jit.load(str(path), map_location=self.device).eval()
        self.activation = getattr(self.network.conv, "2")  # the shared ReLU its blocks are called with
        self.levels = [self.network.init, self.network.down0, self.network.down1, self.network.down2, self.network.down3]

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """deepbet.utils.normalize with its quantile bounds, per volume (1, 1, D, H, W)."""
        low, high = torch.quantile(x.flatten(), torch.tensor([0.005, 0.995], device=x.device))
        x = ((x - low) / (high - low).clamp(min=1e-6)).clamp(0, 1)
        return 0.226 * (x - x.mean()) / x.std().clamp(min=1e-6) + 0.449

    @torch.no_grad()
    def features(self, volumes) -> np.ndarray:
        rows = []
        for volume in as_tensor(volumes):
            x = F.interpolate(volume[None].to(self.device), self.input_shape, mode="trilinear", align_corners=False)
            h, outputs = self.normalise(x), []
            for level in self.levels:
                h = level(self.activation, h)
                outputs.append(h)
            rows.append(torch.cat([o.mean(dim=(2, 3, 4)) for o in outputs] +
                                  [o.std(dim=(2, 3, 4)) for o in outputs[:2]], dim=1)[0].cpu())
        return torch.stack(rows).numpy().astype(np.float32)
