"""The evaluation report: report.md, a self-contained report.html (pictures inlined as base64 PNG) and metrics.json.

The report is rendered from the result dictionary alone (plus a few volumes for the montage), so it
can be rebuilt from metrics.json. It is written once, as sections of paragraphs, tables and figures
(:func:`report_sections`); report.md and report.html are two renderings of those sections, so they
always say the same thing. report.html goes through the Jinja2 template templates/report.html.j2, with
every value escaped.

    >>> write_report(result, "report/", montage={"real": [(name, volume)], "generated": [...]})
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import numpy as np

from mriflow.evaluate.figures import COLUMN_TITLES, METRIC_TITLES, make_figures
from mriflow.evaluate.verdict import mean_sd as _mean_sd, number as _number, verdict
from mriflow.utils.text import counted

TITLE = "mriflow evaluation report"


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    name: str  # figures/<name>.png
    caption: str


@dataclass
class Section:
    """A heading (None: no heading, e.g. the opening under the report's title) and what follows it, in order."""

    title: str | None
    parts: list[str | Table | Figure] = field(default_factory=list)  # a str is a paragraph


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


def report_sections(result: dict, figures: dict[str, bytes]) -> list[Section]:
    """The report as sections of paragraphs, tables and figures; the first, untitled, opens it."""
    inputs, backbone, settings = result["inputs"], result["backbone"], result["settings"]
    sections = [Section(None)]

    def add(part: str | Table | Figure) -> None:
        sections[-1].parts.append(part)

    checksum = backbone["weights_sha256"] or "none (this backbone has no weights)"
    add(f"Real data: {inputs['real_dir']} (split {inputs['split']}, {counted(inputs['counts']['real'], 'subject')}); "
        f"generated: {inputs['fake_dir']} ({counted(inputs['counts']['generated'], 'volume')}); "
        f"grid {inputs['shape']}.")
    add(f"Backbone: {backbone['name']} ({backbone['feature_dim']} features); weights SHA-256: {checksum}. "
        f"Set metrics are comparable only under the same backbone, weights and n.")
    if settings.get("protocol"):
        protocol = settings["protocol"]
        add(f"Protocol {protocol['name']}: {protocol['description']}. Figures compare with other reports "
            f"of protocol {protocol['name']} on the same real data.")
    if backbone["name"].startswith("intensity"):
        add("The intensity backbone is a sanity descriptor, not comparable with published FD/KID values.")
    for warning in result.get("warnings", []):
        add(f"Warning: {warning}")
    sections.append(Section("Verdict"))
    add(Table(["aspect", "generated", "yardstick", "reading"], verdict(result)))

    sections.append(Section("Set metrics"))
    columns = list(result["columns"])
    header = ["metric", "better"] + [COLUMN_TITLES.get(c, c) for c in columns]
    rows = [["sets", ""] + [" vs ".join(result["column_sets"][c]) for c in columns]]
    for metric, title in METRIC_TITLES.items():
        rows.append([title, "lower" if result["lower_is_better"][metric] else "higher"] +
                    [_mean_sd(result["columns"][c][metric]) for c in columns])
    add(Table(header, rows))
    add(f"Bootstrap mean ± sd over {settings['bootstrap_rounds']} rounds, each drawing n = {settings['n']} "
        f"volumes per set {settings['sampling']} (seed {settings['seed']}). KID: unbiased, polynomial "
        f"kernel (x·y/F + 1)³. MMD²: unbiased, Gaussian kernel with bandwidth "
        f"{_number(settings['mmd_bandwidth'])} "
        f"(median heuristic on the real split, fixed for all columns). PRDC: Naeem et al. 2020, "
        f"k = {settings['nearest_k']}. Real vs Real is the floor sampling noise gives at this n.")
    if "bootstrap" in figures:
        add(Figure("bootstrap", "Bootstrap distributions of each metric, per column."))
    if result.get("other_networks"):
        sections.append(Section("Fréchet distance with other networks"))
        add(Table(["network", "weights SHA-256", "Real vs Real", "Real vs Generated"],
                  [[name, (row["weights_sha256"] or "none")[:12], _mean_sd(row["real_vs_real"]),
                    _mean_sd(row["real_vs_generated"])] for name, row in result["other_networks"].items()]))
        add("The same bootstrap as the set metrics; an FD compares only with one of the same network and weights.")
    if result.get("reconstruction"):
        recon = result["reconstruction"]
        sections.append(Section("Reconstruction"))
        add(Table(["metric", "mean ± sd"],
                  [["SSIM", _mean_sd(recon["ssim"])], ["PSNR (dB)", _mean_sd(recon["psnr"])]]))
        source = result["inputs"].get("autoencoder") or "given as a function"
        add(f"Autoencoder: {source}; {recon['settings']['ssim']}.")

    diversity = result["diversity"]
    sections.append(Section("Diversity (MS-SSIM within a set, lower = more diverse)"))
    add(Table(["set", "mean ± sd", "pairs"],
              [["real", _mean_sd(diversity["real"]), str(len(diversity["real"]["values"]))],
               ["generated", _mean_sd(diversity["generated"]), str(len(diversity["generated"]["values"]))]]))
    s = diversity["settings"]
    add(f"MS-SSIM settings: Gaussian window {s['window']} (sigma {s['sigma']}), {s['scales']} scales, "
        f"weights [{', '.join(f'{w:.4f}' for w in s['weights'])}]; fixed random pairs (seed {settings['seed']}).")
    if "diversity" in figures:
        add(Figure("diversity", "MS-SSIM of the sampled pairs."))

    consistency = result.get("slice_consistency")
    if consistency and consistency.get("sets"):  # reports written before it have none
        sections.append(Section("Inter-slice consistency"))
        names = {"real": f"real {inputs['split']}", "other": f"real {inputs['other_split']}", "generated": "generated",
                 "reconstruction": "reconstructions"}
        add(Table(["set", "ratio R (bootstrap)", "sd over volumes", "difference from real", "volumes"],
                  [[names[k], _mean_sd(v), _number(v["volume_sd"]), _mean_sd(v["difference"]) if "difference" in v else "",
                    str(v["count"])] for k, v in consistency["sets"].items()]))
        add(f"R = mean squared second difference along the {consistency['axis_name']} slice axis / the same across the "
            f"two in-plane axes, inside the brain ({consistency['mask_voxels']} voxels). Slices that disagree with "
            f"their neighbours (a slice-by-slice 2D model) raise it; smoothing in 3D leaves it near the real value. "
            f"Read a set against the real split; the other real split's difference is the yardstick. Bootstrap mean ± "
            f"sd over {consistency['settings']['rounds']} rounds of n = {consistency['settings']['n']} volumes per set.")

    sharpness = result.get("sharpness")
    if sharpness and sharpness.get("sets"):  # reports written before it have none
        sections.append(Section("Sharpness (high-frequency fidelity)"))
        names = {"real": f"real {inputs['split']}", "other": f"real {inputs['other_split']}", "generated": "generated",
                 "reconstruction": "reconstructions"}
        add(Table(["set", "mean |Laplacian|", "/ real", "mean gradient magnitude", "/ real"],
                  [[names[k], _mean_sd(v["laplacian"]), _mean_sd(v["laplacian"]["ratio"]) if "ratio" in v["laplacian"] else "1",
                    _mean_sd(v["gradient"]), _mean_sd(v["gradient"]["ratio"]) if "ratio" in v["gradient"] else "1"]
                   for k, v in sharpness["sets"].items()]))
        add(f"Inside the real split's brain mask eroded by one voxel ({sharpness['mask_voxels']} voxels): the mean "
            f"absolute 6-neighbour Laplacian (high-frequency energy) and the mean gradient magnitude of each volume. A "
            f"ratio below the other real split's is blur (an autoencoder's or a sampler's), above it noise. Bootstrap "
            f"mean ± sd over {sharpness['settings']['rounds']} rounds of n = {sharpness['settings']['n']} volumes per set.")

    memorization = result["memorization"]
    sections.append(Section("Memorization"))
    if "skipped" in memorization:
        add(f"Skipped: {memorization['skipped']}.")
    else:
        voxel, feature = memorization["voxel"], memorization["feature"]
        add(f"A generated volume is flagged when the nearest of the {memorization['train']} training subjects is "
            f"closer than the {voxel['percentile']:g} % quantile of held-out-to-training nearest distances "
            f"({memorization['heldout']} held-out subjects{_reference_note(memorization)}). Voxel space: 1 − Pearson correlation in the "
            f"population brain mask ({memorization['mask_voxels']} voxels) after Gaussian smoothing "
            f"(sigma {memorization.get('smoothing_mm', 0):g} mm), threshold {_number(voxel['threshold'])}: "
            f"{memorization['flagged_voxel']} flagged. Feature space"
            f"{' (' + memorization['feature_space'] + ')' if memorization.get('feature_space') else ''}: threshold "
            f"{_number(feature['threshold'])}: "
            f"{memorization['flagged_feature']} flagged. To be flagged a volume must also be singled out by "
            f"that subject: its nearest training subject clearly nearer than its second nearest (distance "
            f"ratio below {_number(voxel['ratio_threshold'])} in voxel space, {_number(feature['ratio_threshold'])} "
            f"in feature space, the held-out subjects' {voxel['percentile']:g} % quantile, at most 0.7), so "
            f"a smooth near-average brain, close to everyone, is not taken for a copy. About "
            f"{memorization['chance_rate']:.0%} of genuinely new volumes fall below such a threshold by "
            f"chance.{_copy_note(memorization)}")
        add("Closest real subject (distance to closest record): " + "; ".join(
            f"{space} space {_closest(memorization[space]['closest_record'])}" for space in ("voxel", "feature")) + ".")
        if memorization["table"]:
            table_rows = [[r["generated"], r["voxel_nearest"], _number(r["voxel_distance"]),
                           "yes" if r["voxel_flagged"] else "", r.get("feature_nearest", ""),
                           _number(r.get("feature_distance")), "yes" if r.get("feature_flagged") else ""]
                          for r in memorization["table"]]
            header = ["generated", "nearest (voxel)", "distance", "flagged", "nearest (feature)", "distance", "flagged"]
            add(Table(header, table_rows))
        if "memorization" in figures:
            add(Figure("memorization", "Nearest-training-subject distances of held-out real and generated volumes."))

    fidelity = result["conditional_fidelity"]
    sections.append(Section("Conditional fidelity"))
    if "skipped" in fidelity:
        add(f"Skipped: {fidelity['skipped']}.")
    else:
        rows = []
        if fidelity.get("age"):
            for key in ("generated", "real"):
                part = fidelity["age"].get(key)
                if part:
                    rows.append([f"age MAE ({key})",
                                 f"{part['mae']:.2f} y (r = {part['pearson_r']:.2f}, "
                                 f"{counted(part['count'], 'volume')})"])
        if fidelity.get("sex"):
            for key in ("generated", "real"):
                part = fidelity["sex"].get(key)
                if part:
                    rows.append([f"sex accuracy ({key})",
                                 f"{part['accuracy']:.2f} ({counted(part['count'], 'volume')})"])
        for volume in ("ventricles_ml", "total_brain_ml"):
            if fidelity.get(volume):
                for key in ("generated", "real"):
                    rows.append([f"{volume} ({key})", _mean_sd(fidelity[volume][key])])
                paired = fidelity[volume].get("requested_vs_measured")
                for key in ("generated", "real") if paired else ():
                    if paired[key]:
                        rows.append([f"{volume} vs {paired['covariate']} ({key})",
                                     f"r = {paired[key]['pearson_r']:.2f} ({counted(paired[key]['count'], 'volume')})"])
        add(Table(["measure", "value"], rows))
        add(f"Predictor: {fidelity['predictor']} (weights SHA-256 {fidelity['predictor_weights_sha256']}). "
            f"Generated: requested covariate vs prediction; real: true covariate vs prediction "
            f"(the predictor's own error).")
        if "age_fidelity" in figures:
            add(Figure("age_fidelity", "Predicted vs requested (generated) and true (real) age."))

    morphometry = result.get("morphometry", {})
    sections.append(Section("Anatomy: tissue volumes"))
    if "skipped" in morphometry or not morphometry:
        add(f"Skipped: {morphometry.get('skipped', 'not measured')}.")
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
        add(Table(["region", "real mean (ml)", "generated mean (ml)", "W1 real vs generated (ml)",
                  "W1 real vs real (ml)", "effect size d, generated", "d, real vs real"], rows))
        counts = morphometry["counts"]
        add(f"Volumes from the anatomy network's segmentation in template space (head-size normalised), "
            f"{counts['real']} real, {counts['other']} other real and {counts['generated']} generated volumes; "
            f"± the bootstrap sd over {morphometry['settings']['rounds']} resamples. A region whose W1 or d is "
            f"well beyond the Real vs Real figures is a region the generator gets wrong.")
        if "morphometry" in figures:
            add(Figure("morphometry", "Tissue volume against age: real at their age, generated at the requested one."))

    labels = result.get("label_fidelity")
    if labels is not None:  # reports written before label maps existed have no such entry
        sections.append(Section("Label maps"))
        if "skipped" in labels:
            add(f"Skipped: {labels['skipped']}.")
        else:
            def row(name: str, part: dict) -> list[str]:
                mean = part["mean_dice"]
                return [name, str(part["count"]), f"{mean['mean']:.3f} [{mean['low']:.3f}, {mean['high']:.3f}]",
                        *(f"{part['dice'][c]:.3f}" for c in labels["classes"])]

            rows = [row("generated: delivered label map", labels["generated"])]
            if labels["real"] is not None:
                rows.append(["real: prepared label map", *row("", labels["real"])[1:]])
            add(Table(["label maps", "volumes", "mean Dice [95 % interval]", *(c.replace("_", " ") for c in labels["classes"])],
                      rows))
            add("Dice between each label map and the anatomy network's segmentation of its own image. The real row is "
                "the yardstick: how well the network agrees with the real scans' own (DLMUSE) maps. A generated figure "
                "near it says the delivered labels fit the generated images as well as real labels fit real scans.")

    if "montage" in figures:
        sections.append(Section("Examples"))
        add(Figure("montage", "Mid axial, coronal and sagittal slices of real and generated volumes."))
    timings = ", ".join(f"{stage} {seconds:.1f} s" for stage, seconds in result.get("timing_s", {}).items())
    sections.append(Section(None, [f"mriflow {result['mriflow_version']}, {result['created']}; time: {timings}."]))
    return sections


def render_markdown(sections: list[Section]) -> str:
    lines = [f"# {TITLE}", ""]
    for section in sections:
        if section.title is not None:
            lines += [f"## {section.title}", ""]
        for part in section.parts:
            if isinstance(part, Table):
                lines.append("| " + " | ".join(part.header) + " |")
                lines.append("|" + "|".join("---" for _ in part.header) + "|")
                lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in part.rows]
                lines.append("")
            elif isinstance(part, Figure):
                lines += [f"![{part.caption}](figures/{part.name}.png)", ""]
            else:
                lines += [part, ""]
    return "\n".join(lines)


_TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("mriflow.evaluate", "templates"), autoescape=True,
                                undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                                keep_trailing_newline=True)


def render_html(sections: list[Section], figures: dict[str, bytes]) -> str:
    """report.html: the sections through templates/report.html.j2, the figures inlined as base64 PNG."""
    encoded = {name: base64.b64encode(png).decode("ascii") for name, png in figures.items()}
    return _TEMPLATES.get_template("report.html.j2").render(title=TITLE, sections=sections, figures=encoded)


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
    sections = report_sections(result, figures)
    paths = {"metrics": out / "metrics.json", "markdown": out / "report.md", "html": out / "report.html"}
    paths["metrics"].write_text(json.dumps(_json_ready(result), indent=1, allow_nan=False))
    paths["markdown"].write_text(render_markdown(sections))
    paths["html"].write_text(render_html(sections, figures))
    return paths
