"""The `mriflow` command line: a thin shell that parses arguments and calls the library.

    mriflow prepare IMAGES --out DIR [--masks DIR] [--covariates CSV] [--preset 4mm|2mm|1mm] ...
    mriflow train autoencoder DATA --out RUN [--kind kl|vq] [--preset tiny|small|base|large] ...
    mriflow train flow DATA --autoencoder RUN --out RUN2 [--condition age,sex] ...
    mriflow train diffusion DATA --autoencoder RUN --out RUN3 [--condition age,sex] ...
    mriflow train gan DATA --autoencoder RUN --out RUN5 [--condition age,sex] ...    (R3GAN losses, one-step sampling)
    mriflow train slices DATA --out RUN4 [--condition age,sex] ...      (2D, image space: no autoencoder)
    mriflow encode DATA --autoencoder RUN
    mriflow generate [--model RUN|default] --out DIR [--n N] [--age A] [--sex F|M] [--solver heun] ...
    mriflow evaluate reconstruction DATA --autoencoder RUN [--split val] [--out DIR]
    mriflow evaluate generation --real DATA --fake DIR --out DIR [--backbone NAME] ...
    mriflow app [--model M] [--host 127.0.0.1] [--port P] | mriflow app --turing --real DATA --fake DIR

Every command also runs under `torchrun --nproc_per_node N -m mriflow ...` (training and
generation share the work out across the processes).

Over 400 lines on purpose: one flat parser, a pair `_add_<command>` / `_run_<command>` per command in
the order of the pipeline, and the one place where user errors become one line (`main`, `_describe`).
Each `_run_` only parses and calls the library, so the length is the number of options, not logic;
split in a module per command, `mriflow --help` and its error handling would be read across files.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

from mriflow import __version__

# Problems with the user's input or files: reported as one line, without a traceback
# (MRIFLOW_DEBUG=1 shows it). OSError covers every file-system refusal: a missing file, a folder that
# cannot be written, a file where a folder should be, a full disk. Anything else is a bug and keeps its traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError)
# What to do about an operating system's refusal, by errno; its own text ("[Errno 13] ...") says neither.
OS_ERROR_ADVICE = {
    errno.EACCES: "change its permissions, or choose another location",
    errno.EPERM: "change its permissions, or choose another location",
    errno.EROFS: "the disk is mounted read-only; choose a location on a writable disk",
    errno.ENOSPC: "the disk is full; free some space or choose another disk",
    errno.EDQUOT: "the disk quota is used up; free some space or choose another disk",
    errno.ENOTDIR: "a file stands where a folder is expected; choose another path",
    errno.EISDIR: "a folder stands where a file is expected; give the file",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mriflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mriflow {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_prepare(commands)
    _add_train(commands)
    _add_encode(commands)
    _add_generate(commands)
    _add_evaluate(commands)
    _add_app(commands)
    return parser


# ---------------------------------------------------------------------------------------------- prepare


def _add_prepare(commands) -> None:
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
        return _fail("prepare", error)
    print(result.summary())
    print(f"manifest: {result.manifest}\nrecord:   {result.record}")
    return 0


# ---------------------------------------------------------------------------------------------- train


def _add_train(commands) -> None:
    train = commands.add_parser("train", help="train the autoencoder, or a latent generator (flow, diffusion baseline)")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = stages.add_parser("autoencoder", help="stage 1: 3D KL-VAE-GAN or VQ-GAN on a prepared dataset")
    p.add_argument("data", help="prepared dataset folder (mriflow prepare)")
    p.add_argument("--kind", choices=("kl", "vq"), help="autoencoder kind (default: the preset's, kl)")
    p.add_argument("--refine-decoder", metavar="RUN",
                   help="start from this autoencoder run and train its decoder only, critics on: the latents stay "
                        "bit for bit the same, so generators trained on RUN keep working (default 2000 steps, lr / 5)")
    _add_common_training(p, "autoencoder")
    p.set_defaults(func=_run_train_autoencoder)

    from mriflow.families import FAMILIES
    from mriflow.representations import REPRESENTATIONS

    for stage, family in FAMILIES.items():
        p = stages.add_parser(stage, help=family.summary)
        p.add_argument("data", help="prepared dataset folder (mriflow prepare)")
        if family.space == "image":  # the slice model: image slices, no autoencoder
            p.add_argument("--condition", default="", metavar="NAMES",
                           help="covariates to condition on, e.g. age,sex (manifest columns; default: unconditional)")
            _add_common_training(p, stage)
            p.set_defaults(func=_run_train_slices, stage=stage)
            continue
        p.add_argument("--autoencoder", help="autoencoder run or checkpoint folder: learn its latents")
        p.add_argument("--representation", choices=REPRESENTATIONS,
                       help="learn the images themselves behind this fixed wavelet transform instead (no autoencoder; "
                            "haar2: 64 Haar bands on a grid 4x smaller per axis; default: the preset's)")
        p.add_argument("--condition", default="", metavar="NAMES",
                       help="covariates to condition on, e.g. age,sex (manifest columns; default: unconditional)")
        p.add_argument("--label-condition", action="store_true",
                       help="condition on each subject's tissue map too, so `generate --label-map` draws a scan with a "
                            "given anatomy (needs label maps in the prepared data)")
        p.add_argument("--regions", metavar="CSV",
                       help="with --label-condition: the label maps' region list (index,name), default DLMUSE's")
        p.add_argument("--backbone", choices=("unet", "dit"),
                       help="the network: unet (default, MONAI's diffusion U-Net) or dit (a 3D diffusion transformer)")
        _add_common_training(p, stage)
        p.set_defaults(func=_run_train_generator, stage=stage)

    p = stages.add_parser("labels", help="a label decoder: tissue maps for every generated volume, from the same latent")
    p.add_argument("data", help="prepared dataset folder with label maps (mriflow prepare --masks LABELS)")
    p.add_argument("--autoencoder", required=True, help="autoencoder run or checkpoint folder (the generator's)")
    p.add_argument("--regions", metavar="CSV",
                   help="the label maps' region list (index,name, e.g. DLMUSE's muse_regions.csv) mapping labels to "
                        "tissue classes by name (default: the DLMUSE map mriflow's anatomy network was trained with)")
    _add_common_training(p, "labels")
    p.set_defaults(func=_run_train_labels)


def _add_common_training(p: argparse.ArgumentParser, stage: str) -> None:
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs, montages, config)")
    p.add_argument("--preset", choices=("tiny", "small", "base", "large", "wavelet"),
                   help=f"{stage} preset: tiny (4 mm, CPU), small (2 mm, CPU), base (2 mm, one GPU), large (1 mm); "
                        "default tiny")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default: the preset's)")
    p.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this much wall time")
    if stage in ("flow", "diffusion", "gan"):
        p.add_argument("--max-cpu-minutes", type=float, metavar="MINUTES",
                       help="stop with a checkpoint after this much CPU time of this call (thread-minutes: a budget a "
                            "busy machine does not shrink)")
        p.add_argument("--checkpoint-minutes", type=float, metavar="MINUTES",
                       help="also write a checkpoint whenever this much wall time has passed since the last one")
        p.add_argument("--warm-start", metavar="MODEL",
                       help="start a new run from this generator's weights and step (a run, checkpoint or exported model "
                            "folder of the same family), with fresh optimizer moments; its config and covariates are kept")
    p.add_argument("--stop-at-step", type=int, metavar="STEP",
                   help="stop with a checkpoint at this step of the schedule (--max-steps keeps the learning-rate "
                        "schedule); --resume continues it, exactly as an uninterrupted run")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's; may change on --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
    _add_threads(p)


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch (default: the free cores, i.e. usable CPUs less the load average)")


def _run_train_autoencoder(args: argparse.Namespace) -> int:
    from mriflow.train.autoencoder import train_autoencoder

    result = train_autoencoder(args.data, args.out, kind=args.kind, preset=args.preset, max_steps=args.max_steps,
                               resume=args.resume, max_minutes=args.max_minutes, lr=args.lr,
                               stop_at_step=args.stop_at_step, refine_decoder=args.refine_decoder)
    return _report_training(result)


def _run_train_generator(args: argparse.Namespace) -> int:
    from mriflow.train.generator import train_generator

    # No --condition: unconditional for a new run, the run's own covariates on --resume.
    condition = [name.strip() for name in args.condition.split(",") if name.strip()] or None
    result = train_generator(args.stage, args.data, args.autoencoder, args.out, condition=condition, preset=args.preset,
                             max_steps=args.max_steps, resume=args.resume, max_minutes=args.max_minutes, lr=args.lr,
                             stop_at_step=args.stop_at_step,
                             label_condition=args.label_condition, regions=args.regions, backbone=args.backbone,
                             representation=args.representation,
                             loop_overrides={name: getattr(args, name) for name in ("max_cpu_minutes", "checkpoint_minutes")
                                             if getattr(args, name) is not None},
                             warm_start=_generator_folder(args.warm_start))
    return _report_training(result)


def _generator_folder(model: str | None) -> str | None:
    """An exported model's generator checkpoint (MODEL/flow) when given its folder, else `model` as it is."""
    from mriflow.generator import GENERATOR_DIR

    if model is not None and (Path(model) / GENERATOR_DIR).is_dir():
        return str(Path(model) / GENERATOR_DIR)
    return model


def _run_train_slices(args: argparse.Namespace) -> int:
    from mriflow.train.slices import train_slices

    condition = [name.strip() for name in args.condition.split(",") if name.strip()] or None
    result = train_slices(args.data, args.out, condition=condition, preset=args.preset, max_steps=args.max_steps,
                          resume=args.resume, max_minutes=args.max_minutes, lr=args.lr, stop_at_step=args.stop_at_step)
    return _report_training(result)


def _run_train_labels(args: argparse.Namespace) -> int:
    from mriflow.train.labels import train_labels

    result = train_labels(args.data, args.autoencoder, args.out, preset=args.preset, max_steps=args.max_steps,
                          resume=args.resume, regions=args.regions, max_minutes=args.max_minutes, lr=args.lr,
                          stop_at_step=args.stop_at_step)
    return _report_training(result)


def _report_training(result: dict[str, Any]) -> int:
    interrupted = result.get("interrupted")
    if _is_main_process():
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.get("metrics", {}).items())
        if interrupted:
            print(f"stopped by {interrupted} at step {result['step']}: checkpoint {result['checkpoint']} written; "
                  "--resume continues from it")
        else:
            print(f"step {result['step']}: {metrics}\ncheckpoint: {result['checkpoint']}")
    return {"SIGINT": 130, "SIGTERM": 143}.get(interrupted, 0)


# ---------------------------------------------------------------------------------------------- encode


def _add_encode(commands) -> None:
    p = commands.add_parser("encode", help="cache every subject's latent mean and log-variance under an autoencoder")
    p.add_argument("data", help="prepared dataset folder")
    p.add_argument("--autoencoder", required=True, help="autoencoder run or checkpoint folder")
    p.add_argument("--splits", help="comma-separated splits to encode (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_threads(p)
    p.set_defaults(func=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from mriflow.latents import encode_dataset

    splits = [s.strip() for s in args.splits.split(",")] if args.splits else None
    cache = encode_dataset(args.data, args.autoencoder, splits=splits, batch_size=args.batch_size, device=args.device)
    print(f"latents: {cache}")
    return 0


# ---------------------------------------------------------------------------------------------- generate


def _add_generate(commands) -> None:
    p = commands.add_parser(
        "generate", allow_abbrev=False, help="sample synthetic volumes (NIfTI in template space + JSON sidecars)",
        description="Sample volumes from a trained generator (default: the model shipped with mriflow). Any covariate "
                    "the model knows is an option: --age 45 --sex F, or --NAME VALUE / --covariate NAME=VALUE for the "
                    "others (e.g. region volumes); an unknown name is refused with the list of valid ones.")
    p.add_argument("--model", default="default",
                   help="generator run or checkpoint folder, a shipped model's name (4mm), or 'default' (shipped)")
    p.add_argument("--out", required=True, help="output folder (existing samples are never overwritten)")
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
    _add_threads(p)
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from mriflow.generate import generate
    from mriflow.models.conditioning import parse_value

    covariates: dict[str, Any] = {}
    for item in args.covariate + _covariate_options(args.unknown):
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
            raise ValueError(f"--n {args.n} differs from the {len(cohort)} rows of {args.covariates}; "
                             "drop --n (one sample per row)")
    result = generate(args.model, args.out, n=8 if args.n is None else args.n, covariates=covariates, solver=args.solver,
                      steps=args.steps, guidance=args.guidance, seed=args.seed, batch_size=args.batch_size,
                      device=args.device, privacy_filter=args.privacy_filter, cohort=cohort,
                      trust_paths=args.trust_model_paths, labels=False if args.no_labels else args.labels,
                      label_map=args.label_map)
    if _is_main_process():
        print(result.summary() if hasattr(result, "summary") else result)
    return 0


def _covariate_options(tokens: list[str]) -> list[str]:
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


# ---------------------------------------------------------------------------------------------- evaluate


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="reconstruction metrics, or the generation report")
    kinds = evaluate.add_subparsers(dest="kind", required=True, metavar="KIND")

    p = kinds.add_parser("reconstruction", help="MSE, NMSE, PSNR, SSIM, MS-SSIM of the autoencoder on a split")
    p.add_argument("data", help="prepared dataset folder")
    p.add_argument("--autoencoder", required=True, help="autoencoder run or checkpoint folder")
    p.add_argument("--split", default="val", help="split to reconstruct (default val)")
    p.add_argument("--out", help="output folder (default RUN/reconstruction-SPLIT)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    _add_threads(p)
    p.set_defaults(func=_run_evaluate_reconstruction)

    p = kinds.add_parser("generation", help="FD/KID/MMD, PRDC with bootstrap, diversity, memorization, fidelity")
    p.add_argument("--real", required=True, help="prepared dataset folder (the real data)")
    p.add_argument("--fake", required=True, help="folder of generated NIfTI volumes on the same template grid")
    p.add_argument("--out", required=True, help="report folder: report.md, report.html, metrics.json")
    p.add_argument("--force", action="store_true", help="replace the report already in --out (else it is refused)")
    p.add_argument("--split", default="test", help="real split to compare with (default test)")
    p.add_argument("--other-split", help="second real split for the Real vs Real column (default val)")
    p.add_argument("--backbone", default="auto",
                   help="feature network: auto (default: the shipped anatomy network of the data's grid, 4mm or 2mm, "
                        "else deepbet), anatomy, deepbet, intensity, medicalnet-resnet10, medicalnet-resnet50, "
                        "radimagenet-resnet50")
    p.add_argument("--weights", help="local weights file of the backbone (never downloaded)")
    p.add_argument("--weights-sha256", help="expected SHA-256 of --weights")
    p.add_argument("--num-samples", "--n", dest="n", type=int,
                   help="bootstrap sample size per set (default: scaled to the data)")
    p.add_argument("--bootstrap", type=int, help="bootstrap rounds (default 20)")
    p.add_argument("--autoencoder", help="autoencoder run or checkpoint folder, or 'default' or a shipped model's name "
                                         "(2mm, 4mm) for that model's: "
                                         "adds the Real vs Reconstruction column and matches the memorization "
                                         "yardstick to its smoothness")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--also-backbone", action="append", default=[], metavar="NAME[=WEIGHTS]",
                   help="another feature network whose FD is added as a row (e.g. radimagenet-resnet50=weights.pt, "
                        "medicalnet-resnet10=resnet_10.pth, deepbet); repeatable, local weights only")
    p.add_argument("--protocol", help="a fixed evaluation protocol (mriflow-v1): split, backbone, n, bootstrap and "
                                      "seed as written down, so figures compare across runs and papers")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    _add_threads(p)
    p.set_defaults(func=_run_evaluate_generation)

    p = kinds.add_parser("utility", help="train on synthetic, test on real: segmentation Dice and brain-age MAE with "
                                         "and without generated image + label pairs")
    p.add_argument("--real", required=True, help="prepared dataset folder with label maps (train and test splits)")
    p.add_argument("--synthetic", required=True,
                   help="folder of generated volumes with label maps (mriflow generate with a label decoder)")
    p.add_argument("--out", required=True, help="report folder: utility.json, utility.md, utility.png")
    p.add_argument("--sizes", default="10,30,all", help="numbers N of real training subjects (default 10,30,all)")
    p.add_argument("--factor", type=int, default=5, help="synthetic pairs per real subject, k (default 5)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps of every downstream model (default 300)")
    p.add_argument("--tasks", default="segmentation,age", help="segmentation, age or both (default both)")
    p.add_argument("--seed", type=int, default=0)
    _add_threads(p)
    p.set_defaults(func=_run_evaluate_utility)


def _run_evaluate_reconstruction(args: argparse.Namespace) -> int:
    from mriflow.evaluate.reconstruction import evaluate_reconstruction

    summary = evaluate_reconstruction(args.data, args.autoencoder, split=args.split, out=args.out, device=args.device)
    metrics = summary["metrics"]
    print(f"{summary['subjects']} {args.split} subjects: SSIM {metrics['ssim']['mean']:.4f}, "
          f"PSNR {metrics['psnr']['mean']:.2f} dB, MS-SSIM {metrics['ms_ssim']['mean']:.4f} "
          f"(brain: SSIM {metrics['ssim_brain']['mean']:.4f}, PSNR {metrics['psnr_brain']['mean']:.2f} dB)")
    return 0


def _run_evaluate_utility(args: argparse.Namespace) -> int:
    from mriflow.evaluate.utility import TrainingSettings, evaluate_utility

    sizes = []
    for token in filter(None, (t.strip() for t in args.sizes.split(","))):
        if token != "all" and not token.isdigit():
            raise ValueError(f"--sizes {args.sizes!r}: expected numbers or 'all', e.g. 10,30,all")
        sizes.append(None if token == "all" else int(token))
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not sizes or not tasks or set(tasks) - {"segmentation", "age"}:
        raise ValueError(f"--sizes {args.sizes!r} / --tasks {args.tasks!r}: give at least one size, and tasks from "
                         "segmentation,age")
    if args.factor < 1 or args.steps < 1:
        raise ValueError(f"--factor and --steps must be >= 1, got {args.factor} and {args.steps}")
    result = evaluate_utility(args.real, args.synthetic, args.out, sizes=sizes, factor=args.factor,
                              settings=TrainingSettings(steps=args.steps, seed=args.seed), tasks=tasks)
    print(f"{args.out}/utility.md, utility.png, utility.json ({result['seconds']:.0f} s)")
    return 0


def _run_evaluate_generation(args: argparse.Namespace) -> int:
    from mriflow.evaluate.diversity import DEFAULT_MAX_PAIRS as DEFAULT_PAIRS
    from mriflow.evaluate.generation import evaluate_generation
    from mriflow.evaluate.other_networks import parse_other_backbone

    existing = [name for name in ("metrics.json", "report.md", "report.html") if (Path(args.out) / name).exists()]
    if existing and not args.force:  # before any work: an evaluation takes minutes
        raise FileExistsError(f"--out {args.out} already holds a report ({', '.join(existing)}); choose another folder, "
                              "or pass --force to replace it")

    reconstruct = None
    if args.autoencoder and not Path(args.autoencoder).exists():  # 'default' or a shipped model's name: its autoencoder
        from mriflow.generate import AUTOENCODER_DIR, default_model_dir, shipped_models

        shipped = {"default": default_model_dir(), **shipped_models()}
        if args.autoencoder in shipped:
            args.autoencoder = str(shipped[args.autoencoder] / AUTOENCODER_DIR)
    if args.autoencoder:
        reconstruct = _reconstructor(args.autoencoder, args.device)
    options = dict(split=args.split, other_split=args.other_split, backbone=args.backbone, n=args.n,
                   bootstrap=args.bootstrap, seed=args.seed)
    protocol = None
    if args.protocol:
        from mriflow.evaluate.protocols import get_protocol

        protocol = get_protocol(args.protocol)
        defaults = {"split": "test", "other_split": None, "backbone": "auto", "n": None, "bootstrap": None, "seed": 0}
        changed = [name for name, value in options.items() if value != defaults[name]]
        if changed:
            spelled = {"n": "--num-samples"}
            raise ValueError(f"--protocol {protocol.name} fixes "
                             f"{', '.join(spelled.get(c, '--' + c.replace('_', '-')) for c in changed)}; "
                             "drop them, or drop --protocol")
        options = {name: getattr(protocol, name) for name in options}
    result = evaluate_generation(args.real, args.fake, args.out, weights=args.weights, weights_sha256=args.weights_sha256,
                                 autoencoder=args.autoencoder, reconstruct=reconstruct, device=args.device,
                                 protocol=protocol.settings() if protocol else None,
                                 diversity_pairs=protocol.diversity_pairs if protocol else DEFAULT_PAIRS,
                                 also_backbones=[parse_other_backbone(text) for text in args.also_backbone], **options)
    generated = result["columns"]["real_vs_generated"]
    print(f"report: {args.out}/report.html  (Real vs Generated: FD {generated['fd']['mean']:.4g} ± "
          f"{generated['fd']['sd']:.2g}, coverage {generated['coverage']['mean']:.3f})")
    return 0


def _reconstructor(autoencoder: str, device: str) -> Callable:
    import torch

    from mriflow.checkpoint import load_autoencoder
    from mriflow.distributed import resolve_device

    model, _ = load_autoencoder(autoencoder, resolve_device(device))
    target = next(model.parameters()).device

    @torch.no_grad()
    def reconstruct(volumes: torch.Tensor) -> torch.Tensor:  # (B, 1, D, H, W) in [0, 1]
        return model.reconstruct(volumes.to(target)).float().clamp(0.0, 1.0).cpu()

    return reconstruct


# ---------------------------------------------------------------------------------------------- app


def _add_app(commands) -> None:
    p = commands.add_parser(
        "app", help="a browser UI: generate and view brains side by side, browse reports, or run a visual Turing test",
        description="Serve the web app (FastAPI + NiiVue; needs `npm ci` once in the repository root). It listens on "
                    "127.0.0.1 unless --host says otherwise. With --turing it runs a visual Turing test of real "
                    "(--real, its --split) against generated (--fake) volumes instead, answers kept in SQLite "
                    "outside every served folder; the results open with the link it prints (yours alone).")
    p.add_argument("--model", default="default",
                   help="generator run or checkpoint folder, a shipped model's name (4mm), or 'default' (shipped)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--out", default="app-output",
                   help="folder for generated samples, served to the page (default app-output; nothing in it "
                        "is overwritten: each request writes a new subfolder)")
    p.add_argument("--reports", action="append", metavar="DIR",
                   help="folder searched for evaluation reports (report.html; repeatable; default reports/ if present)")
    p.add_argument("--device", default="cpu", choices=("auto", "cpu", "cuda"))
    p.add_argument("--trust-model-paths", action="store_true",
                   help="let an exported --model read its autoencoder from outside its own folder")
    turing = p.add_argument_group("visual Turing test")
    turing.add_argument("--turing", action="store_true", help="run a visual Turing test instead of the generator")
    turing.add_argument("--real", metavar="DATA", help="prepared dataset folder (manifest.csv + images/)")
    turing.add_argument("--fake", metavar="DIR", help="folder of generated volumes (sample_*.nii.gz)")
    turing.add_argument("--split", default="test", help="split of the real data to show (default test)")
    turing.add_argument("--per-class", type=int, metavar="N",
                        help="volumes of each class in the study (default: the smaller class, at most 25)")
    turing.add_argument("--db", metavar="FILE",
                        help="SQLite file of the answers, one study per file, never inside --out or a report folder "
                             "(default turing.sqlite in the current folder)")
    turing.add_argument("--new-study", action="store_true",
                        help="when --db holds another study's answers, move that file aside (renamed beside it, "
                             "nothing deleted) and start this study afresh; without it another study is refused")
    _add_threads(p)
    p.set_defaults(func=_run_app)


def _run_app(args: argparse.Namespace) -> int:
    from mriflow.app.launch import run

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port}: choose 1 to 65535 (0 picks a free one)")
    try:
        run(model=args.model, out=args.out, host=args.host, port=args.port, reports=args.reports, turing=args.turing,
            real=args.real, fake=args.fake, split=args.split, per_class=args.per_class, db=args.db, device=args.device,
            trust_paths=args.trust_model_paths, new_study=args.new_study)
    except KeyboardInterrupt:
        pass
    return 0


# ---------------------------------------------------------------------------------------------- main


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _fail(command: str, error: BaseException) -> int:
    print(f"mriflow {command}: error: {_describe(error)}", file=sys.stderr)
    return 2


def _warning_line(command: str) -> Callable[..., None]:
    """warnings.showwarning that prints one plain line: the source file and line of a warning mean nothing to a user."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        print(f"mriflow {command}: warning: {message}", file=sys.stderr if file is None else file)

    return show


def _describe(error: BaseException) -> str:
    """The error as one line: an operating system's refusal names its file and what to do."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        advice = OS_ERROR_ADVICE.get(error.errno)
        return f"{error.filename}: {error.strerror.lower()}" + (f"; {advice}" if advice else "")
    if _is_image_file_error(error):  # its text names the file, not what to do
        return f"{error} (damaged, cut short or not NIfTI: restore, regenerate or remove it)"
    return str(error)


def _check_output_folder(out: str) -> None:
    """Refuse an --out that is a file, or that cannot be written, before a command works for hours towards it."""
    path = Path(out).expanduser()
    existing = next(p for p in (path, *path.parents) if p.exists())  # the folder itself, or where it will be made
    if not existing.is_dir():
        raise NotADirectoryError(f"--out {out}: {existing} is a file; choose a folder (new or existing) for the output")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"--out {out}: {existing} is not writable; choose another folder, or change its "
                              "permissions")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and args.command != "generate":
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.unknown = unknown
    command = " ".join(v for v in (args.command, getattr(args, "stage", None), getattr(args, "kind", None)) if v)
    try:
        with warnings.catch_warnings():
            if not os.environ.get("MRIFLOW_DEBUG"):
                warnings.showwarning = _warning_line(command)
            if getattr(args, "out", None):
                _check_output_folder(args.out)
            if hasattr(args, "threads"):
                from mriflow.utils.threads import set_threads

                print(set_threads(args.threads))
            return int(args.func(args) or 0)
    except Exception as error:
        if os.environ.get("MRIFLOW_DEBUG") or not (isinstance(error, USER_ERRORS) or _is_image_file_error(error)):
            raise
        return _fail(command, error)


def _is_image_file_error(error: BaseException) -> bool:
    """nibabel's "not an image file", from a module that reads a volume with nibabel directly (data.io.load_volume
    names the file itself). Looked up, not imported: most commands never load nibabel."""
    images = sys.modules.get("nibabel.filebasedimages")
    return images is not None and isinstance(error, images.ImageFileError)


if __name__ == "__main__":
    sys.exit(main())
