"""Privacy events: immutable records of what a mechanism did, and the checks on their fields.

An accountant turns a history (a tuple of events) into ε; nothing here computes privacy.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

__all__ = ["GaussianStep", "History"]


# Below this σ (but above 0) the accountants overflow: dp_accounting's RDP returned ε = 0 from
# about 1e-152 on. Such noise protects nothing; σ = 0 says so exactly (ε = ∞).
MIN_NOISE_MULTIPLIER = 1e-100


def check_noise_multiplier(value: float, name: str = "noise_multiplier") -> float:
    """σ: a finite float, 0 (no noise, so ε = ∞) or at least 1e-100."""
    value = _real(value, name)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"expected {name} >= 0, got {value!r}")
    if 0 < value < MIN_NOISE_MULTIPLIER:
        raise ValueError(
            f"expected {name} = 0 or >= {MIN_NOISE_MULTIPLIER:g}, got {value!r}: smaller noise "
            "protects nothing and overflows the accountants; pass 0 for no noise"
        )
    return value


def check_sample_rate(value: float, name: str = "sample_rate") -> float:
    """q: the Poisson sampling probability, in (0, 1]."""
    value = _real(value, name)
    if not (0 < value <= 1):
        raise ValueError(f"expected {name} in (0, 1], got {value!r}")
    return value


def check_steps(value: int, name: str = "steps", minimum: int = 0) -> int:
    """A step count: an int (not a bool, not a float) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"expected {name} to be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"expected {name} >= {minimum}, got {value!r}")
    return int(value)


def check_delta(value: float, name: str = "delta") -> float:
    """δ: in (0, 1)."""
    value = _real(value, name)
    if not (0 < value < 1):
        raise ValueError(f"expected {name} in (0, 1), got {value!r}")
    return value


def check_epsilon(value: float, name: str = "target_epsilon") -> float:
    """A target ε: finite and > 0."""
    value = _real(value, name)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected {name} > 0 and finite, got {value!r}")
    return value


def _real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected {name} to be a real number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class GaussianStep:
    """``steps`` rounds of the Poisson-subsampled Gaussian mechanism (one DP-SGD phase).

    Each round includes every example independently with probability ``sample_rate`` and adds
    Gaussian noise of standard deviation ``noise_multiplier`` × sensitivity to the sum.
    Adjacency is add/remove-one.

    >>> GaussianStep(noise_multiplier=1.1, sample_rate=0.004, steps=10)
    GaussianStep(noise_multiplier=1.1, sample_rate=0.004, steps=10)
    >>> GaussianStep(noise_multiplier=-1.0, sample_rate=0.004)
    Traceback (most recent call last):
    ...
    ValueError: expected noise_multiplier >= 0, got -1.0
    """

    noise_multiplier: float
    sample_rate: float
    steps: int = 1

    def __post_init__(self) -> None:
        # Normalise to plain Python numbers so events hash, compare and serialise exactly.
        object.__setattr__(self, "noise_multiplier", check_noise_multiplier(self.noise_multiplier))
        object.__setattr__(self, "sample_rate", check_sample_rate(self.sample_rate))
        object.__setattr__(self, "steps", check_steps(self.steps))

    def same_mechanism(self, other: GaussianStep) -> bool:
        """True when ``other`` runs the same per-step mechanism (only the count may differ)."""
        return (
            self.noise_multiplier == other.noise_multiplier
            and self.sample_rate == other.sample_rate
        )

    def with_steps(self, steps: int) -> GaussianStep:
        """The same mechanism repeated ``steps`` times."""
        return GaussianStep(self.noise_multiplier, self.sample_rate, steps)


History = tuple[GaussianStep, ...]


def append(history: History, event: GaussianStep) -> History:
    """``history`` followed by ``event``, merging it into the last event when the mechanism repeats.

    The ledger and every search over future steps build histories through this one function, so
    a history predicted by a search is identical (and so has the identical ε) to the one recorded.
    """
    if event.steps == 0:
        return history
    if history and history[-1].same_mechanism(event):
        return history[:-1] + (history[-1].with_steps(history[-1].steps + event.steps),)
    return history + (event,)
