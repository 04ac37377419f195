"""mriflow's anatomy network as a backbone: features, age and sex, tissue volumes; the shipped weights by grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mriflow.data.labels import class_indices, tissue_volumes_ml
from mriflow.evaluate.backbones.base import as_tensor, load_into, load_state_dict
from mriflow.models.anatomy import (  # noqa: F401  (the shipped weights by grid, where they were first defined)
    ANATOMY_WEIGHTS,
    AnatomyEncoder,
    anatomy_weights_for,
    default_anatomy_weights,
    read_anatomy_config,
    shipped_anatomy_weights,
)
from mriflow.utils.files import sha256



class AnatomyBackbone:
    """mriflow's anatomy network: embedding features plus age / sex predictions and tissue volumes
    measured from its segmentation.

    features(): the standardised embedding + texture statistics (N, feature_dim), see `AnatomyEncoder`.
    predict(): "age" (years), "sex_prob" (of the last of `sex_categories`), and
    "<class>_ml" for every tissue class and "total_brain_ml" = voxel count of the predicted
    classes x voxel volume of the config's grid. The volumes are in template space: `mriflow prepare`
    registers affinely to MNI152, so they are head-size normalised, not native volumes.
    Total brain = ventricles + grey + white matter + brainstem (MUSE 701 TotalBrain).
    """

    def __init__(self, weights: str | Path | None = None, weights_sha256: str | None = None, device: str = "cpu",
                 batch_size: int = 4):
        path = Path(weights) if weights is not None else default_anatomy_weights()
        if not path.is_file():
            from mriflow.evaluate.backbones import available_backbones

            raise FileNotFoundError(
                f"backbone 'anatomy' is not available: {path} does not exist (mriflow's anatomy encoder has not been "
                f"trained and shipped in this installation; benchmarks/anatomy.py trains it). Available backbones: "
                f"{', '.join(n for n in available_backbones() if n != 'anatomy')}")
        self.weights_sha256 = sha256(path)
        if weights_sha256 is not None and self.weights_sha256 != weights_sha256.strip().lower():
            raise ValueError(f"{path}: SHA-256 is {self.weights_sha256}, but --weights-sha256 says {weights_sha256}")
        config, self.record = read_anatomy_config(path)
        self.config, self.sex_categories = config, tuple(config.sex_categories)
        self.network = AnatomyEncoder(config).eval()
        self.name = f"anatomy-unet{len(config.classes)}c-{self.network.feature_dim}-{config.grid}"
        load_into(self.network, {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path).items()},
                   path)
        self.device, self.batch_size = torch.device(device), batch_size
        self.network.to(self.device)

    def _checked(self, volumes) -> torch.Tensor:
        x = as_tensor(volumes)
        if tuple(x.shape[2:]) != tuple(self.config.shape):
            raise ValueError(
                f"the anatomy backbone was trained on the {self.config.grid} grid, shape {tuple(self.config.shape)}, "
                f"but got volumes of shape {tuple(x.shape[2:])}; prepare or generate on the {self.config.grid} grid "
                f"(or pass --weights for an anatomy network trained on yours)")
        return x

    @torch.no_grad()
    def features(self, volumes) -> np.ndarray:
        x = self._checked(volumes)
        parts = [self.network.features(x[s : s + self.batch_size].to(self.device)).cpu()
                 for s in range(0, len(x), self.batch_size)]
        return torch.cat(parts).numpy().astype(np.float32)

    @torch.no_grad()
    def segment(self, volumes) -> torch.Tensor:
        """(N, 1, D, H, W) -> predicted class indices (N, D, H, W) into `config.classes`."""
        return self._forward(volumes)[0]

    @torch.no_grad()
    def _forward(self, volumes) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self._checked(volumes)
        segmentations, ages, sex_logits = [], [], []
        for start in range(0, len(x), self.batch_size):
            output = self.network(x[start : start + self.batch_size].to(self.device))
            segmentations.append(class_indices(output["logits"]).long().cpu())
            ages.append(output["age"].cpu())
            sex_logits.append(self.network.sex_logit(x[start : start + self.batch_size].to(self.device)).cpu())
        return torch.cat(segmentations), torch.cat(ages).double(), torch.cat(sex_logits).double()

    def predict(self, volumes) -> dict[str, np.ndarray]:
        segmentation, age, sex_logit = self._forward(volumes)
        volumes_ml = tissue_volumes_ml(segmentation, self.config.classes, self.config.voxel_mm)
        return {
            "age": (age * self.config.target_std["age"] + self.config.target_mean["age"]).numpy(),
            "sex_prob": torch.sigmoid(sex_logit).numpy(),
            **{f"{name}_ml": values for name, values in volumes_ml.items() if name != "background"},
        }
