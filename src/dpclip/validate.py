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


def _advice(module: nn.Module, orphans: list[str]) -> str:
    if isinstance(module, _BATCHNORMS):
        return "BatchNorm mixes samples; call dpclip.fix(model) to replace it with GroupNorm"
    if isinstance(module, (nn.MultiheadAttention, nn.RNNBase)):
        return (
            "no per-sample rule; write the layer with nn.Linear (e.g. hand-written attention), "
            "freeze it (requires_grad_(False)), or register a rule with dpclip.register_layer"
        )
    return (
        f"trainable parameter(s) {orphans} used directly in forward have no per-sample rule; move "
        "them into a supported layer, freeze them, or register a rule with dpclip.register_layer"
    )


def own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own (not its children's) parameters that require grad, with their names."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def find_unsupported(model: nn.Module, registry: LayerRegistry) -> list[Unsupported]:
    """Every module that owns trainable parameters but has no rule (or a rule that refuses it).

    A module without a rule passes when each of its parameters is also a parameter of a layer
    that has one (RoBERTa's LM head holds its decoder's bias as ``bias`` too): that layer's
    calls give the gradient, and the engine refuses a use outside them at forward time.
    """
    problems, unruled, clipped = [], [], set()
    for path, module in model.named_modules():
        if not own_trainable(module):
            continue
        rule = registry.rule_for(module)
        if rule is None:
            unruled.append((path, module))
        elif rule.check is not None and (reason := rule.check(module)):
            problems.append(Unsupported(path, type(module).__name__, reason))
        else:
            clipped.update(id(p) for _, p in own_trainable(module))
    for path, module in unruled:
        orphans = [n for n, p in own_trainable(module) if id(p) not in clipped]
        if orphans:
            problems.append(Unsupported(path, type(module).__name__, _advice(module, orphans)))
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return sorted(problems, key=lambda u: order[u.path])


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
