"""The privacy audit of an evaluation: is a generated volume a near copy of a training subject?

The method (nearest training subject against the held-out subjects' yardstick, singled out by
d1 / d2, the closest-record test) is mriflow.evaluate.memorization's; this step chooses what it
is run on. In voxel space (smoothed intensities in the population brain mask) and in the
backbone's feature space; the yardstick is the held-out subjects as they are, or, when the
generator's autoencoder is given, passed through it, so that they are as smooth as decoded
samples. A few training subjects passed through the autoencoder show where a decoded copy lies.

    >>> audit = privacy_audit(sets, features, reconstructions)
    >>> audit.record()["flagged_voxel"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mriflow.evaluate.memorization import DEFAULT_SMOOTHING_MM, correlation_distance, find_memorized, flagged_table, masked_standardised
from mriflow.evaluate.sets import BATCH_SIZE, EvaluationSets

if TYPE_CHECKING:
    from mriflow.evaluate.generation import FeatureCache, Reconstructions


@dataclass
class PrivacyAudit:
    """metrics.json "memorization": find_memorized's result in each space, or why the audit was skipped."""

    skipped: str | None = None
    voxel: dict | None = None
    feature: dict | None = None
    heldout: int = 0  # held-out subjects, the yardstick
    train: int = 0
    heldout_reference: str = "held-out volumes"  # or "held-out reconstructions"
    decoded_copy_distance: dict | None = None  # {"subjects", "voxel", "feature"}: decoded training subjects to themselves
    mask_voxels: int = 0

    def record(self) -> dict:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        return {
            "voxel": self.voxel, "feature": self.feature, "table": flagged_table(self.voxel, self.feature),
            "flagged_voxel": int(sum(self.voxel["flagged"])), "flagged_feature": int(sum(self.feature["flagged"])),
            "heldout": self.heldout, "train": self.train, "heldout_reference": self.heldout_reference,
            "decoded_copy_distance": self.decoded_copy_distance,
            "chance_rate": 1.0 / (self.heldout + 1),  # new volumes below the held-out minimum by chance
            "mask_voxels": self.mask_voxels, "smoothing_mm": DEFAULT_SMOOTHING_MM,
        }


def privacy_audit(sets: EvaluationSets, features: FeatureCache, reconstructions: Reconstructions | None) -> PrivacyAudit:
    """Nearest training subjects of the generated volumes in voxel and feature space against the held-out yardstick."""
    if not sets.audit_possible:
        return PrivacyAudit(f"needs a non-empty 'train' split and held-out subjects; found {len(sets.train)} "
                            f"training and {len(sets.heldout)} held-out")
    train, heldout, generated = sets.train, sets.heldout, sets.generated
    train_names = sets.train_rows["subject"].astype(str).tolist()
    if reconstructions is not None:  # smoothness-matched yardstick: held-out subjects through the generator's autoencoder
        heldout_vectors, heldout_features = _vectors_and_features([reconstructions.volumes[p] for p in heldout], features)
        heldout_reference = "held-out reconstructions"
        copy_vectors, copy_features = _vectors_and_features([reconstructions.volumes[p] for p in reconstructions.copied],
                                                            features)
        decoded_copy = {  # distance of each decoded training subject to its own original
            "subjects": [train_names[train.index(p)] for p in reconstructions.copied],
            "voxel": np.diag(correlation_distance(copy_vectors, features.vector_matrix(reconstructions.copied))).tolist(),
            "feature": np.linalg.norm(copy_features - features.matrix(reconstructions.copied), axis=1).tolist()}
    else:
        heldout_vectors, heldout_features = features.vector_matrix(heldout), features.matrix(heldout)
        heldout_reference, decoded_copy = "held-out volumes", None
    # the closest-record test compares raw training with raw held-out subjects (like with like)
    voxel = find_memorized(features.vector_matrix(generated), features.vector_matrix(train), heldout_vectors,
                           sets.generated_names, train_names, metric="correlation",
                           closest_record_heldout=features.vector_matrix(heldout))
    feature = find_memorized(features.matrix(generated), features.matrix(train), heldout_features,
                             sets.generated_names, train_names, metric="euclidean",
                             closest_record_heldout=features.matrix(heldout))
    return PrivacyAudit(None, voxel, feature, len(heldout), len(train), heldout_reference, decoded_copy,
                        int(features.mask.sum()))


def _vectors_and_features(volumes: list[np.ndarray], features: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """Voxel vectors (N, V) and backbone features (N, F) of volumes held in memory (reconstructions)."""
    stack = np.stack(volumes)  # (N, D, H, W)
    vectors = np.stack([masked_standardised(v, features.mask, features.smoothing) for v in stack])
    rows = np.concatenate([features.backbone.features(stack[s : s + BATCH_SIZE, None]) for s in range(0, len(stack), BATCH_SIZE)])
    return vectors, rows
