"""The DDPM/DDIM baseline on the same latents and the same network as the flow.

Here the index runs the DDPM way: timestep 0 is the least noisy, T − 1 the noisiest,

    x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε,    ᾱ_t = Π_{s ≤ t} (1 − β_s),

with x a data latent, ε ~ N(0, I); the network predicts ε or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x.
`VPDiffusionPath` holds this path (the β schedule, ᾱ, the target and the conversions between
ε, v and x̂), with the interface of mriflow.flow.path's paths; the loss and the samplers use it.

Why not MONAI's DDPMScheduler/DDIMScheduler (1.6.1)? Their betas are right and are
reused here, but their sampling steps are not: DDIMScheduler.set_timesteps(N) places
the timesteps with linspace(T − 1, 0, N) while step() jumps to t − T // N, so the
state it returns sits at a different noise level from the timestep the network sees
next (N = 10: 999 -> 899 in the update, 888 at the next call); DDPMScheduler.step
always uses the one-step posterior (t -> t − 1) whatever N is. Both clip x̂ to
[−1, 1] by default, which is wrong for latents. Sampling here uses the "trailing"
spacing of Lin et al. 2024 (table 2): t_i = round(T − i·T/N) − 1, so the first step
is at T − 1, and every step goes exactly to the next timestep of that grid.

    >>> path = VPDiffusionPath(prediction="v")
    >>> loss = diffusion_loss(net, path, latents, covariates, covariates_present)
    >>> latents, nfe = sample_diffusion(net, path, (8, 4, 10, 12, 10), method="ddim", steps=50, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mriflow.flow.guidance import guided_prediction
from mriflow.flow.objective import regression_loss
from mriflow.flow.path import check_kind
from mriflow.flow.sampling import broadcast_covariates, evaluating
from mriflow.utils.seeding import batch_generators, per_sample_normal

BETA_SCHEDULES = ("linear_beta", "scaled_linear_beta", "cosine")
PREDICTIONS = ("epsilon", "v")
METHODS = ("ddpm", "ddim")


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


@dataclass
class VPDiffusionPath:
    """The discrete variance-preserving path of DDPM: x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε at integer timesteps.

    β schedule from MONAI's NoiseSchedules. Defaults follow latent diffusion (Rombach et al. 2022;
    Pinaya et al. 2022 for brains): T = 1000, scaled-linear β from 0.0015 to 0.0205. The network
    predicts `prediction`, ε or v; `convert` goes between ε, v and the data x̂ at x_t (α = sqrt(ᾱ_t),
    σ = sqrt(1 − ᾱ_t), α² + σ² = 1):

        x̂ = (x_t − σ·ε)/α,   ε = (x_t − α·x̂)/σ,   x̂ = α·x_t − σ·v,   ε = σ·x_t + α·v,   v = α·ε − σ·x̂.

        >>> path = VPDiffusionPath(prediction="v")
        >>> x_hat = path.convert(output, x_t, 999, "v", "data")
    """

    num_train_timesteps: int = 1000
    schedule: str = "scaled_linear_beta"
    beta_start: float = 0.0015
    beta_end: float = 0.0205
    prediction: str = "v"

    kinds = ("epsilon", "v", "data")

    def __post_init__(self):
        from monai.networks.schedulers import NoiseSchedules

        if self.schedule not in BETA_SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(BETA_SCHEDULES)}; got {self.schedule!r}")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"prediction must be one of {', '.join(PREDICTIONS)}; got {self.prediction!r}")
        if self.schedule == "cosine":
            betas = NoiseSchedules["cosine"](self.num_train_timesteps)[0]
        else:
            betas = NoiseSchedules[self.schedule](self.num_train_timesteps, self.beta_start, self.beta_end)
        self.betas = betas.to(torch.float64)  # (T,)
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # ᾱ_t = Π_{s ≤ t} (1 − β_s)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """ᾱ at integer timesteps; timestep −1 (past the last step) is clean data, ᾱ = 1."""
        timesteps = torch.as_tensor(timesteps).long().cpu()
        padded = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])
        return padded[timesteps + 1]

    def coefficients(self, timesteps: torch.Tensor | int, like: torch.Tensor):
        """(α, σ) = (sqrt(ᾱ_t), sqrt(1 − ᾱ_t)): python floats (float64) for one int timestep, as the
        samplers step; for timesteps (B,) tensors of like's dtype shaped to broadcast over `like` (B, ...)."""
        if isinstance(timesteps, int):
            alpha_bar = float(self.alpha_bar(torch.tensor([timesteps]))[0])
            return alpha_bar**0.5, (1 - alpha_bar) ** 0.5
        alpha_bar = _expand(self.alpha_bar(timesteps), like).to(like.device)
        return alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def sample_xt(self, noise: torch.Tensor, data: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε; noise and data (B, ...), timesteps (B,) integers."""
        alpha, sigma = self.coefficients(timesteps, data)
        return alpha * data + sigma * noise

    def target(self, noise: torch.Tensor, data: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """ε, or v = sqrt(ᾱ_t)·ε − sqrt(1 − ᾱ_t)·x (Salimans & Ho 2022)."""
        if self.prediction == "epsilon":
            return noise
        alpha, sigma = self.coefficients(timesteps, data)
        return alpha * noise - sigma * data

    def convert(self, prediction: torch.Tensor, x_t: torch.Tensor, timesteps: torch.Tensor | int, source: str,
                target: str) -> torch.Tensor:
        """`prediction` of kind `source` at (x_t, timesteps) as kind `target` (formulas in the class docstring)."""
        check_kind(source, self.kinds, "VPDiffusionPath")
        check_kind(target, self.kinds, "VPDiffusionPath")
        if source == target:
            return prediction
        alpha, sigma = self.coefficients(timesteps, x_t)
        if source == "v":
            if target == "data":
                return alpha * x_t - sigma * prediction
            return sigma * x_t + alpha * prediction  # target == "epsilon"
        if source == "epsilon":
            data = (x_t - sigma * prediction) / alpha
            return data if target == "data" else alpha * prediction - sigma * data
        noise = (x_t - alpha * prediction) / sigma  # source == "data"
        return noise if target == "epsilon" else alpha * noise - sigma * prediction

    def sampling_timesteps(self, num_steps: int) -> torch.Tensor:
        """Trailing spacing: t_i = round(T − i·T/N) − 1, i = 0 … N − 1; starts at T − 1."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        spacing = self.num_train_timesteps / num_steps
        return (torch.round(self.num_train_timesteps - torch.arange(num_steps, dtype=torch.float64) * spacing) - 1).long()


def ddim_step(
    path: VPDiffusionPath,
    output: torch.Tensor,
    t_cur: int,
    t_next: int,
    x_cur: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM update from timestep t_cur to t_next < t_cur (−1 for the end), Song et al. 2021 eq. 12:

        x_next = sqrt(ᾱ_next)·x̂ + sqrt(1 − ᾱ_next − σ²)·ε̂ + σ·z,
        σ = η·sqrt((1 − ᾱ_next)/(1 − ᾱ_cur))·sqrt(1 − ᾱ_cur/ᾱ_next),

    with x̂ and ε̂ the path's conversions of the network's `output` at x_cur. η = 0 is DDIM;
    η = 1 is DDPM's ancestral step (its posterior q(x_next | x_cur, x̂)).
    """
    x_hat = path.convert(output, x_cur, t_cur, path.prediction, "data")
    eps_hat = path.convert(output, x_cur, t_cur, path.prediction, "epsilon")
    alpha_cur, alpha_next = (float(a) for a in path.alpha_bar(torch.tensor([t_cur, t_next])))
    sigma = eta * ((1 - alpha_next) / (1 - alpha_cur) * (1 - alpha_cur / alpha_next)) ** 0.5
    x_next = alpha_next**0.5 * x_hat + max(1 - alpha_next - sigma**2, 0.0) ** 0.5 * eps_hat
    if sigma > 0:
        if noise is None:
            raise ValueError("a stochastic step (eta > 0) needs `noise`")
        x_next = x_next + sigma * noise
    return x_next


def diffusion_loss(
    net: nn.Module,
    path: VPDiffusionPath,
    x: torch.Tensor,
    covariates: torch.Tensor | None = None,
    covariates_present: torch.Tensor | None = None,
    loss: str = "l2",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """E_{t ~ U{0…T−1}, ε} ‖net(x_t, t, c) − path.target(ε, x, t)‖ over data latents x (B, C, D, H, W).

    `net` should be built with time_scale = 1 (it sees the integer timesteps).
    """
    timesteps = torch.randint(0, path.num_train_timesteps, (x.shape[0],), generator=generator, device=x.device)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    x_t = path.sample_xt(noise, x, timesteps)
    output = net(x_t, timesteps.to(x.dtype), covariates, covariates_present)
    return regression_loss(output, path.target(noise, x, timesteps), loss).mean()


def sample_diffusion(
    net: nn.Module,
    path: VPDiffusionPath,
    shape: Sequence[int],
    covariates: tuple[torch.Tensor, torch.Tensor] | None = None,
    method: str = "ddim",
    steps: int = 50,
    guidance: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    first_index: int = 0,
    eta: float | None = None,
    sample_seeds: Sequence[int] | None = None,
) -> tuple[torch.Tensor, int]:
    """Latents (B, C, D, H, W) and the NFE per sample, with the seeding of mriflow.utils.seeding.

    method "ddim" uses η = 0, "ddpm" η = 1, unless `eta` is given. The per-step noise of
    sample i comes from its own generator, so sample i does not depend on the batch;
    `sample_seeds` (one per sample) replaces `seed` and `first_index` as in sample_latents.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}; got {method!r}")
    eta = (0.0 if method == "ddim" else 1.0) if eta is None else eta
    batch_size = shape[0]
    generators = batch_generators(seed, first_index, batch_size, sample_seeds)
    x_next = per_sample_normal(generators, shape[1:]).to(device)  # (B, C, D, H, W)
    values, present = broadcast_covariates(covariates, batch_size, device)
    t_steps = path.sampling_timesteps(steps).tolist() + [-1]
    with evaluating(net):
        predict = guided_prediction(net, values, present, guidance)
        for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
            x_cur = x_next
            output = predict(x_cur, torch.tensor(float(t_cur), device=device))
            noise = per_sample_normal(generators, shape[1:]).to(device) if eta > 0 and t_next >= 0 else None
            x_next = ddim_step(path, output, t_cur, t_next, x_cur, eta, noise)
    return x_next, steps
