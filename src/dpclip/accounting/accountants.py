"""Accountants: a history of :class:`GaussianStep` events and δ in, ε out.

Three accountants, chosen by name in one place (``_REGISTRY``; the names are :data:`ACCOUNTANTS`):

``"pld"`` (default)
    Privacy loss distributions (dp_accounting's PLDs, connect-the-dots discretization, pessimistic
    rounding, composed by repeated squaring). Tight: the result is an upper bound on the true ε
    of the history, and the discretization is chosen per history so that it exceeds the exact ε
    by about 0.1 % at most (see :func:`pld_discretization` for the extremes where it may not).
``"rdp"``
    Rényi DP (dp_accounting's ``RdpAccountant`` with its standard orders, and its conversion to
    (ε, δ)). A valid upper bound; typically 5-20 % above ``"pld"``.
``"gdp"``
    Gaussian DP through the central limit theorem (Bu, Dong, Long, Su 2020, eq. for Poisson
    sampling): μ = q·sqrt(T·(exp(1/σ²) − 1)), composed over phases as sqrt(Σ μᵢ²), then ε from the
    exact (ε, δ) curve of μ-GDP. **An approximation, not a bound**: it is the limit T → ∞ with
    q·sqrt(T) fixed, and it can understate ε badly for few steps (σ = 0.65, q = 0.01, 100 steps,
    δ = 1e-5: 1.18 against 2.99 from ``"pld"``). Use it to compare with papers that report it (the
    automatic-clipping paper does), never as the guarantee you publish.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from dpclip.accounting.events import GaussianStep, History, check_delta

if TYPE_CHECKING:  # dp_accounting and scipy are imported where used: they cost ~1.5 s to load
    import dp_accounting
    from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

__all__ = ["ACCOUNTANTS", "check_accountant", "epsilon", "gdp_delta", "gdp_mu"]

# The tail mass dp_accounting's PLDs leave out of each Gaussian step (its default).
_LOG_MASS_TRUNCATION = -50.0


def epsilon(history: History, delta: float, accountant: str = "pld") -> float:
    """ε of a history at ``delta`` under ``accountant`` (∞ if any step added no noise, and for
    ``"pld"`` if σ is below about 2e-4, too little for its grids: ε would be in the millions)."""
    compute = _REGISTRY[check_accountant(accountant)]
    delta = check_delta(delta)
    history = tuple(event for event in history if event.steps > 0)
    if not history:
        return 0.0
    if any(event.noise_multiplier == 0 for event in history):
        return math.inf
    return _cached(compute, history, delta)


@functools.lru_cache(maxsize=4096)
def _cached(compute: Callable[[History, float], float], history: History, delta: float) -> float:
    return float(compute(history, delta))


def check_accountant(name: str) -> str:
    """The accountant's name, if it is one of :data:`ACCOUNTANTS`."""
    if name not in _REGISTRY:
        raise ValueError(f"expected accountant in {tuple(ACCOUNTANTS)}, got {name!r}")
    return name


def _dp_event(history: History) -> dp_accounting.DpEvent:
    import dp_accounting

    return dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e.sample_rate, dp_accounting.GaussianDpEvent(e.noise_multiplier)
                ),
                e.steps,
            )
            for e in history
        ]
    )


# --------------------------------------------------------------------------------------- RDP
def _rdp_epsilon(history: History, delta: float) -> float:
    """RDP composes by addition: the history's curve is Σ steps · (one step's curve), and only
    the one-step curves cost anything (~0.1 s each), so they are computed once per mechanism."""
    from dp_accounting.rdp import rdp_privacy_accountant

    curve = sum(e.steps * _rdp_one_step(e.noise_multiplier, e.sample_rate) for e in history)
    return rdp_privacy_accountant.compute_epsilon(_rdp_orders(), curve, delta)[0]


@functools.lru_cache(maxsize=256)
def _rdp_one_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """The RDP curve of one Poisson-subsampled Gaussian step, at dp_accounting's default orders."""
    from dp_accounting.rdp import rdp_privacy_accountant

    accountant = rdp_privacy_accountant.RdpAccountant(_rdp_orders())
    accountant.compose(_dp_event((GaussianStep(noise_multiplier, sample_rate, 1),)))
    base = np.array(accountant.rdp, dtype=float)
    base.flags.writeable = False
    return base[:]  # a view of a read-only base: the cached curve can never be written to


def _rdp_orders() -> tuple[float, ...]:
    from dp_accounting.rdp import rdp_privacy_accountant

    return tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)


# --------------------------------------------------------------------------------------- PLD
# Most points on one composed PLD grid: about 60 MB per array, a few of them inside each FFT.
_MAX_GRID_POINTS = 4_000_000
# Coarsest interval dp_accounting's connect-the-dots rounding computes reliably (it overflows in
# exp(interval) near 709); a history that needs a coarser one gets ε = ∞.
_MAX_INTERVAL = 500.0


def pld_discretization(history: History) -> float:
    """The PLD value-discretization interval used for ``history``.

    Rule: one tenth of the smallest per-step GDP scale μ₁ = q·sqrt(exp(1/σ²) − 1) among the
    history's events, at most 1e-2, but no finer than 1/200,000 of the widest single-step
    privacy-loss range, nor than 1/4,000,000 of the estimated width of the composed distribution.

    Why: a step's privacy loss has spread about μ₁, and the connect-the-dots rounding error in ε
    grows like (interval / μ₁)², almost independently of σ, q and the number of steps (measured:
    about 0.4 % at μ₁/5, 0.1 % at μ₁/10). The cost grows like (loss range) / interval, so the
    two lower bounds keep the grids within memory and one evaluation within seconds: the first
    for q ≤ 1e-4 with σ < 1 or for σ ≪ 1 (whose one-step loss range is about 1/σ²), the second
    for very long runs (beyond about 5·10⁸ steps) or huge ε. Where they bind, ε may exceed the
    exact value by more than 0.1 %. Any interval gives a valid upper bound (pessimistic
    rounding); the rule only trades tightness for time.
    """
    scale = min(gdp_mu((event.with_steps(1),)) for event in history)
    span = max(_single_step_loss_span(e.noise_multiplier, e.sample_rate) for e in history)
    width = sum(_composed_loss_width(e) for e in history)
    fine = max(min(0.1 * scale, 1e-2), span / 200_000, 1e-12)
    return max(fine, width / _MAX_GRID_POINTS)


@functools.lru_cache(maxsize=256)
def _single_step_loss_span(noise_multiplier: float, sample_rate: float) -> float:
    """Width of the privacy-loss grid dp_accounting builds for one step (both adjacencies)."""
    from dp_accounting.pld.privacy_loss_mechanism import AdjacencyType, GaussianPrivacyLoss

    span = 0.0
    for adjacency in (AdjacencyType.ADD, AdjacencyType.REMOVE):
        bounds = GaussianPrivacyLoss(
            noise_multiplier,
            sampling_prob=sample_rate,
            adjacency_type=adjacency,
            log_mass_truncation_bound=_LOG_MASS_TRUNCATION,
        ).connect_dots_bounds()
        span += bounds.epsilon_upper - bounds.epsilon_lower
    return span


def _composed_loss_width(event: GaussianStep) -> float:
    """Estimated width of the composed privacy-loss distribution that holds all but 1e-15 of its
    mass: 16 standard deviations and one step's range (it only sizes the grid; the drift of the
    mean moves the grid, it does not widen it)."""
    std = _loss_std(event.noise_multiplier, event.sample_rate)
    span = _single_step_loss_span(event.noise_multiplier, event.sample_rate)
    return 16 * math.sqrt(event.steps) * std + span


@functools.lru_cache(maxsize=256)
def _loss_std(noise_multiplier: float, sample_rate: float) -> float:
    """Standard deviation of one step's privacy loss, the larger of the two adjacencies, by
    Gauss-Hermite quadrature over the noise."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(64)
    weights = weights / weights.sum()
    sigma, q = noise_multiplier, sample_rate
    noise = sigma * nodes

    def loss(x: np.ndarray) -> np.ndarray:  # log of ((1 − q)·N(0, σ²) + q·N(1, σ²)) / N(0, σ²)
        return np.logaddexp(np.log1p(-q), math.log(q) + (2 * x - 1) / (2 * sigma**2))

    with np.errstate(all="ignore"):  # q = 1 (log 0) and tiny σ (∞, giving an ∞ width) are fine
        remove = (np.concatenate([loss(noise), loss(1 + noise)]),
                  np.concatenate([(1 - q) * weights, q * weights]))  # fmt: skip
        add = (-loss(noise), weights)
        variances = [np.dot(w, (v - np.dot(w, v)) ** 2) for v, w in (remove, add)]
    return math.sqrt(max(variances))


def _pld_epsilon(history: History, delta: float) -> float:
    """ε, or ∞ (a valid, if useless, bound) when the privacy loss spreads too widely for any grid:
    σ below about 2e-4, or σ ≪ 1 over very many steps, where ε is in the millions if finite."""
    interval = pld_discretization(history)
    if not interval <= _MAX_INTERVAL:
        return math.inf
    return _pld_epsilon_at(history, delta, interval)


def _pld_epsilon_at(history: History, delta: float, interval: float) -> float:
    from dp_accounting.pld import privacy_loss_distribution

    composed = None
    for e in history:
        one = privacy_loss_distribution.from_gaussian_mechanism(
            e.noise_multiplier,
            sampling_prob=e.sample_rate,
            value_discretization_interval=interval,
            log_mass_truncation_bound=_LOG_MASS_TRUNCATION,
        )
        phase = _self_compose(one, e.steps)
        composed = phase if composed is None else composed.compose(phase)
    return max(0.0, composed.get_epsilon_for_delta(delta))


def _self_compose(pld: PrivacyLossDistribution, times: int) -> PrivacyLossDistribution:
    """``pld`` composed with itself ``times`` times.

    Up to 10⁵ times by dp_accounting's ``self_compose`` (one FFT power, the fastest there), beyond
    by repeated squaring: each composition drops tails of at most 1e-15 mass, pessimistically (to
    ε = ∞), so the grid stays as wide as the distribution. dp_accounting sizes its grid by a
    Chernoff bound that grows with ``times``, and for a grid of at most 1000 points first computes
    an integer of ``times`` digits: 10⁷ steps took minutes.
    """
    if times <= 100_000:
        return pld.self_compose(times)
    result = None
    while True:
        if times & 1:
            result = pld if result is None else result.compose(pld)
        times >>= 1
        if not times:
            return result
        pld = pld.compose(pld)


# --------------------------------------------------------------------------------------- GDP
def gdp_mu(history: History) -> float:
    """μ of the CLT approximation: sqrt(Σ qᵢ²·Tᵢ·(exp(1/σᵢ²) − 1)) (∞ if σ = 0)."""
    total = 0.0
    for e in history:
        if e.steps == 0:
            continue
        if e.noise_multiplier == 0:
            return math.inf
        with np.errstate(over="ignore"):
            total += e.sample_rate**2 * e.steps * float(np.expm1(e.noise_multiplier**-2.0))
    return math.sqrt(total)


def gdp_delta(mu: float, eps: float) -> float:
    """The exact δ(ε) of μ-GDP: Φ(−ε/μ + μ/2) − e^ε Φ(−ε/μ − μ/2) (Dong, Roth, Su 2019, Cor. 2.13)."""
    from scipy import special

    if mu == 0:
        return 0.0
    first = special.log_ndtr(-eps / mu + mu / 2)
    second = eps + special.log_ndtr(-eps / mu - mu / 2)
    # Difference of two exponentials, computed without overflow: e^a − e^b = e^a·(1 − e^(b−a)).
    return float(math.exp(first) * -math.expm1(min(second - first, 0.0)))


def _gdp_epsilon(history: History, delta: float) -> float:
    from scipy import optimize

    mu = gdp_mu(history)
    if not math.isfinite(mu):
        return math.inf
    if gdp_delta(mu, 0.0) <= delta:
        return 0.0
    upper = 1.0
    while gdp_delta(mu, upper) > delta:
        upper *= 2
    return optimize.brentq(lambda e: gdp_delta(mu, e) - delta, 0.0, upper, xtol=1e-12, rtol=1e-14)


_REGISTRY: dict[str, Callable[[History, float], float]] = {
    "pld": _pld_epsilon,
    "rdp": _rdp_epsilon,
    "gdp": _gdp_epsilon,
}
ACCOUNTANTS: tuple[str, ...] = tuple(_REGISTRY)
