"""Searches over the accountants: the noise for a target ε, and the steps a budget still allows.

Both treat the accountant as a black box that is (up to its discretization) monotone: ε falls as
σ grows and rises with the number of steps. Each search returns a point it has *evaluated* to be
within the budget, so the answer never overshoots, whatever the accountant's small wiggles.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from dpclip.accounting.accountants import check_accountant, epsilon, gdp_delta, gdp_mu
from dpclip.accounting.events import (
    GaussianStep,
    History,
    append,
    check_delta,
    check_epsilon,
)

__all__ = ["calibrate_noise_multiplier", "max_additional_steps"]

_LOG_SIGMA_RANGE = (math.log(1e-3), math.log(1e6))
_MAX_STEPS = 10**15


def calibrate_noise_multiplier(
    make_history: Callable[[float], GaussianStep | History],
    *,
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
    rtol: float = 0.01,
) -> float:
    """The σ whose history has ε in [(1 − rtol)·target_epsilon, target_epsilon].

    ``make_history(σ)`` builds the event (or history of events) the training run will record for
    noise multiplier σ. The search runs in (log σ, log ε), where ε is nearly a power law in σ:
    a GDP estimate to start, then safeguarded false position; a handful of accountant calls.

    Raises:
        ValueError: on bad arguments, or when no σ in [1e-3, 1e6] reaches the target.
    """
    target = check_epsilon(target_epsilon)
    delta = check_delta(delta)
    check_accountant(accountant)
    if not 0 < rtol < 1:
        raise ValueError(f"expected rtol in (0, 1), got {rtol!r}")

    def history_at(log_sigma: float) -> History:
        made = make_history(math.exp(log_sigma))
        return (made,) if isinstance(made, GaussianStep) else tuple(made)

    def eps(log_sigma: float) -> float:
        return epsilon(history_at(log_sigma), delta, accountant)

    low_target, aim = (1 - rtol) * target, (1 - rtol / 2) * target
    start = _gdp_guess(history_at, target, delta)
    feasible: tuple[float, float] | None = None  # (log σ, ε) with ε <= target: σ too large or right
    infeasible: tuple[float, float] | None = None  # (log σ, ε) with ε > target: σ too small
    s, last_side = start, 0
    for _ in range(100):
        e = eps(s)
        if low_target <= e <= target:
            return math.exp(s)
        if e > target:
            infeasible, side = (s, e), -1
        else:
            feasible, side = (s, e), 1
        s = _next_log_sigma(feasible, infeasible, aim, stuck=side == last_side)
        last_side = side
        if not _LOG_SIGMA_RANGE[0] <= s <= _LOG_SIGMA_RANGE[1]:
            raise ValueError(
                f"no noise multiplier in [1e-3, 1e6] gives epsilon={target:g} at delta={delta:g} "
                f"with the {accountant} accountant"
            )
        if feasible and infeasible and feasible[0] - infeasible[0] < 1e-12:
            break
    if feasible is None:  # pragma: no cover - the loop always finds a feasible σ first
        raise RuntimeError("noise calibration failed to find a feasible noise multiplier")
    return math.exp(feasible[0])  # ε jumps over the window: take the safe side


def _next_log_sigma(
    feasible: tuple[float, float] | None,
    infeasible: tuple[float, float] | None,
    aim: float,
    *,
    stuck: bool,
) -> float:
    """Next log σ: extrapolate to find a bracket, then false position (bisect when stuck)."""
    if infeasible is None:  # every σ so far is too large: ε below the window
        s, e = feasible
        return s - (1.0 if e == 0 else max(0.05, math.log(aim / e)))
    if feasible is None:  # every σ so far is too small
        s, e = infeasible
        return s + (1.0 if math.isinf(e) else max(0.05, math.log(e / aim)))
    (s_f, e_f), (s_i, e_i) = feasible, infeasible
    if stuck or e_f == 0 or math.isinf(e_i):
        return (s_f + s_i) / 2
    t = (math.log(e_i) - math.log(aim)) / (math.log(e_i) - math.log(e_f))
    return s_i + min(max(t, 0.05), 0.95) * (s_f - s_i)


def _gdp_guess(history_at: Callable[[float], History], target: float, delta: float) -> float:
    """log σ at which the (cheap, closed-form) GDP approximation reaches the target."""
    mu_star = _gdp_mu_for(target, delta)

    def gap(log_sigma: float) -> float:
        return math.log(max(gdp_mu(history_at(log_sigma)), 1e-300)) - math.log(mu_star)

    lo, hi = _LOG_SIGMA_RANGE
    if gap(lo) <= 0 or gap(hi) >= 0:
        return 0.0
    from scipy import optimize  # imported where used: it costs a second to load

    return optimize.brentq(gap, lo, hi, xtol=1e-6)


def _gdp_mu_for(target: float, delta: float) -> float:
    """The μ whose μ-GDP curve passes through (target, delta)."""
    hi = 1.0
    while gdp_delta(hi, target) < delta:
        hi *= 2
    from scipy import optimize

    return optimize.brentq(lambda mu: gdp_delta(mu, target) - delta, 1e-12, hi, xtol=1e-14)


def max_additional_steps(
    history: History,
    step: GaussianStep,
    *,
    target_epsilon: float,
    delta: float,
    accountant: str = "pld",
) -> int:
    """The largest k >= 0 such that ``history`` followed by k rounds of ``step`` has ε <= target.

    Returns 0 when even the history alone exceeds the target. The answer k is the boundary as
    the accountant computes it: k rounds were evaluated within the target and k + 1 beyond it
    (or k is 10**15, the cap).
    """
    target = check_epsilon(target_epsilon)
    delta = check_delta(delta)
    check_accountant(accountant)
    one = step.with_steps(1)

    def eps(k: int) -> float:
        return epsilon(append(history, one.with_steps(k)), delta, accountant)

    lo, e_lo = 0, eps(0)
    if e_lo > target or one.noise_multiplier == 0:
        return 0
    k = min(max(1, _gdp_steps_guess(history, one, target, delta)), _MAX_STEPS)
    while True:  # grow until a k beyond the budget brackets the boundary
        e = eps(k)
        if e > target:
            hi, e_hi = k, e
            break
        lo, e_lo = k, e
        if k >= _MAX_STEPS:
            return _MAX_STEPS
        growth = 4.0 if e == 0 else min(4.0, (target / e) ** 2)
        k = min(_MAX_STEPS, max(k + 1, math.ceil(k * growth), k + math.ceil(0.01 * k)))
    while hi - lo > 1:  # interpolate, then probe the neighbour on the other side of the guess
        if math.isinf(e_hi):
            k = (lo + hi) // 2
        else:
            k = lo + math.floor((target - e_lo) * (hi - lo) / (e_hi - e_lo))
        k = min(max(k, lo + 1), hi - 1)
        e = eps(k)
        if e <= target:
            lo, e_lo = k, e
            probe = k + 1
        else:
            hi, e_hi = k, e
            probe = k - 1
        if lo < probe < hi:
            e = eps(probe)
            if e <= target:
                lo, e_lo = probe, e
            else:
                hi, e_hi = probe, e
    return lo


def _gdp_steps_guess(history: History, one: GaussianStep, target: float, delta: float) -> int:
    """How many more steps the GDP approximation allows (only a starting point for the search)."""
    per_step = gdp_mu((one,)) ** 2
    room = _gdp_mu_for(target, delta) ** 2 - gdp_mu(history) ** 2
    if not math.isfinite(per_step) or per_step == 0 or room <= 0:
        return 1
    return int(min(room / per_step, _MAX_STEPS))
