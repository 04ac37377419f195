"""The pictures of the evaluation report, each drawn from the result dictionary (metrics.json) alone, plus a few
volumes for the montage; PNG bytes, which the report writes to figures/ and inlines in report.html.

    >>> figures = make_figures(result, montage={"real": [(name, volume)], "generated": [...]})
    >>> sorted(figures)
    ['bootstrap', 'diversity', 'memorization', 'montage', 'morphometry']
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mriflow.utils.text import counted

COLUMN_TITLES = {"real_vs_reconstruction": "Real vs Reconstruction", "real_vs_real": "Real vs Real",
                 "real_vs_generated": "Real vs Generated"}
METRIC_TITLES = {"fd": "FD", "kid": "KID", "mmd": "MMD²", "precision": "precision", "recall": "recall",
                 "density": "density", "coverage": "coverage"}
COLUMN_COLOURS = {"real_vs_reconstruction": "tab:green", "real_vs_real": "tab:blue", "real_vs_generated": "tab:red"}


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
    axis.set_xticklabels([f"real ({counted(len(data[0]), 'pair')})", f"generated ({counted(len(data[1]), 'pair')})"],
                         fontsize=8)
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
