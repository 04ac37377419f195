"""The rectified-flow training objective (the EMA of the weights is the training loop's, train/loop.py).

    >>> objective = RectifiedFlowLoss(loss="l2", time_distribution="logit_normal")
    >>> loss = objective(velocity_net, latents, covariates, covariates_present)
    >>> loss.backward()
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from mriflow.flow.path import LinearPath, sample_time

LOSSES = ("l2", "l1", "l1_l2", "pseudo_huber")
WEIGHTINGS = ("none", "min_snr")


def regression_loss(prediction: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float | None = None) -> torch.Tensor:
    """Per-sample loss (B,) between prediction and target (B, ...).

    l2:           mean(e²)
    l1:           mean(|e|)
    l1_l2:        0.9·mean(|e|) + 0.1·mean(e²)
    pseudo_huber: sqrt(‖e‖² + c²) − c over the whole sample, c = 0.00054·sqrt(d) by default
                  (Song & Dhariwal 2023, improved consistency training; d = elements per sample)
    """
    error = (prediction - target).flatten(1)  # (B, d)
    if kind == "l2":
        return error.square().mean(1)
    if kind == "l1":
        return error.abs().mean(1)
    if kind == "l1_l2":
        return 0.9 * error.abs().mean(1) + 0.1 * error.square().mean(1)
    if kind == "pseudo_huber":
        c = 0.00054 * math.sqrt(error.shape[1]) if huber_c is None else huber_c
        return torch.sqrt(error.square().sum(1) + c**2) - c
    raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {kind!r}")


def min_snr_weight(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-γ weights (Hang et al. 2023) of the velocity loss at times t (B,) on the LinearPath.

    The velocity error is the data error over 1 − t, so ‖v̂ − u‖² weighs ‖x̂1 − x1‖² by 1/(1 − t)²; min-SNR weighs
    it by min(SNR, γ), SNR = t²/(1 − t)², instead: the velocity loss times min(t², γ·(1 − t)²). The nearly clean
    times, whose large weight slows learning of everything else, are capped.
    """
    return torch.minimum(t.square(), gamma * (1 - t).square())


@dataclass
class RectifiedFlowLoss:
    """E_{t, x0, x1} w(t)·‖v̂ − u‖ with x_t = path.sample_xt(x0, x1, t) on the LinearPath of mriflow.flow.path:
    v̂ is the network's output read as a velocity (itself, or (x̂1 − x_t)/(1 − t) for a network that predicts the
    data, `prediction` "data"), u the path's velocity read the same way, w(t) = 1 or min-SNR-γ (`weighting`).

    The fields but `path` are the objective's configuration (build with mriflow.config.from_dict).
    `velocity_net(x, t, covariates, covariates_present)` drops covariates itself
    during training (classifier-free guidance), so this class does not.
    """

    loss: str = "l2"
    time_distribution: str = "logit_normal"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0
    huber_c: float | None = None
    prediction: str = "velocity"  # what the network outputs: "velocity" | "data" (x-prediction) | "preconditioned"
    weighting: str = "none"  # "none" | "min_snr"
    min_snr_gamma: float = 5.0
    sigma_floor: float = 0.05  # x-prediction: 1 − t is bounded below by this where it divides (JiT)
    path: LinearPath | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {self.weighting!r}")
        if self.path is None:
            self.path = LinearPath(self.prediction, self.sigma_floor if self.prediction == "data" else 0.0)

    def __call__(
        self,
        velocity_net: nn.Module,
        x1: torch.Tensor,
        covariates: torch.Tensor | None = None,
        covariates_present: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean loss over the batch of data latents x1 (B, C, D, H, W)."""
        t = sample_time(
            x1.shape[0], self.time_distribution, self.time_mean, self.time_std, self.time_shift, generator, x1.device
        )
        x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        x_t = self.path.sample_xt(x0, x1, t)
        prediction = velocity_net(x_t, t, covariates, covariates_present)
        kind = self.path.prediction
        v_hat = self.path.convert(prediction, x_t, t, kind, "velocity")
        # the path's target read as a velocity, as the output is: a data prediction's through the same clipped divisor
        u = self.path.convert(self.path.target(x0, x1, t), x_t, t, kind, "velocity")
        losses = regression_loss(v_hat, u, self.loss, self.huber_c)  # (B,)
        if self.weighting == "min_snr":
            losses = losses * min_snr_weight(t, self.min_snr_gamma)
        return losses.mean()
