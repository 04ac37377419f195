"""Time `mriflow prepare` on the shared IXI subjects, and draw the alignment picture.

For each preset, prepares all IXI subjects (label maps as masks, demographics.csv as
covariates) from scratch (``force``) with N workers, in a child process of its own
so that its peak memory is measured alone (resource.getrusage of the process and of
its worker processes). Writes benchmarks/results/prepare-<preset>.json and the
"## prepare" section of docs/benchmarks.md.

    python benchmarks/prepare.py --preset 4mm --preset 2mm --workers 2
    python benchmarks/prepare.py --picture --prepared /tmp/ixi2   # docs/prepare_alignment.png

Timings depend on what else runs on the machine; the load average before and
after each run is recorded next to the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from common import replace_section  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ixi"
SECTION = "## prepare"


def run_one(preset: str, workers: int, data: Path, out: Path) -> dict:
    """Prepare every subject once at `preset` (forced) and measure it; runs in its own process."""
    from mriflow.data.prepare import run_prepare

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    started = time.perf_counter()
    result = run_prepare(data / "T1", out, masks=data / "labels", covariates=[data / "demographics.csv"],
                         preset=preset, workers=workers, force=True)
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = json.loads(result.record.read_text())
    quality = [s["registration"]["mask_dice_mni"] for s in record["subjects"].values()]
    metrics = [s["registration"]["metric"] for s in record["subjects"].values()]
    per_subject = [s["seconds"] for s in record["subjects"].values()]
    return {
        "benchmark": "prepare",
        "preset": preset,
        "workers": workers,
        "subjects": len(result.prepared),
        "skipped": len(result.skipped),
        "seconds": round(seconds, 1),
        "subjects_per_second": round(len(result.newly_prepared) / seconds, 3),
        "seconds_per_subject_in_worker": {"mean": round(float(np.mean(per_subject)), 2), "max": round(float(np.max(per_subject)), 2)},
        # ru_maxrss is in KiB on Linux; for children it is the largest single worker, not a sum.
        "peak_memory_mb": {"main": round(own.ru_maxrss / 1024, 1), "largest_worker": round(children.ru_maxrss / 1024, 1)},
        "cpu_seconds": {"main": round(own.ru_utime + own.ru_stime, 1), "workers": round(children.ru_utime + children.ru_stime, 1)},
        "registration": {
            "mask_dice_mni": {"mean": round(float(np.mean(quality)), 4), "min": round(float(np.min(quality)), 4)},
            "final_metric": {"mean": round(float(np.mean(metrics)), 4), "max": round(float(np.max(metrics)), 4)},
        },
        "load_average_1min": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
        "cpus": os.cpu_count(),
        "out": str(out),
        "versions": record["versions"],
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def command_line(preset: str, workers: int, data: Path, out: Path) -> str:
    return (f"mriflow prepare {data / 'T1'} --masks {data / 'labels'} --covariates {data / 'demographics.csv'} "
            f"--preset {preset} --workers {workers} --force --out {out}")


def write_section(results: list[dict], workers: int, data: Path, out_root: Path) -> None:
    rows = ["| preset | subjects | workers | wall time (s) | subjects/s | s/subject in a worker (mean / max) | peak RSS main / largest worker (MB) | mask Dice vs MNI (mean / min) | load avg before / after |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(
            f"| {r['preset']} | {r['subjects']} | {r['workers']} | {r['seconds']} | {r['subjects_per_second']} | "
            f"{r['seconds_per_subject_in_worker']['mean']} / {r['seconds_per_subject_in_worker']['max']} | "
            f"{r['peak_memory_mb']['main']} / {r['peak_memory_mb']['largest_worker']} | "
            f"{r['registration']['mask_dice_mni']['mean']} / {r['registration']['mask_dice_mni']['min']} | "
            f"{r['load_average_1min']['before']} / {r['load_average_1min']['after']} |"
        )
    presets = " ".join(f"--preset {r['preset']}" for r in results)
    body = f"""Preparation of the {results[0]['subjects']} shared IXI T1 scans (2 mm native, label maps as brain masks,
demographics.csv as covariates): reorient, mask, rigid+affine registration to MNI152, one resampling,
[0, 1] scaling. Measured on a {results[0]['cpus']}-core machine shared with other work (see the load average).

```
python benchmarks/prepare.py {presets} --workers {workers} --data {data} --out-root {out_root}
```

Each run is the equivalent of

```
{command_line(results[0]['preset'], workers, data, out_root / results[0]['preset'])}
```

{chr(10).join(rows)}

"mask Dice vs MNI" is the overlap of each prepared brain mask with the MNI152 brain mask on the same grid
(a registration failure shows as a low value). Figures: `benchmarks/results/prepare-<preset>.json`.
Alignment picture: `docs/prepare_alignment.png` (`python benchmarks/prepare.py --picture --prepared /tmp/ixi2`).
"""
    replace_section(ROOT / "docs" / "benchmarks.md", SECTION, body)


def alignment_picture(prepared: Path, path: Path, count: int = 6) -> Path:
    """Mid-slices of `count` prepared subjects (and the template) with the MNI152 brain-mask outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from mriflow.config import get_grid
    from mriflow.data.dataset import read_manifest
    from mriflow.data.io import load_volume
    from mriflow.data.geometry import from_sitk, grid_reference, mni_template, template_brain_mask
    from mriflow.utils.montage import PLANES, three_plane_slices

    record = json.loads((prepared / "prepare.json").read_text())
    preset = record["preset"]
    manifest = read_manifest(prepared)
    chosen = manifest.iloc[np.linspace(0, len(manifest) - 1, count).round().astype(int)]
    template, _ = mni_template()
    rows = [("MNI152 template", from_sitk(sitk.Resample(template, grid_reference(get_grid(preset)), sitk.Transform(), sitk.sitkLinear, 0.0)))]
    rows[0] = (rows[0][0], rows[0][1] / max(float(rows[0][1].max()), 1e-6))
    for _, row in chosen.iterrows():
        volume, _ = load_volume(prepared / row["image"])
        dice = record["subjects"][row["subject"]]["registration"]["mask_dice_mni"]
        rows.append((f"{row['subject']}\nDice {dice:.3f}", volume))
    outline = three_plane_slices(template_brain_mask(preset).astype(np.float32))

    figure, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.5 * len(rows)), squeeze=False)
    for r, (name, volume) in enumerate(rows):
        for c, (plane, image) in enumerate(zip(PLANES, three_plane_slices(volume))):
            axis = axes[r, c]
            axis.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            axis.contour(outline[c], levels=[0.5], colors="red", linewidths=0.8)
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(plane)
            if c == 0:
                axis.set_ylabel(name, fontsize=8)
    figure.suptitle(f"prepared {preset} volumes (mid-slices) with the MNI152 brain-mask outline (red)", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.985))  # keep the title clear of the column names
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", action="append", choices=["4mm", "2mm", "1mm"], help="repeatable; default 4mm and 2mm")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA, help="the IXI folder (T1/, labels/, demographics.csv)")
    parser.add_argument("--out-root", type=Path, default=Path("/tmp/mriflow-bench-prepare"), help="prepared folders go to OUT_ROOT/<preset>")
    parser.add_argument("--picture", action="store_true", help="only draw docs/prepare_alignment.png from --prepared")
    parser.add_argument("--prepared", type=Path, default=Path("/tmp/ixi2"), help="prepared folder for --picture")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one preset in this process, print JSON
    args = parser.parse_args(argv)

    if args.picture:
        print(alignment_picture(args.prepared, ROOT / "docs" / "prepare_alignment.png"))
        return 0
    if args.one:
        print(json.dumps(run_one(args.one, args.workers, args.data, args.out_root / args.one)))
        return 0

    results = []
    for preset in args.preset or ["4mm", "2mm"]:
        child = subprocess.run(
            [sys.executable, __file__, "--one", preset, "--workers", str(args.workers), "--data", str(args.data), "--out-root", str(args.out_root)],
            stdout=subprocess.PIPE, text=True, check=True,
        )
        result = json.loads(child.stdout.strip().splitlines()[-1])
        results.append(result)
        target = ROOT / "benchmarks" / "results" / f"prepare-{preset}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{preset}: {result['subjects']} subjects in {result['seconds']} s ({result['subjects_per_second']} subjects/s), "
              f"peak RSS {result['peak_memory_mb']}, Dice vs MNI {result['registration']['mask_dice_mni']}")
    write_section(results, args.workers, args.data, args.out_root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
