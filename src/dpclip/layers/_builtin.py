"""Registers the built-in rules; the only place that lists them."""

from __future__ import annotations

from dpclip.layers._registry import LayerRegistry


def register_all(registry: LayerRegistry) -> None:
    from dpclip.layers import linear

    linear.register(registry)
