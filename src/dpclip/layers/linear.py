"""Dense layers: nn.Linear, and any layer computing ``y = x W + b`` with another weight layout.

Sample i's weight gradient is g_i = s_iᵀ a_i over the flattened leading positions (any number of
leading dims). transformers' GPT-2 ``Conv1D`` stores W transposed, (in, out); :func:`dense_rule`
builds the same rule for either layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import Tensor, nn

from dpclip.layers._common import (
    OuterFactors,
    as_btd,
    bias_per_sample,
    outer_clipped_sum,
    outer_norm_sq,
    outer_per_sample,
    sq_norms,
    use_ghost,
)
from dpclip.layers._registry import LayerRegistry, LayerRule, compute_dtype

Layout = Callable[[nn.Module], tuple[int, int, bool]]  # module -> (d_in, d_out, transposed)


def linear_layout(module: nn.Linear) -> tuple[int, int, bool]:
    return module.in_features, module.out_features, False


def dense_rule(layout: Layout) -> LayerRule:
    """The rule for a dense layer whose weight is (out, in), or (in, out) if ``transposed``."""

    def flat(module: nn.Module, inputs: tuple, grad_output: Tensor) -> tuple[Tensor, Tensor]:
        dtype = compute_dtype(module.weight, grad_output)
        return as_btd(inputs[0], dtype), as_btd(grad_output, dtype)

    def weight_sides(module: nn.Module, a: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols): the sides along the weight's dim 0 and dim 1, s and a or a and s."""
        return (a, s) if layout(module)[2] else (s, a)

    def norm_sq(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> dict[str, Tensor]:
        a, s = flat(module, inputs, grad_output)
        d_in, d_out, _ = layout(module)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            out["weight"] = outer_norm_sq(a, s, use_ghost(strategy, a.shape[1], d_in, d_out))
        if "bias" in names:
            out["bias"] = sq_norms(bias_per_sample(s))
        return out

    def clipped_sums(
        module: nn.Module,
        inputs: tuple,
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
        into: Mapping[str, Tensor] | None,
    ) -> dict[str, Tensor]:
        """Σ_i C_i g_i per parameter in ``factors``: new tensors, or added in place to ``into``."""
        a, s = flat(module, inputs, grad_output)
        out: dict[str, Tensor] = {}
        if "weight" in factors:
            rows, cols = weight_sides(module, a, s)
            target = None if into is None else into["weight"]
            out["weight"] = outer_clipped_sum(cols, rows, factors["weight"], into=target)
        if "bias" in factors:
            g = factors["bias"].to(s.dtype) @ bias_per_sample(s)
            out["bias"] = g if into is None else into["bias"].add_(g)
        return out

    def clipped_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        return clipped_sums(module, inputs, grad_output, factors, None)

    def add_clipped_grad(
        module: nn.Module,
        inputs: tuple,
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
        into: Mapping[str, Tensor],
    ) -> None:
        clipped_sums(module, inputs, grad_output, factors, into)

    def per_sample_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor]:
        a, s = flat(module, inputs, grad_output)
        out: dict[str, Tensor] = {}
        if "weight" in names:
            rows, cols = weight_sides(module, a, s)
            out["weight"] = outer_per_sample(cols, rows)
        if "bias" in names:
            out["bias"] = bias_per_sample(s)
        return out

    def instantiates(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> list[str]:
        """The bias always ((b, out) is smaller than s); the weight when its per-sample grads
        are no larger than the a and s they replace."""
        d_in, d_out, _ = layout(module)
        T = grad_output.numel() // (grad_output.shape[0] * d_out)
        weight = T > 1 and not use_ghost(strategy, T, d_in, d_out)
        return [n for n in names if n == "bias" or weight]

    def outer_factors(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, OuterFactors]:
        a, s = flat(module, inputs, grad_output)
        out: dict[str, OuterFactors] = {}
        if "weight" in names:
            out["weight"] = OuterFactors(*weight_sides(module, a, s))
        if "bias" in names:
            out["bias"] = OuterFactors(s, s.new_ones(*s.shape[:2], 1))
        return out

    return LayerRule(
        norm_sq,
        clipped_grad,
        per_sample_grad,
        instantiates=instantiates,
        outer_factors=outer_factors,
        add_clipped_grad=add_clipped_grad,
    )


def register(registry: LayerRegistry) -> None:
    rule = dense_rule(linear_layout)
    registry.register(nn.Linear, rule)
    # Falcon's subclass overrides forward with the same y = x Wᵀ + b (checked by the tests)
    registry.register_by_name("transformers.models.falcon.modeling_falcon.FalconLinear", rule)
