import math

import pytest
import torch

from mriflow.flow.path import path_sample, resolution_shift, sample_time, shift_time, time_grid


def test_path_endpoints_and_target():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, 4, generator=generator)
    x1 = torch.randn(3, 2, 4, 4, 4, generator=generator)
    x_start, u = path_sample(x0, x1, torch.zeros(3))
    x_end, _ = path_sample(x0, x1, torch.ones(3))
    torch.testing.assert_close(x_start, x0)  # t = 0 is noise
    torch.testing.assert_close(x_end, x1)  # t = 1 is data
    torch.testing.assert_close(u, x1 - x0)


def test_path_is_linear_with_velocity_u():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64).unbind(0)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t, u = path_sample(x0, x1, t)
    torch.testing.assert_close(x_t[2], 0.5 * (x0[2] + x1[2]))
    h = 1e-6
    x_later, _ = path_sample(x0, x1, t + h)
    torch.testing.assert_close((x_later - x_t) / h, u, rtol=1e-6, atol=1e-6)  # dx_t/dt = u


def test_uniform_time():
    t = sample_time(20000, "uniform", generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,)
    assert 0 <= t.min() and t.max() <= 1
    assert abs(t.mean().item() - 0.5) < 0.01
    assert abs(t.var().item() - 1 / 12) < 0.003


def test_logit_normal_time_has_the_requested_logit_moments():
    t = sample_time(20000, "logit_normal", mean=0.5, std=0.8, generator=torch.Generator().manual_seed(0))
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() - 0.5) < 0.03
    assert abs(logit.std().item() - 0.8) < 0.03


def test_unknown_time_distribution_is_refused():
    with pytest.raises(ValueError, match="logit_normal"):
        sample_time(4, "beta")


def test_shift_matches_sd3_in_noise_level_and_keeps_endpoints():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    shift = 3.0
    shifted = shift_time(t, shift)
    sigma = 1 - t
    sigma_sd3 = shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(1 - shifted, sigma_sd3)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] < t[1:-1]).all()  # towards noise
    assert (shifted.diff() > 0).all()
    torch.testing.assert_close(shift_time(t, 1.0), t)


def test_resolution_shift():
    assert resolution_shift((20, 24, 20), (10, 12, 10)) == pytest.approx(math.sqrt(8))
    assert resolution_shift((10, 12, 10), (10, 12, 10)) == 1.0


def test_shifted_training_times_are_nearer_noise():
    generator = torch.Generator().manual_seed(0)
    plain = sample_time(5000, "uniform", generator=generator)
    generator = torch.Generator().manual_seed(0)
    shifted = sample_time(5000, "uniform", shift=2.0, generator=generator)
    assert shifted.mean() < plain.mean() - 0.05


def test_time_grid():
    t_steps = time_grid(8)
    assert t_steps.shape == (9,) and t_steps[0] == 0 and t_steps[-1] == 1
    torch.testing.assert_close(t_steps.diff(), torch.full((8,), 1 / 8))
    shifted = time_grid(8, shift=2.0)
    assert shifted[0] == 0 and shifted[-1] == 1 and (shifted.diff() > 0).all()
    assert shifted[4] < 0.5
    with pytest.raises(ValueError):
        time_grid(0)
