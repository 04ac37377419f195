"""Train on synthetic, test on real: do generated image + label pairs help the models researchers train?

Two downstream tasks, each trained from scratch per condition with the same number of optimizer
steps (equal compute, so a larger training set is not also a longer training) and tested on the
real test split, which no generator or downstream model has seen:

- tissue segmentation (background, CSF, ventricles, grey matter, white matter, brainstem): MONAI's
  3D UNet with Dice + cross-entropy; figure: Dice per class on the real test subjects;
- brain age: MONAI's 3D Regressor with an L1 loss on the standardised age; figure: age MAE (years).

Conditions for each number N of real training subjects (the first N of a seeded shuffle of the
training split): real only (N), synthetic only (N and `factor` x N pairs), and real + synthetic
(N real, `factor` x N synthetic). A batch of a mixed condition is half real, half synthetic, so the
few real subjects are not drowned by the many synthetic ones. Intervals: percentile bootstrap over
the test subjects (the test set is what is uncertain here; one training seed per condition).

Label fidelity comes with it: the Dice between each synthetic label map and the anatomy network's
segmentation of its own image, next to the same for real scans (their prepared label maps against
the network's segmentation): how well the delivered labels match the image they come with.

    >>> result = evaluate_utility("data/ixi4", "samples/synthetic", "reports/utility", sizes=(10, 30, None))
    >>> result["segmentation"]["10"]["real + synthetic"]["mean_dice"]     # {"mean", "low", "high"}
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from mriflow.data.dataset import read_manifest
from mriflow.data.io import load_volume
from mriflow.data.labels import TISSUE_CLASSES, dice_scores, tissue_lookup, tissue_map
from mriflow.utils.files import write_text_atomic
from mriflow.utils.text import counted

REAL, SYNTHETIC_N, SYNTHETIC_KN, MIXED = "real", "synthetic (N)", "synthetic (kN)", "real + synthetic (kN)"
COLOURS = {REAL: "tab:blue", SYNTHETIC_N: "tab:orange", SYNTHETIC_KN: "tab:green", MIXED: "tab:red"}  # one per condition


@dataclass
class Pairs:
    """Volumes (N, 1, D, H, W) float32 in [0, 1], tissue maps (N, D, H, W) uint8 and ages (N,) (NaN: unknown)."""

    images: torch.Tensor
    labels: torch.Tensor
    ages: np.ndarray
    names: list[str]

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, indices: Sequence[int]) -> "Pairs":
        indices = list(indices)
        return Pairs(self.images[indices], self.labels[indices], self.ages[indices], [self.names[i] for i in indices])


def real_pairs(data_dir: str | Path, split: str, label_map: dict) -> Pairs:
    """The prepared volumes of `split` with their label maps mapped to tissue classes by `label_map`
    ({label: class name}) and their ages."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    rows = manifest[manifest["split"] == split]
    if rows.empty:
        raise ValueError(f"{data_dir}/manifest.csv: no subjects in split {split!r}")
    lookup = tissue_lookup(label_map)
    images, labels, ages = [], [], []
    for row in rows.itertuples():
        if not isinstance(getattr(row, "labels", None), str) or not row.labels:
            raise ValueError(f"{data_dir}/manifest.csv: subject {row.subject} has no label map; prepare with --masks "
                             "pointing at label maps to measure segmentation utility")
        images.append(load_volume(data_dir / row.image)[0])
        labels.append(tissue_map(load_volume(data_dir / row.labels)[0], lookup, str(data_dir / row.labels)))
        ages.append(float(getattr(row, "age", math.nan)))
    return Pairs(torch.from_numpy(np.stack(images)).float().unsqueeze(1), torch.from_numpy(np.stack(labels)),
                 np.asarray(ages, np.float64), [str(s) for s in rows["subject"]])


def synthetic_pairs(folder: str | Path, limit: int | None = None) -> Pairs:
    """The generated volumes of `folder` that have a label map (sample_XXXXX_labels.nii.gz, written by `mriflow
    generate` with a label decoder) and the age their sidecar requested (NaN when none)."""
    folder = Path(folder)
    images = sorted(p for p in folder.glob("*_labels.nii.gz"))
    if not images:
        raise ValueError(f"--synthetic {folder}: no label maps (*_labels.nii.gz); generate with a model that has a "
                         "label decoder (mriflow train labels; --labels RUN) or on the 4 mm or 2 mm grid (--labels anatomy)")
    volumes, labels, ages, names = [], [], [], []
    for label_file in images[:limit]:
        name = label_file.name.removesuffix("_labels.nii.gz")
        image_file = folder / f"{name}.nii.gz"
        if not image_file.is_file():
            raise ValueError(f"{label_file}: its image {image_file.name} is missing")
        volumes.append(load_volume(image_file)[0])
        labels.append(np.rint(load_volume(label_file)[0]).astype(np.uint8))
        sidecar = folder / f"{name}.json"
        age = math.nan
        if sidecar.is_file():
            value = (json.loads(sidecar.read_text()).get("covariates") or {}).get("age")
            age = float(value) if isinstance(value, (int, float)) else math.nan
        ages.append(age)
        names.append(name)
    return Pairs(torch.from_numpy(np.stack(volumes)).float().unsqueeze(1), torch.from_numpy(np.stack(labels)),
                 np.asarray(ages, np.float64), names)


# ---- the downstream models --------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSettings:
    steps: int = 300
    batch_size: int = 4
    lr: float = 2e-3
    seed: int = 0


def segmenter(classes: int = len(TISSUE_CLASSES)) -> nn.Module:
    """The downstream segmentation network: MONAI's 3D UNet, 4 levels (16-128 channels), one residual unit each."""
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=1, out_channels=classes, channels=(16, 32, 64, 128), strides=(2, 2, 2),
                num_res_units=1, norm="instance")


def age_regressor(shape: Sequence[int]) -> nn.Module:
    """The downstream brain-age network: MONAI's 3D Regressor (residual units 8-64 channels, stride 2 each)."""
    from monai.networks.nets import Regressor

    return Regressor(in_shape=(1, *shape), out_shape=(1,), channels=(8, 16, 32, 64), strides=(2, 2, 2, 2),
                     num_res_units=1, norm="instance")


def _batches(sets: Sequence[Pairs], settings: TrainingSettings, generator: torch.Generator):
    """An endless stream of index batches: each batch split evenly among the non-empty `sets`."""
    sets = [s for s in sets if len(s)]
    shares = [settings.batch_size // len(sets) + (1 if k < settings.batch_size % len(sets) else 0) for k in range(len(sets))]
    while True:
        yield [(s, torch.randint(len(s), (share,), generator=generator).tolist()) for s, share in zip(sets, shares) if share]


def _augment(images: torch.Tensor, labels: torch.Tensor | None, generator: torch.Generator):
    """Left-right flip and an intensity scale/shift inside the head, the same draw for image and labels."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None, None], images.flip(2), images)
    if labels is not None:
        labels = torch.where(flip[:, None, None, None], labels.flip(1), labels)
    scale = 1 + 0.1 * (torch.rand(len(images), 1, 1, 1, 1, generator=generator) * 2 - 1)
    shift = 0.05 * (torch.rand(len(images), 1, 1, 1, 1, generator=generator) * 2 - 1)
    images = torch.where(images > 0, (images * scale + shift).clamp(0, 1), images)
    return images, labels


def train_segmenter(sets: Sequence[Pairs], settings: TrainingSettings, progress: str | None = None) -> nn.Module:
    """A segmenter trained from scratch on `sets` (each batch split evenly among them)."""
    from monai.losses import DiceCELoss

    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = segmenter()
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.1)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    stream = _batches(sets, settings, generator)
    model.train()
    for _ in tqdm(range(settings.steps), desc=progress or "segmenter", unit="step", disable=progress is None,
                  dynamic_ncols=True, leave=False):
        parts = next(stream)
        images = torch.cat([s.images[i] for s, i in parts])
        labels = torch.cat([s.labels[i] for s, i in parts]).long()
        images, labels = _augment(images, labels, generator)
        loss = loss_fn(model(images), labels.unsqueeze(1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def train_age_regressor(sets: Sequence[Pairs], settings: TrainingSettings, mean: float, std: float,
                        progress: str | None = None) -> nn.Module:
    """An age regressor trained from scratch on the subjects of `sets` that have an age (standardised by mean/std)."""
    sets = [s.subset(np.flatnonzero(np.isfinite(s.ages))) for s in sets]
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model = age_regressor(sets[0].images.shape[2:])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, settings.lr, total_steps=settings.steps, pct_start=0.1)
    stream = _batches(sets, settings, generator)
    model.train()
    for _ in tqdm(range(settings.steps), desc=progress or "age", unit="step", disable=progress is None,
                  dynamic_ncols=True, leave=False):
        parts = next(stream)
        images, _ = _augment(torch.cat([s.images[i] for s, i in parts]), None, generator)
        target = torch.cat([torch.as_tensor((s.ages[i] - mean) / std, dtype=torch.float32) for s, i in parts])
        loss = F.l1_loss(model(images)[:, 0], target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def dice_per_subject(model: nn.Module, pairs: Pairs, batch_size: int = 4) -> np.ndarray:
    """(N, K - 1) Dice of each foreground class for each subject (1 where both maps lack the class)."""
    predicted = torch.cat([model(pairs.images[i:i + batch_size]).argmax(1) for i in range(0, len(pairs), batch_size)])
    return dice_scores(predicted, pairs.labels.long(), len(TISSUE_CLASSES))


@torch.no_grad()
def age_errors(model: nn.Module, pairs: Pairs, mean: float, std: float, batch_size: int = 8) -> np.ndarray:
    """|predicted - true| age in years of each subject with a known age."""
    keep = np.flatnonzero(np.isfinite(pairs.ages))
    images = pairs.images[keep]
    predicted = torch.cat([model(images[i:i + batch_size])[:, 0] for i in range(0, len(images), batch_size)])
    return np.abs(predicted.numpy() * std + mean - pairs.ages[keep])


def bootstrap(values: np.ndarray, samples: int = 2000, seed: int = 0, level: float = 0.95) -> dict[str, float]:
    """{"mean", "low", "high"}: the mean over rows of `values` (N,) or (N, ...) -> mean of everything per draw, with a
    percentile bootstrap interval over the rows (subjects)."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values), (samples, len(values)))
    means = values[draws].reshape(samples, -1).mean(1)
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return {"mean": float(values.mean()), "low": float(low), "high": float(high)}


def label_fidelity(pairs: Pairs, backbone) -> np.ndarray:
    """(N, K - 1) Dice between each pair's label map and the anatomy network's segmentation of its image."""
    segmentation = backbone.segment(pairs.images)
    return dice_scores(torch.as_tensor(segmentation).long(), pairs.labels.long(), len(TISSUE_CLASSES))


# ---- the whole measurement ------------------------------------------------------------------------------


def evaluate_utility(
    real: str | Path,
    synthetic: str | Path,
    out: str | Path,
    sizes: Sequence[int | None] = (10, 30, None),
    factor: int = 5,
    settings: TrainingSettings = TrainingSettings(),
    label_map: dict | None = None,
    tasks: Sequence[str] = ("segmentation", "age"),
    progress: bool = True,
) -> dict[str, Any]:
    """Train the downstream models of every condition and size (None: all training subjects), test them on the real
    test split, and write out/utility.json, out/utility.md and out/utility.png. Returns the JSON's content."""
    from mriflow.evaluate.backbones.anatomy import AnatomyBackbone, anatomy_weights_for
    from mriflow.models.anatomy import read_anatomy_config

    real, synthetic, out = Path(real), Path(synthetic), Path(out)
    started = time.perf_counter()
    weights = anatomy_weights_for(load_volume(real / read_manifest(real)["image"].iloc[0])[0].shape)
    if label_map is None:
        if weights is None:
            raise ValueError(f"{real}: no shipped anatomy network for this grid, so no default label map; pass label_map")
        label_map = read_anatomy_config(weights)[0].label_map
    train, test = real_pairs(real, "train", label_map), real_pairs(real, "test", label_map)
    fake = synthetic_pairs(synthetic)
    if fake.images.shape[1:] != train.images.shape[1:]:
        raise ValueError(f"--synthetic {synthetic}: volumes of shape {tuple(fake.images.shape[2:])}, the real data's are "
                         f"{tuple(train.images.shape[2:])}; generate on the same grid")
    order = np.random.default_rng(settings.seed).permutation(len(train))
    sizes = sorted({len(train) if n is None else int(n) for n in sizes})
    if sizes[0] < 1 or sizes[-1] > len(train):
        raise ValueError(f"sizes must be between 1 and the {len(train)} training subjects, got {sizes}")
    largest = factor * sizes[-1]
    if len(fake) < largest:
        print(f"note: {synthetic} holds {counted(len(fake), 'pair')}, fewer than {factor} x {sizes[-1]} = {largest}; "
              f"the largest synthetic sets use all {len(fake)}")
    ages = train.ages[np.isfinite(train.ages)]
    mean, std = float(ages.mean()), float(ages.std() or 1.0)

    def conditions(n: int) -> dict[str, list[Pairs]]:
        subset = train.subset(order[:n])
        return {REAL: [subset], SYNTHETIC_N: [fake.subset(range(min(n, len(fake))))],
                SYNTHETIC_KN: [fake.subset(range(min(factor * n, len(fake))))],
                MIXED: [subset, fake.subset(range(min(factor * n, len(fake))))]}

    result: dict[str, Any] = {
        "real": str(real.resolve()), "synthetic": str(synthetic.resolve()), "factor": factor,
        "settings": settings.__dict__, "train_subjects": len(train), "test_subjects": len(test),
        "synthetic_pairs": len(fake), "sizes": sizes, "classes": list(TISSUE_CLASSES[1:]),
        "segmentation": {}, "age": {},
    }
    runs = [(task, n, name) for n in sizes for task in tasks for name in conditions(n)
            if not (task == "age" and name == SYNTHETIC_N)]
    with tqdm(total=len(runs), desc="utility", unit="model", disable=not progress, dynamic_ncols=True) as bar:
        for task, n, name in runs:
            sets = conditions(n)[name]
            label = f"{task} N={n} {name}" if progress else None
            if task == "segmentation":
                scores = dice_per_subject(train_segmenter(sets, settings, label), test)
                entry = {"mean_dice": bootstrap(scores, seed=settings.seed),
                         "dice": {c: bootstrap(scores[:, k], seed=settings.seed) for k, c in enumerate(TISSUE_CLASSES[1:])}}
            else:
                errors = age_errors(train_age_regressor(sets, settings, mean, std, label), test, mean, std)
                entry = {"age_mae": bootstrap(errors, seed=settings.seed)}
            entry["training"] = {"real": len(sets[0]) if name in (REAL, MIXED) else 0,
                                 "synthetic": len(sets[-1]) if name != REAL else 0}
            result[task].setdefault(str(n), {})[name] = entry
            bar.update(1)
    if weights is not None:
        backbone = AnatomyBackbone(weights)
        result["label_fidelity"] = {
            "real": {"mean_dice": bootstrap(label_fidelity(test, backbone))},
            "synthetic": {"mean_dice": bootstrap(label_fidelity(fake.subset(range(min(len(fake), 60))), backbone))},
            "what": "Dice of the label map against the anatomy network's segmentation of its own image "
                    "(real: prepared DLMUSE tissue map of the test scans; synthetic: the decoded label map)",
        }
    result["seconds"] = round(time.perf_counter() - started, 1)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "utility.json", json.dumps(result, indent=2))
    plot_utility(result, out / "utility.png")
    write_text_atomic(out / "utility.md", utility_table(result))
    return result


def utility_table(result: dict[str, Any]) -> str:
    """Markdown tables of the figures (mean Dice and age MAE with 95 % intervals) by N and condition."""
    def cell(entry: dict[str, float], digits: int) -> str:
        return f"{entry['mean']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"

    lines = []
    if result["segmentation"]:
        names = list(next(iter(result["segmentation"].values())))
        lines += ["Mean Dice over the foreground classes on the real test split (95 % bootstrap interval over "
                  f"{counted(result['test_subjects'], 'subject')}); k = {result['factor']}:", "",
                  "| N real | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for n, row in result["segmentation"].items():
            lines.append(f"| {n} | " + " | ".join(cell(row[c]["mean_dice"], 3) for c in names) + " |")
        lines += ["", "Dice per class (mean over test subjects):", "",
                  "| N real | condition | " + " | ".join(result["classes"]) + " |",
                  "|---|---|" + "---|" * len(result["classes"])]
        for n, row in result["segmentation"].items():
            for c, entry in row.items():
                lines.append(f"| {n} | {c} | " + " | ".join(f"{entry['dice'][k]['mean']:.3f}" for k in result["classes"]) + " |")
    if result["age"]:
        names = list(next(iter(result["age"].values())))
        lines += ["", "Brain-age MAE in years on the real test split (95 % interval):", "",
                  "| N real | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for n, row in result["age"].items():
            lines.append(f"| {n} | " + " | ".join(cell(row[c]["age_mae"], 1) for c in names) + " |")
    if "label_fidelity" in result:
        f = result["label_fidelity"]
        lines += ["", f"Label fidelity ({f['what']}): real {cell(f['real']['mean_dice'], 3)}, "
                      f"synthetic {cell(f['synthetic']['mean_dice'], 3)}."]
    return "\n".join(lines) + "\n"


def plot_utility(result: dict[str, Any], path: Path) -> Path:
    """Curves of mean Dice and age MAE against N, one line per condition, with the bootstrap intervals."""
    from matplotlib.figure import Figure

    tasks = [(t, key, label) for t, key, label in (("segmentation", "mean_dice", "mean Dice (real test split)"),
                                                    ("age", "age_mae", "age MAE, years (real test split)"))
             if result[t]]
    figure = Figure(figsize=(5.5 * len(tasks), 4))
    axes = figure.subplots(1, len(tasks), squeeze=False)[0]
    for axis, (task, key, label) in zip(axes, tasks):
        sizes = [int(n) for n in result[task]]
        names = list(next(iter(result[task].values())))
        for name in names:
            entries = [result[task][str(n)][name][key] for n in sizes]
            means = np.array([e["mean"] for e in entries])
            errors = np.array([[e["mean"] - e["low"] for e in entries], [e["high"] - e["mean"] for e in entries]])
            axis.errorbar(sizes, means, yerr=errors, marker="o", capsize=3, color=COLOURS.get(name),
                          label=name.replace("k", str(result["factor"])))
        axis.set_xscale("log")
        axis.set_xticks(sizes)
        axis.set_xticklabels([str(n) for n in sizes])
        axis.set_xlabel("N real training subjects")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
