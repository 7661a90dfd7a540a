"""Find modules whose trainable parameters dpclip cannot clip, and offer fixes.

Every module with trainable parameters of its own gets a rule: its registered one, or the
generic fallback (:mod:`dpclip.layers.fallback`). A few it must not take (BatchNorm mixes
samples; the fused RNN kernels have no per-example form) are refused at construction, and
:func:`fix` swaps them for equivalents dpclip can clip.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from dpclip.layers import LayerRegistry, LayerRule, fallback

_BATCHNORMS = (nn.modules.batchnorm._BatchNorm,)


@dataclass(frozen=True)
class Unsupported:
    """One module dpclip cannot clip, with the reason and what to do."""

    path: str
    type_name: str
    advice: str

    def __str__(self) -> str:
        return f"{self.path or '<model>'} ({self.type_name}): {self.advice}"


def _fallback_refusal(module: nn.Module) -> str | None:
    """Why the generic fallback must not take ``module``, with the fix; None if it may."""
    if isinstance(module, _BATCHNORMS):
        return "BatchNorm mixes samples; call dpclip.fix(model) to replace it with GroupNorm"
    if isinstance(module, nn.MultiheadAttention):
        return (
            "its fused forward reads out_proj's weight outside out_proj's call; call "
            "dpclip.fix(model) to replace it with an equivalent built from nn.Linear (same "
            "weights, same outputs)"
        )
    if isinstance(module, nn.RNNBase):
        return (
            "its fused kernel has no per-example form; call dpclip.fix(model) to replace it "
            "with an equivalent that dpclip can clip (same weights, same outputs)"
        )
    return None


_COMPLEX = (
    "it has complex parameters, and its layer rule computes real per-example gradients (the "
    "imaginary part would be dropped); train it with real parameters"
)


def _rule_names(own: list[tuple[str, nn.Parameter]]) -> bool:
    """Whether a subclass of a ruled layer owns only the parameters such layers have."""
    return all(n in ("weight", "bias") for n, _ in own)


def _attach_refusal(module: nn.Module) -> str | None:
    """Why a module whose weights no rule can follow is refused at attach, with the fix: weights
    computed from other parameters, or a PEFT adapter without a per-example form. None if it
    is not one, or if nothing under it trains (frozen: nothing to clip)."""
    reason = _reparametrized(module) or _unsupported_adapter(module)
    if reason is None or not any(p.requires_grad for p in module.parameters()):
        return None
    return reason


def _reparametrized(module: nn.Module) -> str | None:
    """Why a module whose weights are computed from other parameters (parametrizations, the
    old weight_norm, pruning) cannot be clipped; None if they are not."""
    from torch.nn.utils import parametrize, prune
    from torch.nn.utils.weight_norm import WeightNorm

    if parametrize.is_parametrized(module):
        names = ", ".join(module.parametrizations.keys())
        return (
            f"its {names} is reparametrized (torch.nn.utils.parametrize: weight_norm, "
            "spectral_norm, orthogonal, ...): the gradient reaches the original parameters "
            "through the parametrization, which has no per-example rule; remove it before "
            "attaching (torch.nn.utils.parametrize.remove_parametrizations(module, name))"
        )
    hooks = module._forward_pre_hooks.values()
    if any(isinstance(h, WeightNorm) for h in hooks):
        return (
            "it uses torch.nn.utils.weight_norm, which computes the weight from weight_g and "
            "weight_v before each forward: no per-example rule covers that; remove it before "
            "attaching (torch.nn.utils.remove_weight_norm(module))"
        )
    if any(isinstance(h, prune.BasePruningMethod) for h in hooks):
        return (
            "it is pruned (torch.nn.utils.prune), which computes the weight as weight_orig times "
            "a mask before each forward: make the pruning permanent before attaching "
            "(torch.nn.utils.prune.remove(module, name)); the pruned weights then train again "
            "unless you freeze or re-mask them"
        )
    return None


def _unsupported_adapter(module: nn.Module) -> str | None:
    """Why a PEFT adapter that dpclip has no per-example form for is refused, with the fix."""
    use_dora = getattr(module, "use_dora", None)
    if isinstance(use_dora, Mapping) and any(use_dora.values()):
        return (
            "PEFT DoRA (use_dora=True) is not supported: its magnitude step runs lora_A on an "
            "identity matrix, outside the batch, which no per-example rule covers; use plain "
            "LoRA (LoraConfig(use_dora=False))"
        )
    if type(module).__module__.startswith("peft.tuners.ia3.layer"):
        return (
            "PEFT IA3 is not supported: its scaling vectors (ia3_l) multiply the layer's "
            "activations outside any layer with a per-example rule; use LoRA, or register a "
            "rule for this module type with dpclip.register_layer"
        )
    return None


def own_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The module's own (not its children's) parameters that require grad, with their names."""
    return [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]


@dataclass(frozen=True)
class Assignment:
    """Which rule clips which module's own parameters; ``fallback`` lists the modules that take
    the generic one (paths, in model order)."""

    rules: dict[nn.Module, LayerRule]
    names: dict[nn.Module, tuple[str, ...]]
    fallback: tuple[str, ...]
    problems: tuple[Unsupported, ...]


_PARAMETER_CONTAINERS = (nn.ParameterList, nn.ParameterDict)


def assign_rules(model: nn.Module, registry: LayerRegistry) -> Assignment:
    """A rule for every module that owns trainable parameters: its registered rule, else the
    generic fallback for the parameters no ruled layer also holds.

    A module without a rule whose parameters are all parameters of layers that have one
    (RoBERTa's LM head holds its decoder's bias as ``bias`` too) gets none: those layers' calls
    give the gradient, and the engine refuses a use outside them at forward time. A registered
    scope (:meth:`LayerRegistry.register_scope`) takes its lifted submodules' parameters into
    its own fallback, and those submodules are not recorded.
    """
    problems: list[Unsupported] = []
    rules: dict[nn.Module, LayerRule] = {}
    names: dict[nn.Module, tuple[str, ...]] = {}
    unruled: list[tuple[str, nn.Module]] = []
    clipped: set[int] = set()
    lifted: dict[nn.Module, list[str]] = {}  # scope -> its submodules' parameters, dotted
    scopes: list[tuple[str, nn.Module, tuple[str, ...]]] = []  # (path, scope, its patterns)
    modules = list(model.named_modules())
    for path, module in modules:
        inside = next((sc for sc in scopes if _lifted_by(path, sc[0], sc[2])), None)
        if inside is not None:
            base, scope, _ = inside
            rel = path[len(base) + 1 :] if base else path
            lifted[scope] += [f"{rel}.{n}" for n, _ in own_trainable(module)]
            continue
        patterns = registry.scope_for(module)
        # parameters in an nn.ParameterList / ParameterDict child are read by this module's own
        # forward (the container has no call of its own): this module's fallback takes them
        containers = tuple(n for n, child in module.named_children()
                           if isinstance(child, _PARAMETER_CONTAINERS) and own_trainable(child))  # fmt: skip
        if containers:
            patterns = (*(patterns or ()), *containers)
        if patterns is not None:
            lifted[module] = []
            scopes.append((path, module, patterns))
        refusal = _attach_refusal(module)
        if refusal is not None:
            problems.append(Unsupported(path, type(module).__name__, refusal))
            continue
        own = own_trainable(module)
        if not own and module not in lifted:
            continue
        rule = registry.rule_for(module) if own and module not in lifted else None
        if rule is not None and registry.inherited(module) and not _rule_names(own):
            rule = None  # a subclass with parameters of its own: its rule knows only the base's
        if rule is None:
            unruled.append((path, module))
        elif any(p.is_complex() for _, p in own):
            problems.append(Unsupported(path, type(module).__name__, _COMPLEX))
        elif rule.check is not None and (reason := rule.check(module)):
            problems.append(Unsupported(path, type(module).__name__, reason))
        else:
            rules[module], names[module] = rule, tuple(n for n, _ in own)
            clipped.update(id(p) for _, p in own)
    taken: list[str] = []
    held: dict[int, list[str]] = {}  # parameter -> paths of the fallback modules taking it
    for path, module in unruled:
        orphans = [
            n
            for n, p in own_trainable(module)
            if id(p) not in clipped
            # an ancestor's recompute already covers this module's use of it
            and not any(path.startswith(f"{a}.") or not a for a in held.get(id(p), ()))
        ]
        orphans += lifted.get(module, [])
        unique: dict[int, str] = {}  # one name per parameter (tied inside the scope)
        for n in orphans:
            unique.setdefault(id(module.get_parameter(n)), n)
        orphans = list(unique.values())
        if not orphans:
            continue
        for n in orphans:
            held.setdefault(id(module.get_parameter(n)), []).append(path)
        reason = _fallback_refusal(module)
        if reason is not None:
            problems.append(Unsupported(path, type(module).__name__, reason))
        else:
            rules[module], names[module] = fallback.RULE, tuple(orphans)
            taken.append(path or "<model>")
    order = {path: i for i, (path, _) in enumerate(modules)}
    problems.sort(key=lambda u: order[u.path])
    in_order = {m: i for i, (_, m) in enumerate(modules)}
    rules = dict(sorted(rules.items(), key=lambda kv: in_order[kv[0]]))
    return Assignment(rules, names, tuple(taken), tuple(problems))


def _lifted_by(path: str, scope: str, patterns: tuple[str, ...]) -> bool:
    """``path`` is a submodule of the scope at ``scope`` matching one of its patterns (shell
    style over the path below the scope, ``*`` matching dots too), or inside one."""
    if scope and not path.startswith(f"{scope}."):
        return False
    if not path or path == scope:
        return False
    parts = (path[len(scope) + 1 :] if scope else path).split(".")
    rels = [".".join(parts[: k + 1]) for k in range(len(parts))]
    return any(fnmatch.fnmatchcase(rel, pat) for rel in rels for pat in patterns)


def find_unsupported(model: nn.Module, registry: LayerRegistry | None = None) -> list[Unsupported]:
    """Every module with trainable parameters that dpclip cannot clip, with the fix: a rule that
    refuses the instance (an Embedding with ``max_norm``), or a layer the generic fallback must
    not take (BatchNorm, which mixes samples; the fused RNNs)."""
    if registry is None:
        from dpclip.layers import default_registry

        registry = default_registry()
    return list(assign_rules(model, registry).problems)


def _group_count(channels: int, preferred: int = 32) -> int:
    """The largest divisor of ``channels`` that is at most ``preferred``."""
    return max(g for g in range(1, min(preferred, channels) + 1) if channels % g == 0)


def fix(model: nn.Module, *, groups: int = 32) -> nn.Module:
    """Replace, in place, every layer dpclip cannot clip as it is by an equivalent it can;
    returns the model. Call it before creating the optimizer (parameters are replaced).

    BatchNorm becomes GroupNorm (the largest divisor of the channel count that is at most
    ``groups``; this changes what the model computes, since BatchNorm mixes samples).
    nn.MultiheadAttention, nn.LSTM, nn.GRU and nn.RNN become dpclip's equivalents built from
    clippable layers (:mod:`dpclip.replacements`): the same weights and the same outputs.
    """
    from dpclip.replacements import REPLACEMENTS

    for name, child in list(model.named_children()):
        build = REPLACEMENTS.get(type(child))
        if isinstance(child, _BATCHNORMS):
            replacement = nn.GroupNorm(
                _group_count(child.num_features, groups), child.num_features, affine=child.affine
            )
            ref = next(iter([*child.parameters(), *child.buffers()]), None)
            if ref is not None:
                replacement = replacement.to(device=ref.device, dtype=ref.dtype)
            setattr(model, name, replacement)
        elif build is not None:
            setattr(model, name, build(child))
        else:
            fix(child, groups=groups)
    return model
