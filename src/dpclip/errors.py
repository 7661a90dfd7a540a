"""Every error dpclip raises for a user's mistake, in one place; each names the fix.

Each keeps the built-in base it had (ValueError for a bad argument or model, RuntimeError for a
training loop used out of order), so ``except ValueError`` code keeps working. This module
imports nothing (``dpclip.accounting``, which imports no torch, uses it too).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "DistributedStepError",
    "DoubleBackwardError",
    "IntegrityError",
    "LoopOrderError",
    "NonFiniteNormError",
    "ParameterUseError",
    "PhysicalBatchTooLarge",
    "PrivacyBudgetExceeded",
    "SampleRateError",
    "SelfCheckError",
    "UnsupportedModuleError",
]


class IntegrityError(ValueError):
    """The clipped units would not be true training examples, so the privacy bound would not hold.

    Raised when a layer call does not carry the model's batch on dim 0, when two forward passes
    reach one backward, or when the self-check finds dpclip's per-example gradient norms differ
    from the naive per-example loop. The message names the module and the fix.
    """


class SelfCheckError(IntegrityError):
    """dpclip's per-example gradients differ from the naive per-example loop: refused."""


class ParameterUseError(IntegrityError, RuntimeError):
    """A managed parameter was used outside its layers: that use would get no gradient."""


class UnsupportedModuleError(ValueError):
    """The model has trainable parameters in modules dpclip has no rule for."""

    def __init__(self, problems: Sequence[object]) -> None:
        self.problems = list(problems)
        lines = "\n  ".join(str(p) for p in self.problems)
        super().__init__(
            f"dpclip cannot clip the per-sample gradients of {len(self.problems)} module(s):\n"
            f"  {lines}"
        )


class NonFiniteNormError(FloatingPointError):
    """Some per-sample gradient norm is NaN or infinite (a NaN/inf loss or overflow)."""


class PhysicalBatchTooLarge(ValueError):
    """A backward pass saw more samples than ``max_physical_batch_size``."""


class DoubleBackwardError(RuntimeError):
    """A graph's gradients reached the same module call twice (backward twice on one graph)."""


class LoopOrderError(RuntimeError):
    """The training loop's calls came in an order dpclip cannot make private (a step without a
    backward, gradients left from the last step, a managed parameter made trainable again, a
    gradient dpclip did not clip)."""


class DistributedStepError(RuntimeError):
    """The ranks could not take a step together (one refused it, failed, left, or has taken a
    different number of steps); no rank applied it."""


class SampleRateError(ValueError):
    """The steps hold far more examples than Poisson sampling at ``batch_size / sample_size``
    gives (a loader of its own with larger batches): the ledger's ε would be too small."""


class PrivacyBudgetExceeded(RuntimeError):
    """A step would spend more privacy than the run's budget allows."""
