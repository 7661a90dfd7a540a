"""Layer rules: per-sample gradient norms and clipped gradients, one layer family per module."""

from dpclip.layers._registry import STRATEGIES, LayerRegistry, LayerRule, compute_dtype

__all__ = ["STRATEGIES", "LayerRegistry", "LayerRule", "compute_dtype", "default_registry"]


def default_registry() -> LayerRegistry:
    """A fresh registry holding every built-in rule (transformers' Conv1D if it is installed)."""
    from dpclip.layers import _builtin

    registry = LayerRegistry()
    _builtin.register_all(registry)
    return registry
