"""mriflow.evaluate.privacy: the audit step on its own, on the sets and feature cache an evaluation builds."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from evaluation_helpers import SPLITS, write_evaluation_set, write_fakes
from mriflow.evaluate.backbones import get_backbone
from mriflow.evaluate.generation import compute_features
from mriflow.evaluate.memorization import DEFAULT_SMOOTHING_MM
from mriflow.evaluate.privacy import privacy_audit
from mriflow.evaluate.sets import load_sets


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return write_evaluation_set(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def audited(prepared, tmp_path_factory):
    """Eight held-out-like fakes (the val subjects) and two planted copies of training subjects."""
    root = tmp_path_factory.mktemp("audit")
    fakes = write_fakes(root / "fakes", prepared, [f"sub{i:02d}" for i in range(10, 18)] + ["sub01", "sub04"])
    sets = load_sets(prepared, fakes, root / "out")
    features = compute_features(sets, get_backbone("intensity"), progress=False)
    return sets, features


def test_planted_copies_are_flagged_in_voxel_space_with_their_training_subject(audited):
    sets, features = audited
    record = privacy_audit(sets, features, None).record()
    voxel = record["voxel"]
    assert voxel["generated_nearest_subject"][8:] == ["sub01", "sub04"]
    assert list(np.flatnonzero(voxel["flagged"])) == [8, 9] and record["flagged_voxel"] == 2
    assert [row["generated"] for row in record["table"] if row["voxel_flagged"]] == ["sample_008", "sample_009"]
    assert max(voxel["generated_nearest_distance"][8:]) < min(voxel["generated_nearest_distance"][:8])


def test_the_audit_records_its_yardstick_and_sizes(audited):
    sets, features = audited
    record = privacy_audit(sets, features, None).record()
    heldout = SPLITS["val"] + SPLITS["test"]
    assert (record["heldout"], record["train"]) == (heldout, SPLITS["train"])
    assert record["heldout_reference"] == "held-out volumes" and record["decoded_copy_distance"] is None
    assert record["chance_rate"] == pytest.approx(1 / (heldout + 1))
    assert record["mask_voxels"] == int(features.mask.sum()) > 0 and record["smoothing_mm"] == DEFAULT_SMOOTHING_MM
    assert len(record["voxel"]["heldout_nearest_distance"]) == heldout
    # on the 4 mm grid the feature space is the anatomy network's tissue maps (1 - correlation)
    assert record["feature"]["metric"] == "correlation" and record["voxel"]["metric"] == "correlation"
    assert record["feature_space"].startswith("tissue maps of anatomy-") and "4 mm" in record["feature_space"]
    assert len(record["feature"]["flagged"]) == len(record["voxel"]["flagged"]) == 10


def test_without_training_or_held_out_subjects_the_audit_is_skipped_and_says_why(audited):
    sets, features = audited
    no_train = dataclasses.replace(sets, train_rows=sets.train_rows.iloc[:0])
    record = privacy_audit(no_train, features, None).record()
    assert record == {"skipped": f"needs a non-empty 'train' split and held-out subjects; found 0 training and "
                                 f"{SPLITS['val'] + SPLITS['test']} held-out"}


def test_planted_copies_are_flagged_in_the_tissue_space_too(audited):
    sets, features = audited
    feature = privacy_audit(sets, features, None).record()["feature"]
    assert feature["generated_nearest_subject"][8:] == ["sub01", "sub04"]
    assert list(np.flatnonzero(feature["flagged"])) == [8, 9]


def test_without_a_tissue_space_the_audit_uses_the_backbones_features(audited):
    sets, features = audited
    plain = dataclasses.replace(features, tissue=None)
    record = privacy_audit(sets, plain, None).record()
    assert record["feature"]["metric"] == "euclidean" and record["feature_space"] == "features of intensity-v1 (Euclidean)"
    assert len(record["feature"]["flagged"]) == 10


def test_the_tissue_space_moves_less_under_noise_and_blur_than_between_subjects(audited):
    from scipy.ndimage import gaussian_filter

    from mriflow.data.io import load_volume
    from mriflow.evaluate.memorization import correlation_distance

    sets, features = audited
    volumes = np.stack([load_volume(path)[0] for path in sets.train[:3]])
    rng = np.random.default_rng(0)
    noisy = np.clip(volumes + rng.normal(0, 0.05, volumes.shape), 0, 1).astype(np.float32)
    blurred = np.stack([gaussian_filter(v, 1.0) for v in volumes])
    space = features.tissue
    original = space(volumes)
    between = correlation_distance(original, original)[~np.eye(3, dtype=bool)].min()
    for perturbed in (noisy, blurred):
        assert correlation_distance(space(perturbed), original).diagonal().max() < between
