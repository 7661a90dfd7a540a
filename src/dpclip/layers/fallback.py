"""The generic fallback: exact per-example gradients of a module's own parameters via torch.func.

A module whose own trainable parameters have no rule (a CLS token or positional table used in
forward, a transformers block's own norm, a layer subclass with its own forward) is recomputed
per example: ``vmap`` over the recorded call, each example run alone as a batch of one, and the
``vjp`` of its outputs with that example's output gradients gives g_i for the module's own
parameters (its children's are constants here; their own rules clip them). The random streams
are replayed from the state at the original call, so dropout draws the same masks. This is only
exact if each output row depends on its own example alone; the self-check tests that.

It instantiates b × (the module's own parameters), so it is meant for small parameters (tokens,
tables, norms); dpclip names every module that takes it, with that cost, at attach.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._C import _functorch as functorch
from torch.func import functional_call, vjp, vmap
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from dpclip.errors import IntegrityError
from dpclip.layers._attention_dropout import AttentionByParts
from dpclip.layers._derive import from_per_sample
from dpclip.layers._fingerprint import Fingerprint


@dataclass(frozen=True)
class RngState:
    """The CPU random state, and the CUDA device's if the call ran there."""

    cpu: Tensor
    cuda: tuple[int, Tensor] | None = None

    @staticmethod
    def capture(device: torch.device | None) -> RngState:
        cuda = None
        if device is not None and device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            cuda = (index, torch.cuda.get_rng_state(index))
        return RngState(torch.get_rng_state(), cuda)

    @contextlib.contextmanager
    def replayed(self) -> Iterator[None]:
        devices = [self.cuda[0]] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda[1], self.cuda[0])
            yield


def autocast_state(device: torch.device | None) -> tuple[str, torch.dtype] | None:
    """(device type, dtype) of the autocast region a call runs in, or None."""
    kind = device.type if device is not None else "cpu"
    if kind in ("cpu", "cuda") and torch.is_autocast_enabled(kind):
        return kind, torch.get_autocast_dtype(kind)
    return None


@dataclass(frozen=True)
class Call:
    """One recorded call of a module: its arguments (detached), the random state it started
    with, and which leaves of its (flattened) output carry the gradients, in order."""

    args: tuple
    kwargs: dict
    rng: RngState | None
    outputs: tuple[int, ...]
    expected: tuple[Fingerprint, ...] = ()  # of what the forward returned there, to check
    modes: tuple = ()  # torch function modes active at the call that the rerun must enter too
    autocast: tuple[str, torch.dtype] | None = None  # (device type, dtype) if autocast was on
    # the flattened arguments that hold one row per example; None: those with the batch on dim 0
    split: tuple[int, ...] | None = None
    by_parts: bool = False  # attention with dropout ran by parts in it: the rerun must too
    answers: tuple[bool, ...] = ()  # its branches on tensor values (bool(t)), in order
    # no tensor argument (a table made from the input's shape): its output has no batch dim,
    # and each example's rerun gives all of it
    batchless: bool = False

    def expanded(self, batch: int) -> Call:
        """This call with every batch-1 tensor argument (and output) expanded to ``batch``: its
        output is broadcast over the batch, so only those arguments are split per example (a
        batch-less one whose length is the batch, as positions (T,) with T = B, is not). A
        batchless call splits nothing (its fingerprint is of its output as one row)."""
        if self.batchless:
            expected = tuple(f.expanded(batch) for f in self.expected)
            return dataclasses.replace(self, expected=expected, split=())
        flat, spec = tree_flatten((self.args, self.kwargs))
        split = tuple(k for k, x in enumerate(flat) if expand_rows(x, batch) is not x)
        flat = [expand_rows(x, batch) for x in flat]
        args, kwargs = tree_unflatten(flat, spec)
        expected = tuple(f.expanded(batch) for f in self.expected)
        return dataclasses.replace(self, args=args, kwargs=kwargs, expected=expected, split=split)


def expand_rows(x: object, batch: int) -> object:
    """A tensor of one row expanded to ``batch`` rows (a view); anything else as it is."""
    if isinstance(x, Tensor) and x.dim() and x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    return x


_LOOPED: set[type] = set()  # module types whose vmap failed once: warned, looped since

# random calls whose mask the forward drew once for the whole tensor: on a tensor without the
# batch (DropConnect on a weight) the rerun would draw one per example instead
_DROPOUTS = {
    F.dropout: 2,
    F.dropout1d: 2,
    F.dropout2d: 2,
    F.dropout3d: 2,
    F.alpha_dropout: 2,
    F.feature_alpha_dropout: 2,
    torch.dropout: 2,
    torch.bernoulli: None,
    Tensor.bernoulli_: None,
}  # fmt: skip  (position of the ``training`` flag, None: always random)
_SCALED = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.dropout}  # x · mask / (1 − p)


def _is_batched(t: object) -> bool:
    """Whether ``t``, inside the rerun's vmap, carries the batch (an example's own tensor)."""
    while isinstance(t, Tensor) and functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def _dropout_args(func: object, args: tuple, kwargs: dict) -> tuple[float, bool]:
    """(p, whether it draws) of a call in :data:`_DROPOUTS`."""
    flag = _DROPOUTS[func]
    training = True if flag is None else kwargs.get("training", kwargs.get("train"))
    if training is None:
        training = args[flag] if len(args) > flag else True
    return kwargs.get("p", args[1] if len(args) > 1 else 0.5), bool(training)


class _Diverged(RuntimeError):
    """The vmapped rerun branched otherwise than the forward: the loop takes over."""


class _AsTheForward(TorchFunctionMode):
    """Branches on tensor values (``bool(t)``) inside the vmapped rerun, which vmap cannot take
    per example: each gets the answer the forward's call got, in order (transformers skips an
    all-ones padding mask: ``mask.all()``, ``mask.sum() == mask.numel()``). A branch on a
    tensor without the batch must get the same answer again; a rerun that branches more or
    less often than the forward (a loop over the examples inside the module) is not vmapped."""

    def __init__(self, answers: tuple[bool, ...]) -> None:
        super().__init__()
        self.answers, self.used = answers, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        if func is not Tensor.__bool__ or len(args) != 1:
            return func(*args, **(kwargs or {}))
        if self.used >= len(self.answers):
            raise _Diverged("it branches on tensor values more often than its forward did")
        answer, self.used = self.answers[self.used], self.used + 1
        if _is_batched(args[0]):
            return answer
        if func(*args) != answer:
            raise _Diverged("a branch on a tensor without the batch went the other way")
        return answer

    def finished(self) -> None:
        if self.used != len(self.answers):
            raise _Diverged("it branches on tensor values less often than its forward did")


class _OneMask(RuntimeError):
    """Dropout on a tensor without the batch in the vmapped rerun: the loop takes over."""


class _SharedRandomness(TorchFunctionMode):
    """Dropout on a tensor without the batch inside the vmapped rerun: vmap would draw a mask
    per example where the forward drew one for all, so the loop over examples takes over (it
    applies the forward's one mask to each); other random calls there are refused."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func in _DROPOUTS and args and not _is_batched(args[0]):
            p, drops = _dropout_args(func, args, kwargs)
            if drops and func in _SCALED and p:
                raise _OneMask(
                    f"{getattr(func, '__name__', func)} of a tensor without the batch, such as "
                    "dropout on a table or a weight, draws one mask for all examples"
                )
            if drops and (_DROPOUTS[func] is None or p):
                raise IntegrityError(
                    f"{type(self.module).__name__} applies {getattr(func, '__name__', func)} to a "
                    "tensor without the batch (a random mask on a weight or a table): the "
                    "forward drew one mask for all examples, and dpclip's fallback cannot draw "
                    "that mask again for each example alone. Use F.dropout for it (its one mask "
                    "is applied to each example), or give the module a rule with "
                    "dpclip.register_layer"
                )
        return func(*args, **kwargs)


class _DropoutMasks(TorchFunctionMode):
    """Dropout for the loop over examples, which draws differently from the batched forward:
    without ``row``, record each dropout call's multiplier (the call applied to ones: 0 or
    1/(1 − p) where it draws, ones under the self-check's no-dropout mode below it) by running
    the batched forward from its random state; with ``row``, apply that example's rows of
    them, call by call."""

    def __init__(self, masks: list[Tensor] | None = None, row: int | None = None) -> None:
        super().__init__()
        self.masks, self.row, self.calls = ([] if masks is None else masks), row, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func not in _SCALED:
            return func(*args, **kwargs)
        p, training = _dropout_args(func, args, kwargs)
        if not training or not p:
            return func(*args, **kwargs)
        x = args[0]
        inplace = kwargs.get("inplace", args[3] if len(args) > 3 else False)
        if self.row is None:  # the same draws as on x (they depend on the shape only)
            noise = func(torch.ones_like(x), *args[1:], **kwargs)  # in place on ones: ours
            self.masks.append(noise)
            return x.mul_(noise) if inplace else x * noise
        if self.calls >= len(self.masks):
            raise RuntimeError("more dropout calls than the batched forward made")
        noise, self.calls = self.masks[self.calls], self.calls + 1
        # the example's rows: one, or k where the forward flattened the batch into rows
        # batch-major ((B·T, d) tokens, (B·H, T, T) heads); a wrong guess shows in the rerun's
        # output, which is checked
        k = x.shape[0] if x.dim() and x.shape[1:] == noise.shape[1:] else 1
        # a tensor without the batch (a table): the one mask the forward drew, for each example
        mine = noise if noise.shape == x.shape else noise[self.row * k : (self.row + 1) * k]
        if mine.shape != x.shape:
            raise RuntimeError(f"a dropout mask of shape {tuple(mine.shape)} for {tuple(x.shape)}")
        return x.mul_(mine) if inplace else x * mine


class _Bare(nn.Module):
    """Runs a module's forward without its own hooks (its children's run as usual), as it was
    recorded: the arguments after its forward pre-hooks, its output before any forward hook of
    the user's (which acts on that output downstream, where its gradient comes from)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: object, **kwargs: object) -> object:
        return self.inner.forward(*args, **kwargs)


def per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Sequence[Tensor], names: Sequence[str]
) -> dict[str, Tensor]:
    """g_i for ``names`` (own parameters of ``module``): (b, *param.shape) each."""
    (call,) = inputs
    batch = grad_output[0].shape[0]
    params = {n: module.get_parameter(n).detach() for n in names}
    flat, spec = tree_flatten((call.args, call.kwargs))
    rows = (
        list(call.split)
        if call.split is not None
        else [k for k, x in enumerate(flat) if _per_example(x, batch)]
    )
    grads = tuple(grad_output)

    bare = _Bare(module)

    def forward(q: dict, args: tuple, kwargs: dict) -> object:
        return functional_call(bare, {f"inner.{n}": p for n, p in q.items()}, args, kwargs)

    def grad_of_example(p: dict, batched: list, cot: tuple) -> dict:
        leaves = list(flat)
        for k, x in zip(rows, batched, strict=True):
            leaves[k] = x.unsqueeze(0)  # the example as a batch of one
        args, kwargs = tree_unflatten(leaves, spec)

        def outputs(q: dict) -> tuple:
            out = tree_leaves(forward(q, args, kwargs))
            return tuple(out[k] for k in call.outputs)

        out, pull = vjp(outputs, p)
        if call.batchless:  # each example's rerun gives the whole output
            return pull(cot)[0], out
        return pull(tuple(c.unsqueeze(0) for c in cot))[0], tuple(o.squeeze(0) for o in out)

    def parts(vmapped: bool = False) -> tuple[TorchFunctionMode, ...]:
        return (AttentionByParts(every=vmapped),) if call.by_parts or vmapped else ()

    def replay(
        *above: TorchFunctionMode, vmapped: bool = False, attention: bool = True
    ) -> contextlib.AbstractContextManager:
        """The call's random state, modes and autocast; then ``above``, and (unless the caller
        enters it above modes of its own) attention computed by parts as in the forward (on
        top: its dropout reaches the modes below; under vmap every attention call)."""
        stack = contextlib.ExitStack()
        if call.rng is not None:
            stack.enter_context(call.rng.replayed())
        for mode in call.modes:  # the self-check's no-dropout mode
            stack.enter_context(mode)
        if call.autocast is not None:  # backward runs outside the forward's autocast region
            stack.enter_context(torch.autocast(call.autocast[0], dtype=call.autocast[1]))
        stack.enter_context(warnings.catch_warnings())
        # torch notes each op it vmaps by a slow path (SDPA on CPU); the attach line said so
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        for mode in (*above, *(parts(vmapped) if attention else ())):
            stack.enter_context(mode)
        return stack

    # below attention by parts: the mode refusing shared masks sees its dropout
    branches = _AsTheForward(call.answers)
    with replay(_SharedRandomness(module), branches, vmapped=True):
        if type(module) not in _LOOPED:
            try:
                got, again = vmap(grad_of_example, in_dims=(None, 0, 0), randomness="different")(
                    params, [flat[k] for k in rows], grads
                )
                branches.finished()
                _check_recomputed(module, call, again)
                return got
            except IntegrityError as err:
                if not isinstance(err, _Mismatch):
                    raise
                # vmap draws a dropout mask in the logical order of its batch, the forward in
                # its tensor's memory order: the loop applies the forward's masks (and checks
                # the rows again, so rows that truly depend on other examples are refused)
                _loop_from_now(module, "its rerun did not reproduce the forward's rows")
            except Exception as err:  # an op without a batching rule: loop instead, exactly
                _loop_from_now(module, str(err))
    drawn = _DropoutMasks()
    with replay(drawn), torch.no_grad():  # the forward's masks, again
        forward(params, call.args, call.kwargs)
    with replay(attention=False):  # from the call's random state again
        try:
            per_example = []
            for i in range(batch):  # each example with its own rows of those masks
                with _DropoutMasks(drawn.masks, row=i), contextlib.ExitStack() as stack:
                    for mode in parts():  # above the masks: its dropout takes them
                        stack.enter_context(mode)
                    cot = tuple(g[i] for g in grads)
                    per_example.append(grad_of_example(params, [flat[k][i] for k in rows], cot))
        except Exception as err:
            raise IntegrityError(
                f"dpclip's fallback could not run {type(module).__name__} on one example at a "
                f"time ({type(err).__name__}: {err}); an argument with the batch on dim 0 that is "
                "not per example (a (T, T) mask when T equals the batch) is split per example. "
                "Give the module a rule with dpclip.register_layer, or freeze its parameters"
            ) from err
    again = tuple(torch.stack(outs) for outs in zip(*(o for _, o in per_example), strict=True))
    _check_recomputed(module, call, again)
    return {n: torch.stack([g[n] for g, _ in per_example]) for n in names}


def _loop_from_now(module: nn.Module, why: str) -> None:
    _LOOPED.add(type(module))
    warnings.warn(
        f"dpclip's fallback could not vmap {type(module).__name__} ({why}); its per-example "
        "gradients are computed in a loop over examples (slower)",
        stacklevel=3,
    )


class _Mismatch(IntegrityError):
    """The rerun's rows differ from the forward's."""


_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}  # relative to a token's norm


def _check_recomputed(module: nn.Module, call: Call, again: tuple[Tensor, ...]) -> None:
    """Each example run alone must give its rows of the forward's output: else g_i would not
    be that example's gradient (rows that depend on other examples, an argument with the batch
    on dim 0 that is not per example, a forward that keeps state between calls)."""
    for k, (want, got) in enumerate(zip(call.expected, again, strict=False)):
        diff = want.difference(got)
        # under autocast the rows were computed at its precision, whatever their dtype now
        dtype = got.dtype if call.autocast is None else call.autocast[1]
        if not diff <= _TOLERANCE.get(dtype, 3e-2):  # NaN too
            raise _Mismatch(
                f"dpclip's fallback ran each example of {type(module).__name__} alone and got "
                f"output tensor {k} different from the forward's rows (relative difference "
                f"{diff:.2g}): its rows do not depend on their own example only, an argument "
                "with the batch on dim 0 is not per example, or its forward keeps state between "
                "calls (a cache). Per-example gradients taken this way would be wrong; give the "
                "module a rule with dpclip.register_layer, or freeze its parameters"
            )


def _per_example(x: object, batch: int) -> bool:
    return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch


def per_example_bytes(module: nn.Module, names: Sequence[str]) -> int:
    """What the fallback holds per example for ``module``: its own parameters' gradients."""
    params = [module.get_parameter(n) for n in names]
    return sum(p.numel() * p.element_size() for p in params)


RULE = from_per_sample(per_sample_grad, whole_call=True)
