"""The 2 mm bake-off at equal CPU time (issue 24, deliverables 2 and 3): today's recipe against the image-space flow,
and each training switch of the image-space flow on and off, every arm on one thread for the same CPU minutes.

Arms are the flow-wavelet preset (Haar packet of two levels, MONAI's U-Net, x-prediction, JiT's logit-normal times,
non-leaky flip augmentation) with the network or one switch changed (ARMS). Each is trained by `train ARM` in a child process
(`--max-cpu-minutes`: thread-minutes of this process, which a busy machine does not shrink), validated on the val
split at every checkpoint (GeneratorStage.validate: the mean squared error of the network's clean-volume estimate at
t = 0.3 … 0.9, fixed noise), and measured by `measure`: --n samples at requests sweeping age and sex against the val
split (anatomy backbone: FD, recall, coverage; MS-SSIM; high-frequency energy / real; age MAE) beside today's recipe,
the shipped 2 mm latent model (4.6 thread-hours: autoencoder 2.2 h, decoder refinement 1.0 h, flow 1.4 h), measured
the same way. Writes "## bake-off at equal CPU time (2mm)" in docs/benchmarks.md, docs/bakeoff_2mm.png and
benchmarks/results/bakeoff-2mm.json.

    python benchmarks/bakeoff.py train default --data runs/longrun/data-2mm --out runs/bakeoff --cpu-minutes 30
    python benchmarks/bakeoff.py train unet ...        # one arm per call; `all` trains the missing ones in turn
    python benchmarks/bakeoff.py measure --data runs/longrun/data-2mm --out runs/bakeoff --n 24
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOCUMENT, ROOT, command_line, link, machine, replace_section, write_result  # noqa: E402


READING = ROOT / "benchmarks" / "results" / "bakeoff-2mm-reading.md"


def _objective(**changes) -> Callable:
    return lambda config: dataclasses.replace(config, objective=dataclasses.replace(config.objective, **changes))


def _model(**changes) -> Callable:
    return lambda config: dataclasses.replace(config, model=dataclasses.replace(config.model, **changes))


def _sampling(**changes) -> Callable:
    return lambda config: dataclasses.replace(config, sampling=dataclasses.replace(config.sampling, **changes))


def _dit(config):
    """The DiT the flow-wavelet preset first had: 2 x 2 x 2-band tokens (8 mm of brain each), width 256, 6 blocks."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, backbone="dit", dit_patch_size=2,
                                                                 dit_hidden=256, dit_depth=6, dit_heads=4))


# name -> (what it changes, the change to the flow-wavelet preset: Haar packet, MONAI U-Net 64-96-96, x-prediction,
# JiT's logit-normal(-0.8, 0.8) times, flip flag). The first arms compare networks, the rest switch one thing each.
ARMS: dict[str, tuple[str, Callable]] = {
    "unet": ("flow-wavelet as shipped: haar2, MONAI U-Net 64-96-96 (7.4 M parameters), x-prediction, "
             "logit-normal(-0.8, 0.8) times, flip flag", lambda c: c),
    "dit": ("a 3D DiT instead of the U-Net (7.6 M parameters: 2 x 2 x 2-band tokens, width 256, 6 blocks)", _dit),
    "dit-preconditioned": ("the DiT with EDM's skip preconditioning: the clean volume at the noise end, x_t passed "
                           "through at the data end", lambda c: _objective(prediction="preconditioned")(_dit(c))),
    "velocity": ("the U-Net predicts the velocity, not the clean volume", _objective(prediction="velocity")),
    "min-snr": ("min-SNR-5 weighting of the loss", _objective(weighting="min_snr")),
    "no-flip": ("no left-right flip augmentation", _model(flip_channel=False)),
    "sd3-times": ("SD3's logit-normal(0, 1) training times", _objective(time_mean=0.0, time_std=1.0)),
    "repa": ("REPA: the U-Net's first block aligned with the anatomy network's features (weight 0.5)",
             lambda c: dataclasses.replace(c, alignment=dataclasses.replace(c.alignment, weight=0.5))),
    "natural-bands": ("the Haar bands keep their natural energies beside the coarsest (band equalisation 0): noise "
                      "drowns fine detail first and the flow draws coarse to fine, as on voxels",
                      lambda c: dataclasses.replace(c, band_equalisation=0.0)),
    "half-bands": ("the Haar bands halfway to unit sd (band equalisation 0.5: sd (sd_k / sd_0)^0.5)",
                   lambda c: dataclasses.replace(c, band_equalisation=0.5)),
}


def arm_config(name: str):
    from mriflow.train.generator import load_config

    return ARMS[name][1](load_config("flow", "wavelet"))


def spent_cpu_minutes(run: Path) -> float:
    """CPU minutes an arm has trained up to its latest checkpoint (log.csv's cpu_seconds at that step), 0 if none."""
    from mriflow import checkpoint as ckpt

    latest = ckpt.latest_checkpoint(run) if run.is_dir() else None
    if latest is None or not (run / "log.csv").is_file():
        return 0.0
    step = int(latest.name.split("-")[1])
    with open(run / "log.csv", newline="") as stream:
        rows = [r for r in csv.DictReader(stream) if int(r["step"]) <= step and r.get("cpu_seconds")]
    return float(rows[-1]["cpu_seconds"]) / 60 if rows else 0.0


def train_arm(name: str, data: Path, out: Path, cpu_minutes: float) -> str | None:
    """Train one arm in this process until it has spent `cpu_minutes` of CPU time in all (an interrupted arm continues
    from its latest checkpoint with what is left): one thread, the arm's config, checkpoints every 10 minutes of wall
    time (each validated)."""
    import torch

    from mriflow.train.generator import train_generator

    torch.set_num_threads(1)
    run = out / name
    left = cpu_minutes - spent_cpu_minutes(run)
    if left <= 0.5:
        return None
    resume = (run / "checkpoints").is_dir()
    result = train_generator("flow", data, None, run, condition=None if resume else ["age", "sex"],
                             config=None if resume else arm_config(name), resume=resume,
                             loop_overrides={"max_cpu_minutes": left, "checkpoint_minutes": 10})
    return result.get("interrupted") if isinstance(result, dict) else None


def curve(run: Path) -> list[dict]:
    """validation.csv joined with log.csv's cpu_seconds at the same step: [{"step", "cpu_minutes", "val_x_mse"}]."""
    with open(run / "log.csv", newline="") as stream:
        cpu = {int(r["step"]): float(r["cpu_seconds"]) / 60 for r in csv.DictReader(stream) if r.get("cpu_seconds")}
    with open(run / "validation.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    points = []
    for row in rows:
        step = int(row["step"])
        known = [s for s in cpu if s <= step]
        points.append({"step": step, "cpu_minutes": cpu[max(known)] if known else None,
                       "val_x_mse": float(row["val_x_mse"])})
    return points


def measure_all(args: argparse.Namespace) -> dict:
    from mriflow import checkpoint as ckpt

    sys.path.insert(0, str(ROOT / "benchmarks" / "longrun"))
    from longrun import measure  # noqa: E402

    # the command that measures every arm (--arms only chooses which to measure now; the others keep their figures)
    argv = [a for i, a in enumerate(args.argv) if a != "--arms" and (i == 0 or args.argv[i - 1] != "--arms")]
    record = {"benchmark": "bakeoff", "grid": "2mm", "split": "val", "n": args.n, "cpu_minutes": args.cpu_minutes,
              "command": command_line(__file__, argv), "machine": machine(), "arms": {}}
    previous = ROOT / "benchmarks" / "results" / "bakeoff-2mm.json"
    kept = json.loads(previous.read_text())["arms"] if previous.is_file() else {}
    for name, (what, _) in ARMS.items():
        run = args.out / name
        latest = ckpt.latest_checkpoint(run) if run.is_dir() else None
        if latest is None or (args.arms and name not in args.arms):
            if name in kept:
                record["arms"][name] = kept[name]
            continue
        _, meta = ckpt.load_checkpoint(latest)
        if name in kept and kept[name].get("step") == meta["step"] and not args.again:
            record["arms"][name] = kept[name]
            continue
        print(f"measuring {name} at step {meta['step']}")
        record["arms"][name] = {"what": what, "step": meta["step"], "curve": curve(run),
                                **measure(latest, args.data, args.out / "measure" / name, "val", args.n)}
    if args.shipped:
        print("measuring today's recipe (the shipped 2 mm latent model)")
        from mriflow.generator import shipped_models

        record["arms"]["today"] = {"what": "today's recipe: the shipped 2 mm latent model (small autoencoder, decoder "
                                           "refined, flow-small); 4.6 thread-hours in all", "thread_hours": 4.6,
                                   **measure(shipped_models()["2mm"] / "flow", args.data, args.out / "measure" / "today",
                                             "val", args.n)}
    elif "today" in kept:
        record["arms"]["today"] = kept["today"]
    return record


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = {k: v for k, v in record["arms"].items() if k != "today"}
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, arm in arms.items():
        points = [p for p in arm["curve"] if p["cpu_minutes"] is not None]
        axes[0].plot([p["cpu_minutes"] for p in points], [p["val_x_mse"] for p in points], marker="o", label=name)
    axes[0].set_xlabel("CPU minutes (one thread)")
    axes[0].set_ylabel("val denoising MSE (t = 0.3 … 0.9)")
    axes[0].legend(fontsize=8)
    names = list(record["arms"])
    for axis, key, title in ((axes[1], "fd", "FD (val, anatomy features)"), (axes[2], "hf_ratio", "high-frequency energy / real")):
        axis.bar(range(len(names)), [record["arms"][n][key]["mean"] for n in names],
                 yerr=[record["arms"][n][key]["sd"] for n in names], color="tab:blue")
        axis.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
        axis.set_title(title)
        if key == "fd":  # arms far from real and today's model near it on one axis
            axis.set_yscale("log")
        reference = key + "_real"
        first = record["arms"][names[0]]
        if reference in first:
            axis.axhline(first[reference]["mean"], color="grey", linestyle="--", label="real vs real")
            axis.legend(fontsize=8)
    fig.suptitle(f"2 mm bake-off at {record['cpu_minutes']:g} CPU minutes per arm (one thread); today's recipe at 4.6 thread-hours")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(record: dict, picture: Path) -> str:
    lines = [f"`{record['command']}` (after `python benchmarks/bakeoff.py train all ...`). Every arm is the flow-wavelet "
             f"preset with one switch changed, trained on one thread for {record['cpu_minutes']:g} CPU minutes (nice, beside "
             f"other work: CPU time, not wall time), measured on the val split with {record['n']} samples at requests "
             "sweeping age and sex. Today's recipe is the shipped 2 mm latent model, 4.6 thread-hours in all.", "",
             "| arm | what | step | val MSE | FD (real vs real) | recall | coverage | MS-SSIM gen / real | HF / real | age MAE | s / volume |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, arm in record["arms"].items():
        last = arm["curve"][-1]["val_x_mse"] if arm.get("curve") else None
        lines.append(f"| {name} | {arm['what']} | {arm.get('step', '')} | {'' if last is None else f'{last:.5f}'} | "
                     f"{arm['fd']['mean']:.1f} ± {arm['fd']['sd']:.1f} ({arm['fd_real']['mean']:.1f}) | "
                     f"{arm['recall']['mean']:.2f} | {arm['coverage']['mean']:.2f} | "
                     f"{arm['ms_ssim']['generated']:.3f} / {arm['ms_ssim']['real']:.3f} | "
                     f"{arm['hf_ratio']['mean']:.2f} ± {arm['hf_ratio']['sd']:.2f} | "
                     f"{arm['age_mae']['generated'] if arm['age_mae']['generated'] is None else round(arm['age_mae']['generated'], 1)} | "
                     f"{arm.get('seconds_per_volume', float('nan')):.1f} |")
    lines += ["", link(picture, DOCUMENT)]
    if READING.is_file():  # what the figures say, written by whoever ran it (kept across remeasurements)
        lines += ["", READING.read_text().strip()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("train", "measure"))
    parser.add_argument("arm", nargs="?", help=f"train: one of {', '.join(ARMS)}, or all")
    parser.add_argument("--data", type=Path, required=True, help="the 2 mm prepared folder")
    parser.add_argument("--out", type=Path, required=True, help="folder of the arms' runs")
    parser.add_argument("--cpu-minutes", type=float, default=30.0)
    parser.add_argument("--n", type=int, default=24, help="samples per arm for the measurement")
    parser.add_argument("--shipped", action="store_true", help="measure: also today's recipe (the shipped 2 mm model)")
    parser.add_argument("--again", action="store_true", help="measure: remeasure arms already in the results")
    parser.add_argument("--arms", type=lambda text: text.split(","), default=None,
                        help="measure: only these arms (comma-separated; the others keep their recorded figures)")
    args = parser.parse_args(argv)
    args.argv = argv or sys.argv[1:]
    if args.action == "train":
        names = [n for n in ARMS if spent_cpu_minutes(args.out / n) < args.cpu_minutes - 0.5] if args.arm == "all" else [args.arm]
        for name in names:
            if name not in ARMS:
                raise SystemExit(f"unknown arm {name!r}; arms: {', '.join(ARMS)}")
            print(f"training arm {name} for {args.cpu_minutes:g} CPU minutes", flush=True)
            interrupted = train_arm(name, args.data, args.out, args.cpu_minutes)
            if interrupted:  # Ctrl+C or SIGTERM: the arm kept a checkpoint; the next arms wait for the next run
                print(f"stopped by {interrupted} in arm {name}; `train all` again continues it", flush=True)
                return {"SIGINT": 130, "SIGTERM": 143}[interrupted]
        return 0
    record = measure_all(args)
    write_result("bakeoff-2mm", record)
    picture = ROOT / "docs" / "bakeoff_2mm.png"
    plot(record, picture)
    replace_section(DOCUMENT, "## bake-off at equal CPU time (2mm)", section(record, picture))
    print(f"wrote {DOCUMENT}, {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
