"""What the flow-vs-diffusion benchmarks share: the held-out reference and the quality of a generated set.

The reference is the real held-out volumes (val + test by default) as backbone features,
plus their covariates; a generated set copies those covariates row by row (cycling when it
is larger), so real and generated sets have the same covariate mix, and sample i always
starts from the noise stream sample_seed(seed, i), so every model and sampler is compared
on the same seeds. Quality is the bootstrap (mean ± sd over rounds of n-row draws, see
mriflow.evaluate.bootstrap) of the set metrics, with one MMD bandwidth fixed from the real
features and one n for every set of the same size, so the numbers compare across points.

    >>> reference = held_out_reference("prepared/", ("val", "test"), ["age", "sex"], get_backbone("intensity"))
    >>> features, nfe = generated_features(generator, generator.sampling_settings(), reference, count=64)
    >>> summary = set_quality(reference.features, features)   # {"fd": {"mean", "sd"}, ..., "_settings": {...}}
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from mriflow.data.dataset import read_manifest
from mriflow.data.io import load_volume
from mriflow.evaluate.bootstrap import DEFAULT_ROUNDS, bootstrap, default_sample_size
from mriflow.evaluate.metrics import median_bandwidth, set_metrics
from mriflow.utils.seeding import sample_seed
from mriflow.models.conditioning import resolve_request

REPORTED = ("fd", "kid", "precision", "recall", "density", "coverage")
NEAREST_K = 5
BATCH_SIZE = 8


@dataclass
class Reference:
    """Real held-out volumes as features (N, F) and their covariates, one request {name: value} per subject."""

    features: np.ndarray
    requests: list[dict[str, Any]]
    splits: tuple[str, ...]
    subjects: list[str]
    backbone: str


def held_out_reference(data_dir: str | Path, splits: Sequence[str], covariates: Sequence[str], backbone,
                       batch_size: int = BATCH_SIZE) -> Reference:
    """Features of every subject of `splits` in prepared folder `data_dir`, and its covariates (absent ones left out)."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    rows = manifest[manifest["split"].isin(list(splits))].reset_index(drop=True)
    if rows.empty:
        available = ", ".join(sorted(manifest["split"].dropna().unique()))
        raise ValueError(f"{data_dir}: no subjects in split(s) {', '.join(splits)}; available splits: {available}")
    missing = [name for name in covariates if name not in rows.columns]
    if missing:
        raise ValueError(f"{data_dir}/manifest.csv has no column(s) {', '.join(missing)} for --condition")
    features = []
    for first in range(0, len(rows), batch_size):
        volumes = [load_volume(data_dir / image)[0] for image in rows["image"].iloc[first:first + batch_size]]
        features.append(backbone.features(np.stack(volumes)[:, None]))  # (B, F)
    requests = [{name: _plain(row[name]) for name in covariates if not _is_missing(row[name])} for _, row in rows.iterrows()]
    return Reference(np.concatenate(features), requests, tuple(splits), [str(s) for s in rows["subject"]],
                     getattr(backbone, "name", type(backbone).__name__))


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (isinstance(value, str) and not value.strip())


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value  # JSON-ready


def covariate_mix(requests: Sequence[Mapping[str, Any]], count: int) -> list[dict[str, Any]]:
    """`count` requests copied from the held-out subjects in order, cycling: the held-out covariate mix."""
    if not requests:
        raise ValueError("no held-out subjects to copy covariates from")
    return [dict(requests[i % len(requests)]) for i in range(count)]


def condition_batch(generator, requests: Sequence[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(values (B, K), present (B, K)) of the requests under the generator's schema; None when it is unconditional.

    Values the schema cannot encode (a category never seen in training) are left absent;
    ages outside the training range are encoded as they are (the warning is not repeated per sample)."""
    schema = generator.schema
    if not schema.names:
        return None
    values, present = [], []
    for request in requests:
        known = {name: value for name, value in request.items()
                 if name in schema.names and schema[name].encode(value)[1]}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            one_values, one_present = resolve_request(schema, known)
        values.append(one_values)
        present.append(one_present)
    return torch.stack(values), torch.stack(present)


def generated_features(generator, settings: Mapping[str, Any], reference: Reference, count: int, backbone,
                       seed: int = 0, batch_size: int = BATCH_SIZE) -> tuple[np.ndarray, int]:
    """Features (count, F) of `count` samples with the reference's covariate mix, sample i from sample_seed(seed, i),
    and the NFE per sample (the largest over the batches)."""
    requests = covariate_mix(reference.requests, count)
    features, nfe = [], 0
    for first in range(0, count, batch_size):
        indices = range(first, min(count, first + batch_size))
        condition = condition_batch(generator, [requests[i] for i in indices])
        volumes, batch_nfe = generator.sample([sample_seed(seed, i) for i in indices], condition, settings)  # (B, D, H, W)
        features.append(backbone.features(volumes[:, None]))
        nfe = max(nfe, batch_nfe)  # adaptive solvers (dopri5) differ between batches
    return np.concatenate(features), nfe


def set_quality(real: np.ndarray, fake: np.ndarray, n: int | None = None, rounds: int = DEFAULT_ROUNDS,
                seed: int = 0) -> dict[str, Any]:
    """Bootstrap mean ± sd of FD, KID, MMD, precision, recall, density, coverage of `fake` against `real`.

    n defaults to default_sample_size of the two sets; the MMD bandwidth is the median heuristic on `real`."""
    statistic = partial(set_metrics, nearest_k=NEAREST_K, mmd_bandwidth=median_bandwidth(real))
    n = default_sample_size(len(real), len(fake)) if n is None else n
    summary = bootstrap(real, fake, statistic, n=n, rounds=rounds, seed=seed)
    settings = summary.pop("_settings")
    result: dict[str, Any] = {name: {"mean": value["mean"], "sd": value["sd"]} for name, value in summary.items()}
    result["_settings"] = {**settings, "nearest_k": NEAREST_K, "real": len(real), "generated": len(fake)}
    return result


def within(value: Mapping[str, float], reference: Mapping[str, float], lower_is_better: bool) -> bool:
    """Whether `value` is no worse than `reference` allowing the reference's bootstrap sd."""
    if lower_is_better:
        return value["mean"] <= reference["mean"] + reference["sd"]
    return value["mean"] >= reference["mean"] - reference["sd"]


def metric_cell(summary: Mapping[str, Any], name: str, digits: int = 3) -> str:
    """'mean ± sd' of one metric, for a markdown table."""
    return f"{summary[name]['mean']:.{digits}f} ± {summary[name]['sd']:.{digits}f}"


def plot_quality(series: Sequence[tuple[str, str, Sequence[float], Sequence[Mapping[str, Any]]]], path: Path,
                 x_label: str, title: str, log_x: bool = False) -> Path:
    """FD and coverage side by side, one error-bar line per series (label, matplotlib fmt, x values,
    set_quality summaries); error bars are the bootstrap sd. Writes `path` and returns it."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.5))
    for axis, (metric, name) in zip(figure.subplots(1, 2), (("fd", "FD (lower is better)"),
                                                          ("coverage", "coverage (higher is better)"))):
        for label, fmt, xs, summaries in series:
            axis.errorbar(list(xs), [s[metric]["mean"] for s in summaries], yerr=[s[metric]["sd"] for s in summaries],
                          fmt=fmt, capsize=3, label=label)
        if log_x:
            axis.set_xscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel(name)
        axis.legend(fontsize=7)
    figure.suptitle(f"{title} (error bars: bootstrap sd)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def add_quality_arguments(parser) -> None:
    """The options every flow-vs-diffusion comparison shares: the real reference, the feature space and the bootstrap."""
    parser.add_argument("--real-splits", default="val,test", help="held-out splits of the real reference")
    parser.add_argument("--backbone", default="intensity")
    parser.add_argument("--weights", type=Path, help="local weights file of a pretrained --backbone")
    parser.add_argument("--rounds", type=int, default=20, help="bootstrap rounds")
    parser.add_argument("--seed", type=int, default=0, help="base seed of the generated samples")
