"""The ε lower bound of a one-run audit (Steinke, Nasr, Jagielski, NeurIPS 2023); no torch.

m canaries are each put in the training set with probability 1/2. After training, the auditor
scores every canary and guesses "in" for the highest scores and "out" for the lowest, abstaining
on the rest. For an (ε, δ)-DP run, the number of correct guesses W among r guesses satisfies, for
every v (the paper's main theorem with its δ term),

    P[W ≥ v] ≤ P[Bin(r, p) ≥ v] + 2mδ · max_{1≤i≤v} (1/i) · P[v − i ≤ Bin(r, p) < v],

with p = e^ε / (1 + e^ε), the accuracy of ε-DP randomized response. Observing v correct guesses
therefore rules out every ε whose right-hand side is below 1 − confidence; the largest such ε
is the lower bound. It holds with the stated confidence whatever the scores are, so a bound above
the ledger's ε means the training run was not as private as accounted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

# Guess counts tried, as fractions of m; the confidence is split between them (Bonferroni), so
# picking the best one after seeing the scores keeps the bound valid.
GUESS_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_EPSILON_CEILING = 50.0  # no count of guesses from a realistic m certifies more than this


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[at least v of r guesses correct] allowed by (ε, δ)-DP, for m canaries."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"dpclip.audit: expected 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise ValueError(f"dpclip.audit: expected ε >= 0 and δ in [0, 1], got {epsilon}, {delta}")
    if v == 0:
        return 1.0
    p = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, p))  # P[Bin(r, p) ≥ v]
    below = stats.binom.pmf(np.arange(v - 1, -1, -1), r, p)  # P[Bin = v-1], P[Bin = v-2], ...
    window = np.cumsum(below) / np.arange(1, v + 1)  # (1/i) · P[v − i ≤ Bin < v]
    return min(1.0, tail + 2 * m * delta * float(window.max()))


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = 0.95) -> float:
    """The largest ε that v correct guesses out of r rule out at ``confidence``; 0 if none."""
    if not 0 < confidence < 1:
        raise ValueError(f"dpclip.audit: expected confidence in (0, 1), got {confidence}")
    alpha = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) > alpha:
        return 0.0
    lo, hi = 0.0, _EPSILON_CEILING
    if p_value(m, r, v, hi, delta) <= alpha:
        return hi
    for _ in range(60):  # p_value grows with ε: bisect its crossing of alpha
        mid = 0.5 * (lo + hi)
        if p_value(m, r, v, mid, delta) <= alpha:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(frozen=True)
class Bound:
    """The best audit over the guess counts tried: the lower bound and the guesses behind it."""

    epsilon_lower_bound: float
    guesses: int
    correct: int
    canaries: int
    confidence: float


def audit_scores(
    scores: Sequence[float],
    included: Sequence[bool],
    delta: float,
    *,
    confidence: float = 0.95,
    guess_fractions: Sequence[float] = GUESS_FRACTIONS,
) -> Bound:
    """Guess "in" for the top half and "out" for the bottom half of each guess count; the best
    lower bound over the counts, each at confidence 1 − (1 − ``confidence``) / len(counts)."""
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    m = s.size
    if s.shape != (m,) or inc.shape != (m,):
        raise ValueError(
            f"dpclip.audit: expected one score and one inclusion flag per canary, got shapes "
            f"{s.shape} and {inc.shape}"
        )
    if not np.isfinite(s).all():
        raise ValueError("dpclip.audit: a canary's score is not finite; the training diverged")
    counts = guess_counts(m, guess_fractions)
    each = 1.0 - (1.0 - confidence) / len(counts)
    order = np.argsort(-s, kind="stable")  # highest score first
    tried = []
    for k in counts:
        half = k // 2
        correct = int(inc[order[:half]].sum() + (~inc[order[m - half :]]).sum())
        tried.append(
            Bound(epsilon_lower_bound(m, k, correct, delta, each), k, correct, m, confidence)
        )
    best = max(tried, key=lambda b: b.epsilon_lower_bound)  # the first of equals: fewest guesses
    return best if best.epsilon_lower_bound > 0 else tried[-1]  # nothing shown: the most guesses


def guess_counts(m: int, guess_fractions: Sequence[float] = GUESS_FRACTIONS) -> list[int]:
    """The even numbers of guesses tried for m canaries (fixed before seeing any score)."""
    counts = sorted({min(max(2, 2 * round(f * m / 2)), m - m % 2)
                     for f in guess_fractions if f * m >= 2})  # fmt: skip
    if not counts:
        raise ValueError(f"dpclip.audit: need at least 2 canaries, got {m}")
    return counts
