from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from conftest import head_phantom
from mriflow.checkpoint import sha256
from mriflow.config import get_grid
from mriflow.data.labels import TISSUE_CLASSES, tissue_volumes_ml
from mriflow.evaluate import backbones as backbones_module
from mriflow.evaluate.backbones import (
    AnatomyBackbone,
    IntensityBackbone,
    RadImageNetResNet50,
    available_backbones,
    default_anatomy_weights,
    get_backbone,
    load_state_dict,
    medicalnet_resnet,
    register_backbone,
)
from mriflow.models.anatomy import ANATOMY_METADATA_KEY, AnatomyEncoder, AnatomyEncoderConfig, save_anatomy_encoder


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
    checksum = sha256(path)
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
    checksum = sha256(path)
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
        get_backbone("medicalnet-resnet10", weights=wrong, weights_sha256=sha256(wrong))


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
    backbone = backbones_module.RadImageNetBackbone(path, weights_sha256=sha256(path), slices_per_plane=3)
    volumes = phantom_volumes(2, shape=(24, 28, 24))
    values = backbone.features(volumes)
    assert values.shape == (2, 3 * 2048)
    assert "radimagenet" in backbone.name and backbone.weights_sha256 == sha256(path)
    # The axial block is the slice-averaged pooled output of the 2D network on axial slices.
    volume = torch.from_numpy(volumes[0, 0])
    indices = torch.from_numpy(backbone.slice_indices(volume.shape[2]))
    slices = volume.index_select(2, indices).movedim(2, 0)[:, None].repeat(1, 3, 1, 1)
    slices = slices - torch.tensor(backbone.channel_means_bgr).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = network(slices).mean(dim=(2, 3)).mean(0).numpy()
    np.testing.assert_allclose(values[0, :2048], expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(values[0, :2048], values[0, 2048:4096])


def fresh_anatomy_weights(path, segment_as: str | None = None, dtype=torch.float32):
    """An untrained anatomy network with zero age/sex heads (so predictions are the stored target means);
    with `segment_as`, its segmentation head labels every voxel as that class."""
    config = AnatomyEncoderConfig(target_mean={"age": 40.0}, target_std={"age": 10.0},
                                  label_map={"51": "ventricles"})
    model = AnatomyEncoder(config)
    for last in (model.heads[-1], model.sex_probe):
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
    if segment_as is not None:
        head = next(m for m in model.segmentation.modules() if isinstance(m, torch.nn.Conv3d))
        torch.nn.init.zeros_(head.weight)
        with torch.no_grad():
            head.bias.copy_(torch.eye(len(config.classes))[config.classes.index(segment_as)])
    return save_anatomy_encoder(path, model, record={"test": {"age_mae_years": 1.0}}, dtype=dtype), model


def test_anatomy_backbone_saves_loads_and_predicts(tmp_path):
    with pytest.raises(FileNotFoundError, match="not available.*intensity"):
        AnatomyBackbone(tmp_path / "anatomy.safetensors")
    path, model = fresh_anatomy_weights(tmp_path / "anatomy.safetensors")
    backbone = get_backbone("anatomy", weights=path)
    assert isinstance(backbone, backbones_module.PredictiveBackbone)
    assert backbone.weights_sha256 == sha256(path) and backbone.sex_categories == ("F", "M")
    assert backbone.name.startswith("anatomy-") and backbone.config.shape == (40, 48, 40)
    assert backbone.config.label_map == {"51": "ventricles"} and backbone.record == {"test": {"age_mae_years": 1.0}}
    volumes = phantom_volumes(2, shape=(40, 48, 40))
    values = backbone.features(volumes)
    assert values.shape == (2, 256 + 2 * (8 + 16)) and values.dtype == np.float32 and "-304-" in backbone.name
    with torch.no_grad():
        np.testing.assert_allclose(values, model.eval().features(torch.from_numpy(volumes)).numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(values[0], values[1])
    predictions = backbone.predict(volumes)
    assert set(predictions) == {"age", "sex_prob", "csf_ml", "ventricles_ml", "grey_matter_ml", "white_matter_ml",
                                "brainstem_ml", "total_brain_ml"}
    np.testing.assert_allclose(predictions["age"], [40.0, 40.0])  # zero heads -> the stored target mean
    np.testing.assert_allclose(predictions["sex_prob"], [0.5, 0.5])
    measured = tissue_volumes_ml(backbone.segment(volumes), backbone.config.classes, 4.0)
    np.testing.assert_allclose(predictions["ventricles_ml"], measured["ventricles"])
    np.testing.assert_allclose(predictions["total_brain_ml"], measured["total_brain"])

    half, _ = fresh_anatomy_weights(tmp_path / "half.safetensors", dtype=torch.float16)
    assert half.stat().st_size < 0.6 * path.stat().st_size
    assert AnatomyBackbone(half).features(volumes).shape == (2, 304)


def test_anatomy_features_are_embedding_plus_texture_statistics_standardised_by_calibration():
    torch.manual_seed(0)
    model = AnatomyEncoder(AnatomyEncoderConfig()).eval()
    volumes = torch.from_numpy(phantom_volumes(6, shape=(40, 48, 40)))
    with torch.no_grad():
        raw = model.raw_features(volumes)
        skips, bottom = model._encode(volumes)
        np.testing.assert_allclose(raw[:, :256], bottom.mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(raw[:, 256:264], skips[0].mean(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(raw[:, 264:272], skips[0].std(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(raw[:, 288:304], skips[1].std(dim=(2, 3, 4)), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(model.features(volumes), raw)  # uncalibrated: identity standardisation
        model.calibrate_features(volumes, batch_size=4)
        standardised = model.features(volumes)
    varying = raw.std(dim=0) > 1e-8
    np.testing.assert_allclose(standardised.mean(dim=0), 0.0, atol=2e-3)  # z-scores, float32 sums
    np.testing.assert_allclose(standardised.std(dim=0)[varying], 1.0, rtol=2e-3)
    with pytest.raises(ValueError, match="texture_levels 5"):
        AnatomyEncoder(AnatomyEncoderConfig(texture_levels=5))


def test_anatomy_sex_prediction_is_the_block_mean_read_out(tmp_path):
    path, _ = fresh_anatomy_weights(tmp_path / "anatomy.safetensors")
    backbone = AnatomyBackbone(path)
    with torch.no_grad():  # logit = mean intensity of the volume - 0.5
        backbone.network.sex_probe.weight.fill_(1.0 / 1200)
        backbone.network.sex_probe.bias.fill_(-0.5)
    volumes = phantom_volumes(3, shape=(40, 48, 40))
    expected = 1 / (1 + np.exp(-(volumes.reshape(3, -1).mean(1) - 0.5)))
    np.testing.assert_allclose(backbone.predict(volumes)["sex_prob"], expected, rtol=1e-4)


def test_anatomy_volumes_come_from_the_segmentation(tmp_path):
    path, _ = fresh_anatomy_weights(tmp_path / "white.safetensors", segment_as="white_matter")
    predictions = get_backbone("anatomy", weights=path).predict(phantom_volumes(2, shape=(40, 48, 40)))
    np.testing.assert_allclose(predictions["total_brain_ml"], [40 * 48 * 40 * 0.064] * 2)
    np.testing.assert_allclose(predictions["ventricles_ml"], [0.0, 0.0])
    path, _ = fresh_anatomy_weights(tmp_path / "ventricles.safetensors", segment_as="ventricles")
    predictions = get_backbone("anatomy", weights=path).predict(phantom_volumes(1, shape=(40, 48, 40)))
    np.testing.assert_allclose(predictions["ventricles_ml"], [40 * 48 * 40 * 0.064])


def test_anatomy_backbone_refuses_other_grids_and_old_formats(tmp_path):
    from safetensors.torch import save_file

    path, _ = fresh_anatomy_weights(tmp_path / "anatomy.safetensors")
    backbone = AnatomyBackbone(path)
    with pytest.raises(ValueError, match=r"4mm grid, shape \(40, 48, 40\), but got volumes of shape \(32, 36, 32\)"):
        backbone.features(phantom_volumes(1))
    with pytest.raises(ValueError, match="4mm grid"):
        backbone.predict(phantom_volumes(1, shape=(80, 96, 80)))
    old = tmp_path / "old.safetensors"
    save_file({"heads.weight": torch.zeros(4, 512)}, str(old),
              metadata={ANATOMY_METADATA_KEY: json.dumps({"depth": 10, "grid": "2mm"})})
    with pytest.raises(ValueError, match=r"\['depth'\] are unknown.*retrain"):
        AnatomyBackbone(old)
    before_texture = {k: v for k, v in json.loads(json.dumps(
        asdict(AnatomyEncoderConfig()))).items() if k not in ("texture_levels", "sex_blocks")}
    save_file({"heads.weight": torch.zeros(2, 256)}, str(old),
              metadata={ANATOMY_METADATA_KEY: json.dumps(before_texture)})
    with pytest.raises(ValueError, match=r"older anatomy weights format.*--init .*--epochs 0"):
        AnatomyBackbone(old)


@pytest.mark.parametrize("grid", ["4mm", "2mm"])
def test_shipped_anatomy_weights_load_and_fit_the_size_limit(grid):
    path = backbones_module.anatomy_weights_for(get_grid(grid).shape)
    if path is None:
        pytest.skip(f"no anatomy network for the {grid} grid is shipped in this checkout (benchmarks/anatomy.py trains one)")
    assert path.stat().st_size <= 16 * 2**20
    if grid == "4mm":
        assert path == default_anatomy_weights()
    backbone = get_backbone("anatomy", weights=path)
    assert backbone.weights_sha256 == sha256(path) and backbone.config.grid == grid
    assert backbone.config.shape == get_grid(backbone.config.grid).shape
    assert backbone.config.voxel_mm == get_grid(backbone.config.grid).voxel_mm
    assert set(backbone.config.label_map.values()) == set(TISSUE_CLASSES[1:])
    assert {"age_mae_years", "sex_accuracy", "dice"} <= set(backbone.record["test"])
    assert {"features", "sex_read_out", "sex_cross_validated"} <= set(backbone.record["calibration"])
    assert not torch.equal(backbone.network.feature_std, torch.ones_like(backbone.network.feature_std))  # calibrated
    volumes = phantom_volumes(2, shape=backbone.config.shape)
    assert backbone.features(volumes).shape == (2, backbone.network.feature_dim)


def test_deepbet_backbone_uses_the_installed_network_with_deepbets_normalisation(tmp_path):
    from deepbet.utils import normalize

    backbone = get_backbone("deepbet")
    assert backbone.weights_sha256 == sha256(backbones_module.deepbet_weights())
    assert backbone.weights_sha256 in backbones_module.KNOWN_WEIGHTS_SHA256["deepbet"]
    volumes = phantom_volumes(2)
    x = torch.from_numpy(volumes[:1])
    low, high = x.flatten().quantile(0.005), x.flatten().quantile(0.995)
    np.testing.assert_allclose(backbone.normalise(x), normalize(x, low, high), rtol=1e-5, atol=1e-5)

    values = backbone.features(volumes)
    assert values.shape == (2, 288) and values.dtype == np.float32 and np.isfinite(values).all()
    np.testing.assert_allclose(backbone.features(volumes), values)  # deterministic
    assert not np.allclose(values[0], values[1], rtol=1e-3)
    # deepbet's quantile normalisation: a positive affine change of intensities changes nothing
    np.testing.assert_allclose(backbone.features(0.5 * volumes + 0.1), values, rtol=1e-3, atol=1e-4)

    copy = tmp_path / "bbox_model.pt"
    copy.write_bytes(backbones_module.deepbet_weights().read_bytes() + b"\0")
    with pytest.raises(ValueError, match="not a published checksum for backbone 'deepbet'"):
        get_backbone("deepbet", weights=copy)


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
        backbones_module.BACKBONES.pop("test-mean")
