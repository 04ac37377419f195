import math

import pytest
import torch
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from torch import nn

from mriflow.flow.diffusion import DiffusionSchedule, diffusion_loss, sample_diffusion

T = 1000


@pytest.mark.parametrize("kind", ["linear_beta", "scaled_linear_beta"])
def test_alphas_cumprod_match_the_formula(kind):
    schedule = DiffusionSchedule(T, kind, beta_start=1e-4, beta_end=2e-2)
    if kind == "linear_beta":
        betas = torch.linspace(1e-4, 2e-2, T, dtype=torch.float64)
    else:
        betas = torch.linspace(1e-2, 2e-2**0.5, T, dtype=torch.float64) ** 2
    torch.testing.assert_close(schedule.betas, betas, rtol=1e-5, atol=1e-9)
    alpha_bar = torch.exp(torch.cumsum(torch.log1p(-betas), 0))  # Π (1 − β_s)
    torch.testing.assert_close(schedule.alphas_cumprod, alpha_bar, rtol=1e-5, atol=1e-9)
    assert (schedule.alphas_cumprod.diff() < 0).all()


def test_cosine_alphas_cumprod_match_the_closed_form():
    schedule = DiffusionSchedule(T, "cosine")
    s = 8e-3
    t = torch.arange(1, T + 1, dtype=torch.float64)
    f = lambda u: torch.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    closed = f(t) / f(torch.zeros(1, dtype=torch.float64))
    # the last few betas are clipped at 0.999 (Nichol & Dhariwal 2021), so compare before them
    torch.testing.assert_close(schedule.alphas_cumprod[:990], closed[:990], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("num_steps", [1, 3, 10, 50, 333, 1000])
def test_trailing_timesteps_start_at_the_last_timestep(num_steps):
    timesteps = DiffusionSchedule().sampling_timesteps(num_steps)
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
    schedule = DiffusionSchedule(prediction="epsilon")
    to_998 = schedule.step(output.double(), 999, 998, x_cur.double(), eta=1.0, noise=noise)
    to_888 = schedule.step(output.double(), 999, 888, x_cur.double(), eta=1.0, noise=noise)
    torch.testing.assert_close(monai_next.double(), to_998, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(monai_next.double(), to_888, atol=1e-2)


def test_v_and_epsilon_targets_are_consistent():
    schedule = DiffusionSchedule(prediction="v")
    x, noise = torch.randn(2, 4, 1, 2, 3, dtype=torch.float64).unbind(0)
    timesteps = torch.tensor([0, 250, 500, 999])
    x_t = schedule.add_noise(x, noise, timesteps)
    v = schedule.target(x, noise, timesteps)
    a = schedule.alpha_bar(timesteps).view(-1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x)
    torch.testing.assert_close((1 - a).sqrt() * x_t + a.sqrt() * v, noise)
    torch.testing.assert_close(DiffusionSchedule(prediction="epsilon").target(x, noise, timesteps), noise)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_monai_ddpm_and_ddim_agree_where_they_are_right(prediction):
    """With one timestep per step, MONAI's posterior (DDPM) and DDIM updates are correct: ours must match."""
    schedule = DiffusionSchedule(prediction=prediction)
    monai_kind = "epsilon" if prediction == "epsilon" else "v_prediction"
    kwargs = dict(schedule="scaled_linear_beta", beta_start=0.0015, beta_end=0.0205, clip_sample=False, prediction_type=monai_kind)
    x_cur, output = torch.randn(2, 1, 2, 3, 3, 3).unbind(0)
    for t_cur in (999, 500, 1):
        ddpm = DDPMScheduler(T, **kwargs)
        ddpm.set_timesteps(T)
        expected, _ = ddpm.step(output, t_cur, x_cur, generator=torch.Generator().manual_seed(3))
        noise = torch.randn(output.shape, generator=torch.Generator().manual_seed(3))
        ours = schedule.step(output.double(), t_cur, t_cur - 1, x_cur.double(), eta=1.0, noise=noise.double())
        torch.testing.assert_close(ours.float(), expected, rtol=1e-4, atol=1e-4)

        ddim = DDIMScheduler(T, **kwargs)
        ddim.set_timesteps(T)
        expected, _ = ddim.step(output, t_cur, x_cur, eta=0.0)
        ours = schedule.step(output.double(), t_cur, t_cur - 1, x_cur.double(), eta=0.0)
        torch.testing.assert_close(ours.float(), expected, rtol=1e-4, atol=1e-4)


class GaussianOracle(nn.Module):
    """Exact ε or v prediction when every data element is N(mean, std²)."""

    def __init__(self, schedule: DiffusionSchedule, mean: float, std: float):
        super().__init__()
        self.schedule, self.mean, self.std = schedule, mean, std

    def forward(self, x_t, timesteps, covariates=None, covariates_present=None):
        a = self.schedule.alpha_bar(timesteps.round().long()).to(x_t.dtype).view(-1, 1, 1, 1, 1)
        residual = x_t - a.sqrt() * self.mean
        denominator = a * self.std**2 + 1 - a
        eps_hat = (1 - a).sqrt() * residual / denominator  # E[ε | x_t]
        x_hat = self.mean + a.sqrt() * self.std**2 * residual / denominator  # E[x | x_t]
        return eps_hat if self.schedule.prediction == "epsilon" else a.sqrt() * eps_hat - (1 - a).sqrt() * x_hat


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_diffusion_loss_vanishes_for_the_exact_prediction(prediction):
    schedule = DiffusionSchedule(prediction=prediction)
    x = torch.full((16, 1, 2, 2, 2), 0.7, dtype=torch.float64)
    oracle = GaussianOracle(schedule, mean=0.7, std=0.0)
    assert diffusion_loss(oracle, schedule, x, generator=torch.Generator().manual_seed(0)).item() < 1e-10


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("method,steps", [("ddim", 50), ("ddpm", 100)])
def test_sampling_with_the_exact_prediction_recovers_the_data_distribution(prediction, method, steps):
    schedule = DiffusionSchedule(prediction=prediction)
    oracle = GaussianOracle(schedule, mean=0.7, std=0.5)
    latents, nfe = sample_diffusion(oracle, schedule, (4, 1, 10, 10, 10), method=method, steps=steps, seed=0)
    assert nfe == steps
    assert abs(latents.mean().item() - 0.7) < 0.03
    assert abs(latents.std().item() - 0.5) < 0.07  # DDIM and DDPM are first order in 1/steps


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("method,steps", [("ddim", 1), ("ddim", 3), ("ddpm", 3)])
def test_few_steps_keep_the_data_mean(prediction, method, steps):
    """Each step must land exactly on the noise level of the next timestep and the first must be T − 1:
    with 3 steps, stepping to t − T // N on a linspace grid (MONAI 1.6.1) gives a mean of 0.49
    instead of 0.7, and "leading" spacing (666, 333, 0) gives 0.68."""
    schedule = DiffusionSchedule(prediction=prediction)
    oracle = GaussianOracle(schedule, mean=0.7, std=0.5)
    latents, _ = sample_diffusion(oracle, schedule, (4, 1, 10, 10, 10), method=method, steps=steps, seed=0)
    assert abs(latents.mean().item() - 0.7) < 0.015


def test_ddpm_samples_do_not_depend_on_the_batch():
    schedule = DiffusionSchedule()
    oracle = GaussianOracle(schedule, mean=0.0, std=1.0)
    batch, _ = sample_diffusion(oracle, schedule, (3, 1, 2, 3, 2), method="ddpm", steps=20, seed=5)
    alone, _ = sample_diffusion(oracle, schedule, (1, 1, 2, 3, 2), method="ddpm", steps=20, seed=5, first_index=2)
    again, _ = sample_diffusion(oracle, schedule, (3, 1, 2, 3, 2), method="ddpm", steps=20, seed=5)
    torch.testing.assert_close(alone[0], batch[2])
    torch.testing.assert_close(again, batch)
    assert not torch.allclose(batch[0], batch[1])


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="prediction"):
        DiffusionSchedule(prediction="x0")
    with pytest.raises(ValueError, match="schedule"):
        DiffusionSchedule(schedule="quadratic")
    with pytest.raises(ValueError, match="steps"):
        DiffusionSchedule().sampling_timesteps(1001)
    with pytest.raises(ValueError, match="ddim"):
        sample_diffusion(nn.Identity(), DiffusionSchedule(), (1, 1, 2, 2, 2), method="plms")
