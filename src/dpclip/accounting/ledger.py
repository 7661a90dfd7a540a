"""The privacy ledger: every noisy step a training run took, as events, and what they cost."""

from __future__ import annotations

from typing import Any

from dpclip.accounting.accountants import check_accountant, epsilon
from dpclip.accounting.calibration import max_additional_steps
from dpclip.accounting.events import GaussianStep, History, append, check_delta
from dpclip.errors import PrivacyBudgetExceeded

__all__ = ["PrivacyBudgetExceeded", "PrivacyLedger"]

_STATE_VERSION = 1
_EVENT_KEYS = {"noise_multiplier", "sample_rate", "steps"}


class PrivacyLedger:
    """Records the noisy steps of a run and reports their ε.

    Consecutive steps with the same σ and q are merged into one :class:`GaussianStep`, so a
    10,000-step run is one event and its ε costs one accountant call (cached until the next step).

    >>> ledger = PrivacyLedger("rdp")
    >>> ledger.record(noise_multiplier=1.0, sample_rate=0.01, steps=100)
    >>> ledger.record(noise_multiplier=1.0, sample_rate=0.01)
    >>> ledger.events
    (GaussianStep(noise_multiplier=1.0, sample_rate=0.01, steps=101),)
    >>> ledger.steps
    101
    """

    def __init__(self, accountant: str = "pld") -> None:
        self.accountant = check_accountant(accountant)
        self._events: History = ()
        self._cache: dict[tuple[float, str], float] = {}

    @property
    def events(self) -> History:
        """The recorded events, oldest first."""
        return self._events

    @property
    def steps(self) -> int:
        """Total number of recorded steps."""
        return sum(event.steps for event in self._events)

    def record(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` noisy steps taken with noise multiplier σ at sampling rate q."""
        event = GaussianStep(noise_multiplier, sample_rate, steps)
        if event.steps:
            self._events = append(self._events, event)
            self._cache.clear()

    def epsilon(self, delta: float, accountant: str | None = None) -> float:
        """ε spent so far at ``delta`` (0 before any step, ∞ after a step without noise)."""
        name = self.accountant if accountant is None else check_accountant(accountant)
        key = (check_delta(delta), name)
        if key not in self._cache:
            self._cache[key] = epsilon(self._events, delta, name)
        return self._cache[key]

    def steps_within_budget(
        self,
        *,
        noise_multiplier: float,
        sample_rate: float,
        target_epsilon: float,
        delta: float,
    ) -> int:
        """The largest k >= 0 with ε(recorded steps + k such steps) <= target_epsilon.

        0 when the recorded steps alone already exceed the target. Recording exactly those k
        steps afterwards reproduces the evaluated history, so its ε is within the target.
        """
        return max_additional_steps(
            self._events,
            GaussianStep(noise_multiplier, sample_rate),
            target_epsilon=target_epsilon,
            delta=delta,
            accountant=self.accountant,
        )

    def state_dict(self) -> dict[str, Any]:
        """Plain, JSON-serialisable data from which :meth:`load_state_dict` restores the ledger."""
        return {
            "version": _STATE_VERSION,
            "accountant": self.accountant,
            "events": [
                {"noise_multiplier": e.noise_multiplier, "sample_rate": e.sample_rate,
                 "steps": e.steps}
                for e in self._events
            ],
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Replace this ledger's contents (accountant included) with a saved state.

        Raises:
            ValueError: when ``state`` is not a ledger state of this version.
        """
        if not isinstance(state, dict) or set(state) != {"version", "accountant", "events"}:
            raise ValueError(
                "malformed ledger state: expected a dict with keys 'version', 'accountant' and "
                f"'events', got {_describe(state)}"
            )
        if state["version"] != _STATE_VERSION:
            raise ValueError(
                f"malformed ledger state: expected version {_STATE_VERSION}, "
                f"got {state['version']!r}"
            )
        try:
            accountant = check_accountant(state["accountant"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"malformed ledger state: {err}") from None
        if not isinstance(state["events"], list | tuple):
            raise ValueError(
                f"malformed ledger state: expected 'events' to be a list, "
                f"got {_describe(state['events'])}"
            )
        history: History = ()
        for i, item in enumerate(state["events"]):
            if not isinstance(item, dict) or set(item) != _EVENT_KEYS:
                raise ValueError(
                    f"malformed ledger state: event {i} should be a dict with keys "
                    f"{sorted(_EVENT_KEYS)}, got {_describe(item)}"
                )
            try:
                event = GaussianStep(**item)
            except ValueError as err:
                raise ValueError(f"malformed ledger state: event {i}: {err}") from None
            history = append(history, event)
        self.accountant, self._events = accountant, history
        self._cache.clear()

    def __repr__(self) -> str:
        return f"PrivacyLedger(accountant={self.accountant!r}, steps={self.steps}, events={len(self._events)})"


def _describe(value: object) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(map(str, value))}"
    return f"{type(value).__name__} {value!r}"[:120]
