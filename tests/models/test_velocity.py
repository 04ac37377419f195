import dataclasses

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from conftest import wake
from mriflow.data.dataset import CovariateSchema
from mriflow.flow.guidance import guided_prediction
from mriflow.models.velocity import MAX_PARAMETERS, SpatiallyConditioned, VelocityNet, VelocityNetConfig, num_parameters

COVARIATES = dict(covariate_names=("age", "sex"), covariate_kinds=("continuous", "categorical"), covariate_categories=(0, 2))
TINY = dict(channels=(8, 16, 16), attention_levels=(False, True, True), num_res_blocks=1, num_head_channels=8, norm_num_groups=4)


def tiny_net(**overrides) -> VelocityNet:
    torch.manual_seed(0)
    net = VelocityNet(VelocityNetConfig(**{**TINY, **COVARIATES, **overrides}))
    wake(net)
    return net


def inputs(batch_size=2, spatial=(10, 12, 10)):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, 4, *spatial, generator=generator)  # (B, C, D, H, W)
    t = torch.rand(batch_size, generator=generator)
    values = torch.tensor([[0.5, 1.0], [-1.0, 0.0]])[:batch_size]
    present = torch.tensor([[True, True], [True, False]])[:batch_size]
    return x, t, values, present


def test_forward_shape_and_backward_on_a_latent():
    net = tiny_net().train()
    x, t, values, present = inputs()
    out = net(x, t, values, present)
    assert out.shape == (2, 4, 10, 12, 10)
    loss = (out - torch.randn_like(out)).square().mean()
    loss.backward()
    assert net.unet.conv_in.conv.weight.grad.abs().sum() > 0
    assert net.conditioning.embedders[0][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("spatial", [(5, 7, 9), (4, 4, 4), (3, 6, 5)])
def test_any_spatial_size(spatial):
    net = tiny_net().eval()
    x, t, values, present = inputs(spatial=spatial)
    with torch.no_grad():
        assert net(x, t, values, present).shape == (2, 4, *spatial)


def test_covariates_reach_the_output_and_absent_ones_do_not():
    net = tiny_net().eval()
    x, t, values, present = inputs()
    with torch.no_grad():
        out = net(x, t, values, present)
        other = net(x, t, values + torch.tensor([1.0, 0.0]), present)
        absent = torch.zeros_like(present)
        null = net(x, t, values, absent)
        assert not torch.allclose(out, other, atol=1e-4)
        torch.testing.assert_close(null, net(x, t, values + 3.0, absent))
        torch.testing.assert_close(null, net(x, t))  # covariates None = all absent


def test_time_and_batch():
    net = tiny_net().eval()
    x, t, values, present = inputs()
    with torch.no_grad():
        out = net(x, t, values, present)
        assert not torch.allclose(out, net(x, t + 0.1, values, present), atol=1e-4)
        torch.testing.assert_close(net(x[1:], t[1:], values[1:], present[1:]), out[1:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(x, torch.tensor(0.3)), net(x, torch.full((2,), 0.3)))


def test_bad_inputs_are_refused():
    net = tiny_net().eval()
    x, t, values, present = inputs()
    with pytest.raises(ValueError, match=r"\(B, 4, D, H, W\)"):
        net(x[:, :2], t)
    with pytest.raises(ValueError, match="age, sex"):
        net(x, t, values[:, :1], present[:, :1])
    with pytest.raises(ValueError, match="norm_num_groups"):
        VelocityNet(VelocityNetConfig(channels=(12, 16), attention_levels=(False, True), norm_num_groups=8))


def test_unconditional_network():
    net = tiny_net(covariate_names=(), covariate_kinds=(), covariate_categories=()).eval()
    x, t, _, _ = inputs()
    with torch.no_grad():
        assert net(x, t).shape == x.shape
    with pytest.raises(ValueError, match="none"):
        net(x, t, torch.zeros(2, 1), torch.ones(2, 1, dtype=torch.bool))


def test_config_from_schema():
    table = pd.DataFrame({"age": [20, 31, 45, 52, 60, 71], "site": ["a", "b", "c", "a", "b", "c"]})
    config = VelocityNetConfig(**TINY).with_schema(CovariateSchema.fit(table, ["age", "site"]))
    assert config.covariate_kinds == ("continuous", "categorical") and config.covariate_categories == (0, 3)
    assert VelocityNet(config).conditioning.embedders[1].num_embeddings == 3


def test_default_network_fits_a_16_mb_fp16_weight_file(tmp_path):
    net = VelocityNet(VelocityNetConfig(**COVARIATES))
    assert num_parameters(net) <= MAX_PARAMETERS
    path = tmp_path / "velocity.safetensors"
    save_file({k: v.half().contiguous() for k, v in net.state_dict().items()}, str(path))
    assert path.stat().st_size <= 16 * 1024 * 1024


def test_config_round_trips_through_a_dict_and_rebuilds_the_same_weights():
    from mriflow.config import from_dict, to_dict

    config = VelocityNetConfig(**TINY, **COVARIATES)
    rebuilt = from_dict(VelocityNetConfig, to_dict(config))
    assert rebuilt == config
    source = VelocityNet(config)
    VelocityNet(rebuilt).load_state_dict(source.state_dict(), strict=True)


def test_a_spatial_condition_is_required_checked_and_bound_for_guidance():
    torch.manual_seed(0)
    config = VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, False), num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4, covariate_names=("age",), covariate_kinds=("continuous",),
                               covariate_categories=(0,), spatial_channels=3)
    net = VelocityNet(config).eval()
    wake(net)
    x, t = torch.randn(2, 2, 4, 6, 4), torch.rand(2)
    spatial = torch.rand(2, 3, 4, 6, 4)
    with pytest.raises(ValueError, match="spatial map"):
        net(x, t)
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 6, 4\)"):
        net(x, t, spatial=spatial[:, :2])
    covariates, present = torch.tensor([[0.5], [-0.5]]), torch.ones(2, 1, dtype=torch.bool)
    with torch.no_grad():
        direct = net(x, t, covariates, present, spatial=spatial)
        bound = SpatiallyConditioned(net, spatial)
        torch.testing.assert_close(bound(x, t, covariates, present), direct)
        # guidance evaluates 2B at once: the bound condition is repeated for the unconditional half
        guided = guided_prediction(bound, covariates, present, scale=2.0)(x, t)
        uncond = net(x, t, covariates, torch.zeros_like(present), spatial=spatial)
        torch.testing.assert_close(guided, uncond + 2.0 * (direct - uncond), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(net(x, t, covariates, present, spatial=spatial.flip(0)), direct)


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_the_flip_flag_is_an_input_the_bare_network_sets_to_zero(backbone):
    from mriflow.models.velocity import FlipConditioned

    config = VelocityNetConfig(in_channels=2, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1,
                               num_head_channels=8, norm_num_groups=4, flip_channel=True, backbone=backbone,
                               dit_hidden=24, dit_depth=1, dit_heads=2)
    torch.manual_seed(0)
    net = VelocityNet(config).eval()
    wake(net)
    x, t = torch.randn(2, 2, 4, 6, 4), torch.tensor([0.3, 0.6])
    with torch.no_grad():
        unflipped = net(x, t)
        assert torch.equal(unflipped, net(x, t, flipped=torch.tensor([False, False])))
        flagged = FlipConditioned(net, torch.tensor([True, False]))(x, t)
    assert not torch.allclose(flagged[0], unflipped[0]) and torch.equal(flagged[1], unflipped[1])
    plain = VelocityNet(dataclasses.replace(config, flip_channel=False))
    with pytest.raises(ValueError, match="not trained with the flip flag"):
        plain(x, t, flipped=torch.tensor([True, False]))
