"""The registry of layer rules: which module types dpclip can clip, and how.

A rule supplies **one form** of its parameters' per-example gradients, and
:mod:`dpclip.layers._derive` builds the rest of the :class:`LayerRule` from it:

- ``outer_factors(module, inputs, grad_output, names) -> {name: OuterFactors}``: g_i as a sum of
  outer products over positions (dense layers; an embedding with a side of token ids; a bias
  with a side of ones), giving ghost norms, clipped sums as one matmul, and cross terms for a
  parameter used by several calls (tied weights), or
- ``per_sample_grad(module, inputs, grad_output, names) -> {name: Tensor[b, *param.shape]}``,
  for layers whose per-example gradients are small (norm layers) or have no other form (the
  generic fallback).

The derived slots, any of which a rule may replace for speed (a convolution's weight-gradient
kernel, an embedding's sort path): ``norm_sq(..., names, strategy) -> {name: Tensor[b]}``;
``clipped_grad(..., factors) -> {name: Σ_i C_i g_i}``; ``add_clipped_grad(..., factors, into)``,
the same added in place; ``instantiates(..., names, strategy)``, the names whose per-example
gradients are the cheaper way to their norms (built once, reused for the clipped sum). And
optionally ``check(module) -> str | None``: why an instance cannot be clipped (an Embedding with
``max_norm``), refused at construction.

``inputs`` is the tuple of positional tensors the module's ``forward`` received (detached);
``grad_output`` is ∂L/∂output with the batch on dim 0. ``strategy`` is ``"ghost"``,
``"instantiate"`` or ``"mixed"`` (pick the cheaper per layer). Rules compute in float32 or wider
(bf16 inputs are upcast) and never scale by the loss reduction: the engine does that through the
factors. The engine checks the exact shapes of everything a rule returns and raises on a
mismatch: a norm of the wrong shape would broadcast into wrong clipping factors, a gradient of
the right size in the wrong shape would be reshaped into a wrong one.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpclip.layers._common import OuterFactors

NormSq = Callable[[nn.Module, tuple, Tensor, Sequence[str], str], dict[str, Tensor]]
ClippedGrad = Callable[[nn.Module, tuple, Tensor, Mapping[str, Tensor]], dict[str, Tensor]]
PerSampleGrad = Callable[[nn.Module, tuple, Tensor, Sequence[str]], dict[str, Tensor]]
Check = Callable[[nn.Module], "str | None"]
Instantiates = Callable[[nn.Module, tuple, Tensor, Sequence[str], str], Collection[str]]
OuterFactorsFn = Callable[[nn.Module, tuple, Tensor, Sequence[str]], dict[str, OuterFactors]]
AddClippedGrad = Callable[
    [nn.Module, tuple, Tensor, Mapping[str, Tensor], Mapping[str, Tensor]], None
]

STRATEGIES = ("ghost", "instantiate", "mixed")
# methods whose override in a subclass changes what a registered layer computes
_COMPUTING = ("forward", "_conv_forward")


@dataclass(frozen=True)
class LayerRule:
    """How to clip one layer family; build it with :mod:`dpclip.layers._derive` from one form
    (see the module docstring for the contract)."""

    norm_sq: NormSq
    clipped_grad: ClippedGrad
    per_sample_grad: PerSampleGrad | None = None
    check: Check | None = None  # reason this module instance cannot be clipped, or None
    instantiates: Instantiates | None = None  # names whose per-sample grads are built, reused
    outer_factors: OuterFactorsFn | None = None  # for ghost norms of tied parameters
    add_clipped_grad: AddClippedGrad | None = None  # clipped_grad, accumulated in place
    # the rule reads the whole call: ``inputs`` is ``(fallback.Call,)`` (positional and keyword
    # arguments, any output structure) and ``grad_output`` a tuple, one per output tensor
    whole_call: bool = False


class LayerRegistry:
    """Maps module types to rules.

    A subclass inherits its base's rule only if it does not override ``forward``, nor a method
    the base's ``forward`` computes with (``_conv_forward``: a weight-standardized convolution):
    a subclass that computes differently must be registered on its own (or takes the fallback).
    """

    def __init__(self) -> None:
        self._rules: dict[type | str, LayerRule] = {}
        self._scopes: dict[str, tuple[str, ...]] = {}

    def register_scope(self, qualified_name: str, lifted: tuple[str, ...]) -> None:
        """Instances of the type named ``module.QualName`` take the generic fallback for the
        trainable parameters of their submodules whose paths below it match a pattern in
        ``lifted`` (shell style: ``("*",)`` is every submodule, ``"layers.*.fc1"`` one in each
        layer), whose own rules would not see those parameters' every use. For a block
        that uses a submodule's weight outside that submodule's call, or calls it on a tensor
        without the batch (a relative-position table), or folds the batch into another dim."""
        if qualified_name in self._scopes:
            raise ValueError(f"a scope for {qualified_name} is already registered")
        self._scopes[qualified_name] = tuple(lifted)

    def scope_for(self, module: nn.Module) -> tuple[str, ...] | None:
        """The submodule paths ``module`` lifts (see :meth:`register_scope`), if any."""
        cls = type(module)
        return self._scopes.get(f"{cls.__module__}.{cls.__qualname__}")

    def register(self, module_type: type, rule: LayerRule, *, replace: bool = False) -> None:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise TypeError(f"expected an nn.Module subclass, got {module_type!r}")
        if module_type in self._rules and not replace:
            raise ValueError(
                f"a rule for {module_type.__qualname__} is already registered; "
                "pass replace=True to override it"
            )
        self._rules[module_type] = rule

    def register_by_name(self, qualified_name: str, rule: LayerRule) -> None:
        """Register a type from an optional package by its ``module.QualName``, without importing
        the package: if an instance exists, its package is already imported."""
        if qualified_name in self._rules:
            raise ValueError(f"a rule for {qualified_name} is already registered")
        self._rules[qualified_name] = rule

    def rule_for(self, module: nn.Module) -> LayerRule | None:
        own = type(module)
        for cls in own.__mro__:
            rule = self._rules.get(cls) or self._rules.get(f"{cls.__module__}.{cls.__qualname__}")
            if rule is not None:
                same = all(getattr(own, m, None) is getattr(cls, m, None) for m in _COMPUTING)
                return rule if cls is own or same else None
        return None

    def inherited(self, module: nn.Module) -> bool:
        """Whether ``module``'s rule (if any) was registered for a base class of its type."""
        own = type(module)
        return own not in self._rules and f"{own.__module__}.{own.__qualname__}" not in self._rules

    def __contains__(self, module_type: type | str) -> bool:
        if isinstance(module_type, type):
            return module_type in self._rules or (
                f"{module_type.__module__}.{module_type.__qualname__}" in self._rules
            )
        return module_type in self._rules


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 for half/bf16/float32 inputs, float64 if any input is float64."""
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
