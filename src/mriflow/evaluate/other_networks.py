"""Fréchet distances with other feature networks, as extra rows beside the main backbone's figures.

An FD is only comparable with one computed by the same network and weights. The field reports
it with several: MAISI the 2.5D RadImageNet ResNet-50, others MedicalNet's 3D ResNets. A user who
has those weights locally adds them (`mriflow evaluate generation ... --also-backbone
radimagenet-resnet50=/path/weights.pt`), and the report gets one row per network: FD of Real vs
Real and of Real vs Generated, with the same bootstrap (n, rounds, seed) as the main figures, and
the weights' SHA-256, so a figure can be set beside a paper's. Nothing is ever downloaded.

    >>> rows = other_network_distances(sets, [("deepbet", None)], n=12, rounds=20, seed=0)
    >>> rows.record()["deepbet-linknet"]["real_vs_generated"]["mean"]
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mriflow.evaluate.backbones import get_backbone
from mriflow.evaluate.bootstrap import bootstrap
from mriflow.evaluate.metrics import frechet_distance
from mriflow.evaluate.sets import BATCH_SIZE, EvaluationSets, read_clipped


def parse_other_backbone(text: str) -> tuple[str, str | None]:
    """'NAME' or 'NAME=WEIGHTS' of --also-backbone -> (name, weights or None)."""
    name, _, weights = text.partition("=")
    if not name:
        raise ValueError(f"--also-backbone {text!r}: give NAME or NAME=WEIGHTS (e.g. radimagenet-resnet50=weights.pt)")
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"--also-backbone {text}: no such weights file {weights}; mriflow never downloads weights")
    return name, weights or None


@dataclass
class OtherNetworks:
    """metrics.json "other_networks": {backbone name: {"weights_sha256", "feature_dim", "real_vs_real",
    "real_vs_generated": {"mean", "sd"}}}."""

    rows: dict[str, dict] = field(default_factory=dict)

    def record(self) -> dict:
        return self.rows


def other_network_distances(sets: EvaluationSets, backbones: Sequence[tuple[str, str | None]], n: int, rounds: int,
                            seed: int, device: str = "cpu") -> OtherNetworks:
    """FD of Real vs Real and Real vs Generated in each named network's features (bootstrap as the main figures)."""
    result = OtherNetworks()
    for name, weights in backbones:
        backbone = get_backbone(name, weights=weights, device=device)

        def features(paths: Sequence[Path]) -> np.ndarray:
            return np.concatenate([backbone.features(np.stack([read_clipped(p)[0] for p in paths[s:s + BATCH_SIZE]])[:, None])
                                   for s in range(0, len(paths), BATCH_SIZE)])

        real = features(sets.real)
        row = {"weights_sha256": backbone.weights_sha256, "feature_dim": int(real.shape[1])}
        for column, paths in (("real_vs_real", sets.other), ("real_vs_generated", sets.generated)):
            summary = bootstrap(real, features(paths), lambda a, b: {"fd": frechet_distance(a, b)}, n=n, rounds=rounds,
                                seed=seed)["fd"]
            row[column] = {"mean": summary["mean"], "sd": summary["sd"]}
        result.rows[backbone.name] = row
    return result
