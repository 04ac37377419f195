"""ODE solvers for dx/dt = v(x, t) on a time grid t_steps (see mriflow.flow.path for the convention).

Every solver takes `velocity(x, t)` with x (B, ...) and t a 0-dim tensor, and returns
(final state, NFE), NFE being the number of calls to `velocity`.

    >>> x1, nfe = solve(velocity, x0, "heun", num_steps=16)      # 32 evaluations
    >>> x1, nfe = solve(velocity, x0, "dopri5", rtol=1e-5, atol=1e-5)
"""

from __future__ import annotations

from typing import Callable

import torch

from mriflow.flow.path import time_grid

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FIXED_STEP_SOLVERS = ("euler", "heun", "midpoint", "rk4")
SOLVERS = FIXED_STEP_SOLVERS + ("dopri5",)


def euler(velocity: Velocity, x_init: torch.Tensor, t_steps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x_{n+1} = x_n + h·v(x_n, t_n); global error O(h)."""
    x_next = x_init
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x_cur = x_next
        d_cur = velocity(x_cur, t_cur)
        x_next = x_cur + (t_next - t_cur) * d_cur
    return x_next, len(t_steps) - 1


def heun(velocity: Velocity, x_init: torch.Tensor, t_steps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Euler step, then the trapezoid correction x_{n+1} = x_n + h·(d_cur + d_prime)/2; O(h²)."""
    x_next = x_init
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x_cur = x_next
        h = t_next - t_cur
        d_cur = velocity(x_cur, t_cur)
        x_next = x_cur + h * d_cur  # Euler step
        d_prime = velocity(x_next, t_next)
        x_next = x_cur + h * (0.5 * d_cur + 0.5 * d_prime)  # Apply 2nd order correction
    return x_next, 2 * (len(t_steps) - 1)


def midpoint(velocity: Velocity, x_init: torch.Tensor, t_steps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x_{n+1} = x_n + h·v(x_n + (h/2)·v(x_n, t_n), t_n + h/2); O(h²)."""
    x_next = x_init
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x_cur = x_next
        h = t_next - t_cur
        d_cur = velocity(x_cur, t_cur)
        d_mid = velocity(x_cur + 0.5 * h * d_cur, t_cur + 0.5 * h)
        x_next = x_cur + h * d_mid
    return x_next, 2 * (len(t_steps) - 1)


def rk4(velocity: Velocity, x_init: torch.Tensor, t_steps: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Classical Runge–Kutta: x_{n+1} = x_n + h·(k1 + 2·k2 + 2·k3 + k4)/6; O(h⁴)."""
    x_next = x_init
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x_cur = x_next
        h = t_next - t_cur
        k1 = velocity(x_cur, t_cur)
        k2 = velocity(x_cur + 0.5 * h * k1, t_cur + 0.5 * h)
        k3 = velocity(x_cur + 0.5 * h * k2, t_cur + 0.5 * h)
        k4 = velocity(x_cur + h * k3, t_next)
        x_next = x_cur + h * (k1 + 2 * k2 + 2 * k3 + k4) / 6
    return x_next, 4 * (len(t_steps) - 1)


def dopri5(
    velocity: Velocity, x_init: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-5, t_start: float = 0.0, t_end: float = 1.0
) -> tuple[torch.Tensor, int]:
    """Adaptive Dormand–Prince 5(4) from torchdiffeq; steps until the local error is within atol + rtol·|x|."""
    from torchdiffeq import odeint  # here: it imports scipy.integrate, half a second that only dopri5 needs

    nfe = 0

    def func(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        nonlocal nfe
        nfe += 1
        return velocity(x, t)

    t_span = torch.tensor([t_start, t_end], dtype=x_init.dtype, device=x_init.device)
    x_path = odeint(func, x_init, t_span, rtol=rtol, atol=atol, method="dopri5")  # (2, B, ...)
    return x_path[-1], nfe


FIXED_STEP = {"euler": euler, "heun": heun, "midpoint": midpoint, "rk4": rk4}


def solve(
    velocity: Velocity,
    x_init: torch.Tensor,
    method: str = "heun",
    num_steps: int = 32,
    t_steps: torch.Tensor | None = None,
    time_shift: float = 1.0,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    t_end: float = 1.0,
) -> tuple[torch.Tensor, int]:
    """Integrate over [0, 1] with `method`; fixed-step methods use `t_steps`, or
    `time_grid(num_steps, time_shift)` when it is None; dopri5 integrates over [0, t_end]. Returns (final x, NFE)."""
    if method == "dopri5":
        return dopri5(velocity, x_init, rtol=rtol, atol=atol, t_end=t_end)
    if method not in FIXED_STEP:
        raise ValueError(f"solver must be one of {', '.join(SOLVERS)}; got {method!r}")
    if t_steps is None:
        t_steps = time_grid(num_steps, time_shift, dtype=x_init.dtype)
    return FIXED_STEP[method](velocity, x_init, t_steps.to(x_init.device))
