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
from dpclip.validate import assign_rules


@dataclass(frozen=True)
class Plan:
    """Static facts about the attached model, fixed at construction."""

    rules: dict[nn.Module, LayerRule]
    names: dict[nn.Module, tuple[str, ...]]  # trainable parameter names owned by each module
    fallback: tuple[str, ...]  # paths of the modules that take the generic fallback
    params: dict[nn.Module, dict[str, nn.Parameter]]  # names (dotted for a lifted scope) resolved
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
    assigned = assign_rules(model, registry)
    if assigned.problems:
        raise UnsupportedModuleError(list(assigned.problems))
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
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    outside = [n for n, p in named if id(p) not in trained]
    if outside:
        listed = ", ".join(outside[:5]) + (
            f" and {len(outside) - 5} more" if len(outside) > 5 else ""
        )
        raise ValueError(
            f"{len(outside)} trainable parameter(s) of the model are not in the optimizer "
            f"({listed}): dpclip clips and noises the gradients of the parameters it trains, "
            "and another optimizer over these would take their gradients before the noise. "
            "Freeze them (p.requires_grad_(False)) or put them in this optimizer (a param group "
            "of their own for another learning rate)"
        )
    owners: dict[str, str] = {}
    owner_of_param = {id(p): n for n, p in named}
    paths = {m: path for path, m in model.named_modules()}
    for module, own in assigned.names.items():
        for n in own:
            owners.setdefault(owner_of_param[id(module.get_parameter(n))], paths[module])
    groups = group_parameters(privacy.clipping_style, named, owners)
    return Plan(
        rules=assigned.rules, names=assigned.names, fallback=assigned.fallback, groups=groups,
        params={m: {n: m.get_parameter(n) for n in own} for m, own in assigned.names.items()},
        clipping=privacy.clipping, clip_norm=privacy.clip_norm, gamma=privacy.gamma,
        strategy=performance.norm_strategy, mean_reduction=privacy.loss_reduction == "mean",
    )  # fmt: skip
