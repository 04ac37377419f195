"""Feature backbones for the set metrics: volumes (N, 1, D, H, W) in [0, 1] -> features (N, F).

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

import json
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.nets import resnet10, resnet18, resnet34, resnet50

from mriflow.utils.files import sha256

# Published SHA-256 of the files users download themselves (Git LFS object ids on the
# Hugging Face Hub): TencentMedicalNet/MedicalNet-Resnet10 and -Resnet50, and
# MONAI/checkpoints for RadImageNet (the file MONAI's RadImageNet perceptual loss loads).
KNOWN_WEIGHTS_SHA256: dict[str, dict[str, str]] = {
    "medicalnet-resnet10": {
        "2824951eaef30e115929b89bec72342380b08d14792bda1449974ac849e497c0":
            "resnet_10.pth (TencentMedicalNet/MedicalNet-Resnet10)",
        "afa8055f3e47f4a18239495d92a7abc587902c69c31c743de2b2784653b72605":
            "resnet_10_23dataset.pth (TencentMedicalNet/MedicalNet-Resnet10)",
    },
    "medicalnet-resnet50": {
        "5b6189cafbee2f5604a7279b62bc163365aa6a86a377e1dc260a14275cacbd84":
            "resnet_50.pth (TencentMedicalNet/MedicalNet-Resnet50)",
        "ff48a62219073fb977fd3f4ddfb8dc1367f0ec156c8d6f6c37e205bd683a246e":
            "resnet_50_23dataset.pth (TencentMedicalNet/MedicalNet-Resnet50)",
    },
    "radimagenet-resnet50": {
        "2457479b254569e5a81ba48fee6c5b2b84b7a729e507aaa2466101aedb8e5c37": "RadImageNet-ResNet50_notop.pth (MONAI/checkpoints)",
    },
    "deepbet": {
        "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa": "data/models/bbox_model.pt (deepbet 1.0.2 wheel)",
    },
}
WEIGHTS_SOURCES = {
    "medicalnet-resnet10": "resnet_10_23dataset.pth from https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet10",
    "medicalnet-resnet50": "resnet_50_23dataset.pth from https://huggingface.co/TencentMedicalNet/MedicalNet-Resnet50",
    "radimagenet-resnet50": "RadImageNet-ResNet50_notop.pth from https://huggingface.co/MONAI/checkpoints",
    "deepbet": "data/models/bbox_model.pt of the deepbet package (pip install deepbet==1.0.2)",
}
ANATOMY_WEIGHTS = "anatomy.safetensors"
ANATOMY_METADATA_KEY = "mriflow.anatomy_encoder"
ANATOMY_RECORD_KEY = "mriflow.anatomy_training"


class Backbone(Protocol):
    """What evaluation needs from a feature network."""

    name: str
    weights_sha256: str | None  # None only for backbones without weights

    def features(self, volumes: np.ndarray | torch.Tensor) -> np.ndarray:
        """(N, 1, D, H, W) in [0, 1] -> (N, F) float32, deterministic."""
        ...


@runtime_checkable
class PredictiveBackbone(Protocol):
    """A backbone with anatomy heads, used for conditional fidelity.

    predict() returns arrays of shape (N,): "age" (years), "sex_prob" (probability of
    the last of `sex_categories`, e.g. "M"), "ventricles_ml" and "total_brain_ml".
    """

    sex_categories: tuple[str, ...]

    def predict(self, volumes: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]: ...


# ----------------------------------------------------------------------------- weights


def verify_weights(path: str | Path, backbone: str, expected_sha256: str | None = None) -> str:
    """Check a weights file's SHA-256 and return it.

    With `expected_sha256` the file must match it; without, it must match one of the
    published checksums known for `backbone`.
    """
    path = Path(path)
    if not path.is_file():
        source = WEIGHTS_SOURCES.get(backbone, "see the docs")
        raise FileNotFoundError(f"--weights {path}: no such file; download it yourself ({source}) "
                                f"and pass its local path, mriflow never downloads")
    actual = sha256(path)
    if expected_sha256 is not None:
        if actual != expected_sha256.strip().lower():
            raise ValueError(f"--weights {path}: SHA-256 is {actual}, but --weights-sha256 says {expected_sha256}; "
                             f"the file is corrupt or not the one you meant")
        return actual
    known = KNOWN_WEIGHTS_SHA256.get(backbone, {})
    if actual not in known:
        listed = "; ".join(f"{v}: {k}" for k, v in known.items()) or "none are recorded"
        raise ValueError(f"--weights {path}: SHA-256 {actual} is not a published checksum for backbone {backbone!r} "
                         f"(known: {listed}). If you trust this file, pass --weights-sha256 {actual}")
    return actual


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or .pth/.pt file, without unpickling arbitrary objects.

    Unwraps a top-level "state_dict" entry (MedicalNet's layout) and strips the
    "module." prefix that torch.nn.DataParallel adds.
    """
    path = Path(path)
    if path.name.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"{path}: refusing to load, the file holds Python objects other than tensors "
                             f"(torch.load weights_only=True said: {str(error).splitlines()[0]}); "
                             f"convert it to a plain state dict or .safetensors") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (name -> tensor), got {type(state).__name__}")
    tensors = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. an epoch counter stored beside the weights
        tensors[key[len("module."):] if key.startswith("module.") else key] = value
    return tensors


def _load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, ignore_prefixes: Sequence[str] = ()) -> None:
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise ValueError(
            f"{path}: weights do not fit the {type(module).__name__} architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(wrong_shape)} of the wrong shape (e.g. {wrong_shape[:3]}); is it the right file for this backbone?")
    module.load_state_dict(state, strict=True)


def _as_tensor(volumes: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = volumes if isinstance(volumes, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(volumes))
    if tensor.ndim != 5 or tensor.shape[1] != 1:
        raise ValueError(f"expected volumes of shape (N, 1, D, H, W), got {tuple(tensor.shape)}")
    return tensor.float()


# ----------------------------------------------------------------------------- intensity (no weights)


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
        x = _as_tensor(volumes)  # (N, 1, D, H, W)
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


# ----------------------------------------------------------------------------- MedicalNet (3D)


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
        _load_into(self.network, load_state_dict(weights), Path(weights), ignore_prefixes=("conv_seg.", "fc."))
        self.device, self.batch_size = torch.device(device), batch_size
        self.network.to(self.device)

    @torch.no_grad()
    def features(self, volumes: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _as_tensor(volumes)
        outputs = []
        for start in range(0, len(x), self.batch_size):
            batch = x[start : start + self.batch_size].to(self.device)
            mean = batch.mean(dim=(1, 2, 3, 4), keepdim=True)
            std = batch.std(dim=(1, 2, 3, 4), keepdim=True).clamp(min=1e-6)
            outputs.append(self.network((batch - mean) / std).cpu())
        return torch.cat(outputs).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- RadImageNet (2.5D)


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
        _load_into(self.network, load_state_dict(weights), Path(weights), ignore_prefixes=("fc.",))
        self.device, self.slices_per_plane, self.batch_size = torch.device(device), slices_per_plane, batch_size
        self.network.to(self.device)

    def slice_indices(self, size: int) -> np.ndarray:
        return np.unique(np.round(np.linspace(0.1, 0.9, self.slices_per_plane) * (size - 1)).astype(int))

    @torch.no_grad()
    def features(self, volumes: np.ndarray | torch.Tensor) -> np.ndarray:
        x = _as_tensor(volumes)[:, 0]  # (N, D, H, W)
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


# ----------------------------------------------------------------------------- mriflow's anatomy encoder

# Tissue classes of the anatomy network, in output-channel order. Brainstem is its own class
# because MUSE keeps it out of grey (601) and white matter (604) but inside TotalBrain (701).
TISSUE_CLASSES = ("background", "csf", "ventricles", "grey_matter", "white_matter", "brainstem")
# MUSE 701 TotalBrain = 601 GM + 604 WM + 509 Ventricles + 35 BrainStem (checked on region_volumes.csv);
# cortical CSF (1) and the unnamed CSF label (46) are inside the ICV (702) but outside TotalBrain.
BRAIN_CLASSES = ("ventricles", "grey_matter", "white_matter", "brainstem")
# DLMUSE label maps hold two labels that muse_regions.csv does not name; these are their
# Neuromorphometrics names (46: CSF outside the ventricles, 69: optic chiasm).
UNNAMED_DLMUSE_LABELS = {46: "CSF", 69: "OpticChiasm"}
# MUSE numbers single (label-map) regions below 300; 300 and above are composites of them.
MUSE_FIRST_COMPOSITE = 300


def muse_tissue_class(name: str) -> str:
    """The tissue class of one single DLMUSE region, by its MUSE name.

    Rules, first match wins: "...Ventricle..." -> ventricles (lateral, inferior lateral,
    3rd, 4th; MUSE 509); CortCSF / CSF -> csf; BrainStem -> brainstem; white-matter
    names (…_WM…, CorpCall, Fornix, internal capsule limbs, VentralDC, OpticChiasm) ->
    white_matter, which reproduces MUSE 604 WM; every other region (cortical gyri,
    deep nuclei, hippocampus, amygdala, cerebellar cortex and vermis) -> grey_matter (601).
    """
    if "Ventricle" in name:
        return "ventricles"
    if name in ("CortCSF", "CSF"):
        return "csf"
    if name == "BrainStem":
        return "brainstem"
    white = ("CorpCall", "Fornix", "InternalCapsule", "VentralDC", "OpticChiasm")
    if name.endswith("_WM") or "_WM_" in name or any(part in name for part in white):
        return "white_matter"
    return "grey_matter"


def muse_tissue_mapping(regions: dict[int, str], classes: Sequence[str] = TISSUE_CLASSES) -> dict[int, int]:
    """DLMUSE label -> class index in `classes`, for the single regions of `regions` (index -> name,
    as in muse_regions.csv) plus `UNNAMED_DLMUSE_LABELS`; composites (index >= 300) are skipped."""
    named = {**UNNAMED_DLMUSE_LABELS, **{int(k): str(v) for k, v in regions.items() if 0 < int(k) < MUSE_FIRST_COMPOSITE}}
    return {label: classes.index(muse_tissue_class(name)) for label, name in sorted(named.items())}


def tissue_volumes_ml(segmentation: torch.Tensor | np.ndarray, classes: Sequence[str], voxel_mm: float) -> dict[str, np.ndarray]:
    """Volume of every class in a segmentation (N, D, H, W) of class indices: voxel count x voxel volume, in ml.

    Returns one (N,) float64 array per class, plus "total_brain" = the sum over `BRAIN_CLASSES`.
    """
    segmentation = torch.as_tensor(segmentation)
    if segmentation.ndim != 4:
        raise ValueError(f"segmentation: expected (N, D, H, W) class indices, got shape {tuple(segmentation.shape)}")
    counts = F.one_hot(segmentation.long().flatten(1), len(classes)).sum(1).double()  # (N, C)
    volumes = {name: (counts[:, i] * voxel_mm**3 / 1000.0).numpy() for i, name in enumerate(classes)}
    volumes["total_brain"] = sum(volumes[name] for name in BRAIN_CLASSES)
    return volumes


@dataclass
class AnatomyEncoderConfig:
    """Architecture, grid and target scaling of the anatomy network, stored in its safetensors metadata.

    `texture_levels`: how many encoder levels (from the full-resolution one) add the
    per-channel mean and sd of their activations to the features (see `AnatomyEncoder.features`).
    `sex_blocks`: the grid of block means the sex read-out sees (see `AnatomyEncoder.sex_logit`).

    Age is a standardised regression (years = output * std + mean); sex is a logit for
    the last of `sex_categories`. `label_map` (DLMUSE label -> class name) records how
    the segmentation targets were made.
    """

    grid: str = "4mm"
    voxel_mm: float = 4.0
    shape: tuple[int, ...] = (40, 48, 40)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    embedding_dim: int = 256
    classes: tuple[str, ...] = TISSUE_CLASSES
    target_mean: dict[str, float] = field(default_factory=lambda: {"age": 50.0})
    target_std: dict[str, float] = field(default_factory=lambda: {"age": 16.0})
    sex_categories: tuple[str, ...] = ("F", "M")
    label_map: dict[str, str] = field(default_factory=dict)
    texture_levels: int = 2
    sex_blocks: tuple[int, ...] = (10, 12, 10)


class AnatomyEncoder(nn.Module):
    """A compact 3D U-Net of MONAI residual units with a tissue segmentation head, a pooled
    bottleneck embedding and age / sex heads.

        x (N, 1, D, H, W) in [0, 1]
          encoder: residual units at channels[0] (full size), channels[1:] (each stride 2)
          bottleneck: residual unit to embedding_dim channels -> average pool -> embedding (N, E)
          decoder: transposed convolutions + skip connections -> logits (N, len(classes), D, H, W)
          heads: linear on the embedding -> age (N,) standardised, sex_auxiliary_logit (N,) (training only)
          sex read-out: linear on the volume's block means (`sex_logit`) -> the sex prediction

    Features for the set metrics (`features`): the embedding joined with the per-channel
    mean and sd over the volume of the first `texture_levels` encoder levels, every
    dimension standardised with the buffers `feature_mean` / `feature_std` (set from the
    training subjects by `calibrate_features`). The bottleneck alone is nearly blind to
    noise and blur (it was trained to segment through intensity jitter); the early
    levels' statistics are what see them.

    Sex is predicted by `sex_logit`, a logistic regression on the volume average-pooled
    to `sex_blocks`, fitted after training on the training subjects. The sex output of
    the jointly trained heads stays at chance on IXI (the segmentation loss shapes the
    shared embedding), and so does a linear read-out of the embedding on held-out
    subjects, while the coarse intensity pattern separates the sexes.

    D, H, W must be divisible by 2 ** (len(channels) - 1) (40 x 48 x 40 and 80 x 96 x 80 are).
    """

    def __init__(self, config: AnatomyEncoderConfig):
        super().__init__()
        self.config = config
        norm, channels = ("instance", {"affine": True}), tuple(config.channels)
        factor = 2 ** (len(channels) - 1)
        if any(size % factor for size in config.shape):
            raise ValueError(f"AnatomyEncoderConfig.shape {tuple(config.shape)}: every size must be divisible by "
                             f"{factor} for {len(channels)} levels (channels {channels}); pad the grid or drop a level")
        self.encoder = nn.ModuleList(
            ResidualUnit(3, c_in, c_out, strides=1 if i == 0 else 2, subunits=2, norm=norm)
            for i, (c_in, c_out) in enumerate(zip((1,) + channels[:-1], channels)))
        self.bottleneck = ResidualUnit(3, channels[-1], config.embedding_dim, subunits=2, norm=norm)
        self.upsample = nn.ModuleList()
        self.decoder = nn.ModuleList()
        in_channels = config.embedding_dim + channels[-1]  # the bottleneck joined with the deepest encoder level
        for level in reversed(range(len(channels) - 1)):  # each step doubles the size and joins a skip
            self.upsample.append(Convolution(3, in_channels, channels[level], strides=2, is_transposed=True, norm=norm))
            self.decoder.append(ResidualUnit(3, 2 * channels[level], channels[level], subunits=1, norm=norm))
            in_channels = channels[level]
        self.segmentation = Convolution(3, channels[0], len(config.classes), kernel_size=1, conv_only=True)
        self.heads = nn.Sequential(nn.Dropout(0.2), nn.Linear(config.embedding_dim, 2))  # age, sex logit
        if not 0 <= config.texture_levels <= len(channels):
            raise ValueError(f"AnatomyEncoderConfig.texture_levels {config.texture_levels}: must be between 0 and "
                             f"the {len(channels)} encoder levels")
        feature_dim = config.embedding_dim + 2 * sum(channels[: config.texture_levels])
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.sex_probe = nn.Linear(math.prod(config.sex_blocks), 1)

    @property
    def embedding_dim(self) -> int:
        return self.config.embedding_dim

    @property
    def feature_dim(self) -> int:
        return len(self.feature_mean)

    def _encode(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return skips, self.bottleneck(x)

    def raw_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> [embedding, (mean, sd) per channel of each texture level] (N, feature_dim),
        not standardised; the decoder is not run."""
        skips, bottom = self._encode(x)
        parts = [bottom.mean(dim=(2, 3, 4))]
        for level in skips[: self.config.texture_levels]:
            parts += [level.mean(dim=(2, 3, 4)), level.std(dim=(2, 3, 4))]
        return torch.cat(parts, dim=1)

    def sex_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> block means (N, prod(sex_blocks)), what the sex read-out sees."""
        return F.adaptive_avg_pool3d(x, tuple(self.config.sex_blocks)).flatten(1)

    def sex_logit(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> logit (N,) of the last of `config.sex_categories`."""
        return self.sex_probe(self.sex_blocks(x))[:, 0]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1, D, H, W) -> standardised features (N, feature_dim)."""
        return (self.raw_features(x) - self.feature_mean) / self.feature_std

    @torch.no_grad()
    def calibrate_features(self, volumes: torch.Tensor, batch_size: int = 8) -> None:
        """Set the standardisation to the mean and sd of `raw_features` over `volumes` (the training
        subjects, N >= 2); a dimension that does not vary keeps sd 1."""
        raw = torch.cat([self.raw_features(volumes[s : s + batch_size]) for s in range(0, len(volumes), batch_size)])
        if len(raw) < 2:
            raise ValueError("calibrate_features needs at least 2 volumes")
        std = raw.std(dim=0)
        self.feature_mean.copy_(raw.mean(dim=0))
        self.feature_std.copy_(torch.where(std > 1e-8, std, torch.ones_like(std)))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {"logits" (N, C, D, H, W), "embedding" (N, E), "age" (N,) standardised, "sex_auxiliary_logit" (N,) (training only; predictions use `sex_logit`)}."""
        skips, bottom = self._encode(x)
        embedding = bottom.mean(dim=(2, 3, 4))
        y = torch.cat([bottom, skips[-1]], dim=1)
        for upsample, decoder, skip in zip(self.upsample, self.decoder, reversed(skips[:-1])):
            y = decoder(torch.cat([upsample(y), skip], dim=1))
        heads = self.heads(embedding)
        return {"logits": self.segmentation(y), "embedding": embedding, "age": heads[:, 0], "sex_auxiliary_logit": heads[:, 1]}


def save_anatomy_encoder(path: str | Path, model: AnatomyEncoder, record: dict | None = None,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write weights + config (and an optional training record) as safetensors metadata, in the layout
    `AnatomyBackbone` reads. Convolution kernels (5-D, nearly all the bytes) are stored as `dtype`;
    biases, norms, the linear read-outs and the feature calibration stay float32."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() and v.ndim == 5 else v).detach().contiguous().cpu()
             for k, v in model.state_dict().items()}
    metadata = {ANATOMY_METADATA_KEY: json.dumps(asdict(model.config))}
    if record is not None:
        metadata[ANATOMY_RECORD_KEY] = json.dumps(record)
    save_file(state, str(path), metadata=metadata)
    return path


def default_anatomy_weights() -> Path:
    """The 4 mm anatomy network shipped in the package (other grids: `anatomy_weights_for`)."""
    return Path(str(resources.files("mriflow") / "weights" / ANATOMY_WEIGHTS))


def read_anatomy_config(path: str | Path) -> tuple[AnatomyEncoderConfig, dict | None]:
    """Config and training record from an anatomy weights file's metadata, refusing other formats."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if ANATOMY_METADATA_KEY not in metadata:
        raise ValueError(f"{path}: no {ANATOMY_METADATA_KEY!r} metadata; write it with save_anatomy_encoder")
    values = json.loads(metadata[ANATOMY_METADATA_KEY])
    known = {f.name for f in fields(AnatomyEncoderConfig)}
    if set(values) - known:
        raise ValueError(f"{path}: config keys {sorted(set(values) - known)} are unknown to this mriflow version "
                         f"(a newer anatomy weights format?); retrain with this version's benchmarks/anatomy.py")
    if known - set(values):
        raise ValueError(f"{path}: an older anatomy weights format (no {sorted(known - set(values))} in its config); "
                         f"recalibrate it with `python benchmarks/anatomy.py --data PREPARED --init {path} --epochs 0`")
    config = AnatomyEncoderConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    return config, json.loads(metadata.get(ANATOMY_RECORD_KEY, "null"))


def shipped_anatomy_weights() -> dict[tuple[int, ...], Path]:
    """The anatomy networks shipped in the package (weights/anatomy*.safetensors), by the volume shape
    they were trained on."""
    folder = default_anatomy_weights().parent
    return {tuple(read_anatomy_config(path)[0].shape): path for path in sorted(folder.glob("anatomy*.safetensors"))}


def anatomy_weights_for(shape: Sequence[int]) -> Path | None:
    """The shipped anatomy network trained on volumes of `shape`, if there is one."""
    return shipped_anatomy_weights().get(tuple(shape))


class AnatomyBackbone:
    """mriflow's anatomy network: embedding features plus age / sex predictions and tissue volumes
    measured from its segmentation.

    features(): the standardised embedding + texture statistics (N, feature_dim), see `AnatomyEncoder`.
    predict(): "age" (years), "sex_prob" (of the last of `sex_categories`), and
    "ventricles_ml" / "total_brain_ml" = voxel count of the predicted classes x voxel
    volume of the config's grid. The volumes are in template space: `mriflow prepare`
    registers affinely to MNI152, so they are head-size normalised, not native volumes.
    Total brain = ventricles + grey + white matter + brainstem (MUSE 701 TotalBrain).
    """

    def __init__(self, weights: str | Path | None = None, weights_sha256: str | None = None, device: str = "cpu",
                 batch_size: int = 4):
        path = Path(weights) if weights is not None else default_anatomy_weights()
        if not path.is_file():
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
        _load_into(self.network, {k: v.float() if v.is_floating_point() else v for k, v in load_state_dict(path).items()},
                   path)
        self.device, self.batch_size = torch.device(device), batch_size
        self.network.to(self.device)

    def _checked(self, volumes) -> torch.Tensor:
        x = _as_tensor(volumes)
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
            segmentations.append(output["logits"].argmax(1).cpu())
            ages.append(output["age"].cpu())
            sex_logits.append(self.network.sex_logit(x[start : start + self.batch_size].to(self.device)).cpu())
        return torch.cat(segmentations), torch.cat(ages).double(), torch.cat(sex_logits).double()

    def predict(self, volumes) -> dict[str, np.ndarray]:
        segmentation, age, sex_logit = self._forward(volumes)
        volumes_ml = tissue_volumes_ml(segmentation, self.config.classes, self.config.voxel_mm)
        return {
            "age": (age * self.config.target_std["age"] + self.config.target_mean["age"]).numpy(),
            "sex_prob": torch.sigmoid(sex_logit).numpy(),
            "ventricles_ml": volumes_ml["ventricles"],
            "total_brain_ml": volumes_ml["total_brain"],
        }


# ----------------------------------------------------------------------------- deepbet (3D, installed weights)


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
        for volume in _as_tensor(volumes):
            x = F.interpolate(volume[None].to(self.device), self.input_shape, mode="trilinear", align_corners=False)
            h, outputs = self.normalise(x), []
            for level in self.levels:
                h = level(self.activation, h)
                outputs.append(h)
            rows.append(torch.cat([o.mean(dim=(2, 3, 4)) for o in outputs] +
                                  [o.std(dim=(2, 3, 4)) for o in outputs[:2]], dim=1)[0].cpu())
        return torch.stack(rows).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- registry


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
