"""Time `evaluate_generation` on N real vs N generated volumes (default 100 vs 100 at 2 mm).

Builds a temporary view of a prepared folder in which N subjects form the "test"
split (images are linked, never copied or changed), writes N stand-in "generated"
volumes (real volumes, left-right flipped, lightly blurred and noised), and times the
whole evaluation, bootstrap and report included. Writes
benchmarks/results/evaluate-<grid>.json and the "## evaluate" section of
docs/benchmarks.md.

    python benchmarks/evaluate.py --data /tmp/ixi2 --count 100
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import gaussian_filter
from tqdm import tqdm

from mriflow.data.dataset import read_manifest
from mriflow.data.io import load_volume, save_volume
from mriflow.evaluate.backbones import DeepbetBackbone, RadImageNetResNet50, medicalnet_resnet
from mriflow.evaluate.generation import evaluate_generation

from common import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
SECTION = "## evaluate"


def build_view(data: Path, work: Path, count: int) -> Path:
    """A prepared-folder view: `count` subjects as test, the rest split evenly into train and val.

    The bootstrap draws one n for every column (80 % of the smallest set), so the
    val split, the smallest, sets n; an even split keeps it as large as the data allows."""
    manifest = read_manifest(data)
    if len(manifest) < count + 9:
        raise SystemExit(f"{data} has {len(manifest)} subjects; --count {count} needs at least {count + 9}")
    view = work / "prepared"
    view.mkdir(parents=True)
    for name in ("images", "masks"):
        os.symlink((data / name).resolve(), view / name)
    if (data / "prepare.json").is_file():
        shutil.copy(data / "prepare.json", view / "prepare.json")
    order = np.random.default_rng(0).permutation(len(manifest))
    split = np.empty(len(manifest), dtype=object)
    rest = order[count:]
    split[order[:count]] = "test"
    split[rest[: len(rest) // 2]] = "train"
    split[rest[len(rest) // 2 :]] = "val"
    manifest = manifest.copy()
    manifest["split"] = split
    manifest.to_csv(view / "manifest.csv", index=False)
    return view


def write_stand_ins(data: Path, folder: Path, count: int) -> None:
    """Stand-in generated volumes: real ones flipped left-right, blurred (sigma 0.5 voxel) and noised."""
    manifest = read_manifest(data)
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    for i in tqdm(range(count), desc="writing stand-in generated volumes"):
        volume, affine = load_volume(data / manifest["image"].iloc[i % len(manifest)])
        volume = gaussian_filter(volume[::-1], 0.5) + rng.normal(0, 0.01, volume.shape) * (volume > 0)
        save_volume(folder / f"sample_{i:04d}.nii.gz", np.clip(volume, 0, 1).astype(np.float32), affine)


@torch.no_grad()
def backbone_seconds_per_volume(shape: tuple[int, int, int], repeats: int = 4) -> dict[str, float]:
    """Forward time per volume of the pretrained-network backbones, with random weights (same compute,
    no weight files needed; deepbet with its installed weights): what choosing them adds to the
    `features` stage."""
    costs = {}
    volumes = torch.rand(repeats, 1, *shape)
    for depth in (10, 50):
        network = medicalnet_resnet(depth)
        network(volumes[:1])  # warm-up
        started = time.perf_counter()
        network(volumes)
        costs[f"medicalnet-resnet{depth}"] = (time.perf_counter() - started) / repeats
    network = RadImageNetResNet50().eval()
    slices = 16  # RadImageNetBackbone's default per plane
    planes = [torch.rand(slices, 3, *[s for axis, s in enumerate(shape) if axis != plane]) for plane in (2, 1, 0)]
    network(planes[0][:1])
    started = time.perf_counter()
    for batch in planes:
        network(batch)
    costs["radimagenet-resnet50"] = time.perf_counter() - started
    backbone = DeepbetBackbone()  # its real weights come with the deepbet package
    backbone.features(volumes[:1].numpy())
    started = time.perf_counter()
    backbone.features(volumes.numpy())
    costs["deepbet"] = (time.perf_counter() - started) / repeats
    return {name: round(seconds, 3) for name, seconds in costs.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("/tmp/ixi2"), help="a prepared folder (mriflow prepare)")
    parser.add_argument("--count", type=int, default=100, help="real test subjects and generated volumes")
    parser.add_argument("--backbone", default="auto", help="as `mriflow evaluate generation --backbone` (default auto)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not (args.data / "manifest.csv").is_file():
        print(f"{args.data}: no prepared data (manifest.csv); run `mriflow prepare` first", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    record_path = args.data / "prepare.json"
    grid = json.loads(record_path.read_text()).get("preset", "unknown") if record_path.is_file() else "unknown"

    with tempfile.TemporaryDirectory(prefix="mriflow-bench-evaluate-") as temporary:
        work = Path(temporary)
        view = build_view(args.data, work, args.count)
        write_stand_ins(args.data, work / "generated", args.count)
        started = time.perf_counter()
        result = evaluate_generation(view, work / "generated", work / "report", split="test", other_split="val",
                                     backbone=args.backbone, seed=0)
        elapsed = time.perf_counter() - started
    costs = backbone_seconds_per_volume(tuple(result["inputs"]["shape"]))

    record = {
        "benchmark": "evaluate_generation",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": str(args.data), "grid": grid, "shape": result["inputs"]["shape"],
        "counts": result["inputs"]["counts"], "backbone": result["backbone"]["name"],
        "settings": result["settings"], "msssim": result["diversity"]["settings"],
        "seconds_total": round(elapsed, 1), "seconds_by_stage": result["timing_s"],
        "machine": {"cpus": os.cpu_count(), "torch_threads": args.threads, "platform": platform.platform(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "real_vs_generated_fd": result["columns"]["real_vs_generated"]["fd"]["mean"],
        "backbone_seconds_per_volume": costs,
    }
    results = ROOT / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    target = results / f"evaluate-{grid}.json"
    target.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    if not args.no_docs:
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in result["timing_s"].items() if k != "total")
        counts = result["inputs"]["counts"]
        body = f"""Time to evaluate {counts['real']} real (test) vs {counts['generated']} generated volumes at {grid} \
({' x '.join(map(str, result['inputs']['shape']))}), with {counts['other']} val and {counts['train']} train subjects \
for the Real vs Real column and memorization; backbone `{result['backbone']['name']}`, bootstrap {result['settings']['bootstrap_rounds']} \
rounds at n = {result['settings']['n']}, {result['settings']['diversity_pairs']} MS-SSIM pairs per set, report included.

    python benchmarks/evaluate.py --data {args.data} --count {args.count} --backbone {args.backbone} --threads {args.threads}

| grid | real vs generated | torch threads | total | stages |
|---|---|---|---|---|
| {grid} | {counts['real']} vs {counts['generated']} | {args.threads} (of {os.cpu_count()} CPUs, shared machine) | {elapsed:.0f} s | {stages} |

{chr(10).join('The report warns: ' + w + '.' for w in result['warnings'])}

Forward pass per volume of the pretrained backbones ({sum(counts[k] for k in ('real', 'other', 'generated', 'train'))} \
volumes here; MedicalNet and RadImageNet measured with random weights), on the same grid and threads: \
{', '.join(f'`{name}` {seconds:.2f} s' for name, seconds in costs.items())} per volume.

Result: [{target.relative_to(ROOT)}]({Path('..') / target.relative_to(ROOT)}). Target: < 5 min on a 2-core CPU."""
        replace_section(ROOT / "docs" / "benchmarks.md", SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
