"""dpclip: differentially private deep learning in PyTorch with automatic clipping.

The public surface is small and loaded lazily, so ``import dpclip`` (and ``dpclip.accounting``,
which never needs torch) stays cheap::

    engine = dpclip.PrivacyEngine(model, optimizer, sample_size=60_000, batch_size=1024,
                                  epochs=10, target_epsilon=3.0)
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "PrivacyEngine": "dpclip.engine",
    "PrivacyConfig": "dpclip.config",
    "PerformanceConfig": "dpclip.config",
    "fix": "dpclip.validate",
    "find_unsupported": "dpclip.validate",
    "CheckResult": "dpclip._selfcheck",
    "errors": "dpclip.errors",
    "IntegrityError": "dpclip.errors",
    "SelfCheckError": "dpclip.errors",
    "ParameterUseError": "dpclip.errors",
    "UnsupportedModuleError": "dpclip.errors",
    "PrivacyBudgetExceeded": "dpclip.errors",
    "NonFiniteNormError": "dpclip.errors",
    "PhysicalBatchTooLarge": "dpclip.errors",
    "DoubleBackwardError": "dpclip.errors",
    "DistributedStepError": "dpclip.errors",
    "LoopOrderError": "dpclip.errors",
    "SampleRateError": "dpclip.errors",
    "register_layer": "dpclip.engine",
    "accounting": "dpclip.accounting",
    "layers": "dpclip.layers",
    "data": "dpclip.data",
    "audit": "dpclip.auditing",
    "AuditResult": "dpclip.auditing",
}

__all__ = sorted(_LAZY) + ["__version__"]

if TYPE_CHECKING:  # pragma: no cover
    from dpclip import accounting, data, errors, layers  # noqa: F401
    from dpclip._selfcheck import CheckResult  # noqa: F401
    from dpclip.auditing import AuditResult, audit  # noqa: F401
    from dpclip.config import PerformanceConfig, PrivacyConfig  # noqa: F401
    from dpclip.engine import PrivacyEngine, register_layer  # noqa: F401
    from dpclip.errors import (  # noqa: F401
        DistributedStepError,
        DoubleBackwardError,
        IntegrityError,
        LoopOrderError,
        NonFiniteNormError,
        ParameterUseError,
        PhysicalBatchTooLarge,
        PrivacyBudgetExceeded,
        SampleRateError,
        SelfCheckError,
        UnsupportedModuleError,
    )
    from dpclip.validate import find_unsupported, fix  # noqa: F401


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'dpclip' has no attribute {name!r}")
    module = importlib.import_module(module_name)
    value = module if module_name == f"dpclip.{name}" else getattr(module, name)
    globals()[name] = value
    return value
