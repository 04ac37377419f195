import math

import numpy as np
import pytest
import torch

from mriflow.flow.solvers import dopri5, solve

ORDERS = {"euler": 1, "heun": 2, "midpoint": 2, "rk4": 4}
STEP_COUNTS = {"euler": [16, 32, 64, 128], "heun": [16, 32, 64, 128], "midpoint": [16, 32, 64, 128], "rk4": [4, 8, 16, 32]}


def velocity(x, t):
    """dx/dt = x·cos(t): non-autonomous, so a solver that evaluates t in the wrong place loses order."""
    return x * torch.cos(t)


X_INIT = torch.tensor([[1.0, -0.5]], dtype=torch.float64)
X_EXACT = X_INIT * math.exp(math.sin(1.0))  # x(1) = x(0)·exp(sin 1)


@pytest.mark.parametrize("method", list(ORDERS))
def test_fixed_step_solvers_reach_their_order(method):
    steps = STEP_COUNTS[method]
    errors = [(solve(velocity, X_INIT, method, n)[0] - X_EXACT).abs().max().item() for n in steps]
    slope = np.polyfit(np.log([1 / n for n in steps]), np.log(errors), 1)[0]
    assert abs(slope - ORDERS[method]) <= 0.3, f"{method}: error ∝ h^{slope:.2f}, expected h^{ORDERS[method]}"


@pytest.mark.parametrize("method,stages", [("euler", 1), ("heun", 2), ("midpoint", 2), ("rk4", 4)])
def test_fixed_step_nfe_counts_the_calls(method, stages):
    calls = 0

    def counted(x, t):
        nonlocal calls
        calls += 1
        return velocity(x, t)

    _, nfe = solve(counted, X_INIT, method, num_steps=5)
    assert nfe == calls == 5 * stages


def test_dopri5_reaches_its_tolerance_and_reports_nfe():
    calls = 0

    def counted(x, t):
        nonlocal calls
        calls += 1
        return velocity(x, t)

    loose, nfe_loose = dopri5(counted, X_INIT, rtol=1e-4, atol=1e-4)
    assert nfe_loose == calls > 0
    tight, nfe_tight = solve(velocity, X_INIT, "dopri5", rtol=1e-9, atol=1e-9)
    assert (tight - X_EXACT).abs().max() < 1e-7
    assert (loose - X_EXACT).abs().max() < 1e-3
    assert nfe_tight > nfe_loose


def test_a_shifted_grid_still_integrates_from_0_to_1():
    x_final, _ = solve(velocity, X_INIT, "rk4", num_steps=16, time_shift=3.0)
    assert (x_final - X_EXACT).abs().max() < 1e-4


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="dopri5"):
        solve(velocity, X_INIT, "leapfrog", 4)
