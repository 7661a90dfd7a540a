"""Clipping functions (per-sample norm -> factor) and clipping styles (which norms are taken).

Every clipping function ``f(norm, R, gamma)`` returns factors ``C`` with ``C · norm ≤ R``, so the
clipped per-sample gradient has norm at most R and the Gaussian noise σR gives the stated privacy.

=============  ==================================  ==========  ==================================
name           C(norm)                             norm = 0    note
=============  ==================================  ==========  ==================================
automatic      R / (norm + γ)                      R / γ       AUTO-S, the default (Bu et al.)
automatic-v    R / norm                            0           AUTO-V (γ = 0); C·g is 0 at norm 0
abadi          min(1, R / norm)                    1           flat clipping (Abadi et al. 2016)
global         1 if norm ≤ R else 0                1           global clipping (Bu et al. 2021)
psac           R / (norm + γ / (norm + γ))         R           per-sample adaptive (Xia et al.)
=============  ==================================  ==========  ==================================

For psac, ``gamma`` plays the role of the paper's r. A non-finite norm is never clipped: callers
check norms first and fail (a NaN would otherwise leak into the update).

>>> import torch
>>> clip_factors("automatic", torch.tensor([0.0, 1.0, 99.0]), clip_norm=1.0, gamma=1.0)
tensor([1.0000, 0.5000, 0.0100])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

ClipFn = Callable[[Tensor, float, float], Tensor]


def _automatic(norm: Tensor, r: float, gamma: float) -> Tensor:
    shifted = norm + gamma
    return shifted.reciprocal() if r == 1.0 else r / shifted  # R = 1 (the default): one op less


def _automatic_v(norm: Tensor, r: float, gamma: float) -> Tensor:
    # at norm 0 the gradient is 0 and any factor gives 0; R / tiny overflowed to inf for R > 4,
    # and inf * 0 = NaN in the clipped sum
    largest = torch.finfo(norm.dtype).max  # a subnormal norm: R / norm would be inf too
    return torch.where(
        norm > 0, (r / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=largest), 0.0
    )


def _abadi(norm: Tensor, r: float, gamma: float) -> Tensor:
    return (r / norm.clamp_min(torch.finfo(norm.dtype).tiny)).clamp(max=1.0)


def _global(norm: Tensor, r: float, gamma: float) -> Tensor:
    return (norm <= r).to(norm.dtype)


def _psac(norm: Tensor, r: float, gamma: float) -> Tensor:
    return r / (norm + gamma / (norm + gamma))


CLIPPING_FUNCTIONS: dict[str, ClipFn] = {
    "automatic": _automatic,
    "automatic-v": _automatic_v,
    "abadi": _abadi,
    "global": _global,
    "psac": _psac,
}
NEEDS_GAMMA = frozenset({"automatic", "psac"})
# C(norm; c·R) = c · C(norm; R) for c > 0: a scale of the factors folds into R (no extra op)
_LINEAR_IN_R = frozenset({"automatic", "psac"})
STYLES = ("all-layer", "layer-wise", "param-wise")


def clip_factors(
    name: str, norms: Tensor, *, clip_norm: float, gamma: float, scale: float = 1.0
) -> Tensor:
    """Per-sample factors C for per-sample norms, so that ``C * norms <= clip_norm``.

    With ``scale`` (> 0): ``scale · C(scale · norms)``, the engine's case, whose norms are those
    of the mean loss's per-sample gradients (1/b of the examples'), and whose factors multiply
    them; the scale is folded into the formula where it can be (no extra op per step).
    """
    try:
        fn = CLIPPING_FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown clipping {name!r}; expected one of {sorted(CLIPPING_FUNCTIONS)}"
        ) from None
    if not 0 < scale < math.inf:
        raise ValueError(f"clipping: expected a finite scale > 0, got {scale!r}")
    if scale == 1.0:
        return fn(norms, clip_norm, gamma)
    if name == "automatic":  # s·R / (s·norm + γ) = R / (norm + γ/s)
        return fn(norms, clip_norm, gamma / scale)
    if name in _LINEAR_IN_R:
        return fn(norms * scale, clip_norm * scale, gamma)
    return fn(norms * scale, clip_norm, gamma) * scale


def group_parameters(
    style: str | Sequence[Sequence[nn.Parameter | str]],
    named_params: Sequence[tuple[str, nn.Parameter]],
    owners: dict[str, str],
) -> list[list[nn.Parameter]]:
    """Partition the trainable parameters into clipping groups.

    ``named_params`` are the trainable (name, parameter) pairs; ``owners`` maps a parameter name
    to the path of the module that owns it (for layer-wise). A user list of groups must name every
    trainable parameter exactly once, as parameters or as their names.
    """
    if isinstance(style, str):
        if style == "all-layer":
            return [[p for _, p in named_params]]
        if style == "param-wise":
            return [[p] for _, p in named_params]
        if style == "layer-wise":
            by_owner: dict[str, list[nn.Parameter]] = {}
            for name, p in named_params:
                by_owner.setdefault(owners[name], []).append(p)
            return list(by_owner.values())
        raise ValueError(
            f"unknown clipping_style {style!r}; expected one of {list(STYLES)} "
            "or a list of parameter groups"
        )
    return _user_groups(style, named_params)


def _user_groups(
    groups: Sequence[Sequence[nn.Parameter | str]], named_params: Sequence[tuple[str, nn.Parameter]]
) -> list[list[nn.Parameter]]:
    by_name = dict(named_params)
    name_of = {id(p): n for n, p in named_params}
    seen: dict[int, int] = {}
    out: list[list[nn.Parameter]] = []
    for gi, group in enumerate(groups):
        if isinstance(group, (str, nn.Parameter)) or len(group) == 0:
            raise ValueError(f"clipping_style group {gi} must be a non-empty list of parameters")
        resolved = []
        for item in group:
            p = by_name.get(item) if isinstance(item, str) else item
            if p is None or id(p) not in name_of:
                raise ValueError(
                    f"clipping_style group {gi} names {item if isinstance(item, str) else 'a parameter'}"
                    " that is not a trainable parameter of the model"
                )
            if id(p) in seen:
                raise ValueError(
                    f"parameter {name_of[id(p)]!r} is in clipping_style groups {seen[id(p)]} and {gi}"
                )
            seen[id(p)] = gi
            resolved.append(p)
        out.append(resolved)
    missing = [n for n, p in named_params if id(p) not in seen]
    if missing:
        raise ValueError(f"clipping_style groups leave out trainable parameters: {missing}")
    return out


def group_clip_norm(clip_norm: float, num_groups: int) -> float:
    """R/√K: each of K groups is clipped so that the total sensitivity stays R."""
    return clip_norm / math.sqrt(num_groups)
