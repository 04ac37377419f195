"""Probability paths from Gaussian noise to data, and where the rectified flow's t is drawn.

Time convention of mriflow (stated here and nowhere else): t = 0 is Gaussian noise,
t = 1 is data,

    x_t = t·x1 + (1 − t)·x0,    x0 ~ N(0, I),  x1 ~ data,
    u   = dx_t/dt = x1 − x0,

and sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.

A path (`ProbabilityPath`) is one object that the loss and the sampler of a family share: it
builds x_t from (noise, data), gives the training target of the network, and converts one
prediction of a point x_t into another (velocity, noise ε, data x̂). `LinearPath` is the
rectified flow's; the diffusion baseline's discrete variance-preserving path is
mriflow.flow.diffusion.VPDiffusionPath. Every path here is affine, x_t = α·data + σ·ε, which
is all the conversions need.

    >>> path = LinearPath()
    >>> t = sample_time(x1.shape[0], "logit_normal", shift=resolution_shift(x1.shape[2:], (10, 12, 10)))
    >>> x0 = torch.randn_like(x1)
    >>> x_t, u = path.sample_xt(x0, x1, t), path.target(x0, x1, t)
    >>> x1_hat = path.convert(velocity_net(x_t, t), x_t, t, "velocity", "data")
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import torch

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so that t broadcasts over every non-batch axis of `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


class ProbabilityPath(Protocol):
    """What a family's loss and sampler need of its path; x_t = α·data + σ·ε.

    prediction   what the network outputs, one of the kinds `convert` knows
    sample_xt    the point x_t between noise ε and data at times t (B,)
    target       the network's training target at x_t, of kind `prediction`
    convert      a prediction of one kind at x_t turned into another
    """

    prediction: str

    def sample_xt(self, noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def target(self, noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def convert(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, source: str,
                target: str) -> torch.Tensor: ...


def check_kind(kind: str, kinds: Sequence[str], path: str) -> None:
    if kind not in kinds:
        raise ValueError(f"{path} converts between {', '.join(kinds)}; got {kind!r}")


class LinearPath:
    """The rectified-flow path x_t = t·x1 + (1 − t)·x0 (α_t = t, σ_t = 1 − t), whose velocity is u = x1 − x0.

    The network predicts the velocity (`prediction` "velocity"), or the clean data x̂1 ("data": x-prediction, as JiT,
    Li & He 2025, which lets a network predict large raw patches where a velocity or noise target fails). One
    prediction at x_t gives the others:

        x̂1 = x_t + (1 − t)·u,    x̂0 = x_t − t·u,    and back  u = x̂1 − x̂0,
        from x̂1 alone: x̂0 = (x_t − t·x̂1)/(1 − t),  u = (x̂1 − x_t)/(1 − t);  from x̂0 alone: x̂1 = (x_t − (1 − t)·x̂0)/t.

    "epsilon" names the noise end x0 and "data" the data end x1, as in VPDiffusionPath. `sigma_floor` > 0 bounds
    the divisor 1 − t from below (JiT's clip, 0.05), so a data prediction near t = 1 gives a finite velocity.

    "preconditioned" is EDM's skip parameterisation (Karras et al. 2022) written for this path: with D = t² + (1 − t)²
    (the variance of x_t for unit-variance data), the network's output F gives

        x̂1 = t·x_t / D + (1 − t)·F / sqrt(D),      u = F / sqrt(D) − (1 − 2t)·x_t / D,      F = sqrt(D)·u + (1 − 2t)·x_t / sqrt(D)

    so it predicts the clean data at the noise end (t = 0: x̂1 = F) and passes x_t through at the data end (t = 1:
    x̂1 = x_t), where a plain data prediction has to rebuild every detail of its input; the velocity is finite on all
    of [0, 1], and the velocity loss weighs F's error by 1/D, between 1 and 2 (EDM's unit weighting).

        >>> x1_hat = LinearPath().convert(v, x_t, t, "velocity", "data")
    """

    kinds = ("velocity", "epsilon", "data", "preconditioned")

    def __init__(self, prediction: str = "velocity", sigma_floor: float = 0.0):
        check_kind(prediction, ("velocity", "data", "preconditioned"), "LinearPath's network")
        self.prediction = prediction
        self.sigma_floor = float(sigma_floor)

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_t, σ_t) = (t, 1 − t), shaped to broadcast over `like` (B, ...); t is (B,) or 0-dim."""
        t = _expand(t, like)
        return t, 1 - t

    def sample_xt(self, noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = t·x1 + (1 − t)·x0; x0 (noise) and x1 (data) are (B, ...), t is (B,) in [0, 1]."""
        alpha, sigma = self.coefficients(t, data)
        return alpha * data + sigma * noise

    def target(self, noise: torch.Tensor, data: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network should output at x_t: u = dx_t/dt = x1 − x0 (the same at every t), x1 itself, or the F
        whose preconditioned reading is u."""
        if self.prediction == "preconditioned":
            return self.convert(data - noise, self.sample_xt(noise, data, t), t, "velocity", "preconditioned")
        return data - noise if self.prediction == "velocity" else data

    def convert(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, source: str,
                target: str) -> torch.Tensor:
        """`prediction` of kind `source` at (x_t, t) as kind `target` (formulas in the class docstring).
        From the data end at t = 1, or the noise end at t = 0, the other end is not determined (division by 0)."""
        check_kind(source, self.kinds, "LinearPath")
        check_kind(target, self.kinds, "LinearPath")
        if source == target:
            return prediction
        alpha, sigma = self.coefficients(t, x_t)
        if "preconditioned" in (source, target):
            variance = alpha.square() + sigma.square()  # D
            if target == "preconditioned":  # F = sqrt(D)·u + (1 − 2t)·x_t / sqrt(D), from the velocity u
                velocity = self.convert(prediction, x_t, t, source, "velocity")
                return variance.sqrt() * velocity + (1 - 2 * alpha) * x_t / variance.sqrt()
            velocity = prediction / variance.sqrt() - (1 - 2 * alpha) * x_t / variance
            return velocity if target == "velocity" else self.convert(velocity, x_t, t, "velocity", target)
        if self.sigma_floor > 0:
            sigma = sigma.clamp_min(self.sigma_floor)
        if source == "velocity":
            return x_t + sigma * prediction if target == "data" else x_t - alpha * prediction
        if source == "data":  # u = (x̂1 − x_t)/(1 − t), x̂0 = (x_t − t·x̂1)/(1 − t)
            return (prediction - x_t) / sigma if target == "velocity" else (x_t - alpha * prediction) / sigma
        data = (x_t - sigma * prediction) / alpha  # source == "epsilon"
        return data if target == "data" else data - prediction

    def time_grid(self, num_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The sampling grid from noise to data (see `time_grid`)."""
        return time_grid(num_steps, shift, dtype)


def shift_time(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Move t towards the noise end: t' = t / (t + s·(1 − t)).

    This is the shift of Esser et al. 2024 (SD3, eq. 23), σ' = s·σ / (1 + (s − 1)·σ),
    written for the noise level σ = 1 − t. s = 1 is the identity; s > 1 spends more
    training and sampling time near noise, which larger volumes need because their
    many correlated voxels keep the signal visible at higher noise levels.
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return t / (t + shift * (1 - t))


def resolution_shift(shape: Sequence[int], reference_shape: Sequence[int]) -> float:
    """SD3's resolution-dependent shift s = sqrt(n / n_ref), n the number of latent voxels."""
    return math.sqrt(math.prod(shape) / math.prod(reference_shape))


def sample_time(
    batch_size: int,
    distribution: str = "logit_normal",
    mean: float = 0.0,
    std: float = 1.0,
    shift: float = 1.0,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Training times t (B,) in (0, 1).

    uniform:      t ~ U(0, 1)
    logit_normal: t = sigmoid(mean + std·n), n ~ N(0, 1) (SD3), which weights the middle of
                  the path where the velocity is hardest to predict.
    Then the optional shift t' = t / (t + s·(1 − t)).
    """
    if distribution == "uniform":
        t = torch.rand(batch_size, generator=generator, device=device)
    elif distribution == "logit_normal":
        t = torch.sigmoid(mean + std * torch.randn(batch_size, generator=generator, device=device))
    else:
        raise ValueError(f"time distribution must be one of {', '.join(TIME_DISTRIBUTIONS)}; got {distribution!r}")
    return shift_time(t, shift) if shift != 1.0 else t


def time_grid(num_steps: int, shift: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Sampling grid t_steps (num_steps + 1,) from 0 to 1: uniform, then the same shift as in training."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t_steps = torch.linspace(0, 1, num_steps + 1, dtype=torch.float64)
    return shift_time(t_steps, shift).to(dtype) if shift != 1.0 else t_steps.to(dtype)
