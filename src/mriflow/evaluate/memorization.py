"""Memorization: is a generated volume a near copy of a training subject?

For every generated volume we find its nearest training subject, and, as a yardstick,
the nearest training subject of every held-out real subject (people the model never
saw). A generated volume is flagged when it is closer to its nearest training
subject than the 1st percentile of those held-out-to-training distances: closer than
(almost) any genuinely new person comes to the training set.

Two spaces are searched independently:
  * voxel space: distance = 1 - Pearson correlation of intensities inside the
    population brain mask (voxels inside the brain mask of at least half the
    training subjects), after smoothing every volume with a Gaussian of sigma 4 mm.
    Intensity shifts and scalings do not hide a copy. The smoothing is there
    because, unsmoothed, a blurred volume correlates better with every training
    subject than real people do, so a blurry generator would be flagged; smoothed,
    a copy stays at ~0 while blur no longer helps.
  * feature space: Euclidean distance between backbone features.

With fewer than 100 held-out subjects the 1st percentile is their minimum, so about
1 / (held-out + 1) of genuinely new volumes fall below it by chance: read the
count of flags next to that rate.

When the generator's autoencoder is known, the yardstick is the held-out subjects
passed through it (reconstructions) rather than the raw volumes: every generated
volume comes out of that decoder, smoother than any scan, and a smooth, near-average
brain correlates with every training subject better than a raw new person does, so
against raw volumes a smooth generator is flagged wholesale. A reconstructed new
person is as smooth as a sample and still not a copy, so the threshold compares like
with like, while a decoded copy of a training subject stays far below it.

    >>> reference = MemorizationReference.from_prepared("prepared/")
    >>> is_memorized(volume, reference)          # for `mriflow generate --privacy-filter`
    >>> reference.nearest(volume)                # ("IXI012", 0.004)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist

from mriflow.data.io import load_volume

DEFAULT_PERCENTILE = 1.0
DEFAULT_SMOOTHING_MM = 4.0


def population_mask(masks: Iterable[np.ndarray], minimum_share: float = 0.5) -> np.ndarray:
    """Voxels inside at least `minimum_share` of the given brain masks -> bool (D, H, W)."""
    total, count = None, 0
    for mask in masks:
        total = (mask > 0).astype(np.float32) if total is None else total + (mask > 0)
        count += 1
    if total is None:
        raise ValueError("population_mask needs at least one brain mask")
    mask = total >= minimum_share * count
    if not mask.any():
        raise ValueError("the population brain mask is empty; are the masks in the same grid?")
    return mask


def smoothing_voxels(affine: np.ndarray, smoothing_mm: float = DEFAULT_SMOOTHING_MM) -> float:
    """Gaussian sigma in voxels for `smoothing_mm` on the grid of `affine` (mean voxel size)."""
    voxel_mm = float(np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0)).mean())
    return smoothing_mm / voxel_mm


def masked_standardised(volume: np.ndarray, mask: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """Intensities inside `mask` (after a Gaussian blur of sigma `smoothing` voxels, if > 0),
    centred and scaled to unit norm -> (V,) float32.

    The dot product of two such vectors is their Pearson correlation.
    """
    volume = np.asarray(volume, np.float32).reshape(mask.shape)
    if smoothing > 0:
        volume = gaussian_filter(volume, smoothing)
    values = volume.astype(np.float64)[mask]
    values = values - values.mean()
    norm = np.linalg.norm(values)
    return (values / norm if norm > 0 else values).astype(np.float32)


def correlation_distance(vectors_a: np.ndarray, vectors_b: np.ndarray) -> np.ndarray:
    """1 - Pearson correlation for every pair of rows of two `masked_standardised` stacks -> (A, B)."""
    return np.clip(1.0 - vectors_a.astype(np.float64) @ vectors_b.astype(np.float64).T, 0.0, 2.0)


def nearest(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index and distance of each row's nearest column."""
    index = distances.argmin(axis=1)
    return index, distances[np.arange(len(distances)), index]


def threshold_from_heldout(heldout_nearest_distances: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The `percentile`-th percentile of held-out-to-training nearest distances, taken as an observed
    value (numpy's "lower" method): with fewer than 100 held-out subjects the 1st percentile is
    their minimum, so a volume is flagged only when it is closer than every held-out subject."""
    distances = np.asarray(heldout_nearest_distances, np.float64)
    if len(distances) == 0:
        raise ValueError("no held-out subjects: memorization needs real subjects outside the training split")
    return float(np.percentile(distances, percentile, method="lower"))


def find_memorized(
    generated: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    generated_names: Sequence[str],
    train_names: Sequence[str],
    metric: str = "correlation",
    percentile: float = DEFAULT_PERCENTILE,
) -> dict:
    """Nearest training neighbours of generated and held-out rows, the threshold and the flags, in one space.

    Rows are `masked_standardised` vectors for metric="correlation", or feature
    vectors for metric="euclidean". Returns {"threshold", "percentile", "metric",
    "generated_nearest_distance" (G,), "generated_nearest_subject" (G,),
    "heldout_nearest_distance" (H,), "flagged" (G,) bool}.
    """
    if metric == "correlation":
        to_train, heldout_to_train = correlation_distance(generated, train), correlation_distance(heldout, train)
    elif metric == "euclidean":
        to_train, heldout_to_train = cdist(generated, train), cdist(heldout, train)
    else:
        raise ValueError(f"metric must be 'correlation' or 'euclidean', got {metric!r}")
    index, distance = nearest(to_train)
    heldout_distance = nearest(heldout_to_train)[1]
    threshold = threshold_from_heldout(heldout_distance, percentile)
    return {
        "metric": metric,
        "percentile": percentile,
        "threshold": threshold,
        "generated_nearest_subject": [str(train_names[i]) for i in index],
        "generated_nearest_distance": distance.tolist(),
        "heldout_nearest_distance": heldout_distance.tolist(),
        "flagged": (distance < threshold).tolist(),
        "generated_names": list(map(str, generated_names)),
    }


def flagged_table(voxel: dict, feature: dict | None = None) -> list[dict]:
    """One row per generated volume flagged in either space, with both spaces' nearest subject and distance."""
    rows = []
    for i, name in enumerate(voxel["generated_names"]):
        voxel_flag = voxel["flagged"][i]
        feature_flag = bool(feature["flagged"][i]) if feature else False
        if not (voxel_flag or feature_flag):
            continue
        row = {"generated": name, "voxel_nearest": voxel["generated_nearest_subject"][i],
               "voxel_distance": voxel["generated_nearest_distance"][i], "voxel_threshold": voxel["threshold"],
               "voxel_flagged": bool(voxel_flag)}
        if feature:
            row.update({"feature_nearest": feature["generated_nearest_subject"][i],
                        "feature_distance": feature["generated_nearest_distance"][i],
                        "feature_threshold": feature["threshold"], "feature_flagged": feature_flag})
        rows.append(row)
    return rows


@dataclass
class MemorizationReference:
    """Training subjects in voxel space, with the held-out threshold: what a privacy filter needs.

    vectors: (N, V) `masked_standardised` rows of the training volumes inside `mask`,
    smoothed with sigma `smoothing` voxels.
    """

    subjects: list[str]
    vectors: np.ndarray
    mask: np.ndarray
    threshold: float
    percentile: float = DEFAULT_PERCENTILE
    smoothing: float = 0.0
    heldout_reference: str = "held-out volumes"  # or "held-out reconstructions"

    @classmethod
    def from_volumes(cls, train: Sequence[np.ndarray], train_masks: Sequence[np.ndarray], heldout: Sequence[np.ndarray],
                     subjects: Sequence[str], percentile: float = DEFAULT_PERCENTILE,
                     smoothing: float = 0.0) -> "MemorizationReference":
        """`smoothing`: Gaussian sigma in voxels (see `smoothing_voxels`)."""
        mask = population_mask(train_masks)
        vectors = np.stack([masked_standardised(v, mask, smoothing) for v in train])
        heldout_vectors = np.stack([masked_standardised(v, mask, smoothing) for v in heldout])
        threshold = threshold_from_heldout(nearest(correlation_distance(heldout_vectors, vectors))[1], percentile)
        return cls(list(map(str, subjects)), vectors, mask, threshold, percentile, smoothing)

    @classmethod
    def from_prepared(cls, root: str | Path, train_split: str = "train", heldout_splits: Sequence[str] | None = None,
                      percentile: float = DEFAULT_PERCENTILE, smoothing_mm: float = DEFAULT_SMOOTHING_MM,
                      heldout_transform: Callable[[np.ndarray], np.ndarray] | None = None) -> "MemorizationReference":
        """Build from a prepared folder: training split as reference, every other split (default) as held-out.

        `heldout_transform` (D, H, W) -> (D, H, W), e.g. the generator's autoencoder reconstruction,
        is applied to every held-out volume before the threshold is measured (see the module doc).
        """
        from mriflow.data.dataset import read_manifest

        root = Path(root)
        manifest = read_manifest(root)
        train_rows = manifest[manifest["split"] == train_split]
        heldout_rows = manifest[manifest["split"] != train_split] if heldout_splits is None else \
            manifest[manifest["split"].isin(list(heldout_splits))]
        if train_rows.empty or heldout_rows.empty:
            raise ValueError(f"{root}: memorization needs a non-empty {train_split!r} split and held-out subjects; "
                             f"found {len(train_rows)} training and {len(heldout_rows)} held-out rows")
        mask = population_mask(load_volume(root / p)[0] for p in train_rows["mask"])
        smoothing = smoothing_voxels(load_volume(root / train_rows["image"].iloc[0])[1], smoothing_mm)
        vectors = np.stack([masked_standardised(load_volume(root / p)[0], mask, smoothing) for p in train_rows["image"]])
        transform = heldout_transform if heldout_transform is not None else (lambda volume: volume)
        heldout = np.stack([masked_standardised(transform(load_volume(root / p)[0]), mask, smoothing)
                            for p in heldout_rows["image"]])
        threshold = threshold_from_heldout(nearest(correlation_distance(heldout, vectors))[1], percentile)
        return cls(train_rows["subject"].astype(str).tolist(), vectors, mask, threshold, percentile, smoothing,
                   "held-out reconstructions" if heldout_transform is not None else "held-out volumes")

    def nearest(self, volume: np.ndarray) -> tuple[str, float]:
        """The nearest training subject of `volume` (D, H, W) and its distance (1 - correlation)."""
        vector = masked_standardised(volume, self.mask, self.smoothing)[None]
        index, distance = nearest(correlation_distance(vector, self.vectors))
        return self.subjects[int(index[0])], float(distance[0])

    def is_memorized(self, volume: np.ndarray) -> bool:
        return self.nearest(volume)[1] < self.threshold


def is_memorized(volume: np.ndarray, reference: MemorizationReference) -> bool:
    """True when `volume` is closer to a training subject than `reference.threshold` (voxel space)."""
    return reference.is_memorized(volume)
