"""Validated settings: privacy settings apart from performance settings.

>>> PrivacyConfig(sample_size=1000, batch_size=100, steps=10, noise_multiplier=-1.0)
Traceback (most recent call last):
...
ValueError: expected noise_multiplier >= 0, got -1.0
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from dpclip import accounting
from dpclip.accounting import ACCOUNTANTS
from dpclip.clipping import CLIPPING_FUNCTIONS, NEEDS_GAMMA, STYLES
from dpclip.layers import STRATEGIES

REDUCTIONS = ("mean", "sum")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class PrivacyConfig:
    """What determines the privacy guarantee: sampling, noise, clipping, and the plan.

    Exactly one of ``epochs``/``steps`` and one of ``noise_multiplier``/``target_epsilon``.
    """

    sample_size: int
    batch_size: int
    epochs: float | None = None
    steps: int | None = None
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    target_delta: float | None = None
    accountant: str = "pld"
    clipping: str = "automatic"
    clip_norm: float = 1.0
    gamma: float = 0.01
    clipping_style: str | Sequence = field(default="all-layer", compare=False)
    loss_reduction: str = "mean"

    def __post_init__(self) -> None:
        _require(
            isinstance(self.sample_size, int) and self.sample_size >= 1,
            f"expected sample_size >= 1 (an int), got {self.sample_size!r}",
        )
        _require(
            isinstance(self.batch_size, int) and 1 <= self.batch_size <= self.sample_size,
            f"expected 1 <= batch_size <= sample_size ({self.sample_size}), got {self.batch_size!r}",
        )
        _require(
            (self.epochs is None) != (self.steps is None),
            "pass exactly one of epochs= and steps=",
        )
        if self.epochs is not None:
            _require(
                self.epochs > 0 and math.isfinite(self.epochs),
                f"expected epochs > 0, got {self.epochs}",
            )
        if self.steps is not None:
            _require(
                isinstance(self.steps, int) and self.steps >= 1,
                f"expected steps >= 1, got {self.steps!r}",
            )
        _require(
            (self.noise_multiplier is None) != (self.target_epsilon is None),
            "pass exactly one of noise_multiplier= and target_epsilon=",
        )
        if self.noise_multiplier is not None:
            _require(
                self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier),
                f"expected noise_multiplier >= 0, got {self.noise_multiplier}",
            )
            accounting.events.check_noise_multiplier(self.noise_multiplier)  # not below 1e-100
        if self.target_epsilon is not None:
            _require(
                self.target_epsilon > 0, f"expected target_epsilon > 0, got {self.target_epsilon}"
            )
        if self.target_delta is not None:
            _require(
                0 < self.target_delta < 1, f"expected 0 < target_delta < 1, got {self.target_delta}"
            )
            _require(
                self.target_delta < 1 / self.sample_size,
                f"target_delta={self.target_delta:g} is not below 1/sample_size = "
                f"{1 / self.sample_size:.3g}: a mechanism that publishes one random example in "
                "the clear meets such a δ, so it promises no privacy; use δ well below 1/N (the "
                "default, target_delta=None, is at most 1/(10 N))",
            )
        _require(
            self.accountant in ACCOUNTANTS,
            f"unknown accountant {self.accountant!r}; expected one of {list(ACCOUNTANTS)}",
        )
        _require(
            self.clipping in CLIPPING_FUNCTIONS,
            f"unknown clipping {self.clipping!r}; expected one of {sorted(CLIPPING_FUNCTIONS)}",
        )
        _require(
            self.clip_norm > 0 and math.isfinite(self.clip_norm),
            f"expected clip_norm > 0, got {self.clip_norm}",
        )
        if self.clipping in NEEDS_GAMMA:
            _require(
                self.gamma > 0 and math.isfinite(self.gamma),
                f"expected gamma > 0, got {self.gamma}",
            )
        if isinstance(self.clipping_style, str):
            _require(
                self.clipping_style in STYLES,
                f"unknown clipping_style {self.clipping_style!r}; expected one of {list(STYLES)} "
                "or a list of parameter groups",
            )
        _require(
            self.loss_reduction in REDUCTIONS,
            f"unknown loss_reduction {self.loss_reduction!r}; expected one of {list(REDUCTIONS)}",
        )

    @property
    def sample_rate(self) -> float:
        return self.batch_size / self.sample_size

    @property
    def steps_per_epoch(self) -> int:
        """Logical batches per pass over the data, as engine.data_loader yields them."""
        return accounting.steps_per_epoch(self.sample_rate)

    @property
    def planned_steps(self) -> int:
        if self.steps is not None:
            return self.steps
        return accounting.steps_for_epochs(self.epochs, self.sample_rate)


@dataclass(frozen=True)
class PerformanceConfig:
    """How the engine computes; never changes the privacy guarantee."""

    norm_strategy: str = "mixed"
    max_physical_batch_size: int | None = None

    def __post_init__(self) -> None:
        _require(
            self.norm_strategy in STRATEGIES,
            f"unknown norm_strategy {self.norm_strategy!r}; expected one of {list(STRATEGIES)}",
        )
        if self.max_physical_batch_size is not None:
            _require(
                self.max_physical_batch_size >= 1,
                f"expected max_physical_batch_size >= 1, got {self.max_physical_batch_size}",
            )
