"""`mriflow edit`: a real scan drawn again under other covariates by inverting the flow (mriflow.edit): this brain at
75, or as the other sex."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mriflow.cli.common import add_threads

# the shipped model edits use by default: the 16-evaluation flow, not the default's one-evaluation student (a student
# learned its teacher's way from noise to samples; inverting real scans with it is not what the benchmark measured)
EDIT_MODEL = "2mm"


def add_commands(commands) -> None:
    p = commands.add_parser(
        "edit", help="a real scan at another age or sex: the flow inverted under its covariates, drawn under new ones",
        description="Invert a prepared scan to its noise with the model under the scan's covariates (its row of the "
                    "prepared folder's manifest, or --from) and draw it again under each target: --age 40,60,80 makes "
                    "three edits that share one inversion. Writes each edit (NIfTI on the template grid) with its "
                    "tissue map, a difference map (edit minus the scan; with --detail model, minus the round trip "
                    "under unchanged covariates), the model's round trip and JSON sidecars that name the source "
                    "scan. The edits derive from a real person: share them as you would the scan.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--scan", help="a prepared volume on the model's grid (DATA/images/SUBJECT.nii.gz), or a folder of "
                                      "them (each edited to the same targets)")
    which.add_argument("--batch", metavar="CSV",
                       help="many edits: a table with a scan column (paths relative to it), target columns (age, sex, "
                            "...) and optional from_<name> columns for a scan's own covariates; rows of one scan "
                            "share its inversion")
    p.add_argument("--out", required=True, help="folder for the edits (new, or without these names)")
    p.add_argument("--model", default=EDIT_MODEL, help="generator run, checkpoint or model folder, or a shipped "
                                                        f"model's name (default: {EDIT_MODEL}, the shipped 16-evaluation "
                                                        "flow, whose inversion benchmarks/counterfactuals.py measures)")
    p.add_argument("--age", help="target age(s), comma-separated (one edit each)")
    p.add_argument("--sex", help="target sex (with --age: applied to every age)")
    p.add_argument("--covariate", action="append", default=[], metavar="NAME=VALUE",
                   help="another target covariate (repeatable), applied to every edit")
    p.add_argument("--from", dest="source", metavar="NAME=VALUE,...",
                   help="the scan's own covariates, e.g. age=52,sex=F (default: its row of the prepared manifest)")
    p.add_argument("--prepare", choices=("brain", "head"),
                   help="the scan is a raw T1 from outside mriflow (any voxel size, orientation, field of view): take it "
                        "through the preparation recipe onto the model's grid first (OUT/prepared/; brain: already "
                        "skull-stripped, head: stripped by deepbet); give its covariates with --from or from_ columns")
    p.add_argument("--steps", type=int, default=16, help="solver steps each way (default 16)")
    p.add_argument("--solver", default="heun", choices=("euler", "heun", "midpoint", "rk4"))
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance both ways (default 1: the conditional velocity); above 1 the covariates "
                        "change more, at some cost to the round trip's fidelity")
    p.add_argument("--detail", default="moved", choices=("moved", "scan", "model"),
                   help="whose detail an edit carries: moved (default) = the scan's own detail moved with the edit (the "
                        "deformation from the model's round trip to its edit, by demons registration, applied to the "
                        "scan, plus the change it does not explain; about 2 s per target), so the person's anatomy stays "
                        "as scanned, its edges follow widening ventricles and an unchanged edit is the scan itself; "
                        "scan = the scan plus what the edit changes (edit minus round trip: sharpest, but the old edges "
                        "stay beside the new ones and some of the scan's age with them); model = the model's own drawing "
                        "(as sharp as its autoencoder; docs/benchmarks.md 'counterfactuals')")
    p.add_argument("--no-labels", action="store_true", help="write no tissue maps")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--trust-model-paths", action="store_true",
                   help="let a model folder name files outside itself (only for a model you trust)")
    add_threads(p)
    p.set_defaults(func=_run_edit)


def pairs(text: str, argument: str) -> dict[str, Any]:
    """'age=52,sex=F' -> {"age": 52.0, "sex": "F"}; a malformed pair is one line naming the argument."""
    from mriflow.models.conditioning import parse_value

    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = item.partition("=")
        if not equals or not name.strip() or not value.strip():
            raise ValueError(f"{argument} {text!r}: give NAME=VALUE pairs separated by commas, e.g. age=52,sex=F")
        values[name.strip()] = parse_value(value.strip())
    return values


def targets_of(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One target per --age value (or one for --sex/--covariate alone), each with --sex and --covariate's values."""
    from mriflow.models.conditioning import parse_value

    shared = {}
    for item in args.covariate:
        shared.update(pairs(item, "--covariate"))
    if args.sex:
        shared["sex"] = args.sex.strip()
    ages = [parse_value(a.strip()) for a in args.age.split(",") if a.strip()] if args.age else []
    if not ages and not shared:
        raise ValueError("--age, --sex or --covariate: say what to change (e.g. --age 40,60,80)")
    return [{"age": age, **shared} for age in ages] or [shared]


def jobs_of(args: argparse.Namespace) -> list[tuple[Path, dict[str, Any] | None, list[dict[str, Any]]]]:
    """(scan, its covariates or None for its manifest row, targets) for each scan the arguments name."""
    from mriflow.data.io import is_nifti
    from mriflow.edit import read_batch

    if args.batch:
        if args.age or args.sex or args.covariate or args.source:
            raise ValueError("--batch: the targets come from its columns; drop --age, --sex, --covariate and --from")
        return read_batch(args.batch)
    source = pairs(args.source, "--from") if args.source else None
    scan = Path(args.scan)
    scans = sorted(p for p in scan.iterdir() if is_nifti(p)) if scan.is_dir() else [scan]
    if not scans:
        raise ValueError(f"--scan {scan}: a folder without NIfTI volumes; give a prepared scan or its images/ folder")
    if source is not None and len(scans) > 1:
        raise ValueError(f"--from: one scan's covariates, but --scan {scan} holds {len(scans)}; use --batch with "
                         "from_<name> columns")
    targets = targets_of(args)
    return [(path, source, targets) for path in scans]


def prepared_jobs(jobs, generator, out: Path, kind: str):
    """The jobs with each raw scan replaced by itself taken through the recipe onto the model's grid (out/prepared)."""
    from mriflow.data.outside import prepare_outside

    grid = generator.meta.get("grid")
    if not grid:
        raise ValueError(f"--prepare: the model {generator.path} does not name the grid it was trained on; prepare the "
                         "scan with `mriflow prepare` at the model's preset and edit the prepared volume")
    unknown = [str(scan) for scan, source, _ in jobs if source is None]
    if unknown:
        raise ValueError(f"--prepare: a raw scan has no manifest row with its covariates ({unknown[0]}); give them "
                         "with --from age=52,sex=F (or from_<name> columns in --batch)")
    prepared = prepare_outside(sorted({scan for scan, _, _ in jobs}), out, grid, kind, "--scan")
    return [(prepared[scan], source, targets) for scan, source, targets in jobs]


def _run_edit(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mriflow.edit import edit_scan
    from mriflow.generate import load_generator

    jobs = jobs_of(args)
    model = args.model
    if len(jobs) > 1 or args.prepare:  # loaded once for the batch (and for its grid)
        model = load_generator(args.model, args.device, args.trust_model_paths, labels=None if not args.no_labels else False)
    if args.prepare:
        jobs = prepared_jobs(jobs, model, Path(args.out), args.prepare)
    paths = []
    for scan, source, targets in tqdm(jobs, desc="edit", unit="scan", disable=len(jobs) < 2):
        paths += edit_scan(model, scan, args.out, targets, source=source, steps=args.steps, solver=args.solver,
                           device=args.device, labels=not args.no_labels, trust_paths=args.trust_model_paths,
                           guidance=args.guidance, detail=args.detail)
    print("\n".join(str(path) for path in paths) + f"\nround trip and difference maps beside them in {Path(args.out)}")
    return 0
