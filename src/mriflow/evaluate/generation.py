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
predictor is available, conditional fidelity.

Features are computed once per volume and the bootstrap draws rows of the cached
feature matrices, so resampling costs no network passes.

    >>> result = evaluate_generation("prepared/", "samples/", "report/", backbone="intensity")
    >>> result["columns"]["real_vs_generated"]["fd"]["mean"]
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import nibabel as nib
import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from mriflow import __version__
from mriflow.data.dataset import read_manifest, read_preparation
from mriflow.data.io import is_nifti, load_volume, strip_nifti_suffix
from mriflow.utils.files import read_json
from mriflow.evaluate.bootstrap import DEFAULT_ROUNDS, bootstrap as run_bootstrap, default_sample_size
from mriflow.evaluate.diversity import DEFAULT_MAX_PAIRS, pairwise_ms_ssim
from mriflow.evaluate.backbones import (
    Backbone,
    PredictiveBackbone,
    anatomy_weights_for,
    get_backbone,
    shipped_anatomy_weights,
)
from mriflow.evaluate.memorization import (
    DEFAULT_SMOOTHING_MM,
    correlation_distance,
    find_memorized,
    flagged_table,
    masked_standardised,
    population_mask,
    smoothing_voxels,
)
from mriflow.evaluate.metrics import LOWER_IS_BETTER, median_bandwidth, psnr, set_metrics, ssim
from mriflow.evaluate.morphometry import morphometry

AFFINE_TOLERANCE = 1e-3
RANGE_TOLERANCE = 1e-3  # generated intensities this far outside [0, 1] are reported, then clipped
NEAREST_K = 5
VOLUME_COVARIATES = {"ventricles_ml": "ventricles", "total_brain_ml": "total_brain"}  # measurement -> covariate
COPY_EXAMPLES = 12  # training subjects reconstructed to show the distance of a copy after the decoder
BATCH_SIZE = 8
MONTAGE_SUBJECTS = 3
# Reconstruct: (B, 1, D, H, W) tensor in [0, 1] -> same shape; the autoencoder stage supplies it.
Reconstruct = Callable[[torch.Tensor], torch.Tensor]


class VolumeFiles(Sequence):
    """A lazy sequence of (D, H, W) float32 volumes in [0, 1], read from disk on access."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        return _read(self.paths[index])[0]


def _read(path: Path) -> tuple[np.ndarray, bool]:
    """(volume clipped to [0, 1], whether it had to be clipped)."""
    data, _ = load_volume(path)
    if not np.isfinite(data).all():
        raise ValueError(f"{path}: volume contains NaN or infinite values; regenerate it")
    outside = bool(data.min() < -RANGE_TOLERANCE or data.max() > 1 + RANGE_TOLERANCE)
    return np.clip(data, 0.0, 1.0), outside


def reference_geometry(real_dir: Path, manifest: pd.DataFrame) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine every volume must have: prepare.json's affine and the first image's shape."""
    first = nib.load(str(real_dir / manifest["image"].iloc[0]))
    recorded = read_preparation(real_dir).get("affine")  # a damaged prepare.json is named, not a JSON position
    affine = first.affine if recorded is None else recorded
    return tuple(int(s) for s in first.shape), np.asarray(affine, np.float64)


def check_geometry(path: Path, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """Refuse a volume whose shape or affine (tolerance 1e-3) differs from the real data's."""
    header = nib.load(str(path))
    actual_shape, actual_affine = tuple(int(s) for s in header.shape), np.asarray(header.affine, np.float64)
    shape_ok = actual_shape == tuple(shape)
    affine_ok = np.allclose(actual_affine, affine, atol=AFFINE_TOLERANCE, rtol=0)
    if not (shape_ok and affine_ok):
        wrong = " and ".join(w for w, ok in (("shape", shape_ok), ("affine", affine_ok)) if not ok)
        raise ValueError(
            f"{path}: {wrong} do not match the real data. This file has shape {actual_shape} and affine "
            f"{np.round(actual_affine, 4).tolist()}; expected shape {tuple(shape)} and affine "
            f"{np.round(affine, 4).tolist()} (tolerance {AFFINE_TOLERANCE}). Generate with the same preset grid "
            f"as the prepared data, or resample the volume onto it.")


def list_volumes(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"--fake {folder}: not a folder")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    if not paths:
        raise ValueError(f"--fake {folder}: no NIfTI volumes (*.nii.gz, *.nii) in this folder")
    return paths


def read_sidecar(path: Path) -> dict:
    """Covariates of a generated volume from its JSON sidecar (x.nii.gz -> x.json):
    the "covariates" object if present, else the top-level scalar entries."""
    sidecar = path.with_name(strip_nifti_suffix(path.name) + ".json")
    if not sidecar.is_file():
        return {}
    data = read_json(sidecar, advice="restore it, or delete it (its volume is then measured without the covariates it was drawn for)")
    values = data.get("covariates", data) if isinstance(data, dict) else {}
    return {k: v for k, v in values.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}


class FeatureCache:
    """Backbone features and voxel vectors, computed once per file however many sets use it."""

    def __init__(self, backbone: Backbone, mask: np.ndarray | None, smoothing: float, progress: bool):
        self.backbone, self.mask, self.smoothing, self.progress = backbone, mask, smoothing, progress
        self.features: dict[Path, np.ndarray] = {}
        self.vectors: dict[Path, np.ndarray] = {}
        self.clipped: set[Path] = set()

    def add(self, paths: Sequence[Path], description: str) -> None:
        todo = [p for p in dict.fromkeys(paths) if p not in self.features]
        batches = [todo[i : i + BATCH_SIZE] for i in range(0, len(todo), BATCH_SIZE)]
        for batch in tqdm(batches, desc=f"features: {description}", disable=not self.progress or not batches, leave=False):
            volumes = []
            for path in batch:
                volume, outside = _read(path)
                if outside:
                    self.clipped.add(path)
                volumes.append(volume)
                if self.mask is not None:
                    self.vectors[path] = masked_standardised(volume, self.mask, self.smoothing)
            rows = self.backbone.features(np.stack(volumes)[:, None])  # (B, F)
            for path, row in zip(batch, rows):
                self.features[path] = row

    def matrix(self, paths: Sequence[Path]) -> np.ndarray:
        return np.stack([self.features[p] for p in paths])

    def vector_matrix(self, paths: Sequence[Path]) -> np.ndarray:
        return np.stack([self.vectors[p] for p in paths])


def _resolve_other_split(splits: list[str], split: str, other_split: str | None) -> str:
    if other_split is not None:
        return other_split
    for candidate in ("val", "train", "test"):
        if candidate in splits and candidate != split:
            return candidate
    raise ValueError(f"no second real split to compare with: the prepared data has only {splits}; pass other_split")


def _split_rows(manifest: pd.DataFrame, split: str, real_dir: Path, argument: str) -> pd.DataFrame:
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        available = sorted(manifest["split"].dropna().unique())
        raise ValueError(f"{argument} {split!r}: no subjects in {real_dir}/manifest.csv; "
                         f"available splits: {', '.join(available)}")
    return rows.reset_index(drop=True)


def _reconstructions(reconstruct: Reconstruct, paths: Sequence[Path], progress: bool) -> dict[Path, np.ndarray]:
    """Every volume of `paths` through `reconstruct` -> {path: (D, H, W) float32 in [0, 1]}."""
    paths = list(dict.fromkeys(paths))
    result = {}
    batches = [paths[i : i + BATCH_SIZE] for i in range(0, len(paths), BATCH_SIZE)]
    for batch in tqdm(batches, desc="reconstruction", disable=not progress, leave=False):
        real = torch.from_numpy(np.stack([_read(p)[0] for p in batch]))[:, None]  # (B, 1, D, H, W)
        with torch.no_grad():
            reconstructed = reconstruct(real).detach().float().cpu().clamp(0, 1)
        if reconstructed.shape != real.shape:
            raise ValueError(f"reconstruct returned shape {tuple(reconstructed.shape)} for input {tuple(real.shape)}")
        result.update(zip(batch, reconstructed[:, 0].numpy()))
    return result


def _reconstruction_column(reconstructed: dict[Path, np.ndarray], paths: Sequence[Path], backbone: Backbone):
    """Features of the reconstructions of `paths`, and per-subject SSIM / PSNR against the originals."""
    features, ssims, psnrs = [], [], []
    for start in range(0, len(paths), BATCH_SIZE):
        batch = paths[start : start + BATCH_SIZE]
        real = torch.from_numpy(np.stack([_read(p)[0] for p in batch]))[:, None]
        recon = torch.from_numpy(np.stack([reconstructed[p] for p in batch]))[:, None]
        features.append(backbone.features(recon))
        ssims.extend(ssim(real, recon).tolist())
        psnrs.extend(psnr(real, recon).tolist())
    example = (_read(paths[0])[0], reconstructed[paths[0]])
    summary = {name: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "values": v}
               for name, v in (("ssim", ssims), ("psnr", psnrs))}
    summary["settings"] = {"ssim": "MONAI SSIMMetric 3D, Gaussian window 11, sigma 1.5, data range 1", "psnr": "data range 1"}
    return np.concatenate(features), summary, example


def _predictor(backbone: Backbone | None, shape: tuple[int, ...]) -> tuple[PredictiveBackbone | None, str | None]:
    """The backbone itself if it predicts, else the shipped anatomy network trained on volumes of `shape`."""
    if isinstance(backbone, PredictiveBackbone):
        return backbone, None
    try:
        shipped = shipped_anatomy_weights()
    except ValueError as error:
        return None, str(error)
    if tuple(shape) not in shipped:
        grids = ", ".join(str(s) for s in shipped) or "none"
        return None, (f"no shipped anatomy network was trained on volumes of shape {tuple(shape)} (shipped: {grids}); "
                      f"pass --backbone anatomy --weights for one trained on this grid (benchmarks/anatomy.py)")
    return get_backbone("anatomy", weights=shipped[tuple(shape)]), None


def _predict(predictor: PredictiveBackbone, paths: Sequence[Path]) -> dict[str, np.ndarray]:
    parts: dict[str, list] = {}
    for start in range(0, len(paths), BATCH_SIZE):
        volumes = np.stack([_read(p)[0] for p in paths[start : start + BATCH_SIZE]])[:, None]
        for name, values in predictor.predict(volumes).items():
            parts.setdefault(name, []).append(np.asarray(values, np.float64))
    return {name: np.concatenate(v) for name, v in parts.items()}


def _sex_index(value, categories: Sequence[str]) -> float:
    text = str(value).strip().upper()
    text = {"FEMALE": "F", "MALE": "M"}.get(text, text)
    upper = [str(c).upper() for c in categories]
    return float(upper.index(text)) if text in upper else math.nan


def _age_agreement(target: np.ndarray, predicted: np.ndarray) -> dict | None:
    """MAE and Pearson r between target and predicted ages, over subjects where both exist."""
    keep = np.isfinite(target) & np.isfinite(predicted)
    if keep.sum() < 2:
        return None
    t, p = target[keep], predicted[keep]
    r = float(np.corrcoef(t, p)[0, 1]) if t.std() > 0 and p.std() > 0 else math.nan
    return {"mae": float(np.abs(t - p).mean()), "pearson_r": r, "count": int(keep.sum()),
            "target": t.tolist(), "predicted": p.tolist()}


def _sex_agreement(values: Sequence, probabilities: np.ndarray, categories: Sequence[str]) -> dict | None:
    """Accuracy of the binary prediction (probability of the last category > 0.5) where the target is known."""
    target = np.array([_sex_index(v, categories) for v in values])
    keep = np.isfinite(target)
    if not keep.any():
        return None
    predicted = (probabilities[keep] > 0.5) * float(len(categories) - 1)
    return {"accuracy": float((predicted == target[keep]).mean()), "count": int(keep.sum())}


def _mean_sd(values: np.ndarray) -> dict:
    return {"mean": float(np.mean(values)), "sd": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def conditional_fidelity(backbone: Backbone, generated: Sequence[Path], sidecars: Sequence[dict],
                         real: Sequence[Path], real_rows: pd.DataFrame) -> dict:
    """Does a generated volume show the covariates it was asked for? Measured by an anatomy predictor.

    Age: MAE and Pearson r between requested and predicted age on the generated
    volumes, next to the same between true and predicted age on the real split (the
    predictor's own error). Sex: accuracy of the predicted category, likewise.
    Ventricle and total-brain volumes (measured from the predictor's tissue segmentation, for the
    anatomy network): mean ± sd in both sets; when the volumes were requested (covariates named
    as in `VOLUME_COVARIATES`, e.g. prepared with --covariate-columns 509:ventricles,701:total_brain),
    also the Pearson r between requested and measured, next to the r between the real subjects'
    covariate and measured. Only r: the covariate is usually a native-space volume (MUSE), the
    measurement a template-space one, so their units and head-size scaling differ.
    """
    requested = pd.DataFrame(list(sidecars))
    if requested.empty or not {"age", "sex"} & set(requested.columns):
        return {"skipped": "the generated volumes carry no age or sex in JSON sidecars (x.nii.gz -> x.json)"}
    predictor, reason = _predictor(backbone, nib.load(str(generated[0])).shape)
    if predictor is None:
        return {"skipped": f"no anatomy predictor with age/sex heads: {reason}"}
    on_generated, on_real = _predict(predictor, generated), _predict(predictor, real)
    result: dict = {"predictor": getattr(predictor, "name", "anatomy"),
                    "predictor_weights_sha256": getattr(predictor, "weights_sha256", None)}
    if "age" in requested.columns and "age" in on_generated:
        true_age = real_rows["age"] if "age" in real_rows else pd.Series([math.nan] * len(real))
        result["age"] = {
            "generated": _age_agreement(pd.to_numeric(requested["age"], errors="coerce").to_numpy(float), on_generated["age"]),
            "real": _age_agreement(pd.to_numeric(true_age, errors="coerce").to_numpy(float), on_real["age"]),
        }
    if "sex" in requested.columns and "sex_prob" in on_generated:
        categories = tuple(getattr(predictor, "sex_categories", ("F", "M")))
        result["sex"] = {
            "generated": _sex_agreement(requested["sex"].tolist(), on_generated["sex_prob"], categories),
            "real": _sex_agreement(real_rows["sex"].tolist(), on_real["sex_prob"], categories) if "sex" in real_rows else None,
        }
    for volume, covariate in VOLUME_COVARIATES.items():
        if volume not in on_generated:
            continue
        result[volume] = {"generated": _mean_sd(on_generated[volume]), "real": _mean_sd(on_real[volume])}
        if covariate in requested.columns:
            true = real_rows[covariate] if covariate in real_rows else pd.Series([math.nan] * len(real))
            result[volume]["requested_vs_measured"] = {
                "covariate": covariate,
                "generated": _correlation(pd.to_numeric(requested[covariate], errors="coerce").to_numpy(float),
                                          on_generated[volume]),
                "real": _correlation(pd.to_numeric(true, errors="coerce").to_numpy(float), on_real[volume])}
    return result


def morphometric_fidelity(backbone: Backbone, generated: Sequence[Path], sidecars: Sequence[dict],
                          real: Sequence[Path], real_rows: pd.DataFrame, other: Sequence[Path], other_rows: pd.DataFrame,
                          rounds: int, seed: int) -> dict:
    """Tissue and region volumes of real, other-real and generated volumes from the anatomy network's segmentation
    (mriflow.evaluate.morphometry), with each subject's age (true, or requested for generated) for the curves."""
    predictor, reason = _predictor(backbone, nib.load(str(generated[0])).shape)
    if predictor is None:
        return {"skipped": f"no anatomy network to segment the volumes: {reason}"}
    sets = {"real": (real, real_rows.get("age")), "other": (other, other_rows.get("age")),
            "generated": (generated, pd.DataFrame(list(sidecars)).get("age"))}
    volumes, ages = {}, {}
    for name, (paths, age) in sets.items():
        predicted = _predict(predictor, paths)
        volumes[name] = {k[:-3]: v for k, v in predicted.items() if k.endswith("_ml")}
        ages[name] = (pd.to_numeric(age, errors="coerce").to_numpy(float).tolist() if age is not None
                      else [math.nan] * len(paths))
    result = morphometry(volumes["real"], volumes["other"], volumes["generated"], rounds=rounds, seed=seed)
    result["curves"] = {name: {"age": ages[name], **{k: v.tolist() for k, v in volumes[name].items()}}
                        for name in ("real", "other", "generated")}
    return result


def _correlation(target: np.ndarray, measured: np.ndarray) -> dict | None:
    """Pearson r between target and measured values where both exist (None below 3 pairs)."""
    keep = np.isfinite(target) & np.isfinite(measured)
    if keep.sum() < 3 or target[keep].std() == 0 or measured[keep].std() == 0:
        return None
    return {"pearson_r": float(np.corrcoef(target[keep], measured[keep])[0, 1]), "count": int(keep.sum())}


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
    Returns the result written to out/metrics.json.
    """
    from mriflow.evaluate.report import write_report

    started = time.perf_counter()
    timings: dict[str, float] = {}
    real_dir, fake_dir, out = Path(real_dir), Path(fake_dir), Path(out)
    for given, argument in ((real_dir, "--real"), (fake_dir, "--fake")):
        if out.resolve() == given.resolve():
            raise ValueError(f"--out {out} is the {argument} folder; choose a new folder, inputs are never written to")
    manifest = read_manifest(real_dir)
    splits = sorted(manifest["split"].dropna().unique())
    other_split = _resolve_other_split(splits, split, other_split)
    real_rows = _split_rows(manifest, split, real_dir, "--split")
    other_rows = _split_rows(manifest, other_split, real_dir, "other_split")
    train_rows = manifest[manifest["split"] == "train"].reset_index(drop=True)
    heldout_rows = manifest[manifest["split"] != "train"].reset_index(drop=True)

    shape, affine = reference_geometry(real_dir, manifest)
    fake_paths = list_volumes(fake_dir)
    for path in fake_paths:
        check_geometry(path, shape, affine)
    sidecars = [read_sidecar(p) for p in fake_paths]

    real_paths = [real_dir / p for p in real_rows["image"]]
    other_paths = [real_dir / p for p in other_rows["image"]]
    train_paths = [real_dir / p for p in train_rows["image"]]
    heldout_paths = [real_dir / p for p in heldout_rows["image"]]
    warnings: list[str] = []

    if backbone == "auto":
        backbone, reason = _predictor(None, shape)
        if backbone is None:
            warnings.append(f"backbone 'auto' fell back to 'deepbet': {reason}")
            backbone = "deepbet"
    if backbone == "anatomy" and weights is None:  # the shipped network of this grid, when there is one
        weights = anatomy_weights_for(shape)
    if isinstance(backbone, str):
        backbone = get_backbone(backbone, weights=weights, weights_sha256=weights_sha256, device=device)
    memorization_possible = len(train_paths) > 0 and len(heldout_paths) > 0
    mask = population_mask(load_volume(real_dir / p)[0] for p in train_rows["mask"]) if memorization_possible else None
    smoothing = smoothing_voxels(affine, DEFAULT_SMOOTHING_MM)
    cache = FeatureCache(backbone, mask, smoothing, progress)
    for paths, description in ((real_paths, f"real {split}"), (other_paths, f"real {other_split}"),
                               (fake_paths, "generated"), (train_paths, "train"), (heldout_paths, "held-out")):
        cache.add(paths, description)
    clipped = [p.name for p in fake_paths if p in cache.clipped]
    if clipped:
        warnings.append(f"{len(clipped)} generated volume(s) had values outside [0, 1] and were clipped: "
                        f"{', '.join(clipped[:5])}")
    timings["features"] = time.perf_counter() - started

    real_features = cache.matrix(real_paths)
    compared = {"real_vs_real": cache.matrix(other_paths), "real_vs_generated": cache.matrix(fake_paths)}
    column_sets = {"real_vs_real": [f"real {split} ({len(real_paths)})", f"real {other_split} ({len(other_paths)})"],
                   "real_vs_generated": [f"real {split} ({len(real_paths)})", f"generated ({len(fake_paths)})"]}
    reconstruction, reconstruction_example, reconstructed = None, None, {}
    if reconstruct is not None:
        # Reconstructed held-out subjects also set the memorization threshold (below), and a few
        # reconstructed training subjects show what a copy looks like after the decoder.
        copied_paths = []
        if memorization_possible:
            spread = np.unique(np.linspace(0, len(train_paths) - 1, COPY_EXAMPLES).astype(int))
            copied_paths = [train_paths[i] for i in spread]
        reconstructed = _reconstructions(reconstruct, real_paths + heldout_paths + copied_paths if memorization_possible
                                         else real_paths, progress)
        recon_features, reconstruction, reconstruction_example = _reconstruction_column(reconstructed, real_paths, backbone)
        compared = {"real_vs_reconstruction": recon_features, **compared}
        column_sets = {"real_vs_reconstruction": [f"real {split} ({len(real_paths)})", f"reconstructions ({len(real_paths)})"],
                       **column_sets}
        timings["reconstruction"] = time.perf_counter() - started - sum(timings.values())

    sample_size = n if n is not None else default_sample_size(len(real_features), *(len(f) for f in compared.values()))
    rounds = bootstrap if bootstrap is not None else DEFAULT_ROUNDS
    bandwidth = median_bandwidth(real_features)
    statistic = partial(set_metrics, nearest_k=NEAREST_K, mmd_bandwidth=bandwidth)
    columns = {}
    for name, features in compared.items():
        summary = run_bootstrap(real_features, features, statistic, n=sample_size, rounds=rounds, seed=seed,
                                progress=progress, description=f"bootstrap {name}")
        summary.pop("_settings")
        columns[name] = summary
    timings["bootstrap"] = time.perf_counter() - started - sum(timings.values())

    diversity = {
        role: pairwise_ms_ssim(VolumeFiles(paths), diversity_pairs, seed, progress=progress, description=f"MS-SSIM {role}")
        for role, paths in (("real", real_paths), ("generated", fake_paths))
    }
    diversity["settings"] = diversity["real"]["settings"]
    timings["diversity"] = time.perf_counter() - started - sum(timings.values())

    fake_names = [strip_nifti_suffix(p.name) for p in fake_paths]
    if memorization_possible:
        train_names = train_rows["subject"].astype(str).tolist()
        if reconstructed:  # smoothness-matched yardstick: held-out subjects through the generator's autoencoder
            heldout_volumes = np.stack([reconstructed[p] for p in heldout_paths])
            heldout_vectors = np.stack([masked_standardised(v, mask, smoothing) for v in heldout_volumes])
            heldout_features = np.concatenate([backbone.features(heldout_volumes[s : s + BATCH_SIZE, None])
                                               for s in range(0, len(heldout_volumes), BATCH_SIZE)])
            heldout_reference = "held-out reconstructions"
            copies = np.stack([reconstructed[p] for p in copied_paths])
            copy_vectors = np.stack([masked_standardised(v, mask, smoothing) for v in copies])
            copy_features = np.concatenate([backbone.features(copies[s : s + BATCH_SIZE, None])
                                            for s in range(0, len(copies), BATCH_SIZE)])
            decoded_copy = {  # distance of each decoded training subject to its own original
                "subjects": [train_names[train_paths.index(p)] for p in copied_paths],
                "voxel": np.diag(correlation_distance(copy_vectors, cache.vector_matrix(copied_paths))).tolist(),
                "feature": np.linalg.norm(copy_features - cache.matrix(copied_paths), axis=1).tolist()}
        else:
            heldout_vectors, heldout_features = cache.vector_matrix(heldout_paths), cache.matrix(heldout_paths)
            heldout_reference, decoded_copy = "held-out volumes", None
        # the closest-record test compares raw training with raw held-out subjects (like with like)
        voxel = find_memorized(cache.vector_matrix(fake_paths), cache.vector_matrix(train_paths), heldout_vectors,
                               fake_names, train_names, metric="correlation",
                               closest_record_heldout=cache.vector_matrix(heldout_paths))
        feature = find_memorized(cache.matrix(fake_paths), cache.matrix(train_paths), heldout_features,
                                 fake_names, train_names, metric="euclidean", closest_record_heldout=cache.matrix(heldout_paths))
        memorization = {
            "voxel": voxel, "feature": feature, "table": flagged_table(voxel, feature),
            "flagged_voxel": int(sum(voxel["flagged"])), "flagged_feature": int(sum(feature["flagged"])),
            "heldout": len(heldout_paths), "train": len(train_paths), "heldout_reference": heldout_reference,
            "decoded_copy_distance": decoded_copy,
            "chance_rate": 1.0 / (len(heldout_paths) + 1),
            "mask_voxels": int(mask.sum()), "smoothing_mm": DEFAULT_SMOOTHING_MM,
        }
    else:
        memorization = {"skipped": f"needs a non-empty 'train' split and held-out subjects; found {len(train_paths)} "
                                   f"training and {len(heldout_paths)} held-out"}
    timings["memorization"] = time.perf_counter() - started - sum(timings.values())

    fidelity = conditional_fidelity(backbone, fake_paths, sidecars, real_paths, real_rows)
    timings["conditional_fidelity"] = time.perf_counter() - started - sum(timings.values())
    anatomy = morphometric_fidelity(backbone, fake_paths, sidecars, real_paths, real_rows, other_paths, other_rows,
                                    rounds, seed)
    timings["morphometry"] = time.perf_counter() - started - sum(timings.values())

    result = {
        "mriflow_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "inputs": {"real_dir": str(real_dir), "split": split, "other_split": other_split, "fake_dir": str(fake_dir),
                   "autoencoder": autoencoder, "counts": {"real": len(real_paths), "other": len(other_paths),
                                                         "generated": len(fake_paths), "train": len(train_paths)},
                   "shape": list(shape), "affine": np.asarray(affine).tolist()},
        "backbone": {"name": backbone.name, "weights_sha256": backbone.weights_sha256,
                     "feature_dim": int(real_features.shape[1])},
        "settings": {"n": sample_size, "bootstrap_rounds": rounds, "seed": seed, "sampling": "without replacement",
                     "nearest_k": NEAREST_K, "mmd_bandwidth": bandwidth, "diversity_pairs": diversity_pairs,
                     "protocol": protocol},
        "lower_is_better": LOWER_IS_BETTER,
        "columns": columns,
        "column_sets": column_sets,
        "reconstruction": reconstruction,
        "diversity": diversity,
        "memorization": memorization,
        "conditional_fidelity": fidelity,
        "morphometry": anatomy,
        "warnings": warnings,
    }
    montage = {
        "real": [(strip_nifti_suffix(p.name), _read(p)[0]) for p in real_paths[:MONTAGE_SUBJECTS]],
        "generated": [(strip_nifti_suffix(p.name), _read(p)[0]) for p in fake_paths[:MONTAGE_SUBJECTS]],
        "reconstruction": reconstruction_example,
    }
    timings["total"] = time.perf_counter() - started
    result["timing_s"] = {k: round(v, 2) for k, v in timings.items()}
    write_report(result, out, montage)
    return result
