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
