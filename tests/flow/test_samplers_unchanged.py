"""The samplers built on the probability paths draw what the samplers before them drew, bit for bit.

`reference_ddim_sample` and `reference_flow_sample` are the code of flow/diffusion.py and
flow/sampling.py before the paths (issue 14, architecture v2), copied here unchanged and kept
frozen; data/samples_before_paths.pt holds what that code drew on the machine that wrote it. On the running
machine the samplers must match the frozen code bit for bit; against the fixture they may differ by what another
processor's rounding makes of the network's outputs (other SIMD widths and summation orders: a few float32 ulps),
carried through each sampler. That tolerance is derived here, on the running machine, from the operation itself
(`rounding_tolerance`): the frozen sampler is rerun with the network's outputs moved by RELATIVE_ROUNDING of their
magnitude, and ten times the largest change it makes is allowed. The DDIM epsilon sampler divides by sqrt(alpha_bar)
and amplifies such rounding a hundredfold, which a fixed 1e-6 failed on AVX-512 and AVX2-only machines alike.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import wake

from mriflow.families.diffusion import Diffusion
from mriflow.families.flow import FlowTrainingConfig, RectifiedFlow
from mriflow.models.velocity import VelocityNet, VelocityNetConfig
from mriflow.utils.seeding import batch_generators, per_sample_normal

FIXTURE = Path(__file__).parent / "data" / "samples_before_paths.pt"
RELATIVE_ROUNDING = 2.0**-18  # about 30 float32 ulps: more than two processors' summation orders disagree by
SHAPE = (3, 1, 4, 6, 4)  # (B, C, D, H, W)
SEEDS = [11, 12, 13]


def tiny_net(time_scale: float) -> VelocityNet:
    config = VelocityNetConfig(
        in_channels=1, channels=(8, 16), attention_levels=(False, True), num_res_blocks=1, num_head_channels=8,
        norm_num_groups=4, covariate_names=("group",), covariate_kinds=("categorical",), covariate_categories=(2,),
        time_scale=time_scale,
    )
    torch.manual_seed(0)
    net = VelocityNet(config)
    wake(net)
    return net.eval()


def perturbed(net, seed: int):
    """`net` with each output moved by RELATIVE_ROUNDING of its own magnitude in a fixed random direction."""
    generator = torch.Generator().manual_seed(seed)

    def forward(*args, **kwargs):
        out = net(*args, **kwargs)
        return out * (1 + RELATIVE_ROUNDING * torch.randn(out.shape, generator=generator))

    return forward


def rounding_tolerance(sample, net) -> float:
    """Ten times the largest change that rounding-sized perturbations of the network's outputs make to `sample(net)`
    (three perturbations), and at least 1e-6: how far another processor may honestly land from the fixture."""
    exact = sample(net)
    spread = max(float((sample(perturbed(net, seed)) - exact).abs().max()) for seed in range(3))
    return max(1e-6, 10 * spread)


def covariates():
    return torch.tensor([[0.0], [1.0], [1.0]]), torch.tensor([[True], [True], [False]])


def guided(net, values, present, scale):
    def predict(x, t):
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([values, values]),
                   torch.cat([present, torch.zeros_like(present)]))
        cond, uncond = both.chunk(2)
        return uncond + scale * (cond - uncond)
    return predict


def reference_ddim_sample(net, alphas_cumprod, prediction, eta, steps, guidance):
    """flow/diffusion.py's DiffusionSchedule.step and sample_diffusion before the paths."""
    T = len(alphas_cumprod)
    padded = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod])
    spacing = T / steps
    t_steps = (torch.round(T - torch.arange(steps, dtype=torch.float64) * spacing) - 1).long().tolist() + [-1]
    generators = batch_generators(0, 0, SHAPE[0], SEEDS)
    x_next = per_sample_normal(generators, SHAPE[1:])
    values, present = covariates()
    predict = guided(net, values, present, guidance)
    with torch.no_grad():
        for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
            x_cur = x_next
            output = predict(x_cur, torch.tensor(float(t_cur)))
            noise = per_sample_normal(generators, SHAPE[1:]) if eta > 0 and t_next >= 0 else None
            alpha_cur, alpha_next = (float(a) for a in padded[torch.tensor([t_cur, t_next]) + 1])
            if prediction == "epsilon":
                eps_hat = output
                x_hat = (x_cur - (1 - alpha_cur) ** 0.5 * eps_hat) / alpha_cur**0.5
            else:
                x_hat = alpha_cur**0.5 * x_cur - (1 - alpha_cur) ** 0.5 * output
                eps_hat = (1 - alpha_cur) ** 0.5 * x_cur + alpha_cur**0.5 * output
            sigma = eta * ((1 - alpha_next) / (1 - alpha_cur) * (1 - alpha_cur / alpha_next)) ** 0.5
            x_next = alpha_next**0.5 * x_hat + max(1 - alpha_next - sigma**2, 0.0) ** 0.5 * eps_hat
            if sigma > 0:
                x_next = x_next + sigma * noise
    return x_next


def reference_flow_sample(net, steps, guidance, time_shift):
    """flow/sampling.py's sample_latents with Heun before the paths (time_grid, then heun of flow/solvers.py)."""
    t_steps = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    t_steps = (t_steps / (t_steps + time_shift * (1 - t_steps)) if time_shift != 1.0 else t_steps).to(torch.float32)
    x_next = per_sample_normal(batch_generators(0, 0, SHAPE[0], SEEDS), SHAPE[1:])
    values, present = covariates()
    velocity = guided(net, values, present, guidance)
    with torch.no_grad():
        for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
            x_cur = x_next
            h = t_next - t_cur
            d_cur = velocity(x_cur, t_cur)
            x_next = x_cur + h * d_cur
            d_prime = velocity(x_next, t_next)
            x_next = x_cur + h * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


DIFFUSION_CASES = [("v", "ddim"), ("epsilon", "ddim"), ("v", "ddpm"), ("epsilon", "ddpm")]


def diffusion_family(prediction: str) -> Diffusion:
    return Diffusion.from_config({"model": {"time_scale": 1.0}, "diffusion": {"prediction": prediction}})


@pytest.mark.parametrize("prediction,method", DIFFUSION_CASES)
def test_diffusion_family_samples_what_the_sampler_before_the_paths_sampled(prediction, method):
    net = tiny_net(time_scale=1.0)
    family = diffusion_family(prediction)
    settings = {"solver": method, "steps": 5, "guidance": 2.0}
    ours, nfe = family.sample(net, SHAPE, covariates(), settings, "cpu", SEEDS)
    alphas_cumprod = torch.cumprod(1 - family_betas(family), 0)
    expected = reference_ddim_sample(net, alphas_cumprod, prediction, 0.0 if method == "ddim" else 1.0, 5, 2.0)
    assert nfe == 5
    assert torch.equal(ours, expected)
    tolerance = rounding_tolerance(
        lambda f: reference_ddim_sample(f, alphas_cumprod, prediction, 0.0 if method == "ddim" else 1.0, 5, 2.0), net)
    torch.testing.assert_close(ours, torch.load(FIXTURE)[f"diffusion-{prediction}-{method}"], rtol=0, atol=tolerance)


def family_betas(family: Diffusion) -> torch.Tensor:
    """β of the baseline's default schedule, from MONAI as before the paths (scaled linear, 0.0015 to 0.0205)."""
    from monai.networks.schedulers import NoiseSchedules

    return NoiseSchedules["scaled_linear_beta"](1000, 0.0015, 0.0205).to(torch.float64)


@pytest.mark.parametrize("time_shift", [1.0, 3.0])
def test_flow_family_samples_what_the_sampler_before_the_paths_sampled(time_shift):
    net = tiny_net(time_scale=1000.0)
    family = RectifiedFlow(FlowTrainingConfig())
    settings = {"solver": "heun", "steps": 4, "guidance": 2.0, "time_shift": time_shift}
    ours, nfe = family.sample(net, SHAPE, covariates(), settings, "cpu", SEEDS)
    assert nfe == 8
    assert torch.equal(ours, reference_flow_sample(net, 4, 2.0, time_shift))
    tolerance = rounding_tolerance(lambda f: reference_flow_sample(f, 4, 2.0, time_shift), net)
    torch.testing.assert_close(ours, torch.load(FIXTURE)[f"flow-shift-{time_shift}"], rtol=0, atol=tolerance)
