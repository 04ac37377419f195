"""Feature backbones (one module each; the registry is here) for the set metrics: volumes (N, 1, D, H, W) in [0, 1] -> features (N, F).

Every backbone runs offline. Pretrained networks that users may own load from a
local file whose SHA-256 is checked against the published checksum (or against the
one the user passes), and the report always names the backbone and that checksum,
because FD/KID numbers are only comparable under the same backbone and weights.

| name                 | what                                                      | F    | weights                         |
|----------------------|-----------------------------------------------------------|------|---------------------------------|
| intensity            | block means + intensity and gradient histograms (sanity)  | 1264 | none                            |
| medicalnet-resnet10  | MedicalNet 3D ResNet-10 (Chen et al. 2019), pooled        | 512  | resnet_10[_23dataset].pth       |
| medicalnet-resnet50  | MedicalNet 3D ResNet-50, pooled                           | 2048 | resnet_50[_23dataset].pth       |
| radimagenet-resnet50 | RadImageNet 2D ResNet-50 on axial/coronal/sagittal slices | 6144 | RadImageNet-ResNet50_notop.pth  |
| anatomy              | mriflow's anatomy U-Net: pooled bottleneck + first-level texture statistics, standardised; age/sex heads, tissue segmentation | 304 | shipped, one per grid: weights/anatomy.safetensors (4 mm), anatomy-2mm.safetensors |
| deepbet              | deepbet's 3D LinkNet (Fisch et al. 2024, brain extraction, 7837 T1 scans): pooled encoder levels | 288 | installed with the deepbet package |

    >>> backbone = get_backbone("medicalnet-resnet10", weights="resnet_10_23dataset.pth")
    >>> backbone.name, backbone.weights_sha256
    >>> features = backbone.features(volumes)  # (N, 512) numpy

Pickle safety: .pth files are read with torch.load(weights_only=True), which refuses
anything but tensors and plain containers; .safetensors files hold tensors only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from mriflow.evaluate.backbones.anatomy import (  # noqa: F401  (the public names of the backbones)
    AnatomyBackbone,
    anatomy_weights_for,
    default_anatomy_weights,
    shipped_anatomy_weights,
)
from mriflow.evaluate.backbones.base import (  # noqa: F401
    KNOWN_WEIGHTS_SHA256,
    WEIGHTS_SOURCES,
    Backbone,
    PredictiveBackbone,
    load_state_dict,
    verify_weights,
)
from mriflow.evaluate.backbones.deepbet import DeepbetBackbone, deepbet_weights  # noqa: F401
from mriflow.evaluate.backbones.intensity import IntensityBackbone
from mriflow.evaluate.backbones.medicalnet import MedicalNetBackbone, medicalnet_resnet  # noqa: F401
from mriflow.evaluate.backbones.radimagenet import RadImageNetBackbone, RadImageNetResNet50  # noqa: F401

@dataclass(frozen=True)
class BackboneSpec:
    name: str
    factory: Callable[..., Backbone]  # factory(weights, weights_sha256, device) -> Backbone
    description: str
    needs_weights: bool


BACKBONES: dict[str, BackboneSpec] = {}


def register_backbone(name: str, factory: Callable[..., Backbone], description: str, needs_weights: bool = False) -> None:
    """Make a backbone available to `get_backbone` and `mriflow evaluate --backbone NAME`."""
    BACKBONES[name] = BackboneSpec(name, factory, description, needs_weights)


def available_backbones() -> list[str]:
    return list(BACKBONES)


def get_backbone(name: str, weights: str | Path | None = None, weights_sha256: str | None = None,
                 device: str = "cpu") -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"--backbone {name!r} is unknown; available: {', '.join(BACKBONES)}")
    spec = BACKBONES[name]
    if spec.needs_weights and weights is None:
        raise ValueError(f"--backbone {name} needs a local weights file: pass --weights PATH "
                         f"({WEIGHTS_SOURCES.get(name, spec.description)}); mriflow never downloads weights")
    if not spec.needs_weights and weights is not None and name == "intensity":
        raise ValueError("--backbone intensity has no weights; drop --weights")
    return spec.factory(weights=weights, weights_sha256=weights_sha256, device=device)


register_backbone("intensity", lambda weights, weights_sha256, device: IntensityBackbone(),
                  "weight-free sanity descriptor (block means + intensity/gradient histograms); "
                  "not comparable with the literature")
register_backbone("medicalnet-resnet10",
                  lambda weights, weights_sha256, device: MedicalNetBackbone(10, weights, weights_sha256, device),
                  "MedicalNet 3D ResNet-10 (Chen et al. 2019)", needs_weights=True)
register_backbone("medicalnet-resnet50",
                  lambda weights, weights_sha256, device: MedicalNetBackbone(50, weights, weights_sha256, device),
                  "MedicalNet 3D ResNet-50 (Chen et al. 2019)", needs_weights=True)
register_backbone("radimagenet-resnet50",
                  lambda weights, weights_sha256, device: RadImageNetBackbone(weights, weights_sha256, device),
                  "RadImageNet 2D ResNet-50 on three planes (Mei et al. 2022)", needs_weights=True)
register_backbone("deepbet", lambda weights, weights_sha256, device: DeepbetBackbone(weights, weights_sha256, device),
                  "deepbet's brain-extraction network (Fisch et al. 2024), weights from the installed deepbet package")
register_backbone("anatomy", lambda weights, weights_sha256, device: AnatomyBackbone(weights, weights_sha256, device),
                  "mriflow's anatomy network: tissue segmentation, age and sex heads, trained on IXI "
                  "(src/mriflow/weights/anatomy.safetensors)")
