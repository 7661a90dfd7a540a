"""Dense layers: nn.Linear, and any layer computing ``y = x W + b`` with another weight layout.

Sample i's weight gradient is g_i = s_iᵀ a_i over the flattened leading positions (any number of
leading dims), and its bias gradient Σ_t s_it: outer factors (s, a) and (s, ones), from which the
engine derives norms, clipped sums and tied-weight cross terms (:mod:`dpclip.layers._derive`).
transformers' GPT-2 ``Conv1D`` stores W transposed, (in, out): :func:`dense_rule` builds the rule
for either layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from dpclip.layers._common import OuterFactors, as_btd
from dpclip.layers._derive import from_outer_factors
from dpclip.layers._registry import LayerRegistry, LayerRule, compute_dtype

Layout = Callable[[nn.Module], bool]  # module -> whether its weight is stored (in, out)


def dense_rule(transposed: Layout) -> LayerRule:
    """The rule for a dense layer whose weight is (out, in), or (in, out) if ``transposed``."""

    def outer_factors(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, OuterFactors]:
        dtype = compute_dtype(module.weight, grad_output)
        a, s = as_btd(inputs[0], dtype), as_btd(grad_output, dtype)
        out: dict[str, OuterFactors] = {}
        if "weight" in names:
            out["weight"] = OuterFactors(a, s) if transposed(module) else OuterFactors(s, a)
        if "bias" in names:
            out["bias"] = OuterFactors(s, None)
        return out

    return from_outer_factors(outer_factors)


def register(registry: LayerRegistry) -> None:
    rule = dense_rule(lambda module: False)
    registry.register(nn.Linear, rule)
    # Falcon's subclass overrides forward with the same y = x Wᵀ + b (checked by the tests)
    registry.register_by_name("transformers.models.falcon.modeling_falcon.FalconLinear", rule)
