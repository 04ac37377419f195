"""What the anatomy network reads in the volumes: conditional fidelity and tissue volumes.

The network (the backbone itself when it predicts, else the shipped anatomy network of the grid)
runs once over the real, the other real and the generated volumes (:func:`predict_anatomy`); both
measures read those predictions:

  conditional fidelity    does a generated volume show the age, sex and volumes it was asked for?
                          (requested vs predicted, next to true vs predicted on real scans)
  morphometric fidelity   do generated brains have the tissue volumes real brains have?
                          (mriflow.evaluate.morphometry, next to Real vs Real)

    >>> predictions = predict_anatomy(backbone, sets)
    >>> conditional_fidelity(predictions, sets).record()["age"]["generated"]["mae"]
    >>> morphometric_fidelity(predictions, sets, rounds=20, seed=0).record()["frechet_generated"]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from mriflow.evaluate.backbones import Backbone, PredictiveBackbone, get_backbone, shipped_anatomy_weights
from mriflow.evaluate.feature_store import FeatureStore
from mriflow.evaluate.morphometry import morphometry
from mriflow.evaluate.sets import BATCH_SIZE, EvaluationSets, read_clipped, sidecar_record

VOLUME_COVARIATES = {"ventricles_ml": "ventricles", "total_brain_ml": "total_brain"}  # measurement -> covariate


def anatomy_predictor(backbone: Backbone | None, shape: tuple[int, ...]) -> tuple[PredictiveBackbone | None, str | None]:
    """The backbone itself if it predicts, else the shipped anatomy network trained on volumes of `shape`;
    (None, why not) when there is none."""
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


@dataclass
class AnatomyPredictions:
    """The predictor's outputs per set ({"age", "sex_prob", "<region>_ml", ...: (N,)}), or why there are none."""

    predictor: PredictiveBackbone | None
    unavailable: str | None = None  # the reason there is no predictor
    real: dict[str, np.ndarray] = field(default_factory=dict)
    other: dict[str, np.ndarray] = field(default_factory=dict)
    generated: dict[str, np.ndarray] = field(default_factory=dict)


def predict_anatomy(backbone: Backbone, sets: EvaluationSets) -> AnatomyPredictions:
    """Run the anatomy predictor once over the real, other real and generated volumes (the real volumes' predictions
    kept in the feature store between evaluations, evaluate/feature_store.py)."""
    predictor, reason = anatomy_predictor(backbone, sets.shape)
    if predictor is None:
        return AnatomyPredictions(None, reason)
    store = FeatureStore.for_network("anatomy predictions", predictor)
    return AnatomyPredictions(predictor, None, _predict(predictor, sets.real, store), _predict(predictor, sets.other, store),
                              _predict(predictor, sets.generated))


def _predict(predictor: PredictiveBackbone, paths: Sequence[Path], store: FeatureStore | None = None) -> dict[str, np.ndarray]:
    """{name: (N,) values} of the predictor over `paths`; with a store, each volume's record (a structured scalar of
    its named values) is read from it where kept, and the rest computed and kept."""
    records: dict[Path, np.ndarray] = {}
    if store is not None:
        records = {p: r for p in paths if (r := store.get(p)) is not None and r.dtype.names}
    todo = [p for p in paths if p not in records]
    for start in range(0, len(todo), BATCH_SIZE):
        batch = todo[start : start + BATCH_SIZE]
        values = {name: np.asarray(v, np.float64) for name, v in
                  predictor.predict(np.stack([read_clipped(p)[0] for p in batch])[:, None]).items()}
        for i, path in enumerate(batch):
            record = np.zeros((), dtype=[(name, np.float64) for name in values])
            for name, v in values.items():
                record[name] = v[i]
            records[path] = record
            if store is not None:
                store.put(path, record)
    if not paths:
        return {}
    names = records[paths[0]].dtype.names
    return {name: np.array([float(records[p][name]) for p in paths], np.float64) for name in names}


@dataclass
class ConditionalFidelity:
    """metrics.json "conditional_fidelity": agreement of requested (generated) and true (real) covariates with the
    predictions; each part None or absent when not measured."""

    skipped: str | None = None
    predictor: str | None = None
    predictor_weights_sha256: str | None = None
    age: dict | None = None  # {"generated", "real"}: MAE, Pearson r, count, target, predicted
    sex: dict | None = None  # {"generated", "real"}: accuracy, count
    volumes: dict[str, dict] = field(default_factory=dict)  # "ventricles_ml" -> {"generated", "real": mean ± sd, ...}

    def record(self) -> dict:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        parts = {"age": self.age, "sex": self.sex}
        return {"predictor": self.predictor, "predictor_weights_sha256": self.predictor_weights_sha256,
                **{name: part for name, part in parts.items() if part is not None}, **self.volumes}


def conditional_fidelity(predictions: AnatomyPredictions, sets: EvaluationSets) -> ConditionalFidelity:
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
    requested, real_rows = pd.DataFrame(list(sets.sidecars)), sets.real_rows
    if requested.empty or not {"age", "sex"} & set(requested.columns):
        return ConditionalFidelity("the generated volumes carry no age or sex in JSON sidecars (x.nii.gz -> x.json)")
    if predictions.predictor is None:
        return ConditionalFidelity(f"no anatomy predictor with age/sex heads: {predictions.unavailable}")
    predictor, on_generated, on_real = predictions.predictor, predictions.generated, predictions.real
    result = ConditionalFidelity(None, getattr(predictor, "name", "anatomy"), getattr(predictor, "weights_sha256", None))
    missing = pd.Series([math.nan] * len(real_rows))
    if "age" in requested.columns and "age" in on_generated:
        result.age = {
            "generated": _age_agreement(_numbers(requested["age"]), on_generated["age"]),
            "real": _age_agreement(_numbers(real_rows["age"] if "age" in real_rows else missing), on_real["age"]),
        }
    if "sex" in requested.columns and "sex_prob" in on_generated:
        categories = tuple(getattr(predictor, "sex_categories", ("F", "M")))
        result.sex = {
            "generated": _sex_agreement(requested["sex"].tolist(), on_generated["sex_prob"], categories),
            "real": _sex_agreement(real_rows["sex"].tolist(), on_real["sex_prob"], categories) if "sex" in real_rows else None,
        }
    for volume, covariate in VOLUME_COVARIATES.items():
        if volume not in on_generated:
            continue
        result.volumes[volume] = {"generated": _mean_sd(on_generated[volume]), "real": _mean_sd(on_real[volume])}
        if covariate in requested.columns:
            result.volumes[volume]["requested_vs_measured"] = {
                "covariate": covariate,
                "generated": _correlation(_numbers(requested[covariate]), on_generated[volume]),
                "real": _correlation(_numbers(real_rows[covariate] if covariate in real_rows else missing), on_real[volume])}
    return result


@dataclass
class MorphometricFidelity:
    """metrics.json "morphometry": mriflow.evaluate.morphometry's measures and the volume-against-age curves."""

    skipped: str | None = None
    measures: dict = field(default_factory=dict)  # regions, frechet_*, counts, settings
    curves: dict = field(default_factory=dict)  # "real" | "other" | "generated" -> {"age": [...], region: [...] ml}

    def record(self) -> dict:
        return {"skipped": self.skipped} if self.skipped is not None else {**self.measures, "curves": self.curves}


def morphometric_fidelity(predictions: AnatomyPredictions, sets: EvaluationSets, rounds: int, seed: int) -> MorphometricFidelity:
    """Tissue and region volumes of real, other-real and generated volumes from the anatomy network's segmentation
    (mriflow.evaluate.morphometry), with each subject's age (true, or requested for generated) for the curves."""
    if predictions.predictor is None:
        return MorphometricFidelity(f"no anatomy network to segment the volumes: {predictions.unavailable}")
    ages = {"real": sets.real_rows.get("age"), "other": sets.other_rows.get("age"),
            "generated": pd.DataFrame(list(sets.sidecars)).get("age")}
    volumes, curves = {}, {}
    for name in ("real", "other", "generated"):
        predicted = getattr(predictions, name)
        volumes[name] = {k[:-3]: v for k, v in predicted.items() if k.endswith("_ml")}
        count = len(getattr(sets, name))
        age = _numbers(ages[name]).tolist() if ages[name] is not None else [math.nan] * count
        curves[name] = {"age": age, **{k: v.tolist() for k, v in volumes[name].items()}}
    return MorphometricFidelity(None, morphometry(volumes["real"], volumes["other"], volumes["generated"],
                                                  rounds=rounds, seed=seed), curves)


def _numbers(values: pd.Series) -> np.ndarray:
    """A column as float64, NaN where a value is not a number."""
    return pd.to_numeric(values, errors="coerce").to_numpy(float)


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


def _correlation(target: np.ndarray, measured: np.ndarray) -> dict | None:
    """Pearson r between target and measured values where both exist (None below 3 pairs)."""
    keep = np.isfinite(target) & np.isfinite(measured)
    if keep.sum() < 3 or target[keep].std() == 0 or measured[keep].std() == 0:
        return None
    return {"pearson_r": float(np.corrcoef(target[keep], measured[keep])[0, 1]), "count": int(keep.sum())}


@dataclass
class LabelFidelity:
    """Dice of label maps against the anatomy network's segmentation of their own images, per foreground class:
    the generated volumes' delivered maps (sample_XXXXX_labels.nii.gz) and, as the yardstick, the real scans'
    prepared label maps. (N, K - 1) arrays; `skipped` says why there are none."""

    skipped: str | None = None
    classes: tuple[str, ...] = ()
    generated: np.ndarray | None = None
    real: np.ndarray | None = None

    def record(self) -> dict:
        if self.skipped is not None:
            return {"skipped": self.skipped}
        from mriflow.evaluate.utility import bootstrap

        def summary(scores: np.ndarray) -> dict:
            return {"mean_dice": bootstrap(scores), "dice": {c: float(scores[:, k].mean()) for k, c in enumerate(self.classes)},
                    "count": int(len(scores))}

        return {"classes": list(self.classes), "generated": summary(self.generated),
                "real": summary(self.real) if self.real is not None else None}


def label_fidelity(predictions: AnatomyPredictions, sets: EvaluationSets) -> LabelFidelity:
    """How well the label maps delivered with generated volumes match the volumes, next to real scans."""
    import torch

    from mriflow.data.io import load_volume
    from mriflow.data.labels import dice_scores, tissue_lookup, tissue_map
    from mriflow.generate_io import labels_name

    label_files = [p.with_name(labels_name(name)) for p, name in zip(sets.generated, sets.generated_names)]
    if not any(f.is_file() for f in label_files):
        return LabelFidelity("the generated volumes have no label maps (generate with a label decoder or --labels anatomy)")
    missing = [f.name for f in label_files if not f.is_file()]
    if missing:
        return LabelFidelity(f"{len(missing)} generated volumes have no label map (e.g. {missing[0]})")
    if any(sidecar_record(p).get("labels_source") == "anatomy" for p in sets.generated):
        return LabelFidelity("the label maps are the anatomy network's own segmentation of each volume (labels_source "
                             "anatomy): they agree with it by construction, so there is nothing to measure")
    predictor = predictions.predictor
    if predictor is None or not hasattr(predictor, "segment"):
        return LabelFidelity(predictions.unavailable or "the predictor does not segment")
    classes = tuple(predictor.config.classes)

    def segmented(paths: Sequence[Path]) -> torch.Tensor:
        return torch.cat([predictor.segment(np.stack([read_clipped(p)[0] for p in paths[i:i + BATCH_SIZE]])[:, None])
                          for i in range(0, len(paths), BATCH_SIZE)]).long()

    delivered = torch.from_numpy(np.stack([np.rint(load_volume(f)[0]).astype(np.int64) for f in label_files]))
    generated = dice_scores(segmented(sets.generated), delivered, len(classes))
    real = None
    if "labels" in sets.real_rows and sets.real_rows["labels"].notna().all() and predictor.config.label_map:
        lookup = tissue_lookup(predictor.config.label_map)
        try:
            truth = torch.from_numpy(np.stack([tissue_map(load_volume(sets.real_dir / f)[0], lookup).astype(np.int64)
                                               for f in sets.real_rows["labels"]]))
            real = dice_scores(segmented(sets.real), truth, len(classes))
        except ValueError:  # labels the network's map does not know: no yardstick, the generated figure stands
            real = None
    return LabelFidelity(None, classes[1:], generated, real)
