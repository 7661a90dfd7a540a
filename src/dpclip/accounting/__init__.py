"""Privacy accounting for DP-SGD with Poisson sampling: ε from σ, σ from ε, and a ledger.

Pure math on top of Google's ``dp_accounting``; imports no torch. Adjacency is add/remove-one
throughout. Accountants (see :mod:`dpclip.accounting.accountants`): ``"pld"`` (tight, default),
``"rdp"`` (Rényi DP), ``"gdp"`` (CLT approximation of Gaussian DP; *not* an upper bound).

>>> from dpclip import accounting
>>> eps = accounting.get_epsilon(noise_multiplier=1.1, sample_rate=0.004, steps=10_000,
...                              delta=1e-5)
>>> round(eps, 2)
1.84
>>> sigma = accounting.get_noise_multiplier(target_epsilon=eps, delta=1e-5, sample_rate=0.004,
...                                         steps=10_000)
>>> 0.99 * eps <= accounting.get_epsilon(noise_multiplier=sigma, sample_rate=0.004,
...                                      steps=10_000, delta=1e-5) <= eps
True
"""

from __future__ import annotations

import math

from dpclip.accounting.accountants import ACCOUNTANTS, check_accountant, epsilon
from dpclip.accounting.calibration import calibrate_noise_multiplier
from dpclip.accounting.events import (
    GaussianStep,
    check_delta,
    check_epsilon,
    check_sample_rate,
    check_steps,
)
from dpclip.accounting.ledger import PrivacyBudgetExceeded, PrivacyLedger

__all__ = [
    "ACCOUNTANTS",
    "GaussianStep",
    "PrivacyBudgetExceeded",
    "PrivacyLedger",
    "calibrate_noise_multiplier",
    "default_delta",
    "get_epsilon",
    "get_noise_multiplier",
    "steps_for_epochs",
    "steps_per_epoch",
]


def get_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "pld",
) -> float:
    """ε after ``steps`` rounds of the Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: σ, the noise std divided by the sensitivity; 0 gives ε = ∞.
        sample_rate: q in (0, 1], the probability each example joins a batch.
        steps: number of rounds (0 gives ε = 0).
        delta: δ in (0, 1).
        accountant: ``"pld"``, ``"rdp"`` or ``"gdp"``.

    Raises:
        ValueError: on an out-of-range argument, naming it and the value.
    """
    event = GaussianStep(noise_multiplier, sample_rate, steps)
    return epsilon((event,), check_delta(delta), check_accountant(accountant))


def get_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "pld",
) -> float:
    """The σ for which ``steps`` rounds at rate q spend ε in [0.99·target_epsilon, target_epsilon].

    Never over the target: the returned σ was evaluated by :func:`get_epsilon` itself.

    Raises:
        ValueError: on an out-of-range argument (``steps`` must be >= 1 here).
    """
    check_epsilon(target_epsilon)
    check_delta(delta)
    check_accountant(accountant)
    q = check_sample_rate(sample_rate)
    steps = check_steps(steps, minimum=1)
    return calibrate_noise_multiplier(
        lambda sigma: GaussianStep(sigma, q, steps),
        target_epsilon=target_epsilon,
        delta=delta,
        accountant=accountant,
    )


def steps_per_epoch(sample_rate: float) -> int:
    """Logical batches in one epoch under Poisson sampling at rate q: round(1/q), at least 1 (the
    batch size is q·N in expectation, so 1/q batches cover the data once in expectation). The
    engine's data loader yields this many per pass, and every epochs-to-steps plan uses it.

    >>> steps_per_epoch(0.004), steps_per_epoch(256 / 1437), steps_per_epoch(0.3)
    (250, 6, 3)
    """
    q = check_sample_rate(sample_rate)
    return max(1, round(1.0 / q))


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """The steps of ``epochs`` passes: ceil(epochs · steps_per_epoch(q)), float noise ignored.

    The one definition the engine, ``dpclip noise`` and ``dpclip epsilon`` share.

    >>> steps_for_epochs(40, 0.004), steps_for_epochs(30, 256 / 1437), steps_for_epochs(1.5, 0.3)
    (10000, 180, 5)
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or not epochs > 0:
        raise ValueError(f"expected epochs > 0, got {epochs!r}")
    if not math.isfinite(epochs):
        raise ValueError(f"expected a finite number of epochs, got {epochs!r}")
    return max(1, math.ceil(epochs * steps_per_epoch(sample_rate) - 1e-9))


def default_delta(sample_size: int) -> float:
    """The δ used when none is given: the largest power of ten at most 1 / (10·sample_size).

    So δ < 1/N always, with a margin of at least 10× (the usual advice is δ ≪ 1/N, since
    δ ≥ 1/N permits releasing one random example in the clear).

    >>> default_delta(60_000), default_delta(10_000), default_delta(1)
    (1e-06, 1e-05, 0.1)
    """
    n = check_steps(sample_size, "sample_size", minimum=1)
    # 10**-m with m the number of digits of 10·N − 1: exact integer arithmetic, no log10 rounding.
    return float(f"1e-{len(str(10 * n - 1))}")
