"""Acceptance check of the evaluation suite on real data: do the metrics tell good from broken?

From a prepared folder, builds "generated" sets out of the real other-split (val)
volumes, in a temporary folder (the prepared data is never changed):

  real val        the volumes as they are: Real vs Real, the best any generator can do
  blurred         Gaussian blur, sigma 1.5 voxels
  blurred 1 voxel Gaussian blur, sigma 1 voxel: the sharpness section must read it as blurred (its high-frequency
                  energy ratio more than two combined sds below the real set's) though the set metrics may not
  noised          additive Gaussian noise, sd 0.1, clipped to [0, 1]
  shuffled slices axial slices in a random order
  planted copies  the real val volumes plus, from the training split, exact copies of 5 subjects,
                  deformed copies of 5 others (smooth random displacement, sd 2 mm over 8 mm) and
                  5 averages of 5 subjects each (a smooth, near-mean brain: not a copy)

and runs `evaluate_generation` (test split as the real reference) on each. Checks
that every broken set is worse than "real val" on every set metric in the direction
the metric promises, and that the privacy audit flags every exact and deformed copy and
no average and no held-out (val) scan, in voxel space and in the report's feature space
(the anatomy network's tissue maps where the grid has one; see benchmarks/privacy_calibration.py
for the full confusion table with noisy and blurred copies and a model's samples).
Writes benchmarks/results/evaluate-sanity-<grid>-<backbone>.json and the "## evaluation sanity: <backbone>"
section of docs/benchmarks.md.

    python benchmarks/evaluate_sanity.py --data /tmp/ixi4 --keep /tmp/evaluate-sanity
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from mriflow.data.dataset import read_manifest
from mriflow.data.io import load_volume, save_volume
from mriflow.evaluate.generation import evaluate_generation
from mriflow.evaluate.metrics import LOWER_IS_BETTER
from mriflow.evaluate.verdict import verdict

from common import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)
from privacy_calibration import AVERAGED, DEFORMATION_MM, deformed  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## evaluation sanity: {backbone} ({grid})"  # one section (and one result file) per backbone and grid
PLANTED = 5


def blurred(volume, rng):
    return gaussian_filter(volume, 1.5)


def blurred_one_voxel(volume, rng):
    return gaussian_filter(volume, 1.0)


def noised(volume, rng):
    return np.clip(volume + rng.normal(0, 0.1, volume.shape), 0, 1)


def shuffled(volume, rng):
    return volume[:, :, rng.permutation(volume.shape[2])]


BROKEN = {"blurred": blurred, "noised": noised, "shuffled slices": shuffled}


def planted_set(data: Path, val: list[Path], train_images: list[str], seed: int) -> tuple[list[np.ndarray], dict[str, list[int]]]:
    """The val volumes, then PLANTED exact copies, PLANTED deformed copies (other subjects) and PLANTED averages of
    AVERAGED training subjects; returns the volumes and the indices of each kind."""
    rng = np.random.default_rng(seed)
    load = lambda name: load_volume(data / name)[0]  # noqa: E731
    volumes = [load_volume(path)[0] for path in val]
    voxel_mm = float(np.sqrt((load_volume(val[0])[1][:3, :3] ** 2).sum(axis=0)).mean())
    chosen = rng.choice(len(train_images), 2 * PLANTED, replace=False)
    planted = {
        "exact copies": [load(train_images[i]) for i in chosen[:PLANTED]],
        "deformed copies": [deformed(load(train_images[i]), rng, DEFORMATION_MM / voxel_mm, 8.0 / voxel_mm)
                            for i in chosen[PLANTED:]],
        "averages of 5": [np.mean([load(train_images[j]) for j in rng.choice(len(train_images), AVERAGED, replace=False)],
                                  axis=0) for _ in range(PLANTED)],
    }
    kinds = {"held-out scans": list(range(len(volumes)))}
    for kind, members in planted.items():
        kinds[kind] = list(range(len(volumes), len(volumes) + len(members)))
        volumes += [np.asarray(v, np.float32) for v in members]
    return volumes, kinds


def write_set(folder: Path, sources: list[Path] | list[np.ndarray], transform=None, seed: int = 0, affine=None) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i, source in enumerate(sources):
        volume, affine = (source, affine) if isinstance(source, np.ndarray) else load_volume(source)
        if transform is not None:
            volume = transform(volume, rng)
        save_volume(folder / f"sample_{i:03d}.nii.gz", np.asarray(volume, np.float32), affine)


def summarise(result: dict) -> dict:
    column = result["columns"]["real_vs_generated"]
    memorization = result["memorization"]
    return {
        "metrics": {m: {"mean": column[m]["mean"], "sd": column[m]["sd"]} for m in LOWER_IS_BETTER},
        "msssim_generated": result["diversity"]["generated"]["mean"],
        "msssim_real": result["diversity"]["real"]["mean"],
        "flagged_voxel": [r["generated"] for r in memorization["table"] if r["voxel_flagged"]],
        "flagged_feature": [r["generated"] for r in memorization["table"] if r.get("feature_flagged")],
        "hf_ratio": {k: result["sharpness"]["sets"]["generated"]["laplacian"]["ratio"][k] for k in ("mean", "sd")},
        "sharpness_reading": next((row[3] for row in verdict(result) if row[0].startswith("sharpness")), None),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/ixi4"), help="a prepared folder (mriflow prepare)")
    parser.add_argument("--backbone", default="intensity")
    parser.add_argument("--split", default="test")
    parser.add_argument("--other-split", default="val")
    parser.add_argument("--keep", type=Path, help="keep the broken sets and reports in this new folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.csv").is_file():
        print(f"{args.data}: no prepared data (manifest.csv); run `mriflow prepare` first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    manifest = read_manifest(args.data)
    other = [args.data / p for p in manifest.loc[manifest["split"] == args.other_split, "image"]]
    train = manifest[manifest["split"] == "train"]
    grid = json.loads((args.data / "prepare.json").read_text()).get("preset", "unknown")

    work = Path(tempfile.mkdtemp(prefix="mriflow-evaluate-sanity-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=args.keep is None)
    sets = {"real val": (other, None)}
    sets.update({name: (other, transform) for name, transform in BROKEN.items()})
    sets["blurred 1 voxel"] = (other, blurred_one_voxel)  # read by the sharpness section, not the set metrics
    planted, kinds = planted_set(args.data, other, list(train["image"]), seed=len(sets))
    sets["planted copies"] = (planted, None)
    summaries, started = {}, time.perf_counter()
    try:
        for index, (name, (sources, transform)) in enumerate(sets.items()):
            slug = name.replace(" ", "-")
            write_set(work / "sets" / slug, sources, transform, seed=index, affine=load_volume(other[0])[1])
            result = evaluate_generation(args.data, work / "sets" / slug, work / "reports" / slug, split=args.split,
                                         other_split=args.other_split, backbone=args.backbone, seed=0)
            summaries[name] = summarise(result)
            settings, backbone = result["settings"], result["backbone"]
    finally:
        if args.keep is None:
            shutil.rmtree(work)
    elapsed = time.perf_counter() - started

    clean = summaries["real val"]["metrics"]
    checks = {}
    for name in BROKEN:
        for metric, lower in LOWER_IS_BETTER.items():
            value = summaries[name]["metrics"][metric]["mean"]
            checks[f"{name}: {metric}"] = bool(value > clean[metric]["mean"]) if lower else bool(value < clean[metric]["mean"])
    real_hf, soft_hf = summaries["real val"]["hf_ratio"], summaries["blurred 1 voxel"]["hf_ratio"]
    checks["sharpness: a 1-voxel blur's high-frequency energy below real's by > 2 sds"] = bool(
        soft_hf["mean"] < real_hf["mean"] - 2 * np.hypot(soft_hf["sd"], real_hf["sd"]))
    checks["sharpness: the verdict reads a 1-voxel blur as blurred"] = str(
        summaries["blurred 1 voxel"]["sharpness_reading"]).startswith("blurred")
    checks["sharpness: the verdict reads real val as sharp as real"] = \
        summaries["real val"]["sharpness_reading"] == "as sharp as real brains"
    names = {kind: {f"sample_{i:03d}" for i in indices} for kind, indices in kinds.items()}
    planted_flags = {}
    for space in ("voxel", "feature"):
        flagged = set(summaries["planted copies"][f"flagged_{space}"])
        planted_flags[space] = {kind: sorted(members & flagged) for kind, members in names.items()}
        for kind in ("exact copies", "deformed copies"):
            checks[f"{kind} flagged ({space} space)"] = names[kind] <= flagged
        for kind in ("averages of 5", "held-out scans"):
            checks[f"no {kind[:-1] if kind.endswith('s') else kind} flagged ({space} space)"] = not (names[kind] & flagged)
        checks[f"no clean volume flagged ({space} space)"] = not summaries["real val"][f"flagged_{space}"]
    summaries["planted copies"]["kinds"] = {kind: sorted(members) for kind, members in names.items()}
    summaries["planted copies"]["flagged_by_kind"] = planted_flags

    record = {"benchmark": "evaluate_sanity", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "data": str(args.data), "grid": grid, "backbone": backbone, "settings": settings,
              "sets": summaries, "checks": checks, "all_passed": all(checks.values()), "seconds": round(elapsed, 1)}
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    target = results / f"evaluate-sanity-{grid}-{args.backbone}.json"
    target.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({"checks": checks, "all_passed": record["all_passed"]}, indent=1))

    if not args.no_docs:
        metrics = list(LOWER_IS_BETTER)
        header = "| generated set | " + " | ".join(f"{m} {'↓' if LOWER_IS_BETTER[m] else '↑'}" for m in metrics) + \
                 " | MS-SSIM | HF energy / real | flagged (voxel / feature) |"
        lines = [header, "|" + "---|" * (len(metrics) + 4)]
        for name, summary in summaries.items():
            cells = [f"{summary['metrics'][m]['mean']:.3g} ± {summary['metrics'][m]['sd']:.2g}" for m in metrics]
            msssim = f"{summary['msssim_generated']:.3f}"
            sharp = f"{summary['hf_ratio']['mean']:.2f} ± {summary['hf_ratio']['sd']:.2f}"
            flags = f"{len(summary['flagged_voxel'])} / {len(summary['flagged_feature'])}"
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {msssim} | {sharp} | {flags} |")
        failed = [k for k, ok in checks.items() if not ok]
        body = f"""Real {args.split} split ({settings['n']} drawn per set, {settings['bootstrap_rounds']} bootstrap rounds) vs sets \
built from the real {args.other_split} volumes of `{args.data}` ({grid}); backbone `{backbone['name']}`. \
Every column is "Real vs <set>"; the first row is what real data scores (the same sets as the report's Real vs Real \
column), the broken rows must be worse on every metric (arrows: the better direction); MS-SSIM is the diversity of the set. Real MS-SSIM (diversity of the {args.split} split): {summaries['real val']['msssim_real']:.3f}. \
The planted set adds to the {len(other)} real {args.other_split} volumes (held-out scans) {PLANTED} exact copies of training subjects, {PLANTED} deformed copies of others (smooth displacement, sd {DEFORMATION_MM:g} mm over 8 mm) and {PLANTED} averages of {AVERAGED} training subjects each; its "flagged" column counts all of them.

    python benchmarks/evaluate_sanity.py --data {args.data} --backbone {args.backbone}

{chr(10).join(lines)}

Checks: {sum(checks.values())} of {len(checks)} passed{'' if not failed else ' (failed: ' + ', '.join(failed) + ')'}; \
flagged in the planted set, by kind (voxel / feature space): {'; '.join(f"{kind} {len(planted_flags['voxel'][kind])} / {len(planted_flags['feature'][kind])} of {len(names[kind])}" for kind in names)}. Run time {elapsed:.0f} s. \
Result: [{target.relative_to(ROOT)}]({Path('..') / target.relative_to(ROOT)})."""
        replace_section(ROOT / "docs" / "benchmarks.md", SECTION.format(backbone=args.backbone, grid=grid), body)
    return 0 if record["all_passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
