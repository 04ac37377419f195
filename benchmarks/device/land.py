"""Put what a device job brought back where it belongs, measure it here, and mark the job done.

    python benchmarks/device/land.py FILES_AT [--data data/ixi2]

FILES_AT is the device tool's files_at folder (run.py's --out). By job:

- J1a: autoencoder/ -> src/mriflow/weights/2mm-gpu/autoencoder/; with --data (a 2 mm prepared folder
  with its test split), the reconstruction is measured here on the test split, which never travels.
- J1b: flow/ -> src/mriflow/weights/2mm-gpu/flow/ (beside the autoencoder it was trained on, whose
  checksum it records). `--model 2mm-gpu` then loads it; measure it with `benchmarks/default_model.py
  --model 2mm-gpu` and make it the default (generator.DEFAULT_MODEL) where it beats the CPU-trained `2mm`.
- J2: anatomy.safetensors (the selected, uncalibrated network) is calibrated and measured here by
  `benchmarks/anatomy.py --init FILE --epochs 0` on --data (a 2 mm prepared folder with its label maps
  and test split, which never travels) and --regions; only then is it written to
  src/mriflow/weights/anatomy-2mm.safetensors, with benchmarks/results/anatomy-2mm.json and the
  "## anatomy backbone: 2mm" section.
- J5: its result JSON -> benchmarks/results/, its sections -> docs/benchmarks.md.

Every job: result.json -> benchmarks/results/device-<job>.json, log.csv beside it, montage ->
docs/device_<job>.png, a "## device <job>" section in docs/benchmarks.md, and the job marked done in
queue.yaml. Weights already in place are not replaced without --replace. A failed job is not landed:
its error is printed (the queue keeps it open).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common import DOCUMENT, RESULTS, link, replace_section  # noqa: E402
import jobqueue  # noqa: E402
import pack  # noqa: E402

WEIGHTS_2MM = ROOT / "src" / "mriflow" / "weights" / "2mm-gpu"  # beside the CPU-trained 2mm until measured better
PLACES = {"J1a": ("autoencoder", WEIGHTS_2MM / "autoencoder"), "J1b": ("flow", WEIGHTS_2MM / "flow"),
          "J2": ("anatomy.safetensors", ROOT / "src" / "mriflow" / "weights" / "anatomy-2mm.safetensors")}
REGIONS = ROOT.parent / "shared" / "data" / "ixi"  # muse_regions.csv (and region_volumes.csv) of the label maps


def land(files: Path, data: Path | None = None, replace: bool = False, document: Path = DOCUMENT,
         results: Path = RESULTS, queue: Path = jobqueue.QUEUE, places: dict | None = None,
         regions: Path = REGIONS, kit: Path = pack.KIT) -> dict:
    """Land the job in `files`; returns its record (result.json) with what was measured here. What the kit left
    home (`pack.py --leave-home`) comes back from git first."""
    from mriflow import checkpoint as ckpt

    for path in pack.restore(kit):
        print(f"restored {path} (it stayed home while the job ran)")
    record = json.loads((files / "result.json").read_text())
    job = record["job"]
    if record.get("status") != "done":
        raise ValueError(f"{files / 'result.json'}: job {job} {record.get('status')}: {record.get('error')}; "
                         "it stays open in the queue")
    places = PLACES if places is None else places
    lines = []
    if job == "J2":
        record["test"], line = land_anatomy(files / places[job][0], places[job][1], data, regions, replace, document,
                                            results)
        lines.append(line)
    elif job in places:
        name, target = places[job]
        if target.exists() and not replace:
            raise FileExistsError(f"{target} exists; pass --replace to put the new weights there")
        ckpt.load_checkpoint(files / name)  # refuses anything but a complete mriflow checkpoint
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(files / name, target)
        lines.append(f"Weights: `{target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}` "
                     f"({(target / ckpt.MODEL_FILE).stat().st_size / 1e6:.1f} MB, float16).")
    if job == "J1a" and data is not None:
        from mriflow.evaluate.reconstruction import evaluate_reconstruction

        summary = evaluate_reconstruction(data, places[job][1], split="test", out=results.parent / "tmp-reconstruction",
                                          device="cpu")
        record["test"] = {k: round(v["mean"], 4) for k, v in summary["metrics"].items()}
        record["test_subjects"] = summary["subjects"]
        montage = results.parent / "tmp-reconstruction" / "montage.png"
        shutil.copy(montage, document.parent / f"device_{job}_test.png")
        shutil.rmtree(results.parent / "tmp-reconstruction")
    results.mkdir(parents=True, exist_ok=True)
    if (files / "log.csv").is_file():
        shutil.copy(files / "log.csv", results / f"device-{job}-log.csv")
    if (files / "montage.png").is_file():
        shutil.copy(files / "montage.png", document.parent / f"device_{job}.png")
    for extra in sorted(files.glob("generate-*.json")):
        shutil.copy(extra, results / extra.name)
    if (files / "sections.md").is_file():
        for header, body in sections(files / "sections.md"):
            body = re.sub(r"\[[^\]]*?([\w.-]+\.json)\]\([^)]*\)", lambda m: link(results / m.group(1), document), body)
            replace_section(document, header, body)
    path = results / f"device-{job}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    replace_section(document, f"## device {job}", summary_text(record, path, document, lines))
    machine = record.get("machine", {})
    jobqueue.mark_done(job, {"ran": record["started"][:10], "device": machine.get("device"),
                             "result": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)}, queue)
    return record


def land_anatomy(weights: Path, target: Path, data: Path | None, regions: Path, replace: bool, document: Path,
                 results: Path) -> tuple[dict, str]:
    """Calibrate and measure the anatomy network `weights` here (benchmarks/anatomy.py --epochs 0: features and sex
    read-out fitted on the train and val splits, figures on the test split), writing it to `target` only once measured.
    Returns (test figures, a line for the summary)."""
    import anatomy as benchmark

    if data is None:
        raise ValueError("J2: pass --data, a 2 mm prepared folder with label maps and its test split: the anatomy "
                         "network is calibrated and measured here before it is installed")
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; pass --replace to put the new weights there")
    benchmark.main(["--data", str(data), "--regions", str(regions), "--init", str(weights), "--epochs", "0",
                    "--out", str(target), "--document", str(document), "--results", str(results)])
    measured = json.loads((results / f"anatomy-{_grid(target)}.json").read_text())["test"]
    test = {"subjects": measured["subjects"], "age_mae_years": round(measured["age_mae_years"], 2),
            "sex_accuracy": round(measured["sex_accuracy"], 3),
            **{f"dice_{name}": round(value, 3) for name, value in measured["dice"].items()}}
    shown = target.relative_to(ROOT) if target.is_relative_to(ROOT) else target
    return test, (f"Weights: `{shown}` ({target.stat().st_size / 1e6:.1f} MB, kernels float16), calibrated and "
                  f"measured here: see its \"## anatomy backbone\" section.")


def _grid(weights: Path) -> str:
    from mriflow.models.anatomy import read_anatomy_config

    return read_anatomy_config(weights)[0].grid


def sections(path: Path) -> list[tuple[str, str]]:
    """The '## ' sections of a markdown file, as (header, body)."""
    found, header, body = [], None, []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            if header:
                found.append((header, "\n".join(body)))
            header, body = line.strip(), []
        elif header:
            body.append(line)
    if header:
        found.append((header, "\n".join(body)))
    return found


def summary_text(record: dict, path: Path, document: Path, lines: list[str]) -> str:
    result, machine = record["result"], record.get("machine", {})
    text = [f"Ran on {machine.get('device')} (torch {machine.get('torch')}, CUDA {machine.get('cuda')}) on "
            f"{record['started'][:10]}: {record['seconds'] / 60:.1f} of {record['minutes_budget']} minutes, peak GPU memory "
            f"{machine.get('peak_gpu_memory_mb')} MB.", "", f"    {record['command']}", ""]
    if "probe" in result:
        text.append(f"Probe: {result['probe']['steps_per_second']} steps/s; schedule fitted to the budget: "
                    + ", ".join(f"{k} {v}" for k, v in result["schedule"].items()) + f"; trained {result['steps']} steps.")
    if "validation" in result:
        text.append("Validation split, on the GPU (" + str(result["validation_subjects"]) + " subjects): "
                    + ", ".join(f"{k} {v:.4f}" for k, v in result["validation"].items()) + ".")
    if "test" in record and record["job"] == "J2":
        text.append(f"Test split, measured here ({record['test']['subjects']} subjects): "
                    + ", ".join(f"{k} {v}" for k, v in record["test"].items() if k != "subjects") + ".")
    elif "test" in record:
        text.append(f"Test split, measured here ({record['test_subjects']} subjects): "
                    + ", ".join(f"{k} {v}" for k, v in record["test"].items())
                    + f". Montage: `docs/device_{record['job']}_test.png`.")
    text += lines + [f"Result: {link(path, document)}."]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", help="what the device job returned (the device tool's files_at)")
    parser.add_argument("--data", help="J1a, J2: a 2 mm prepared folder with a test split (J2: and label maps), to "
                        "measure the job's network here")
    parser.add_argument("--regions", default=str(REGIONS), help="J2: folder with the label maps' muse_regions.csv")
    parser.add_argument("--replace", action="store_true", help="replace weights already in place")
    args = parser.parse_args(argv)
    try:
        record = land(Path(args.files), Path(args.data) if args.data else None, args.replace, regions=Path(args.regions))
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"land: {error}", file=sys.stderr)
        return 2
    print(f"landed {record['job']}; commit the weights, docs/benchmarks.md, benchmarks/results and queue.yaml")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    sys.exit(main())
