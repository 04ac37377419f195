from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from monai.metrics import MultiScaleSSIMMetric, SSIMMetric

from conftest import head_phantom
from mriflow.evaluate.reconstruction import evaluate_reconstruction, similarity_settings, ssim, volume_metrics

# The prepared-folder and tiny-config helpers live with the loop tests.
from conftest import montage_panels, shows_a_centred_head, tiny_config, write_prepared


def phantom(shape=(40, 48, 40), seed=0):
    image, labels = head_phantom(shape, seed)
    return torch.from_numpy(image / image.max())[None, None], torch.from_numpy(labels > 0)[None, None].float()


@pytest.mark.parametrize("shape, scales", [((40, 48, 40), 3), ((80, 96, 80), 4), ((160, 192, 160), 5), ((16, 20, 16), 2)])
def test_ms_ssim_settings_are_valid_for_the_volume_size(shape, scales):
    settings = similarity_settings(shape)
    assert settings.ms_ssim_scales == scales
    assert min(shape) // 2 ** (scales - 1) > settings.ms_ssim_window - 1  # the coarsest scale holds a window
    assert sum(settings.ms_ssim_weights) == pytest.approx(1.0)


def test_whole_volume_similarity_matches_monai_metrics():
    x, _ = phantom()
    y = (x + 0.05 * torch.randn_like(x)).clamp(0, 1)
    settings = similarity_settings(x.shape[2:])
    expected_ssim = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=settings.ssim_window,
                               kernel_sigma=settings.ssim_sigma)(y, x).item()
    expected_ms = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=settings.ms_ssim_window,
                                       kernel_sigma=settings.ms_ssim_sigma, weights=settings.ms_ssim_weights)(y, x).item()
    assert ssim(x, y, settings) == pytest.approx(expected_ssim, rel=1e-5)
    assert volume_metrics(x, y, torch.ones_like(x), settings)["ms_ssim"] == pytest.approx(expected_ms, rel=1e-5)


def test_metrics_follow_their_definitions_and_the_mask_restricts_them():
    x, mask = phantom((32, 36, 32))
    perfect = volume_metrics(x, x, mask, similarity_settings(x.shape[2:]))
    assert perfect["mse"] == 0 and perfect["ssim"] == pytest.approx(1.0) and perfect["ms_ssim_brain"] == pytest.approx(1.0)

    y = x.clone()
    y[mask == 0] += 0.1  # error outside the brain only
    metrics = volume_metrics(x, y, mask, similarity_settings(x.shape[2:]))
    outside = (mask == 0).float().mean().item()
    assert metrics["mse"] == pytest.approx(0.01 * outside, rel=1e-4)
    assert metrics["psnr"] == pytest.approx(10 * torch.log10(torch.tensor(1 / (0.01 * outside))).item(), rel=1e-4)
    assert metrics["nmse"] == pytest.approx((0.01 * (mask == 0).sum() / (x**2).sum()).item(), rel=1e-4)
    assert metrics["mse_brain"] == 0.0

    noisy = x + 0.2 * torch.rand_like(x) * (mask == 0)  # structure destroyed outside the brain only
    metrics = volume_metrics(x, noisy, mask, similarity_settings(x.shape[2:]))
    assert metrics["ssim"] < metrics["ssim_brain"] and metrics["ms_ssim"] < metrics["ms_ssim_brain"]


def test_evaluate_reconstruction_writes_tables_summary_and_montage(tmp_path):
    from mriflow.train.autoencoder import train_autoencoder

    data = write_prepared(tmp_path / "data", splits=("train", "train", "train", "val", "val"))
    train_autoencoder(data, tmp_path / "run", config=tiny_config(max_steps=2, adversarial_start=100))
    summary = evaluate_reconstruction(data, tmp_path / "run", split="val", out=tmp_path / "eval", device="cpu")
    table = pd.read_csv(tmp_path / "eval" / "reconstruction.csv")
    assert list(table["subject"]) == ["sub03", "sub04"]
    assert {"psnr", "ssim_brain", "ms_ssim", "nmse_brain"} <= set(table.columns)
    assert summary["metrics"]["psnr"]["mean"] == pytest.approx(table["psnr"].mean())
    assert summary["settings"]["ms_ssim_scales"] == 2 and summary["step"] == 2
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["subjects"] == 2
    text = (tmp_path / "eval" / "summary.md").read_text()
    assert "MS-SSIM: 2 scales, window 7" in text and "| PSNR (dB) |" in text
    real, reconstruction, difference = montage_panels(tmp_path / "eval" / "montage.png")  # rows of 3 planes
    assert all(shows_a_centred_head(panel) for panel in real)
