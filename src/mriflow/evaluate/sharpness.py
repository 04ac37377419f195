"""High-frequency fidelity: is the generated brain as sharp as a real one, or blurred? (issue 24)

A generator that regresses to the mean, or decodes through an autoencoder that cannot reproduce fine detail, draws
brains whose cortex is a soft band with few sulci. Fréchet distances on network features see it only indirectly.
This section measures the detail itself, per volume, inside the brain:

    HF = mean |Δv|           the discrete Laplacian (6-neighbour), the volume's high-frequency energy
    G  = mean ‖∇v‖           the gradient magnitude (central differences), its edges

over the real split's population brain mask eroded by one voxel (so every stencil stays inside the brain, and the
same voxels are measured in every set). Each set's mean is read against the real split's: the ratio generated /
real (1 is as sharp as real brains, below 1 blurred, above 1 noisy), with the other real split's ratio as the
yardstick (Real vs Real), bootstrap mean ± sd at the evaluation's n as the set metrics are. A 1-voxel Gaussian blur
of real scans brings HF to about half (benchmarks/evaluate_sanity.py checks that the section tells them apart).

    >>> high_frequency_energy(volume, voxels), gradient_magnitude(volume, voxels)
    >>> high_frequency_fidelity(sets, reconstructions, n=12, rounds=20, seed=0).record()
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from mriflow.data.io import load_volume
from mriflow.evaluate.bootstrap import bootstrap
from mriflow.evaluate.consistency import interior
from mriflow.evaluate.memorization import population_mask
from mriflow.evaluate.sets import EvaluationSets, read_clipped

MEASURES = ("laplacian", "gradient")  # HF and G of the module docstring


def high_frequency_energy(volume: np.ndarray, voxels: np.ndarray) -> float:
    """HF: the mean absolute discrete Laplacian of `volume` over `voxels` (bool, away from the brain's edge)."""
    return float(np.abs(ndimage.laplace(np.asarray(volume, np.float64)))[voxels].mean())


def gradient_magnitude(volume: np.ndarray, voxels: np.ndarray) -> float:
    """G: the mean gradient magnitude (central differences, per voxel) of `volume` over `voxels`."""
    gradients = np.gradient(np.asarray(volume, np.float64))
    return float(np.sqrt(sum(g**2 for g in gradients))[voxels].mean())


def measure_volume(volume: np.ndarray, voxels: np.ndarray) -> dict[str, float]:
    return {"laplacian": high_frequency_energy(volume, voxels), "gradient": gradient_magnitude(volume, voxels)}


@dataclass
class HighFrequencyFidelity:
    """metrics.json "sharpness": HF and G per volume of each set, and each set's mean as a ratio to the real split's
    (bootstrap), with the settings."""

    mask_voxels: int
    values: dict[str, dict[str, list[float]]]  # set -> measure -> per volume
    # set -> measure -> {"mean", "sd" (bootstrap of the set's mean), "ratio": {"mean", "sd"} of set mean / real mean}
    sets: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"mask_voxels": self.mask_voxels, "sets": self.sets, "values": self.values, "settings": self.settings}


def high_frequency_fidelity(sets: EvaluationSets, reconstructions, n: int, rounds: int, seed: int
                            ) -> HighFrequencyFidelity:
    """HF and G of every real, other real, generated and (with `reconstructions`) reconstructed volume, and each
    set's mean over the real split's: bootstrap over `rounds` draws of n volumes per set without replacement (n
    capped by the set sizes), seeded by `seed`."""
    voxels = interior(population_mask(load_volume(sets.real_dir / p)[0] for p in sets.real_rows["mask"]))
    if not voxels.any():
        raise ValueError("the real split's brain mask has no interior voxels to measure sharpness in")

    def measured(volumes) -> dict[str, list[float]]:
        rows = [measure_volume(v, voxels) for v in volumes]
        return {m: [row[m] for row in rows] for m in MEASURES}

    values = {"real": measured(read_clipped(p)[0] for p in sets.real),
              "other": measured(read_clipped(p)[0] for p in sets.other),
              "generated": measured(read_clipped(p)[0] for p in sets.generated)}
    if reconstructions is not None:
        values["reconstruction"] = measured(reconstructions.volumes[p] for p in sets.real)
    result = HighFrequencyFidelity(int(voxels.sum()), values)
    real = np.column_stack([values["real"][m] for m in MEASURES])  # (N, 2)
    for name in ("other", "generated", "reconstruction"):
        if name not in values or len(real) < 2 or len(values[name][MEASURES[0]]) < 2:
            continue
        other = np.column_stack([values[name][m] for m in MEASURES])
        drawn = bootstrap(real, other, _ratios, n=min(n, len(real), len(other)), rounds=rounds, seed=seed)
        result.sets[name] = {m: {"mean": drawn[f"{m}_set"]["mean"], "sd": drawn[f"{m}_set"]["sd"],
                                 "ratio": {k: drawn[f"{m}_ratio"][k] for k in ("mean", "sd")}} for m in MEASURES}
        if name == "other":
            result.sets = {"real": {m: {k: drawn[f"{m}_real"][k] for k in ("mean", "sd")} for m in MEASURES},
                           **result.sets}
    result.settings = {"n": n, "rounds": rounds, "seed": seed, "sampling": "without replacement",
                       "mask": "population brain mask of the real split (voxels in half of its masks), eroded by one voxel",
                       "laplacian": "mean |6-neighbour discrete Laplacian| (scipy.ndimage.laplace)",
                       "gradient": "mean gradient magnitude, central differences (numpy.gradient)"}
    return result


def _ratios(real: np.ndarray, other: np.ndarray) -> dict[str, float]:
    out = {}
    for k, m in enumerate(MEASURES):
        out[f"{m}_real"], out[f"{m}_set"] = float(real[:, k].mean()), float(other[:, k].mean())
        out[f"{m}_ratio"] = out[f"{m}_set"] / out[f"{m}_real"]
    return out
