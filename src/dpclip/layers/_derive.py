"""A whole layer rule from its one form: outer factors, or per-example gradients.

A rule supplies the form its algebra has: the **outer factors** (a, s) of each parameter's
per-example gradient (dense layers, embeddings as ids, a bias as ones; see
:class:`~dpclip.layers._common.OuterFactors`), or the **per-example gradients** themselves (norm
layers, the generic fallback). Everything else is derived here, in one place: the norms (ghost
or instantiated, from one cost model, :func:`~dpclip.layers._common.use_ghost`), the clipped
sums, the in-place adds for later uses of a shared parameter, and, from outer factors, the cross
terms of tied parameters. A rule may still pass its own function for any slot where speed needs
it (an embedding's sort path for norms).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from dpclip.layers._common import (
    OuterFactors,
    outer_clipped_sum,
    outer_inner,
    outer_norm_sq,
    outer_per_sample,
    sq_norms,
    use_ghost,
    weighted_sum,
)
from dpclip.layers._registry import LayerRule, OuterFactorsFn, PerSampleGrad


def _param(module: nn.Module, name: str) -> nn.Parameter:
    return module.get_parameter(name) if "." in name else getattr(module, name)


def factor_norm_sq(f: OuterFactors, strategy: str) -> Tensor:
    """‖Σ_t rows_t ⊗ cols_t‖² per example: ghost or by building it, whichever is cheaper."""
    if f.cols is None:
        return sq_norms(f.rows.sum(dim=1))
    if f.rows.is_floating_point() and f.cols.is_floating_point():
        T, p, q = f.rows.shape[1], f.rows.shape[-1], f.cols.shape[-1]
        return outer_norm_sq(f.cols, f.rows, use_ghost(strategy, T, q, p))
    return outer_inner(f, f)  # a side of ids: the collision form


def factor_builds(f: OuterFactors, strategy: str) -> bool:
    """Whether the per-example gradient is the cheaper way to the norm and the clipped sum: a
    vector (a bias: (b, out) is smaller than the output gradient it sums), or a matrix over
    several positions whose per-example gradient is no larger than its factors."""
    if f.cols is None:
        return True
    if not (f.rows.is_floating_point() and f.cols.is_floating_point()):
        return False  # vocabulary × width per example: never
    T, p, q = f.rows.shape[1], f.rows.shape[-1], f.cols.shape[-1]
    if min(p, q) == 1:
        return True
    return T > 1 and not use_ghost(strategy, T, q, p)


def factor_per_sample(f: OuterFactors, shape: torch.Size) -> Tensor:
    """(b, *shape): Σ_t rows_t ⊗ cols_t per example (a side of ids scattered, not one-hot)."""
    rows, cols = f.rows, f.cols
    b = rows.shape[0]
    if cols is None:  # a bias: a sum over positions
        return _shaped(rows.sum(dim=1), (b, *shape))
    if rows.is_floating_point() and cols.is_floating_point():
        return _shaped(outer_per_sample(cols, rows), (b, *shape))
    if not rows.is_floating_point() and cols.is_floating_point():  # (vocab, width)
        grad = cols.new_zeros(b, shape[0], cols.shape[-1])
        return grad.scatter_add_(1, rows.unsqueeze(-1).expand_as(cols), cols).view(b, *shape)
    if rows.is_floating_point():  # (width, vocab)
        grad = rows.new_zeros(b, rows.shape[-1], _numel(shape) // rows.shape[-1])
        ids = cols.unsqueeze(1).expand(-1, rows.shape[-1], -1)
        return grad.scatter_add_(2, ids, rows.transpose(1, 2)).view(b, *shape)
    raise ValueError("outer factors with token ids on both sides have no dense width")


def factor_clipped_sum(
    f: OuterFactors, factors: Tensor, shape: torch.Size, into: Tensor | None = None
) -> Tensor:
    """Σ_i C_i g_i shaped ``shape``: one matmul, or an index-add for a side of ids; added in
    place to ``into`` when given."""
    rows, cols = f.rows, f.cols
    if cols is None:  # a bias
        g = _shaped(factors.to(rows.dtype) @ rows.sum(dim=1), shape)
        return g if into is None else into.add_(g.to(into.dtype))
    if rows.is_floating_point() and cols.is_floating_point():
        view = None if into is None else _shaped(into, (rows.shape[-1], cols.shape[-1]))
        return _shaped(outer_clipped_sum(cols, rows, factors, into=view), shape)
    dense = cols if cols.is_floating_point() else rows
    ids = rows if dense is cols else cols
    target = dense.new_zeros(shape) if into is None else into
    scaled = (dense * factors.to(dense.dtype).view(-1, 1, 1)).reshape(-1, dense.shape[-1])
    if dense is cols:  # (vocab, width): rows of the vocabulary
        target.view(shape[0], -1).index_add_(0, ids.reshape(-1), scaled.to(target.dtype))
    else:  # (width, vocab): columns
        view = target.view(dense.shape[-1], -1)
        view.index_add_(1, ids.reshape(-1), scaled.t().to(target.dtype))
    return target


def _shaped(t: Tensor, shape: tuple[int, ...]) -> Tensor:
    """``t`` viewed as ``shape`` (no op when it has it already: host time counts per layer)."""
    return t if t.shape == shape else t.view(shape)


def _numel(shape: torch.Size) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_MEMO: contextvars.ContextVar[dict | None] = contextvars.ContextVar("dpclip_memo", default=None)


@contextlib.contextmanager
def factor_memo(memo: dict) -> Iterator[None]:
    """While active, the derived slots of one layer call build its outer factors once and reuse
    them (the engine opens one while it adds a call's record: choice, norms, per-sample grads)."""
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)


def call_memo(module: nn.Module, inputs: tuple, grad_output: Tensor) -> dict | None:
    """The open memo of this layer call (see :func:`factor_memo`), or None: a rule may keep
    what it derives from the call there, for its other slots on the same call."""
    memo = _MEMO.get()
    if memo is None:
        return None
    call = memo.setdefault("call", (module, inputs, grad_output))
    return memo if _same_call(call, module, inputs, grad_output) else None


def _memoized(outer_factors: OuterFactorsFn) -> OuterFactorsFn:
    def factors_of(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, OuterFactors]:
        memo = call_memo(module, inputs, grad_output)
        if memo is None:  # no memo open, or another call's
            return outer_factors(module, inputs, grad_output, names)
        built = memo.setdefault("factors", {})
        missing = [n for n in names if n not in built]
        if missing:
            built.update(outer_factors(module, inputs, grad_output, missing))
        return {n: built[n] for n in names}

    return factors_of


def _same_call(key: tuple, module: nn.Module, inputs: tuple, grad_output: Tensor) -> bool:
    return key[0] is module and key[1] is inputs and key[2] is grad_output


def checked_factors(
    module: nn.Module, got: object, names: Sequence[str], batch: int | None
) -> dict[str, OuterFactors]:
    """``got``, refused unless it has OuterFactors for every name whose sides are (batch,
    positions, width) or token ids (batch, positions), with the same positions: mismatched
    sides would broadcast in the pairwise products into a wrong norm without an error."""
    for n in names:
        f = got.get(n) if isinstance(got, Mapping) else None
        if isinstance(f, OuterFactors):
            rows = _positions(f.rows)
            cols = rows if f.cols is None else _positions(f.cols)  # None: a side of ones
            if rows is not None and rows == cols and rows[0] == batch:
                continue
            have = f"rows {_shape_or_type(f.rows)} and cols {_shape_or_type(f.cols)}"
        else:
            have = type(f).__name__
        raise ValueError(
            f"the layer rule for {type(module).__name__} returned {have} from outer_factors "
            f"for {n!r}; expected OuterFactors whose rows and cols are ({batch}, positions, "
            f"width) or token ids ({batch}, positions), with the same positions (an input of "
            "one position, (batch, width), is x.unsqueeze(1))"
        )
    return got  # type: ignore[return-value]


def _positions(side: object) -> tuple[int, ...] | None:
    """(batch, positions) of one side of outer factors; None if it is neither form."""
    if isinstance(side, Tensor) and side.dim() == (3 if side.is_floating_point() else 2):
        return tuple(side.shape[:2])
    return None


def _shape_or_type(x: object) -> str:
    return str(tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__


def checking(outer_factors: OuterFactorsFn) -> OuterFactorsFn:
    """``outer_factors`` whose every result is checked (a user's rule: see checked_factors)."""

    def checked(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, OuterFactors]:
        got = outer_factors(module, inputs, grad_output, names)
        return checked_factors(module, got, names, grad_output.shape[0])

    return checked


def from_outer_factors(outer_factors: OuterFactorsFn, **overrides: Any) -> LayerRule:
    """The rule of a layer whose per-example gradients are sums of outer products over
    positions; ``overrides`` replace any derived slot (e.g. ``norm_sq``, ``check``)."""

    factors_of = _memoized(outer_factors)

    def norm_sq(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> dict[str, Tensor]:
        got = factors_of(module, inputs, grad_output, names)
        return {n: factor_norm_sq(got[n], strategy) for n in names}

    def per_sample_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str]
    ) -> dict[str, Tensor]:
        got = factors_of(module, inputs, grad_output, names)
        return {n: factor_per_sample(got[n], _param(module, n).shape) for n in names}

    def clipped_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        got = factors_of(module, inputs, grad_output, list(factors))
        return {
            n: factor_clipped_sum(got[n], c, _param(module, n).shape) for n, c in factors.items()
        }

    def add_clipped_grad(
        module: nn.Module,
        inputs: tuple,
        grad_output: Tensor,
        factors: Mapping[str, Tensor],
        into: Mapping[str, Tensor],
    ) -> None:
        got = factors_of(module, inputs, grad_output, list(factors))
        for n, c in factors.items():
            factor_clipped_sum(got[n], c, _param(module, n).shape, into=into[n])

    def instantiates(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> Collection[str]:
        got = factors_of(module, inputs, grad_output, names)
        return [n for n in names if factor_builds(got[n], strategy)]

    slots = dict(
        norm_sq=norm_sq,
        clipped_grad=clipped_grad,
        per_sample_grad=per_sample_grad,
        instantiates=instantiates,
        outer_factors=outer_factors,
        add_clipped_grad=add_clipped_grad,
    )
    return LayerRule(**{**slots, **overrides})


def from_per_sample(
    per_sample_grad: PerSampleGrad, *, whole_call: bool = False, **overrides: Any
) -> LayerRule:
    """The rule of a layer whose per-example gradients are the cheap form (norm layers: (b, C);
    the fallback): norms and the clipped sum come from them, built once per call and reused."""

    def norm_sq(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> dict[str, Tensor]:
        grads = per_sample_grad(module, inputs, grad_output, names)
        return {n: sq_norms(g) for n, g in grads.items()}

    def clipped_grad(
        module: nn.Module, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        grads = per_sample_grad(module, inputs, grad_output, list(factors))
        return {n: weighted_sum(factors[n], g) for n, g in grads.items()}

    def always(
        module: nn.Module, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
    ) -> Collection[str]:
        return names

    slots = dict(
        norm_sq=norm_sq,
        clipped_grad=clipped_grad,
        per_sample_grad=per_sample_grad,
        instantiates=always,
        whole_call=whole_call,
    )
    return LayerRule(**{**slots, **overrides})
