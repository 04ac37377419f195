"""Flow matching vs the DDPM/DDIM baseline: sample quality against optimizer steps at identical budgets.

Trains RUNS/flow (train_flow) and RUNS/diffusion (train_diffusion) from the same preset name,
so the same network, batch, optimizer and learning-rate schedule (both get the same
`--max-steps`), in legs of `--eval-every` optimizer steps (stop_at_step, then resume: the same
loss curve as one uninterrupted run). After each leg it draws `--samples` volumes from each
model's EMA weights with its default sampler (flow: Heun 8 steps; diffusion: DDIM 50), with
covariates copied from the real held-out subjects (val + test by default), and measures FD,
KID, precision, recall, density and coverage against those real volumes with a bootstrap
(mean ± sd, 20 rounds, n = default_sample_size). Same seeds and covariates at every point.

Progress is kept in RUNS/training-points.json: an interrupted benchmark continues where it
stopped when run again with the same arguments. Writes
benchmarks/results/training-<preset>-<grid>.json, docs/training_quality.png and the
"## flow vs diffusion: training" section of docs/benchmarks.md.

    python benchmarks/training.py --data /tmp/ixi4 --autoencoder runs/ae-tiny --out-root runs/bench \\
        --condition age,sex --preset tiny --max-steps 8000 --eval-every 1000 --samples 60
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import DOCUMENT, RESULTS, link, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from quality import REPORTED, add_quality_arguments, held_out_reference, generated_features, metric_cell, plot_quality, set_quality, within  # noqa: E402
from mriflow import checkpoint as ckpt
from mriflow.evaluate.backbones import get_backbone
from mriflow.generate import load_generator
from mriflow.train.generator import train_diffusion, train_flow

SECTION = "## flow vs diffusion: training"
TRAIN = {"flow": train_flow, "diffusion": train_diffusion}
POINTS_FILE = "training-points.json"


def leg_ends(max_steps: int, eval_every: int) -> list[int]:
    """The optimizer steps at which a leg ends and the models are evaluated: every `eval_every`, and the last step."""
    ends = list(range(eval_every, max_steps + 1, eval_every))
    return ends if ends and ends[-1] == max_steps else ends + [max_steps]


def checkpoint_at(run: Path, step: int) -> Path:
    return run / ckpt.CHECKPOINTS_DIR / f"step-{step:08d}"


def latest_step(run: Path) -> int:
    latest = ckpt.latest_checkpoint(run)
    return 0 if latest is None else int(json.loads((latest / ckpt.META_FILE).read_text())["step"])


def training_seconds(run: Path, step: int) -> float:
    """Seconds spent in optimizer steps up to `step`, as the run's log.csv records them (kept across resumes)."""
    with open(run / "log.csv", newline="") as stream:
        rows = [row for row in csv.DictReader(stream) if int(row["step"]) <= step]
    return float(rows[-1]["elapsed_seconds"]) if rows else 0.0


def load_points(path: Path, settings: dict) -> list[dict]:
    """The points of an earlier, interrupted run of this benchmark with the same settings."""
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if saved["settings"] != settings:
        changed = sorted(k for k in settings.keys() | saved["settings"].keys() if settings.get(k) != saved["settings"].get(k))
        raise SystemExit(f"{path} was written with other settings ({', '.join(changed)} differ); run with the same "
                         "arguments to continue it, or choose another --out-root")
    return saved["points"]


def target_check(points: list[dict]) -> dict:
    """Does the flow reach the diffusion baseline's final FD (within its bootstrap sd) in <= 1/3 of its steps?"""
    flow = sorted((p for p in points if p["stage"] == "flow"), key=lambda p: p["step"])
    diffusion = sorted((p for p in points if p["stage"] == "diffusion"), key=lambda p: p["step"])
    if not flow or not diffusion:
        return {"status": "undetermined", "text": "not measured: a stage has no evaluated point yet"}
    final = diffusion[-1]
    budget = final["step"] / 3
    reached = next((p for p in flow if within(p["metrics"]["fd"], final["metrics"]["fd"], lower_is_better=True)), None)
    baseline = f"the diffusion baseline's final FD is {metric_cell(final['metrics'], 'fd')} at step {final['step']}"
    result = {"diffusion_final_step": final["step"], "diffusion_final_fd": final["metrics"]["fd"], "step_budget": budget,
              "flow_first_step_within": reached["step"] if reached else None}
    if reached is not None and reached["step"] <= budget:
        fraction = reached["step"] / final["step"]
        return {**result, "status": "met", "text": f"**met**: {baseline}; the flow is within it (FD "
                f"{metric_cell(reached['metrics'], 'fd')}) at step {reached['step']}, {fraction:.2f} of the baseline's steps"}
    if not any(p["step"] <= budget for p in flow):
        return {**result, "status": "undetermined", "text": f"**undetermined**: {baseline}, but the flow has no evaluation "
                f"at or below {budget:.0f} steps (1/3); lower --eval-every"}
    where = (f"first at step {reached['step']} ({reached['step'] / final['step']:.2f} of the steps)" if reached
             else "at no evaluated step")
    return {**result, "status": "missed", "text": f"**missed**: {baseline}; the flow gets within it {where}, not by "
            f"step {budget:.0f} (1/3)"}


def plot(points: list[dict], path: Path) -> Path:
    series = []
    for stage, marker in (("flow", "o-"), ("diffusion", "s--")):
        rows = sorted((p for p in points if p["stage"] == stage), key=lambda p: p["step"])
        series.append((stage, marker, [p["step"] for p in rows], [p["metrics"] for p in rows]))
    return plot_quality(series, path, "optimizer steps", "quality vs training steps")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="prepared dataset (mriflow prepare)")
    parser.add_argument("--autoencoder", type=Path, required=True, help="autoencoder run or checkpoint folder")
    parser.add_argument("--out-root", type=Path, required=True, help="holds the runs flow/ and diffusion/ (resumed when present)")
    parser.add_argument("--condition", default="age,sex", help="covariates, comma-separated ('' = unconditional)")
    parser.add_argument("--preset", default="tiny", help="flow-<preset> and diffusion-<preset>")
    parser.add_argument("--max-steps", type=int, required=True, help="optimizer steps of both schedules")
    parser.add_argument("--eval-every", type=int, required=True, help="optimizer steps per leg")
    parser.add_argument("--samples", type=int, default=60, help="generated volumes per evaluation")
    add_quality_arguments(parser)
    parser.add_argument("--device", default="auto", help="device of the evaluation sampling (training: the preset's)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--docs-dir", type=Path, default=DOCUMENT.parent)
    args = parser.parse_args(argv)
    if args.eval_every < 1 or args.max_steps < args.eval_every:
        parser.error(f"need 1 <= --eval-every <= --max-steps, got {args.eval_every} and {args.max_steps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/training.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    condition = [name for name in args.condition.split(",") if name]
    splits = tuple(s for s in args.real_splits.split(",") if s)
    document = args.docs_dir / DOCUMENT.name

    # one autoencoder checkpoint for both stages and every leg, even while its run goes on training
    autoencoder = ckpt.resolve_checkpoint(args.autoencoder).resolve()
    backbone = get_backbone(args.backbone, weights=args.weights)
    started = time.perf_counter()
    reference = held_out_reference(args.data, splits, condition, backbone)
    print(f"real reference: {len(reference.subjects)} subjects of {', '.join(splits)} ({time.perf_counter() - started:.1f} s)")
    settings = {"data": str(args.data.resolve()), "autoencoder": str(autoencoder), "preset": args.preset,
                "condition": condition, "max_steps": args.max_steps, "eval_every": args.eval_every, "samples": args.samples,
                "real_splits": list(splits), "backbone": reference.backbone, "rounds": args.rounds, "seed": args.seed}
    args.out_root.mkdir(parents=True, exist_ok=True)
    points_path = args.out_root / POINTS_FILE
    points = load_points(points_path, settings)
    wall = {stage: max((p["wall_seconds"] for p in points if p["stage"] == stage), default=0.0) for stage in TRAIN}

    for end in leg_ends(args.max_steps, args.eval_every):
        for stage, train in TRAIN.items():
            if any(p["stage"] == stage and p["step"] == end for p in points):
                continue
            run = args.out_root / stage
            leg_started = time.perf_counter()
            if latest_step(run) < end:
                resume = ckpt.latest_checkpoint(run) is not None
                train(args.data, autoencoder, run, condition=condition, preset=args.preset, max_steps=args.max_steps,
                      resume=resume, stop_at_step=end)
            leg_seconds = time.perf_counter() - leg_started
            wall[stage] += leg_seconds
            if not checkpoint_at(run, end).is_dir():
                print(f"{stage}: no checkpoint at step {end} to evaluate (already trained past it); skipped")
                continue

            eval_started = time.perf_counter()
            generator = load_generator(checkpoint_at(run, end), args.device)
            if generator.meta.get("preset") != args.preset:
                raise SystemExit(f"{run} was trained from preset {generator.meta.get('preset')!r}, not {args.preset!r}; "
                                 "choose another --out-root")
            sampler = generator.sampling_settings()
            features, nfe = generated_features(generator, sampler, reference, args.samples, backbone, seed=args.seed)
            quality = set_quality(reference.features, features, rounds=args.rounds)
            point = {"stage": stage, "step": end, "training_seconds": round(training_seconds(run, end), 1),
                     "wall_seconds": round(wall[stage], 1), "leg_seconds": round(leg_seconds, 1),
                     "eval_seconds": round(time.perf_counter() - eval_started, 1), "sampler": sampler, "nfe": nfe,
                     "bootstrap": quality.pop("_settings"), "metrics": quality}
            points.append(point)
            points_path.write_text(json.dumps({"settings": settings, "points": points}, indent=1) + "\n")
            print(f"{stage} step {end}/{args.max_steps}: training {point['training_seconds']} s so far, leg "
                  f"{point['leg_seconds']} s, evaluation {point['eval_seconds']} s; FD {metric_cell(quality, 'fd')}, "
                  f"coverage {metric_cell(quality, 'coverage')}", flush=True)

    points.sort(key=lambda p: (p["stage"] != "flow", p["step"]))
    meta = json.loads((ckpt.latest_checkpoint(args.out_root / "flow") / ckpt.META_FILE).read_text())
    grid = meta.get("grid") or "unknown"
    check = target_check(points)
    record = {
        "benchmark": "training", "command": command, **settings, "grid": grid, "real_subjects": len(reference.subjects),
        "parameters": meta["parameters"], "latent_shape": meta["latent_shape"], "train_subjects": meta["data"]["train_subjects"],
        "points": points, "target": check, "machine": machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_result(f"training-{args.preset}-{grid}", record, args.results_dir)
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    picture = plot(points, args.docs_dir / "training_quality.png")

    rows = "\n".join(
        f"| {p['stage']} | {p['step']} | {p['training_seconds']:.0f} | "
        + " | ".join(metric_cell(p["metrics"], name, 4 if name == "kid" else 3) for name in REPORTED) + " |"
        for p in points)
    n = points[0]["bootstrap"]["n"] if points else "?"
    used = {p["stage"]: p["sampler"] for p in points}
    samplers = "; ".join(f"{stage}: {s['solver']} {s['steps']} steps, guidance {s['guidance']}" for stage, s in used.items())
    body = f"""`{args.preset}` presets ({meta['parameters'] / 1e6:.1f} M parameters, latent {' x '.join(map(str, meta['latent_shape']))}) on the {grid} grid, {meta['data']['train_subjects']} training subjects, conditioned on {', '.join(condition) or 'nothing'}; both stages trained for the same {args.max_steps}-step schedule and evaluated every {args.eval_every} steps (EMA weights) with their default samplers ({samplers}). Each point: {args.samples} generated volumes (seeds sample_seed({args.seed}, i), covariates copied from the real subjects) against the {len(reference.subjects)} real {' + '.join(splits)} volumes, backbone `{reference.backbone}`, bootstrap mean ± sd over {args.rounds} rounds at n = {n}. Training seconds are the optimizer steps' own time from the runs' log.csv. Machine: {record['machine']['cpus']} CPUs, {record['machine']['gpu'] or 'no GPU'}, {record['machine']['torch_threads']} torch threads, load average {record['machine']['load_average'][0]} at the end.

    {command}

| stage | step | training s | FD | KID | precision | recall | density | coverage |
|---|---|---|---|---|---|---|---|---|
{rows}

Target — flow matching reaches the diffusion baseline's final quality (FD within its bootstrap sd) in ≤ 1/3 of its optimizer steps: {check['text']}.

Plot (FD and coverage vs optimizer steps, error bars = bootstrap sd): {link(picture, document)}. Result: {link(path, document)}."""
    replace_section(document, SECTION, body)
    print(check["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
