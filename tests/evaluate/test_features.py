from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import head_phantom
from mriflow.evaluate import features as features_module
from mriflow.evaluate.features import (
    AnatomyBackbone,
    AnatomyEncoder,
    AnatomyEncoderConfig,
    IntensityBackbone,
    RadImageNetResNet50,
    available_backbones,
    get_backbone,
    load_state_dict,
    medicalnet_resnet,
    register_backbone,
    save_anatomy_encoder,
    sha256_file,
)


def phantom_volumes(count=3, shape=(32, 36, 32)):
    volumes = []
    for seed in range(count):
        image, _ = head_phantom(shape, seed=seed)
        volumes.append(image / image.max())
    return np.stack(volumes)[:, None].astype(np.float32)  # (N, 1, D, H, W)


def randomise_batch_norm(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial running statistics, so a loading bug cannot hide behind defaults."""
    generator = torch.Generator().manual_seed(seed)
    for child in module.modules():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            child.running_mean.copy_(torch.randn(child.running_mean.shape, generator=generator) * 0.1)
            child.running_var.copy_(torch.rand(child.running_var.shape, generator=generator) + 0.5)
    return module


def test_intensity_backbone_is_deterministic_and_sees_blur_and_noise():
    backbone = get_backbone("intensity")
    assert backbone.weights_sha256 is None and backbone.name.startswith("intensity")
    volumes = phantom_volumes()
    first = backbone.features(volumes)
    assert first.shape == (3, 10 * 12 * 10 + 2 * 32) and first.dtype == np.float32
    np.testing.assert_array_equal(first, backbone.features(torch.from_numpy(volumes)))
    blurred = np.stack([gaussian_filter(v, 1.5) for v in volumes])
    noisy = np.clip(volumes + np.random.default_rng(0).normal(0, 0.1, volumes.shape), 0, 1).astype(np.float32)
    gradient_part = slice(1200 + 32, None)
    gap_between_subjects = np.abs(first[0, gradient_part] - first[1, gradient_part]).sum()
    assert np.abs(backbone.features(blurred)[0, gradient_part] - first[0, gradient_part]).sum() > 5 * gap_between_subjects
    assert np.linalg.norm(backbone.features(noisy)[0] - first[0]) > 5 * np.linalg.norm(first[1] - first[0])
    with pytest.raises(ValueError, match=r"\(N, 1, D, H, W\)"):
        IntensityBackbone().features(volumes[:, 0])


def save_medicalnet_checkpoint(path, depth=10):
    """A checkpoint in MedicalNet's published layout: {"state_dict": {"module.<name>": tensor}}."""
    network = randomise_batch_norm(medicalnet_resnet(depth))
    state = {f"module.{k}": v for k, v in network.state_dict().items()}
    state["module.conv_seg.0.weight"] = torch.zeros(2)  # MedicalNet's segmentation head, ignored
    torch.save({"state_dict": state, "epoch": 200}, path)
    return network


def test_medicalnet_loads_a_local_checkpoint_checked_by_sha256(tmp_path):
    path = tmp_path / "resnet_10_23dataset.pth"
    reference = save_medicalnet_checkpoint(path)
    checksum = sha256_file(path)
    backbone = get_backbone("medicalnet-resnet10", weights=path, weights_sha256=checksum)
    assert backbone.name == "medicalnet-resnet10" and backbone.weights_sha256 == checksum
    volumes = phantom_volumes(2)
    values = backbone.features(volumes)
    assert values.shape == (2, 512)
    x = torch.from_numpy(volumes)
    normalised = (x - x.mean(dim=(1, 2, 3, 4), keepdim=True)) / x.std(dim=(1, 2, 3, 4), keepdim=True)
    with torch.no_grad():
        np.testing.assert_allclose(values, reference(normalised).numpy(), rtol=1e-4, atol=1e-5)


def test_medicalnet_refuses_unknown_or_wrong_checksums(tmp_path):
    path = tmp_path / "resnet_10.pth"
    save_medicalnet_checkpoint(path)
    checksum = sha256_file(path)
    with pytest.raises(ValueError, match=f"not a published checksum.*--weights-sha256 {checksum}"):
        get_backbone("medicalnet-resnet10", weights=path)
    with pytest.raises(ValueError, match="SHA-256 is"):
        get_backbone("medicalnet-resnet10", weights=path, weights_sha256="0" * 64)
    with pytest.raises(ValueError, match="needs a local weights file"):
        get_backbone("medicalnet-resnet10")
    with pytest.raises(FileNotFoundError, match="never downloads"):
        get_backbone("medicalnet-resnet10", weights=tmp_path / "absent.pth")


def test_medicalnet_architecture_matches_medicalnet():
    network = medicalnet_resnet(50)
    dilations = {m.dilation for m in network.layer4.modules() if isinstance(m, torch.nn.Conv3d) and m.kernel_size == (3, 3, 3)}
    assert dilations == {(4, 4, 4)}
    assert all(m.stride == (1, 1, 1) for m in network.layer3.modules() if isinstance(m, torch.nn.Conv3d))
    assert network.conv1.stride == (2, 2, 2)
    assert "layer1.0.conv3.weight" in network.state_dict() and "fc.weight" not in network.state_dict()


class Payload:
    """Not a tensor: unpickling it would run arbitrary code paths."""


def test_loading_refuses_pickled_objects_and_misfitting_weights(tmp_path):
    hostile = tmp_path / "hostile.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(1)}, "payload": Payload()}, hostile)
    with pytest.raises(ValueError, match="refusing to load"):
        load_state_dict(hostile)
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv1.weight": torch.zeros(3)}, wrong)
    with pytest.raises(ValueError, match="do not fit"):
        get_backbone("medicalnet-resnet10", weights=wrong, weights_sha256=sha256_file(wrong))


def test_safetensors_checkpoint_with_module_prefix_loads(tmp_path):
    from safetensors.torch import save_file

    network = randomise_batch_norm(medicalnet_resnet(10), seed=1)
    path = tmp_path / "resnet10.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in network.state_dict().items()}, str(path))
    state = load_state_dict(path)
    assert set(state) == set(network.state_dict())
    torch.testing.assert_close(state["bn1.running_var"], network.bn1.running_var)


def test_radimagenet_2p5d_features_from_a_local_file(tmp_path):
    from safetensors.torch import save_file

    network = randomise_batch_norm(RadImageNetResNet50().eval(), seed=2)
    # Half precision keeps the test file small; the reference network gets the same rounded weights.
    half = {k: v.half().contiguous() if v.is_floating_point() else v.contiguous() for k, v in network.state_dict().items()}
    network.load_state_dict(half)
    path = tmp_path / "RadImageNet-ResNet50_notop.safetensors"
    save_file(half, str(path))
    backbone = features_module.RadImageNetBackbone(path, weights_sha256=sha256_file(path), slices_per_plane=3)
    volumes = phantom_volumes(2, shape=(24, 28, 24))
    values = backbone.features(volumes)
    assert values.shape == (2, 3 * 2048)
    assert "radimagenet" in backbone.name and backbone.weights_sha256 == sha256_file(path)
    # The axial block is the slice-averaged pooled output of the 2D network on axial slices.
    volume = torch.from_numpy(volumes[0, 0])
    indices = torch.from_numpy(backbone.slice_indices(volume.shape[2]))
    slices = volume.index_select(2, indices).movedim(2, 0)[:, None].repeat(1, 3, 1, 1)
    slices = slices - torch.tensor(backbone.channel_means_bgr).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = network(slices).mean(dim=(2, 3)).mean(0).numpy()
    np.testing.assert_allclose(values[0, :2048], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(values[0, :2048], values[0, 2048:4096])


def test_anatomy_backbone_reports_when_absent_and_loads_its_own_format(tmp_path):
    with pytest.raises(FileNotFoundError, match="not available.*intensity"):
        AnatomyBackbone(tmp_path / "anatomy.safetensors")
    config = AnatomyEncoderConfig(depth=10, target_mean={"age": 40.0, "ventricles_ml": 25.0, "total_brain_ml": 1100.0})
    model = AnatomyEncoder(config)
    torch.nn.init.zeros_(model.heads.weight)
    torch.nn.init.zeros_(model.heads.bias)
    path = save_anatomy_encoder(tmp_path / "anatomy.safetensors", model)
    backbone = get_backbone("anatomy", weights=path)
    assert isinstance(backbone, features_module.PredictiveBackbone)
    assert backbone.weights_sha256 == sha256_file(path) and backbone.sex_categories == ("F", "M")
    volumes = phantom_volumes(2)
    assert backbone.features(volumes).shape == (2, 512)
    predictions = backbone.predict(volumes)
    assert set(predictions) == {"age", "sex_prob", "ventricles_ml", "total_brain_ml"}
    np.testing.assert_allclose(predictions["age"], [40.0, 40.0])  # zero heads -> the stored target means
    np.testing.assert_allclose(predictions["sex_prob"], [0.5, 0.5])


def test_registry_lists_names_and_accepts_new_backbones():
    assert {"intensity", "medicalnet-resnet10", "medicalnet-resnet50", "radimagenet-resnet50", "anatomy"} <= set(available_backbones())
    with pytest.raises(ValueError, match="unknown; available: intensity"):
        get_backbone("inception")

    class Mean:
        name, weights_sha256 = "mean", None

        def features(self, volumes):
            return np.asarray(volumes).mean(axis=(2, 3, 4))

    register_backbone("test-mean", lambda weights, weights_sha256, device: Mean(), "test")
    try:
        assert get_backbone("test-mean").features(phantom_volumes(2)).shape == (2, 1)
    finally:
        features_module.BACKBONES.pop("test-mean")
