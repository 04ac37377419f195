"""The train-on-synthetic benchmark: Dice, bootstrap, balanced batches, and the whole run on phantoms."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import write_labelled
from mriflow.cli import main
from mriflow.data.io import load_volume, save_volume
from mriflow.data.labels import TISSUE_CLASSES
from mriflow.evaluate.utility import (
    MIXED, REAL, Pairs, TrainingSettings, _batches, bootstrap, evaluate_utility, real_pairs,
    synthetic_pairs,
)
from mriflow.train.labels import read_label_map


def test_bootstrap_interval_brackets_the_mean_and_collapses_for_constant_values():
    values = np.random.default_rng(0).normal(0.8, 0.05, 30)
    interval = bootstrap(values)
    assert interval["low"] < interval["mean"] < interval["high"]
    assert interval["high"] - interval["low"] < 0.05
    assert bootstrap(np.full(10, 0.5)) == {"mean": 0.5, "low": 0.5, "high": 0.5}


def test_mixed_batches_are_half_real_half_synthetic():
    def pairs(n):
        return Pairs(torch.zeros(n, 1, 2, 2, 2), torch.zeros(n, 2, 2, 2, dtype=torch.uint8), np.zeros(n), list(map(str, range(n))))

    real, synthetic = pairs(3), pairs(50)
    stream = _batches([real, synthetic], TrainingSettings(batch_size=4), torch.Generator().manual_seed(0))
    for _ in range(5):
        parts = next(stream)
        assert [(s is real, len(i)) for s, i in parts] == [(True, 2), (False, 2)]
        assert all(0 <= j < len(s) for s, i in parts for j in i)


def write_synthetic(real, out, n):
    """'Generated' pairs: the real training phantoms again, as mriflow generate names them, with requested ages."""
    out.mkdir(parents=True)
    train = real_pairs(real, "train", read_label_map(real / "regions.csv"))
    affine = load_volume(real / "images" / "sub00.nii.gz")[1]
    for i in range(n):
        k = i % len(train)
        save_volume(out / f"sample_{i:05d}.nii.gz", train.images[k, 0].numpy(), affine)
        save_volume(out / f"sample_{i:05d}_labels.nii.gz", train.labels[k].numpy(), affine, dtype=np.uint8)
        (out / f"sample_{i:05d}.json").write_text(json.dumps({"covariates": {"age": float(train.ages[k]) + 1}}))
    return out


def test_synthetic_pairs_read_images_labels_and_requested_ages(tmp_path):
    real = write_labelled(tmp_path / "real")
    fake = synthetic_pairs(write_synthetic(real, tmp_path / "fake", 3))
    assert len(fake) == 3 and fake.labels.dtype == torch.uint8 and fake.images.shape[1] == 1
    assert fake.ages.tolist() == [21.0, 28.0, 35.0]  # write_prepared's ages 20 + 7i, plus one
    assert set(np.unique(fake.labels.numpy())) <= set(range(len(TISSUE_CLASSES)))
    (tmp_path / "fake" / "sample_00001.nii.gz").unlink()
    with pytest.raises(ValueError, match="sample_00001.nii.gz is missing"):
        synthetic_pairs(tmp_path / "fake")
    with pytest.raises(ValueError, match="no label maps"):
        synthetic_pairs(tmp_path / "real" / "images")


def test_utility_runs_every_condition_and_writes_its_report(tmp_path):
    real = write_labelled(tmp_path / "real", splits=("train",) * 4 + ("test",) * 2, shape=(16, 24, 16))  # 3 halvings
    synthetic = write_synthetic(real, tmp_path / "fake", 6)
    result = evaluate_utility(real, synthetic, tmp_path / "report", sizes=(1, None), factor=2,
                              settings=TrainingSettings(steps=2, batch_size=2), label_map=read_label_map(real / "regions.csv"),
                              progress=False)
    assert result["sizes"] == [1, 4] and result["test_subjects"] == 2
    for n in ("1", "4"):
        assert set(result["segmentation"][n]) == {REAL, "synthetic (N)", "synthetic (kN)", MIXED}
        assert set(result["age"][n]) == {REAL, "synthetic (kN)", MIXED}  # an age model of N synthetic adds little
        mixed = result["segmentation"][n][MIXED]
        assert mixed["training"] == {"real": int(n), "synthetic": min(2 * int(n), 6)}
        for entry in result["segmentation"][n].values():
            interval = entry["mean_dice"]
            assert 0 <= interval["low"] <= interval["mean"] <= interval["high"] <= 1
    written = json.loads((tmp_path / "report" / "utility.json").read_text())
    assert written["segmentation"] == json.loads(json.dumps(result["segmentation"]))
    table = (tmp_path / "report" / "utility.md").read_text()
    assert "| 1 |" in table and "| 4 |" in table and "Brain-age MAE" in table
    picture = load_png(tmp_path / "report" / "utility.png")
    assert picture.std() > 0.05  # curves and text, not a blank canvas


def load_png(path):
    from matplotlib.image import imread

    return imread(str(path))


def test_utility_command_refuses_bad_sizes_in_one_line(tmp_path, capsys):
    assert main(["evaluate", "utility", "--real", str(tmp_path), "--synthetic", str(tmp_path), "--out",
                 str(tmp_path / "r"), "--sizes", "ten"]) != 0
    error = capsys.readouterr().err.strip()
    assert "--sizes" in error and len(error.splitlines()) == 1


def test_label_fidelity_compares_a_label_map_with_the_segmentation_of_its_own_image():
    from conftest import head_phantom
    from mriflow.evaluate.backbones.anatomy import AnatomyBackbone, anatomy_weights_for
    from mriflow.evaluate.utility import label_fidelity

    backbone = AnatomyBackbone(anatomy_weights_for((40, 48, 40)))
    image, _ = head_phantom((40, 48, 40))
    images = torch.from_numpy(image / image.max()).float()[None, None].repeat(2, 1, 1, 1, 1)
    own = backbone.segment(images).to(torch.uint8)  # its own segmentation: perfect agreement
    pairs = Pairs(images, own, np.full(2, np.nan), ["a", "b"])
    assert np.allclose(label_fidelity(pairs, backbone), 1.0)
    shifted = Pairs(images, own.roll(6, dims=1), np.full(2, np.nan), ["a", "b"])
    scores = label_fidelity(shifted, backbone)
    assert scores.shape == (2, len(TISSUE_CLASSES) - 1) and scores.mean() < 0.9
