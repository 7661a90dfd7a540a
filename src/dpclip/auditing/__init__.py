"""Privacy auditing with one training run: an empirical lower bound on ε.

``dpclip.audit(model, train_set, target_epsilon=3.0)`` trains with canaries and returns an
:class:`AuditResult`; :mod:`dpclip.auditing.bound` holds the statistics (no torch).
"""

from dpclip.auditing.bound import Bound, audit_scores, epsilon_lower_bound, p_value
from dpclip.auditing.run import CANARY_KINDS, MIN_CANARIES, AuditError, AuditResult, audit

__all__ = [
    "CANARY_KINDS",
    "MIN_CANARIES",
    "AuditError",
    "AuditResult",
    "Bound",
    "audit",
    "audit_scores",
    "epsilon_lower_bound",
    "p_value",
]
