"""The self-check: dpclip's per-example gradient norms against the naive per-example loop.

DP's guarantee holds only if every clipped unit is one training example. Shapes cannot prove
that (a batch flattened into tokens of the right count, a layer looped over examples, a loss
mixing examples all look fine), so on the first physical batch, and on ``engine.verify``, a few
examples (2-4) are run alone through ordinary autograd and their gradient norms, parameter by
parameter, are compared with the ones dpclip computes for the same batch. Both sides run in the
model's own mode (training, so a statistic taken only in training is seen) with every dropout
call made the identity; the check releases nothing (no step, no noise, no gradient written), so it
costs no privacy, and it leaves the model, its gradients, the optimizer, the RNG streams and the
ledger as they were.

The loss is the one recorded from the training loop (:mod:`dpclip._loss_tape`). When it is
computed from per-example rows of the model's output (``F.cross_entropy(model(x), y)``), example
i's oracle gradient is that of the batch's loss with only row i recomputed from example i alone,
and the loss must not mix rows: example i's output gradient may not change when the other
examples' outputs change, nor when their labels (any tensor of the loss with the batch on dim 0)
do. When the model returns the loss itself (transformers with ``labels``), example i is run alone
with its own inputs, and its loss must be the batch's per-example loss (times the batch size
under ``loss_reduction="mean"``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from dpclip._loss_tape import LossTape, remove
from dpclip.errors import SelfCheckError
from dpclip.hooks import batch_of

_HINTS = (
    "Common causes: a trainable layer fed the batch flattened into tokens or in a sequence-first "
    "layout, a layer applied to chunks of the batch or to one example at a time, a tensor "
    "without a batch dim broadcast over it, a parameter used outside its layer, a forward or a "
    "loss that mixes examples. The step was refused and nothing changed; see the README's "
    "limits. Pass verify=False only if you know why the check is wrong for your model."
)


@dataclass(frozen=True)
class CheckResult:
    """What the self-check compared: which examples, and the largest relative difference."""

    examples: tuple[int, ...]
    max_relative_difference: float
    loss_from_rows: bool  # the loss was computed from per-example rows of the output


@dataclass(frozen=True)
class Subject:
    """What the check needs of the engine."""

    model: nn.Module
    params: Sequence[nn.Parameter]
    names: dict[int, str]
    hooks_off: Callable[[], contextlib.AbstractContextManager]
    dpclip_norms_sq: Callable[[Tensor], dict[nn.Parameter, Tensor]]  # backward, norms² (b,)
    mean_reduction: bool


def rtol_for(dtype: torch.dtype) -> float:
    return {torch.float64: 1e-5, torch.float32: 2e-3}.get(dtype, 3e-2)


def rows_to_check(batch: int) -> tuple[int, ...]:
    """First, middle and last: a batch split in halves or reversed pairs them with others."""
    return tuple(sorted({0, batch // 2, batch - 1}))


def _live_rows(grads: list[Tensor], batch: int) -> tuple[int, ...]:
    """First, middle and last of the rows whose output gradient is not all zero (a padded
    example without a labelled token has none: its gradient cannot show the loss mixing)."""
    peaks = torch.stack([g.detach().reshape(batch, -1).abs().amax(1).float() for g in grads])
    live = (peaks.amax(0) > 0).nonzero().flatten().tolist()
    return tuple(live[i] for i in rows_to_check(len(live))) if live else ()


def example(args: tuple, kwargs: dict, batch: int, i: int) -> tuple[tuple, dict]:
    """The model's arguments for example ``i`` alone: every tensor with the batch on dim 0 sliced."""

    def take(x: object) -> object:
        if isinstance(x, Tensor) and x.dim() and x.shape[0] == batch:
            return x[i : i + 1]
        return x

    return tree_map(take, (args, kwargs))


_DROPOUTS = {
    F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout,
    torch.dropout, torch.alpha_dropout, torch.feature_dropout, torch.feature_alpha_dropout,
}  # fmt: skip
_DROPOUT_IDS = frozenset(map(id, _DROPOUTS))  # tested by id: an op object may be unhashable


class _NoDropout(TorchFunctionMode):
    """Every dropout call is the identity (attention's dropout_p is 0): the model keeps its own
    training mode, so batch statistics taken only in training are compared too. The generic
    fallback's rerun during backward (where this mode is not on the stack) enters it again."""

    replay_in_rerun = True

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if id(func) in _DROPOUT_IDS:
            return args[0] if args else kwargs["input"]
        if func is F.scaled_dot_product_attention:
            if len(args) > 4:
                args = (*args[:4], 0.0, *args[5:])
            elif "dropout_p" in kwargs:
                kwargs = {**kwargs, "dropout_p": 0.0}
        return func(*args, **kwargs)


def _stochastic_depth(module: nn.Module) -> bool:
    """transformers' and timm's ``*DropPath``, torchvision's ``StochasticDepth``: each drops
    whole examples at random in training and is the identity outside it (no statistics)."""
    name = type(module).__name__
    return name.endswith("DropPath") or name == "StochasticDepth"


@contextlib.contextmanager
def unchanged(model: nn.Module) -> Iterator[None]:
    """No dropout (stochastic depth layers in eval mode: they draw per example, which the check
    cannot repeat), gradients on, RNG streams and training flags restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    no_dropout = _NoDropout()
    try:
        for m, _ in flags:
            if _stochastic_depth(m):
                m.training = False
        with torch.random.fork_rng(devices=devices), torch.enable_grad():
            no_dropout.__enter__()
            yield
    finally:
        remove(no_dropout)  # this mode, not whatever is on top: dropout must come back
        for m, flag in flags:
            m.training = flag


def check(subject: Subject, args: tuple, kwargs: dict, tape: LossTape) -> CheckResult:
    """Compare dpclip's per-example norms with each example run alone; raise if they differ."""
    source = batch_of(args, kwargs)
    if source is None:
        raise SelfCheckError("the self-check needs the model's input: no tensor argument given")
    batch = int(source.shape[0])
    rtol = rtol_for(subject.params[0].dtype)
    with unchanged(subject.model):
        out = subject.model(*args, **kwargs)
        leaves, spec = tree_flatten(out)
        fixed = [t.detach().clone() if isinstance(t, Tensor) else t for t in leaves]
        try:
            raw = subject.dpclip_norms_sq(_scalar(_replay(tape, out)))
            del out, leaves  # the forward's activations go before the output-sized work below
            used, base = _used_leaves(tape, fixed, spec)
            from_rows = all(fixed[k].dim() and fixed[k].shape[0] == batch for k in used)
            rows = rows_to_check(batch)
            if from_rows:  # among the examples the loss uses: a row without labels shows nothing
                rows = _live_rows(base, batch) or rows
                _check_rows_do_not_mix(tape, fixed, spec, used, _RowGrads(base, rows), rows, rtol)
            del base
            worst = 0.0
            with subject.hooks_off():
                for i in rows:
                    rows_used = used if from_rows else None
                    norms = _alone(subject, args, kwargs, batch, i, tape, fixed, spec, rows_used)
                    scale = 1.0 if from_rows or not subject.mean_reduction else float(batch)
                    worst = max(worst, _compare(subject, raw, norms, i, scale, rtol, from_rows))
        except _ReplayError as err:
            raise SelfCheckError(str(err) + _flattened_hint(fixed, batch)) from err.__cause__
    return CheckResult(rows, worst, from_rows)


class _ReplayError(SelfCheckError):
    """The loss could not be computed again (on another output, or an example's alone)."""


def _flattened_hint(outputs: list, batch: int) -> str:
    """Why the loss may fail on an example's output alone: a model output of B·k rows."""
    shape = next(
        (
            tuple(t.shape) for t in outputs
            if isinstance(t, Tensor) and t.dim() and t.shape[0] > batch and not t.shape[0] % batch
        ),
        None,
    )  # fmt: skip
    if shape is None:
        return ""
    return (
        f" The model's output has shape {shape} for a batch of {batch}: the batch flattened "
        "into tokens? Return it batch-first, (B, T, ...), and flatten it in the loss "
        "(logits.view(-1, V)), as transformers' models do."
    )


def _replay(tape: LossTape, output: object, like: tuple[int, int] | None = None) -> Tensor:
    try:
        return tape.loss(output, like)
    except Exception as err:
        raise _ReplayError(
            f"dpclip's self-check could not compute the loss again on another output ({err!r}); "
            "call engine.verify(*inputs, loss_fn=...) with a loss it can, or pass verify=False "
            "to PrivacyEngine if you know your model clips true examples. Nothing changed."
        ) from err


def _scalar(loss: object) -> Tensor:
    if not (isinstance(loss, Tensor) and loss.numel() == 1):
        what = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise SelfCheckError(f"the loss must be one number (a scalar tensor), got {what}")
    return loss.reshape(())


def _used_leaves(tape: LossTape, fixed: list, spec: object) -> tuple[list[int], list[Tensor]]:
    """The output tensors the loss depends on, and the loss's gradient with respect to each."""
    floats = [k for k, t in enumerate(fixed) if isinstance(t, Tensor) and t.is_floating_point()]
    grads = _output_grads(tape, fixed, spec, floats)
    used = [(k, g) for k, g in zip(floats, grads, strict=True) if g is not None]
    return [k for k, _ in used], [g for _, g in used]


def _output_grads(tape: LossTape, leaves: list, spec: object, used: list[int], like=None) -> list:
    """The loss's gradient with respect to each used output leaf (one output-sized copy each:
    the seed shares the leaf's memory, the loss gets a copy it may change in place)."""
    probe, seeds = list(leaves), [leaves[k].detach().requires_grad_() for k in used]
    for k, seed in zip(used, seeds, strict=True):
        probe[k] = seed.clone()  # not a leaf, and not the leaf's memory
    loss = _scalar(_replay(tape, tree_unflatten(probe, spec), like))
    if not loss.requires_grad:
        raise SelfCheckError("the loss does not depend on the model's output")
    return list(torch.autograd.grad(loss, seeds, allow_unused=True))


@dataclass(frozen=True)
class _RowGrads:
    """What the mixing check keeps of the output gradients: the checked rows and each leaf's
    largest magnitude, not the output-sized tensors (a language model's logits: 40 MB each)."""

    rows: dict[int, list[Tensor]]
    largest: list[float]

    def __init__(self, grads: list[Tensor], rows: Sequence[int]) -> None:
        object.__setattr__(self, "rows", {i: [g[i].clone() for g in grads] for i in rows})
        object.__setattr__(self, "largest", [float(g.abs().max()) for g in grads])


def _check_rows_do_not_mix(
    tape: LossTape, fixed: list, spec: object, used: list[int], base: _RowGrads, rows, rtol: float
) -> None:
    """Example i's output gradient (``base``) must not change when every other example's output
    does, when every other example gets example i's labels (a class-weighted or token-count
    mean), nor when every other example becomes a copy of example i, output and labels (a loss
    that selects examples, such as the batch's hardest: a per-example loss gives example i the
    same gradient whoever the others are). A gradient that turns NaN or infinite counts as a
    change (standardising over a batch of equal values divides by 0). One output-sized variant
    at a time, each dropped before the next."""
    batch = fixed[used[0]].shape[0]
    if batch == 1:
        return
    generator = torch.Generator(device=fixed[used[0]].device).manual_seed(0)

    def moved(i: int) -> list:
        out = list(fixed)
        for k in used:
            t = fixed[k]
            scale = float(0.5 * t.std() + 1e-3)
            out[k] = torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)
            out[k].mul_(scale).add_(t)
            out[k][i] = t[i]
        return out

    def copies(i: int) -> list:
        out = list(fixed)
        for k in used:
            out[k] = fixed[k][i : i + 1].expand_as(fixed[k]).clone()
        return out

    for i in rows:
        for what in ("outputs", "labels", "copies"):
            if what == "outputs":
                grads = _output_grads(tape, moved(i), spec, used)
            elif what == "labels":
                grads = _output_grads(tape, fixed, spec, used, like=(batch, i))
            else:
                grads = _output_grads(tape, copies(i), spec, used, like=(batch, i))
            for g0, g1, largest in zip(base.rows[i], grads, base.largest, strict=True):
                # `not <=`: a NaN difference is a change
                if g1 is not None and not (
                    float((g1[i] - g0).abs().max()) <= 10 * rtol * largest + 1e-30
                ):
                    raise SelfCheckError(_mixing_message(i, what))
            del grads


def _mixing_message(i: int, what: str) -> str:
    cause = {
        "outputs": "an in-batch contrastive loss, a loss normalised by batch statistics",
        "labels": "a class-weighted mean, a mean over all tokens of padded sequences: each "
        "example is weighted by the others' labels",
        "copies": "a loss over the hardest examples (max, top-k), targets standardised over the "
        "batch",
    }[what]
    change = {
        "outputs": "only the other examples' outputs change",
        "labels": "only the other examples' labels change",
        "copies": "every other example becomes a copy of it",
    }[what]
    return (
        f"the loss mixes examples: example {i}'s gradient with respect to the model's output "
        f"changes when {change} ({cause}). Per-example gradients "
        "do not exist then, so clipping cannot bound one example's influence: compute the loss "
        "as the mean (or sum) over examples of each example's own loss. " + _HINTS
    )


def _alone(
    subject: Subject, args, kwargs, batch: int, i: int, tape: LossTape, fixed, spec, rows_used
) -> list[Tensor | None]:
    """Example i's gradient norms from ordinary autograd, with the model run on it alone.
    ``rows_used``: the output leaves the loss reads per example (None: the model's own loss)."""
    args_i, kwargs_i = example(args, kwargs, batch, i)
    try:
        leaves_i, spec_i = tree_flatten(subject.model(*args_i, **kwargs_i))
    except Exception as err:
        raise SelfCheckError(
            f"running example {i} alone through the model failed ({err!r}). The self-check slices "
            f"every model argument whose dim 0 is the batch size ({batch}); a model that cannot "
            "run on one example, or takes a non-batch tensor of that length, cannot be checked: "
            "pass verify=False if you know it clips true examples. " + _HINTS
        ) from err
    if rows_used is not None:
        if spec_i != spec:
            raise SelfCheckError(f"example {i} alone gives an output of another structure")
        mixed = list(fixed)
        for k in rows_used:
            row, mine = fixed[k][i : i + 1], leaves_i[k]
            if mine.shape != row.shape or not torch.allclose(
                mine.detach(), row, rtol=rtol_for(row.dtype), atol=_atol(row)
            ):
                raise SelfCheckError(
                    f"the model's output for example {i} run alone differs from its row in the "
                    "batch: the forward mixes examples (a statistic over the batch such as "
                    "h.mean(0), a hand-written batch norm, mixup), or it draws random numbers "
                    "other than dropout (stochastic depth), which the check cannot repeat. "
                    "Per-example gradients do not exist then; compute every example's output "
                    "from that example alone. " + _HINTS
                )
            mixed[k] = torch.cat([fixed[k][:i], mine, fixed[k][i + 1 :]])
        loss = _replay(tape, tree_unflatten(mixed, spec))
    else:
        loss = _replay(tape, tree_unflatten(leaves_i, spec_i))
    return _gradient_norms(_scalar(loss), subject.params)


def _gradient_norms(loss: Tensor, params: Sequence[nn.Parameter]) -> list[Tensor | None]:
    """Each parameter's gradient norm, without holding all gradients at once: a hook reads each
    one as it arrives and hands autograd an expanded zero instead (no memory), so the check's
    peak stays that of a training step even for a GPT-2 (124 M gradients would be 0.5 GB)."""
    norms: list[Tensor | None] = [None] * len(params)

    def reader(k: int) -> Callable[[Tensor], Tensor]:
        def read(g: Tensor) -> Tensor:
            norms[k] = torch.linalg.vector_norm(g)
            return torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)

        return read

    handles = [p.register_hook(reader(k)) for k, p in enumerate(params)]
    try:
        torch.autograd.grad(loss, list(params), allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return norms


def _atol(t: Tensor) -> float:
    return rtol_for(t.dtype) * (float(t.abs().max()) if t.numel() else 0.0) + 1e-30


def _compare(
    subject: Subject, raw: dict, norms: list, i: int, scale: float, rtol: float, from_rows: bool
) -> float:
    """The largest relative difference between dpclip's and the loop's norms for example i
    (relative to the larger of the two, or to 1% of the example's whole gradient norm)."""
    theirs = [0.0 if g is None else float(g) for g in norms]
    total = math.sqrt(sum(t * t for t in theirs))
    worst = 0.0
    for p, want in zip(subject.params, theirs, strict=True):
        sq = raw.get(p)
        have = 0.0 if sq is None else math.sqrt(max(float(sq[i]), 0.0)) * scale
        gap = abs(have - want)
        worst = max(worst, gap / (max(have, want, 1e-2 * total) + 1e-30))
        if gap > rtol * max(have, want) + rtol * 1e-2 * total + 1e-30:
            own_loss = (
                ""
                if from_rows
                else "The model computes the loss itself: it must be the mean over examples of "
                "each example's own loss (a mean over all tokens of padded sequences weighs "
                "examples by their token counts; average per example instead), or their sum "
                "with loss_reduction='sum'. "
            )
            raise SelfCheckError(
                f"dpclip's per-example gradient norm of {subject.names[id(p)]!r} for example {i} "
                f"is {have:.6g}, but {want:.6g} when example {i} is run alone through ordinary "
                "autograd (the naive per-example loop), so dpclip would not clip true examples. "
                + own_loss
                + _HINTS
            )
    return worst


def graph_leaves(loss: Tensor) -> list[Tensor]:
    """The tensors whose gradient ``loss.backward()`` would accumulate."""
    leaves, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)
        if isinstance(variable, Tensor):
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves
