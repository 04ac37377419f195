"""Morphometric fidelity: do generated brains have the tissue volumes real brains have?

Image-level metrics on one embedding say little about anatomy (WASABI, arXiv 2504.21771, compares
region-volume distributions and finds them more sensitive). From the anatomy network's
segmentation of every volume (CSF, ventricles, grey and white matter, brainstem, total brain; in
template space, so head-size normalised), per region:

    W1        Wasserstein-1 distance between the real and the generated volumes (ml), with its
              bootstrap sd, next to the same between two real sets (Real vs Real: the yardstick)
    d         Cohen's effect size (mean_generated − mean_real) / pooled sd
and over all regions together the Fréchet distance of the volume vectors (standardised with the
real set's mean and sd), again next to Real vs Real.

    >>> morphometry(real_ml, other_ml, generated_ml)   # {region: (N,) ml} each, from AnatomyBackbone.predict
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
from scipy.stats import wasserstein_distance

from mriflow.evaluate.metrics import frechet_distance

ROUNDS = 20


def cohens_d(a: np.ndarray, b: np.ndarray) -> float:
    """(mean a − mean b) / pooled sd; 0 when both sets are constant."""
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / max(len(a) + len(b) - 2, 1))
    return float((a.mean() - b.mean()) / pooled) if pooled > 0 else 0.0


def _bootstrap(statistic, a: np.ndarray, b: np.ndarray, rounds: int, rng: np.random.Generator) -> dict[str, float]:
    """The statistic on the sets as they are, and its sd over resamples of both sets with replacement."""
    values = [statistic(a[rng.integers(0, len(a), len(a))], b[rng.integers(0, len(b), len(b))]) for _ in range(rounds)]
    return {"value": float(statistic(a, b)), "sd": float(np.std(values))}


def morphometry(real: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray], generated: Mapping[str, np.ndarray],
                rounds: int = ROUNDS, seed: int = 0) -> dict:
    """Per-region W1 and effect size, and the multivariate Fréchet distance, of generated (and of the other real
    set, the yardstick) against the real set; each argument maps a region name to (N,) volumes in ml."""
    regions = [name for name in real if name in generated and name in other]
    if not regions:
        raise ValueError("morphometry needs the same regions in the real, other and generated volumes")
    rng = np.random.default_rng(seed)
    per_region = {}
    for name in regions:
        r, o, g = (np.asarray(s[name], np.float64) for s in (real, other, generated))
        per_region[name] = {
            "real_mean_ml": float(r.mean()), "generated_mean_ml": float(g.mean()),
            "w1_generated": _bootstrap(wasserstein_distance, r, g, rounds, rng),
            "w1_real_vs_real": _bootstrap(wasserstein_distance, r, o, rounds, rng),
            "effect_size_generated": cohens_d(g, r), "effect_size_real_vs_real": cohens_d(o, r)}
    mean = np.stack([np.asarray(real[n], np.float64) for n in regions], 1).mean(0)
    sd = np.stack([np.asarray(real[n], np.float64) for n in regions], 1).std(0) + 1e-9

    def standardised(volumes: Mapping[str, np.ndarray]) -> np.ndarray:
        return (np.stack([np.asarray(volumes[n], np.float64) for n in regions], 1) - mean) / sd

    return {"regions": per_region,
            "frechet_generated": _bootstrap(frechet_distance, standardised(real), standardised(generated), rounds, rng),
            "frechet_real_vs_real": _bootstrap(frechet_distance, standardised(real), standardised(other), rounds, rng),
            "counts": {"real": len(real[regions[0]]), "other": len(other[regions[0]]), "generated": len(generated[regions[0]])},
            "settings": {"rounds": rounds, "seed": seed, "space": "template (head-size normalised)"}}
