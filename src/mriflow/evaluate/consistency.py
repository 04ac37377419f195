"""Inter-slice consistency: do neighbouring slices agree the way they do in real brains? (the weakness of 2D models)

A model that draws a volume slice by slice (mriflow.families.slices) ties neighbouring slices only
through their position, so each slice carries its own small errors and the volume shows seams across
the slice axis: sagittal and coronal views look striped. The measure compares the roughness along the
slice axis with the roughness in the slice's plane, inside the brain:

    E_a = mean over brain voxels of (v[k+1] − 2·v[k] + v[k−1])²  along axis a   (the squared second difference)
    R   = E_slice / ((E_in-plane,1 + E_in-plane,2) / 2)

Slices that disagree with their neighbours add to E_slice alone, so R grows; a 3D model's smoothing
(a decoder's blur) lowers every E_a alike and leaves R near its real value; white noise gives R = 1.
The second difference ignores smooth gradients (bias fields, the slow change of anatomy). Real brains
on the isotropic template grid give a stable R that is not exactly 1 (anatomy is not isotropic), so R
is read against the real data: each set's mean R next to the real split's, and the other real split's
difference from it as the yardstick (Real vs Real), bootstrap mean ± sd at the evaluation's n as the
set metrics are. The brain is the population mask of the real split's brain masks, eroded by one voxel
so that each second difference stays inside it. The slice axis is the last one, axial (S-I) on
mriflow's RAS template grid: the axis the slice model draws along.

    >>> second_difference_ratio(volume, brain)                      # one volume, (X, Y, Z)
    >>> inter_slice_consistency(sets, reconstructions, n=12, rounds=20, seed=0).record()
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from mriflow.data.io import load_volume
from mriflow.evaluate.bootstrap import bootstrap
from mriflow.evaluate.memorization import population_mask
from mriflow.evaluate.sets import EvaluationSets, read_clipped

SLICE_AXIS = 2  # axial (S-I) on the RAS template grid: the slice model's slices are volume[:, :, k]


def interior(mask: np.ndarray) -> np.ndarray:
    """The voxels of `mask` whose six face neighbours are in it too (one voxel of erosion; the volume's border is out)."""
    return ndimage.binary_erosion(mask > 0, structure=ndimage.generate_binary_structure(3, 1), border_value=0)


def second_difference_energy(volume: np.ndarray, voxels: np.ndarray, axis: int) -> float:
    """E_a: the mean of (v[k+1] − 2·v[k] + v[k−1])² along `axis` over `voxels` (bool, centres away from the border)."""
    second = np.diff(np.asarray(volume, np.float64), n=2, axis=axis)
    pad = [(1, 1) if a == axis else (0, 0) for a in range(volume.ndim)]
    return float(np.mean(np.pad(second, pad)[voxels] ** 2))


def second_difference_ratio(volume: np.ndarray, brain: np.ndarray, axis: int = SLICE_AXIS,
                            voxels: np.ndarray | None = None) -> float:
    """R = E_axis / mean of E over the two other axes, inside `brain` (see the module docstring); NaN for a volume
    flat inside the brain. `voxels` (the eroded brain) may be passed to skip the erosion."""
    voxels = interior(brain) if voxels is None else voxels
    if not voxels.any():
        raise ValueError("the brain mask has no interior voxels to measure the inter-slice consistency in")
    energies = [second_difference_energy(volume, voxels, a) for a in range(3)]
    in_plane = np.mean([e for a, e in enumerate(energies) if a != axis % 3])
    return energies[axis % 3] / in_plane if in_plane > 0 else math.nan


@dataclass
class SliceConsistency:
    """metrics.json "slice_consistency": R per volume of each set, each set's mean and its difference from the real
    split's (bootstrap), and the settings."""

    axis: int
    mask_voxels: int
    ratios: dict[str, list[float]]  # "real" | "other" | "generated" | "reconstruction" -> R per volume (NaN: flat)
    # -> {"mean", "sd", "volume_sd", "count", "flat"} and but for "real" "difference": {"mean", "sd"} of mean R − real's
    sets: dict[str, dict] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {"axis": self.axis, "axis_name": "axial (S-I)" if self.axis == SLICE_AXIS else f"axis {self.axis}",
                "mask_voxels": self.mask_voxels, "sets": self.sets, "values": self.ratios, "settings": self.settings}


def inter_slice_consistency(sets: EvaluationSets, reconstructions, n: int, rounds: int, seed: int,
                            axis: int = SLICE_AXIS) -> SliceConsistency:
    """R of every real, other real, generated and (with `reconstructions`, evaluate.generation.Reconstructions)
    reconstructed volume, and each set's mean against the real split's: bootstrap over `rounds` draws of n volumes
    per set without replacement (n capped by the set sizes), seeded by `seed`."""
    brain = population_mask(load_volume(sets.real_dir / p)[0] for p in sets.real_rows["mask"])
    voxels = interior(brain)

    def ratios(volumes) -> list[float]:
        return [second_difference_ratio(v, brain, axis, voxels) for v in volumes]

    measured = {"real": ratios(read_clipped(p)[0] for p in sets.real),
                "other": ratios(read_clipped(p)[0] for p in sets.other),
                "generated": ratios(read_clipped(p)[0] for p in sets.generated)}
    if reconstructions is not None:
        measured["reconstruction"] = ratios(reconstructions.volumes[p] for p in sets.real)
    result = SliceConsistency(axis, int(voxels.sum()), measured)
    real = _finite(measured["real"])
    for name, values in measured.items():
        values = _finite(values)
        if name == "real" or len(real) < 2 or len(values) < 2:
            continue
        drawn = bootstrap(real[:, None], values[:, None], _means, n=min(n, len(real), len(values)), rounds=rounds,
                          seed=seed)
        result.sets[name] = {**_mean_sd(drawn["set"]), **_spread(values, measured[name]),
                             "difference": _mean_sd(drawn["difference"])}
        if name == "other":  # the real split's own mean, from the Real vs Real draws
            result.sets = {"real": {**_mean_sd(drawn["real"]), **_spread(real, measured["real"])}, **result.sets}
    result.settings = {"n": n, "rounds": rounds, "seed": seed, "sampling": "without replacement",
                       "mask": "population brain mask of the real split (voxels in half of its masks), eroded by one voxel"}
    return result


def _means(real: np.ndarray, other: np.ndarray) -> dict[str, float]:
    return {"real": float(real.mean()), "set": float(other.mean()), "difference": float(other.mean() - real.mean())}


def _finite(values: Sequence[float]) -> np.ndarray:
    values = np.asarray(values, np.float64)
    return values[np.isfinite(values)]


def _mean_sd(summary: dict) -> dict:
    return {"mean": summary["mean"], "sd": summary["sd"]}


def _spread(finite: np.ndarray, values: Sequence[float]) -> dict:
    """Per-volume sd, and how many volumes were measured (and how many were flat inside the brain: NaN)."""
    return {"volume_sd": float(np.std(finite, ddof=1)), "count": int(len(finite)), "flat": len(values) - int(len(finite))}
