"""Dense layers: nn.Linear, and any layer computing ``y = x W + b`` with another weight layout.

Sample i's weight gradient is g_i = s_iᵀ a_i over the flattened leading positions (any number of
leading dims), and its bias gradient Σ_t s_it: outer factors (s, a) and (s, ones), from which the
engine derives norms, clipped sums and tied-weight cross terms (:mod:`dpclip.layers._derive`).
transformers' GPT-2 ``Conv1D`` stores W transposed, (in, out): :func:`dense_rule` builds the rule
for either layout.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace

from torch import Tensor, nn

from dpclip.layers._common import (
    OuterFactors,
    as_btd,
    cast,
    flat_clipped_sum,
    product_norm_sq,
    sq_norms,
    weighted_sum,
)
from dpclip.layers._derive import call_memo, from_outer_factors
from dpclip.layers._registry import LayerRegistry, LayerRule, compute_dtype

Layout = Callable[[nn.Module], bool]  # module -> whether its weight is stored (in, out)
_Flat = tuple[Tensor, Tensor, Tensor, Tensor]  # a, s, and the weight's rows and cols


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

    derived = from_outer_factors(outer_factors)

    def one_position(module: nn.Module, inputs: tuple, grad_output: Tensor) -> _Flat | None:
        """(a, s, rows, cols) as (b, n) matrices when the input is (b, in): the usual classifier
        head, whose outer factors would be (b, 1, n) views made twice per step."""
        memo = call_memo(module, inputs, grad_output)
        if memo is not None and "one_position" in memo:
            return memo["one_position"]
        x = inputs[0] if inputs else None
        flat = None
        if isinstance(x, Tensor) and x.dim() == 2 and grad_output.dim() == 2:
            dtype = compute_dtype(module.weight, grad_output)
            a, s = cast(x, dtype), cast(grad_output, dtype)
            flat = (a, s, a, s) if transposed(module) else (a, s, s, a)
        if memo is not None:
            memo["one_position"] = flat
        return flat

    def norm_sq(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> dict[str, Tensor]:
        flat = one_position(module, inputs, grad_output)
        if flat is None:
            return derived.norm_sq(module, inputs, grad_output, names, strategy)
        _, s, rows, cols = flat
        return {n: product_norm_sq(rows, cols) if n == "weight" else sq_norms(s) for n in names}

    def clipped_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        flat = one_position(module, inputs, grad_output)
        if flat is None:
            return derived.clipped_grad(module, inputs, grad_output, factors)
        _, s, rows, cols = flat
        return {
            n: flat_clipped_sum(rows, cols, c) if n == "weight" else weighted_sum(c, s)
            for n, c in factors.items()
        }

    def per_sample_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor]:
        flat = one_position(module, inputs, grad_output)
        if flat is None:
            return derived.per_sample_grad(module, inputs, grad_output, names)
        _, s, rows, cols = flat
        # the bias's per-sample gradient is s itself (autograd's output gradient when no cast
        # was needed): the engine only reads per-sample gradients, never writes them
        return {n: rows.unsqueeze(2) * cols.unsqueeze(1) if n == "weight" else s for n in names}

    def instantiates(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> Collection[str]:
        """The bias; the weight when it is a vector (one input or one output)."""
        flat = one_position(module, inputs, grad_output)
        if flat is None:
            return derived.instantiates(module, inputs, grad_output, names, strategy)
        vector = min(module.weight.shape) == 1
        return [n for n in names if n == "bias" or vector]

    return replace(
        derived,
        norm_sq=norm_sq,
        clipped_grad=clipped_grad,
        per_sample_grad=per_sample_grad,
        instantiates=instantiates,
    )


def register(registry: LayerRegistry) -> None:
    rule = dense_rule(lambda module: False)
    registry.register(nn.Linear, rule)
    # Falcon's subclass overrides forward with the same y = x Wᵀ + b (checked by the tests)
    registry.register_by_name("transformers.models.falcon.modeling_falcon.FalconLinear", rule)
