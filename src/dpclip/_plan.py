"""The static facts of an attached model: which layers have rules, which parameters they own,
how they are grouped for clipping, and the clipping settings; fixed at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dpclip.clipping import group_parameters
from dpclip.config import PerformanceConfig, PrivacyConfig
from dpclip.errors import UnsupportedModuleError
from dpclip.layers import LayerRegistry, LayerRule
from dpclip.validate import find_unsupported, own_trainable


@dataclass(frozen=True)
class Plan:
    """Static facts about the attached model, fixed at construction."""

    rules: dict[nn.Module, LayerRule]
    names: dict[nn.Module, tuple[str, ...]]  # trainable parameter names owned by each module
    groups: list[list[nn.Parameter]]
    clipping: str
    clip_norm: float
    gamma: float
    strategy: str
    mean_reduction: bool

    def group_index(self) -> dict[int, int]:
        return {id(p): gi for gi, group in enumerate(self.groups) for p in group}


def make_plan(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    privacy: PrivacyConfig,
    performance: PerformanceConfig,
    registry: LayerRegistry,
) -> Plan:
    problems = find_unsupported(model, registry)
    if problems:
        raise UnsupportedModuleError(problems)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    model_ids = {id(p) for p in model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in model_ids:
                raise ValueError(
                    "the optimizer holds a parameter that is not in the model; if you called "
                    "dpclip.fix(model) after creating the optimizer, call dpclip.fix before "
                    "creating the optimizer (it replaces layers, and their parameters, in place)"
                )
    rules: dict[nn.Module, LayerRule] = {}
    names: dict[nn.Module, tuple[str, ...]] = {}
    owners: dict[str, str] = {}
    owner_of_param = {id(p): n for n, p in named}
    for path, module in model.named_modules():
        own = tuple(n for n, _ in own_trainable(module))
        rule = registry.rule_for(module) if own else None
        if rule is not None:  # without one, a module only aliases clipped parameters (validate)
            rules[module] = rule
            names[module] = own
            for n in own:
                full = owner_of_param[id(getattr(module, n))]
                owners.setdefault(full, path)
    groups = group_parameters(privacy.clipping_style, named, owners)
    return Plan(
        rules=rules, names=names, groups=groups, clipping=privacy.clipping,
        clip_norm=privacy.clip_norm, gamma=privacy.gamma, strategy=performance.norm_strategy,
        mean_reduction=privacy.loss_reduction == "mean",
    )  # fmt: skip
