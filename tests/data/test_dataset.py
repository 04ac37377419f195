from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from mriflow.config import get_grid
from mriflow.data.dataset import CovariateSchema, PreparedDataset
from mriflow.data.io import load_volume, save_volume, template_affine


def make_prepared(root, rows):
    """A minimal prepared folder: random volumes in the 4mm grid and a manifest with covariates."""
    grid = get_grid("4mm")
    affine = template_affine(grid)
    records = []
    rng = np.random.default_rng(0)
    for subject, split, covariates in rows:
        image = rng.random(grid.shape, dtype=np.float32)
        mask = np.zeros(grid.shape, np.uint8)
        mask[3:35, 5:43, 5:35] = 1  # off-centre in x so a left-right flip shows
        image[mask == 0] = 0
        save_volume(root / "images" / f"{subject}.nii.gz", image, affine)
        save_volume(root / "masks" / f"{subject}.nii.gz", mask, affine, dtype=np.uint8)
        records.append(
            {"subject": subject, "image": f"images/{subject}.nii.gz", "mask": f"masks/{subject}.nii.gz",
             "labels": "", "split": split, **covariates}
        )
    pd.DataFrame(records).to_csv(root / "manifest.csv", index=False)
    return root


ROWS = [
    ("s1", "train", {"age": 20.0, "sex": "F", "site": "A"}),
    ("s2", "train", {"age": 40.0, "sex": "M", "site": "B"}),
    ("s3", "train", {"age": 60.0, "sex": "F", "site": "A"}),
    ("s4", "train", {"age": None, "sex": "M", "site": "A"}),
    ("s5", "train", {"age": 30.0, "sex": "F", "site": "B"}),
    ("s6", "train", {"age": 50.0, "sex": "M", "site": "B"}),
    ("s7", "train", {"age": 25.0, "sex": "F", "site": "A"}),
    ("v1", "val", {"age": 80.0, "sex": "", "site": "C"}),
]


def test_schema_standardises_continuous_with_training_statistics(tmp_path):
    dataset = PreparedDataset(make_prepared(tmp_path, ROWS), "train", covariates=["age", "sex"])
    ages = np.array([20, 40, 60, 30, 50, 25], dtype=float)
    age = dataset.schema["age"]
    assert age.kind == "continuous"
    assert age.mean == pytest.approx(ages.mean())
    assert age.std == pytest.approx(ages.std())
    assert (age.minimum, age.maximum) == (20.0, 60.0)
    assert dataset.schema["sex"].kind == "categorical"
    assert dataset.schema["sex"].categories == ["F", "M"]

    item = dataset[0]
    assert item["subject"] == "s1"
    assert item["covariates"][0].item() == pytest.approx((20 - ages.mean()) / ages.std())
    assert item["covariates"][1].item() == 0.0
    assert item["covariates_present"].tolist() == [True, True]


def test_missing_and_unknown_values_are_marked_absent(tmp_path):
    root = make_prepared(tmp_path, ROWS)
    train = PreparedDataset(root, "train", covariates=["age", "sex", "site"])
    missing_age = train[3]
    assert missing_age["covariates_present"].tolist() == [False, True, True]
    assert missing_age["covariates"][0].item() == 0.0

    # The val split reuses the training schema: an unseen site and an empty sex are absent.
    val = PreparedDataset(root, "val", schema=train.schema)
    item = val[0]
    assert item["covariates_present"].tolist() == [True, False, False]
    assert train.schema["age"].decode(item["covariates"][0].item()) == pytest.approx(80.0)


def test_item_shapes_and_no_covariates(tmp_path):
    dataset = PreparedDataset(make_prepared(tmp_path, ROWS), "val")
    item = dataset[0]
    assert item["image"].shape == (1, 40, 48, 40) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, 40, 48, 40)
    assert item["covariates"].shape == (0,)


def test_augmentation_flips_and_rescales_inside_the_brain_only(tmp_path):
    root = make_prepared(tmp_path, ROWS)
    plain = PreparedDataset(root, "train")[0]
    augmented = PreparedDataset(root, "train", augment=True)
    torch.manual_seed(0)
    seen_flip = seen_plain = False
    for _ in range(12):
        item = augmented[0]
        image, mask = item["image"], item["mask"]
        assert image.min() >= 0 and image.max() <= 1
        assert torch.all(image[mask == 0] == 0)
        flipped = torch.equal(mask, plain["mask"].flip(1)) and not torch.equal(mask, plain["mask"])
        reference = plain["image"].flip(1) if flipped else plain["image"]
        # Intensities are an affine map of the original inside the brain.
        inside = mask > 0
        slope = np.polyfit(reference[inside].numpy(), image[inside].numpy(), 1)[0]
        assert 0.85 < slope < 1.15
        seen_flip |= flipped
        seen_plain |= not flipped
    assert seen_flip and seen_plain


def test_bad_requests_name_the_problem(tmp_path):
    root = make_prepared(tmp_path, ROWS)
    with pytest.raises(ValueError, match="split 'test' not found"):
        PreparedDataset(root, "test")
    with pytest.raises(ValueError, match="covariate 'weight' is not in the manifest; available: age, sex, site"):
        PreparedDataset(root, "train", covariates=["weight"])
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        PreparedDataset(tmp_path / "nowhere", "train")


def test_schema_round_trips_through_strict_json(tmp_path):
    schema = PreparedDataset(make_prepared(tmp_path, ROWS), "train", covariates=["age", "sex"]).schema
    text = json.dumps(schema.to_dict(), allow_nan=False)  # checkpoints are read by strict JSON parsers too
    again = CovariateSchema.from_dict(json.loads(text))
    assert math.isnan(again["sex"].minimum) and again["age"].maximum == schema["age"].maximum
    request = {"age": 33.0, "sex": "M"}
    assert torch.equal(schema.encode(request)[0], again.encode(request)[0])
    with pytest.raises(KeyError, match="known covariates: age, sex"):
        schema["weight"]


def test_random_crops_are_windows_of_the_volume_reproducible_from_torch_seed(tmp_path):
    root = make_prepared(tmp_path, ROWS[:2])
    whole = PreparedDataset(root, "train")[0]["image"][0].numpy()
    cropped = PreparedDataset(root, "train", crop_size=(16, 24, 16))
    torch.manual_seed(3)
    first = cropped[0]
    assert first["image"].shape == first["mask"].shape == (1, 16, 24, 16)
    windows = [whole[i:i + 16, j:j + 24, k:k + 16] for i in range(25) for j in range(25) for k in range(25)]
    assert any(np.array_equal(first["image"][0].numpy(), w) for w in windows)  # a window, unchanged
    torch.manual_seed(3)
    assert torch.equal(cropped[0]["image"], first["image"])
    corners = set()
    for _ in range(8):
        image = cropped[0]["image"][0].numpy()
        corners.add(next(n for n, w in enumerate(windows) if np.array_equal(image, w)))
    assert len(corners) > 1  # the position varies
    with pytest.raises(ValueError, match="larger than the volume"):
        PreparedDataset(root, "train", crop_size=(48, 24, 16))[0]
    with pytest.raises(ValueError, match="three positive sizes"):
        PreparedDataset(root, "train", crop_size=(16, 24))


def test_a_volume_with_nan_is_refused_naming_the_file(tmp_path):
    root = make_prepared(tmp_path, ROWS[:2])
    image, affine = load_volume(root / "images" / "s2.nii.gz")
    image[10, 10, 10] = np.nan
    save_volume(root / "images" / "s2.nii.gz", image, affine)
    dataset = PreparedDataset(root, "train")
    assert torch.isfinite(dataset[0]["image"]).all()
    with pytest.raises(ValueError, match=r"s2.nii.gz: holds NaN or infinite values; prepare this subject again"):
        dataset[1]
