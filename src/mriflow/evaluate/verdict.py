"""The report's verdict: one row per aspect, the generated figure against its real-data yardstick, and a plain reading.

Within two (combined) bootstrap sds of the yardstick reads as "like real data". Split from
mriflow.evaluate.report (which opens with this table) to keep each module to one concern.

    >>> rows = verdict(result)      # [[aspect, generated, yardstick, reading], ...]
"""

from __future__ import annotations

import math

import numpy as np

from mriflow.evaluate.figures import METRIC_TITLES


def number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.2e}"


def mean_sd(summary: dict) -> str:
    return f"{number(summary['mean'])} ± {number(summary['sd'])}"


def _within(generated: dict, yardstick: dict, lower_is_better: bool = True) -> bool:
    """Whether a bootstrap mean is no worse than the yardstick's mean plus two (combined) sds."""
    margin = 2 * np.hypot(generated.get("sd", 0.0), yardstick.get("sd", 0.0))
    if lower_is_better:
        return generated["mean"] <= yardstick["mean"] + margin
    return generated["mean"] >= yardstick["mean"] - margin


UNRESOLVED_RATIO = 2.0  # a distance this many times its yardstick is not "like real data", even within the noise


def _alike(generated: float, yardstick: float, alike: str) -> str:
    """The reading of a distance within two sds of its yardstick: `alike`, unless its mean is over UNRESOLVED_RATIO
    times the yardstick's, which the bootstrap at this n cannot tell apart but should not be read as a match."""
    if yardstick > 0 and generated > UNRESOLVED_RATIO * yardstick:
        return f"not told apart at this n, though {generated / yardstick:.1f} x the yardstick (more volumes would tell)"
    return alike


UNRESOLVED_SHARE = 0.9  # a share (coverage, recall) below this fraction of its yardstick is not "like real data" either


def _alike_share(generated: float, yardstick: float, alike: str) -> str:
    """The reading of a share (higher is better) within two sds of its yardstick: `alike`, unless its mean is under
    UNRESOLVED_SHARE times the yardstick's: the relative rule of `_alike` for the PRDC rows."""
    if yardstick > 0 and generated < UNRESOLVED_SHARE * yardstick:
        return f"not told apart at this n, though {generated / yardstick:.2f} x the yardstick (more volumes would tell)"
    return alike


def verdict(result: dict) -> list[list[str]]:
    """One row per aspect (fidelity, diversity, inter-slice consistency, sharpness, privacy, conditioning, anatomy): the generated
    figure, its Real vs
    Real (or real-data) yardstick, and a plain reading. Within two sds of the yardstick reads as 'like real data'."""
    rows = []
    generated, real = result["columns"].get("real_vs_generated"), result["columns"].get("real_vs_real")
    if generated and real:
        for metric, lower in (("fd", True), ("coverage", False)):
            if not _within(generated[metric], real[metric], lower):
                reading = ("further from real data than real data is from itself" if lower
                           else "covers less of the real data than real data does")
            elif lower:
                reading = _alike(generated[metric]["mean"], real[metric]["mean"], "like real data")
            else:
                reading = _alike_share(generated[metric]["mean"], real[metric]["mean"], "like real data")
            rows.append([f"fidelity: {METRIC_TITLES.get(metric, metric)}", mean_sd(generated[metric]), mean_sd(real[metric]),
                         reading])
    diversity = result["diversity"]
    gap = diversity["generated"]["mean"] - diversity["real"]["mean"]
    rows.append(["diversity: MS-SSIM between volumes", f"{diversity['generated']['mean']:.3f}", f"{diversity['real']['mean']:.3f}",
                 "as diverse as real data" if abs(gap) <= 0.02 else
                 ("too alike (less diverse than real data)" if gap > 0 else "more varied than real data")])
    slices = result.get("slice_consistency", {}).get("sets", {})  # reports before it have none
    if "generated" in slices and "other" in slices:
        g, r = slices["generated"]["difference"], slices["other"]["difference"]
        ok = abs(g["mean"]) <= abs(r["mean"]) + 2 * np.hypot(g["sd"], r["sd"])
        rows.append(["inter-slice consistency: R (roughness across / within slices) minus the real split's",
                     f"{g['mean']:+.3f} ± {g['sd']:.3f}",
                     f"{r['mean']:+.3f} ± {r['sd']:.3f}", "slices agree like real brains" if ok else
                     ("seams between slices (rougher across slices than real brains)" if g["mean"] > 0
                      else "smoother across slices than real brains")])
    sharpness = result.get("sharpness", {}).get("sets", {})  # reports before it have none
    if "generated" in sharpness and "other" in sharpness:
        g, r = sharpness["generated"]["laplacian"]["ratio"], sharpness["other"]["laplacian"]["ratio"]
        margin = 2 * np.hypot(g["sd"], r["sd"])
        alike = abs(g["mean"] - r["mean"]) <= margin and 0.9 <= g["mean"] <= 1.1
        rows.append(["sharpness: high-frequency energy (mean |Laplacian| in the brain), set / real", mean_sd(g),
                     f"{mean_sd(r)} (other real split)", "as sharp as real brains" if alike else
                     ("blurred: less fine detail than real brains" if g["mean"] < r["mean"]
                      else "more high-frequency energy than real brains (noise or artefacts)")])
    memorization = result["memorization"]
    if "voxel" in memorization:
        flagged, count = memorization["flagged_voxel"], len(memorization["voxel"]["flagged"])
        closest = memorization["voxel"]["closest_record"]
        rows.append(["privacy: near copies of training subjects (voxel space)", f"{flagged} of {count}",
                     f"chance about {memorization['chance_rate']:.0%}",
                     "no sign of copying" if flagged <= int(np.ceil(memorization["chance_rate"] * count)) else
                     "copies found: see Memorization"])
        rows.append(["privacy: closest real subject is a training one", f"{closest['share_closer_to_training']:.0%}",
                     f"{closest['expected_without_memorization']:.0%} without memorization",
                     "consistent with no memorization" if closest["p_value"] >= 0.05 else
                     ("leans to the training subjects" if closest["share_closer_to_training"] >
                      closest["expected_without_memorization"] else "leans to the held-out subjects")])
    fidelity = result["conditional_fidelity"]
    if fidelity.get("age") and fidelity["age"].get("generated") and fidelity["age"].get("real"):
        g, r = fidelity["age"]["generated"], fidelity["age"]["real"]
        rows.append(["conditioning: age MAE (requested vs predicted)", f"{g['mae']:.1f} y", f"{r['mae']:.1f} y on real scans",
                     "follows the requested age" if g["mae"] <= 1.25 * r["mae"] else "misses the requested age"])
    if fidelity.get("sex") and fidelity["sex"].get("generated") and fidelity["sex"].get("real"):
        g, r = fidelity["sex"]["generated"], fidelity["sex"]["real"]
        rows.append(["conditioning: sex accuracy", f"{g['accuracy']:.2f}", f"{r['accuracy']:.2f} on real scans",
                     "follows the requested sex" if g["accuracy"] >= r["accuracy"] - 0.1 else "misses the requested sex"])
    morphometry = result.get("morphometry", {})
    if "regions" in morphometry:
        fd, yard = morphometry["frechet_generated"], morphometry["frechet_real_vs_real"]
        worst = max(morphometry["regions"], key=lambda k: abs(morphometry["regions"][k]["effect_size_generated"]))
        ok = _within({"mean": fd["value"], "sd": fd["sd"]}, {"mean": yard["value"], "sd": yard["sd"]})
        rows.append(["anatomy: tissue volumes (Fréchet distance, all regions)", f"{fd['value']:.2f} ± {fd['sd']:.2f}",
                     f"{yard['value']:.2f} ± {yard['sd']:.2f}",
                     _alike(fd["value"], yard["value"], "volumes like real brains") if ok else f"volumes unlike real brains, most in {worst.replace('_', ' ')} "
                     f"(d = {morphometry['regions'][worst]['effect_size_generated']:+.1f})"])
    return rows
