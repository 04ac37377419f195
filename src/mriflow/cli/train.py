"""`mriflow train autoencoder | flow | diffusion | gan | slices | labels`: the training stages (`train`), one
subcommand per stage and one per generative family (`families.FAMILIES`); and `mriflow encode`, which caches a
dataset's latents under an autoencoder (`latents`), the input every latent generator trains on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mriflow.cli.common import add_threads, is_main_process


def add_commands(commands) -> None:
    _add_train(commands)
    _add_encode(commands)


def _add_train(commands) -> None:
    from mriflow.families import FAMILIES
    from mriflow.representations import REPRESENTATIONS

    train = commands.add_parser("train", help=f"train the autoencoder, a generator ({', '.join(FAMILIES)}) or a label "
                                              "decoder")
    stages = train.add_subparsers(dest="stage", required=True, metavar="STAGE")

    p = stages.add_parser("autoencoder", help="stage 1: 3D KL-VAE-GAN or VQ-GAN on a prepared dataset")
    p.add_argument("data", help="prepared dataset folder (mriflow prepare)")
    p.add_argument("--kind", choices=("kl", "vq"), help="autoencoder kind (default: the preset's, kl)")
    p.add_argument("--refine-decoder", metavar="RUN",
                   help="start from this autoencoder run and train its decoder only, critics on: the latents stay "
                        "bit for bit the same, so generators trained on RUN keep working (default 2000 steps, lr / 5)")
    p.add_argument("--decoder-channels", type=_ints, metavar="C0,C1",
                   help="with --refine-decoder: a new, lighter decoder of these channels per level (full resolution "
                        "first, as the preset's channels) for RUN's encoder, trained from scratch at RUN's learning rate "
                        "(critics from half-way): the same latents decode faster")
    p.add_argument("--decoder-res-blocks", type=_ints, metavar="N0,N1",
                   help="with --decoder-channels: residual blocks per level (default: RUN's)")
    p.add_argument("--decoder-attention", choices=("on", "off"),
                   help="with --decoder-channels: the attention block at the latent level (default off: on a 2 mm "
                        "latent it costs a third of the decoder's time)")
    p.add_argument("--decoder-upsample", choices=("interpolate", "deconv"),
                   help="with --decoder-channels: how the decoder goes up a level (default interpolate: nearest, then a "
                        "3^3 convolution at the finer level; deconv: a stride-2 transposed convolution, 1/27 of its "
                        "multiply-adds)")
    p.add_argument("--distill", type=float, metavar="WEIGHT",
                   help="with --refine-decoder: the decoder also learns RUN's decoder output for the same latent (L1 at "
                        "this weight, critics off): a new, lighter decoder learns the one it replaces")
    _add_common_training(p, "autoencoder")
    p.set_defaults(func=_run_train_autoencoder)

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
        if stage == "flow":
            p.add_argument("--align", type=float, metavar="WEIGHT",
                           help="REPA-style alignment of the U-Net's first block with the anatomy network's features of "
                                "the clean volume, at this weight (REPA: 0.5; image-space runs on the 2 mm or 4 mm grid)")
            p.add_argument("--band-equalisation", type=float, metavar="E",
                           help="image-space runs: how far each Haar band is scaled to unit sd, 0-1 (1: every band "
                                "drowned by the noise at once; 0: natural energies, fine detail drowned first and "
                                "drawn last; default: the preset's)")
        p.add_argument("--backbone", choices=("unet", "dit"),
                       help="the network: unet (default, MONAI's diffusion U-Net) or dit (a 3D diffusion transformer)")
        _add_common_training(p, stage)
        p.set_defaults(func=_run_train_generator, stage=stage)

    p = stages.add_parser("fewstep", help="a few-step student of a trained flow: its samples in 1 or 2 network "
                                          "evaluations (reflow or distillation of the teacher's ODE)")
    p.add_argument("teacher", help="the flow to learn from: a shipped model's name (2mm, 4mm), an exported model, "
                                   "a run or a checkpoint folder")
    p.add_argument("--out", required=True, help="run folder (the teacher's pairs, checkpoints, logs, montages)")
    p.add_argument("--method", choices=("reflow", "distill"), default="reflow",
                   help="reflow: a velocity field on the straight lines between the teacher's noise and samples (more "
                        "steps still help); distill: trained at the student's grid times only (default reflow)")
    p.add_argument("--steps", type=int, default=2, help="Euler steps (network evaluations) the student samples with")
    p.add_argument("--pairs", type=int, default=512, help="teacher samples to learn from (the last quarter, at most 16, held out to pick the checkpoint)")
    p.add_argument("--max-steps", type=int, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, help="pairs per step (default 8)")
    p.add_argument("--max-minutes", type=float, help="stop with a checkpoint after this much wall time")
    p.add_argument("--max-cpu-minutes", type=float, metavar="MINUTES",
                   help="stop with a checkpoint after this much CPU time of this call (thread-minutes)")
    p.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    p.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint (and its pairs)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_threads(p)
    p.set_defaults(func=_run_train_fewstep)

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
    if stage in ("flow", "diffusion", "gan", "autoencoder"):
        p.add_argument("--max-cpu-minutes", type=float, metavar="MINUTES",
                       help="stop with a checkpoint after this much CPU time of this call (thread-minutes: a budget a "
                            "busy machine does not shrink)")
        p.add_argument("--checkpoint-minutes", type=float, metavar="MINUTES",
                       help="also write a checkpoint whenever this much wall time has passed since the last one")
    if stage in ("flow", "diffusion", "gan"):
        p.add_argument("--warm-start", metavar="MODEL",
                       help="start a new run from this generator's weights and step (a run, checkpoint or exported model "
                            "folder of the same family), with fresh optimizer moments; its config and covariates are kept")
    p.add_argument("--stop-at-step", type=int, metavar="STEP",
                   help="stop with a checkpoint at this step of the schedule (--max-steps keeps the learning-rate "
                        "schedule); --resume continues it, exactly as an uninterrupted run")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's; may change on --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
    add_threads(p)


def _run_train_autoencoder(args: argparse.Namespace) -> int:
    from mriflow.train.autoencoder import train_autoencoder

    decoder = None
    if args.decoder_channels is not None:
        decoder = {"decoder_channels": args.decoder_channels, "decoder_latent_attention": args.decoder_attention == "on"}
        if args.decoder_res_blocks is not None:
            decoder["decoder_num_res_blocks"] = args.decoder_res_blocks
        if args.decoder_upsample is not None:
            decoder["decoder_upsample"] = args.decoder_upsample
    elif any(v is not None for v in (args.decoder_res_blocks, args.decoder_attention, args.decoder_upsample)):
        raise ValueError("--decoder-res-blocks, --decoder-attention and --decoder-upsample shape a new decoder: pass "
                         "--decoder-channels too")
    result = train_autoencoder(args.data, args.out, kind=args.kind, preset=args.preset, max_steps=args.max_steps,
                               resume=args.resume, max_minutes=args.max_minutes, lr=args.lr,
                               stop_at_step=args.stop_at_step, refine_decoder=args.refine_decoder, decoder=decoder,
                               distill=args.distill or 0.0,
                               loop_overrides={"max_cpu_minutes": args.max_cpu_minutes,
                                               "checkpoint_minutes": args.checkpoint_minutes})
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
                             warm_start=_generator_folder(args.warm_start), alignment=getattr(args, "align", None),
                             band_equalisation=getattr(args, "band_equalisation", None))
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


def _run_train_fewstep(args: argparse.Namespace) -> int:
    from mriflow.generator import load_generator
    from mriflow.train.fewstep import train_fewstep

    if args.steps < 1 or args.pairs < 1:
        raise ValueError(f"--steps and --pairs must be >= 1, got {args.steps} and {args.pairs}")
    teacher = load_generator(args.teacher, device=args.device, labels=False)
    overrides = {name: getattr(args, option) for name, option in (("max_steps", "max_steps"), ("batch_size", "batch_size"),
                 ("max_minutes", "max_minutes"), ("max_cpu_minutes", "max_cpu_minutes"), ("lr", "lr"))
                 if getattr(args, option) is not None}
    result = train_fewstep(teacher, args.out, method=args.method, steps=args.steps, pairs=args.pairs,
                           resume=args.resume, loop_overrides={**overrides, "device": args.device})
    return _report_training(result)


def _run_train_labels(args: argparse.Namespace) -> int:
    from mriflow.train.labels import train_labels

    result = train_labels(args.data, args.autoencoder, args.out, preset=args.preset, max_steps=args.max_steps,
                          resume=args.resume, regions=args.regions, max_minutes=args.max_minutes, lr=args.lr,
                          stop_at_step=args.stop_at_step)
    return _report_training(result)


def _report_training(result: dict[str, Any]) -> int:
    interrupted = result.get("interrupted")
    if is_main_process():
        metrics = ", ".join(f"{k} {v:.4g}" for k, v in result.get("metrics", {}).items())
        if interrupted:
            print(f"stopped by {interrupted} at step {result['step']}: checkpoint {result['checkpoint']} written; "
                  "--resume continues from it")
        else:
            print(f"step {result['step']}: {metrics}\ncheckpoint: {result['checkpoint']}")
    return {"SIGINT": 130, "SIGTERM": 143}.get(interrupted, 0)


def _add_encode(commands) -> None:
    p = commands.add_parser("encode", help="cache every subject's latent mean and log-variance under an autoencoder")
    p.add_argument("data", help="prepared dataset folder")
    p.add_argument("--autoencoder", required=True, help="autoencoder run or checkpoint folder")
    p.add_argument("--splits", help="comma-separated splits to encode (default: all)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_threads(p)
    p.set_defaults(func=_run_encode)


def _run_encode(args: argparse.Namespace) -> int:
    from mriflow.latents import encode_dataset

    splits = [s.strip() for s in args.splits.split(",")] if args.splits else None
    cache = encode_dataset(args.data, args.autoencoder, splits=splits, batch_size=args.batch_size, device=args.device)
    print(f"latents: {cache}")
    return 0


def _ints(text: str) -> tuple[int, ...]:
    """'16,32' -> (16, 32), for argparse: one level's number each."""
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give whole numbers separated by commas, e.g. 16,32") from None
    if any(value < 1 for value in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every number must be at least 1")
    return values
