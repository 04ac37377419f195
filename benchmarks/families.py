"""Every generative family side by side, each trained here by its `mriflow train` command (issue 15, deliverable 4).

One table on one grid, one machine and one budget: the latent rectified flow with the U-Net and with
the DiT backbone, the DDPM/DDIM baseline and the R3GAN-style GAN (all on the same autoencoder's
latents), and the 2D slice flow (image space, no autoencoder). Each family is trained by the command
in FAMILY_COMMANDS in legs (`--stop-at-step` at the fractions of --legs of its --max-steps; `--resume`
continues the same learning-rate schedule, exactly as one uninterrupted run), and after every leg its
checkpoint draws --n volumes at requests sweeping age and sex (benchmarks/common.sample_requests)
that `evaluate_generation` compares with the real test split. So each family gets a quality curve
along its training wall time, and the table reads it: the time to its best FD, and every figure at
its last leg. Training and sampling run in child processes, whose peak resident memory (the whole
process: Python, torch and the data included) the operating system reports.

Figures: FD / precision / recall / density / coverage (anatomy backbone, bootstrap mean ± sd, with
Real vs Real), MS-SSIM diversity, the privacy audit (samples flagged as copies in voxel and feature
space, share of samples whose closest real record is a training subject vs the share expected
without memorisation), morphometry (Fréchet distance of the tissue-volume vectors), age fidelity,
inter-slice consistency where the evaluation measures it, network evaluations and seconds per
volume, training wall time, time to best FD, peak memory. Writes "## generative families (<grid>)"
in docs/benchmarks.md, docs/families_<grid>.png and benchmarks/results/families-<grid>.json; the
measurements of each family are kept in --out/<family>/result.json, so a second call only trains
and measures what is missing (e.g. a family added later).

    python benchmarks/families.py --data /tmp/ixi4 --autoencoder src/mriflow/weights/4mm/autoencoder \
        --out /tmp/families4 --family flow --family flow-dit --family diffusion --family gan --family slices
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from common import DOCUMENT, ROOT, command_line, link, machine, replace_section, sample_requests, write_result  # noqa: E402

# label -> (`mriflow train` arguments after the data folder; "{ae}" is --autoencoder), what it is
FAMILY_COMMANDS: dict[str, tuple[list[str], str]] = {
    "flow": (["flow", "--autoencoder", "{ae}"], "latent rectified flow, U-Net (MONAI)"),
    "flow-dit": (["flow", "--autoencoder", "{ae}", "--backbone", "dit"], "latent rectified flow, 3D DiT"),
    "diffusion": (["diffusion", "--autoencoder", "{ae}"], "latent DDPM/DDIM, U-Net"),
    "gan": (["gan", "--autoencoder", "{ae}"], "latent GAN, R3GAN-style"),
    "slices": (["slices"], "2D slice flow, image space"),
}
METRICS = ("fd", "precision", "recall", "density", "coverage")


def train_command(family: str, data: Path, autoencoder: Path, run: Path, max_steps: int, stop: int,
                  threads: int, condition: str) -> list[str]:
    arguments, _ = FAMILY_COMMANDS[family]
    command = [sys.executable, "-m", "mriflow", "train", arguments[0], str(data),
               *[str(autoencoder) if a == "{ae}" else a for a in arguments[1:]],
               "--condition", condition, "--preset", "tiny", "--out", str(run), "--max-steps", str(max_steps),
               "--stop-at-step", str(stop), "--max-minutes", "0", "--threads", str(threads)]
    return command + (["--resume"] if (run / "checkpoints").is_dir() else [])


def command_text(command: list[str], stop: int) -> str:
    """The `mriflow train` command of a leg as a user would type it for the whole run."""
    return (" ".join(["mriflow", "train", *command[4:]]).replace(f" --stop-at-step {stop}", "").replace(" --resume", "")
            .replace(" --max-minutes 0", ""))


def adopted_leg(family: str, run: Path, steps: int, args: argparse.Namespace) -> dict:
    """The latest checkpoint of an adopted run as a leg, after checking that the family's command began it."""
    import csv

    from mriflow import checkpoint as ckpt

    _, meta = ckpt.load_checkpoint(ckpt.latest_checkpoint(run))
    arguments = FAMILY_COMMANDS[family][0]
    backbone = arguments[arguments.index("--backbone") + 1] if "--backbone" in arguments else "unet"
    found = (meta["stage"], meta["config"]["model"].get("backbone", "unet"), meta["config"]["loop"]["max_steps"],
             list(meta["config"]["model"]["covariate_names"]))
    wanted = (arguments[0], backbone, steps, args.condition.split(","))
    if found != wanted:
        raise SystemExit(f"--adopt {family}={run}: the run is (stage, backbone, max_steps, covariates) {found}, not {wanted}")
    with open(run / "log.csv", newline="") as stream:
        elapsed = float(list(csv.DictReader(stream))[-1]["elapsed_seconds"])
    return {"training_seconds": elapsed, "training_peak_mib": None,
            **measure(run, args.data, args.out / family / f"step-{meta['step']}", args.n, args.seed), "step": meta["step"]}


def run_child(command: list[str], log: Path) -> tuple[float, float]:
    """Run a child process with its output in `log`; (wall seconds, peak resident memory in MiB). A failure
    stops the benchmark naming the log."""
    started = time.perf_counter()
    with open(log, "a") as stream:
        stream.write("$ " + " ".join(command) + "\n")
        stream.flush()
        process = subprocess.Popen(command, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} … failed ({process.returncode}); see {log}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # Linux reports KiB


def summary(result: dict) -> dict:
    """The figures of one evaluation the table reads."""
    memorization = result["memorization"]
    closest = memorization["voxel"].get("closest_record", {})
    morphometry = result.get("morphometry", {})
    consistency = {name: {k: entry.get(k) for k in ("mean", "sd")}  # evaluate/consistency.py, per set
                   for name, entry in (result.get("slice_consistency") or {}).get("sets", {}).items()}
    return {
        "columns": {c: {m: {k: v[m][k] for k in ("mean", "sd")} for m in METRICS} for c, v in result["columns"].items()},
        "diversity": {k: result["diversity"][k]["mean"] for k in ("real", "generated")},
        "flagged": {"voxel": memorization["flagged_voxel"], "feature": memorization["flagged_feature"],
                    "chance_rate": memorization["chance_rate"]},
        "closest_record": {k: closest.get(k) for k in ("share_closer_to_training", "expected_without_memorization",
                                                       "p_value")},
        "morphometry": {k: morphometry.get(k) for k in ("frechet_generated", "frechet_real_vs_real")},
        "age": result["conditional_fidelity"].get("age"),
        "consistency": consistency,
    }


def measure(generator_dir: Path, data: Path, out: Path, n: int, seed: int) -> dict:
    from mriflow.evaluate.generation import evaluate_generation
    from mriflow.generate import load_generator

    generator = load_generator(generator_dir, "cpu", labels=False)
    drawn = sample_requests(generator, out / "samples", n, seed)
    has_autoencoder = bool(generator.meta.get("autoencoder"))
    result = evaluate_generation(data, out / "samples", out / "report", split="test",
                                 reconstruct=generator.reconstruct if has_autoencoder else None,
                                 autoencoder=generator.meta["autoencoder"]["path"] if has_autoencoder else None,
                                 progress=False)
    from mriflow.models.velocity import num_parameters

    return {"step": generator.meta.get("step"), "seconds_per_volume": drawn["seconds_per_volume"], "nfe": drawn["nfe"],
            "settings": drawn["settings"], "parameters": num_parameters(generator.velocity_net),
            "batch_size": generator.meta["config"]["loop"]["batch_size"], **summary(result)}


def family_result(family: str, args: argparse.Namespace, adopted: Path | None = None) -> dict:
    """Train `family` leg by leg and measure each leg, reusing what --out already holds. `adopted`: a run begun
    earlier by this family's very command (checked): its latest checkpoint is the first leg (its wall time from its
    log, its peak memory unknown) and the legs after it continue that run."""
    folder = args.out / family
    folder.mkdir(parents=True, exist_ok=True)
    record_path = folder / "result.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {"legs": []}
    steps = int(args.steps.get(family, args.max_steps))
    run = adopted or Path(record.get("adopted") or folder / "run")
    if adopted is not None and not record["legs"]:
        record["legs"].append(adopted_leg(family, adopted, steps, args))
        record.update(adopted=str(adopted), family=family, what=FAMILY_COMMANDS[family][1], max_steps=steps)
        record["command"] = command_text(train_command(family, args.data, args.autoencoder, run, steps, steps,
                                                       args.threads, args.condition), steps)
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    done = max((leg["step"] for leg in record["legs"]), default=0)
    stops = sorted({max(1, round(fraction * steps)) for fraction in args.legs})
    for stop in stops:
        if stop <= done:
            continue
        command = train_command(family, args.data, args.autoencoder, run, steps, stop, args.threads, args.condition)
        print(f"{family}: training to step {stop} of {steps}", flush=True)
        seconds, peak = run_child(command, folder / "train.log")
        trained = (record["legs"][-1]["training_seconds"] if record["legs"] else 0.0) + seconds
        print(f"{family}: measuring step {stop}", flush=True)
        leg = {"training_seconds": trained, "training_peak_mib": peak,
               **measure(run, args.data, folder / f"step-{stop}", args.n, args.seed)}
        leg["step"] = stop
        record["legs"].append(leg)
        record.update(family=family, what=FAMILY_COMMANDS[family][1], max_steps=steps)
        record.setdefault("command", command_text(command, stop))
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    if "sampling_peak_mib" not in record:  # one volume in a fresh process: what sampling needs on its own
        probe = [sys.executable, __file__, "--probe", str(run), "--threads", str(args.threads)]
        record["sampling_peak_mib"] = run_child(probe, folder / "probe.log")[1]
        record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def probe(run: Path) -> int:
    from mriflow.generate import load_generator
    from mriflow.utils.seeding import sample_seed

    generator = load_generator(run, "cpu", labels=False)
    generator.sample([sample_seed(0, 0)], None, generator.sampling_settings())
    return 0


def figure(records: dict[str, dict], out: Path, path: Path) -> None:
    """FD along training wall time per family (the Real vs Real band behind) and one sample of each in three planes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import nibabel as nib

    families = list(records)
    fig = plt.figure(figsize=(3.2 * len(families), 7.2))
    grid = fig.add_gridspec(2, len(families), height_ratios=(1.1, 1.0))
    axis = fig.add_subplot(grid[0, :])
    real = next(iter(records.values()))["legs"][-1]["columns"]["real_vs_real"]["fd"]
    axis.axhspan(real["mean"] - real["sd"], real["mean"] + real["sd"], color="0.85", label="Real vs Real ± sd")
    for family, record in records.items():
        legs = record["legs"]
        minutes = [leg["training_seconds"] / 60 for leg in legs]
        fd = [leg["columns"]["real_vs_generated"]["fd"]["mean"] for leg in legs]
        sd = [leg["columns"]["real_vs_generated"]["fd"]["sd"] for leg in legs]
        axis.errorbar(minutes, fd, yerr=sd, marker="o", capsize=3, label=family)
    axis.set_xlabel("training wall time (min)")
    axis.set_ylabel("FD, real vs generated (anatomy)")
    axis.legend(fontsize=8, ncols=3)
    for column, (family, record) in enumerate(records.items()):
        last = record["legs"][-1]["step"]
        volume = np.asarray(nib.load(str(out / family / f"step-{last}" / "samples" / "sample_00000.nii.gz")).dataobj)
        x, y, z = (s // 2 for s in volume.shape)
        planes = [np.rot90(volume[:, :, z]), np.rot90(volume[:, y, :]), np.rot90(volume[x, :, :])]
        strip = np.concatenate([np.pad(p, ((0, max(q.shape[0] for q in planes) - p.shape[0]), (0, 2)))
                                for p, q in zip(planes, [planes] * 3)], axis=1)
        ax = fig.add_subplot(grid[1, column])
        ax.imshow(strip, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{family}: axial, coronal, sagittal", fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(records: dict[str, dict], n: int) -> list[str]:
    def cell(entry: dict) -> str:
        return f"{entry['mean']:.3g} ± {entry['sd']:.2g}"

    def peak(record: dict) -> str:
        values = [x["training_peak_mib"] for x in record["legs"] if x["training_peak_mib"] is not None]
        return f"{max(values):.0f}" if values else "n/a"

    def best(record: dict) -> dict:
        return min(record["legs"], key=lambda leg: leg["columns"]["real_vs_generated"]["fd"]["mean"])

    def consistency(leg: dict) -> str:
        c = leg.get("consistency") or {}
        generated, real = c.get("generated"), c.get("real")
        if not generated or not real:
            return "not measured"
        return f"{generated['mean']:.3g} ± {generated['sd']:.2g} (real {real['mean']:.3g})"

    rows = [
        ("what", lambda r, leg: r["what"]),
        ("parameters", lambda r, leg: f"{leg['parameters'] / 1e6:.2f} M"),
        ("training: steps x batch", lambda r, leg: f"{leg['step']} x {leg['batch_size']}"),
        ("training wall time", lambda r, leg: f"{leg['training_seconds'] / 60:.0f} min"),
        ("time to best FD (step)", lambda r, leg: f"{best(r)['training_seconds'] / 60:.0f} min ({best(r)['step']})"
         + (" (run adopted)" if r.get("adopted") else "")),
        ("peak memory, training / sampling", lambda r, leg: f"{peak(r)} / {r['sampling_peak_mib']:.0f} MiB"),
        ("network evaluations per volume", lambda r, leg: f"{leg['nfe']}"),
        ("seconds per volume (CPU, batch 1)", lambda r, leg: f"{leg['seconds_per_volume']:.2f}"),
    ]
    rows += [(f"{m}", lambda r, leg, m=m: cell(leg["columns"]["real_vs_generated"][m])) for m in METRICS]
    rows += [
        ("MS-SSIM diversity (real {:.3f})".format(next(iter(records.values()))["legs"][-1]["diversity"]["real"]),
         lambda r, leg: f"{leg['diversity']['generated']:.3f}"),
        ("flagged as copies, voxel / feature", lambda r, leg: f"{leg['flagged']['voxel']} / {leg['flagged']['feature']} of {n}"),
        ("closest record is a training subject", lambda r, leg: "n/a" if leg["closest_record"]["share_closer_to_training"] is None
         else f"{leg['closest_record']['share_closer_to_training']:.2f} (expected "
              f"{leg['closest_record']['expected_without_memorization']:.2f})"),
        ("tissue volumes, Fréchet distance", lambda r, leg: "n/a" if not leg["morphometry"]["frechet_generated"]
         else f"{leg['morphometry']['frechet_generated']['value']:.2g} (real {leg['morphometry']['frechet_real_vs_real']['value']:.2g})"),
        ("age MAE, generated vs requested", lambda r, leg: "n/a" if not leg["age"] else
         f"{leg['age']['generated']['mae']:.1f} y (predictor on real {leg['age']['real']['mae']:.1f} y)"),
        ("inter-slice consistency", lambda r, leg: consistency(leg)),
    ]
    lines = ["| | " + " | ".join(records) + " |", "|---|" + "---|" * len(records)]
    for name, value in rows:
        lines.append(f"| {name} | " + " | ".join(value(r, r["legs"][-1]) for r in records.values()) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, help="a prepared dataset with covariates age and sex")
    parser.add_argument("--autoencoder", type=Path, help="the autoencoder every latent family trains on")
    parser.add_argument("--out", type=Path, help="folder for runs, samples and reports (kept between calls)")
    parser.add_argument("--family", action="append", choices=tuple(FAMILY_COMMANDS), help="repeatable; default: all")
    parser.add_argument("--max-steps", type=int, default=4000, help="training steps of every family (matched)")
    parser.add_argument("--steps", action="append", default=[], metavar="FAMILY=N", help="another step count for one family")
    parser.add_argument("--legs", default="0.25,0.5,1", help="fractions of the steps at which to measure")
    parser.add_argument("--condition", default="age,sex")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--adopt", action="append", default=[], metavar="FAMILY=RUN",
                        help="measure a run trained earlier by the family's very command (checked) instead of training")
    parser.add_argument("--report-only", action="store_true", help="train nothing: the table of what --out holds")
    parser.add_argument("--probe", type=Path, help=argparse.SUPPRESS)  # child: sample one volume of a run
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.probe:
        return probe(args.probe)
    if not (args.data and args.autoencoder and args.out):
        parser.error("--data, --autoencoder and --out are required")
    command = command_line(__file__, argv)
    args.legs = [float(x) for x in args.legs.split(",")]
    args.steps = dict(item.split("=", 1) for item in args.steps)
    from mriflow.data.dataset import read_preparation

    grid = read_preparation(args.data).get("preset", "grid")
    families = args.family or list(FAMILY_COMMANDS)
    adopted = dict(item.split("=", 1) for item in args.adopt)
    records = {}
    for family in families:
        if args.report_only:
            records[family] = json.loads((args.out / family / "result.json").read_text())
        else:
            records[family] = family_result(family, args, Path(adopted[family]) if family in adopted else None)
    record = {"command": command, "n": args.n, "families": records, "machine": machine()}
    path = write_result(f"families-{grid}", record)
    picture = DOCUMENT.parent / f"families_{grid}.png"
    figure(records, args.out, picture)
    first = next(iter(records.values()))["legs"][-1]["columns"]["real_vs_real"]
    yardstick = ", ".join(f"{m} {first[m]['mean']:.3g} ± {first[m]['sd']:.2g}" for m in METRICS)
    commands = "\n".join(f"    {r['command']}" for r in records.values())
    body = (f"Every family trained here by its command (legs at {', '.join(f'{x:g}' for x in args.legs)} of its steps, "
            f"one torch thread each), then {args.n} requests sweeping age and sex per leg, its default sampler, against "
            f"the real test split (anatomy backbone; bootstrap mean ± sd). Figures at the last leg; Real vs Real: "
            f"{yardstick}. Machine: {record['machine']['cpus']} CPUs, load average {record['machine']['load_average'][0]}.\n\n"
            f"    {command}\n\nThe training commands it ran (each leg adds `--stop-at-step S`, then `--resume`):\n\n"
            f"{commands}\n\n" + "\n".join(table(records, args.n)) +
            f"\n\n![FD along training and one sample per family]({picture.name})\n\nResult: {link(path, DOCUMENT)}.")
    replace_section(DOCUMENT, f"## generative families ({grid})", body)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
