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
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from dpclip.layers._derive import from_per_sample


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


@dataclass(frozen=True)
class Call:
    """One recorded call of a module: its arguments (detached), the random state it started
    with, and which leaves of its (flattened) output carry the gradients, in order."""

    args: tuple
    kwargs: dict
    rng: RngState | None
    outputs: tuple[int, ...]

    def expanded(self, batch: int) -> Call:
        """This call with every batch-1 tensor argument expanded to ``batch`` rows."""
        flat, spec = tree_flatten((self.args, self.kwargs))
        flat = [
            x.expand(batch, *x.shape[1:])
            if isinstance(x, Tensor) and x.dim() and x.shape[0] == 1
            else x
            for x in flat
        ]
        args, kwargs = tree_unflatten(flat, spec)
        return Call(args, kwargs, self.rng, self.outputs)


_LOOPED: set[type] = set()  # module types whose vmap failed once: warned, looped since


def per_sample_grad(
    module: nn.Module, inputs: tuple, grad_output: Sequence[Tensor], names: Sequence[str]
) -> dict[str, Tensor]:
    """g_i for ``names`` (own parameters of ``module``): (b, *param.shape) each."""
    (call,) = inputs
    batch = grad_output[0].shape[0]
    params = {n: module.get_parameter(n).detach() for n in names}
    flat, spec = tree_flatten((call.args, call.kwargs))
    rows = [k for k, x in enumerate(flat) if _per_example(x, batch)]
    grads = tuple(grad_output)

    def grad_of_example(p: dict, batched: list, cot: tuple) -> dict:
        leaves = list(flat)
        for k, x in zip(rows, batched, strict=True):
            leaves[k] = x.unsqueeze(0)  # the example as a batch of one
        args, kwargs = tree_unflatten(leaves, spec)

        def outputs(q: dict) -> tuple:
            out = tree_leaves(functional_call(module, q, args, kwargs))
            return tuple(out[k] for k in call.outputs)

        _, pull = vjp(outputs, p)
        return pull(tuple(c.unsqueeze(0) for c in cot))[0]

    replay = call.rng.replayed() if call.rng is not None else contextlib.nullcontext()
    with replay, warnings.catch_warnings():
        # torch notes each op it vmaps by a slow path (SDPA on CPU); the attach line said so
        warnings.filterwarnings("ignore", message="There is a performance drop because")
        if type(module) not in _LOOPED:
            try:
                return vmap(grad_of_example, in_dims=(None, 0, 0), randomness="different")(
                    params, [flat[k] for k in rows], grads
                )
            except Exception as err:  # an op without a batching rule: loop instead, exactly
                _LOOPED.add(type(module))
                warnings.warn(
                    f"dpclip's fallback could not vmap {type(module).__name__} ({err}); its "
                    "per-example gradients are computed in a loop over examples (slower)",
                    stacklevel=2,
                )
        per_example = [
            grad_of_example(params, [flat[k][i] for k in rows], tuple(g[i] for g in grads))
            for i in range(batch)
        ]
    return {n: torch.stack([g[n] for g in per_example]) for n in names}


def _per_example(x: object, batch: int) -> bool:
    return isinstance(x, Tensor) and x.dim() > 0 and x.shape[0] == batch


def per_example_bytes(module: nn.Module, names: Sequence[str]) -> int:
    """What the fallback holds per example for ``module``: its own parameters' gradients."""
    return sum(
        module.get_parameter(n).numel() * module.get_parameter(n).element_size() for n in names
    )


RULE = from_per_sample(per_sample_grad, whole_call=True)
