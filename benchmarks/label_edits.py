"""Scans drawn for a given label map: do they match it, and do edits of the map show up in the image?

For each real test subject (no model has seen them), its prepared DLMUSE label map as tissue classes
is given to a label-conditioned model (`mriflow train flow --label-condition`) with the subject's age
and sex, and so are two edited versions of it, with the same seed:
  - enlarged ventricles: the ventricles grown by one voxel into the tissue around them;
  - cortical atrophy: the grey matter's outer layer (one voxel next to CSF or background) made CSF.
The anatomy network segments every generated scan. Figures: label fidelity (Dice between the map asked
for and the segmentation of the scan drawn for it, next to the same for the real scans and their own
maps), and for each edit the requested change of the edited volume (ml) against the change measured
between the scans drawn for the original and the edited map (mean, and their correlation over
subjects). Writes "## label-conditioned generation (<grid>)" in docs/benchmarks.md, a picture
(docs/label_edits_<grid>.png) and benchmarks/results/label-edits-<grid>.json.

    python benchmarks/label_edits.py --data /tmp/ixi4 --model runs/flow-labels
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from scipy import ndimage

from common import DOCUMENT, ROOT, command_line, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow.data.dataset import read_manifest, read_preparation
from mriflow.data.io import load_volume, save_volume
from mriflow.data.labels import TISSUE_CLASSES, dice_scores
from mriflow.evaluate.backbones.anatomy import AnatomyBackbone, anatomy_weights_for
from mriflow.evaluate.utility import bootstrap, real_pairs
from mriflow.generate import generate, load_generator

SECTION = "## label-conditioned generation ({grid})"
CSF, VENTRICLES, GREY, WHITE = (TISSUE_CLASSES.index(c) for c in ("csf", "ventricles", "grey_matter", "white_matter"))


def enlarge_ventricles(tissue: np.ndarray) -> np.ndarray:
    """Ventricles grown by one voxel (6-neighbourhood) into the brain tissue around them."""
    grown = ndimage.binary_dilation(tissue == VENTRICLES) & np.isin(tissue, (GREY, WHITE))
    edited = tissue.copy()
    edited[grown] = VENTRICLES
    return edited


def atrophy_cortex(tissue: np.ndarray) -> np.ndarray:
    """The grey matter's outer layer (voxels next to CSF or background) made CSF."""
    outside = np.isin(tissue, (0, CSF))
    layer = (tissue == GREY) & ndimage.binary_dilation(outside)
    edited = tissue.copy()
    edited[layer] = CSF
    return edited


EDITS = {"enlarged ventricles": (enlarge_ventricles, "ventricles"), "cortical atrophy": (atrophy_cortex, "grey_matter")}


def volumes_ml(tissue: np.ndarray, name: str, voxel_mm: float) -> float:
    return float((tissue == TISSUE_CLASSES.index(name)).sum() * voxel_mm**3 / 1000)


def picture(rows: list[tuple[str, np.ndarray, np.ndarray]], path: Path) -> Path:
    """One row per (title, label map, generated scan): mid-axial slices of the maps asked for and the scans drawn."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.4 * len(rows), 5))
    axes = figure.subplots(2, len(rows), squeeze=False)
    for column, (title, tissue, scan) in enumerate(rows):
        z = tissue.shape[2] // 2 + 2
        axes[0, column].imshow(tissue[:, :, z].T, cmap="tab10", vmin=0, vmax=9, origin="lower", interpolation="nearest")
        axes[1, column].imshow(scan[:, :, z].T, cmap="gray", vmin=0, vmax=1, origin="lower")
        axes[0, column].set_title(title, fontsize=8)
        for axis in axes[:, column]:
            axis.set_xticks([])
            axis.set_yticks([])
    axes[0, 0].set_ylabel("label map asked for")
    axes[1, 0].set_ylabel("scan drawn")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset with label maps (its test split is used)")
    parser.add_argument("--model", required=True, help="label-conditioned generator run (train flow --label-condition)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    started = time.perf_counter()
    data = Path(args.data)
    grid = read_preparation(data).get("preset", "grid")
    generator = load_generator(args.model, "cpu", labels=False)
    record = generator.spatial_condition
    if record is None:
        raise SystemExit(f"--model {args.model}: not label-conditioned (train flow --label-condition)")
    test = real_pairs(data, "test", record["label_map"])
    manifest = read_manifest(data).set_index("subject")
    voxel_mm = float(abs(generator.affine[0, 0]))
    backbone = AnatomyBackbone(anatomy_weights_for(generator.image_shape))

    maps = {"original": [t.numpy() for t in test.labels]}
    for edit, (function, _) in EDITS.items():
        maps[edit] = [function(t) for t in maps["original"]]
    scans: dict[str, list[np.ndarray]] = {name: [] for name in maps}
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for i, subject in enumerate(test.names):
            covariates = {name: manifest.loc[subject, name] for name in generator.schema.names
                          if not pd.isna(manifest.loc[subject, name])}  # a missing age stays free
            for name, tissues in maps.items():
                label_file = folder / f"{subject}-{name.replace(' ', '-')}.nii.gz"
                save_volume(label_file, tissues[i], generator.affine, dtype=np.uint8)
                out = folder / f"{subject}-{name.replace(' ', '-')}"
                result = generate(args.model, out, n=1, covariates=covariates, seed=args.seed + i, label_map=label_file,
                                  labels=False, device="cpu", progress=False)
                scans[name].append(load_volume(result.paths[0])[0])
            print(f"{i + 1}/{len(test)} subjects", flush=True)

    segmented = {name: backbone.segment(np.stack(volumes)[:, None]).long() for name, volumes in scans.items()}
    real_segmented = backbone.segment(test.images).long()
    fidelity = {
        "real scans vs their own maps": dice_scores(real_segmented, test.labels.long(), len(TISSUE_CLASSES)),
        "drawn scans vs the maps asked for": dice_scores(segmented["original"], test.labels.long(), len(TISSUE_CLASSES)),
    }
    result = {"command": command, "model": args.model, "subjects": len(test), "grid": grid, "machine": machine(),
              "fidelity": {k: {"mean_dice": bootstrap(v), "dice": {c: float(v[:, j].mean()) for j, c in
                                                                  enumerate(TISSUE_CLASSES[1:])}}
                           for k, v in fidelity.items()},
              "edits": {}}
    for edit, (_, region) in EDITS.items():
        requested = np.array([volumes_ml(e, region, voxel_mm) - volumes_ml(o, region, voxel_mm)
                              for o, e in zip(maps["original"], maps[edit])])
        measured = np.array([volumes_ml(e.numpy(), region, voxel_mm) - volumes_ml(o.numpy(), region, voxel_mm)
                             for o, e in zip(segmented["original"], segmented[edit])])
        result["edits"][edit] = {
            "region": region, "requested_ml": bootstrap(requested), "measured_ml": bootstrap(measured),
            "ratio": float(measured.mean() / requested.mean()) if requested.mean() else None,
            "correlation": float(np.corrcoef(requested, measured)[0, 1]) if requested.std() and measured.std() else None,
        }
    result["minutes"] = (time.perf_counter() - started) / 60
    picture([(f"{name}", maps[name][0], scans[name][0]) for name in maps], ROOT / "docs" / f"label_edits_{grid}.png")
    write_result(f"label-edits-{grid}", result)

    def cell(entry, digits=3):
        return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"

    lines = [f"Model `{args.model}` (label-conditioned: each subject's tissue map as class fractions on the latent grid), "
             f"{len(test)} real **test** subjects, one scan per map with the subject's age and sex and the same seed "
             f"for the original and edited maps; the shipped anatomy network segments every scan. Machine: "
             f"{result['machine']['cpus']} CPUs, {result['machine']['torch_threads']} torch thread(s); "
             f"{result['minutes']:.1f} minutes.", "", f"    {command}", "",
             "| label fidelity (Dice vs the anatomy network's segmentation) | mean Dice [95 % interval] | "
             + " | ".join(TISSUE_CLASSES[1:]) + " |", "|---|---|" + "---|" * (len(TISSUE_CLASSES) - 1)]
    for name, entry in result["fidelity"].items():
        lines.append(f"| {name} | {cell(entry['mean_dice'])} | " + " | ".join(f"{entry['dice'][c]:.3f}" for c in TISSUE_CLASSES[1:]) + " |")
    lines += ["", "| edit | region | requested change (ml) | measured change (ml) | measured / requested | correlation over subjects |",
              "|---|---|---|---|---|---|"]
    for edit, entry in result["edits"].items():
        ratio = "n/a" if entry["ratio"] is None else f"{entry['ratio']:.2f}"
        correlation = "n/a" if entry["correlation"] is None else f"{entry['correlation']:.2f}"
        lines.append(f"| {edit} | {entry['region']} | {cell(entry['requested_ml'], 1)} | {cell(entry['measured_ml'], 1)} "
                     f"| {ratio} | {correlation} |")
    lines += ["", f"Picture (first test subject: the maps asked for and the scans drawn): `docs/label_edits_{grid}.png`. "
                  f"Result: [benchmarks/results/label-edits-{grid}.json](../benchmarks/results/label-edits-{grid}.json)."]
    replace_section(DOCUMENT, SECTION.format(grid=grid), "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
