from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import head_phantom
from mriflow.config import get_grid
from mriflow.data.io import load_volume, save_volume, template_affine
from mriflow.evaluate.memorization import (
    MemorizationReference,
    correlation_distance,
    find_memorized,
    flagged_table,
    is_memorized,
    masked_standardised,
    population_mask,
)

SHAPE = (24, 28, 24)


def subject(seed):
    """A phantom 'person': the shared anatomy plus smooth individual variation and scanner noise."""
    from scipy.ndimage import gaussian_filter

    image, labels = head_phantom(SHAPE, seed=0)
    rng = np.random.default_rng(seed)
    individual = gaussian_filter(rng.normal(0, 1, SHAPE), 2.0) * 400
    image = np.where(labels > 0, image + individual, image) / 1500.0
    return np.clip(image, 0, 1).astype(np.float32), (labels > 0).astype(np.uint8)


def test_correlation_distance_is_one_minus_pearson_inside_the_mask():
    a, mask = subject(1)
    b, _ = subject(2)
    inside = mask.astype(bool)
    expected = 1 - np.corrcoef(a[inside], b[inside])[0, 1]
    distance = correlation_distance(masked_standardised(a, inside)[None], masked_standardised(b, inside)[None])
    assert distance[0, 0] == pytest.approx(expected, abs=1e-5)
    # Invariant to intensity scaling and shift: a rescaled copy is still a copy.
    rescaled = masked_standardised(a * 0.7 + 0.1, inside)[None]
    assert correlation_distance(masked_standardised(a, inside)[None], rescaled)[0, 0] == pytest.approx(0, abs=1e-5)


def test_blurring_a_fresh_subject_does_not_make_it_look_memorized():
    from scipy.ndimage import gaussian_filter

    train = [subject(s) for s in range(20)]
    heldout = [subject(s)[0] for s in range(100, 112)]
    reference = MemorizationReference.from_volumes([v for v, _ in train], [m for _, m in train], heldout,
                                                   [str(i) for i in range(20)], smoothing=1.0)
    blurred = [gaussian_filter(subject(s)[0], 1.5) for s in range(200, 206)]
    assert not any(is_memorized(v, reference) for v in blurred)


def test_population_mask_keeps_voxels_inside_half_the_masks():
    masks = [np.zeros((4, 4, 4), np.uint8) for _ in range(4)]
    for i, mask in enumerate(masks):
        mask[: i + 1] = 1
    expected = np.zeros((4, 4, 4), bool)
    expected[:3] = True  # slice 2 is inside 2 of 4 masks: exactly half counts
    np.testing.assert_array_equal(population_mask(masks), expected)


@pytest.mark.parametrize("smoothing", [0.0, 1.0])
def test_planted_training_copies_are_flagged_and_fresh_subjects_are_not(smoothing):
    train = [subject(s) for s in range(20)]
    heldout = [subject(s) for s in range(100, 112)]
    fresh = [subject(s)[0] for s in range(200, 206)]
    rng = np.random.default_rng(0)
    copies = [np.clip(train[i][0] * 0.95 + rng.normal(0, 0.01, SHAPE), 0, 1) for i in (3, 7)]
    reference = MemorizationReference.from_volumes([v for v, _ in train], [m for _, m in train], [v for v, _ in heldout],
                                                   [f"train{i}" for i in range(20)], smoothing=smoothing)
    assert [is_memorized(v, reference) for v in copies] == [True, True]
    assert reference.nearest(copies[1])[0] == "train7"
    assert not any(is_memorized(v, reference) for v in fresh)

    generated = fresh + copies
    names = [f"fresh{i}" for i in range(len(fresh))] + ["copy3", "copy7"]
    vectors = np.stack([masked_standardised(v, reference.mask, smoothing) for v in generated])
    heldout_vectors = np.stack([masked_standardised(v, reference.mask, smoothing) for v, _ in heldout])
    voxel = find_memorized(vectors, reference.vectors, heldout_vectors, names, reference.subjects)
    assert voxel["threshold"] == pytest.approx(reference.threshold)
    assert voxel["flagged"] == [False] * len(fresh) + [True, True]
    features = vectors[:, ::50]  # any feature space: here a coarse subsample of voxels
    feature = find_memorized(features, reference.vectors[:, ::50], heldout_vectors[:, ::50], names, reference.subjects,
                             metric="euclidean")
    table = flagged_table(voxel, feature)
    assert [row["generated"] for row in table] == ["copy3", "copy7"]
    assert [row["voxel_nearest"] for row in table] == ["train3", "train7"]
    assert all(row["feature_flagged"] for row in table)


def test_reference_from_a_prepared_folder(tmp_path):
    grid = get_grid("4mm")
    affine = template_affine(grid)
    rows = []
    for i in range(10):
        split = "train" if i < 7 else "val"
        image, mask = subject(i)
        padded = np.zeros(grid.shape, np.float32)
        padded_mask = np.zeros(grid.shape, np.uint8)
        padded[8:32, 10:38, 8:32], padded_mask[8:32, 10:38, 8:32] = image, mask
        save_volume(tmp_path / "images" / f"s{i}.nii.gz", padded, affine)
        save_volume(tmp_path / "masks" / f"s{i}.nii.gz", padded_mask, affine, dtype=np.uint8)
        rows.append({"subject": f"s{i}", "image": f"images/s{i}.nii.gz", "mask": f"masks/s{i}.nii.gz", "labels": "",
                     "split": split})
        if i == 2:
            planted = padded
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    reference = MemorizationReference.from_prepared(tmp_path)
    assert reference.smoothing == pytest.approx(1.0)  # 4 mm on the 4 mm grid
    assert reference.subjects == [f"s{i}" for i in range(7)]
    assert reference.vectors.shape == (7, int(reference.mask.sum()))
    assert is_memorized(planted, reference)
    with pytest.raises(ValueError, match="held-out"):
        MemorizationReference.from_prepared(tmp_path, heldout_splits=["test"])
    assert reference.heldout_reference == "held-out volumes"

    # With the generator's autoencoder, the held-out subjects pass through it before the threshold is measured.
    from scipy.ndimage import gaussian_filter

    def smooth(volume):
        return gaussian_filter(volume, 1.0)

    matched = MemorizationReference.from_prepared(tmp_path, heldout_transform=smooth)
    assert matched.heldout_reference == "held-out reconstructions"
    heldout = [smooth(np.asarray(load_volume(tmp_path / "images" / f"s{i}.nii.gz")[0])) for i in range(7, 10)]
    expected = MemorizationReference.from_volumes(
        [load_volume(tmp_path / "images" / f"s{i}.nii.gz")[0] for i in range(7)],
        [load_volume(tmp_path / "masks" / f"s{i}.nii.gz")[0] for i in range(7)], heldout,
        reference.subjects, smoothing=reference.smoothing)
    assert matched.threshold == pytest.approx(expected.threshold, rel=1e-5)
    assert matched.threshold != pytest.approx(reference.threshold, rel=1e-3)
    assert is_memorized(planted, matched)


def brains(count: int, rng, common: np.ndarray) -> np.ndarray:
    """Unit-norm rows that share a common anatomy and differ individually, like subjects of one template space."""
    from mriflow.evaluate.memorization import masked_standardised

    mask = np.ones(common.shape, bool)
    return np.stack([masked_standardised(common + rng.normal(size=common.shape), mask) for _ in range(count)])


def test_copies_are_flagged_and_averages_and_new_people_only_at_the_chance_rate():
    from mriflow.evaluate.memorization import find_memorized, masked_standardised

    rng = np.random.default_rng(0)
    common = 1.5 * rng.normal(size=4000)
    train, heldout, new = brains(60, rng, common), brains(30, rng, common), brains(30, rng, common)
    mask = np.ones(4000, bool)
    copies = np.stack([train[i] if i % 2 else masked_standardised(train[i] + 0.003 * rng.normal(size=4000), mask)
                       for i in range(10)])  # exact, and with noise of a third of a subject's own variation
    averages = np.stack([masked_standardised(train[rng.choice(60, 5, replace=False)].mean(0), mask) for _ in range(30)])
    generated = np.concatenate([copies, averages, new])
    result = find_memorized(generated, train, heldout, [f"g{i}" for i in range(70)], [f"t{i}" for i in range(60)])
    flagged = np.asarray(result["flagged"])
    assert flagged[:10].all()
    # at most the chance rate, about 1 / (held-out + 1) = 3 % of new volumes (here: none of 30)
    assert flagged[10:40].sum() <= 1 and flagged[40:].sum() <= 1, (flagged[10:40].sum(), flagged[40:].sum())
    distance = np.asarray(result["generated_nearest_distance"])
    assert (distance[10:40] < result["threshold"]).all()  # the averages ARE closer than new people: distance alone flags them
    assert max(result["generated_nearest_ratio"][:10]) < 0.5 < min(result["generated_nearest_ratio"][10:])


def test_the_closest_record_test_finds_the_expected_share_for_new_people_and_all_for_copies():
    from mriflow.evaluate.memorization import closest_record_test, correlation_distance

    rng = np.random.default_rng(1)
    common = 1.5 * rng.normal(size=3000)
    train, heldout, new = brains(90, rng, common), brains(30, rng, common), brains(80, rng, common)
    fair = closest_record_test(correlation_distance(new, train), correlation_distance(new, heldout))
    assert fair["expected_without_memorization"] == 0.75 and fair["samples"] == 80
    assert fair["interval_95"][0] < 0.75 < fair["interval_95"][1] and fair["p_value"] > 0.05
    copies = train[:40]
    leaky = closest_record_test(correlation_distance(copies, train), correlation_distance(copies, heldout))
    assert leaky["share_closer_to_training"] == 1.0 and leaky["p_value"] < 1e-3
