import math

import pytest
import torch

from mriflow.flow.path import LinearPath, resolution_shift, sample_time, shift_time, time_grid

PATH = LinearPath()


def test_path_endpoints_and_target():
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, 4, generator=generator)
    x1 = torch.randn(3, 2, 4, 4, 4, generator=generator)
    x_start, u = PATH.sample_xt(x0, x1, torch.zeros(3)), PATH.target(x0, x1, torch.zeros(3))
    x_end = PATH.sample_xt(x0, x1, torch.ones(3))
    torch.testing.assert_close(x_start, x0)  # t = 0 is noise
    torch.testing.assert_close(x_end, x1)  # t = 1 is data
    torch.testing.assert_close(u, x1 - x0)


def test_path_is_linear_with_velocity_u():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(2, 5, 3, generator=generator, dtype=torch.float64).unbind(0)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    x_t, u = PATH.sample_xt(x0, x1, t), PATH.target(x0, x1, t)
    torch.testing.assert_close(x_t[2], 0.5 * (x0[2] + x1[2]))
    h = 1e-6
    x_later = PATH.sample_xt(x0, x1, t + h)
    torch.testing.assert_close((x_later - x_t) / h, u, rtol=1e-6, atol=1e-6)  # dx_t/dt = u


def endpoints_and_point(t):
    generator = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(2, len(t), 2, 3, 4, generator=generator, dtype=torch.float64).unbind(0)
    return x0, x1, PATH.sample_xt(x0, x1, t)


T_INSIDE = torch.tensor([0.01, 0.3, 0.5, 0.8, 0.99], dtype=torch.float64)


def test_a_velocity_predicts_both_ends_and_back():
    x0, x1, x_t = endpoints_and_point(T_INSIDE)
    u = PATH.target(x0, x1, T_INSIDE)
    torch.testing.assert_close(PATH.convert(u, x_t, T_INSIDE, "velocity", "data"), x1)
    torch.testing.assert_close(PATH.convert(u, x_t, T_INSIDE, "velocity", "epsilon"), x0)
    torch.testing.assert_close(PATH.convert(x1, x_t, T_INSIDE, "data", "velocity"), u)
    torch.testing.assert_close(PATH.convert(x0, x_t, T_INSIDE, "epsilon", "velocity"), u)
    torch.testing.assert_close(PATH.convert(x1, x_t, T_INSIDE, "data", "epsilon"), x0)
    torch.testing.assert_close(PATH.convert(x0, x_t, T_INSIDE, "epsilon", "data"), x1)


@pytest.mark.parametrize("via", ["data", "epsilon"])
def test_a_wrong_velocity_round_trips_through_either_end(via):
    """Not only the true velocity: any prediction comes back as it was."""
    x0, x1, x_t = endpoints_and_point(T_INSIDE)
    guess = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    there = PATH.convert(guess, x_t, T_INSIDE, "velocity", via)
    assert not torch.allclose(there, x1 if via == "data" else x0)
    torch.testing.assert_close(PATH.convert(there, x_t, T_INSIDE, via, "velocity"), guess)


def test_a_scalar_time_converts_like_one_time_per_sample():
    x0, x1, _ = endpoints_and_point(torch.full((5,), 0.3, dtype=torch.float64))
    t = torch.tensor(0.3, dtype=torch.float64)
    x_t = PATH.sample_xt(x0, x1, t)
    torch.testing.assert_close(PATH.convert(x1 - x0, x_t, t, "velocity", "data"), x1)
    assert PATH.convert(x1, x_t, t, "data", "data") is x1


def test_unknown_prediction_kinds_are_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="velocity, epsilon, data, preconditioned; got 'v'"):
        PATH.convert(x, x, torch.zeros(1), "v", "data")
    with pytest.raises(ValueError, match="got 'x0'"):
        PATH.convert(x, x, torch.zeros(1), "velocity", "x0")


def test_the_path_grid_is_the_shifted_time_grid():
    assert torch.equal(PATH.time_grid(6, 2.5), time_grid(6, 2.5))


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


def test_a_data_prediction_gives_the_velocity_and_the_noise_of_the_path():
    generator = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(4, 1, 3, 3, 3, generator=generator), torch.randn(4, 1, 3, 3, 3, generator=generator)
    t = torch.tensor([0.1, 0.4, 0.7, 0.9])
    path = LinearPath(prediction="data")
    x_t = path.sample_xt(x0, x1, t)
    assert torch.equal(path.target(x0, x1, t), x1)
    torch.testing.assert_close(path.convert(x1, x_t, t, "data", "velocity"), x1 - x0)
    torch.testing.assert_close(path.convert(x1, x_t, t, "data", "epsilon"), x0)
    with pytest.raises(ValueError, match="network"):
        LinearPath(prediction="epsilon")


def test_the_sigma_floor_bounds_the_divisor_near_the_data_end():
    path = LinearPath(prediction="data", sigma_floor=0.05)
    x_t, x1_hat = torch.zeros(1, 1, 2, 2, 2), torch.ones(1, 1, 2, 2, 2)
    velocity = path.convert(x1_hat, x_t, torch.tensor([0.99]), "data", "velocity")
    torch.testing.assert_close(velocity, torch.full_like(x_t, 1 / 0.05))  # not 1 / 0.01
    exact = LinearPath(prediction="data").convert(x1_hat, x_t, torch.tensor([0.99]), "data", "velocity")
    torch.testing.assert_close(exact, torch.full_like(x_t, 100.0))


def test_the_preconditioned_reading_is_data_at_the_noise_end_identity_at_the_data_end_and_round_trips():
    generator = torch.Generator().manual_seed(1)
    x0, x1 = torch.randn(5, 1, 2, 3, 2, generator=generator), torch.randn(5, 1, 2, 3, 2, generator=generator)
    t = torch.tensor([0.0, 0.2, 0.5, 0.8, 1.0])
    path = LinearPath(prediction="preconditioned")
    x_t = path.sample_xt(x0, x1, t)
    features = torch.randn(x_t.shape, generator=generator)
    data = path.convert(features, x_t, t, "preconditioned", "data")
    torch.testing.assert_close(data[0], features[0])  # t = 0: x̂1 = F
    torch.testing.assert_close(data[-1], x_t[-1])  # t = 1: x̂1 = x_t, whatever F is
    velocity = path.convert(features, x_t, t, "preconditioned", "velocity")
    assert torch.isfinite(velocity).all()  # finite on all of [0, 1], the data end included
    torch.testing.assert_close(path.convert(velocity, x_t, t, "velocity", "preconditioned"), features)
    torch.testing.assert_close(path.convert(velocity, x_t, t, "velocity", "data")[1:4], data[1:4])
    # the target F reads back as the path's velocity x1 − x0
    target = path.target(x0, x1, t)
    torch.testing.assert_close(path.convert(target, x_t, t, "preconditioned", "velocity"), x1 - x0)
