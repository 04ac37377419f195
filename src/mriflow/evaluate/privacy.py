"""The privacy audit of an evaluation: is a generated volume a near copy of a training subject?

The method (nearest training subject against the held-out subjects' yardstick, singled out by
d1 / d2, the closest-record test) is mriflow.evaluate.memorization's; this step chooses what it
is run on. In voxel space (smoothed intensities in the population brain mask) and in a feature
space; the yardstick is the held-out subjects as they are, or, when the generator's autoencoder
is given, passed through it, so that they are as smooth as decoded samples. A few training
subjects passed through the autoencoder show where a decoded copy lies.

The feature space is the anatomy network's tissue space where the grid has an anatomy network
(`TissueSpace`): its tissue probabilities (CSF, ventricles, grey and white matter, brainstem) of the
volume smoothed at 4 mm, in blocks of about 4 mm, compared by 1 − correlation. The FD backbone's
features are the wrong space for this: trained for age and tissue, they move more under a little
noise, blur or a 2 mm deformation than they differ between people, so only exact copies were found
there. Tissue maps keep who a person is (the shape of their ventricles and folds) and shed what
noise and blur change; on IXI at 4 mm exact, deformed, noisy and blurred copies are all flagged there
and no average of 5 training subjects or new person is (benchmarks/privacy_calibration.py). A grid
without an anatomy network falls back to the backbone's features (Euclidean). Its yardstick is always the
raw held-out subjects: the 4 mm smoothing of its input already makes a scan as smooth as a decoded
sample (a decoded new person looks more average there than any real one, so the autoencoder's
yardstick would lower the threshold below where copies under a 2 mm deformation lie: 2 of 10 flagged
instead of 10 of 10 at 4 mm).

    >>> audit = privacy_audit(sets, features, reconstructions)
    >>> audit.record()["flagged_voxel"]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from mriflow.evaluate.memorization import DEFAULT_SMOOTHING_MM, correlation_distance, find_memorized, flagged_table, masked_standardised
from mriflow.evaluate.sets import BATCH_SIZE, EvaluationSets

if TYPE_CHECKING:
    from mriflow.evaluate.generation import FeatureCache, Reconstructions


class TissueSpace:
    """Volumes (B, D, H, W) in [0, 1] -> standardised tissue vectors (B, V) float32 for `correlation_distance`: the
    anatomy network's class probabilities without background, of each volume smoothed by a Gaussian of
    `smoothing_mm`, averaged in blocks of about `block_mm`."""

    def __init__(self, backbone, voxel_mm: float, smoothing_mm: float = DEFAULT_SMOOTHING_MM, block_mm: float = 4.0):
        self.backbone, self.name = backbone, f"tissue maps of {backbone.name}"
        self.sigma = smoothing_mm / voxel_mm
        self.block = max(1, round(block_mm / voxel_mm))
        self.description = (f"{self.name} (input smoothed at {smoothing_mm:g} mm, {self.block * voxel_mm:g} mm blocks, "
                            "1 − correlation)")

    @torch.no_grad()
    def __call__(self, volumes: np.ndarray) -> np.ndarray:
        smoothed = np.stack([gaussian_filter(np.asarray(v, dtype=np.float32), self.sigma) for v in volumes])[:, None]
        x = self.backbone._checked(smoothed).to(self.backbone.device)
        rows = []
        for start in range(0, len(x), self.backbone.batch_size):
            probabilities = self.backbone.network(x[start:start + self.backbone.batch_size])["logits"].float().softmax(1)[:, 1:]
            blocks = F.avg_pool3d(probabilities, self.block, ceil_mode=True) if self.block > 1 else probabilities
            v = blocks.flatten(1).double()
            v = v - v.mean(dim=1, keepdim=True)
            rows.append((v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)).float().cpu().numpy())
        return np.concatenate(rows)


def tissue_space_for(backbone, affine: np.ndarray, shape) -> TissueSpace | None:
    """The audit's tissue space on this grid: the backbone itself when it is an anatomy network, else the shipped
    anatomy network of the grid; None where there is none (the audit then uses the backbone's features)."""
    from mriflow.evaluate.backbones import anatomy_weights_for
    from mriflow.evaluate.backbones.anatomy import AnatomyBackbone

    voxel_mm = float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).mean())
    if isinstance(backbone, AnatomyBackbone) and tuple(backbone.config.shape) == tuple(shape):
        return TissueSpace(backbone, voxel_mm)
    weights = anatomy_weights_for(shape)
    return TissueSpace(AnatomyBackbone(weights), voxel_mm) if weights is not None else None


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
    feature_space: str = ""  # what the feature space is (TissueSpace.description or the backbone's features)

    def record(self) -> dict:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        return {
            "voxel": self.voxel, "feature": self.feature, "table": flagged_table(self.voxel, self.feature),
            "flagged_voxel": int(sum(self.voxel["flagged"])), "flagged_feature": int(sum(self.feature["flagged"])),
            "heldout": self.heldout, "train": self.train, "heldout_reference": self.heldout_reference,
            "decoded_copy_distance": self.decoded_copy_distance,
            "chance_rate": 1.0 / (self.heldout + 1),  # new volumes below the held-out minimum by chance
            "mask_voxels": self.mask_voxels, "smoothing_mm": DEFAULT_SMOOTHING_MM, "feature_space": self.feature_space,
        }


def privacy_audit(sets: EvaluationSets, features: FeatureCache, reconstructions: Reconstructions | None) -> PrivacyAudit:
    """Nearest training subjects of the generated volumes in voxel and feature space against the held-out yardstick."""
    if not sets.audit_possible:
        return PrivacyAudit(f"needs a non-empty 'train' split and held-out subjects; found {len(sets.train)} "
                            f"training and {len(sets.heldout)} held-out")
    train, heldout, generated = sets.train, sets.heldout, sets.generated
    train_names = sets.train_rows["subject"].astype(str).tolist()
    feature_metric = "correlation" if features.tissue is not None else "euclidean"

    def feature_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return correlation_distance(a, b) if features.tissue is not None else np.linalg.norm(a[:, None] - b[None], axis=-1)
    if reconstructions is not None:  # smoothness-matched yardstick: held-out subjects through the generator's autoencoder
        heldout_vectors, heldout_features = _vectors_and_features([reconstructions.volumes[p] for p in heldout], features)
        if features.tissue is not None:  # the tissue space smooths its input itself: raw new people are its yardstick
            heldout_features = features.privacy_matrix(heldout)
        heldout_reference = "held-out reconstructions"
        copy_vectors, copy_features = _vectors_and_features([reconstructions.volumes[p] for p in reconstructions.copied],
                                                            features)
        decoded_copy = {  # distance of each decoded training subject to its own original
            "subjects": [train_names[train.index(p)] for p in reconstructions.copied],
            "voxel": np.diag(correlation_distance(copy_vectors, features.vector_matrix(reconstructions.copied))).tolist(),
            "feature": feature_distance(copy_features, features.privacy_matrix(reconstructions.copied)).diagonal().tolist()}
    else:
        heldout_vectors, heldout_features = features.vector_matrix(heldout), features.privacy_matrix(heldout)
        heldout_reference, decoded_copy = "held-out volumes", None
    # the closest-record test compares raw training with raw held-out subjects (like with like)
    voxel = find_memorized(features.vector_matrix(generated), features.vector_matrix(train), heldout_vectors,
                           sets.generated_names, train_names, metric="correlation",
                           closest_record_heldout=features.vector_matrix(heldout))
    feature = find_memorized(features.privacy_matrix(generated), features.privacy_matrix(train), heldout_features,
                             sets.generated_names, train_names, metric=feature_metric,
                             closest_record_heldout=features.privacy_matrix(heldout))
    space = features.tissue.description if features.tissue is not None else f"features of {features.backbone.name} (Euclidean)"
    return PrivacyAudit(None, voxel, feature, len(heldout), len(train), heldout_reference, decoded_copy,
                        int(features.mask.sum()), space)


def _vectors_and_features(volumes: list[np.ndarray], features: FeatureCache) -> tuple[np.ndarray, np.ndarray]:
    """Voxel vectors (N, V) and the audit's feature rows (tissue vectors, else backbone features) of volumes held in
    memory (reconstructions)."""
    stack = np.stack(volumes)  # (N, D, H, W)
    vectors = np.stack([masked_standardised(v, features.mask, features.smoothing) for v in stack])
    if features.tissue is not None:
        return vectors, features.tissue(stack)
    rows = np.concatenate([features.backbone.features(stack[s : s + BATCH_SIZE, None]) for s in range(0, len(stack), BATCH_SIZE)])
    return vectors, rows
