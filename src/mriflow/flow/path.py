"""The rectified-flow path: how x_t and its target velocity are built, and where t is drawn.

Time convention of mriflow (stated here and nowhere else): t = 0 is Gaussian noise,
t = 1 is data,

    x_t = t·x1 + (1 − t)·x0,    x0 ~ N(0, I),  x1 ~ data,
    u   = dx_t/dt = x1 − x0,

and sampling integrates dx/dt = v(x, t) from t = 0 to t = 1.

    >>> t = sample_time(x1.shape[0], "logit_normal", shift=resolution_shift(x1.shape[2:], (10, 12, 10)))
    >>> x0 = torch.randn_like(x1)
    >>> x_t, u = path_sample(x0, x1, t)
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

TIME_DISTRIBUTIONS = ("uniform", "logit_normal")


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) so that t broadcasts over every non-batch axis of `like`."""
    return t.reshape(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def path_sample(x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Point on the straight path and its velocity: x_t = t·x1 + (1 − t)·x0, u = x1 − x0.

    x0 (noise) and x1 (data) are (B, ...); t is (B,) in [0, 1].
    """
    t = _expand(t, x1)
    x_t = t * x1 + (1 - t) * x0
    u = x1 - x0
    return x_t, u


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
