"""Find modules whose trainable parameters dpclip cannot clip, and offer fixes.

A module with trainable parameters of its own and no layer rule would train without clipping,
so the engine refuses it at construction; :func:`fix` swaps the usual culprit (BatchNorm, which
mixes samples) for GroupNorm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from dpclip.layers import LayerRegistry

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Unsupported:
    """One module dpclip cannot clip, with the reason and what to do."""

    path: str
    type_name: str
    advice: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'} ({self.type_name}): {self.advice}"


class UnsupportedModuleError(ValueError):
    """The model has trainable parameters in modules dpclip has no rule for."""

    def __init__(self, problems: list[Unsupported]) -> None:
        self.problems = problems
        lines = "\n  ".join(str(p) for p in problems)
        super().__init__(
            f"dpclip cannot clip the per-sample gradients of {len(problems)} module(s):\n  {lines}"
        )


def _advice(module: nn.Module) -> str:
    if isinstance(module, _BATCHNORMS):
        return "BatchNorm mixes samples; call dpclip.fix(model) to replace it with GroupNorm"
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return (
            "no per-sample rule; write the layer with nn.Linear (e.g. hand-written attention), "
            "freeze it (requires_grad_(False)), or register a rule with dpclip.register_layer"
        )
    own = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
    return (
        f"trainable parameter(s) {own} used directly in forward have no per-sample rule; move "
        "them into a supported layer, freeze them, or register a rule with dpclip.register_layer"
    )


def find_unsupported(model: nn.Module, registry: LayerRegistry) -> list[Unsupported]:
    """Every module that owns trainable parameters but has no rule (or a rule that refuses it)."""
    problems = []
    for path, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        rule = registry.rule_for(module)
        if rule is None:
            problems.append(Unsupported(path, type(module).__name__, _advice(module)))
        elif rule.check is not None and (reason := rule.check(module)):
            problems.append(Unsupported(path, type(module).__name__, reason))
    return problems


def _group_count(channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``preferred``."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def fix(model: nn.Module, *, groups: int = 32) -> nn.Module:
    """Replace every BatchNorm in ``model`` (in place) by GroupNorm; returns the model.

    Each GroupNorm gets the largest divisor of the channel count that is at most ``groups``.
    """
    for name, child in list(model.named_children()):
        if isinstance(child, _BATCHNORMS):
            replacement = nn.GroupNorm(
                _group_count(child.num_features, groups), child.num_features, affine=child.affine
            )
            ref = next(iter([*child.parameters(), *child.buffers()]), None)
            if ref is not None:
                replacement = replacement.to(device=ref.device, dtype=ref.dtype)
            setattr(model, name, replacement)
        else:
            fix(child, groups=groups)
    return model
