from __future__ import annotations

import numpy as np
import prdc
import pytest
import pytorch_msssim
import scipy.linalg
import skimage.metrics
import torch
from monai.metrics import MultiScaleSSIMMetric
from monai.metrics.regression import compute_ms_ssim

from conftest import head_phantom
from mriflow.evaluate import metrics


def gaussian_features(n, dimension, shift=0.0, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(1234).normal(size=(dimension, dimension)) / np.sqrt(dimension)
    return (rng.normal(size=(n, dimension)) * scale) @ mixing + shift


def scipy_frechet(real, fake):
    """The textbook computation (pytorch-fid): sqrtm of the covariance product."""
    mu1, mu2 = real.mean(0), fake.mean(0)
    sigma1, sigma2 = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real))


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_frechet_distance_equals_scipy_sqrtm(shift):
    real = gaussian_features(300, 12, seed=1)
    fake = gaussian_features(250, 12, shift=shift, seed=2, scale=1.2)
    expected = scipy_frechet(real, fake)
    assert metrics.frechet_distance(real, fake) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_from_statistics_agrees_when_features_outnumber_samples():
    # F > N: singular covariances, where sqrtm is unreliable; both exact routes must agree.
    real, fake = gaussian_features(20, 64, seed=3), gaussian_features(30, 64, shift=0.2, seed=4)
    from_statistics = metrics.frechet_distance_from_statistics(
        real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False))
    assert metrics.frechet_distance(real, fake) == pytest.approx(from_statistics, rel=1e-6)


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_shift():
    real = gaussian_features(50, 8, seed=5)
    assert metrics.frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)
    near = metrics.frechet_distance(real, real + 0.1)
    far = metrics.frechet_distance(real, real + 1.0)
    assert near == pytest.approx(8 * 0.1**2, rel=1e-6)
    assert far > near


@pytest.mark.parametrize("nearest_k, shift, count", [(5, 0.4, 90), (3, 0.0, 150), (10, 1.0, 60)])
def test_precision_recall_density_coverage_equal_prdc_package(nearest_k, shift, count):
    real = gaussian_features(120, 10, seed=6)
    fake = gaussian_features(count, 10, shift=shift, seed=7, scale=0.8)
    ours = metrics.precision_recall_density_coverage(real, fake, nearest_k=nearest_k)
    reference = prdc.compute_prdc(real_features=real, fake_features=fake, nearest_k=nearest_k)
    for name in ("precision", "recall", "density", "coverage"):
        assert ours[name] == pytest.approx(float(reference[name]), abs=1e-12), name
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1


def test_kid_is_near_zero_for_one_distribution_and_positive_for_a_shift():
    same = [metrics.kernel_inception_distance(gaussian_features(60, 16, seed=s), gaussian_features(60, 16, seed=s + 100))
            for s in range(5)]
    shifted = metrics.kernel_inception_distance(gaussian_features(60, 16, seed=1), gaussian_features(60, 16, shift=0.5, seed=2))
    assert shifted > 0
    assert abs(np.mean(same)) < 0.05 * shifted
    assert min(same) < 0 < max(same) or abs(np.mean(same)) < 0.01 * shifted  # unbiased: centred on zero


def test_mmd_median_heuristic_separates_distributions():
    real = gaussian_features(60, 16, seed=8)
    same = metrics.maximum_mean_discrepancy(real, gaussian_features(60, 16, seed=9))
    shifted = metrics.maximum_mean_discrepancy(real, gaussian_features(60, 16, shift=0.5, seed=10))
    assert shifted > 10 * abs(same)
    bandwidth = metrics.median_bandwidth(real)
    assert metrics.maximum_mean_discrepancy(real, real + 0.5, bandwidth) > 0


def test_set_metrics_refuses_bad_input():
    with pytest.raises(ValueError, match="feature matrix"):
        metrics.frechet_distance(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="nearest_k"):
        metrics.precision_recall_density_coverage(np.zeros((4, 2)), np.ones((10, 2)), nearest_k=5)
    with pytest.raises(ValueError, match="NaN"):
        metrics.kernel_inception_distance(np.full((4, 2), np.nan), np.ones((4, 2)))


def phantom_pair(shape=(24, 28, 22)):
    image, _ = head_phantom(shape, seed=0)
    clean = (image / image.max()).astype(np.float32)
    noisy = np.clip(clean + np.random.default_rng(1).normal(0, 0.05, shape), 0, 1).astype(np.float32)
    return clean, noisy


def test_ssim_and_psnr_equal_scikit_image():
    clean, noisy = phantom_pair()
    expected_ssim = skimage.metrics.structural_similarity(clean, noisy, gaussian_weights=True, sigma=1.5,
                                                         use_sample_covariance=False, data_range=1.0)
    expected_psnr = skimage.metrics.peak_signal_noise_ratio(clean, noisy, data_range=1.0)
    assert metrics.ssim(clean, noisy)[0] == pytest.approx(expected_ssim, abs=1e-5)
    assert metrics.psnr(clean, noisy)[0] == pytest.approx(expected_psnr, abs=1e-4)
    batch = np.stack([clean, noisy])[:, None]
    assert metrics.ssim(batch, batch).tolist() == pytest.approx([1.0, 1.0], abs=1e-6)


@pytest.mark.parametrize("shape, scales", [((40, 48, 40), 3), ((80, 96, 80), 4), ((160, 192, 160), 5),
                                           ((16, 20, 16), 2), ((7, 9, 8), 1), ((58, 60, 58), 3), ((64, 64, 64), 4)])
def test_ms_ssim_scales_are_the_docstring_examples(shape, scales):
    settings = metrics.ms_ssim_settings(shape)
    assert (settings["window"], settings["sigma"], settings["scales"]) == (7, 1.0, scales)
    expected = np.asarray(metrics.MS_SSIM_WEIGHTS[:scales])
    np.testing.assert_allclose(settings["weights"], expected / expected.sum())


@pytest.mark.parametrize("window", [3, 7, 11])
def test_ms_ssim_scale_rule_is_the_largest_that_meets_both_conditions(window):
    def allowed(n, scales):
        return n // 2 ** (scales - 1) >= window and n // max(1, scales - 1) ** 2 >= window

    for n in range(window, 400):
        scales = metrics.ms_ssim_settings((n + 5, n, n + 3), window)["scales"]
        assert allowed(n, scales) and (scales == 5 or not allowed(n, scales + 1)), n
    with pytest.raises(ValueError, match="too small"):
        metrics.ms_ssim_settings((window - 1, 40, 40), window)


def test_the_second_scale_condition_is_monais_size_check():
    # At 58 voxels a fourth scale would still hold the 7-voxel window (58 // 8 = 7), but MONAI's
    # compute_ms_ssim refuses it (58 // 9 = 6); the rule takes 3.
    clean, noisy = phantom_pair((58, 60, 58))
    a, b = torch.from_numpy(clean)[None, None], torch.from_numpy(noisy)[None, None]
    with pytest.raises(ValueError):
        compute_ms_ssim(a, b, 3, kernel_size=7, kernel_sigma=1.0, weights=metrics.MS_SSIM_WEIGHTS[:4])
    assert metrics.ms_ssim_settings((58, 60, 58))["scales"] == 3


def test_ms_ssim_equals_monai_multiscale_ssim_on_the_4mm_grid():
    clean, noisy = phantom_pair((40, 48, 40))
    weights = metrics.ms_ssim_settings(clean.shape)["weights"]
    expected = MultiScaleSSIMMetric(spatial_dims=3, data_range=1.0, kernel_size=7, kernel_sigma=1.0,
                                    weights=weights)(torch.from_numpy(noisy)[None, None], torch.from_numpy(clean)[None, None])
    assert metrics.ms_ssim(clean, noisy)[0] == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("shape,window,weights", [((40, 48, 40), 3, (0.2, 0.3, 0.5)), ((40, 48, 40), 3, metrics.MS_SSIM_WEIGHTS[:4])])
def test_ms_ssim_equals_pytorch_msssim(shape, window, weights):
    # pytorch-msssim asserts sides above (window - 1) * 16 whatever the number of scales, so it
    # checks us with a 3-voxel window; sides divisible by 2^(S-1) because it zero-pads odd sides
    # before pooling where MONAI drops the last voxel.
    clean, noisy = phantom_pair(shape)
    a = torch.from_numpy(np.stack([clean, clean]))[:, None]
    b = torch.from_numpy(np.stack([noisy, np.roll(clean, 3, axis=0)]))[:, None]
    expected = pytorch_msssim.ms_ssim(a, b, data_range=1.0, size_average=False, win_size=window, win_sigma=1.5,
                                      weights=list(weights))
    ours = metrics.ms_ssim(a, b, window=window, sigma=1.5, weights=weights)
    np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-5)
    assert ours[0] != pytest.approx(ours[1])


def test_ms_ssim_is_one_for_identical_volumes_and_falls_with_noise():
    clean, _ = phantom_pair((40, 48, 40))
    rng = np.random.default_rng(2)
    noisy = [np.clip(clean + rng.normal(0, level, clean.shape), 0, 1).astype(np.float32) for level in (0.02, 0.05, 0.1, 0.2)]
    values = metrics.ms_ssim(np.stack([clean] * 5)[:, None], np.stack([clean] + noisy)[:, None])
    assert values[0] == pytest.approx(1.0, abs=1e-6)
    assert (np.diff(values) < 0).all() and values[-1] < 0.9, values


def test_ms_ssim_inside_a_mask():
    clean, noisy = phantom_pair((40, 48, 40))
    everywhere = np.ones_like(clean)
    assert metrics.ms_ssim(clean, noisy, mask=everywhere)[0] == pytest.approx(metrics.ms_ssim(clean, noisy)[0], rel=1e-6)
    assert metrics.ms_ssim(clean, clean, mask=everywhere)[0] == pytest.approx(1.0, abs=1e-6)
    damaged = clean.copy()
    damaged[:, :24] = noisy[:, :24]  # noise in one half only
    half = np.zeros_like(clean)
    half[:, 24:] = 1
    whole, clean_half = metrics.ms_ssim(clean, damaged)[0], metrics.ms_ssim(clean, damaged, mask=half)[0]
    assert whole < 0.99 and clean_half == pytest.approx(1.0, abs=1e-3)
    assert np.isnan(metrics.ms_ssim(clean, noisy, mask=np.zeros_like(clean))[0])


def test_ms_ssim_refuses_more_scales_than_the_rule_allows():
    clean, noisy = phantom_pair((24, 28, 22))
    with pytest.raises(ValueError, match="too small for 5 MS-SSIM scales"):
        metrics.ms_ssim(clean, noisy, weights=metrics.MS_SSIM_WEIGHTS)
