"""mriflow.data.labels: DLMUSE regions to tissue classes by name, tissue volumes, label lookups and class fractions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mriflow.data.labels import (
    BRAIN_CLASSES,
    MUSE_FIRST_COMPOSITE,
    TISSUE_CLASSES,
    UNNAMED_DLMUSE_LABELS,
    class_indices,
    muse_tissue_class,
    muse_tissue_mapping,
    tissue_fractions,
    tissue_lookup,
    tissue_map,
    tissue_volumes_ml,
)


def test_muse_labels_map_to_tissue_classes_by_name():
    regions = {1: "CortCSF", 4: "3rdVentricle", 51: "LateralVentricle_R", 49: "InfLatVentricle_R", 81: "Frontal_WM_R",
               40: "Cerebellum_WM_L", 95: "CorpCall", 61: "VentralDC_R", 35: "BrainStem", 48: "Hippocampus_L",
               59: "ThalamusProper_R", 182: "PrecentralGyrus_R", 38: "CerebellumExterior_R",
               509: "Ventricles", 405: "Frontal_WM", 701: "TotalBrain"}
    mapping = {label: TISSUE_CLASSES[index] for label, index in muse_tissue_mapping(regions).items()}
    assert mapping == {1: "csf", 4: "ventricles", 51: "ventricles", 49: "ventricles", 81: "white_matter",
                       40: "white_matter", 95: "white_matter", 61: "white_matter", 35: "brainstem",
                       48: "grey_matter", 59: "grey_matter", 182: "grey_matter", 38: "grey_matter",
                       46: "csf", 69: "white_matter"}  # composites (>= 300) skipped; 46 and 69 are unnamed labels


def test_muse_mapping_reproduces_muse_composites(ixi_dir):
    """Summed per class, the single regions give MUSE's own 509 Ventricles, 601 GM, 604 WM and 701 TotalBrain."""
    import pandas as pd

    regions = pd.read_csv(ixi_dir / "muse_regions.csv").set_index("index")["name"].to_dict()
    volumes = pd.read_csv(ixi_dir / "region_volumes.csv", index_col=0).iloc[:5]
    mapping = {label: TISSUE_CLASSES[index] for label, index in muse_tissue_mapping(regions).items()}
    by_class = {name: sum(volumes[str(label)] for label, c in mapping.items() if c == name and str(label) in volumes)
                for name in TISSUE_CLASSES[1:]}
    np.testing.assert_allclose(by_class["ventricles"], volumes["509"])
    np.testing.assert_allclose(by_class["grey_matter"], volumes["601"])
    np.testing.assert_allclose(by_class["white_matter"], volumes["604"])
    np.testing.assert_allclose(sum(by_class[name] for name in BRAIN_CLASSES), volumes["701"])


def test_tissue_volumes_are_voxel_counts_times_voxel_volume():
    segmentation = np.zeros((2, 4, 5, 6), np.int64)
    segmentation[0, :2, :3, :1] = TISSUE_CLASSES.index("ventricles")  # 6 voxels
    segmentation[0, 3, :, :] = TISSUE_CLASSES.index("grey_matter")  # 30 voxels
    segmentation[1] = TISSUE_CLASSES.index("csf")
    segmentation[1, 0, 0, 0] = TISSUE_CLASSES.index("brainstem")
    volumes = tissue_volumes_ml(segmentation, TISSUE_CLASSES, voxel_mm=4.0)
    np.testing.assert_allclose(volumes["ventricles"], [6 * 0.064, 0.0])
    np.testing.assert_allclose(volumes["total_brain"], [36 * 0.064, 1 * 0.064])
    np.testing.assert_allclose(volumes["csf"], [0.0, 119 * 0.064])
    np.testing.assert_allclose(sum(volumes[c] for c in TISSUE_CLASSES), [120 * 0.064] * 2)


@pytest.mark.parametrize("name, tissue", [
    ("LateralVentricle_L", "ventricles"), ("InfLatVentricle_R", "ventricles"), ("3rdVentricle", "ventricles"),
    ("4thVentricle", "ventricles"),
    ("CortCSF", "csf"), ("CSF", "csf"),
    ("BrainStem", "brainstem"),
    ("Frontal_WM_R", "white_matter"), ("Cerebellum_WM_L", "white_matter"), ("Frontal_WM_Lobe", "white_matter"),
    ("CorpCall", "white_matter"), ("Fornix_L", "white_matter"), ("AnteriorLimbOfInternalCapsule_R", "white_matter"),
    ("VentralDC_L", "white_matter"), ("OpticChiasm", "white_matter"),
    # grey matter is the default: cortex, deep nuclei, hippocampus, cerebellar cortex and vermis, and any new name
    ("PrecentralGyrus_R", "grey_matter"), ("Putamen_L", "grey_matter"), ("Hippocampus_R", "grey_matter"),
    ("CerebellumExterior_L", "grey_matter"), ("CerebellarVermalLobulesI-V", "grey_matter"),
    ("SomethingNew", "grey_matter"),
    # near misses of the rules: not a ventricle, not "_WM", not exactly CSF or BrainStem
    ("WMHypointensities", "grey_matter"), ("CSF_extra", "grey_matter"), ("BrainStemPart", "grey_matter"),
])
def test_a_region_name_gives_its_tissue_class_first_rule_first(name, tissue):
    assert muse_tissue_class(name) == tissue


def test_the_ventricle_rule_comes_before_the_white_matter_rule():
    assert muse_tissue_class("Ventricle_WM") == "ventricles"


def test_the_mapping_skips_composites_and_background_and_adds_the_unnamed_labels():
    regions = {0: "Background", 4: "3rdVentricle", 299: "Last_WM", MUSE_FIRST_COMPOSITE: "Composite", 601: "GM",
               "35": "BrainStem"}  # keys as read from a CSV may be strings
    mapping = muse_tissue_mapping(regions)
    assert list(mapping) == sorted(mapping)  # in label order
    assert mapping == {4: TISSUE_CLASSES.index("ventricles"), 35: TISSUE_CLASSES.index("brainstem"),
                       46: TISSUE_CLASSES.index("csf"), 69: TISSUE_CLASSES.index("white_matter"),
                       299: TISSUE_CLASSES.index("white_matter")}
    assert set(UNNAMED_DLMUSE_LABELS) == {46, 69}
    # a name in the region list wins over the unnamed label's default
    assert muse_tissue_mapping({46: "Putamen_L"})[46] == TISSUE_CLASSES.index("grey_matter")


def test_the_mapping_gives_indices_in_the_classes_asked_for():
    classes = ("background", "brainstem", "white_matter", "grey_matter", "ventricles", "csf")
    mapping = muse_tissue_mapping({4: "3rdVentricle", 35: "BrainStem"}, classes)
    assert mapping[4] == 4 and mapping[35] == 1 and mapping[46] == 5


def test_tissue_volumes_are_in_ml_for_a_known_count_and_refuse_other_shapes():
    segmentation = torch.zeros(1, 10, 10, 10, dtype=torch.uint8)
    segmentation[0, :5] = TISSUE_CLASSES.index("white_matter")  # 500 voxels of 2 mm: 500 x 8 mm^3 = 4 ml
    volumes = tissue_volumes_ml(segmentation, TISSUE_CLASSES, voxel_mm=2.0)
    assert set(volumes) == {*TISSUE_CLASSES, "total_brain"}
    assert volumes["white_matter"].dtype == np.float64 and volumes["white_matter"].tolist() == [4.0]
    assert volumes["background"].tolist() == [4.0] and volumes["total_brain"].tolist() == [4.0]
    assert set(BRAIN_CLASSES) == {"ventricles", "grey_matter", "white_matter", "brainstem"}  # CSF is outside the brain
    with pytest.raises(ValueError, match=r"expected \(N, D, H, W\) class indices, got shape \(10, 10, 10\)"):
        tissue_volumes_ml(segmentation[0], TISSUE_CLASSES, voxel_mm=2.0)


def test_the_lookup_takes_names_or_indices_and_maps_unlisted_labels_to_minus_one():
    lookup = tissue_lookup({"4": "ventricles", 7: 3, 2: "csf"})
    assert lookup.tolist() == [0, -1, 1, -1, 2, -1, -1, 3]  # label 0 is background
    assert tissue_lookup({}).tolist() == [0]
    with pytest.raises(ValueError):
        tissue_lookup({4: "not_a_class"})


def test_a_label_map_becomes_tissue_classes_rounded_and_unknown_labels_are_refused_by_name():
    lookup = tissue_lookup({4: "ventricles", 40: "white_matter"})
    tissue = tissue_map(np.array([[0.0, 3.9], [40.2, 39.6]]), lookup)  # resampled maps hold near-integers
    assert tissue.dtype == np.uint8 and tissue.tolist() == [[0, 2], [4, 4]]
    for labels, unknown in (([0, 7], "[7]"), ([0, 41, 500], "[41, 500]"), ([-1, 4], "[-1]"), ([5, 99, 5], "[5, 99]")):
        with pytest.raises(ValueError, match=rf"sub01_labels.nii.gz: labels \{unknown[:-1]}\] are not in the region list"):
            tissue_map(np.array(labels), lookup, "sub01_labels.nii.gz")
    many = np.arange(100, 120)
    with pytest.raises(ValueError, match=r"labels \[100, 101, 102, 103, 104, 105, 106, 107, 108, 109\] are not"):
        tissue_map(many, lookup)  # at most ten named


def test_tissue_fractions_are_each_class_share_of_its_block_and_sum_to_one():
    tissue = torch.zeros(2, 4, 4, 8, dtype=torch.long)
    tissue[0, :2, :2, :2] = 3  # the first 2^3 block of subject 0 is all grey matter
    tissue[0, 0, 0, 2] = 5  # one voxel of 8 in the next block is brainstem
    tissue[1] = torch.randint(0, len(TISSUE_CLASSES), (4, 4, 8), generator=torch.Generator().manual_seed(0))
    fractions = tissue_fractions(tissue, 2)
    assert fractions.shape == (2, len(TISSUE_CLASSES), 2, 2, 4) and fractions.dtype == torch.float32
    torch.testing.assert_close(fractions.sum(1), torch.ones(2, 2, 2, 4))
    assert fractions[0, 3, 0, 0, 0] == 1.0 and fractions[0, 0, 0, 0, 0] == 0.0
    assert fractions[0, 5, 0, 0, 1] == pytest.approx(1 / 8) and fractions[0, 0, 0, 0, 1] == pytest.approx(7 / 8)
    block = tissue[1, 2:4, 0:2, 4:6]
    for c in range(len(TISSUE_CLASSES)):
        assert fractions[1, c, 1, 0, 2].item() == pytest.approx((block == c).float().mean().item())
    torch.testing.assert_close(tissue_fractions(tissue.numpy().astype(np.uint8), 2), fractions)  # numpy in, same out


def test_tissue_fractions_refuse_shapes_the_factor_does_not_divide_and_unknown_classes():
    with pytest.raises(ValueError, match=r"tissue maps of shape \(1, 4, 6, 4\).*multiples of 4"):
        tissue_fractions(torch.zeros(1, 4, 6, 4, dtype=torch.long), 4)
    with pytest.raises(ValueError, match=r"expected \(N, D, H, W\)"):
        tissue_fractions(torch.zeros(4, 4, 4, dtype=torch.long), 2)
    with pytest.raises(ValueError, match=r"classes outside 0..5"):
        tissue_fractions(torch.full((1, 2, 2, 2), 6), 2)
    with pytest.raises(ValueError, match=r"classes outside 0..2"):
        tissue_fractions(torch.full((1, 2, 2, 2), -1), 2, classes=3)


def test_dice_scores_per_subject_and_class():
    from mriflow.data.labels import dice_scores

    target = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    target[0, :2] = 1  # 32 voxels of class 1
    predicted = target.clone()
    predicted[0, 0] = 0  # half of them missed: 2 * 16 / (16 + 32)
    predicted[1, 0, 0, 0] = 2  # class 2 predicted where the target has none
    scores = dice_scores(predicted, target, 3)
    assert scores.shape == (2, 2)
    assert scores[0, 0] == pytest.approx(2 * 16 / 48) and scores[0, 1] == 1.0  # class 2 absent from both
    assert scores[1, 0] == 1.0 and scores[1, 1] == 0.0


def test_class_indices_equal_argmax_to_the_voxel_with_the_first_class_winning_ties():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randint(0, 3, (2, 6, 5, 7, 4), generator=generator).float()  # integers 0-2: ties everywhere
    logits[0, :, 0, 0, 0] = 1.0  # all six classes tied: class 0
    indices = class_indices(logits)
    assert indices.dtype == torch.uint8 and indices.shape == (2, 5, 7, 4)
    assert torch.equal(indices.long(), logits.argmax(1))
    assert indices[0, 0, 0, 0] == 0
    assert torch.equal(class_indices(-logits).long(), (-logits).argmax(1))  # negative logits too
    with pytest.raises(ValueError, match="257 classes"):
        class_indices(torch.zeros(1, 257, 2))
