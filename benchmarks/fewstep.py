"""Few-step students of the shipped 2 mm model (issue 27): quality against network evaluations and seconds.

One set of teacher pairs (the shipped model's own sampler, Heun 8 steps = 16 evaluations, `mriflow.train.fewstep`),
then every arm trained on them for the same CPU time on one thread, then every sampler measured the same way on one
split: the teacher at 1, 2, 4, 8 and 16 evaluations and each student at its own, with n samples at requests sweeping
age and sex (benchmarks/common.py sample_requests), evaluated against the split's real scans (FD, precision, recall,
coverage on the anatomy network's features, MS-SSIM, high-frequency energy, age MAE), and seconds per volume at
batch 8 on one thread. Arms are chosen on the val split; the test split gives the chosen one's figure once.

    python benchmarks/fewstep.py pairs --teacher 2mm --out runs/fewstep --pairs 512
    python benchmarks/fewstep.py train --teacher 2mm --out runs/fewstep --cpu-minutes 20 [--arms distill-1,reflow-2]
    python benchmarks/fewstep.py measure --data runs/longrun/data-2mm --out runs/fewstep --split val --n 24

Writes benchmarks/results/fewstep-2mm-<split>.json, docs/fewstep_2mm_<split>.png and the "## few-step sampling
(2mm, <split>)" section of docs/benchmarks.md. The run folders (runs/fewstep/*) are local and git-ignored.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from bakeoff import spent_cpu_minutes  # noqa: E402  (benchmarks/ is on sys.path)
from common import (DOCUMENT, RESULTS, command_line, link, machine, quality_checks, replace_section,  # noqa: E402
                    sample_requests, verdict, verdict_lines, write_result)

ARMS = {  # name: (method, steps, the Euler steps it is measured at)
    "distill-1": ("distill", 1, (1,)),
    "distill-2": ("distill", 2, (2,)),
    "reflow-2": ("reflow", 2, (1, 2, 4)),
}
TEACHER = (("euler", 1), ("euler", 2), ("heun", 2), ("heun", 4), ("heun", 8))  # 1, 2, 4, 8, 16 evaluations
PAIRS_SEED = 0
SECONDS_BATCH = 8


def load_teacher(name: str):
    import torch

    from mriflow.generator import load_generator

    torch.set_num_threads(1)
    return load_generator(name, device="cpu", labels=False)


def draw(args: argparse.Namespace) -> None:
    from mriflow.train.fewstep import draw_pairs

    index = draw_pairs(load_teacher(args.teacher), args.out / "pairs", args.pairs, PAIRS_SEED)
    print(f"{index['count']} pairs in {args.out / 'pairs'}")


def train(args: argparse.Namespace) -> None:
    """Each arm until it has spent --cpu-minutes of CPU time in all (an interrupted arm continues), on the shared pairs."""
    from mriflow.train.fewstep import PAIRS_DIR, train_fewstep

    pairs = json.loads((args.out / "pairs" / "index.json").read_text())
    teacher = load_teacher(args.teacher)
    for name in args.arms or ARMS:
        method, steps, _ = ARMS[name]
        run = args.out / name
        left = args.cpu_minutes - spent_cpu_minutes(run)
        if left <= 0.5:
            continue
        run.mkdir(parents=True, exist_ok=True)
        if not (run / PAIRS_DIR).exists():
            (run / PAIRS_DIR).symlink_to(Path("..") / "pairs", target_is_directory=True)
        resume = (run / "checkpoints").is_dir()
        print(f"training {name} for {left:.1f} CPU minutes")
        result = train_fewstep(teacher, run, method=method, steps=steps, pairs=pairs["count"], resume=resume,
                               loop_overrides={"max_cpu_minutes": left, "max_steps": args.max_steps, "lr": args.lr,
                                               "device": "cpu"})
        if result.get("interrupted"):
            return


def measure_one(generator, settings: dict, data: Path, out: Path, split: str, n: int) -> dict:
    from longrun import figures  # noqa: E402  (benchmarks/longrun/longrun.py)
    from generate import time_sampling  # noqa: E402  (benchmarks/generate.py)

    from mriflow.evaluate.generation import evaluate_generation
    from mriflow.models.conditioning import resolve_request

    shutil.rmtree(out, ignore_errors=True)  # this benchmark's own scratch folder: a row measured again starts afresh
    drawn = sample_requests(generator, out / "samples", n, 0, settings)
    result = evaluate_generation(data, out / "samples", out / "report", split=split,
                                 other_split="test" if split == "val" else "val", progress=False)
    condition = resolve_request(generator.schema, {"age": 50.0, "sex": "F"})
    timing = time_sampling(generator, settings, condition, SECONDS_BATCH, repeats=2)
    return {**figures(result, drawn), "seconds_per_volume_batch8": timing["seconds_per_volume"]}


def measure(args: argparse.Namespace) -> dict:
    from mriflow import checkpoint as ckpt
    from mriflow.generator import load_generator

    sys.path.insert(0, str(Path(__file__).resolve().parent / "longrun"))
    result_name = f"fewstep-2mm-{args.split}"
    previous = RESULTS / f"{result_name}.json"
    kept = {row["label"]: row for row in json.loads(previous.read_text())["rows"]} if previous.is_file() else {}
    record = {"benchmark": "fewstep", "grid": "2mm", "split": args.split, "n": args.n, "teacher": args.teacher,
              "command": command_line(__file__, args.argv), "machine": machine(), "rows": []}
    pairs = json.loads((args.out / "pairs" / "index.json").read_text())
    record["pairs"] = {"count": pairs["count"], "teacher": pairs["teacher"]}
    plans = []
    if not args.arms_only:
        teacher = load_teacher(args.teacher)
        for solver, steps in TEACHER:
            plans.append((f"teacher {solver} {steps}", "teacher", teacher, solver, steps, None))
    for name in args.arms or ARMS:
        run = args.out / name
        latest = ckpt.latest_checkpoint(run) if run.is_dir() else None
        if latest is None:
            continue
        best = json.loads((latest / ckpt.META_FILE).read_text()).get("best") or {}
        chosen = Path(best["checkpoint"]) if best.get("checkpoint") and Path(best["checkpoint"]).is_dir() else latest
        student = load_generator(chosen, device="cpu", labels=False)
        for steps in ARMS[name][2]:
            plans.append((f"{name} euler {steps}", name, student, "euler", steps,
                          {"step": student.meta["step"], "cpu_minutes": round(spent_cpu_minutes(run), 1)}))
    for label, arm, generator, solver, steps, trained in plans:
        if args.rows and label not in args.rows:
            continue
        if label in kept and not args.again and (trained is None or kept[label].get("trained") == trained):
            record["rows"].append(kept[label])
            continue
        print(f"measuring {label}")
        settings = generator.sampling_settings(solver=solver, steps=steps)
        row = {"label": label, "arm": arm, "solver": solver, "steps": steps, "trained": trained,
               **measure_one(generator, settings, args.data, args.out / "measure" / args.split / label.replace(" ", "-"),
                             args.split, args.n)}
        record["rows"].append(row)
        write_result(result_name, record)  # a partial record survives an interruption
    record["rows"] += [row for label, row in kept.items() if label not in {r["label"] for r in record["rows"]}]
    record["targets"] = targets(record["rows"])
    write_result(result_name, record)
    picture = DOCUMENT.parent / f"fewstep_2mm_{args.split}.png"
    plot(record, picture)
    samples_picture(record, args.out / "measure" / args.split, DOCUMENT.parent / f"fewstep_2mm_{args.split}_samples.png")
    replace_section(DOCUMENT, f"## few-step sampling (2mm, {args.split})", section(record, picture))
    return record


def samples_picture(record: dict, folder: Path, path: Path, index: int = 12) -> None:
    """One request (sample `index`: the same noise, age and sex in every row) drawn by every sampler, three planes each."""
    from mriflow.data.io import load_volume
    from mriflow.utils.montage import three_plane_montage

    volumes = {}
    for row in sorted(record["rows"], key=lambda r: (r["arm"] != "teacher", r["arm"], r["nfe"])):
        image = folder / row["label"].replace(" ", "-") / "samples" / f"sample_{index:05d}.nii.gz"
        if image.is_file():
            volumes[f"{row['label']} ({row['nfe']} NFE)"] = load_volume(image)[0]
    if volumes:
        sidecar = json.loads(image.with_name(image.name.replace(".nii.gz", ".json")).read_text())
        three_plane_montage(volumes, path, title=f"same noise, {sidecar['covariates']}")


def targets(rows: list[dict]) -> dict:
    """Issue 27's targets for each row at 1 or 2 evaluations against the teacher's 16."""
    reference = next((r for r in rows if r["label"] == "teacher heun 8"), None)
    if reference is None:
        return {"status": "undetermined", "text": "no 16-evaluation teacher row"}
    return verdict({row["label"]: quality_checks(row, reference, 0.5) for row in rows if row["nfe"] <= 2})


def plot(record: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    arms = sorted({r["arm"] for r in record["rows"]}, key=lambda a: (a != "teacher", a))
    for arm in arms:
        rows = sorted((r for r in record["rows"] if r["arm"] == arm), key=lambda r: r["nfe"])
        style = dict(marker="o", label=arm, linestyle="-" if len(rows) > 1 else "none")
        for axis, x, key in ((axes[0], "nfe", "fd"), (axes[1], "seconds_per_volume_batch8", "fd"), (axes[2], "nfe", "hf_ratio")):
            axis.errorbar([r[x] for r in rows], [r[key]["mean"] for r in rows], yerr=[r[key]["sd"] for r in rows],
                          capsize=3, **style)
    axes[0].set(xscale="log", yscale="log", xlabel="network evaluations per volume", ylabel=f"FD ({record['split']}, anatomy features)")
    axes[1].set(xscale="log", yscale="log", xlabel="seconds per volume (batch 8, one CPU thread)", ylabel="FD")
    axes[2].set(xscale="log", xlabel="network evaluations per volume", ylabel="high-frequency energy / real")
    axes[2].axhline(1.0, color="grey", linewidth=0.8)
    for axis in axes:
        axis.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"]) if axis is not axes[1] else None
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Few-step sampling of the 2 mm model: teacher vs students ({record['split']} split, n = {record['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cell(value: dict, digits: int = 0) -> str:
    return f"{value['mean']:.{digits}f} ± {value['sd']:.{digits}f}"


def section(record: dict, picture: Path) -> str:
    lines = [f"Command: `{record['command']}` (pairs: {record['pairs']['count']} samples of the teacher "
             f"{record['pairs']['teacher']['model_id']} with its own sampler, "
             f"`python benchmarks/fewstep.py pairs`; arms: `python benchmarks/fewstep.py train`). One CPU thread.",
             "", f"Quality against evaluations and seconds: {link(picture, DOCUMENT)}; one request drawn by every sampler "
                 f"(same noise, age and sex): {link(picture.with_name(picture.stem + '_samples.png'), DOCUMENT)}", "",
             "| sampler | trained (steps, CPU min) | NFE | FD | precision | recall | coverage | MS-SSIM (real) | HF / real | "
             "age MAE (real) | s / volume, batch 8 |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(record["rows"], key=lambda r: (r["arm"] != "teacher", r["arm"], r["nfe"])):
        trained = f"{r['trained']['step']}, {r['trained']['cpu_minutes']}" if r.get("trained") else "shipped"
        lines.append(f"| {r['label']} | {trained} | {r['nfe']} | {cell(r['fd'])} | {cell(r['precision'], 2)} | "
                     f"{cell(r['recall'], 2)} | {cell(r['coverage'], 2)} | {r['ms_ssim']['generated']:.3f} "
                     f"({r['ms_ssim']['real']:.3f}) | {cell(r['hf_ratio'], 2)} | {r['age_mae']['generated']:.1f} "
                     f"({r['age_mae']['real']:.1f}) | {r['seconds_per_volume_batch8']:.3f} |")
    lines += ["", *verdict_lines(record["targets"], "issue 27, against the teacher's 16 evaluations: FD within its "
                                 "bootstrap sd, recall, coverage and HF no lower by more than one sd, under 0.5 s per "
                                 "volume at batch 8")]
    reading = RESULTS / f"fewstep-2mm-{record['split']}-reading.md"
    if reading.is_file():
        lines += ["", reading.read_text().strip()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pairs", help="draw the teacher's pairs (continues an interrupted draw)")
    p.add_argument("--teacher", default="2mm")
    p.add_argument("--out", type=Path, default=Path("runs/fewstep"))
    p.add_argument("--pairs", type=int, default=512)
    p = commands.add_parser("train", help="train the arms at equal CPU time")
    p.add_argument("--teacher", default="2mm")
    p.add_argument("--out", type=Path, default=Path("runs/fewstep"))
    p.add_argument("--cpu-minutes", type=float, default=20.0)
    p.add_argument("--max-steps", type=int, default=1000, help="the cosine schedule's length (the same for every arm)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], help=f"among {', '.join(ARMS)}")
    p = commands.add_parser("measure", help="measure the teacher and every trained arm on one split")
    p.add_argument("--teacher", default="2mm")
    p.add_argument("--data", type=Path, required=True, help="the prepared 2 mm dataset (its val and test splits)")
    p.add_argument("--out", type=Path, default=Path("runs/fewstep"))
    p.add_argument("--split", default="val", choices=("val", "test"))
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--arms", type=lambda s: [a for a in s.split(",") if a], help=f"among {', '.join(ARMS)}")
    p.add_argument("--arms-only", action="store_true", help="leave the teacher's rows as they are")
    p.add_argument("--again", action="store_true", help="measure rows already measured at the same step again")
    p.add_argument("--rows", type=lambda s: [a.strip() for a in s.split(",") if a.strip()],
                   help="measure only these rows, by label (e.g. 'teacher heun 8,reflow-2 euler 1': the test split's "
                        "one figure for the chosen sampler beside the teacher's)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else sys.argv[1:]
    for name in getattr(args, "arms", None) or []:
        if name not in ARMS:
            parser.error(f"--arms: unknown arm {name!r}; arms: {', '.join(ARMS)}")
    {"pairs": draw, "train": train, "measure": measure}[args.command](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
