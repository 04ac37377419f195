"""`mriflow evaluate reconstruction | generation | utility`: the autoencoder's reconstructions on a split, real
against generated volumes (the report), and training on synthetic data tested on real (`evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from mriflow.cli.common import add_threads
from mriflow.utils.text import counted


def add_commands(commands) -> None:
    _add_evaluate(commands)


def _add_evaluate(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="reconstruction metrics, the generation report, or the utility of "
                                                    "synthetic data (train on synthetic, test on real)")
    kinds = evaluate.add_subparsers(dest="evaluation", required=True, metavar="KIND")  # not "kind": train autoencoder --kind

    p = kinds.add_parser("reconstruction", help="MSE, NMSE, PSNR, SSIM, MS-SSIM of the autoencoder on a split")
    p.add_argument("data", help="prepared dataset folder")
    p.add_argument("--autoencoder", required=True, help="autoencoder run or checkpoint folder")
    p.add_argument("--split", default="val", help="split to reconstruct (default val)")
    p.add_argument("--out", help="output folder (default RUN/reconstruction-SPLIT)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add_threads(p)
    p.set_defaults(func=_run_evaluate_reconstruction)

    p = kinds.add_parser("generation", help="FD/KID/MMD, PRDC with bootstrap, diversity, memorization, fidelity")
    p.add_argument("--real", required=True, help="prepared dataset folder (the real data)")
    p.add_argument("--fake", required=True, help="folder of generated NIfTI volumes on the same template grid")
    p.add_argument("--prepare-fake", choices=("none", "brain", "head"), default="none",
                   help="another generator's volumes (MAISI, BrLP, WDM, yours) on their own grid: take them through the "
                        "real data's preparation recipe first (registered to MNI152, resampled to its grid, scaled "
                        "to [0, 1]) into OUT/fake-prepared; brain: already skull-stripped, head: skull-stripped by "
                        "deepbet (default none: the volumes are on the grid already)")
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
    add_threads(p)
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
    add_threads(p)
    p.set_defaults(func=_run_evaluate_utility)


def _run_evaluate_reconstruction(args: argparse.Namespace) -> int:
    from mriflow.evaluate.reconstruction import evaluate_reconstruction

    summary = evaluate_reconstruction(args.data, args.autoencoder, split=args.split, out=args.out, device=args.device)
    metrics = summary["metrics"]
    print(f"{counted(summary['subjects'], args.split + ' subject')}: SSIM {metrics['ssim']['mean']:.4f}, "
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
    if args.prepare_fake != "none":
        args.fake = str(prepare_fake(args.real, args.fake, Path(args.out) / "fake-prepared", args.prepare_fake))

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


def prepare_fake(real: str, fake: str, out: Path, kind: str) -> Path:
    """Another generator's volumes through the real data's recipe (its prepare.json preset): registered to MNI152,
    resampled to the grid, scaled to [0, 1], skull-stripped by deepbet when they are heads; returns their images folder."""
    from mriflow.data.dataset import read_preparation

    preset = read_preparation(real).get("preset")
    if preset is None:
        raise ValueError(f"--prepare-fake: {real} has no prepare.json naming its grid; prepare the real data with "
                         "`mriflow prepare` first")
    from mriflow.data.outside import prepare_outside
    from mriflow.generate_io import is_label_map

    volumes = [p for p in sorted(Path(fake).glob("*.nii*")) if not is_label_map(p)]
    if not volumes:
        raise ValueError(f"--fake {fake}: no NIfTI volumes to prepare")
    prepare_outside(volumes, out, preset, kind, "--fake", strict=False)
    return out / "prepared" / "images"
