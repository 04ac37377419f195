"""Draw latents from a trained velocity network: integrate its ODE from noise to data (mriflow.flow.path).

Reproducibility: sample i of a run with seed s starts from noise drawn with its own
generator, seeded from (s, i) (mriflow.utils.seeding), so it is the same whatever the batch size or the
batch it falls in (pass `first_index` when a run is split into batches, or
`sample_seeds` when a batch's samples are not consecutive or are redraws), and the
noise is drawn on the CPU so it is the same on every device.

    >>> latents, nfe = sample_latents(velocity_net, (8, 4, 10, 12, 10), (values, present),
    ...                               solver="heun", steps=16, guidance=1.5, seed=0)
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

from mriflow.flow.guidance import guided_prediction
from mriflow.flow.path import LinearPath
from mriflow.flow.solvers import SOLVERS, solve
from mriflow.utils.seeding import batch_generators, per_sample_normal
from mriflow.utils.text import counted


@contextlib.contextmanager
def evaluating(net: nn.Module) -> Iterator[None]:
    """Eval mode (no covariate dropout) and no gradients; the previous mode is restored after."""
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        net.train(was_training)


def broadcast_covariates(
    covariates: tuple[torch.Tensor, torch.Tensor] | None, batch_size: int, device: torch.device | str
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(values, present) of shape (K,) or (B, K) -> both (B, K) on `device`; None stays None."""
    if covariates is None:
        return None, None
    values, present = (torch.as_tensor(c) for c in covariates)
    if values.shape != present.shape:
        raise ValueError(f"covariate values {tuple(values.shape)} and present {tuple(present.shape)} differ in shape")
    if values.ndim == 1:
        values, present = values.expand(batch_size, -1), present.expand(batch_size, -1)
    if values.shape[0] != batch_size:
        raise ValueError(f"covariates are given for {counted(values.shape[0], 'sample')} but the batch has "
                         f"{batch_size}")
    return values.to(device, torch.float32), present.to(device, torch.bool)


def sample_latents(
    velocity_net: nn.Module,
    shape: Sequence[int],
    covariates: tuple[torch.Tensor, torch.Tensor] | None = None,
    solver: str = "heun",
    steps: int = 32,
    guidance: float = 1.0,
    seed: int = 0,
    device: torch.device | str = "cpu",
    first_index: int = 0,
    time_shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    sample_seeds: Sequence[int] | None = None,
    path: LinearPath | None = None,
) -> tuple[torch.Tensor, int]:
    """Latents (B, C, D, H, W) at the data end of `path` (a LinearPath when None) and the NFE per sample.

    shape is (B, C, D, H, W); covariates is (values, present), each (K,) or (B, K), or
    None for all absent; `velocity_net` must already be on `device`. `sample_seeds`
    (one per sample, from `sample_seed`) replaces `seed` and `first_index`. NFE counts
    right-hand-side evaluations; with guidance ≠ 1 each is one batched forward of
    2B. dopri5 integrates each sample on its own, so its adaptive steps do not depend
    on the rest of the batch; its NFE is then the largest over the batch.
    """
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {solver!r}")
    path = path or LinearPath()  # its network predicts the velocity, which is what the solvers integrate
    batch_size = shape[0]
    generators = batch_generators(seed, first_index, batch_size, sample_seeds)
    x_init = per_sample_normal(generators, shape[1:]).to(device)  # (B, C, D, H, W)
    values, present = broadcast_covariates(covariates, batch_size, device)
    with evaluating(velocity_net):
        if solver != "dopri5":
            predict = guided_prediction(velocity_net, values, present, guidance)
            t_steps = path.time_grid(steps, time_shift, dtype=x_init.dtype)
            return integrate(predict, x_init, solver, path, t_steps, rtol, atol)
        latents, nfes = [], []
        for i in range(batch_size):
            one = slice(i, i + 1)
            predict = guided_prediction(
                velocity_net, None if values is None else values[one], None if present is None else present[one], guidance
            )
            latent, nfe = integrate(predict, x_init[one], "dopri5", path, None, rtol, atol)
            latents.append(latent)
            nfes.append(nfe)
        return torch.cat(latents), max(nfes)


def integrate(predict, x_init: torch.Tensor, solver: str, path: LinearPath, t_steps: torch.Tensor | None,
              rtol: float, atol: float) -> tuple[torch.Tensor, int]:
    """Integrate the path's ODE from x_init with the network's (guided) `predict(x, t)`; (data end, NFE).

    A velocity is integrated over the whole grid. A data prediction x̂1 gives the velocity (x̂1 − x)/(1 − t), which
    is undefined at t = 1: the solver stops at the grid's last point before 1 (dopri5 at 1 − sigma_floor), and the
    last step is Euler's onto t = 1, which lands on that point's x̂1 (EDM's rule for the step onto σ = 0): one
    evaluation more.
    """
    if path.prediction == "velocity":
        return solve(predict, x_init, solver, t_steps=t_steps, rtol=rtol, atol=atol)
    if path.prediction == "preconditioned":  # its velocity is finite up to t = 1

        def preconditioned(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return path.convert(predict(x, t), x, t, path.prediction, "velocity")

        return solve(preconditioned, x_init, solver, t_steps=t_steps, rtol=rtol, atol=atol)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return path.convert(predict(x, t), x, t, path.prediction, "velocity")

    t_last = t_steps[-2] if t_steps is not None else torch.tensor(1.0 - path.sigma_floor, dtype=x_init.dtype)
    x, nfe = solve(velocity, x_init, solver, t_steps=None if t_steps is None else t_steps[:-1], rtol=rtol, atol=atol,
                   t_end=float(t_last))
    data = path.convert(predict(x, t_last.to(x.device)), x, t_last, path.prediction, "data")
    return data, nfe + 1
