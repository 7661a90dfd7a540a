"""Layer rules: per-sample gradient norms and clipped gradients, one layer family per module.

A rule is built from one form (see :mod:`dpclip.layers._registry` for the contract):
:func:`from_outer_factors` for layers whose per-example gradient is a sum of outer products
(:class:`OuterFactors`), :func:`from_per_sample` for layers that give per-example gradients.
"""

from dpclip.layers._common import OuterFactors
from dpclip.layers._derive import from_outer_factors, from_per_sample
from dpclip.layers._registry import STRATEGIES, LayerRegistry, LayerRule, compute_dtype

__all__ = [
    "STRATEGIES",
    "LayerRegistry",
    "LayerRule",
    "OuterFactors",
    "compute_dtype",
    "default_registry",
    "from_outer_factors",
    "from_per_sample",
]


def default_registry() -> LayerRegistry:
    """A fresh registry holding every built-in rule (transformers' Conv1D if it is installed)."""
    from dpclip.layers import _builtin

    registry = LayerRegistry()
    _builtin.register_all(registry)
    return registry
