import math

import pytest
import torch
from torch import nn

from mriflow.flow.objective import RectifiedFlowLoss, regression_loss


def test_regression_losses_match_their_formulas():
    generator = torch.Generator().manual_seed(0)
    prediction = torch.randn(3, 2, 4, 4, 4, generator=generator)
    target = torch.randn(3, 2, 4, 4, 4, generator=generator)
    mse = torch.stack([nn.functional.mse_loss(p, q) for p, q in zip(prediction, target)])
    mae = torch.stack([nn.functional.l1_loss(p, q) for p, q in zip(prediction, target)])
    torch.testing.assert_close(regression_loss(prediction, target, "l2"), mse)
    torch.testing.assert_close(regression_loss(prediction, target, "l1"), mae)
    torch.testing.assert_close(regression_loss(prediction, target, "l1_l2"), 0.9 * mae + 0.1 * mse)
    c = 0.00054 * math.sqrt(2 * 4 * 4 * 4)
    norm = (prediction - target).flatten(1).norm(dim=1)
    torch.testing.assert_close(regression_loss(prediction, target, "pseudo_huber"), torch.sqrt(norm**2 + c**2) - c)


def test_pseudo_huber_is_quadratic_near_zero_and_linear_far_away():
    target = torch.zeros(1, 100, dtype=torch.float64)
    small = torch.full((1, 100), 1e-6, dtype=torch.float64)
    large = torch.full((1, 100), 10.0, dtype=torch.float64)
    c = 0.5
    norm_small, norm_large = 1e-5, 100.0
    assert regression_loss(small, target, "pseudo_huber", c).item() == pytest.approx(norm_small**2 / (2 * c), rel=1e-4)
    assert regression_loss(large, target, "pseudo_huber", c).item() == pytest.approx(norm_large - c, rel=1e-4)


def test_unknown_loss_is_refused():
    with pytest.raises(ValueError, match="pseudo_huber"):
        RectifiedFlowLoss(loss="l3")


class OracleVelocity(nn.Module):
    """Exact velocity when the data is one point x1 = c: u = (c − x_t) / (1 − t)."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, covariates=None, covariates_present=None):
        return (self.c - x) / (1 - t).view(-1, 1, 1, 1, 1)


class ZeroVelocity(nn.Module):
    def forward(self, x, t, covariates=None, covariates_present=None):
        return torch.zeros_like(x)


def test_flow_loss_vanishes_for_the_exact_velocity():
    x1 = torch.full((64, 1, 3, 3, 3), 2.0, dtype=torch.float64)
    objective = RectifiedFlowLoss(loss="l2", time_distribution="uniform")
    generator = torch.Generator().manual_seed(0)
    assert objective(OracleVelocity(2.0), x1, generator=generator).item() < 1e-8
    # a velocity of 0 pays E‖x1 − x0‖² = c² + 1
    generator = torch.Generator().manual_seed(0)
    assert objective(ZeroVelocity(), x1, generator=generator).item() == pytest.approx(5.0, rel=0.08)


def test_flow_loss_trains_a_network():
    net = nn.Conv3d(1, 1, 1)
    objective = RectifiedFlowLoss(loss="l1_l2", time_distribution="logit_normal")
    loss = objective(lambda x, t, c, p: net(x), torch.ones(4, 1, 3, 3, 3))
    loss.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


class OracleData(nn.Module):
    """Exact clean-data prediction when the data is one point x1 = c."""

    def __init__(self, c: float):
        super().__init__()
        self.c = c

    def forward(self, x, t, covariates=None, covariates_present=None):
        return torch.full_like(x, self.c)


def test_an_x_prediction_loss_is_the_velocity_loss_of_the_velocity_it_implies():
    x1 = torch.full((64, 1, 3, 3, 3), 2.0, dtype=torch.float64)
    objective = RectifiedFlowLoss(loss="l2", time_distribution="uniform", prediction="data")
    assert objective.path.prediction == "data" and objective.path.sigma_floor == 0.05
    assert objective(OracleData(2.0), x1, generator=torch.Generator().manual_seed(0)).item() < 1e-12
    # predicting 0 for data at 2: the velocity error is 2 / max(1 − t, 0.05), so the loss is 4·E[1 / max(1 − t, 0.05)²]
    t = torch.rand(64, generator=torch.Generator().manual_seed(0)).double()  # the times the objective draws first
    expected = (4 / (1 - t).clamp_min(0.05).square()).mean().item()
    got = objective(OracleData(0.0), x1, generator=torch.Generator().manual_seed(0)).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_min_snr_weighting_caps_the_weight_of_nearly_clean_times():
    from mriflow.flow.objective import min_snr_weight

    t = torch.tensor([0.1, 0.5, 0.9, 0.99])
    weights = min_snr_weight(t, gamma=5.0)
    snr = t.square() / (1 - t).square()
    torch.testing.assert_close(weights, torch.minimum(snr, torch.tensor(5.0)) * (1 - t).square())
    assert weights[-1] < weights[1]  # near t = 1 the weight falls again where the plain loss weighs most
    x1 = torch.full((32, 1, 2, 2, 2), 1.0, dtype=torch.float64)
    plain = RectifiedFlowLoss(time_distribution="uniform", prediction="data")
    weighted = RectifiedFlowLoss(time_distribution="uniform", prediction="data", weighting="min_snr")
    assert weighted(OracleData(0.0), x1, generator=torch.Generator().manual_seed(1)).item() < \
        plain(OracleData(0.0), x1, generator=torch.Generator().manual_seed(1)).item()
    with pytest.raises(ValueError, match="weighting must be one of none, min_snr"):
        RectifiedFlowLoss(weighting="snr")
