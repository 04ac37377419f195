"""`mriflow prepare`: real scans (a NIfTI folder or BIDS) into a prepared template-space dataset (`data.prepare`)."""

from __future__ import annotations

import argparse

from mriflow.cli.common import fail


def add_commands(commands) -> None:
    p = commands.add_parser("prepare", help="real scans (NIfTI folder or BIDS) -> prepared template-space dataset",
                            description="Reorient to RAS, extract the brain, (N4), register to MNI152, resample to the "
                                        "preset grid and scale to [0, 1]; writes one NIfTI per subject, manifest.csv, "
                                        "prepare.json and prepare_report.csv. Re-running with the same options resumes.")
    p.add_argument("images", help="folder of .nii/.nii.gz scans, or a BIDS root (sub-*/[ses-*/]anat/*_T1w.nii.gz)")
    p.add_argument("--out", required=True, help="output folder (created; never the input folder)")
    p.add_argument("--masks", help="folder of brain masks or label maps (label > 0 is brain), matched on subject id")
    p.add_argument("--covariates", action="append", default=[], metavar="CSV",
                   help="covariate table(s) with a subject column (repeatable; e.g. demographics.csv, region volumes)")
    p.add_argument("--covariate-columns", metavar="LIST",
                   help="columns to keep, optionally renamed: 'age,sex,509:ventricles' (default: every column)")
    p.add_argument("--preset", default="4mm", choices=("4mm", "2mm", "1mm"), help="template grid (default 4mm)")
    p.add_argument("--skull-strip", default="auto", choices=("auto", "mask", "deepbet", "none"),
                   help="auto: --masks when given, else the deepbet model; none: keep the head (default auto)")
    p.add_argument("--n4", action="store_true", help="N4 bias-field correction (SimpleITK)")
    p.add_argument("--no-register", dest="register", action="store_false",
                   help="skip registration to MNI152 (only for scans already in MNI space)")
    p.add_argument("--split", default="0.8,0.1,0.1", metavar="TRAIN,VAL,TEST",
                   help="subject-level split fractions (default 0.8,0.1,0.1; stratified by age when present)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split (recorded)")
    p.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    p.add_argument("--force", action="store_true",
                   help="prepare again subjects that are already done; needed to rebuild --out with other options")
    p.set_defaults(func=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> int:
    from mriflow.data.prepare import PrepareError, run_prepare

    try:
        split = tuple(float(v) for v in args.split.split(","))
    except ValueError:
        raise ValueError(f"--split {args.split!r}: expected three fractions like 0.8,0.1,0.1") from None
    try:
        result = run_prepare(args.images, args.out, masks=args.masks, covariates=args.covariates,
                             covariate_columns=args.covariate_columns, preset=args.preset, skull_strip=args.skull_strip,
                             n4=args.n4, register=args.register, workers=args.workers, force=args.force, split=split,
                             seed=args.seed)
    except PrepareError as error:
        return fail("prepare", error)
    print(result.summary())
    print(f"manifest: {result.manifest}\nrecord:   {result.record}")
    return 0
