"""Calibration of the copy check: does it flag copies, and only copies, in voxel and in feature space?

From a prepared folder (training split = the generator's training set, val = the held-out yardstick,
test = new people the check has never seen) it builds sets of volumes and counts how many of each the
memorization check (mriflow.evaluate.memorization: closer than new people come AND singled out, d1/d2)
flags, next to the distance threshold alone (the check before the ratio rule):

  exact copies        training subjects as they are
  deformed copies     training subjects under a smooth random displacement (sd 2 mm, smooth over 8 mm)
  noisy copies        + Gaussian noise, sd 0.05
  blurred copies      Gaussian blur, sigma 1 voxel
  averages of 5       the voxel-wise mean of 5 random training subjects
  held-out scans      the real test split
  model samples       samples of the shipped model at the test subjects' ages and sexes (--model)

Twice: with the raw val volumes as the yardstick, and with the val volumes through the model's
autoencoder (what `generate --privacy-filter` and `evaluate --autoencoder` use). Voxel space: 1 -
correlation after 4 mm smoothing in the population brain mask; feature space: the anatomy network's
tissue maps of the 4 mm-smoothed volume (mriflow.evaluate.privacy.TissueSpace), whose yardstick is the
raw val volumes in both tables, as in the audit.
Targets (issue 13): every copy flagged; averages, held-out scans and model samples flagged at most at
the chance rate, about 1 / (yardstick subjects + 1). Writes benchmarks/results/privacy-calibration-<grid>.json
and the "## privacy calibration (<grid>)" section of docs/benchmarks.md.

    python benchmarks/privacy_calibration.py --data /tmp/ixi4 --model 4mm
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter, map_coordinates

from common import DOCUMENT, command_line, link, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow.data.dataset import read_manifest
from mriflow.data.io import load_volume
from mriflow.evaluate.backbones import anatomy_weights_for, get_backbone
from mriflow.evaluate.privacy import tissue_space_for
from mriflow.evaluate.memorization import (
    DEFAULT_SMOOTHING_MM,
    find_memorized,
    masked_standardised,
    population_mask,
    smoothing_voxels,
)
from mriflow.utils.seeding import sample_seed
from mriflow.generate import load_generator
from mriflow.models.conditioning import resolve_request

COPIES, AVERAGES, AVERAGED = 10, 15, 5
DEFORMATION_MM = 2.0  # sd of the displacement of a deformed copy (smooth over 8 mm)


def deformed(volume: np.ndarray, rng: np.random.Generator, amplitude: float, smoothness: float) -> np.ndarray:
    """A smooth random displacement: each component Gaussian-smoothed noise (sigma `smoothness` voxels) scaled to
    `amplitude` voxels at its sd."""
    grid = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in volume.shape], indexing="ij")
    shifted = []
    for axis in grid:
        field = gaussian_filter(rng.normal(size=volume.shape).astype(np.float32), smoothness)
        shifted.append(axis + amplitude * field / max(float(field.std()), 1e-6))
    return map_coordinates(volume, shifted, order=1, mode="constant").astype(np.float32)


def volume_sets(data: Path, generator, samples: int, seed: int) -> tuple[dict[str, list[np.ndarray]], dict]:
    manifest = read_manifest(data)
    rows = {split: manifest[manifest["split"] == split].reset_index(drop=True) for split in ("train", "val", "test")}
    load = lambda row: load_volume(data / row["image"])[0]  # noqa: E731
    rng = np.random.default_rng(seed)
    affine = load_volume(data / rows["train"]["image"].iloc[0])[1]
    voxel_mm = float(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)).mean())
    chosen = rng.choice(len(rows["train"]), COPIES, replace=False)
    originals = [load(rows["train"].iloc[i]) for i in chosen]
    sets = {
        "exact copies": originals,
        "deformed copies": [deformed(v, rng, DEFORMATION_MM / voxel_mm, 8.0 / voxel_mm) for v in originals],
        "noisy copies": [np.clip(v + rng.normal(0, 0.05, v.shape), 0, 1).astype(np.float32) for v in originals],
        "blurred copies": [gaussian_filter(v, 1.0) for v in originals],
        "averages of 5": [np.mean([load(rows["train"].iloc[i]) for i in rng.choice(len(rows["train"]), AVERAGED, replace=False)],
                                  axis=0) for _ in range(AVERAGES)],
        "held-out scans": [load(row) for _, row in rows["test"].iterrows()],
    }
    if generator is None:
        return sets, rows
    settings = generator.sampling_settings()
    model_samples = []
    for index in range(samples):
        row = rows["test"].iloc[index % len(rows["test"])]
        request = {k: row[k] for k in generator.schema.names if k in row and row[k] == row[k]}
        volumes, _ = generator.sample([sample_seed(seed, index)], resolve_request(generator.schema, request), settings)
        model_samples.append(volumes[0])
    sets["model samples"] = model_samples
    return sets, rows


def flags(sets: dict[str, list[np.ndarray]], train: list[np.ndarray], yardstick: list[np.ndarray], mask, smoothing,
          backbone, affine, raw_yardstick: list[np.ndarray]) -> dict:
    """Per set and space: flagged by the check, and by the distance threshold alone."""
    def vectors(volumes):
        return np.stack([masked_standardised(v, mask, smoothing) for v in volumes])

    def features(volumes):
        return np.concatenate([backbone.features(np.stack(volumes[s:s + 8])[:, None]) for s in range(0, len(volumes), 8)])

    def tissue(volumes):  # the audit's feature space where the grid has an anatomy network (mriflow.evaluate.privacy)
        return np.concatenate([tissue_space(np.stack(volumes[s:s + 8])) for s in range(0, len(volumes), 8)])

    tissue_space = tissue_space_for(backbone, affine, train[0].shape)
    spaces = {"voxel": (vectors, "correlation"),
              "feature": (tissue, "correlation") if tissue_space is not None else (features, "euclidean")}
    reference = {space: (embed(train), embed(yardstick)) for space, (embed, _) in spaces.items()}
    if tissue_space is not None:  # as the audit: the tissue space's yardstick is always the raw held-out volumes
        reference["feature"] = (reference["feature"][0], tissue(raw_yardstick))
    out = {}
    for name, volumes in sets.items():
        out[name] = {"count": len(volumes)}
        for space, (embed, metric) in spaces.items():
            train_rows, yardstick_rows = reference[space]
            found = find_memorized(embed(volumes), train_rows, yardstick_rows, [str(i) for i in range(len(volumes))],
                                   [str(i) for i in range(len(train_rows))], metric=metric)
            distance = np.asarray(found["generated_nearest_distance"])
            out[name][space] = {"flagged": int(sum(found["flagged"])),
                                "flagged_by_distance_alone": int((distance < found["threshold"]).sum()),
                                "threshold": found["threshold"], "ratio_threshold": found["ratio_threshold"],
                                "median_distance": float(np.median(distance)),
                                "median_ratio": float(np.median(found["generated_nearest_ratio"]))}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared folder with train, val and test splits")
    parser.add_argument("--model", default="default",
                        help="the generator whose samples and autoencoder are checked ('none': the real sets only)")
    parser.add_argument("--samples", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = command_line(__file__, argv)
    started = time.perf_counter()

    generator = None if args.model == "none" else load_generator(args.model, "cpu")
    sets, rows = volume_sets(args.data, generator, args.samples, args.seed)
    train = [load_volume(args.data / p)[0] for p in rows["train"]["image"]]
    val = [load_volume(args.data / p)[0] for p in rows["val"]["image"]]
    affine = load_volume(args.data / rows["train"]["image"].iloc[0])[1]
    mask = population_mask(load_volume(args.data / p)[0] for p in rows["train"]["mask"])
    smoothing = smoothing_voxels(affine, DEFAULT_SMOOTHING_MM)
    weights = anatomy_weights_for(train[0].shape)
    if weights is None:
        raise SystemExit(f"no shipped anatomy network for the grid {train[0].shape} of {args.data}")
    backbone = get_backbone("anatomy", weights=weights)
    yardsticks = {"raw val volumes": val}
    if generator is not None:
        yardsticks["val through the model's autoencoder"] = [
            generator.reconstruct(torch.from_numpy(v)[None, None])[0, 0].numpy() for v in val]
    results = {name: flags(sets, train, yardstick, mask, smoothing, backbone, affine, val) for name, yardstick in yardsticks.items()}

    chance = 1.0 / (len(val) + 1)
    copies = [name for name in sets if name.endswith("copies")]
    others = [name for name in sets if name not in copies]
    checks = {}
    for yardstick, table in results.items():
        for space in ("voxel", "feature"):
            for name in copies:
                checks[f"{yardstick}, {space}: all {name} flagged"] = table[name][space]["flagged"] == table[name]["count"]
            for name in others:  # at most the chance rate, rounded up to a whole volume
                allowed = int(np.ceil(chance * table[name]["count"]))
                checks[f"{yardstick}, {space}: {name} at most at chance ({allowed})"] = table[name][space]["flagged"] <= allowed
    record = {"benchmark": "privacy_calibration", "command": command, "data": str(args.data),
              "grid": json.loads((args.data / "prepare.json").read_text()).get("preset"),
              "model": generator.model_id if generator else None,
              "backbone": backbone.name, "feature_space": tissue_space_for(backbone, affine, train[0].shape).description,
              "train": len(train), "yardstick_subjects": len(val), "chance_rate": chance,
              "results": results, "checks": checks, "all_passed": all(checks.values()),
              "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    path = write_result(f"privacy-calibration-{record['grid']}", record)

    lines = []
    for yardstick, table in results.items():
        lines += [f"Yardstick: {yardstick}.", "",
                  "| set | volumes | flagged, voxel | by distance alone | flagged, feature | by distance alone | median d1/d2 (voxel) | median d1/d2 (feature) |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {row['count']} | {row['voxel']['flagged']} | {row['voxel']['flagged_by_distance_alone']} | "
                  f"{row['feature']['flagged']} | {row['feature']['flagged_by_distance_alone']} | {row['voxel']['median_ratio']:.2f} | "
                  f"{row['feature']['median_ratio']:.2f} |"
                  for name, row in table.items()] + [""]
    failed = [name for name, ok in checks.items() if not ok]
    tissue_space = tissue_space_for(backbone, affine, train[0].shape)
    space = tissue_space.description if tissue_space is not None else f"`{backbone.name}` features (Euclidean)"
    body = f"""How the copy check (closer to a training subject than new people come AND singled out by it: d1/d2 below the held-out quantile, at most 0.7) and the distance threshold alone treat copies and non-copies, on `{args.data}` ({record['grid']}): {len(train)} training subjects, the {len(val)} val subjects as the yardstick (chance rate about {chance:.0%}), the test split as new people, and {f"{args.samples} samples of model `{generator.model_id}`" if generator else "no model"}. Voxel space: 1 − correlation after {DEFAULT_SMOOTHING_MM:g} mm smoothing; feature space: {space}.

    {command}

{chr(10).join(lines)}
Checks: {sum(checks.values())} of {len(checks)} passed{'' if not failed else ' (failed: ' + '; '.join(failed) + ')'}. Run time {record['seconds']:.0f} s. Result: {link(path, DOCUMENT)}."""
    replace_section(DOCUMENT, f"## privacy calibration ({record['grid']})", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
