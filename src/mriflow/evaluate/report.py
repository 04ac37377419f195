"""The evaluation report: report.md, a self-contained report.html (pictures inlined as base64 PNG) and metrics.json.

The report is rendered from the result dictionary alone (plus a few volumes for
the montage), so it can be rebuilt from metrics.json. Both documents come from one
list of blocks, so they always say the same thing.

    >>> write_report(result, "report/", montage={"real": [(name, volume)], "generated": [...]})
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLUMN_TITLES = {"real_vs_reconstruction": "Real vs Reconstruction", "real_vs_real": "Real vs Real",
                 "real_vs_generated": "Real vs Generated"}
METRIC_TITLES = {"fd": "FD", "kid": "KID", "mmd": "MMD²", "precision": "precision", "recall": "recall",
                 "density": "density", "coverage": "coverage"}
COLUMN_COLOURS = {"real_vs_reconstruction": "tab:green", "real_vs_real": "tab:blue", "real_vs_generated": "tab:red"}


def _number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return f"{value:.2e}"


def _mean_sd(summary: dict) -> str:
    return f"{_number(summary['mean'])} ± {_number(summary['sd'])}"


# ----------------------------------------------------------------------------- pictures


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _planes(volume: np.ndarray) -> list[np.ndarray]:
    """Mid axial, coronal and sagittal slices of a RAS volume, oriented for display (superior/anterior up)."""
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[:, :, z].T, volume[:, y, :].T, volume[x, :, :].T]


def montage_figure(montage: dict) -> bytes:
    """Rows of subjects; real volumes on the left three panels, generated on the right three."""
    left, right = montage.get("real", []), montage.get("generated", [])
    rows = [(left[i] if i < len(left) else None, right[i] if i < len(right) else None)
            for i in range(max(len(left), len(right)))]
    titles = ("real", "generated")
    if montage.get("reconstruction") is not None:
        original, reconstructed = montage["reconstruction"]
        rows.append((("original", original), ("reconstruction", reconstructed)))
    figure, axes = plt.subplots(len(rows), 6, figsize=(12, 2.1 * len(rows)), squeeze=False, layout="constrained")
    for row, pair in enumerate(rows):
        for side, item in enumerate(pair):
            images = _planes(item[1]) if item is not None else [None] * 3
            for plane, image in enumerate(images):
                axis = axes[row, 3 * side + plane]
                axis.set_xticks([])
                axis.set_yticks([])
                if image is None:
                    axis.axis("off")
                    continue
                axis.imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
                if row == 0:
                    axis.set_title(f"{titles[side]}: {('axial', 'coronal', 'sagittal')[plane]}", fontsize=9,
                                   color="tab:red" if side else "black")
                if plane == 0:
                    axis.set_ylabel(item[0], fontsize=8)
    figure.suptitle("Mid slices: real (left) and generated (right)"
                    + ("; last row: a real volume and its reconstruction" if montage.get("reconstruction") is not None else ""),
                    fontsize=10)
    return _png(figure)


def bootstrap_figure(result: dict) -> bytes:
    metrics = list(METRIC_TITLES)
    columns = list(result["columns"])
    figure, axes = plt.subplots(1, len(metrics), figsize=(2.2 * len(metrics), 3.0))
    for axis, metric in zip(axes, metrics):
        for position, column in enumerate(columns):
            values = np.asarray(result["columns"][column][metric]["values"])
            jitter = np.random.default_rng(position).uniform(-0.15, 0.15, len(values))
            axis.scatter(position + jitter, values, s=8, alpha=0.6, color=COLUMN_COLOURS.get(column, "gray"))
            axis.errorbar(position + 0.3, values.mean(), yerr=values.std(ddof=1), fmt="o", color="black", ms=3, capsize=3)
        arrow = "↓" if result["lower_is_better"][metric] else "↑"
        axis.set_title(f"{METRIC_TITLES[metric]} {arrow}", fontsize=9)
        axis.set_xticks(range(len(columns)))
        axis.set_xticklabels([COLUMN_TITLES.get(c, c).replace("Real vs ", "vs\n") for c in columns], fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
    settings = result["settings"]
    figure.suptitle(f"Bootstrap distributions (n = {settings['n']} per set, {settings['bootstrap_rounds']} rounds; "
                    f"backbone {result['backbone']['name']})", fontsize=10)
    figure.tight_layout()
    return _png(figure)


def _reference_note(memorization: dict) -> str:
    if memorization.get("heldout_reference") != "held-out reconstructions":
        return ", as they are"
    return (", passed through the autoencoder so that they are as smooth as decoded samples; raw scans would "
            "make every smooth sample look closer to the training set than any new person")


def _closest(test: dict) -> str:
    """One line of the closest-record test (mriflow.evaluate.memorization.closest_record_test)."""
    verdict = "consistent with no memorization" if test["p_value"] >= 0.05 else (
        "leaning to the training subjects" if test["share_closer_to_training"] > test["expected_without_memorization"]
        else "leaning to the held-out subjects")
    return (f"{test['share_closer_to_training']:.0%} of the generated volumes are closest to a training subject "
            f"(95 % interval {test['interval_95'][0]:.0%}–{test['interval_95'][1]:.0%}; "
            f"{test['expected_without_memorization']:.0%} expected without memorization, {test['training_subjects']} training "
            f"vs {test['heldout_subjects']} held-out subjects; binomial p = {test['p_value']:.2g}): {verdict}")


def _copy_note(memorization: dict) -> str:
    copies = memorization.get("decoded_copy_distance")
    if not copies:
        return ""
    voxel, feature = np.asarray(copies["voxel"]), np.asarray(copies["feature"])
    generated = np.asarray(memorization["voxel"]["generated_nearest_distance"])
    return (f" For scale, what a copy looks like after the decoder: {len(voxel)} training subjects passed through the "
            f"autoencoder lie at {_number(np.median(voxel))} (voxel, median; max {_number(voxel.max())}) and "
            f"{_number(np.median(feature))} (feature) from their own originals; the generated volumes' nearest "
            f"distances have median {_number(np.median(generated))} (voxel). A flagged volume near the copy level is "
            f"a copy; one between the copy level and the threshold is closer to a training subject than new people "
            f"are without being that subject."
            + "".join(f" In {space} space a decoded copy lies beyond that space's threshold ({_number(np.median(values))} "
                      f"> {_number(memorization[space]['threshold'])}), so that space cannot catch copies that went "
                      f"through the decoder; read its flags as likeness, not copying."
                      for space, values in (("voxel", voxel), ("feature", feature))
                      if np.median(values) >= memorization[space]["threshold"]))


def memorization_figure(memorization: dict) -> bytes:
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    for axis, space, label in ((axes[0], "voxel", "1 − correlation in the brain mask"),
                               (axes[1], "feature", "Euclidean distance in feature space")):
        part = memorization[space]
        heldout, generated = np.asarray(part["heldout_nearest_distance"]), np.asarray(part["generated_nearest_distance"])
        copies = np.asarray((memorization.get("decoded_copy_distance") or {}).get(space, []))
        top = max(heldout.max(), generated.max(), copies.max() if len(copies) else 0.0)
        bins = np.linspace(0, top * 1.05 if top > 0 else 1, 30)
        axis.hist(heldout, bins=bins, alpha=0.6, density=True, color="tab:blue",
                  label=f"{memorization.get('heldout_reference', 'held-out volumes')} → train ({len(heldout)})")
        axis.hist(generated, bins=bins, alpha=0.6, density=True, color="tab:red",
                  label=f"generated → train ({len(generated)})")
        if len(copies):
            axis.hist(copies, bins=bins, alpha=0.6, density=True, color="tab:green",
                      label=f"decoded training subject → itself ({len(copies)})")
        axis.axvline(part["threshold"], color="black", linestyle="--", label=f"threshold ({part['percentile']:g} % quantile)")
        axis.set_xlabel(f"nearest training subject: {label}", fontsize=8)
        axis.set_ylabel("density", fontsize=8)
        axis.set_title(f"{space} space: {sum(part['flagged'])} flagged", fontsize=9)
        axis.legend(fontsize=7)
    figure.tight_layout()
    return _png(figure)


def diversity_figure(diversity: dict) -> bytes:
    figure, axis = plt.subplots(figsize=(4, 3))
    data = [diversity["real"]["values"], diversity["generated"]["values"]]
    axis.boxplot(data, showmeans=True)
    axis.set_xticks([1, 2])
    axis.set_xticklabels([f"real ({len(data[0])} pairs)", f"generated ({len(data[1])} pairs)"], fontsize=8)
    axis.set_ylabel("MS-SSIM of a pair (lower = more diverse)", fontsize=8)
    settings = diversity["settings"]
    axis.set_title(f"Diversity: window {settings['window']}, {settings['scales']} scales", fontsize=9)
    return _png(figure)


def age_figure(fidelity: dict) -> bytes:
    figure, axis = plt.subplots(figsize=(4.2, 4))
    for key, colour, label in (("real", "tab:blue", "real: true age"), ("generated", "tab:red", "generated: requested age")):
        part = fidelity["age"].get(key)
        if part:
            axis.scatter(part["target"], part["predicted"], s=12, alpha=0.7, color=colour,
                         label=f"{label} (MAE {part['mae']:.1f} y)")
    low = min(axis.get_xlim()[0], axis.get_ylim()[0])
    high = max(axis.get_xlim()[1], axis.get_ylim()[1])
    axis.plot([low, high], [low, high], color="gray", linewidth=1)
    axis.set_xlim(low, high)
    axis.set_ylim(low, high)
    axis.set_xlabel("age (years)")
    axis.set_ylabel("predicted age (years)")
    axis.legend(fontsize=7)
    axis.set_title("Conditional fidelity: age", fontsize=9)
    return _png(figure)


def morphometry_figure(morphometry: dict) -> bytes:
    """Volume against age per region: real subjects at their age, generated volumes at the requested one."""
    regions = list(morphometry["regions"])
    figure, axes = plt.subplots(1, len(regions), figsize=(2.6 * len(regions), 2.8), squeeze=False)
    for axis, region in zip(axes[0], regions):
        for key, colour, label in (("real", "tab:blue", "real"), ("other", "tab:cyan", "real (other split)"),
                                   ("generated", "tab:red", "generated")):
            curve = morphometry["curves"][key]
            axis.scatter(curve["age"], curve[region], s=8, alpha=0.7, color=colour, label=label)
        axis.set_title(region.replace("_", " "), fontsize=8)
        axis.set_xlabel("age (years)", fontsize=7)
        axis.tick_params(labelsize=6)
    axes[0][0].set_ylabel("volume (ml, template space)", fontsize=7)
    axes[0][0].legend(fontsize=6)
    figure.tight_layout()
    return _png(figure)


def make_figures(result: dict, montage: dict | None = None) -> dict[str, bytes]:
    """name -> PNG bytes, for every picture the result supports."""
    figures = {}
    if montage and (montage.get("real") or montage.get("generated")):
        figures["montage"] = montage_figure(montage)
    figures["bootstrap"] = bootstrap_figure(result)
    figures["diversity"] = diversity_figure(result["diversity"])
    if "voxel" in result["memorization"]:
        figures["memorization"] = memorization_figure(result["memorization"])
    if result["conditional_fidelity"].get("age"):
        figures["age_fidelity"] = age_figure(result["conditional_fidelity"])
    if "regions" in result.get("morphometry", {}):
        figures["morphometry"] = morphometry_figure(result["morphometry"])
    return figures


# ----------------------------------------------------------------------------- documents


def _within(generated: dict, yardstick: dict, lower_is_better: bool = True) -> bool:
    """Whether a bootstrap mean is no worse than the yardstick's mean plus two (combined) sds."""
    margin = 2 * np.hypot(generated.get("sd", 0.0), yardstick.get("sd", 0.0))
    if lower_is_better:
        return generated["mean"] <= yardstick["mean"] + margin
    return generated["mean"] >= yardstick["mean"] - margin


def verdict(result: dict) -> list[list[str]]:
    """One row per aspect (fidelity, diversity, privacy, conditioning, anatomy): the generated figure, its Real vs
    Real (or real-data) yardstick, and a plain reading. Within two sds of the yardstick reads as 'like real data'."""
    rows = []
    generated, real = result["columns"].get("real_vs_generated"), result["columns"].get("real_vs_real")
    if generated and real:
        for metric, lower in (("fd", True), ("coverage", False)):
            ok = _within(generated[metric], real[metric], lower)
            rows.append([f"fidelity: {METRIC_TITLES.get(metric, metric)}", _mean_sd(generated[metric]), _mean_sd(real[metric]),
                         "like real data" if ok else ("further from real data than real data is from itself" if lower
                                                      else "covers less of the real data than real data does")])
    diversity = result["diversity"]
    gap = diversity["generated"]["mean"] - diversity["real"]["mean"]
    rows.append(["diversity: MS-SSIM between volumes", f"{diversity['generated']['mean']:.3f}", f"{diversity['real']['mean']:.3f}",
                 "as diverse as real data" if abs(gap) <= 0.02 else
                 ("too alike (less diverse than real data)" if gap > 0 else "more varied than real data")])
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
                     "volumes like real brains" if ok else f"volumes unlike real brains, most in {worst.replace('_', ' ')} "
                     f"(d = {morphometry['regions'][worst]['effect_size_generated']:+.1f})"])
    return rows


def report_blocks(result: dict, figures: dict[str, bytes]) -> list[tuple]:
    """The report as blocks: ("h1"|"h2"|"p", text), ("table", header, rows), ("image", name, caption)."""
    inputs, backbone, settings = result["inputs"], result["backbone"], result["settings"]
    blocks: list[tuple] = [("h1", "mriflow evaluation report")]
    checksum = backbone["weights_sha256"] or "none (this backbone has no weights)"
    blocks.append(("p", f"Real data: {inputs['real_dir']} (split {inputs['split']}, {inputs['counts']['real']} subjects); "
                        f"generated: {inputs['fake_dir']} ({inputs['counts']['generated']} volumes); grid {inputs['shape']}."))
    blocks.append(("p", f"Backbone: {backbone['name']} ({backbone['feature_dim']} features); weights SHA-256: {checksum}. "
                        f"Set metrics are comparable only under the same backbone, weights and n."))
    if settings.get("protocol"):
        protocol = settings["protocol"]
        blocks.append(("p", f"Protocol {protocol['name']}: {protocol['description']}. Figures compare with other reports "
                            f"of protocol {protocol['name']} on the same real data."))
    if backbone["name"].startswith("intensity"):
        blocks.append(("p", "The intensity backbone is a sanity descriptor, not comparable with published FD/KID values."))
    for warning in result.get("warnings", []):
        blocks.append(("p", f"Warning: {warning}"))
    blocks.append(("h2", "Verdict"))
    blocks.append(("table", ["aspect", "generated", "yardstick", "reading"], verdict(result)))

    blocks.append(("h2", "Set metrics"))
    columns = list(result["columns"])
    header = ["metric", "better"] + [COLUMN_TITLES.get(c, c) for c in columns]
    rows = [["sets", ""] + [" vs ".join(result["column_sets"][c]) for c in columns]]
    for metric, title in METRIC_TITLES.items():
        rows.append([title, "lower" if result["lower_is_better"][metric] else "higher"] +
                    [_mean_sd(result["columns"][c][metric]) for c in columns])
    blocks.append(("table", header, rows))
    blocks.append(("p", f"Bootstrap mean ± sd over {settings['bootstrap_rounds']} rounds, each drawing n = {settings['n']} "
                        f"volumes per set {settings['sampling']} (seed {settings['seed']}). KID: unbiased, polynomial "
                        f"kernel (x·y/F + 1)³. MMD²: unbiased, Gaussian kernel with bandwidth "
                        f"{_number(settings['mmd_bandwidth'])} "
                        f"(median heuristic on the real split, fixed for all columns). PRDC: Naeem et al. 2020, "
                        f"k = {settings['nearest_k']}. Real vs Real is the floor sampling noise gives at this n."))
    if "bootstrap" in figures:
        blocks.append(("image", "bootstrap", "Bootstrap distributions of each metric, per column."))
    if result.get("reconstruction"):
        recon = result["reconstruction"]
        blocks.append(("h2", "Reconstruction"))
        blocks.append(("table", ["metric", "mean ± sd"],
                       [["SSIM", _mean_sd(recon["ssim"])], ["PSNR (dB)", _mean_sd(recon["psnr"])]]))
        source = result["inputs"].get("autoencoder") or "given as a function"
        blocks.append(("p", f"Autoencoder: {source}; {recon['settings']['ssim']}."))

    diversity = result["diversity"]
    blocks.append(("h2", "Diversity (MS-SSIM within a set, lower = more diverse)"))
    blocks.append(("table", ["set", "mean ± sd", "pairs"],
                   [["real", _mean_sd(diversity["real"]), str(len(diversity["real"]["values"]))],
                    ["generated", _mean_sd(diversity["generated"]), str(len(diversity["generated"]["values"]))]]))
    s = diversity["settings"]
    blocks.append(("p", f"MS-SSIM settings: Gaussian window {s['window']} (sigma {s['sigma']}), {s['scales']} scales, "
                        f"weights [{', '.join(f'{w:.4f}' for w in s['weights'])}]; fixed random pairs (seed {settings['seed']})."))
    if "diversity" in figures:
        blocks.append(("image", "diversity", "MS-SSIM of the sampled pairs."))

    memorization = result["memorization"]
    blocks.append(("h2", "Memorization"))
    if "skipped" in memorization:
        blocks.append(("p", f"Skipped: {memorization['skipped']}."))
    else:
        voxel, feature = memorization["voxel"], memorization["feature"]
        blocks.append(("p", f"A generated volume is flagged when the nearest of the {memorization['train']} training subjects is "
                            f"closer than the {voxel['percentile']:g} % quantile of held-out-to-training nearest distances "
                            f"({memorization['heldout']} held-out subjects{_reference_note(memorization)}). Voxel space: 1 − Pearson correlation in the "
                            f"population brain mask ({memorization['mask_voxels']} voxels) after Gaussian smoothing "
                            f"(sigma {memorization.get('smoothing_mm', 0):g} mm), threshold {_number(voxel['threshold'])}: "
                            f"{memorization['flagged_voxel']} flagged. Feature space: threshold {_number(feature['threshold'])}: "
                            f"{memorization['flagged_feature']} flagged. To be flagged a volume must also be singled out by "
                            f"that subject: its nearest training subject clearly nearer than its second nearest (distance "
                            f"ratio below {_number(voxel['ratio_threshold'])} in voxel space, {_number(feature['ratio_threshold'])} "
                            f"in feature space, the held-out subjects' {voxel['percentile']:g} % quantile, at most 0.7), so "
                            f"a smooth near-average brain, close to everyone, is not taken for a copy. About "
                            f"{memorization['chance_rate']:.0%} of genuinely new volumes fall below such a threshold by "
                            f"chance.{_copy_note(memorization)}"))
        blocks.append(("p", "Closest real subject (distance to closest record): " + "; ".join(
            f"{space} space {_closest(memorization[space]['closest_record'])}" for space in ("voxel", "feature")) + "."))
        if memorization["table"]:
            table_rows = [[r["generated"], r["voxel_nearest"], _number(r["voxel_distance"]),
                           "yes" if r["voxel_flagged"] else "", r.get("feature_nearest", ""),
                           _number(r.get("feature_distance")), "yes" if r.get("feature_flagged") else ""]
                          for r in memorization["table"]]
            header = ["generated", "nearest (voxel)", "distance", "flagged", "nearest (feature)", "distance", "flagged"]
            blocks.append(("table", header, table_rows))
        if "memorization" in figures:
            blocks.append(("image", "memorization", "Nearest-training-subject distances of held-out real and generated volumes."))

    fidelity = result["conditional_fidelity"]
    blocks.append(("h2", "Conditional fidelity"))
    if "skipped" in fidelity:
        blocks.append(("p", f"Skipped: {fidelity['skipped']}."))
    else:
        rows = []
        if fidelity.get("age"):
            for key in ("generated", "real"):
                part = fidelity["age"].get(key)
                if part:
                    rows.append([f"age MAE ({key})",
                                 f"{part['mae']:.2f} y (r = {part['pearson_r']:.2f}, {part['count']} volumes)"])
        if fidelity.get("sex"):
            for key in ("generated", "real"):
                part = fidelity["sex"].get(key)
                if part:
                    rows.append([f"sex accuracy ({key})", f"{part['accuracy']:.2f} ({part['count']} volumes)"])
        for volume in ("ventricles_ml", "total_brain_ml"):
            if fidelity.get(volume):
                for key in ("generated", "real"):
                    rows.append([f"{volume} ({key})", _mean_sd(fidelity[volume][key])])
                paired = fidelity[volume].get("requested_vs_measured")
                for key in ("generated", "real") if paired else ():
                    if paired[key]:
                        rows.append([f"{volume} vs {paired['covariate']} ({key})",
                                     f"r = {paired[key]['pearson_r']:.2f} ({paired[key]['count']} volumes)"])
        blocks.append(("table", ["measure", "value"], rows))
        blocks.append(("p", f"Predictor: {fidelity['predictor']} (weights SHA-256 {fidelity['predictor_weights_sha256']}). "
                            f"Generated: requested covariate vs prediction; real: true covariate vs prediction "
                            f"(the predictor's own error)."))
        if "age_fidelity" in figures:
            blocks.append(("image", "age_fidelity", "Predicted vs requested (generated) and true (real) age."))

    morphometry = result.get("morphometry", {})
    blocks.append(("h2", "Anatomy: tissue volumes"))
    if "skipped" in morphometry or not morphometry:
        blocks.append(("p", f"Skipped: {morphometry.get('skipped', 'not measured')}."))
    else:
        rows = [[region.replace("_", " "), f"{part['real_mean_ml']:.1f}", f"{part['generated_mean_ml']:.1f}",
                 f"{part['w1_generated']['value']:.2f} ± {part['w1_generated']['sd']:.2f}",
                 f"{part['w1_real_vs_real']['value']:.2f} ± {part['w1_real_vs_real']['sd']:.2f}",
                 f"{part['effect_size_generated']:+.2f}", f"{part['effect_size_real_vs_real']:+.2f}"]
                for region, part in morphometry["regions"].items()]
        rows.append(["all regions (Fréchet distance, standardised)", "", "",
                     f"{morphometry['frechet_generated']['value']:.2f} ± {morphometry['frechet_generated']['sd']:.2f}",
                     f"{morphometry['frechet_real_vs_real']['value']:.2f} ± {morphometry['frechet_real_vs_real']['sd']:.2f}",
                     "", ""])
        blocks.append(("table", ["region", "real mean (ml)", "generated mean (ml)", "W1 real vs generated (ml)",
                                 "W1 real vs real (ml)", "effect size d, generated", "d, real vs real"], rows))
        counts = morphometry["counts"]
        blocks.append(("p", f"Volumes from the anatomy network's segmentation in template space (head-size normalised), "
                            f"{counts['real']} real, {counts['other']} other real and {counts['generated']} generated volumes; "
                            f"± the bootstrap sd over {morphometry['settings']['rounds']} resamples. A region whose W1 or d is "
                            f"well beyond the Real vs Real figures is a region the generator gets wrong."))
        if "morphometry" in figures:
            blocks.append(("image", "morphometry", "Tissue volume against age: real at their age, generated at the requested one."))

    if "montage" in figures:
        blocks.append(("h2", "Examples"))
        blocks.append(("image", "montage", "Mid axial, coronal and sagittal slices of real and generated volumes."))
    timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.get("timing_s", {}).items())
    blocks.append(("p", f"mriflow {result['mriflow_version']}, {result['created']}; time: {timings}."))
    return blocks


def render_markdown(blocks: list[tuple]) -> str:
    lines = []
    for block in blocks:
        kind = block[0]
        if kind == "h1":
            lines += [f"# {block[1]}", ""]
        elif kind == "h2":
            lines += [f"## {block[1]}", ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "table":
            header, rows = block[1], block[2]
            lines.append("| " + " | ".join(header) + " |")
            lines.append("|" + "|".join("---" for _ in header) + "|")
            lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "image":
            lines += [f"![{block[2]}](figures/{block[1]}.png)", ""]
    return "\n".join(lines)


def render_html(blocks: list[tuple], figures: dict[str, bytes]) -> str:
    body = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{html.escape(block[1])}</p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif kind == "image":
            encoded = base64.b64encode(figures[block[1]]).decode("ascii")
            body.append(f'<figure><img alt="{html.escape(block[2])}" src="data:image/png;base64,{encoded}">'
                        f"<figcaption>{html.escape(block[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             "th{background:#f4f4f4}img{max-width:100%}figcaption{font-size:0.85em;color:#555}")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mriflow evaluation report</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if math.isnan(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


def write_report(result: dict, out: str | Path, montage: dict | None = None) -> dict[str, Path]:
    """Write out/metrics.json, out/report.md (+ out/figures/*.png) and a self-contained out/report.html."""
    out = Path(out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = make_figures(result, montage)
    for name, png in figures.items():
        (out / "figures" / f"{name}.png").write_bytes(png)
    blocks = report_blocks(result, figures)
    paths = {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["metrics"].write_text(json.dumps(_json_ready(result), indent=1, allow_nan=False))
    paths["markdown"].write_text(render_markdown(blocks))
    paths["html"].write_text(render_html(blocks, figures))
    return paths
