"""Evaluate a folder of generated volumes against a prepared dataset, and write the report.

The table has up to three columns, each comparing the real evaluation split
(default "test") with another set of volumes:

  Real vs Reconstruction   the autoencoder's reconstructions of the same subjects
                           (only with a `reconstruct` function): the ceiling any
                           latent generator can reach
  Real vs Real             another real split (default "val"): the floor, what
                           sampling noise alone gives
  Real vs Generated        the generated volumes

Rows are set metrics on backbone features (FD, KID, MMD, precision, recall, density,
coverage; bootstrap mean ± sd at one common n), then within-set diversity
(MS-SSIM), memorization against the training split and, when an anatomy
predictor is available, conditional fidelity and tissue volumes; and inter-slice consistency, the
known weakness of 2D (slice-by-slice) models, per set next to the real splits.

:func:`evaluate_generation` is a sequence of steps, each a function returning a dataclass:

    load_sets                the real splits and the generated volumes, checked     (evaluate/sets.py)
    choose_backbone          the feature network
    compute_features         backbone features and voxel vectors, once per volume
    reconstruct_sets         the autoencoder's reconstructions (with `reconstruct`)
    distribution_metrics     the set metrics per column, bootstrapped
    measure_diversity        MS-SSIM within the real and the generated set
    inter_slice_consistency  roughness across axial slices against in-plane, per set  (evaluate/consistency.py)
    high_frequency_fidelity  sharpness: |Laplacian| and gradient magnitude in the brain, per set / real  (evaluate/sharpness.py)
    privacy_audit            near copies of training subjects                      (evaluate/privacy.py)
    predict_anatomy          the anatomy network's predictions, once per volume    (evaluate/fidelity.py)
    conditional_fidelity     requested against predicted covariates                (evaluate/fidelity.py)
    morphometric_fidelity    tissue volumes against real brains                    (evaluate/fidelity.py)

Features are computed once per volume and the bootstrap draws rows of the cached
feature matrices, so resampling costs no network passes.

    >>> result = evaluate_generation("prepared/", "samples/", "report/", backbone="intensity")
    >>> result["columns"]["real_vs_generated"]["fd"]["mean"]
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from mriflow import __version__
from mriflow.data.io import load_volume, strip_nifti_suffix
from mriflow.evaluate.backbones import Backbone, anatomy_weights_for, get_backbone
from mriflow.evaluate.bootstrap import DEFAULT_ROUNDS, bootstrap as run_bootstrap, default_sample_size
from mriflow.evaluate.consistency import inter_slice_consistency
from mriflow.evaluate.feature_store import FeatureStore
from mriflow.evaluate.sharpness import high_frequency_fidelity
from mriflow.evaluate.diversity import DEFAULT_MAX_PAIRS, pairwise_ms_ssim
from mriflow.evaluate.fidelity import (
    anatomy_predictor, conditional_fidelity, label_fidelity, morphometric_fidelity, predict_anatomy,
)
from mriflow.evaluate.memorization import DEFAULT_SMOOTHING_MM, masked_standardised, population_mask, smoothing_voxels
from mriflow.evaluate.metrics import LOWER_IS_BETTER, median_bandwidth, psnr, set_metrics, ssim
from mriflow.evaluate.other_networks import other_network_distances
from mriflow.evaluate.privacy import TissueSpace, privacy_audit, tissue_space_for
from mriflow.evaluate.sets import BATCH_SIZE, EvaluationSets, VolumeFiles, load_sets, read_clipped
from mriflow.utils.text import counted

NEAREST_K = 5
COPY_EXAMPLES = 12  # training subjects reconstructed to show the distance of a copy after the decoder
MONTAGE_SUBJECTS = 3
# Reconstruct: (B, 1, D, H, W) tensor in [0, 1] -> same shape; the autoencoder stage supplies it.
Reconstruct = Callable[[torch.Tensor], torch.Tensor]


def evaluate_generation(
    real_dir: str | Path,
    fake_dir: str | Path,
    out: str | Path,
    split: str = "test",
    other_split: str | None = None,
    backbone: str | Backbone = "auto",
    weights: str | Path | None = None,
    weights_sha256: str | None = None,
    n: int | None = None,
    bootstrap: int | None = None,
    autoencoder: str | None = None,
    reconstruct: Reconstruct | None = None,
    seed: int = 0,
    diversity_pairs: int = DEFAULT_MAX_PAIRS,
    device: str = "cpu",
    progress: bool = True,
    protocol: dict | None = None,
    also_backbones: Sequence[tuple[str, str | None]] = (),
) -> dict:
    """Compare generated volumes in `fake_dir` with the prepared data in `real_dir`; write the report to `out`.

    Args:
        split: real evaluation split; other_split: the second real split for the
            Real vs Real column (default "val", else "train").
        backbone: a registered name (see features.available_backbones), a Backbone, or "auto":
            the shipped anatomy network where it was trained for the data's grid, else "deepbet" (a
            brain-MRI network that works on any grid; the fallback is written in the report's warnings).
        n, bootstrap: bootstrap sample size per set and rounds (defaults: 80 % of the
            smallest set, capped at 200; 20 rounds). One n serves every column.
        autoencoder: a label for the report (e.g. the run folder reconstruct came from).
        reconstruct: (B, 1, D, H, W) -> (B, 1, D, H, W) in [0, 1]; adds the Real vs
            Reconstruction column.
        also_backbones: (name, weights or None) of other feature networks whose FD (Real vs Real, Real vs
            Generated, same bootstrap) is added as extra rows (evaluate/other_networks.py).
    Returns the result written to out/metrics.json.
    """
    from mriflow.evaluate.report import write_report

    laps = Laps()
    sets = load_sets(real_dir, fake_dir, out, split, other_split)
    backbone, warnings = choose_backbone(backbone, weights, weights_sha256, device, sets.shape)
    features = compute_features(sets, backbone, progress)
    warnings += features.clipped_warnings(sets.generated)
    laps.end("features")
    reconstructions = None
    if reconstruct is not None:
        reconstructions = reconstruct_sets(reconstruct, sets, backbone, progress)
        laps.end("reconstruction")
    metrics = distribution_metrics(sets, features, reconstructions, n, bootstrap, seed, progress)
    laps.end("bootstrap")
    others = other_network_distances(sets, also_backbones, metrics.sample_size, metrics.rounds, seed, device)
    laps.end("other_networks")
    diversity = measure_diversity(sets, diversity_pairs, seed, progress)
    laps.end("diversity")
    consistency = inter_slice_consistency(sets, reconstructions, metrics.sample_size, metrics.rounds, seed)
    laps.end("slice_consistency")
    sharpness = high_frequency_fidelity(sets, reconstructions, metrics.sample_size, metrics.rounds, seed)
    laps.end("sharpness")
    privacy = privacy_audit(sets, features, reconstructions)
    laps.end("memorization")
    predictions = predict_anatomy(backbone, sets)  # shared by the two measures below
    fidelity = conditional_fidelity(predictions, sets)
    laps.end("conditional_fidelity")
    anatomy = morphometric_fidelity(predictions, sets, metrics.rounds, seed)
    laps.end("morphometry")
    labels = label_fidelity(predictions, sets)
    laps.end("label_fidelity")

    result = {
        "mriflow_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"real_dir": str(sets.real_dir), "split": sets.split, "other_split": sets.other_split,
                   "fake_dir": str(sets.fake_dir), "autoencoder": autoencoder,
                   "counts": {"real": len(sets.real_rows), "other": len(sets.other_rows),
                              "generated": len(sets.generated), "train": len(sets.train_rows)},
                   "shape": list(sets.shape), "affine": np.asarray(sets.affine).tolist()},
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256, "feature_dim": metrics.feature_dim},
        "settings": {"n": metrics.sample_size, "bootstrap_rounds": metrics.rounds, "seed": seed,
                     "sampling": "without replacement", "nearest_k": NEAREST_K, "mmd_bandwidth": metrics.bandwidth,
                     "diversity_pairs": diversity_pairs, "protocol": protocol},
        "lower_is_better": LOWER_IS_BETTER,
        "columns": metrics.columns,
        "column_sets": metrics.column_sets,
        "other_networks": others.record(),
        "reconstruction": reconstructions.summary if reconstructions else None,
        "diversity": diversity.record(),
        "slice_consistency": consistency.record(),
        "sharpness": sharpness.record(),
        "memorization": privacy.record(),
        "conditional_fidelity": fidelity.record(),
        "morphometry": anatomy.record(),
        "label_fidelity": labels.record(),
        "warnings": warnings,
    }
    montage = {
        "real": [(strip_nifti_suffix(p.name), read_clipped(p)[0]) for p in sets.real[:MONTAGE_SUBJECTS]],
        "generated": [(strip_nifti_suffix(p.name), read_clipped(p)[0]) for p in sets.generated[:MONTAGE_SUBJECTS]],
        "reconstruction": reconstructions.example if reconstructions else None,
    }
    result["timing_s"] = laps.record()
    result["feature_store"] = {"rows_reused": features.reused,
                               "folder": str(features.store.folder) if features.store is not None else None}
    write_report(result, out, montage)
    return result


class Laps:
    """Seconds each step took, from one start: end(name) closes the lap since the previous one."""

    def __init__(self):
        self.started, self.seconds = time.perf_counter(), {}

    def end(self, name: str) -> None:
        self.seconds[name] = time.perf_counter() - self.started - sum(self.seconds.values())

    def record(self) -> dict[str, float]:
        """{step: seconds, ..., "total": seconds}, rounded to 0.01 s."""
        return {k: round(v, 2) for k, v in {**self.seconds, "total": time.perf_counter() - self.started}.items()}


def choose_backbone(backbone: str | Backbone, weights: str | Path | None, weights_sha256: str | None, device: str,
                    shape: tuple[int, ...]) -> tuple[Backbone, list[str]]:
    """The feature network, and a warning when "auto" found no shipped anatomy network for the grid."""
    warnings = []
    if backbone == "auto":
        backbone, reason = anatomy_predictor(None, shape)
        if backbone is None:
            warnings.append(f"backbone 'auto' fell back to 'deepbet': {reason}")
            backbone = "deepbet"
    if backbone == "anatomy" and weights is None:  # the shipped network of this grid, when there is one
        weights = anatomy_weights_for(shape)
    if isinstance(backbone, str):
        backbone = get_backbone(backbone, weights=weights, weights_sha256=weights_sha256, device=device)
    return backbone, warnings


@dataclass
class FeatureCache:
    """Backbone features (F,) and, for the privacy audit, voxel vectors (V,) of every file, computed once
    however many sets use it. `mask` is the population brain mask of the training split (None without one)."""

    backbone: Backbone
    mask: np.ndarray | None
    smoothing: float  # Gaussian sigma in voxels of the voxel vectors
    progress: bool = False
    features: dict[Path, np.ndarray] = field(default_factory=dict)
    vectors: dict[Path, np.ndarray] = field(default_factory=dict)
    tissue: TissueSpace | None = None  # the privacy audit's feature space where the grid has an anatomy network
    tissue_vectors: dict[Path, np.ndarray] = field(default_factory=dict)
    clipped: set[Path] = field(default_factory=set)  # files with values outside [0, 1]
    store: FeatureStore | None = None  # backbone rows kept on disk between evaluations (evaluate/feature_store.py)
    tissue_store: FeatureStore | None = None

    def add(self, paths: Sequence[Path], description: str, keep: bool = True) -> None:
        """Rows of `paths` (those not yet here); `keep`: read and write them through the on-disk store (the real
        sets, scored again and again; not generated volumes, which would only fill it)."""
        todo = [p for p in dict.fromkeys(paths) if p not in self.features]
        batches = [todo[i : i + BATCH_SIZE] for i in range(0, len(todo), BATCH_SIZE)]
        for batch in tqdm(batches, desc=f"features: {description}", disable=not self.progress or not batches, leave=False):
            volumes = []
            for path in batch:
                volume, outside = read_clipped(path)
                if outside:
                    self.clipped.add(path)
                volumes.append(volume)
                if self.mask is not None:
                    self.vectors[path] = masked_standardised(volume, self.mask, self.smoothing)
            self._rows(batch, volumes, self.features, self.store if keep else None, self.backbone.features,
                       lambda v: np.stack(v)[:, None])
            if self.tissue is not None and self.mask is not None:
                self._rows(batch, volumes, self.tissue_vectors, self.tissue_store if keep else None, self.tissue, np.stack)

    @staticmethod
    def _rows(batch, volumes, into: dict, store, network, stack) -> None:
        """`network`'s rows of the batch into `into`, taken from `store` where it has them (the rest computed and
        kept there)."""
        kept = {path: store.get(path) for path in batch} if store is not None else {}
        todo = [i for i, path in enumerate(batch) if kept.get(path) is None]
        if todo:
            for i, row in zip(todo, network(stack([volumes[i] for i in todo]))):
                kept[batch[i]] = row
                if store is not None:
                    store.put(batch[i], row)
        for path in batch:
            into[path] = kept[path]

    @property
    def reused(self) -> int:
        """Rows read from the feature store rather than computed."""
        return sum(store.hits for store in (self.store, self.tissue_store) if store is not None)

    def matrix(self, paths: Sequence[Path]) -> np.ndarray:
        return np.stack([self.features[p] for p in paths])

    def vector_matrix(self, paths: Sequence[Path]) -> np.ndarray:
        return np.stack([self.vectors[p] for p in paths])

    def privacy_matrix(self, paths: Sequence[Path]) -> np.ndarray:
        """The privacy audit's feature rows: tissue vectors where there is a tissue space, else backbone features."""
        return np.stack([self.tissue_vectors[p] for p in paths]) if self.tissue is not None else self.matrix(paths)

    def clipped_warnings(self, generated: Sequence[Path]) -> list[str]:
        clipped = [p.name for p in generated if p in self.clipped]
        return [f"{counted(len(clipped), 'generated volume')} had values outside [0, 1] and were clipped: "
                f"{', '.join(clipped[:5])}"] if clipped else []


def compute_features(sets: EvaluationSets, backbone: Backbone, progress: bool) -> FeatureCache:
    """Features of every volume of every set; voxel vectors too when a privacy audit is possible."""
    mask = population_mask(load_volume(sets.real_dir / p)[0] for p in sets.train_rows["mask"]) if sets.audit_possible else None
    tissue = tissue_space_for(backbone, sets.affine, sets.shape) if mask is not None else None
    cache = FeatureCache(backbone, mask, smoothing_voxels(sets.affine, DEFAULT_SMOOTHING_MM), progress, tissue=tissue,
                         store=FeatureStore.for_network(f"{backbone.name} features", backbone),
                         tissue_store=FeatureStore.for_network(tissue.description, tissue.backbone) if tissue is not None else None)
    for paths, description in ((sets.real, f"real {sets.split}"), (sets.other, f"real {sets.other_split}"),
                               (sets.generated, "generated"), (sets.train, "train"), (sets.heldout, "held-out")):
        cache.add(paths, description, keep=paths is not sets.generated)
    return cache


@dataclass
class Reconstructions:
    """The autoencoder's reconstructions of the real volumes that need one, and the Real vs Reconstruction figures."""

    volumes: dict[Path, np.ndarray]  # (D, H, W) in [0, 1]: the evaluation split, and the held-out subjects and
    copied: list[Path]  # these training subjects when a privacy audit is possible
    features: np.ndarray  # (N, F) of the evaluation split's reconstructions
    summary: dict  # metrics.json "reconstruction": SSIM and PSNR per subject, mean ± sd
    example: tuple[np.ndarray, np.ndarray]  # (original, reconstruction) for the montage


def reconstruct_sets(reconstruct: Reconstruct, sets: EvaluationSets, backbone: Backbone, progress: bool) -> Reconstructions:
    """Reconstruct the evaluation split (the column); when a privacy audit is possible also the held-out subjects
    (its smoothness-matched yardstick) and a few training subjects (what a copy looks like after the decoder)."""
    real, copied = sets.real, []
    if sets.audit_possible:
        spread = np.unique(np.linspace(0, len(sets.train) - 1, COPY_EXAMPLES).astype(int))
        copied = [sets.train[i] for i in spread]
    volumes = _reconstructions(reconstruct, real + sets.heldout + copied if sets.audit_possible else real, progress)
    features, ssims, psnrs = [], [], []
    for start in range(0, len(real), BATCH_SIZE):
        batch = real[start : start + BATCH_SIZE]
        original = torch.from_numpy(np.stack([read_clipped(p)[0] for p in batch]))[:, None]
        reconstructed = torch.from_numpy(np.stack([volumes[p] for p in batch]))[:, None]
        features.append(backbone.features(reconstructed))
        ssims.extend(ssim(original, reconstructed).tolist())
        psnrs.extend(psnr(original, reconstructed).tolist())
    summary = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
               for name, v in (("ssim", ssims), ("psnr", psnrs))}
    summary["settings"] = {"ssim": "MONAI SSIMMetric 3D, Gaussian window 11, sigma 1.5, data range 1", "psnr": "data range 1"}
    return Reconstructions(volumes, copied, np.concatenate(features), summary, (read_clipped(real[0])[0], volumes[real[0]]))


def _reconstructions(reconstruct: Reconstruct, paths: Sequence[Path], progress: bool) -> dict[Path, np.ndarray]:
    """Every volume of `paths` through `reconstruct` -> {path: (D, H, W) float32 in [0, 1]}."""
    paths = list(dict.fromkeys(paths))
    result = {}
    batches = [paths[i : i + BATCH_SIZE] for i in range(0, len(paths), BATCH_SIZE)]
    for batch in tqdm(batches, desc="reconstruction", disable=not progress, leave=False):
        real = torch.from_numpy(np.stack([read_clipped(p)[0] for p in batch]))[:, None]  # (B, 1, D, H, W)
        with torch.no_grad():
            reconstructed = reconstruct(real).detach().float().cpu().clamp(0, 1)
        if reconstructed.shape != real.shape:
            raise ValueError(f"reconstruct returned shape {tuple(reconstructed.shape)} for input {tuple(real.shape)}")
        result.update(zip(batch, reconstructed[:, 0].numpy()))
    return result


@dataclass
class DistributionMetrics:
    """The set metrics of each column (metrics.json "columns"), with the settings they were measured under."""

    columns: dict[str, dict]  # column -> metric -> bootstrap {"mean", "sd", "values"}
    column_sets: dict[str, list[str]]  # column -> the two sets it compares, e.g. ["real test (15)", "generated (32)"]
    sample_size: int  # n drawn per set in every round
    rounds: int
    bandwidth: float  # of the MMD's Gaussian kernel, from the real split
    feature_dim: int


def distribution_metrics(sets: EvaluationSets, features: FeatureCache, reconstructions: Reconstructions | None,
                         n: int | None, bootstrap: int | None, seed: int, progress: bool) -> DistributionMetrics:
    """FD, KID, MMD and PRDC of the real split against each other set: bootstrap mean ± sd at one n for all columns."""
    real_features = features.matrix(sets.real)
    real = f"real {sets.split} ({len(sets.real)})"
    compared = {"real_vs_real": features.matrix(sets.other), "real_vs_generated": features.matrix(sets.generated)}
    column_sets = {"real_vs_real": [real, f"real {sets.other_split} ({len(sets.other)})"],
                   "real_vs_generated": [real, f"generated ({len(sets.generated)})"]}
    if reconstructions is not None:
        compared = {"real_vs_reconstruction": reconstructions.features, **compared}
        column_sets = {"real_vs_reconstruction": [real, f"reconstructions ({len(sets.real)})"], **column_sets}
    sample_size = n if n is not None else default_sample_size(len(real_features), *(len(f) for f in compared.values()))
    rounds = bootstrap if bootstrap is not None else DEFAULT_ROUNDS
    bandwidth = median_bandwidth(real_features)
    statistic = partial(set_metrics, nearest_k=NEAREST_K, mmd_bandwidth=bandwidth)
    columns = {}
    for name, other in compared.items():
        summary = run_bootstrap(real_features, other, statistic, n=sample_size, rounds=rounds, seed=seed,
                                progress=progress, description=f"bootstrap {name}")
        summary.pop("_settings")
        columns[name] = summary
    return DistributionMetrics(columns, column_sets, sample_size, rounds, bandwidth, int(real_features.shape[1]))


@dataclass
class Diversity:
    """MS-SSIM of random pairs within the real split and within the generated set (lower = more diverse)."""

    real: dict  # {"mean", "sd", "values", "pairs", "settings"}
    generated: dict

    def record(self) -> dict:
        return {"real": self.real, "generated": self.generated, "settings": self.real["settings"]}


def measure_diversity(sets: EvaluationSets, pairs: int, seed: int, progress: bool) -> Diversity:
    real, generated = (pairwise_ms_ssim(VolumeFiles(paths), pairs, seed, progress=progress, description=f"MS-SSIM {role}")
                       for role, paths in (("real", sets.real), ("generated", sets.generated)))
    return Diversity(real, generated)
