"""Flow matching vs the DDPM/DDIM baseline: sample quality against network evaluations and seconds.

For one flow run and one diffusion run (the same grid; normally the same autoencoder, preset
and training budget, e.g. the runs of benchmarks/training.py), on one machine in one run:

    flow       Euler and Heun at 1, 2, 4, 8, 16, 32 steps, and adaptive dopri5 (rtol = atol = 1e-5)
    diffusion  DDIM (η = 0) at 10, 25, 50, 100 steps, and DDPM (η = 1) at 1000 (--ddpm-steps)

each configuration gets: NFE per sample; seconds per volume (noise -> sampler -> decode), the
median of --repeats timed runs after a warm-up at batch 1 and at batch 8 (a small fixed batch,
not the whole set); peak memory (CUDA max allocated on a GPU, reset per configuration; on a
CPU the process's peak resident set size so far, which only grows); and the quality of
--samples volumes against the real held-out volumes (val + test by default): FD, KID,
precision, recall, density, coverage, bootstrap mean ± sd (20 rounds), with covariates copied
from the real subjects and the same seeds sample_seed(0, i) for every configuration.

Writes benchmarks/results/sampling-<grid>-<device>.json, docs/sampling_quality_vs_nfe.png,
docs/sampling_quality_vs_seconds.png and the "## flow vs diffusion: sampling" section of
docs/benchmarks.md.

    python benchmarks/sampling.py --flow runs/bench/flow --diffusion runs/bench/diffusion --data /tmp/ixi4 \\
        --samples 60 --device cpu --repeats 3
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from common import DOCUMENT, RESULTS, link, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from generate import peak_memory_mb, time_sampling  # noqa: E402  (benchmarks/generate.py)
from quality import REPORTED, add_quality_arguments, condition_batch, generated_features, held_out_reference, metric_cell, plot_quality, set_quality, within  # noqa: E402
from mriflow.evaluate.backbones import get_backbone
from mriflow.generate import load_generator

SECTION = "## flow vs diffusion: sampling"
FLOW_STEPS = (1, 2, 4, 8, 16, 32)
DDIM_STEPS = (10, 25, 50, 100)
TARGET_NFE = 8  # flow at <= 8 NFE against DDIM-50: >= 6x fewer network evaluations


def configurations(ddpm_steps: int) -> list[tuple[str, str, int | None]]:
    """(stage, solver, steps) of every measured sampler; steps None = adaptive."""
    flow = [("flow", solver, steps) for solver in ("euler", "heun") for steps in FLOW_STEPS] + [("flow", "dopri5", None)]
    diffusion = [("diffusion", "ddim", steps) for steps in DDIM_STEPS] + [("diffusion", "ddpm", ddpm_steps)]
    return flow + diffusion


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def label(row: dict) -> str:
    return f"{row['stage']} {row['solver']}" + (f" {row['steps']}" if row["solver"] != "dopri5" else "")


def target_check(rows: list[dict]) -> dict:
    """Is a flow sampler at <= 8 NFE no worse than DDIM-50 (within DDIM-50's bootstrap sd) on FD and coverage?"""
    ddim = next((r for r in rows if r["stage"] == "diffusion" and r["solver"] == "ddim" and r["steps"] == 50), None)
    if ddim is None:
        return {"status": "undetermined", "text": "not measured: no DDIM-50 row"}
    reference = f"DDIM-50 ({ddim['nfe']} NFE): FD {metric_cell(ddim['metrics'], 'fd')}, coverage {metric_cell(ddim['metrics'], 'coverage')}"
    candidates = sorted((r for r in rows if r["stage"] == "flow" and r["nfe"] <= TARGET_NFE), key=lambda r: r["nfe"])
    good = [r for r in candidates if within(r["metrics"]["fd"], ddim["metrics"]["fd"], lower_is_better=True)
            and within(r["metrics"]["coverage"], ddim["metrics"]["coverage"], lower_is_better=False)]
    result = {"ddim50": label(ddim), "passing": [label(r) for r in good]}
    if ddim["metrics"]["coverage"]["mean"] == 0:  # a flat zero says nothing about coverage
        reference += " (a coverage of 0 leaves the coverage half of the comparison uninformative)"
    if good:
        best = good[0]
        return {**result, "status": "met", "ratio": ddim["nfe"] / best["nfe"], "text": (
            f"**met**: {reference}; {label(best)} ({best['nfe']} NFE, {ddim['nfe'] / best['nfe']:.1f}x fewer) has FD "
            f"{metric_cell(best['metrics'], 'fd')}, coverage {metric_cell(best['metrics'], 'coverage')}"
            + (f"; also within: {', '.join(label(r) for r in good[1:])}" if len(good) > 1 else ""))}
    closest = min(candidates, key=lambda r: r["metrics"]["fd"]["mean"]) if candidates else None
    shown = (f"; the best flow sampler at ≤ {TARGET_NFE} NFE by FD is {label(closest)} ({closest['nfe']} NFE): FD "
             f"{metric_cell(closest['metrics'], 'fd')}, coverage {metric_cell(closest['metrics'], 'coverage')}") if closest else ""
    return {**result, "status": "missed", "text": f"**missed**: {reference}; no flow sampler at ≤ {TARGET_NFE} NFE is "
            f"within its sd on both{shown}"}


def plot(rows: list[dict], x_key: str, x_label: str, path: Path) -> Path:
    families = [("flow", "euler", "o-"), ("flow", "heun", "s-"), ("flow", "dopri5", "D"),
                ("diffusion", "ddim", "^--"), ("diffusion", "ddpm", "v")]
    series = []
    for stage, solver, marker in families:
        family = sorted((r for r in rows if r["stage"] == stage and r["solver"] == solver), key=lambda r: r[x_key])
        if family:
            series.append((f"{stage} {solver}", marker, [r[x_key] for r in family], [r["metrics"] for r in family]))
    return plot_quality(series, path, x_label, "sample quality", log_x=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flow", type=Path, required=True, help="flow run or checkpoint folder")
    parser.add_argument("--diffusion", type=Path, required=True, help="diffusion run or checkpoint folder")
    parser.add_argument("--data", type=Path, required=True, help="the prepared dataset both were trained on")
    parser.add_argument("--samples", type=int, default=60, help="generated volumes per configuration")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per batch size (median)")
    parser.add_argument("--ddpm-steps", type=int, default=1000, help="steps of the DDPM (η = 1) row")
    add_quality_arguments(parser)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--docs-dir", type=Path, default=DOCUMENT.parent)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python benchmarks/sampling.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    document = args.docs_dir / DOCUMENT.name
    splits = tuple(s for s in args.real_splits.split(",") if s)

    generators = {"flow": load_generator(args.flow, args.device), "diffusion": load_generator(args.diffusion, args.device)}
    for stage, generator in generators.items():
        if generator.stage != stage:
            raise SystemExit(f"--{stage} {getattr(args, stage)} is a {generator.stage} model")
    if generators["flow"].image_shape != generators["diffusion"].image_shape:
        raise SystemExit(f"the flow generates {generators['flow'].image_shape} volumes, the diffusion baseline "
                         f"{generators['diffusion'].image_shape}; compare models of one grid")
    device = generators["flow"].device
    grid = generators["flow"].meta.get("grid") or "unknown"
    covariates = list(dict.fromkeys(generators["flow"].schema.names + generators["diffusion"].schema.names))
    backbone = get_backbone(args.backbone, weights=args.weights, device=str(device))
    reference = held_out_reference(args.data, splits, covariates, backbone)
    print(f"real reference: {len(reference.subjects)} subjects of {', '.join(splits)}")

    rows = []
    for stage, solver, steps in configurations(args.ddpm_steps):
        generator = generators[stage]
        settings = generator.sampling_settings(solver, steps)
        reset_peak_memory(device)
        started = time.perf_counter()
        features, nfe = generated_features(generator, settings, reference, args.samples, backbone, seed=args.seed)
        generation_seconds = time.perf_counter() - started
        quality = set_quality(reference.features, features, rounds=args.rounds)
        condition = condition_batch(generator, reference.requests[:1])  # (1, K): broadcast over the timed batch
        condition = None if condition is None else (condition[0][0], condition[1][0])
        speed = [time_sampling(generator, settings, condition, batch, args.repeats) for batch in (1, 8)]
        row = {"stage": stage, "solver": solver, "steps": steps, "settings": settings, "nfe": nfe,
               "seconds_per_volume_batch1": speed[0]["seconds_per_volume"],
               "seconds_per_volume_batch8": speed[1]["seconds_per_volume"], "speed": speed,
               "generation_seconds": round(generation_seconds, 2), "peak_memory_mb": round(peak_memory_mb(device), 1),
               "bootstrap": quality.pop("_settings"), "metrics": quality}
        rows.append(row)
        print(f"{label(row)}: NFE {nfe}, {row['seconds_per_volume_batch1']} / {row['seconds_per_volume_batch8']} s per "
              f"volume (batch 1 / 8), FD {metric_cell(quality, 'fd')}, coverage {metric_cell(quality, 'coverage')}", flush=True)

    check = target_check(rows)
    memory_kind = "CUDA max allocated, reset per configuration" if device.type == "cuda" else \
        "CPU: peak resident set size of the process so far (ru_maxrss; it only grows)"
    record = {
        "benchmark": "sampling", "command": command, "grid": grid, "device": str(device), "data": str(args.data.resolve()),
        "models": {stage: {"path": str(g.path), "model_id": g.model_id, "model_checksum": g.model_checksum,
                           "autoencoder_checksum": g.autoencoder_checksum, "step": g.meta.get("step"),
                           "preset": g.meta.get("preset"), "parameters": g.meta.get("parameters")}
                   for stage, g in generators.items()},
        "samples": args.samples, "seed": args.seed, "real_splits": list(splits), "real_subjects": len(reference.subjects),
        "backbone": reference.backbone, "rounds": args.rounds, "repeats": args.repeats, "peak_memory": memory_kind,
        "rows": rows, "target": check, "machine": machine(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = write_result(f"sampling-{grid}-{device.type}", record, args.results_dir)
    args.docs_dir.mkdir(parents=True, exist_ok=True)
    by_nfe = plot(rows, "nfe", "network evaluations per sample (NFE)", args.docs_dir / "sampling_quality_vs_nfe.png")
    by_seconds = plot(rows, "seconds_per_volume_batch8", "seconds per volume (batch 8)",
                      args.docs_dir / "sampling_quality_vs_seconds.png")

    table = "\n".join(
        f"| {r['stage']} | {r['solver']} | {r['steps'] if r['solver'] != 'dopri5' else 'adaptive'} | {r['nfe']} | "
        f"{r['seconds_per_volume_batch1']:.3f} | {r['seconds_per_volume_batch8']:.3f} | {r['peak_memory_mb']:.0f} | "
        + " | ".join(metric_cell(r["metrics"], name, 4 if name == "kid" else 3) for name in REPORTED) + " |"
        for r in rows)
    models = "; ".join(f"{stage} `{g.model_id}` ({g.meta.get('preset') or 'custom'} preset, step {g.meta.get('step')})"
                       for stage, g in generators.items())
    m = record["machine"]
    body = f"""Models: {models}, {grid} grid. Each row: {args.samples} generated volumes (seeds sample_seed({args.seed}, i), the same for every row; covariates copied from the real subjects) against the {len(reference.subjects)} real {' + '.join(splits)} volumes, backbone `{reference.backbone}`, bootstrap mean ± sd over {args.rounds} rounds at n = {rows[0]['bootstrap']['n']}. Seconds per volume: noise -> sampler -> decode, median of {args.repeats} runs after a warm-up. Peak memory: {memory_kind}. Machine: {m['cpus']} CPUs, {m['gpu'] or 'no GPU'}, device {device}, {m['torch_threads']} torch threads, load average {m['load_average'][0]} at the end.

    {command}

| model | sampler | steps | NFE | s/volume (batch 1) | s/volume (batch 8) | peak MB | FD | KID | precision | recall | density | coverage |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{table}

Target — flow at ≤ {TARGET_NFE} NFE no worse than DDIM-50 (within its bootstrap sd) on FD and coverage, ≥ 6x fewer network evaluations for the same quality: {check['text']}.

Plots (FD and coverage, log x, error bars = bootstrap sd): {link(by_nfe, document)} (vs NFE), {link(by_seconds, document)} (vs seconds per volume at batch 8). Result: {link(path, document)}."""
    replace_section(document, SECTION, body)
    print(check["text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
