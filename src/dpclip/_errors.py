"""The error raised when dpclip cannot tell one training example from another."""

from __future__ import annotations


class IntegrityError(ValueError):
    """The clipped units would not be true training examples, so the privacy bound would not hold.

    Raised when a layer call does not carry the model's batch on dim 0, when two forward passes
    reach one backward, or when the self-check finds dpclip's per-example gradient norms differ
    from the naive per-example loop. The message names the module and the fix.
    """
