"""This brain at other ages, measured (issue 28): counterfactual edits of real test scans against the population.

For each of --n subjects of the test split (their prepared scans and recorded age and sex), the model inverts the
scan under its own covariates and draws it again (mriflow.edit.edit_volume) at each age of --ages and as the other
sex. Measured, as the issue asks:

  identity  the round trip at unchanged covariates against the scan (SSIM, PSNR; for a latent model also against
            the autoencoder's reconstruction, the best it can do), and after a +20-year edit whether the nearest real
            subject (1 − Pearson correlation inside the population brain mask, over every prepared subject) is the
            source
  effect    the anatomy network's predicted age of the edited scans against the requested age (slope of a line
            through all edits, MAE) beside the predictor's own MAE on the real test scans; the change in ventricle
            and total-brain volume per decade of requested age (each subject's slope, averaged) against the
            population's cross-sectional slope (a line through every real subject's volume against age, with a
            bootstrap 95 % interval over subjects)
  sex       the share of sex edits the anatomy network reads as the requested sex
  picture   one subject at every age with edited − round trip maps

Writes benchmarks/results/counterfactuals-<model>.json, docs/counterfactuals_<model>.png and the
"## counterfactuals: <model>" section of docs/benchmarks.md with each target met or missed.

    python benchmarks/counterfactuals.py --data runs/longrun/data-2mm --model 2mm --n 15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from common import DOCUMENT, ROOT, command_line, link, machine, replace_section, write_result  # noqa: E402


def ssim_psnr(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    return (float(structural_similarity(a, b, data_range=1.0)),
            float(peak_signal_noise_ratio(a, b, data_range=1.0)))


def correlation_distance(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> float:
    return float(1.0 - np.corrcoef(a[mask], b[mask])[0, 1])


def population_slope(ages: np.ndarray, values: np.ndarray, rounds: int = 1000, seed: int = 0) -> dict:
    """Change of `values` per decade of age: least squares over subjects, with a bootstrap 95 % interval."""
    rng = np.random.default_rng(seed)
    slope = float(np.polyfit(ages, values, 1)[0] * 10)
    draws = []
    for _ in range(rounds):
        index = rng.integers(0, len(ages), len(ages))
        draws.append(np.polyfit(ages[index], values[index], 1)[0] * 10)
    low, high = np.percentile(draws, [2.5, 97.5])
    return {"per_decade": slope, "low": float(low), "high": float(high)}


def main(argv: list[str] | None = None) -> int:
    import torch

    from mriflow.data.dataset import read_manifest
    from mriflow.data.io import load_volume
    from mriflow.edit import edit_volume
    from mriflow.evaluate.backbones.anatomy import AnatomyBackbone, anatomy_weights_for
    from mriflow.generate import load_generator

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, type=Path, help="the prepared data the model was trained on")
    parser.add_argument("--model", default="default", help="a shipped model's name, or a generator run folder")
    parser.add_argument("--name", help="the section's and result's name for a run folder")
    parser.add_argument("--n", type=int, default=15, help="test subjects to edit")
    parser.add_argument("--ages", default="30,50,70,80", help="the ages every subject is drawn at")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--solver", default="heun")
    parser.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance both ways")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    ages = [float(a) for a in args.ages.split(",")]

    generator = load_generator(args.model, "cpu", labels=False)
    grid = generator.meta.get("grid") or "grid"
    manifest = read_manifest(args.data)
    test = manifest[(manifest["split"] == "test") & manifest["age"].notna() & manifest["sex"].notna()].head(args.n)
    anatomy = AnatomyBackbone(anatomy_weights_for(generator.image_shape))
    everyone = {row.subject: load_volume(args.data / row.image)[0] for row in manifest.itertuples()}
    mask = np.mean([v > 0 for v in everyone.values()], axis=0) >= 0.5

    rows, example = [], None
    for index, row in enumerate(test.itertuples()):
        volume = everyone[row.subject]
        source = {"age": float(row.age), "sex": str(row.sex)}
        other_sex = "F" if source["sex"] == "M" else "M"
        targets = [{"age": a} for a in ages] + [{"age": source["age"] + 20}, {"sex": other_sex}]
        result = edit_volume(generator, volume, source, targets, steps=args.steps, solver=args.solver,
                             guidance=args.guidance)
        edited = result.edited
        round_ssim, round_psnr = ssim_psnr(result.round_trip, volume)
        older = edited[len(ages)]
        nearest = min(everyone, key=lambda s: correlation_distance(older, everyone[s], mask))
        predicted = anatomy.predict(np.stack([*edited, volume])[:, None])
        record = {"subject": row.subject, "source": source, "round_trip_ssim": round_ssim, "round_trip_psnr": round_psnr,
                  "nearest_after_plus_20": nearest, "identity_kept": nearest == row.subject,
                  "requested_ages": ages, "predicted_ages": predicted["age"][:len(ages)].tolist(),
                  "real_predicted_age": float(predicted["age"][-1]),
                  "ventricles_ml": predicted["ventricles_ml"][:len(ages)].tolist(),
                  "total_brain_ml": predicted["total_brain_ml"][:len(ages)].tolist(),
                  "sex_edit_read_as": anatomy.sex_categories[-1 if predicted["sex_prob"][len(ages) + 1] >= 0.5 else 0],
                  "sex_requested": other_sex}
        if generator.autoencoder is not None:
            with torch.no_grad():
                reconstruction = generator.decode(generator.autoencoder.encode(
                    torch.as_tensor(volume)[None, None]).mean * generator.latent_scale)[0]
            record["round_trip_vs_reconstruction_ssim"] = ssim_psnr(result.round_trip, reconstruction)[0]
        rows.append(record)
        if example is None:
            example = (row.subject, source, result)
        print(f"{index + 1}/{len(test)} {row.subject}: round trip SSIM {round_ssim:.3f}, nearest after +20 y "
              f"{'itself' if nearest == row.subject else nearest}", flush=True)

    requested = np.concatenate([r["requested_ages"] for r in rows])
    predicted = np.concatenate([r["predicted_ages"] for r in rows])
    slope = float(np.polyfit(requested, predicted, 1)[0])
    real_rows = manifest[manifest["split"] == "test"].dropna(subset=["age"])
    real_predictions = anatomy.predict(np.stack([everyone[s] for s in real_rows["subject"]])[:, None])
    predictor_mae = float(np.mean(np.abs(real_predictions["age"] - real_rows["age"].to_numpy(float))))
    all_rows = manifest.dropna(subset=["age"])
    all_predictions = anatomy.predict(np.stack([everyone[s] for s in all_rows["subject"]])[:, None])
    population = {k: population_slope(all_rows["age"].to_numpy(float), all_predictions[k]) for k in ("ventricles_ml", "total_brain_ml")}
    # the yardstick: how steeply the same predictor's age follows the true age of real scans (regression to the mean
    # makes it < 1), over every real subject
    predictor_slope = float(np.polyfit(all_rows["age"].to_numpy(float), all_predictions["age"], 1)[0])
    edits_per_decade = {k: float(np.mean([np.polyfit(ages, r[k], 1)[0] * 10 for r in rows])) for k in population}
    summary = {
        "round_trip_ssim": float(np.mean([r["round_trip_ssim"] for r in rows])),
        "round_trip_psnr": float(np.mean([r["round_trip_psnr"] for r in rows])),
        "identity_kept": float(np.mean([r["identity_kept"] for r in rows])),
        "age_slope": slope, "predictor_slope_real": predictor_slope,
        "age_mae": float(np.mean(np.abs(predicted - requested))), "predictor_mae": predictor_mae,
        "sex_edits_read_as_requested": float(np.mean([r["sex_edit_read_as"] == r["sex_requested"] for r in rows])),
        "per_decade": {k: {"edits": edits_per_decade[k], "population": population[k]} for k in population},
    }
    targets = [
        {"target": "round trip at unchanged covariates SSIM ≥ 0.98", "met": summary["round_trip_ssim"] >= 0.98,
         "measured": f"{summary['round_trip_ssim']:.3f} (PSNR {summary['round_trip_psnr']:.1f} dB)"},
        {"target": "nearest real subject after +20 years is the source ≥ 95 %", "met": summary["identity_kept"] >= 0.95,
         "measured": f"{summary['identity_kept']:.0%}"},
        {"target": "predicted age follows the requested age: slope 0.8-1.2", "met": 0.8 <= slope <= 1.2,
         "measured": f"{slope:.2f} (the predictor on real scans: {predictor_slope:.2f})"},
        {"target": "age MAE no worse than the predictor's own on real scans",
         "met": summary["age_mae"] <= predictor_mae, "measured": f"{summary['age_mae']:.1f} vs {predictor_mae:.1f} y"},
    ] + [{"target": f"{k.removesuffix('_ml').replace('_', ' ')} change per decade inside the population slope's 95 % interval",
          "met": population[k]["low"] <= edits_per_decade[k] <= population[k]["high"],
          "measured": f"{edits_per_decade[k]:+.1f} ml vs {population[k]['per_decade']:+.1f} "
                      f"[{population[k]['low']:+.1f}, {population[k]['high']:+.1f}]"} for k in population]
    name = args.name or (args.model if not Path(args.model).exists() else Path(args.model).name)
    if args.guidance != 1.0 and not args.name:  # its own section: guidance 1 is the reference
        name += f"-guidance{args.guidance:g}"
    record = {"benchmark": "counterfactuals", "command": command_line(__file__, argv), "model_id": generator.model_id,
              "grid": grid, "steps": args.steps, "solver": args.solver, "summary": summary, "targets": targets,
              "subjects": rows, "machine": machine()}
    path = write_result(f"counterfactuals-{name}", record)
    picture = ROOT / "docs" / f"counterfactuals_{name}.png"
    draw(example, ages, picture)
    checks = "\n".join(f"| {t['target']} | {t['measured']} | {'met' if t['met'] else 'missed'} |" for t in targets)
    body = f"""`{record['command']}`: {len(rows)} test subjects of `{args.data}` edited with the model `{generator.model_id}`
({args.solver}, {args.steps} steps each way, guidance {args.guidance:g}): each inverted under its recorded age and sex and drawn again at
{', '.join(f'{a:g}' for a in ages)} years, at its age + 20 and as the other sex. Sex edits read as the requested sex by the
anatomy network: {summary['sex_edits_read_as_requested']:.0%}.

| target | measured | |
|---|---|---|
{checks}

{link(picture, DOCUMENT)} Result: {link(path, DOCUMENT)}."""
    replace_section(DOCUMENT, f"## counterfactuals: {name}", body)
    print(body)
    return 0


def draw(example, ages, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subject, source, result = example
    columns = len(ages) + 1
    fig, axes = plt.subplots(2, columns, figsize=(2.2 * columns, 4.8))
    middle = result.source.shape[2] // 2 + 4  # an axial slice through the ventricles
    axes[0, 0].imshow(np.rot90(result.source[:, :, middle]), cmap="gray", vmin=0, vmax=1)
    axes[0, 0].set_title(f"scan, {source['age']:.0f} y {source['sex']}", fontsize=9)
    axes[1, 0].imshow(np.rot90(result.round_trip[:, :, middle]), cmap="gray", vmin=0, vmax=1)
    axes[1, 0].set_title("round trip", fontsize=9)
    for k, age in enumerate(ages, 1):
        axes[0, k].imshow(np.rot90(result.edited[k - 1][:, :, middle]), cmap="gray", vmin=0, vmax=1)
        axes[0, k].set_title(f"at {age:g} y", fontsize=9)
        axes[1, k].imshow(np.rot90(result.difference[k - 1][:, :, middle]), cmap="RdBu_r", vmin=-0.3, vmax=0.3)
        axes[1, k].set_title("edit − round trip", fontsize=9)
    for axis in axes.ravel():
        axis.axis("off")
    fig.suptitle(f"{subject}: the same person at other ages (inverting the flow)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
