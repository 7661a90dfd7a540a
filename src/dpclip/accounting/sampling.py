"""Is a run's count of examples what the ledger's Poisson sampling rate q says it should be?

The ledger charges every step for a Poisson sample at rate q = B / N, but a training loop that
brings its own loader can feed any number of examples per step: a loader batch of 256 under
``batch_size=32`` (or a per-rank batch declared as the global one) trains at 8× the rate the
ledger counts, and its ε is far too small. Under the claim, the examples of ``steps`` steps
are a Binomial(N × steps, q) count; a count whose Chernoff tail bound is below ``1e-12`` is
refused. A run that truly samples at q is refused with probability below that per check.
"""

from __future__ import annotations

import math

IMPLAUSIBLE = 1e-12  # the tail probability below which a count is taken as not sampled at q


def log_tail_bound(count: int, trials: int, rate: float) -> float:
    """log of a Chernoff bound on P(X ≥ count) (``count`` above the mean) or P(X ≤ count)
    (below it) for X ~ Binomial(trials, rate); 0 where the bound says nothing.

    >>> round(log_tail_bound(256, 1000, 0.032), 1)  # a batch of 256 where 32 is expected
    -336.5
    >>> log_tail_bound(32, 1000, 0.032)
    0.0
    """
    if trials <= 0 or not 0 < rate < 1:
        return 0.0
    share = min(max(count / trials, 0.0), 1.0)
    if share == rate:
        return 0.0
    return -trials * _kl(share, rate)


def _kl(a: float, q: float) -> float:
    """Kullback–Leibler divergence between Bernoulli(a) and Bernoulli(q)."""
    total = 0.0
    if a > 0:
        total += a * math.log(a / q)
    if a < 1:
        total += (1 - a) * math.log((1 - a) / (1 - q))
    return max(total, 0.0)


def too_many(count: int, trials: int, rate: float) -> bool:
    """Whether ``count`` examples in ``trials`` Poisson draws at ``rate`` is implausibly many."""
    return count > trials * rate and log_tail_bound(count, trials, rate) < math.log(IMPLAUSIBLE)


def too_few(count: int, trials: int, rate: float) -> bool:
    """Whether ``count`` is implausibly few (the ledger then overstates ε: no privacy risk)."""
    return count < trials * rate and log_tail_bound(count, trials, rate) < math.log(IMPLAUSIBLE)
