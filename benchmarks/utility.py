"""Synthetic image + label pairs and what they are worth: label accuracy and train-on-synthetic utility.

1. Generates `--factor` x (training subjects) pairs with a model that has a label decoder (the shipped
   default has one), one per row of the training split's covariates, cycled, so the synthetic set has
   the training distribution of age and sex (skipped when --synthetic already holds enough pairs).
2. The label decoder on real data: the real test scans encoded by the model's autoencoder, their labels
   decoded, Dice against their prepared (DLMUSE) tissue maps.
3. `mriflow evaluate utility` (mriflow.evaluate.utility): segmentation Dice and brain-age MAE on the
   real test split with and without the synthetic pairs, for each N.
Writes the section "## synthetic labels and utility (<grid>)" of docs/benchmarks.md, the curves
(docs/utility_<grid>.png), pairs side by side (docs/synthetic_pairs_<grid>.png) and
benchmarks/results/utility-<grid>.json.

    python benchmarks/utility.py --data /tmp/ixi4 --model default --synthetic /tmp/synthetic4 --out /tmp/utility4
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common import DOCUMENT, ROOT, command_line, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow.data.dataset import read_manifest, read_preparation
from mriflow.data.labels import TISSUE_CLASSES, dice_scores
from mriflow.evaluate.utility import (
    MIXED, REAL, SYNTHETIC_N, TrainingSettings, bootstrap, evaluate_utility, real_pairs,
    synthetic_pairs, utility_table,
)
from mriflow.generate import generate, load_generator

SECTION = "## synthetic labels and utility ({grid})"


def synthesise(model: str, data: Path, out: Path, count: int, seed: int) -> float:
    """Generate `count` pairs into `out` with the training split's covariates cycled; seconds per pair (0: reused)."""
    if out.is_dir() and len(list(out.glob("*_labels.nii.gz"))) >= count:
        return 0.0
    if out.exists():
        raise FileExistsError(f"--synthetic {out} exists but holds fewer than {count} pairs; remove it or pass another")
    manifest = read_manifest(data)
    train = manifest[manifest["split"] == "train"]
    generator = load_generator(model, "cpu")
    names = list(generator.schema.names)
    # a subject without an age (or sex) leaves that covariate free, as an empty cohort cell does
    rows = [{name: (None if pd.isna(value := train.iloc[i % len(train)][name]) else value) for name in names}
            for i in range(count)]
    started = time.perf_counter()
    result = generate(model, out, cohort=rows, seed=seed, batch_size=8, device="cpu")
    if generator.labels is None or not (out / "sample_00000_labels.nii.gz").is_file():
        raise ValueError(f"--model {model}: it has no label decoder, so no label maps were written; pass one that has")
    return (time.perf_counter() - started) / len(result.paths)


@torch.no_grad()
def decoder_accuracy(model: str, data: Path, label_map: dict) -> dict:
    """Dice of the label decoder on the real test scans: encode (posterior mean), decode labels, compare with the
    prepared tissue maps."""
    generator = load_generator(model, "cpu")
    test = real_pairs(data, "test", label_map)
    latents = torch.cat([generator.autoencoder.encode(test.images[i:i + 4]).mean for i in range(0, len(test), 4)])
    predicted = torch.from_numpy(generator.decode_labels(latents * generator.latent_scale)).long()
    scores = dice_scores(predicted, test.labels.long(), len(TISSUE_CLASSES))
    return {"mean_dice": bootstrap(scores), "dice": {c: bootstrap(scores[:, k]) for k, c in enumerate(TISSUE_CLASSES[1:])},
            "subjects": len(test)}


def pairs_picture(folder: Path, path: Path, count: int = 4) -> Path:
    """Generated images beside their label maps (mid axial and coronal slices), one row per pair."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    pairs = synthetic_pairs(folder, limit=count)
    colours = ListedColormap(["black", "#4c72b0", "#55a868", "#c44e52", "#f2f2f2", "#dd8452"])
    figure = Figure(figsize=(10, 2.6 * len(pairs)))
    axes = figure.subplots(len(pairs), 4, squeeze=False)
    for row in range(len(pairs)):
        image, labels = pairs.images[row, 0].numpy(), pairs.labels[row].numpy()
        x, y, z = (n // 2 for n in image.shape)
        shown = [(image[:, :, z], "gray", 0, 1, "image, axial"), (labels[:, :, z], colours, 0, 5, "labels, axial"),
                 (image[:, y, :], "gray", 0, 1, "image, coronal"), (labels[:, y, :], colours, 0, 5, "labels, coronal")]
        for column, (plane, cmap, low, high, title) in enumerate(shown):
            axis = axes[row, column]
            axis.imshow(plane.T, cmap=cmap, vmin=low, vmax=high, origin="lower", interpolation="nearest")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(title)
        age = pairs.ages[row]
        axes[row, 0].set_ylabel(f"{pairs.names[row]}\nage {age:.0f}" if np.isfinite(age) else pairs.names[row])
    figure.suptitle("classes: " + ", ".join(f"{k} {c}" for k, c in enumerate(TISSUE_CLASSES)), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    return path


def write_section(record: dict, grid: str) -> None:
    result, accuracy = record["utility"], record["decoder_accuracy"]
    seg = result["segmentation"]

    def mean(n: str, name: str) -> float:
        return seg[n][name]["mean_dice"]["mean"]

    targets = []
    for n in result["sizes"][:2]:
        n = str(n)
        gain = (mean(n, MIXED) - mean(n, REAL)) * 100
        gap = (mean(n, REAL) - mean(n, SYNTHETIC_N)) * 100
        targets.append(f"| N = {n}: real + synthetic beats real only by >= 2 Dice points | {gain:+.1f} points | "
                       f"{'met' if gain >= 2 else 'missed'} |")
        targets.append(f"| N = {n}: synthetic only within 5 Dice points of real only at equal N | {gap:.1f} points below | "
                       f"{'met' if gap <= 5 else 'missed'} |")
    fidelity = result.get("label_fidelity", {})
    body = f"""Model `{record['model']}` ({record['model_id']}) with its label decoder; {result['synthetic_pairs']} synthetic pairs ({record['seconds_per_pair']:.2f} s per pair on the CPU, image + labels; the training split's age and sex, cycled); {result['train_subjects']} real training subjects, tested on the {result['test_subjects']} real **test** subjects. Downstream models trained from scratch for {result['settings']['steps']} steps at batch {result['settings']['batch_size']} in every condition (MONAI UNet 16-128 for the tissue segmentation, MONAI Regressor 8-64 for brain age); k = {result['factor']}. Machine: {record['machine']['cpus']} CPUs, {record['machine']['torch_threads']} torch thread(s), load average {record['machine']['load_average'][0]} at the end; {record['minutes']:.0f} minutes in all.

    {record['command']}

Label decoder on real scans (test split encoded, labels decoded, against their DLMUSE tissue maps): mean Dice {accuracy['mean_dice']['mean']:.3f} [{accuracy['mean_dice']['low']:.3f}, {accuracy['mean_dice']['high']:.3f}]; per class {', '.join(f"{c} {v['mean']:.3f}" for c, v in accuracy['dice'].items())}.

{utility_table(result).strip()}

| target (issue 16) | measured | |
|---|---|---|
{chr(10).join(targets)}

Curves: `docs/utility_{grid}.png`; pairs side by side: `docs/synthetic_pairs_{grid}.png`. Label fidelity (the decoded labels against the anatomy network's segmentation of their own image; real scans: their DLMUSE maps against it): {'synthetic ' + format(fidelity['synthetic']['mean_dice']['mean'], '.3f') + ', real ' + format(fidelity['real']['mean_dice']['mean'], '.3f') if fidelity else 'not measured (no anatomy network for this grid)'}. Result: [benchmarks/results/utility-{grid}.json](../benchmarks/results/utility-{grid}.json).
"""
    replace_section(DOCUMENT, SECTION.format(grid=grid), body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset with label maps")
    parser.add_argument("--model", default="default", help="generator with a label decoder (default: the shipped one)")
    parser.add_argument("--synthetic", required=True, help="folder of synthetic pairs (made here when absent)")
    parser.add_argument("--out", required=True, help="report folder of mriflow evaluate utility")
    parser.add_argument("--sizes", default="10,30,all")
    parser.add_argument("--factor", type=int, default=5)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    started = time.perf_counter()
    data, synthetic, out = Path(args.data), Path(args.synthetic), Path(args.out)
    grid = read_preparation(data).get("preset", "grid")
    train_count = int((read_manifest(data)["split"] == "train").sum())
    seconds_per_pair = synthesise(args.model, data, synthetic, args.factor * train_count, args.seed)
    generator = load_generator(args.model, "cpu")
    label_map = generator.labels_meta["label_map"]
    accuracy = decoder_accuracy(args.model, data, label_map)
    sizes = [None if s == "all" else int(s) for s in args.sizes.split(",")]
    result = evaluate_utility(data, synthetic, out, sizes=sizes, factor=args.factor, label_map=label_map,
                              settings=TrainingSettings(steps=args.steps, seed=args.seed))
    shutil.copy(out / "utility.png", ROOT / "docs" / f"utility_{grid}.png")
    pairs_picture(synthetic, ROOT / "docs" / f"synthetic_pairs_{grid}.png")
    record = {"command": command, "model": args.model, "model_id": generator.model_id,
              "labels_checksum": generator.labels_meta["checksum"], "seconds_per_pair": seconds_per_pair,
              "decoder_accuracy": accuracy, "utility": result, "machine": machine(),
              "minutes": (time.perf_counter() - started) / 60}
    write_result(f"utility-{grid}", record)
    write_section(record, grid)
    print(json.dumps({"decoder_mean_dice": accuracy["mean_dice"], "minutes": record["minutes"]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
