"""What every evaluation backbone shares: the protocols, the published checksums of the weights users
download themselves, and loading those weights safely (SHA-256 checked, no arbitrary unpickling)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
import torch
import torch.nn as nn

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


def load_into(module: nn.Module, state: dict[str, torch.Tensor], path: Path, ignore_prefixes: Sequence[str] = ()) -> None:
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


def as_tensor(volumes: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = volumes if isinstance(volumes, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(volumes))
    if tensor.ndim != 5 or tensor.shape[1] != 1:
        raise ValueError(f"expected volumes of shape (N, 1, D, H, W), got {tuple(tensor.shape)}")
    return tensor.float()
