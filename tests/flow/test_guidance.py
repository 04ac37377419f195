import pytest
import torch
from torch import nn

from conftest import tiny_velocity_net
from mriflow.flow.guidance import guided_prediction


class CountingNet(nn.Module):
    """Output depends on x, t and on which covariates are present; counts forward passes."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, x, t, covariates=None, covariates_present=None):
        self.batch_sizes.append(x.shape[0])
        shift = (covariates * covariates_present).sum(1) + 0.5 * covariates_present.sum(1)  # (B,)
        return x * (1 + t.view(-1, 1, 1)) + shift.view(-1, 1, 1)


def test_guidance_formula_with_one_batched_forward():
    net = CountingNet()
    x = torch.randn(3, 2, 2)
    t = torch.tensor(0.4)
    values = torch.tensor([[1.0, 2.0], [0.0, -1.0], [3.0, 0.5]])
    present = torch.tensor([[True, True], [True, False], [False, True]])
    v_cond = net(x, t.expand(3), values, present)
    v_uncond = net(x, t.expand(3), values, torch.zeros_like(present))
    assert not torch.allclose(v_cond, v_uncond)
    for scale in (0.0, 1.0, 2.5):
        net.batch_sizes.clear()
        v = guided_prediction(net, values, present, scale)(x, t)
        torch.testing.assert_close(v, v_uncond + scale * (v_cond - v_uncond))
        assert net.batch_sizes == ([3] if scale == 1.0 else [6])  # cond and uncond in one forward


def test_no_covariates_means_no_unconditional_pass():
    net = CountingNet()
    x = torch.randn(2, 2, 2)
    values = torch.zeros(2, 1)
    absent = torch.zeros(2, 1, dtype=torch.bool)
    v = guided_prediction(net, values, absent, 3.0)(x, torch.tensor(0.2))
    torch.testing.assert_close(v, x * 1.2)
    assert net.batch_sizes == [2]


@pytest.mark.parametrize("scale,which", [(1.0, "cond"), (0.0, "uncond")])
def test_guidance_endpoints_on_the_velocity_net(scale, which):
    net = tiny_velocity_net()
    x = torch.randn(2, 2, 4, 6, 4)
    t = torch.tensor([0.3, 0.3])
    values = torch.tensor([[0.5, 1.0], [-1.0, 0.0]])
    present = torch.ones(2, 2, dtype=torch.bool)
    with torch.no_grad():
        expected = net(x, t, values, present if which == "cond" else torch.zeros_like(present))
        other = net(x, t, values, torch.zeros_like(present) if which == "cond" else present)
        v = guided_prediction(net, values, present, scale)(x, torch.tensor(0.3))
    assert not torch.allclose(expected, other, atol=1e-4)
    torch.testing.assert_close(v, expected, rtol=1e-5, atol=1e-5)
