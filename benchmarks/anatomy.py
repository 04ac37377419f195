"""Train mriflow's anatomy network (the `anatomy` evaluation backbone) on a prepared dataset, and measure it.

Training is `mriflow.train.anatomy.train_anatomy`, the shared training loop's anatomy stage: tissue classes
made from the DLMUSE label maps under the prepared folder's labels/ (mapped by region name,
`mriflow.data.labels.muse_tissue_mapping`), age and sex from manifest.csv, augmentation (left-right flip,
intensity scale / shift / gamma inside the brain), EMA weights, and model selection on the val split once an
epoch (the checkpoint of the lowest validation loss). This script turns its options into that run's config,
exports the selected EMA weights, calibrates them (features, sex read-out) and reports on the test split: age
MAE, sex accuracy, Dice per tissue class, and the segmentation-measured ventricle and total-brain volumes
against the prepared label maps (template space) and against MUSE's 509 Ventricles / 701 TotalBrain in
region_volumes.csv (native space; template volumes are scaled back with the determinant of each subject's
registration affine from records/<subject>.json).

Writes src/mriflow/weights/anatomy.safetensors (config, label mapping and this record in
its metadata), benchmarks/results/anatomy-<grid>.json and the "## anatomy backbone"
section of docs/benchmarks.md.

    python benchmarks/anatomy.py --data /tmp/ixi4 --epochs 26 --max-minutes 18
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from common import DOCUMENT, RESULTS, ROOT, command_line, link, machine, replace_section, write_result  # noqa: E402  (benchmarks/ is on sys.path)
from mriflow.checkpoint import sha256
from mriflow.data.dataset import read_preparation
from mriflow.data.labels import tissue_lookup, tissue_volumes_ml
from mriflow.evaluate.backbones import AnatomyBackbone
from mriflow.models.anatomy import AnatomyEncoder, save_anatomy_encoder
from mriflow.train.anatomy import (
    AnatomySubjects,
    anatomy_network,
    encoder_config,
    load_anatomy_weights,
    load_config,
    train_anatomy,
)
from mriflow.train.labels import read_label_map

SECTION = "## anatomy backbone: {grid}"  # one section (and one weights file) per grid
WEIGHTS = ROOT / "src" / "mriflow" / "weights" / "anatomy.safetensors"
PRESETS = {"4mm": "tiny", "2mm": "small"}  # the training preset of a grid (options below override its recipe)


def load_split(subjects: AnatomySubjects) -> dict:
    """A split as tensors: images (N, 1, D, H, W), tissue classes (N, 1, D, H, W), age, sex index (NaN when missing)."""
    return {"image": subjects.images[:, None], "target": subjects.targets[:, None].long(), "age": subjects.age.double(),
            "sex": subjects.sex.double(), "subject": list(subjects.subjects)}


# ----------------------------------------------------------------------------- measuring


def dice_per_class(predicted: torch.Tensor, target: torch.Tensor, classes) -> dict[str, list[float]]:
    """Per-subject Dice of every class but background; NaN where a class is absent from both."""
    scores = {}
    for index, name in enumerate(classes):
        if name == "background":
            continue
        p, t = (predicted == index).flatten(1), (target == index).flatten(1)
        denominator = (p.sum(1) + t.sum(1)).double()
        scores[name] = torch.where(denominator > 0, 2 * (p & t).sum(1) / denominator.clamp(min=1), torch.nan).tolist()
    return scores


def pearson(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() > 2 else math.nan


def registration_scale(data: Path, subject: str) -> float:
    """Native volume / template volume: |det| of the template-to-subject affine that prepare recorded."""
    record = data / "records" / f"{subject}.json"
    if not record.is_file():
        return math.nan
    matrix = json.loads(record.read_text()).get("registration", {}).get("template_to_subject_ras")
    return abs(float(np.linalg.det(np.asarray(matrix)[:3, :3]))) if matrix is not None else math.nan


def measure(backbone: AnatomyBackbone, split: dict, data: Path, muse: pd.DataFrame | None) -> dict:
    """Held-out figures of the saved network, run through the backbone exactly as evaluation runs it."""
    predictions = backbone.predict(split["image"].numpy())
    segmentation = backbone.segment(split["image"].numpy())
    config = backbone.config
    age, sex = split["age"].numpy(), split["sex"].numpy()
    known_age, known_sex = np.isfinite(age), np.isfinite(sex)
    dice = dice_per_class(segmentation, split["target"][:, 0], config.classes)
    true_volumes = tissue_volumes_ml(split["target"][:, 0], config.classes, config.voxel_mm)
    result = {
        "subjects": len(split["subject"]),
        "age_mae_years": float(np.abs(predictions["age"] - age)[known_age].mean()),
        "age_pearson_r": pearson(predictions["age"], age),
        "age_mae_predicting_train_mean_years": None,  # filled by the caller, which knows the training mean
        "sex_accuracy": float(((predictions["sex_prob"] > 0.5) == (sex == 1))[known_sex].mean()),
        "sex_subjects": int(known_sex.sum()),
        "sex_majority_share": float(max(np.mean(sex[known_sex] == 1), np.mean(sex[known_sex] == 0))),
        "dice": {name: float(np.nanmean(values)) for name, values in dice.items()},
        "dice_sd": {name: float(np.nanstd(values, ddof=1)) for name, values in dice.items()},
    }
    volumes = {}
    scale = np.array([registration_scale(data, s) for s in split["subject"]])
    for key, region, name in (("ventricles_ml", "509", "ventricles"), ("total_brain_ml", "701", "total_brain")):
        predicted, labelled = predictions[key], true_volumes[name]
        entry = {"predicted_mean_ml": float(predicted.mean()), "label_map_mean_ml": float(labelled.mean()),
                 "pearson_r_vs_label_map": pearson(predicted, labelled),
                 "mean_abs_relative_error_vs_label_map": float(np.mean(np.abs(predicted - labelled) / labelled))}
        if muse is not None:
            native = muse.reindex(split["subject"])[region].to_numpy(float) / 1000.0
            entry.update({"muse_native_mean_ml": float(np.nanmean(native)),
                          "pearson_r_vs_muse_native": pearson(predicted * scale, native),
                          "pearson_r_template_vs_muse_native": pearson(predicted, native),
                          "mean_abs_relative_error_vs_muse_native": float(np.nanmean(np.abs(predicted * scale - native) / native))})
        volumes[name] = entry
    result["volumes"] = volumes
    return result


# ----------------------------------------------------------------------------- calibration


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """L2-penalised logistic regression (L-BFGS, float64): weights (F,) and bias minimising
    mean cross-entropy + l2 * |w|^2."""
    x, y = x.double(), y.double()
    weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=500, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.binary_cross_entropy_with_logits(x @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), float(bias)


@torch.no_grad()
def calibrate(model: AnatomyEncoder, train: dict, val: dict, test: dict,
              penalties=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)) -> dict:
    """After training: (1) standardise the features with the training subjects' statistics;
    (2) fit the sex read-out (`AnatomyEncoder.sex_logit`): an L2 logistic regression on the
    standardised block means of the training subjects, penalty chosen by validation
    cross-entropy, written into the network's `sex_probe` layer."""
    model.eval()
    model.calibrate_features(train["image"])

    def blocks(split):
        known = torch.isfinite(split["sex"])
        return model.sex_blocks(split["image"][known]).double(), split["sex"][known].double()

    (x_train, y_train), (x_val, y_val) = blocks(train), blocks(val)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-8)
    trials = []
    for penalty in penalties:
        weight, bias = fit_logistic((x_train - mean) / std, y_train, penalty)
        logits = (x_val - mean) / std @ weight + bias
        trials.append({"l2": penalty, "val_cross_entropy": float(F.binary_cross_entropy_with_logits(logits, y_val)),
                       "val_accuracy": float(((logits > 0) == (y_val == 1)).double().mean()), "weight": weight, "bias": bias})
    chosen = min(trials, key=lambda t: t["val_cross_entropy"])
    # The read-out does not depend on the network, so its recipe (standardise, fit at the chosen
    # penalty) can be cross-validated over every subject: a steadier figure than 15 test subjects.
    x_all, y_all = (torch.cat(parts) for parts in zip(*(blocks(split) for split in (train, val, test))))
    folds, correct = 10, []
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(0))
    for fold in range(folds):
        held = order[fold::folds]
        kept = order[~torch.isin(order, held)]
        m, s = x_all[kept].mean(0), x_all[kept].std(0).clamp(min=1e-8)
        w, b = fit_logistic((x_all[kept] - m) / s, y_all[kept], chosen["l2"])
        correct.append((((x_all[held] - m) / s @ w + b > 0) == (y_all[held] == 1)))
    correct = torch.cat(correct).double()
    model.sex_probe.weight[0] = (chosen["weight"] / std).float()
    model.sex_probe.bias[0] = float(chosen["bias"] - (chosen["weight"] * mean / std).sum())
    dim = model.embedding_dim
    return {"features": f"embedding ({dim}) + mean and sd per channel of the first {model.config.texture_levels} encoder "
                        f"levels ({model.feature_dim - dim}), every dimension standardised with the "
                        f"{len(train['image'])} training subjects' mean and sd",
            "sex_read_out": f"L2 logistic regression on the standardised {' x '.join(map(str, model.config.sex_blocks))} "
                            f"block means of the volume, fitted on the training subjects, penalty by validation "
                            f"cross-entropy",
            "sex_penalties": [{k: v for k, v in t.items() if k not in ("weight", "bias")} for t in trials],
            "sex_l2": chosen["l2"],
            "sex_cross_validated": {"folds": folds, "subjects": len(y_all), "accuracy": float(correct.mean()),
                                    "majority_share": float(max(y_all.mean(), 1 - y_all.mean()))}}


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="prepared dataset with labels/ (mriflow prepare)")
    parser.add_argument("--regions", default=str(ROOT.parent / "shared" / "data" / "ixi"),
                        help="folder with muse_regions.csv (index,name) and region_volumes.csv")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--max-minutes", type=float, default=17.0, help="stop training after this wall time")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--age-weight", type=float, default=1.0, help="weight of the age loss")
    parser.add_argument("--sex-weight", type=float, default=1.0, help="weight of the sex loss")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(WEIGHTS), help="weights file to write")
    parser.add_argument("--init", type=Path, help="start from this anatomy weights file (with --epochs 0: only "
                        "recalibrate the features and the sex head, keeping the trained network)")
    parser.add_argument("--run", type=Path, help="keep the training run (checkpoints, logs, montages) in this folder "
                        "(default: a temporary one)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--document", type=Path, default=DOCUMENT, help="the Markdown file whose section is written")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of the result JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    command = command_line(__file__, argv)
    started = time.perf_counter()

    data, regions_dir = Path(args.data), Path(args.regions)
    regions_file = regions_dir / "muse_regions.csv"
    if not regions_file.is_file():
        raise FileNotFoundError(f"--regions {regions_dir}: no muse_regions.csv (index,name) there")
    label_map = read_label_map(regions_file)
    volumes_file = regions_dir / "region_volumes.csv"
    muse = pd.read_csv(volumes_file, index_col=0) if volumes_file.is_file() else None

    lookup = tissue_lookup(label_map)
    subjects = {name: AnatomySubjects(data, name, lookup) for name in ("train", "val", "test")}
    splits = {name: load_split(split) for name, split in subjects.items()}
    train = splits["train"]
    grid = read_preparation(data).get("grid", {}).get("name", "")
    training_config = load_config(PRESETS.get(grid, "tiny"))
    config = encoder_config(data, label_map, subjects["train"], training_config)
    age_mean = config.target_mean["age"]
    print(f"train {len(train['subject'])}, val {len(splits['val']['subject'])}, test {len(splits['test']['subject'])} "
          f"subjects; grid {config.grid} {config.shape}", flush=True)

    history, initial_record = [], None
    if args.epochs > 0:
        per_epoch = len(train["subject"]) // args.batch_size
        steps = args.epochs * per_epoch
        training_config = dataclasses.replace(
            training_config, age_weight=args.age_weight, sex_weight=args.sex_weight,
            loop=dataclasses.replace(training_config.loop, max_steps=steps, batch_size=args.batch_size, lr=args.lr,
                                     warmup_steps=max(1, steps // 10), checkpoint_every=per_epoch,
                                     log_every=max(1, min(training_config.loop.log_every, per_epoch)),
                                     max_minutes=args.max_minutes, seed=args.seed, device=args.device))
        with tempfile.TemporaryDirectory(prefix="anatomy-run-") as folder:
            run = args.run or Path(folder) / "run"
            result = train_anatomy(data, run, config=training_config, label_map=label_map, init=args.init)
            if result["best"] is None:
                raise ValueError(f"{run}: no finite validation loss, so no checkpoint to select; lower --lr")
            model = anatomy_network(result["best"]["checkpoint"])
            history = training_history(run, per_epoch)
        best_epoch = epochs(result["best"]["step"], per_epoch)
        print(f"selected the EMA weights of step {result['best']['step']} (epoch {best_epoch:g}) of {result['step']}: "
              + json.dumps({k: round(v, 4) for k, v in result["best"]["validation"].items()}), flush=True)
    else:
        if args.init is None:
            raise ValueError("--epochs 0 recalibrates a trained network: give it with --init")
        model, initial_record = load_anatomy_weights(args.init, config, fine_tune=False)
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    train_minutes = (time.perf_counter() - started) / 60
    calibration = calibrate(model, train, splits["val"], splits["test"])
    print(json.dumps({k: v for k, v in calibration.items() if k != "features"}), flush=True)

    # Measure the saved file through the backbone, as evaluation will load it.
    with tempfile.TemporaryDirectory() as folder:
        backbone = AnatomyBackbone(save_anatomy_encoder(Path(folder) / "anatomy.safetensors", model))
        figures = {name: measure(backbone, splits[name], data, muse) for name in ("val", "test")}
    for name in figures:
        age = splits[name]["age"].numpy()
        figures[name]["age_mae_predicting_train_mean_years"] = float(np.nanmean(np.abs(age - age_mean)))
    training_keys = ("epochs_run", "best_epoch", "batch_size", "lr", "loss_weights", "train_minutes")
    if history:  # trained here
        loop = training_config.loop
        training = {"epochs_run": epochs(result["step"], per_epoch), "best_epoch": best_epoch,
                    "steps": result["step"], "best_step": result["best"]["step"], "batch_size": loop.batch_size,
                    "lr": loop.lr, "loss_weights": {"age": args.age_weight, "sex": args.sex_weight},
                    "schedule": f"linear warm-up over {loop.warmup_steps} steps, cosine decay; EMA {loop.ema_decay}; "
                                f"AdamW weight decay {loop.weight_decay}; selected on the val split every epoch",
                    "trained_on": trained_on(args.device),
                    "train_minutes": round(train_minutes, 1)}
        commands = [command]
        if args.init:
            training["initialised_from"] = {"weights": str(args.init), "sha256": sha256(args.init),
                                            "grid": json.loads(json.dumps(_stored_grid(args.init)))}
    else:  # --init --epochs 0: the network is the initial file's; say how that one was trained
        if initial_record is None or any(k not in initial_record for k in training_keys):
            raise ValueError(f"--init {args.init}: its metadata has no training record, so --epochs 0 cannot say how "
                             f"the network was trained; train it here (--epochs N)")
        training = {k: initial_record[k] for k in training_keys + ("initialised_from", "steps", "best_step", "schedule",
                                                                   "trained_on") if k in initial_record}
        commands = initial_record.get("commands", [initial_record.get("command")]) + [command]
    record = {
        "benchmark": "anatomy", "commands": commands, "data": str(data.resolve()), "grid": config.grid,
        "shape": list(config.shape), "classes": list(config.classes),
        "brain_classes_total_brain": ["ventricles", "grey_matter", "white_matter", "brainstem"],
        "label_mapping": "mriflow.data.labels.muse_tissue_mapping on muse_regions.csv (single regions < 300) + UNNAMED_DLMUSE_LABELS",
        "subjects": {name: len(split["subject"]) for name, split in splits.items()},
        "parameters": parameters, **training, "calibration": calibration,
        "val": figures["val"], "test": figures["test"],
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if not history and initial_record is not None and "history" in initial_record:
        history = initial_record["history"]
    out = save_anatomy_encoder(Path(args.out).resolve(), model,
                               record={**{k: v for k, v in record.items() if k != "val"}, "history": history},
                               dtype=torch.float16)  # kernels in fp16: the file travels to GPU machines (64 MiB in all)
    out.chmod(0o644)  # safetensors writes 0600; the file ships in the package and must be readable by all
    record.update({"weights": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
                   "weights_sha256": sha256(out), "weights_mb": round(out.stat().st_size / 2**20, 2),
                   "feature_dim": model.feature_dim, "history": history or _earlier_history(config.grid, args.results),
                   "machine": machine()})
    path = write_result(f"anatomy-{config.grid}", record, folder=args.results)
    write_section(record, path, args.document)
    print(json.dumps({k: record[k] for k in ("weights_sha256", "weights_mb", "best_epoch", "train_minutes")}))
    print(json.dumps(record["test"], indent=1))
    return 0


def epochs(steps: int, per_epoch: int) -> int | float:
    """Epochs of `steps` optimizer steps: a whole number when it is one (a wall-clock stop may end mid-epoch)."""
    return steps // per_epoch if steps % per_epoch == 0 else round(steps / per_epoch, 2)


def trained_on(device: str) -> str:
    if device != "cpu" and torch.cuda.is_available():
        return f"an {torch.cuda.get_device_name(0)}"
    return f"the {torch.get_num_threads()}-thread CPU"


def training_history(run: Path, per_epoch: int) -> list[dict]:
    """One row per validation (once an epoch): the epoch, the mean training loss logged since the last one, the
    validation figures."""
    def rows(name):
        with open(run / name, newline="") as stream:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(stream)]

    logged, history, since = rows("log.csv"), [], 0
    for validation in rows("validation.csv"):
        step = int(validation.pop("step"))
        rows_since = [row for row in logged if since < row["step"] <= step]
        history.append({"epoch": epochs(step, per_epoch), "step": step,
                        "train_loss": float(np.mean([row["loss"] for row in rows_since])) if rows_since else None,
                        "minutes": round(rows_since[-1]["elapsed_seconds"] / 60, 2) if rows_since else None,
                        **{f"val_{k}": round(v, 4) for k, v in validation.items()}})
        since = step
    return history


def _stored_grid(path: Path) -> str | None:
    from safetensors import safe_open

    from mriflow.models.anatomy import ANATOMY_METADATA_KEY

    with safe_open(str(path), framework="pt") as handle:
        return json.loads((handle.metadata() or {})[ANATOMY_METADATA_KEY]).get("grid")


def _earlier_history(grid: str, results: Path = RESULTS) -> list:
    """The epoch history of the run that trained this grid's network, kept when --epochs 0 only recalibrates it."""
    earlier = results / f"anatomy-{grid}.json"
    return json.loads(earlier.read_text()).get("history", []) if earlier.is_file() else []


def write_section(record: dict, path: Path, document: Path = DOCUMENT) -> None:
    test = record["test"]
    dice = " | ".join(f"{test['dice'][c]:.3f} ± {test['dice_sd'][c]:.3f}" for c in record["classes"][1:])
    volume_rows = "\n".join(
        f"| {name.replace('_', ' ')} | {v['predicted_mean_ml']:.1f} | {v['label_map_mean_ml']:.1f} | "
        f"{v['pearson_r_vs_label_map']:.3f} | {100 * v['mean_abs_relative_error_vs_label_map']:.1f} % | "
        f"{v.get('muse_native_mean_ml', math.nan):.1f} | {v.get('pearson_r_vs_muse_native', math.nan):.3f} | "
        f"{v.get('pearson_r_template_vs_muse_native', math.nan):.3f} |"
        for name, v in test["volumes"].items())
    calibration = record["calibration"]
    crossed = calibration["sex_cross_validated"]
    crossed_text = (f"The read-out's recipe cross-validated over all {crossed['subjects']} subjects with a known sex "
                    f"({crossed['folds']} folds; the read-out does not depend on the network): accuracy "
                    f"{crossed['accuracy']:.2f} (majority share {crossed['majority_share']:.2f}).")
    test_text = ("at or below the majority share of the test split" if test["sex_accuracy"] <= test["sex_majority_share"]
                 else "above the majority share of the test split")
    sex_verdict = (f"{test_text}, {test['sex_accuracy']:.2f} on {test['sex_subjects']} subjects (one subject is "
                   f"{100 / test['sex_subjects']:.0f} points). {crossed_text}")
    penalties = ", ".join(f"{t['l2']:g}: {t['val_cross_entropy']:.3f}" for t in calibration["sex_penalties"])
    commands = "\n    ".join(record["commands"])
    schedule = (f"AdamW, learning rate {record['lr']}: {record['schedule']}; {record['steps']} steps (best: "
                f"{record['best_step']}) through mriflow.train.anatomy" if "schedule" in record
                else f"AdamW, one-cycle learning rate {record['lr']}")
    start = record.get("initialised_from")
    initialised = (f" Fine-tuned from the {start['grid']} network (`{start['weights']}`, SHA-256 {start['sha256'][:12]}…): "
                   f"the network is fully convolutional, so the coarser grid's weights are a good start."
                   if start else "")
    body = f"""mriflow's own evaluation backbone (`--backbone anatomy`, weights shipped as `{record['weights']}`, {record['weights_mb']} MB, SHA-256 `{record['weights_sha256']}`): a compact 3D U-Net of MONAI residual units (channels 8-16-32-64, bottleneck 256, {record['parameters'] / 1e6:.2f} M parameters) with a tissue segmentation head ({', '.join(record['classes'])}), a 256-dimensional average-pooled bottleneck embedding and linear age / sex heads. Trained on the {record['grid']} grid ({' x '.join(map(str, record['shape']))}) of the shared IXI data: {record['subjects']['train']} train subjects, model selection on {record['subjects']['val']} val subjects (lowest validation loss, epoch {record['best_epoch']} of {record['epochs_run']}, {record['train_minutes']} minutes on {record.get('trained_on', 'the 2-core CPU')}), figures below on the {test['subjects']} **test** subjects.{initialised} Targets: DLMUSE label maps mapped to tissue classes by region name (`mriflow.data.labels.muse_tissue_mapping`; the mapping is stored in the weights' metadata), age and sex from the manifest. Loss: Dice + cross-entropy on the classes + {record['loss_weights']['age']} x MSE of the standardised age + {record['loss_weights']['sex']} x sex cross-entropy; {schedule}, batch {record['batch_size']}; augmentation: left-right flip, intensity scale / shift / gamma inside the brain.

After training (`calibrate` in the script):
- **Features** for FD/KID/PRDC/MMD ({record['feature_dim']} dimensions): {calibration['features']}. The bottleneck alone hardly sees noise or blur (it learned to segment through intensity jitter; see the sanity sections below for what that did to the metrics); the full-resolution levels' statistics do.
- **Sex read-out**: {calibration['sex_read_out']} (L2 penalty: validation cross-entropy = {penalties}; chosen {calibration['sex_l2']:g}). The jointly trained sex output did not learn sex (the 4 mm network's: 0.50 on the test split, majority share 0.71), and a linear read-out of the embedding was no better on held-out subjects, while the coarse intensity pattern separates the sexes. Age is the jointly trained head.

    {commands}

| age MAE (years) | age r | age MAE predicting the training mean | sex accuracy | sex: majority share |
|---|---|---|---|---|
| {test['age_mae_years']:.1f} | {test['age_pearson_r']:.2f} | {test['age_mae_predicting_train_mean_years']:.1f} | {test['sex_accuracy']:.2f} ({test['sex_subjects']} subjects) | {test['sex_majority_share']:.2f} |

Sex: {sex_verdict} Age and sex are read from a brain already scaled to the template by an affine registration, so head size (the strongest sex cue) is gone, and the network saw only {record['subjects']['train']} training subjects. In `mriflow evaluate generation` the predictor's own accuracy on real held-out subjects is printed beside the generated one; read the generated figure only against it.

Dice per tissue class (test mean ± sd, on the {record['grid']} grid against the nearest-neighbour-resampled label maps):

| {' | '.join(c.replace('_', ' ') for c in record['classes'][1:])} |
|{'---|' * (len(record['classes']) - 1)}
| {dice} |

Volumes measured from the predicted segmentation (voxel count x {record['grid']} voxel volume). Total brain = ventricles + grey + white matter + brainstem, the composition of MUSE 701 TotalBrain (601 GM + 604 WM + 509 Ventricles + 35 BrainStem; VentralDC counts as white matter, as in MUSE 604). They are template-space volumes (prepare registers affinely to MNI152, so head size is normalised out); the MUSE comparison multiplies them by each subject's registration determinant to get native volumes.

| volume (test) | predicted mean (ml) | label map mean (ml) | r vs label map | mean abs error vs label map | MUSE native mean (ml) | r vs MUSE (x det) | r vs MUSE (template, no det) |
|---|---|---|---|---|---|---|---|
{volume_rows}

Result: {link(path, document)}."""
    replace_section(document, SECTION.format(grid=record["grid"]), body)


if __name__ == "__main__":
    sys.exit(main())
