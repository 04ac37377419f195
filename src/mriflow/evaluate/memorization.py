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

Closeness alone cannot tell a copy from an average brain: a smooth near-mean volume is close
to every training subject. A copy is close to ONE of them: its nearest training subject is
much nearer than its second nearest. So a volume is flagged only when both hold:

    d1 < threshold            (closer than new people come to the training set), and
    d1 / d2 < ratio threshold (d1, d2: distances to the nearest and second-nearest training
                               subject; the threshold is the same percentile of the held-out
                               subjects' ratios, and at most MAX_COPY_RATIO = 0.7: the nearest
                               subject clearly nearer than the next)

An exact copy has d1 ≈ 0 and a ratio near 0 (on IXI at 2 and 4 mm, noisy and blurred copies stay
below 0.3 and copies under a 2 mm smooth deformation below 0.56, while averages of 5 training subjects
stay above 0.69 and new people above 0.8: benchmarks/privacy_calibration.py); the average of k training subjects is about equally near each of them (ratio
near 1) and is not flagged however close it is. The cap matters where subjects are nearly
equidistant: there the held-out ratios all sit near 1, and the members of an average differ
just enough to fall below their minimum by more than chance (tests/evaluate/test_memorization.py).

Distance to closest record (DCR), the synthetic-data privacy test: is each generated volume's
closest real subject a training or a held-out one? For a generator that does not memorise,
every real subject is equally likely to be the closest, so the training share is N / (N + H)
(one half for equal sets); the observed share, its 95 % (Wilson) interval and a two-sided
binomial test against that share are reported. A memorising generator leans to training.

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
MAX_COPY_RATIO = 0.7  # a copy's nearest training subject is clearly nearer than its second nearest (calibrated)


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


def nearest_ratio(distances: np.ndarray) -> np.ndarray:
    """d1 / d2 of each row: its nearest over its second-nearest column distance (1 with a single column)."""
    if distances.shape[1] < 2:
        return np.ones(len(distances))
    two = np.partition(distances, 1, axis=1)[:, :2]
    return two[:, 0] / np.maximum(two[:, 1], 1e-12)


def closest_record_test(to_train: np.ndarray, to_heldout: np.ndarray) -> dict:
    """DCR: the share of generated rows whose closest real subject is a training one, against the share a
    generator that does not memorise gives, N / (N + H) for N training and H held-out subjects (each real
    subject is then equally likely to be the closest); Wilson 95 % interval and a two-sided binomial test."""
    from scipy.stats import binomtest

    train_count, heldout_count = to_train.shape[1], to_heldout.shape[1]
    if train_count == 0 or heldout_count == 0:
        raise ValueError("the closest-record test needs training and held-out subjects")
    closer = int((to_train.min(axis=1) < to_heldout.min(axis=1)).sum())
    expected = train_count / (train_count + heldout_count)
    test = binomtest(closer, len(to_train), expected)
    interval = test.proportion_ci(confidence_level=0.95, method="wilson")
    return {"share_closer_to_training": closer / len(to_train), "expected_without_memorization": expected,
            "count": closer, "samples": len(to_train), "interval_95": [float(interval.low), float(interval.high)],
            "p_value": float(test.pvalue), "training_subjects": train_count, "heldout_subjects": heldout_count}


def threshold_from_heldout(heldout_nearest_distances: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> float:
    """The `percentile`-th percentile of held-out-to-training nearest distances, taken as an observed
    value (numpy's "lower" method): with fewer than 100 held-out subjects the 1st percentile is
    their minimum, so a volume is flagged only when it is closer than every held-out subject."""
    distances = np.asarray(heldout_nearest_distances, np.float64)
    if len(distances) == 0:
        raise ValueError("no held-out subjects: memorization needs real subjects outside the training split")
    return float(np.percentile(distances, percentile, method="lower"))


def heldout_thresholds(heldout_to_train: np.ndarray, percentile: float = DEFAULT_PERCENTILE) -> tuple[float, float]:
    """The distance and d1/d2 thresholds from the held-out subjects' distances (H, N) to the training subjects: the
    one rule of both the audit (find_memorized) and the privacy filter (MemorizationReference)."""
    return (threshold_from_heldout(nearest(heldout_to_train)[1], percentile),
            min(threshold_from_heldout(nearest_ratio(heldout_to_train), percentile), MAX_COPY_RATIO))


def find_memorized(
    generated: np.ndarray,
    train: np.ndarray,
    heldout: np.ndarray,
    generated_names: Sequence[str],
    train_names: Sequence[str],
    metric: str = "correlation",
    percentile: float = DEFAULT_PERCENTILE,
    closest_record_heldout: np.ndarray | None = None,
) -> dict:
    """Nearest training neighbours of generated and held-out rows, the thresholds, the flags and the
    closest-record test, in one space (see the module docstring).

    Rows are `masked_standardised` vectors for metric="correlation", or feature
    vectors for metric="euclidean". `closest_record_heldout`: the held-out rows for the closest-record test
    when `heldout` was transformed (reconstructions) and the training rows were not, so both sides of that test
    are alike (default `heldout`). Returns {"threshold", "ratio_threshold", "percentile", "metric",
    "generated_nearest_distance" (G,), "generated_nearest_ratio" (G,), "generated_nearest_subject" (G,),
    "heldout_nearest_distance" (H,), "heldout_nearest_ratio" (H,), "flagged" (G,) bool, "closest_record"}.
    """
    distance_to = {"correlation": correlation_distance, "euclidean": cdist}.get(metric)
    if distance_to is None:
        raise ValueError(f"metric must be 'correlation' or 'euclidean', got {metric!r}")
    to_train, heldout_to_train = distance_to(generated, train), distance_to(heldout, train)
    index, distance = nearest(to_train)
    ratio, heldout_ratio = nearest_ratio(to_train), nearest_ratio(heldout_to_train)
    heldout_distance = nearest(heldout_to_train)[1]
    threshold, ratio_threshold = heldout_thresholds(heldout_to_train, percentile)  # the privacy filter's, too
    return {
        "metric": metric,
        "percentile": percentile,
        "threshold": threshold,
        "ratio_threshold": ratio_threshold,
        "generated_nearest_subject": [str(train_names[i]) for i in index],
        "generated_nearest_distance": distance.tolist(),
        "generated_nearest_ratio": ratio.tolist(),
        "heldout_nearest_distance": heldout_distance.tolist(),
        "heldout_nearest_ratio": heldout_ratio.tolist(),
        "flagged": ((distance < threshold) & (ratio < ratio_threshold)).tolist(),
        "closest_record": closest_record_test(
            to_train, distance_to(generated, heldout if closest_record_heldout is None else closest_record_heldout)),
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
    ratio_threshold: float = 1.0  # d1 / d2 below which a close volume is singled out as a copy (module docstring)

    @classmethod
    def from_volumes(cls, train: Sequence[np.ndarray], train_masks: Sequence[np.ndarray], heldout: Sequence[np.ndarray],
                     subjects: Sequence[str], percentile: float = DEFAULT_PERCENTILE,
                     smoothing: float = 0.0) -> "MemorizationReference":
        """`smoothing`: Gaussian sigma in voxels (see `smoothing_voxels`)."""
        mask = population_mask(train_masks)
        vectors = np.stack([masked_standardised(v, mask, smoothing) for v in train])
        heldout_vectors = np.stack([masked_standardised(v, mask, smoothing) for v in heldout])
        threshold, ratio_threshold = heldout_thresholds(correlation_distance(heldout_vectors, vectors), percentile)
        return cls(list(map(str, subjects)), vectors, mask, threshold, percentile, smoothing,
                   ratio_threshold=ratio_threshold)

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
        threshold, ratio_threshold = heldout_thresholds(correlation_distance(heldout, vectors), percentile)
        return cls(train_rows["subject"].astype(str).tolist(), vectors, mask, threshold, percentile, smoothing,
                   "held-out reconstructions" if heldout_transform is not None else "held-out volumes", ratio_threshold)

    def nearest(self, volume: np.ndarray) -> tuple[str, float]:
        """The nearest training subject of `volume` (D, H, W) and its distance (1 - correlation)."""
        subject, distance, _ = self._nearest(volume)
        return subject, distance

    def is_memorized(self, volume: np.ndarray) -> bool:
        """Closer to a training subject than new people come AND singled out by it (d1 / d2, module docstring)."""
        _, distance, ratio = self._nearest(volume)
        return distance < self.threshold and ratio < self.ratio_threshold

    def _nearest(self, volume: np.ndarray) -> tuple[str, float, float]:
        distances = correlation_distance(masked_standardised(volume, self.mask, self.smoothing)[None], self.vectors)
        index, distance = nearest(distances)
        return self.subjects[int(index[0])], float(distance[0]), float(nearest_ratio(distances)[0])


def is_memorized(volume: np.ndarray, reference: MemorizationReference) -> bool:
    """True when `volume` is closer to a training subject than `reference.threshold` (voxel space)."""
    return reference.is_memorized(volume)
