"""Evaluate a shipped model (default: the default one) as a user would: generate, then `mriflow evaluate generation`.

Draws `--n` volumes whose requested (age, sex) sweep the training range (ages evenly over
[min + 2, max - 2] years, sex alternating), so the report's conditional-fidelity rows are
measured, then evaluates them against the real test split (with the Real vs Reconstruction column when the model has
an autoencoder; an image-space model has none), and checks issue 24's generation targets against the Real vs Real
yardstick, sampling speed at batch 8 on one thread included. Writes
benchmarks/results/model-<name>.json and the "## model: <name>" section of docs/benchmarks.md
(the report itself stays in --out).

    python benchmarks/default_model.py --data /tmp/ixi4 --out /tmp/model-4mm-eval --model 4mm
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from statistics import median


from common import DOCUMENT, command_line, link, machine, replace_section, sample_requests, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow.evaluate.generation import evaluate_generation
from mriflow.generate import DEFAULT_MODEL, autoencoder_folder, load_generator, shipped_models

ROWS = ("fd", "kid", "precision", "recall", "density", "coverage")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="the prepared dataset the model was trained on")
    parser.add_argument("--out", required=True, type=Path, help="new folder for the samples and the report")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model", default="default", help="a shipped model's name (4mm, 2mm) or 'default', or a generator "
                        "run folder (then --name)")
    parser.add_argument("--name", help="the section's and result's name for a run folder (e.g. 2mm-cpu)")
    args = parser.parse_args(argv)
    command = command_line(__file__, argv)

    shipped = shipped_models()
    if args.model not in ("default", *shipped) and not args.name:
        parser.error(f"--model {args.model} is a run folder, not a shipped model: name it with --name")
    generator = load_generator(args.model, "cpu")
    name = args.name or (DEFAULT_MODEL if args.model == "default" else args.model)
    latent = generator.autoencoder is not None
    autoencoder = autoencoder_folder(generator.meta, generator.path).resolve() if latent else None  # its own autoencoder/
    what = f"The model `{name}` (run `{args.model}`)" if args.name else f"The shipped model `{name}`"
    samples = args.out / "samples"
    drawn = sample_requests(generator, samples, args.n, args.seed)
    settings, ages = drawn["settings"], drawn["ages"]
    result = evaluate_generation(args.data, samples, args.out / "report", split="test",
                                 reconstruct=generator.reconstruct if latent else None,
                                 autoencoder=str(autoencoder) if latent else None, progress=False)
    speed = batch_speed(generator, settings)
    record = {"benchmark": "default_model", "command": command, "model_id": generator.model_id,
              "model_checksum": generator.model_checksum, "settings": settings, "n": args.n,
              "columns": {c: {m: {k: v[m][k] for k in ("mean", "sd")} for m in ROWS} for c, v in result["columns"].items()},
              "diversity": {k: v for k, v in result["diversity"].items() if k != "settings"},
              "memorization": {k: v for k, v in result["memorization"].items() if k != "table"},
              "conditional_fidelity": result["conditional_fidelity"], "backbone": result["backbone"],
              "sharpness": {k: v for k, v in result["sharpness"].items() if k != "values"},
              "representation": generator.representation_name, "seconds_per_volume_batch8": speed, "machine": machine()}
    record["targets"] = target_checks(record)
    path = write_result(f"model-{name}", record)
    header = "| | " + " | ".join(ROWS) + " |\n|---|" + "---|" * len(ROWS)
    lines = [f"| {column.replace('_', ' ')} | " + " | ".join(f"{values[m]['mean']:.3g} ± {values[m]['sd']:.2g}" for m in ROWS) + " |"
             for column, values in record["columns"].items()]
    fidelity = result["conditional_fidelity"]
    checks = "\n".join(f"| {c['target']} | {c['measured']} | {'met' if c['met'] else 'missed'} |" for c in record["targets"])
    body = f"""{what} (`{generator.model_id}`, {settings['solver']} {settings['steps']} steps) sampled at {args.n} requests sweeping age {ages[0]:.0f}–{ages[-1]:.0f} y and sex F/M, against the real test split; backbone `{result['backbone']['name']}`. Full report: `{args.out / 'report' / 'report.html'}`.

    {command}

{header}
{chr(10).join(lines)}

Conditional fidelity (anatomy network on the generated volumes vs the requests, next to the same network on real test subjects): `{_fidelity(fidelity)}`. Memorization: {_memorization(result['memorization'])}.

Sharpness: high-frequency energy (mean |Laplacian| in the brain) {_ratio(record['sharpness'], 'laplacian')} x the real
test split's, gradient magnitude {_ratio(record['sharpness'], 'gradient')} x; sampling {speed:.2f} s per volume at batch 8
on one thread ({generator.representation_name}).

Targets (issue 24, against the Real vs Real yardstick of the same run):

| target | measured | |
|---|---|---|
{checks}

Result: {link(path, DOCUMENT)}."""
    replace_section(DOCUMENT, f"## model: {name}", body)
    print(body)
    return 0


def batch_speed(generator, settings: dict, batch: int = 8, threads: int = 1) -> float:
    """Seconds per volume of `generate`'s work (sampling, decoding, background) at `batch` on `threads` threads."""
    import time

    import torch

    from mriflow.utils.seeding import sample_seed

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.perf_counter()
        generator.sample([sample_seed(99, i) for i in range(batch)], None, settings)
        return (time.perf_counter() - started) / batch
    finally:
        torch.set_num_threads(previous)


def _ratio(sharpness: dict, measure: str) -> str:
    ratio = sharpness["sets"]["generated"][measure]["ratio"]
    return f"{ratio['mean']:.2f} ± {ratio['sd']:.2f}"


def target_checks(record: dict) -> list[dict]:
    """Issue 24's generation targets, each as {target, measured, met}, from a result record."""
    columns, diversity = record["columns"], record["diversity"]
    real, generated = columns["real_vs_real"], columns["real_vs_generated"]
    memorization, fidelity = record["memorization"], record["conditional_fidelity"]
    checks = [{"target": "FD ≤ 1.5 x Real vs Real", "met": generated["fd"]["mean"] <= 1.5 * real["fd"]["mean"],
               "measured": f"{generated['fd']['mean'] / real['fd']['mean']:.2f} x ({generated['fd']['mean']:.3g} vs "
                           f"{real['fd']['mean']:.3g})"}]
    for metric in ("coverage", "recall"):
        ratio = generated[metric]["mean"] / max(real[metric]["mean"], 1e-12)
        checks.append({"target": f"{metric} ≥ 0.9 x Real vs Real", "met": ratio >= 0.9,
                       "measured": f"{ratio:.2f} x ({generated[metric]['mean']:.3g} vs {real[metric]['mean']:.3g})"})
    gap = diversity["generated"]["mean"] - diversity["real"]["mean"]
    checks.append({"target": "generated MS-SSIM within 0.02 of real", "met": abs(gap) <= 0.02,
                   "measured": f"{diversity['generated']['mean']:.3f} vs {diversity['real']['mean']:.3f}"})
    if "age" in fidelity:
        generated_mae, real_mae = fidelity["age"]["generated"]["mae"], fidelity["age"]["real"]["mae"]
        checks.append({"target": "age MAE (generated vs requested) ≤ the predictor's on real scans",
                       "met": generated_mae <= real_mae, "measured": f"{generated_mae:.1f} vs {real_mae:.1f} y"})
    if "sharpness" in record:
        ratio = record["sharpness"]["sets"]["generated"]["laplacian"]["ratio"]["mean"]
        checks.append({"target": "high-frequency energy 0.9-1.1 x real", "met": 0.9 <= ratio <= 1.1,
                       "measured": f"{ratio:.2f} x"})
    allowed = memorization["chance_rate"] * record["n"]
    for space in ("voxel", "feature"):
        flagged = memorization[f"flagged_{space}"]
        checks.append({"target": f"samples flagged as copies ({space} space) ≤ the chance rate",
                       "met": flagged <= allowed, "measured": f"{flagged} of {record['n']} (chance {allowed:.1f})"})
    closest = memorization.get("voxel", {}).get("closest_record")
    if closest:
        checks.append({"target": "closest real subject not leaning to training subjects (p > 0.05)",
                       "met": closest["p_value"] > 0.05,
                       "measured": f"{closest['share_closer_to_training']:.0%} vs {closest['expected_without_memorization']:.0%} "
                                   f"expected, p = {closest['p_value']:.2g}"})
    if record.get("seconds_per_volume_batch8") is not None:
        checks.append({"target": "sampling ≤ 2.5 s per volume at batch 8 on one thread",
                       "met": record["seconds_per_volume_batch8"] <= 2.5,
                       "measured": f"{record['seconds_per_volume_batch8']:.2f} s"})
    return checks


def _fidelity(fidelity: dict) -> str:
    if "skipped" in fidelity:
        return fidelity["skipped"]
    parts = []
    if "age" in fidelity:
        g, r = fidelity["age"]["generated"], fidelity["age"]["real"]
        parts.append(f"age MAE {g['mae']:.1f} y (r {g['pearson_r']:.2f}) vs real {r['mae']:.1f} y (r {r['pearson_r']:.2f})")
    if "sex" in fidelity:
        parts.append(f"sex accuracy {fidelity['sex']['generated']['accuracy']:.2f} vs real {fidelity['sex']['real']['accuracy']:.2f}")
    return "; ".join(parts)


def _memorization(memorization: dict) -> str:
    voxel, copies = memorization["voxel"], memorization.get("decoded_copy_distance") or {"voxel": [float("nan")]}
    return (f"{memorization['flagged_voxel']} generated volume(s) flagged in voxel space and "
            f"{memorization['flagged_feature']} in feature space (of {len(memorization['voxel']['flagged'])}) as closer to "
            f"a training subject than the {memorization['heldout']} {memorization['heldout_reference']} come "
            f"(chance rate about {memorization['chance_rate']:.0%}). Scale, in voxel space (1 − correlation): "
            f"decoded training subjects lie {median(copies['voxel']):.4f} from themselves (median; a copy), the generated "
            f"volumes' nearest training subjects {median(voxel['generated_nearest_distance']):.4f} (median; range "
            f"{min(voxel['generated_nearest_distance']):.4f}–{max(voxel['generated_nearest_distance']):.4f}), the held-out "
            f"reconstructions' {median(voxel['heldout_nearest_distance']):.4f} (threshold {voxel['threshold']:.4f})")


if __name__ == "__main__":
    sys.exit(main())
