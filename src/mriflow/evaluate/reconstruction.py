"""How well a trained autoencoder reconstructs held-out volumes: MSE, NMSE, PSNR, SSIM and MS-SSIM in 3D.

Every metric is reported over the whole volume and inside the brain mask. With x the real
volume and y its reconstruction clamped to [0, 1] (the data range L = 1)::

    MSE  = mean (x - y)^2          NMSE = sum (x - y)^2 / sum x^2          PSNR = 10 log10(L^2 / MSE)
    SSIM = mean over the valid voxels of the SSIM map (Gaussian window), computed by MONAI
    MS-SSIM = prod_s cs_s^w_s * ssim_S^w_S over S scales (average pooling by 2 between scales)

Inside the mask, the means run over mask voxels only (the SSIM maps are cropped like the
valid convolution; the mask is average-pooled and thresholded at 0.5 between MS-SSIM
scales). The MS-SSIM scales and window are metrics.ms_ssim_settings' (the rule every MS-SSIM in
mriflow uses) and are written in the outputs: at 4 mm (40 x 48 x 40) 3 scales, at 2 mm 4,
at 1 mm 5, with a 7-voxel window (sigma 1.0); SSIM uses the usual 11-voxel window (sigma 1.5)
when the volume allows it.

    >>> summary = evaluate_reconstruction("prepared/", "runs/ae", split="test", out="runs/ae/eval-test")
    >>> summary["metrics"]["ssim"]["mean"]
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from monai.metrics.regression import compute_ssim_and_cs
from tqdm.auto import tqdm

from mriflow.evaluate.metrics import ms_ssim, ms_ssim_settings, valid_region_mean
from mriflow.utils.text import counted

METRICS = ("mse", "nmse", "psnr", "ssim", "ms_ssim")


@dataclass(frozen=True)
class SimilaritySettings:
    ssim_window: int
    ssim_sigma: float
    ms_ssim_window: int
    ms_ssim_sigma: float
    ms_ssim_scales: int
    ms_ssim_weights: tuple[float, ...]
    data_range: float = 1.0


def similarity_settings(shape: tuple[int, ...]) -> SimilaritySettings:
    """SSIM / MS-SSIM windows and scales valid for a volume of spatial `shape`: SSIM the largest odd
    window up to 11 that fits, MS-SSIM the scales of `metrics.ms_ssim_settings` (one rule for every
    MS-SSIM in mriflow)."""
    smallest = min(shape)
    ssim_window = 11 if smallest >= 11 else smallest - (1 - smallest % 2)  # the largest odd window that fits
    multiscale = ms_ssim_settings(shape)
    return SimilaritySettings(ssim_window, 1.5 * ssim_window / 11, multiscale["window"], multiscale["sigma"],
                              multiscale["scales"], tuple(multiscale["weights"]))


def ssim(x: torch.Tensor, y: torch.Tensor, settings: SimilaritySettings, mask: torch.Tensor | None = None) -> float:
    """Mean 3D SSIM of one volume pair (1, 1, D, H, W), over the valid region or the mask voxels in it."""
    window = (settings.ssim_window,) * 3
    ssim_map, _ = compute_ssim_and_cs(y, x, 3, window, (settings.ssim_sigma,) * 3, settings.data_range)
    return valid_region_mean(ssim_map, mask, settings.ssim_window).item()


def volume_metrics(x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, settings: SimilaritySettings) -> dict[str, float]:
    """All metrics of one pair (1, 1, D, H, W), whole volume and "<metric>_brain" inside `mask`."""
    out: dict[str, float] = {}
    for suffix, region in (("", None), ("_brain", mask)):
        inside = torch.ones_like(x, dtype=torch.bool) if region is None else region > 0.5
        error = ((x - y) ** 2)[inside]
        mse = error.mean().item()
        out[f"mse{suffix}"] = mse
        out[f"nmse{suffix}"] = error.sum().item() / max((x[inside] ** 2).sum().item(), 1e-12)
        out[f"psnr{suffix}"] = 10.0 * np.log10(settings.data_range**2 / max(mse, 1e-12))
        out[f"ssim{suffix}"] = ssim(x, y, settings, region)
        out[f"ms_ssim{suffix}"] = float(ms_ssim(y, x, settings.ms_ssim_window, settings.ms_ssim_sigma,
                                                settings.ms_ssim_weights, settings.data_range, region)[0])
    return out


def evaluate_reconstruction(
    data_dir: str | Path,
    autoencoder_run: str | Path,
    split: str = "val",
    out: str | Path | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Reconstruct every volume of `split` with the autoencoder's inference (EMA) weights and measure it.

    Writes to `out` (default <run>/reconstruction-<split>): reconstruction.csv (per subject),
    summary.json and summary.md (mean, std, median, min, max; settings; checkpoint) and
    montage.png (the subject with the median SSIM: real, reconstruction, 4 x |difference|).
    Returns the summary.
    """
    from mriflow.checkpoint import load_autoencoder, run_folder
    from mriflow.data.dataset import PreparedDataset
    from mriflow.distributed import resolve_device
    from mriflow.utils.montage import three_plane_montage

    device = resolve_device(device)
    model, meta = load_autoencoder(autoencoder_run, device)
    out = Path(out) if out is not None else run_folder(Path(meta["path"])) / f"reconstruction-{split}"
    dataset = PreparedDataset(data_dir, split)
    if len(dataset) == 0:
        raise ValueError(f"{data_dir}: split {split!r} has no subjects")
    settings = similarity_settings(tuple(dataset[0]["image"].shape[1:]))
    rows = []
    started = time.perf_counter()
    with torch.no_grad():
        for index in tqdm(range(len(dataset)), desc=f"reconstruct {split}", unit="volume"):
            item = dataset[index]
            real = item["image"][None].to(device)  # (1, 1, D, H, W)
            reconstruction = model.reconstruct(real).float().clamp(0.0, 1.0)
            mask = item["mask"][None].to(device)
            rows.append({"subject": item["subject"], **volume_metrics(real, reconstruction, mask, settings)})
    seconds = time.perf_counter() - started

    table = pd.DataFrame(rows)
    columns = [f"{m}{s}" for s in ("", "_brain") for m in METRICS]
    summary = {
        "split": split,
        "subjects": len(table),
        "data": str(Path(data_dir).resolve()),
        "checkpoint": meta["path"],
        "step": meta.get("step"),
        "kind": meta["config"]["model"]["kind"],
        "volumes_per_second": len(table) / seconds,
        "settings": asdict(settings),
        "metrics": {c: {"mean": float(table[c].mean()), "std": float(table[c].std(ddof=0)),
                        "median": float(table[c].median()), "min": float(table[c].min()), "max": float(table[c].max())}
                    for c in columns},
    }
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "reconstruction.csv", index=False)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    (out / "summary.md").write_text(_markdown(summary))
    median = int((table["ssim"] - table["ssim"].median()).abs().argsort().iloc[0])
    item = dataset[median]
    with torch.no_grad():
        reconstruction = model.reconstruct(item["image"][None].to(device)).float().clamp(0.0, 1.0)[0, 0].cpu().numpy()
    real = item["image"][0].numpy()
    difference = np.clip(4 * np.abs(real - reconstruction), 0, 1)
    three_plane_montage({"real": real, "reconstruction": reconstruction, "|difference| x4": difference},
                        out / "montage.png", title=f"{item['subject']} (median SSIM), {split}, step {meta.get('step')}")
    return summary


def _markdown(summary: dict[str, Any]) -> str:
    settings = summary["settings"]
    lines = [
        f"# Reconstruction, {summary['split']} split ({counted(summary['subjects'], 'subject')})",
        "",
        f"Autoencoder `{summary['checkpoint']}` ({summary['kind']}, step {summary['step']}); data `{summary['data']}`.",
        "",
        "| metric | whole volume (mean ± std) | median | inside brain mask (mean ± std) | median |",
        "|---|---|---|---|---|",
    ]
    for metric in METRICS:
        whole, brain = summary["metrics"][metric], summary["metrics"][f"{metric}_brain"]
        digits = 2 if metric == "psnr" else 4
        lines.append(
            f"| {metric.upper().replace('_', '-')}{' (dB)' if metric == 'psnr' else ''} "
            f"| {whole['mean']:.{digits}f} ± {whole['std']:.{digits}f} | {whole['median']:.{digits}f} "
            f"| {brain['mean']:.{digits}f} ± {brain['std']:.{digits}f} | {brain['median']:.{digits}f} |"
        )
    lines += [
        "",
        f"SSIM: Gaussian window {settings['ssim_window']} voxels, sigma {settings['ssim_sigma']:.2f}. "
        f"MS-SSIM: {settings['ms_ssim_scales']} scales, window {settings['ms_ssim_window']} voxels, "
        f"sigma {settings['ms_ssim_sigma']}, weights {', '.join(f'{w:.4f}' for w in settings['ms_ssim_weights'])}. "
        f"Data range {settings['data_range']}; reconstructions clamped to [0, 1].",
        "",
        "![median-SSIM subject](montage.png)",
        "",
    ]
    return "\n".join(lines)
