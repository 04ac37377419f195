"""`mriflow generate`: sample a trained generator, or a shipped model, into NIfTI volumes and their sidecars
(`generate`); `mriflow export`: a trained generator and its label decoder as a model folder that `generate
--model` samples (`export`)."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path
from typing import Any

from mriflow.cli.common import add_threads, is_main_process
from mriflow.utils.text import counted


def add_commands(commands) -> None:
    _add_generate(commands)
    _add_export(commands)


def _add_generate(commands) -> None:
    p = commands.add_parser(
        "generate", allow_abbrev=False, help="sample synthetic volumes (NIfTI in template space + JSON sidecars)",
        description="Sample volumes from a trained generator (default: the model shipped with mriflow). Any covariate "
                    "the model knows is an option: --age 45 --sex F, or --NAME VALUE / --covariate NAME=VALUE for the "
                    "others (e.g. region volumes); an unknown name is refused with the list of valid ones.")
    p.add_argument("--model", default="default",
                   help="generator run or checkpoint folder, a shipped model's name (2mm-fewstep, 2mm, 4mm), or 'default' "
                        "(2mm-fewstep: one network evaluation per brain)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", help="output folder (existing samples are never overwritten)")
    where.add_argument("--bids", metavar="DIR",
                       help="write a BIDS dataset instead: sub-<id>/anat/sub-<id>_T1w.nii.gz with sidecars, "
                            "participants.tsv with the covariates, dataset_description.json (GeneratedBy: the model "
                            "and command), tissue maps as derivatives/mriflow/ (_dseg.nii.gz, dseg.tsv); what generate "
                            "writes stays in DIR/sourcedata/mriflow/")
    p.add_argument("--num-samples", "--n", dest="n", type=int,
                   help="number of volumes (default 8; with --covariates, one per row); under torchrun spell it "
                        "--num-samples (torchrun reads --n as its own --nnodes/--nproc-per-node)")
    p.add_argument("--age", type=float, help="requested age in years")
    p.add_argument("--sex", help="requested sex, e.g. F or M")
    p.add_argument("--covariate", action="append", default=[], metavar="NAME=VALUE",
                   help="any other covariate of the model (repeatable)")
    p.add_argument("--covariates", metavar="CSV",
                   help="a synthetic cohort: one sample per row, columns = the model's covariates (empty = absent) "
                        "and optionally id/subject naming the files; the row goes into the sidecar (replaces --n)")
    p.add_argument("--solver", help="flow: euler, heun, midpoint, rk4, dopri5; diffusion: ddim, ddpm; gan: generator; "
                                    "slices: euler, heun, midpoint, rk4 "
                                    "(default: the model's)")
    p.add_argument("--steps", type=int, help="solver steps (default: the model's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale w (1 = conditional; default: the model's)")
    p.add_argument("--seed", type=int, default=0, help="base seed; sample i uses its own stream of (seed, i)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--trust-model-paths", action="store_true",
                   help="let an exported --model read its autoencoder from outside its own folder")
    p.add_argument("--privacy-filter", metavar="DATA",
                   help="prepared dataset: reject and redraw samples closer to a training subject than held-out "
                        "subjects (passed through the model's autoencoder) ever are")
    labels = p.add_mutually_exclusive_group()
    labels.add_argument("--labels", metavar="RUN",
                        help="what writes each sample's tissue map sample_XXXXX_labels.nii.gz: a label decoder run "
                             "(mriflow train labels) of the model's autoencoder, or 'anatomy' (mriflow's anatomy network "
                             "of the grid segments the sample); default: the model's own decoder when it has one, else "
                             "the anatomy network on the 4 mm and 2 mm grids")
    labels.add_argument("--no-labels", action="store_true", help="write no label maps")
    p.add_argument("--label-map", metavar="NIFTI",
                   help="a label-conditioned model (train flow --label-condition): the anatomy to draw, a label map on "
                        "the model's grid (tissue classes 0-5 as in sample_XXXXX_labels.nii.gz, or DLMUSE labels)")
    add_threads(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from mriflow.generate import generate
    from mriflow.models.conditioning import parse_value

    covariates: dict[str, Any] = {}
    for item in args.covariate + covariate_options(args.unknown):
        name, separator, value = item.partition("=")
        if not separator or not name:
            raise ValueError(f"--covariate {item!r}: expected NAME=VALUE, e.g. --covariate ventricles=25000")
        covariates[name.strip()] = parse_value(value.strip())
    if args.age is not None:
        covariates["age"] = args.age
    if args.sex is not None:
        covariates["sex"] = args.sex
    cohort = None
    if args.covariates is not None:
        from mriflow.generate import read_cohort

        if covariates:
            raise ValueError("--covariates CSV gives every sample its covariates; drop --age/--sex/--covariate "
                             "(or put them in the CSV)")
        cohort = read_cohort(args.covariates)
        if args.n is not None and args.n != len(cohort):
            raise ValueError(f"--n {args.n} differs from the {counted(len(cohort), 'row')} of {args.covariates}; "
                             "drop --n (one sample per row)")
    if args.bids is not None and any(Path(args.bids).glob("sub-*")):  # before any sampling
        raise FileExistsError(f"--bids {args.bids}: already holds sub-* folders; choose a new folder for the dataset")
    out = Path(args.bids) / "sourcedata" / "mriflow" if args.bids is not None else args.out
    result = generate(args.model, out, n=8 if args.n is None else args.n, covariates=covariates, solver=args.solver,
                      steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                      device=args.device, privacy_filter=args.privacy_filter, cohort=cohort,
                      trust_paths=args.trust_model_paths, labels=False if args.no_labels else args.labels,
                      label_map=args.label_map)
    if is_main_process():
        print(result.summary() if hasattr(result, "summary") else result)
        if args.bids is not None:
            from mriflow.bids import write_bids

            print(f"BIDS dataset: {write_bids(out, Path(args.bids))}")
    return 0


def covariate_options(tokens: list[str]) -> list[str]:
    """`--NAME VALUE` / `--NAME=VALUE` options that `generate` does not declare, as NAME=VALUE items.

    The covariates a model knows are only known once it is loaded, so they pass through
    here and are checked against the model's schema (unknown names are refused with the valid ones).
    """
    items, index = [], 0
    while index < len(tokens):
        token = tokens[index]
        if not token.startswith("--") or token == "--":
            raise ValueError(f"unrecognized argument {token!r}")
        if "=" in token:
            items.append(token[2:])
        elif index + 1 < len(tokens) and not tokens[index + 1].startswith("--"):
            items.append(f"{token[2:]}={tokens[index + 1]}")
            index += 1
        else:
            raise ValueError(f"{token}: a covariate option needs a value, e.g. {token} 30")
        index += 1
    return items


def _add_export(commands) -> None:
    p = commands.add_parser(
        "export", help="a trained generator (and label decoder) as a model folder that travels: generate --model OUT",
        description="Copy a generator run's latest checkpoint and its autoencoder into OUT/flow and OUT/autoencoder "
                    "(float16 weights, no training state, every file <= 16 MB) and, with --labels, a label decoder "
                    "into OUT/labels; `mriflow generate --model OUT` then samples it, tissue maps included. An "
                    "image-space model (train slices, --representation) has no autoencoder: OUT/flow alone.")
    p.add_argument("run", metavar="RUN",
                   help="generator run or checkpoint folder (mriflow train flow, diffusion, gan or slices)")
    p.add_argument("out", metavar="OUT", help="model folder to write into (new, or without flow/ and autoencoder/)")
    p.add_argument("--autoencoder", metavar="RUN",
                   help="ship this decoder refinement of the generator's autoencoder instead (mriflow train "
                        "autoencoder --refine-decoder): the same encoder, so the same latents; anything else is refused")
    p.add_argument("--labels", metavar="RUN",
                   help="a label decoder run (mriflow train labels) of the generator's autoencoder, exported into "
                        "OUT/labels: generate then writes a tissue map beside every sample by default")
    p.add_argument("--ema", choices=("main", "long"), default="main",
                   help="weights to ship: main (default, the run's EMA) or long (the longer EMA kept beside it with "
                        "loop.ema_long_decay, when its validation figures say it is the better one)")
    p.add_argument("--solver", help="the exported model's default sampler (default: the run's), e.g. euler for a "
                                    "few-step student (mriflow train fewstep)")
    p.add_argument("--steps", type=int, help="the exported model's default number of steps (default: the run's), "
                                             "e.g. 1 for a student measured best at one evaluation")
    p.set_defaults(func=_run_export, out_argument="OUT")


def _run_export(args: argparse.Namespace) -> int:
    from mriflow.export import export_generator, export_labels
    from mriflow.generator import AUTOENCODER_DIR, GENERATOR_DIR, LABELS_DIR

    out = Path(args.out)
    existed = out.exists()
    before = {name for name in (GENERATOR_DIR, AUTOENCODER_DIR) if (out / name).exists()}
    written: list[str] = []
    try:  # a refusal, of the label decoder too, leaves nothing half-exported behind
        sampling = {key: value for key, value in (("solver", args.solver), ("steps", args.steps)) if value is not None}
        export_generator(args.run, out, autoencoder=args.autoencoder, ema=args.ema, sampling=sampling)
        written = [name for name in (GENERATOR_DIR, AUTOENCODER_DIR) if name not in before and (out / name).exists()]
        if args.labels is not None:
            if AUTOENCODER_DIR not in written:
                raise ValueError(f"--labels {args.labels}: {args.run} is an image-space model, without an autoencoder "
                                 "whose latents a label decoder reads; drop --labels (generate segments its samples "
                                 "with the anatomy network on the 4 mm and 2 mm grids)")
            export_labels(args.labels, out)
            written.append(LABELS_DIR)
    except BaseException:
        for name in written:
            shutil.rmtree(out / name, ignore_errors=True)
        if not existed and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
    print(f"exported: {', '.join(str(out / name) for name in written)}\n"
          f"sample it: mriflow generate --model {out} --out DIR")
    return 0
