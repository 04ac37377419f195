import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from mriflow.flow.diffusion import VPDiffusionPath, ddim_step, diffusion_loss, sample_diffusion

T = 1000


@pytest.mark.parametrize("kind", ["linear_beta", "scaled_linear_beta"])
def test_alphas_cumprod_match_the_formula(kind):
    path = VPDiffusionPath(T, kind, beta_start=1e-4, beta_end=2e-2)
    if kind == "linear_beta":
        betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    else:
        betas = torch.linspace(1e-2, 2e-2**0.5, T, dtype=torch.float64) ** 2
    torch.testing.assert_close(path.betas, betas, rtol=1e-5, atol=1e-9)
    alpha_bar = torch.exp(torch.cumsum(torch.log1p(-betas), 0))  # Π (1 − β_s)
    torch.testing.assert_close(path.alphas_cumprod, alpha_bar, rtol=1e-5, atol=1e-9)
    assert (path.alphas_cumprod.diff() < 0).all()


def test_cosine_alphas_cumprod_match_the_closed_form():
    path = VPDiffusionPath(T, "cosine")
    s = 8e-3
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = f(t) / f(torch.zeros(1, dtype=torch.float64))
    # the last few betas are clipped at 0.999 (Nichol & Dhariwal 2021), so compare before them
    torch.testing.assert_close(path.alphas_cumprod[:990], closed[:990], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 3, 10, 50, 333, 1000])
def test_trailing_timesteps_start_at_the_last_timestep(num_steps):
    timesteps = VPDiffusionPath().sampling_timesteps(num_steps)
    assert timesteps[0] == T - 1
    assert len(timesteps) == num_steps == len(set(timesteps.tolist()))
    assert (timesteps.diff() < 0).all() and timesteps[-1] >= 0
    if num_steps == T:
        assert timesteps.tolist() == list(range(T - 1, -1, -1))


def test_monai_ddim_steps_disagree_with_its_own_timesteps():
    """Why diffusion.py does not use MONAI 1.6.1's DDIM sampler: if this fails, MONAI changed; revisit."""
    scheduler = DDIMScheduler(T)
    scheduler.set_timesteps(10)
    first, second = scheduler.timesteps[:2].tolist()
    assert first == T - 1
    assert second != first - T // 10  # step() lands at 899, the next network call is at 888


def test_monai_ddpm_steps_one_timestep_whatever_the_number_of_steps():
    """The other reason: with 10 steps, MONAI 1.6.1's DDPM step from 999 lands at 998, not 888."""
    kwargs = dict(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205, clip_sample=False)
    scheduler = DDPMScheduler(T, **kwargs)
    scheduler.set_timesteps(10)
    assert scheduler.timesteps[:2].tolist() == [999, 888]
    x_cur, output = torch.randn(2, 1, 2, 2, 2).unbind(0)
    monai_next, _ = scheduler.step(output, 999, x_cur, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(0)).double()
    path = VPDiffusionPath(prediction="epsilon")
    to_998 = ddim_step(path, output.double(), 999, 998, x_cur.double(), eta=1.0, noise=noise)
    to_888 = ddim_step(path, output.double(), 999, 888, x_cur.double(), eta=1.0, noise=noise)
    torch.testing.assert_close(monai_next.double(), to_998, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(monai_next.double(), to_888, atol=1e-2)


def test_v_and_epsilon_targets_are_consistent():
    path = VPDiffusionPath(prediction="v")
    x, noise = torch.randn(2, 4, 1, 2, 3, dtype=torch.float64).unbind(0)
    timesteps = torch.tensor([0, 250, 500, 999])
    x_t = path.sample_xt(noise, x, timesteps)
    v = path.target(noise, x, timesteps)
    a = path.alpha_bar(timesteps).view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, noise)
    torch.testing.assert_close(VPDiffusionPath(prediction="epsilon").target(noise, x, timesteps), noise)


TIMESTEPS = torch.tensor([0, 1, 250, 500, 998, 999])


def point(path):
    generator = torch.Generator().manual_seed(4)
    noise, x = torch.randn(2, len(TIMESTEPS), 1, 2, 3, 2, generator=generator, dtype=torch.float64).unbind(0)
    return noise, x, path.sample_xt(noise, x, TIMESTEPS)


def test_conversions_recover_noise_data_and_v():
    path = VPDiffusionPath(prediction="v")
    noise, x, x_t = point(path)
    v = path.target(noise, x, TIMESTEPS)
    truth = {"epsilon": noise, "data": x, "v": v}
    for source in truth:
        for target in truth:
            converted = path.convert(truth[source], x_t, TIMESTEPS, source, target)
            torch.testing.assert_close(converted, truth[target], msg=f"{source} -> {target}")


@pytest.mark.parametrize("source,via", [("epsilon", "data"), ("v", "epsilon"), ("epsilon", "v"), ("data", "v"),
                                        ("v", "data"), ("data", "epsilon")])
def test_a_wrong_prediction_round_trips(source, via):
    """ε -> x̂ -> ε, v <-> ε, …: any prediction, not only the true one, comes back as it was."""
    path = VPDiffusionPath(prediction="epsilon")
    noise, x, x_t = point(path)
    guess = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    there = path.convert(guess, x_t, TIMESTEPS, source, via)
    assert not torch.allclose(there, guess)
    torch.testing.assert_close(path.convert(there, x_t, TIMESTEPS, via, source), guess, rtol=1e-6, atol=1e-6)


def test_one_int_timestep_converts_like_a_tensor_of_them():
    """The samplers step with an int timestep (float64 coefficients); training passes (B,) tensors."""
    path = VPDiffusionPath(prediction="v")
    noise, x = torch.randn(2, 3, 1, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64).unbind(0)
    x_t = path.sample_xt(noise, x, torch.full((3,), 700))
    v = path.target(noise, x, torch.full((3,), 700))
    for target in ("epsilon", "data"):
        torch.testing.assert_close(path.convert(v, x_t, 700, "v", target), path.convert(v, x_t, torch.full((3,), 700), "v", target))


def test_unknown_prediction_kinds_are_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="epsilon, v, data; got 'velocity'"):
        VPDiffusionPath().convert(x, x, 5, "velocity", "data")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_monai_ddpm_and_ddim_agree_where_they_are_right(prediction):
    """With one timestep per step, MONAI's posterior (DDPM) and DDIM updates are correct: ours must match."""
    path = VPDiffusionPath(prediction=prediction)
    monai_kind = "epsilon" if prediction == "epsilon" else "v_prediction"
    kwargs = dict(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205, clip_sample=False, prediction_type=monai_kind)
    x_cur, output = torch.randn(2, 1, 2, 3, 3, 3).unbind(0)
    for t_cur in (999, 500, 1):
        ddpm = DDPMScheduler(T, **kwargs)
        ddpm.set_timesteps(T)
        expected, _ = ddpm.step(output, t_cur, x_cur, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(3))
        ours = ddim_step(path, output.double(), t_cur, t_cur - 1, x_cur.double(), eta=1.0, noise=noise.double())
        torch.testing.assert_close(ours.float(), expected, rtol=1e-4, atol=1e-4)

        ddim = DDIMScheduler(T, **kwargs)
        ddim.set_timesteps(T)
        expected, _ = ddim.step(output, t_cur, x_cur, eta=0.0)
        ours = ddim_step(path, output.double(), t_cur, t_cur - 1, x_cur.double(), eta=0.0)
        torch.testing.assert_close(ours.float(), expected, rtol=1e-4, atol=1e-4)


class GaussianOracle(nn.Module):
    """Exact ε or v prediction when every data element is N(mean, std²)."""

    def __init__(self, path: VPDiffusionPath, mean: float, std: float):
        super().__init__()
        self.path, self.mean, self.std = path, mean, std

    def forward(self, x_t, timesteps, covariates=None, covariates_present=None):
        a = self.path.alpha_bar(timesteps.round().long()).to(x_t.dtype).view(-1, 1, 1, 1, 1)
        residual = x_t - a.sqrt() * self.mean
        denominator = a * self.std**2 + 1 - a
        eps_hat = (1 - a).sqrt() * residual / denominator  # E[ε | x_t]
        x_hat = self.mean + a.sqrt() * self.std**2 * residual / denominator  # E[x | x_t]
        return eps_hat if self.path.prediction == "epsilon" else a.sqrt() * eps_hat - (1 - a).sqrt() * x_hat


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_diffusion_loss_vanishes_for_the_exact_prediction(prediction):
    path = VPDiffusionPath(prediction=prediction)
    x = torch.full((16, 1, 2, 2, 2), 0.7, dtype=torch.float64)
    oracle = GaussianOracle(path, mean=0.7, std=0.0)
    assert diffusion_loss(oracle, path, x, generator=torch.Generator().manual_seed(0)).item() < 1e-10


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("method,steps", [("ddim", 50), ("ddpm", 100)])
def test_sampling_with_the_exact_prediction_recovers_the_data_distribution(prediction, method, steps):
    path = VPDiffusionPath(prediction=prediction)
    oracle = GaussianOracle(path, mean=0.7, std=0.5)
    latents, nfe = sample_diffusion(oracle, path, (4, 1, 10, 10, 10), method=method, steps=steps, seed=0)
    assert nfe == steps
    assert abs(latents.mean().item() - 0.7) < 0.03
    assert abs(latents.std().item() - 0.5) < 0.07  # DDIM and DDPM are first order in 1/steps


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("method,steps", [("ddim", 1), ("ddim", 3), ("ddpm", 3)])
def test_few_steps_keep_the_data_mean(prediction, method, steps):
    """Each step must land exactly on the noise level of the next timestep and the first must be T − 1:
    with 3 steps, stepping to t − T // N on a linspace grid (MONAI 1.6.1) gives a mean of 0.49
    instead of 0.7, and "leading" spacing (666, 333, 0) gives 0.68."""
    path = VPDiffusionPath(prediction=prediction)
    oracle = GaussianOracle(path, mean=0.7, std=0.5)
    latents, _ = sample_diffusion(oracle, path, (4, 1, 10, 10, 10), method=method, steps=steps, seed=0)
    assert abs(latents.mean().item() - 0.7) < 0.015


def test_ddpm_samples_do_not_depend_on_the_batch():
    path = VPDiffusionPath()
    oracle = GaussianOracle(path, mean=0.0, std=1.0)
    batch, _ = sample_diffusion(oracle, path, (3, 1, 2, 3, 2), method="ddpm", steps=20, seed=5)
    alone, _ = sample_diffusion(oracle, path, (1, 1, 2, 3, 2), method="ddpm", steps=20, seed=5, first_index=2)
    again, _ = sample_diffusion(oracle, path, (3, 1, 2, 3, 2), method="ddpm", steps=20, seed=5)
    torch.testing.assert_close(alone[0], batch[2])
    torch.testing.assert_close(again, batch)
    assert not torch.allclose(batch[0], batch[1])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="prediction"):
        VPDiffusionPath(prediction="x0")
    with pytest.raises(ValueError, match="schedule"):
        VPDiffusionPath(schedule="quadratic")
    with pytest.raises(ValueError, match="steps"):
        VPDiffusionPath().sampling_timesteps(1001)
    with pytest.raises(ValueError, match="ddim"):
        sample_diffusion(nn.Identity(), VPDiffusionPath(), (1, 1, 2, 2, 2), method="plms")
