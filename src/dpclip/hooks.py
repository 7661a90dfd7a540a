"""Capture each layer call's inputs and output gradient, one example per row of dim 0.

The batch size of every forward pass is read from the model's own input: dim 0 of the first
tensor it is called with (positionally or by keyword). Every recorded layer call must carry that
batch on dim 0 of its output, or it is refused (:class:`dpclip.IntegrityError`): a layer fed the
batch flattened into tokens, a sequence-first layout or one chunk of the batch would otherwise be
clipped per row, and a row would not be an example. Layer calls outside the model's forward are
refused too (their batch is unknown).

A forward hook stores the call's (detached) inputs, bound to the layer's positional parameters
so keyword calls (``fc(input=x)``) work, in a :class:`Record`, and hooks the output tensor so its
gradient lands in the same record during backward. Each record is handed to ``on_grad`` as soon
as its gradient arrives (a pending output's, below, when the pass ends); ``on_backward_end`` is
called once when that backward pass ends. Records are owned by the autograd graph, so a forward
that never sees a backward leaks nothing.

A layer output without the batch is *pending*: one of batch 1 inside a forward of batch B > 1
(GPT-2's position embedding of ``position_ids`` (1, T)), or the output of a layer whose inputs
are all constants, made inside the forward from factories (``torch.arange``) or read from the
model's buffers, whatever its shape (``pos(torch.arange(T))`` (T, d), T5's relative-position
bias on (T, T) buckets, also when T happens to equal B). The model gets it unchanged; the forward
guard follows the tensors computed from pending outputs and constants only (a permute, a dropout,
a mask put on), and each place one of them is broadcast over the batch (``h + wpe(pos)``, scores
``+ bias[None]``, an attention mask) uses a copy of it with one row per example
(:meth:`Recorder.broadcast_use`), whose gradient is taken back, per example, to the layer's
output; the broadcasts' gradients of one output are summed into one recorded call, handed on
when the backward pass ends. Any other use (concatenated with the batch, returned, fed to a
layer with parameters, changed in place after a broadcast) would merge examples, and is refused;
so is a gradient that reaches the output another way, and a change in place to the layer's
constant inputs after the call.

Modules whose rule reads the whole call (the generic fallback) are recorded with all their
arguments, positional and keyword, and the random state they started with, and may return any
structure of tensors: every floating-point tensor in it must carry the batch, and their output
gradients arrive together, as a tuple, in one record.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from functools import cache

import torch
from torch import Tensor, nn
from torch.autograd import Variable
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map, tree_unflatten
from torch.utils.hooks import RemovableHandle

from dpclip import _layouts
from dpclip.errors import DoubleBackwardError, IntegrityError
from dpclip.layers._fingerprint import Fingerprint
from dpclip.layers.fallback import Call, RngState, autocast_state, expand_rows


@dataclass(eq=False)
class Record:
    """One call of one layer: its inputs, the forward it belongs to, and its output gradient."""

    module: nn.Module
    inputs: tuple
    batch: int  # the model's batch in that forward
    forward: int  # which forward of the model made it
    grad_output: Tensor | tuple[Tensor, ...] | None = None  # a tuple for whole-call records
    done: bool = False  # its gradient arrived (the consumer may drop inputs/grad_output)
    versions: tuple = ()  # the input tensors' versions at the call (None for a non-tensor)


class _Gather(torch.autograd.Function):
    """Identity on several outputs whose gradients arrive in one call of its backward."""

    @staticmethod
    def forward(ctx, anchor: Tensor, record: Record, on_grad: Callable, *outputs: Tensor):  # type: ignore[override]
        ctx.record, ctx.on_grad = record, on_grad
        return tuple(o.detach() for o in outputs)

    @staticmethod
    def backward(ctx, *grads: Tensor) -> tuple:  # type: ignore[override]
        ctx.on_grad(ctx.record, tuple(grads))
        return (None, None, None, *grads)


class _Attach(torch.autograd.Function):
    """Identity that links an output into the graph via a dummy leaf (one that needs no
    gradient), as a tensor of its own (not a view: an in-place change keeps its hooks)."""

    @staticmethod
    def forward(ctx, anchor: Tensor, output: Tensor) -> Tensor:  # type: ignore[override]
        return output.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad


class _Carry(torch.autograd.Function):
    """The values of ``value`` (as they are), with the gradient going to ``carrier`` instead
    (of the same shape): a use of B alike rows computes with its own rows, and its gradient is
    row 0's for every example."""

    @staticmethod
    def forward(ctx, value: Tensor, carrier: Tensor) -> Tensor:  # type: ignore[override]
        return value.detach()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor]:  # type: ignore[override]
        return None, grad


# the per-example gradients of a pending tensor used row by row are made in chunks of examples
# of at most this many bytes (each example's is as large as the tensor)
_ROWS_BYTES = 256 << 20

# layers whose rules take inputs with any leading dims, each output row from its own input row:
# one on constants, or on pending outputs, gets each example's copy of its inputs as one more
# leading dim (a convolution's or a group norm's would not)
ROW_WISE = (nn.Embedding, nn.Linear, nn.LayerNorm, nn.RMSNorm)

_FIXES = (
    "dpclip clips one example per row of dim 0, so every layer must see the model's batch "
    "there, or the batch flattened into tokens by a reshape of a batch-first tensor "
    "(h.reshape(-1, d) of (B, T, d), not of a transposed (T, B, d) one, and not reordered or "
    "changed in place afterwards; an embedding, linear layer or norm only): keep the batch as "
    "the leading dim (x.view(B, T, d): nn.Linear takes any leading dims), use a batch-first "
    "layout (not (T, B, d)), and do not split the batch inside forward (chunk, per-example loops)"
)


@cache
def _positional_names(forward: Callable) -> tuple[inspect.Signature, tuple[str, ...], str | None]:
    sig = inspect.signature(forward)
    names, star = [], None
    for name, p in list(sig.parameters.items())[1:]:  # skip self
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(name)
        else:
            star = name if p.kind is p.VAR_POSITIONAL else None
            break
    return sig, tuple(names), star


def positional_inputs(module: nn.Module, args: tuple, kwargs: dict) -> tuple:
    """The call's arguments as the positional tuple a layer rule reads (keyword calls bound)."""
    if not kwargs:
        return args
    sig, names, star = _positional_names(type(module).forward)
    bound = sig.bind(module, *args, **kwargs)
    bound.apply_defaults()
    values = tuple(bound.arguments[n] for n in names)
    return values + tuple(bound.arguments.get(star, ())) if star else values


# the keyword inputs transformers models take their batch from, whatever the keywords' order
_INPUT_KEYWORDS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def batch_of(args: tuple, kwargs: dict) -> Tensor | None:
    """The tensor a model call takes its batch from: the first with a dim, positional first;
    among keywords, a model input by its transformers name before the others (a batch-1
    ``position_ids`` passed first is not the batch)."""
    if args and isinstance(args[0], Tensor) and args[0].dim():  # the usual call: no tree walk
        return args[0]
    if not args:
        for key in _INPUT_KEYWORDS:
            t = kwargs.get(key)
            if isinstance(t, Tensor) and t.dim():
                return t
    return next((t for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor) and t.dim()), None)


PLAIN_TENSORS = (Tensor, nn.Parameter)  # tensor types no torch function handling changes
_NESTED = (list, tuple, dict)


def _plain(x: object) -> bool:
    """No tensor subclass in ``x`` (a tensor, or a list or tuple of tensors and non-containers):
    nothing that torch function handling would change. Deeper containers count as not plain."""
    if isinstance(x, Tensor):
        return type(x) in PLAIN_TENSORS
    if isinstance(x, (list, tuple)):
        return all(
            type(t) in PLAIN_TENSORS if isinstance(t, Tensor) else not isinstance(t, _NESTED)
            for t in x
        )
    return not isinstance(x, dict)


def _expand(x: object, batch: int) -> object:
    return x.expanded(batch) if isinstance(x, Call) else expand_rows(x, batch)


@dataclass(eq=False)
class _Running:
    """A whole-call module's call in progress: whether attention with dropout ran by parts in
    it, and the answers of the branches on tensor values it took (its rerun does the same)."""

    module: nn.Module
    by_parts: bool = False
    answers: list[bool] = field(default_factory=list)


@dataclass(eq=False)
class _Base:
    """A pending layer output: batch 1 (its dim 0 is the batch's, expanded per example), or no
    batch dim at all (each example's copy gets a new dim 0)."""

    module: nn.Module
    inputs: tuple
    held: Tensor  # the output the model got (its gradient comes back to this tensor)
    version: int  # held's version then: changed in place, it is no longer the layer's output
    batchless: bool
    forward: int
    what: str  # how refusals name it
    versions: tuple  # its inputs' versions at the call (None for a non-tensor)
    record: Record | None = None  # its one call, made at the first broadcast's gradient
    sum: Tensor | None = None  # the broadcasts' per-example gradients so far in this backward

    def per_example_inputs(self, batch: int) -> tuple:
        if not self.batchless or isinstance(self.inputs[0], Call):
            return tuple(_expand(x, batch) for x in self.inputs)
        return tuple(
            x.unsqueeze(0).expand(batch, *x.shape) if isinstance(x, Tensor) else x
            for x in self.inputs
        )


@dataclass(eq=False)
class _Pending:
    """A pending output, or a tensor computed from pending outputs (``bases``) and constants."""

    ref: weakref.ref
    bases: tuple[_Base, ...]
    # What must have rows alike where B rows of it meet the batch row by row (see _rows_alike):
    # ``mixed``: computed through dropout or with a tensor of the batch (a mask), so its rows
    # may differ by chance or by example: alike only up to the zeros; ``sources``: its constants
    # of B rows on its dim 0 (arange(B)[:, None]); ``opaque``: a layer ran on a mixed tensor, so
    # its own rows may differ; ``inherited``: what was checked of that input instead.
    mixed: bool = False
    sources: tuple[Tensor, ...] = ()
    opaque: bool = False
    inherited: tuple[tuple[Tensor, bool], ...] = ()
    # its B rows went through an op that picks, moves or sums rows (a slice, cat, cumsum): with
    # rows that may differ by chance or by example, it cannot be met row by row
    placed: bool = False

    @property
    def what(self) -> str:
        return self.bases[0].what


@dataclass(eq=False)
class Recorder:
    """Records calls of ``modules`` inside forwards of ``root``; streams them to ``on_grad``."""

    on_grad: Callable[[Record], None]
    on_backward_end: Callable[[], None]
    enabled: bool = True
    expected: int | None = None  # the batch the engine's loader yielded, if it is in use
    side_pass: bool = False  # a backward reached recorded calls but wrote no .grad
    _handles: list[RemovableHandle] = field(default_factory=list)
    _paths: dict[nn.Module, str] = field(default_factory=dict)
    _in_backward: bool = False
    _anchor: Tensor = field(default_factory=lambda: torch.zeros((), requires_grad=True))
    # this backward's pending tensors used row by row: (whether all their rows are equal, on the
    # device, and how to name it), read by the engine at the step (see :meth:`broadcast_use`)
    row_checks: list[tuple[Tensor, str]] = field(default_factory=list)
    _depth: int = 0
    _forward: int = 0
    batch: int | None = None  # this forward's batch
    _root_shape: tuple[int, ...] | None = None
    _pending: dict[int, _Pending] = field(default_factory=dict)
    # tensors of this forward computed from constants only (the guard marks them), and the
    # model's buffers, which count as such in every forward
    _consts: dict[int, weakref.ref] = field(default_factory=dict)
    _buffers: dict[int, weakref.ref] = field(default_factory=dict)
    # this forward's tensors whose batch is not on dim 0 alone (the guard follows them)
    layouts: _layouts.Layouts = field(default_factory=_layouts.Layouts)
    _uses: dict[tuple[int, int], tuple[weakref.ref, Tensor, int]] = field(default_factory=dict)
    _vjp: int = 0  # inside broadcast_use's backward to the pending outputs
    _summed: list[_Base] = field(default_factory=list)  # pending outputs with gradients to hand on
    _whole: set[nn.Module] = field(default_factory=set)
    # per whole-call module, the (random state, autocast state) each unfinished call began with
    _starts: dict[nn.Module, list[tuple[RngState, tuple | None]]] = field(default_factory=dict)
    _open: list[_Running] = field(default_factory=list)  # whole calls running, outermost first
    _owns: dict[nn.Module, set[int]] = field(default_factory=dict)  # see _own_parameters
    _paused: int = 0
    _task: int = -1  # the backward pass (graph task) accumulates() last answered for
    # the anchor's gradient accumulator, held so that every graph uses this one node
    _accumulator: object = field(default=None, repr=False)
    _task_accumulates: bool = True
    every_pass: bool = False  # hand every backward's records on (the self-check's autograd.grad)

    @property
    def pending_by_id(self) -> dict[int, _Pending]:
        """This forward's pending tensors by id: one dict for the recorder's lifetime
        (cleared, never replaced), which the forward guard reads on every torch call."""
        return self._pending

    @property
    def consts_by_id(self) -> dict[int, weakref.ref]:
        """This forward's tensors computed from constants only, by id (the guard adds them;
        one dict for the recorder's lifetime)."""
        return self._consts

    def attach(
        self,
        modules: Iterable[nn.Module],
        root: nn.Module,
        whole_call: Iterable[nn.Module] = (),
        frozen: Iterable[Tensor] = (),
    ) -> None:
        """Record ``modules``' calls inside ``root``'s forwards; ``whole_call``, among them,
        with all their arguments and outputs (see the module docstring). ``frozen``: the
        parameters dpclip does not train, constants like the buffers."""
        self._paths = {m: path or "<model>" for path, m in root.named_modules()}
        self._buffers = {id(b): weakref.ref(b) for b in (*root.buffers(), *frozen)}
        with torch.enable_grad():
            self._accumulator = self._anchor.view_as(self._anchor).grad_fn.next_functions[0][0]
        self._whole = set(whole_call)
        self._handles.append(root.register_forward_pre_hook(self._enter_root, with_kwargs=True))
        for module in self._whole:
            self._handles.append(
                module.register_forward_pre_hook(self._capture_start, with_kwargs=True)
            )
        for module in modules:
            self._handles.append(  # first: the layer's own output, before any hook of the user
                module.register_forward_hook(self._forward_hook, with_kwargs=True, prepend=True)
            )
        for module in self._whole:  # after the recording hook, which reads what it closes
            self._handles.append(module.register_forward_hook(self._end_call, always_call=True))
        # after the layers' hooks: the root may be a recorded layer itself
        self._handles.append(root.register_forward_hook(self._exit_root, always_call=True))

    def __deepcopy__(self, memo: dict) -> Recorder:
        raise TypeError(
            "dpclip: a model with a PrivacyEngine attached cannot be deep-copied (its hooks "
            "belong to the engine). Copy it before creating the engine (an EMA or SWA "
            "AveragedModel too), or after engine.detach()"
        )

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._open.clear()
        self._in_backward = False

    def name(self, module: nn.Module) -> str:
        return f"{self._paths.get(module, '?')} ({type(module).__name__})"

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Nothing is recorded or checked inside (a rule recomputing a module's forward)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @property
    def is_paused(self) -> bool:
        return self._paused > 0

    def _capture_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._paused or not self.enabled or not torch.is_grad_enabled():
            return
        source = batch_of(args, kwargs)
        device = source.device if source is not None else None
        start = (RngState.capture(device), autocast_state(device))
        self._starts.setdefault(module, []).append(start)
        self._open.append(_Running(module))

    def _end_call(self, module: nn.Module, args: tuple, output: object) -> None:
        """After a whole-call module's forward, also one that raised (the pre-hook's pair)."""
        if self._open and self._open[-1].module is module:
            self._open.pop()

    def is_whole_call(self, module: nn.Module) -> bool:
        """Whether the fallback reruns ``module``'s calls whole."""
        return module in self._whole

    @property
    def in_whole_call(self) -> bool:
        """Whether a recorded call of a whole-call module (one the fallback reruns) is running:
        its attention dropout must be computed by parts, so that the rerun can draw it again
        (:mod:`dpclip.layers._attention_dropout`), and its branches on tensor values noted
        (:meth:`branched`); the parameter guard's mode does both."""
        return bool(self._open)

    def ran_by_parts(self) -> None:
        """Attention with dropout ran by parts: the running whole calls' reruns must too."""
        for running in self._open:
            running.by_parts = True

    def branched(self, answer: bool) -> None:
        """The forward branched on a tensor's value (``bool(t)``): the running whole calls'
        vmapped reruns take the same branches (vmap cannot branch per example)."""
        for running in self._open:
            running.answers.append(answer)

    # ----------------------------------------------------------------------------- forward
    def _enter_root(
        self, module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict] | None:
        if self._paused:
            return
        self._depth += 1
        if self._depth > 1:
            return
        self._forward += 1
        if self._in_backward and torch._C._current_graph_task_id() == -1:
            # the last pass never ended (torch or a hook of the user's raised in it): the next
            # one starts afresh (the engine drops what that one gathered at this forward too)
            self._in_backward = False
        self._clear_forward()
        self._consts.update(self._buffers)  # constants in every forward
        source = batch_of(args, kwargs)
        self.batch = None if source is None else int(source.shape[0])
        if source is not None:
            self.layouts.know(source)
        self._root_shape = None if source is None else tuple(source.shape)
        if (
            self.enabled
            and self.expected is not None
            and torch.is_grad_enabled()
            and self.batch != self.expected
        ):
            raise IntegrityError(
                f"the model was called on an input of shape {self._root_shape}, whose dim 0 is "
                f"not the {self.expected} examples the data loader yielded: dpclip takes the "
                "batch from dim 0 of the model's first tensor argument; pass the inputs "
                "batch-first (do not transpose them to (T, B, ...) before the call)"
            )
        if self.enabled and torch.is_grad_enabled():
            return self._anchored(args, kwargs)
        return None

    def _anchored(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """The model's tensor arguments that require a gradient (an adversarial example's
        input) routed through the anchor, so every recorded call of this forward hangs off it
        (see :meth:`accumulates`); None, the arguments unchanged, when there are none."""
        if not any(isinstance(a, Tensor) and a.requires_grad for a in (*args, *kwargs.values())):
            return None

        def through(a: object) -> object:
            return (
                _Attach.apply(self._anchor, a) if isinstance(a, Tensor) and a.requires_grad else a
            )

        return tuple(map(through, args)), {k: through(v) for k, v in kwargs.items()}

    def _clear_forward(self) -> None:
        self._drop_sums()
        self._pending.clear()
        self._uses.clear()
        self._consts.clear()
        self.layouts.clear()

    def accumulates(self) -> bool:
        """Whether the running backward pass accumulates into ``.grad`` (``loss.backward()``),
        not one that returns gradients or reaches chosen inputs only (``torch.autograd.grad``,
        ``backward(inputs=...)``): those write no ``.grad`` without dpclip, and must not add a
        clipped sum either (it would count the examples twice in the step). Read from whether
        the anchor's gradient accumulator runs: every recorded call hangs off the anchor (the
        calls on inputs that need no gradient through ``_Attach``, the model's inputs that do
        through :meth:`_anchored`). Asked once per backward pass."""
        task = torch._C._current_graph_task_id()
        if task != self._task:
            self._task = task
            self._task_accumulates = torch._C._will_engine_execute_node(self._accumulator)
        return self._task_accumulates

    def _exit_root(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._paused:
            return
        self._depth -= 1
        if self._depth == 0:  # also after a forward that raised (its unfinished calls' entries)
            self._clear_forward()
            self._starts.clear()
            self._open.clear()

    def _forward_hook(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        # dpclip's own tensor calls here (detach, shape reads, register_hook) are not the
        # model's: no torch function mode sees them, so the parameter guard neither checks
        # them nor spends host time on them (5 calls per layer, each through Python). Not for
        # a tensor subclass with its own __torch_function__: that would turn it into a plain
        # tensor in the middle of the model's forward.
        if _plain(output) and all(map(_plain, args)) and all(map(_plain, kwargs.values())):
            with torch._C.DisableTorchFunction():
                return self._on_forward(module, args, kwargs, output)
        return self._on_forward(module, args, kwargs, output)

    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, output: object) -> object:
        if self._paused:
            return None
        starts = self._starts.get(module) if module in self._whole else None
        start = starts.pop() if starts else (None, None)
        if not self.enabled or not torch.is_grad_enabled():
            return None
        if self._depth == 0:
            if torch._C._current_graph_task_id() != -1:
                raise IntegrityError(
                    f"{self.name(module)} was run again during backward: activation "
                    "checkpointing (torch.utils.checkpoint, gradient_checkpointing_enable) is "
                    "not supported; turn it off"
                )
            raise IntegrityError(
                f"{self.name(module)} was called outside the forward of the model dpclip is "
                "attached to, so its batch is unknown; call the model itself, or attach the "
                "engine to the module you call"
            )
        if module in self._whole:
            return self._record_call(module, args, kwargs, output, *start)
        if not isinstance(output, Tensor):
            raise TypeError(
                f"dpclip records modules that return one tensor; {type(module).__name__} "
                f"returned {type(output).__name__}"
            )
        if self.batch is None:
            raise IntegrityError(
                "the model's forward got no tensor argument with a dim, so dpclip cannot tell "
                f"its batch size; pass the batch as a tensor (batch on dim 0). Seen by "
                f"{self.name(module)}."
            )
        inputs = positional_inputs(module, args, kwargs)
        rows = output.shape[0] if output.dim() else None
        constant = (
            isinstance(module, ROW_WISE)
            and not output.requires_grad
            and rows is not None
            and self.all_constant(inputs) is True
        )
        upstream = self._pending_inputs(module, inputs) if self._pending else ()
        layout = self._layout(module, inputs, output) if self.layouts.by_id else None
        inputs = tuple(x.detach() if isinstance(x, Tensor) else x for x in inputs)
        if upstream:  # fc(pos(arange(T))): pending too, whatever its rows
            # batch 1 only if it has one row from batch-1 outputs alone (not B rows copied from
            # one: fc(wpe(pos).expand(B, T, d)) has no batch dim)
            batchless = rows != 1 or any(b.batchless for e in upstream for b in e.bases)
            return self._hold_pending(module, inputs, output, batchless, upstream)
        if (rows == self.batch or layout) and not constant:
            batch = self.batch
            if layout:  # the same call on the batch-first view: a row-wise layer acts per row
                inputs = tuple(_layouts.batch_first_view(x, layout, batch) for x in inputs)
            versions = tuple(x._version if isinstance(x, Tensor) else None for x in inputs)
            record = Record(module, inputs, batch, self._forward, versions=versions)
            # a view (nn.Linear's output for 3-D input when that input needs a gradient) would
            # lose the hook if the model changed it in place (h[pad] = 0, relu_, +=): autograd
            # rebases a view's history then; the attached alias is no view, and keeps it
            if not output.requires_grad or output._is_view():
                output = _Attach.apply(self._anchor, output)
            if not layout and self.layouts.by_id:
                self.layouts.forget(output)  # a layer's output is taken for batch-first
            if layout:
                self.layouts.mark(output, layout)
                output.register_hook(
                    lambda grad: self._on_grad(
                        record, _layouts.grad_batch_first(grad, layout, batch)
                    )
                )
            else:
                output.register_hook(lambda grad: self._on_grad(record, grad))
            return output
        if rows == 1 and not output.requires_grad:
            return self._hold_pending(module, inputs, output, batchless=False)
        if constant:  # positions, relative-position buckets: no batch dim, whatever its rows
            return self._hold_pending(module, inputs, output, batchless=True)
        shape = "a scalar" if rows is None else f"{rows} row{'' if rows == 1 else 's'} on dim 0"
        first = inputs[0] if inputs else None
        positions = (  # pos(torch.arange(T)): ids without a batch dim
            isinstance(first, Tensor) and first.dim() == 1 and not first.is_floating_point()
        )
        fix = _FIXES + (
            "; or, if its input has no batch dim (positions such as torch.arange(T)), give it "
            "one: torch.arange(T)[None] (broadcast over the batch) or "
            "torch.arange(T).expand_as(ids) (a copy over the batch of the model's input)"
            if positions
            else ""
        )
        raise IntegrityError(
            f"{self.name(module)} returned {shape} (output shape {tuple(output.shape)}) in a "
            f"forward whose batch is {self.batch} (dpclip reads the batch from dim 0 of the "
            f"model's first tensor argument, here of shape {self._root_shape}: pass the batch "
            f"first). {fix}."
        )

    def _layout(self, module: nn.Module, inputs: tuple, output: Tensor) -> _layouts.Layout | None:
        """For a row-wise layer whose inputs all hold the batch in one followed layout (see
        :mod:`dpclip._layouts`) before the dims the layer acts on, as its output does: that
        layout."""
        if not (inputs and self.batch):
            return None
        if not isinstance(module, ROW_WISE):  # its rule needs the batch on dim 0
            self._refuse_moved_batch(module, [x for x in inputs if isinstance(x, Tensor)])
            return None
        if any(self.layouts.suspect(x) for x in inputs):
            raise IntegrityError(
                f"{self.name(module)} was given a tensor computed from one whose batch is not on "
                "dim 0 alone (sequence-first, or flattened into tokens) by a call dpclip does "
                "not follow, or changed in place, or moved from a tensor with another dim of "
                "the batch's size (T = B: no telling which is the batch): it cannot tell which "
                "entries are which example's. Move the batch back to dim 0 (or view the tokens "
                "as (B, T, ...)) before such calls, and move a layer's output or the model's "
                "input, not a tensor computed from them, when a length may equal the batch"
            )
        layout = self.layouts.of(inputs[0])
        if layout is None or any(self.layouts.of(x) != layout for x in inputs[1:]):
            return None
        first = inputs[0]
        acted_on = (
            0
            if isinstance(module, nn.Embedding)
            else len(module.normalized_shape)
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm))
            else 1
        )
        if layout[0] >= first.dim() - acted_on:
            raise IntegrityError(
                f"{self.name(module)} acts on dim {layout[0]} of its input, which holds the "
                f"batch (input shape {tuple(first.shape)}, made by moving the batch there): it "
                "would combine examples. Move the batch off the dims the layer acts on (its last "
                "one; a norm's normalized dims)"
            )
        return layout if _layouts.holds_batch(output, layout, self.batch) else None

    def _refuse_moved_batch(self, module: nn.Module, tensors: list[Tensor]) -> None:
        """A module of the generic fallback reruns its forward per example on rows of dim 0:
        an argument whose batch is elsewhere (sequence-first, or suspect) would give it rows of
        several examples, at T = B without a shape to show it."""
        for x in tensors:
            layout = self.layouts.of(x)
            if (layout is not None and layout[0] > 0) or self.layouts.suspect(x):
                how = (
                    "takes the generic fallback, which runs it per example on rows of dim 0"
                    if module in self._whole
                    else "has a rule that takes its batch from dim 0"
                )
                raise IntegrityError(
                    f"{self.name(module)} {how}, but was given a tensor of shape "
                    f"{tuple(x.shape)} whose batch is not on dim 0 (sequence-first). Move the "
                    "batch to dim 0 before the module (x.transpose(0, 1)) and back after it"
                    + (
                        ", or give it a rule with dpclip.register_layer"
                        if module in self._whole
                        else ""
                    )
                )

    def batch_first(self, t: Tensor) -> bool:
        """Whether ``t`` is taken for a tensor of this forward's batch on dim 0: that size there,
        and neither pending nor a constant."""
        return (
            t.dim() > 0
            and t.shape[0] == self.batch
            and self.pending(t) is None
            and not self.is_constant(t)
            and self.layouts.of(t) is None
        )

    def _pending_inputs(self, module: nn.Module, inputs: tuple) -> tuple[_Pending, ...]:
        """A row-wise layer's pending inputs (the forward guard refuses the others' pending
        inputs, and checks that the rest of its inputs are constants)."""
        if not isinstance(module, ROW_WISE):
            return ()
        return tuple(e for x in inputs if (e := self.pending(x)) is not None)

    def _record_call(
        self,
        module: nn.Module,
        args: tuple,
        kwargs: dict,
        output: object,
        rng: RngState | None,
        autocast: tuple | None,
    ) -> object:
        """A whole-call module: every floating-point output tensor gets its gradient into one
        record (a batch-1 single tensor is pending, as for any layer; so is one of a call whose
        tensor arguments are all constants, or that has none, such as a position table made
        from the input's shape: it has no batch dim, whatever its rows). Recorded as its
        forward ran: the arguments after its forward pre-hooks, its own output before any
        forward hook of the user's (which acts on it downstream; the rerun runs the forward
        alone)."""
        assert self.batch is not None
        leaves, spec = tree_flatten(output)
        outs = [k for k, x in enumerate(leaves) if isinstance(x, Tensor) and x.is_floating_point()]
        single = isinstance(output, Tensor) and output.dim() and not output.requires_grad
        tensors = [x for x in tree_leaves((args, kwargs)) if isinstance(x, Tensor)]
        if self.layouts.by_id:
            self._refuse_moved_batch(module, tensors)
        batchless = bool(single and outs) and self.all_constant(tensors) is not False
        pending = batchless or (single and output.shape[0] == 1 != self.batch)
        unbatched: dict[int, str] = {}
        if not pending:
            if not outs:
                raise IntegrityError(
                    f"{self.name(module)} has trainable parameters of its own but returned no "
                    "floating-point tensor, so dpclip cannot give them a per-example gradient"
                )
            for k in outs:
                x = leaves[k]
                if not (x.dim() and x.shape[0] == self.batch):
                    unbatched[k] = (
                        f"{self.name(module)} returned a tensor of shape {tuple(x.shape)} (output "
                        f"tensor {outs.index(k)}) in a forward whose batch is {self.batch}: dpclip "
                        "computes this module's per-example gradients from outputs with the batch "
                        f"on dim 0 (read from the model's first tensor argument, of shape "
                        f"{self._root_shape}). {_FIXES}."
                    )
            if len(unbatched) == len(outs):
                raise IntegrityError(next(iter(unbatched.values())))
            # the others (Swin's attention weights, windows on dim 0) are fine while unused
            outs = [k for k in outs if k not in unbatched]
        own = self._own_parameters(module)
        for x in tree_leaves((args, kwargs)):
            if isinstance(x, Tensor) and id(x) in own:
                raise IntegrityError(
                    f"{self.name(module)} was given one of its own parameters as an argument: "
                    "dpclip reruns its forward per example with its parameters in place, so "
                    "that use would get no gradient. Read it inside forward (self.<name>)"
                )
        # a batchless output, taken as one row: each example's rerun gives all of it
        expected = tuple(Fingerprint.of(leaves[k][None] if batchless else leaves[k]) for k in outs)
        running = self._open[-1] if self._open and self._open[-1].module is module else None
        flat = tree_leaves((args, kwargs))  # the order Call.split counts in
        split = None
        if any(self._unbatched(x) for x in flat):  # a table of B positions is not split
            split = tuple(
                k
                for k, x in enumerate(flat)
                if isinstance(x, Tensor) and x.dim() and x.shape[0] == self.batch
                and not self._unbatched(x)
            )  # fmt: skip
        call = Call(
            tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, args),
            tree_map(lambda x: x.detach() if isinstance(x, Tensor) else x, kwargs),
            rng,
            tuple(outs),
            expected=expected,
            modes=tuple(
                m
                for m in torch.overrides._get_current_function_mode_stack()
                if getattr(m, "replay_in_rerun", False)
            ),
            autocast=autocast,
            by_parts=running is not None and running.by_parts,
            answers=tuple(running.answers) if running is not None else (),
            split=split,
            batchless=batchless,
        )
        if pending:
            return self._hold_pending(module, (call,), output, batchless=batchless)
        record = Record(module, (call,), self.batch, self._forward)
        gathered = _Gather.apply(self._anchor, record, self._on_grad, *(leaves[k] for k in outs))
        for k, x in zip(outs, gathered, strict=True):
            leaves[k] = x
        for k, message in unbatched.items():
            leaves[k] = self._refused_if_used(leaves[k], message)
        return tree_unflatten(leaves, spec)

    def _refused_if_used(self, output: Tensor, message: str) -> Tensor:
        """``output`` returned as it is, but refused with ``message`` if a gradient reaches it
        directly: its per-example part cannot be told (a batch-1 output used other than by a
        broadcast, a whole call's output without the batch on dim 0). Attached even when it
        needs no gradient: it may carry managed parameters, which need none while attached."""
        held = _Attach.apply(self._anchor, output)

        def used(grad: Tensor) -> None:
            if self._vjp:  # broadcast_use taking a broadcast's gradient back to it
                return
            raise self._abandoned(message)

        held.register_hook(used)
        return held

    def _own_parameters(self, module: nn.Module) -> set[int]:
        """The ids of a whole-call module's parameters (its children's too), made once."""
        own = self._owns.get(module)
        if own is None:
            own = self._owns[module] = {id(p) for p in module.parameters()}
        return own

    def all_constant(self, values: Iterable[object]) -> bool | None:
        """Whether every tensor among ``values`` (and in their lists and tuples) is a constant
        of this forward (see :attr:`consts_by_id`: a layer called on those has no batch dim,
        whatever its shape); None when there is no tensor."""
        consts, seen = self._consts, False
        for x in values:
            for t in x if isinstance(x, (list, tuple)) else (x,):
                if isinstance(t, Tensor):
                    entry = consts.get(id(t))
                    if entry is None or entry() is not t:
                        return False
                    seen = True
                elif isinstance(t, dict):
                    return False
        return True if seen else None

    def _hold_pending(
        self,
        module: nn.Module,
        inputs: tuple,
        output: Tensor,
        batchless: bool,
        upstream: tuple[_Pending, ...] = (),
    ) -> Tensor:
        """A layer output without the batch: returned as it is, but refused if a gradient
        reaches it other than through :meth:`broadcast_use`. ``upstream``: the layers its
        pending inputs came from (``fc(pos(arange(T)))``), whose per-example gradients are
        taken back through it."""
        name = self.name(module)
        if batchless:
            what = (
                f"the output of {name} (shape {tuple(output.shape)}) has no batch dim in a "
                f"forward whose batch is {self.batch} (its inputs are constants, such as "
                "positions, or computed from them by layers)"
            )
        else:
            what = f"the output of {name} has batch 1 in a forward whose batch is {self.batch}"
        held = self._refused_if_used(
            output,
            f"{what}, and it was used other than by broadcasting it over the batch "
            "(x + layer(pos)); its gradient then sums over examples and cannot be split per "
            "example. Give the layer a batched input (e.g. torch.arange(T).expand_as(ids), "
            "a copy over the batch of the model's input). " + _FIXES + ".",
        )  # fmt: skip
        versions = tuple(x._version if isinstance(x, Tensor) else None for x in inputs)
        base = _Base(module, inputs, held, held._version, batchless, self._forward, what, versions)
        bases = [base]
        for entry in upstream:
            bases.extend(b for b in entry.bases if all(b is not c for c in bases))
        # a layer on a mixed input: its rows may differ, its input's are checked instead
        opaque = any(e.mixed or e.opaque for e in upstream)
        inherited = tuple(
            c for e in upstream
            for c in (*e.inherited, *((x, False) for x in e.sources),
                      *(((e.ref(), True),) if e.mixed and e.ref() is not None else ()))
        )  # fmt: skip
        self._pending[id(held)] = _Pending(
            weakref.ref(held), tuple(bases), opaque=opaque, inherited=inherited
        )
        return held

    @property
    def in_backward(self) -> bool:
        return self._in_backward

    def has_pending(self) -> bool:
        return bool(self._pending)

    def pending(self, t: object) -> _Pending | None:
        """The pending entry of ``t``, if it is a pending output or computed from some."""
        entry = self._pending.get(id(t))
        return entry if entry is not None and entry.ref() is t else None

    def _unbatched(self, x: object) -> bool:
        """A pending tensor or a constant whose dim 0 happens to be the batch's size."""
        return (
            isinstance(x, Tensor)
            and x.dim() > 0
            and x.shape[0] == self.batch
            and (self.pending(x) is not None or self.is_constant(x))
        )

    def is_constant(self, t: object) -> bool:
        entry = self._consts.get(id(t))
        return entry is not None and entry() is t

    def derive(
        self,
        out: object,
        entries: list[_Pending],
        rest: list[Tensor],
        random: bool = False,
        rows_op: bool = False,
    ) -> None:
        """``out`` was computed from the pending ``entries`` and ``rest``, tensors that need no
        gradient (constants, or the batch's masks): pending too (``random``: by dropout)."""
        bases: list[_Base] = []
        for entry in entries:
            bases.extend(b for b in entry.bases if all(b is not c for c in bases))
        sources = [x for entry in entries for x in entry.sources]
        mixed = random or any(entry.mixed for entry in entries)
        opaque = any(entry.opaque for entry in entries)
        inherited = tuple(c for entry in entries for c in entry.inherited)
        placed = any(entry.placed for entry in entries) or (
            rows_op
            and any(
                b.held.dim() and b.held.shape[0] == self.batch for e in entries for b in e.bases
            )  # fmt: skip
        )
        first = next((t for t in (out if isinstance(out, (list, tuple)) else (out,))), None)
        rank = first.dim() if isinstance(first, Tensor) else -1
        for x in rest:
            if not self.is_constant(x):
                mixed = True  # the batch's own rows (a padding mask): they differ by example
            elif x.dim() == rank and x.shape[0] == self.batch != 1:  # its dim 0 is out's
                sources.append(x.detach())
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, Tensor) and t.requires_grad and self.pending(t) is None:
                self._pending[id(t)] = _Pending(
                    weakref.ref(t), tuple(bases), mixed, tuple(sources), opaque, inherited, placed
                )

    def changed_base(self, entry: _Pending) -> _Base | None:
        """A base of ``entry`` changed in place since its layer returned it."""
        return next((b for b in entry.bases if b.held._version != b.version), None)

    def broadcast_use(self, t: Tensor, dims: int) -> Tensor:
        """Pending ``t`` for one use broadcast over the batch against a tensor of ``dims``
        dims: a copy per example (dim 0 of size 1, or dims it lacks, made the batch), or, for
        a layer output of B rows used row by row (a layer on constants, T = B), itself; its
        gradient is taken back to the layer's output per example and recorded as one call."""
        entry = self.pending(t)
        assert entry is not None and self.batch is not None
        batch = self.batch
        key = (id(t), dims)
        hit = self._uses.get(key)
        if hit is not None and hit[0]() is t and hit[2] == t._version:
            return hit[1]
        direct = len(entry.bases) == 1 and entry.bases[0].held is t
        row_by_row = t.dim() == dims and t.shape[0] == batch > 1  # row b is example b's
        copied = next(
            (
                k
                for k in range(1, t.dim())
                if row_by_row and t.stride(k) == 0 and t.shape[k] == batch
            ),
            None,
        )
        if copied is not None:
            raise IntegrityError(
                f"{entry.what}; {batch} rows of a tensor computed from it meet the batch row by "
                f"row, but it was copied over its dim {copied}, of the batch's size too: the "
                "batch is likely there, and dim 0 another dim of that size (a time-major "
                "(T, B, ...) view at T = B). Keep the batch first: add it to the batch-first "
                "tensor, broadcast over the batch (p[None] or p[:, None] on (B, T, ...))"
            )
        own = direct and entry.bases[0].module not in self._whole  # a row-wise layer's output
        if row_by_row and not own and not (entry.mixed or entry.opaque):
            return self._first_row_used(entry, t, dims, key)
        if row_by_row and not own:  # rows that may differ by chance or by example
            if entry.placed:
                raise IntegrityError(
                    f"{entry.what}; {batch} rows of a tensor computed from it meet the batch row "
                    "by row, after dropout (or the batch's own values) made its rows differ "
                    "and an op picked, moved or summed its rows (a slice, cat, cumsum): dpclip "
                    "cannot tell that each example's row is computed alike. Apply such ops "
                    "before the dropout, or to the batched tensor"
                )
            return self._rows_used(entry, t, key)
        if row_by_row:  # a row-wise layer's own output: row b's gradient is example b's call
            base = entry.bases[0]
            record = Record(base.module, base.inputs, batch, base.forward, versions=base.versions)
            used = _Attach.apply(self._anchor, t.detach())
            check = _rows_alike(entry, t)

            def on_grad(grad: Tensor) -> None:
                self._on_grad(record, grad)
                self.row_checks.append(check)

            used.register_hook(on_grad)
            self._uses[key] = (weakref.ref(t), used, t._version)
            return used
        version = t._version
        copies = t.detach()  # dim 0 of size 1 made the batch, or the dims it lacks put in front
        if t.dim() < dims:
            copies = copies.reshape(1, *(1,) * (dims - 1 - t.dim()), *t.shape)
        used = _Attach.apply(self._anchor, copies.expand(batch, *copies.shape[1:]))

        def on_grad(grad: Tensor) -> None:
            per = grad.reshape(batch, *t.shape)  # example b's gradient of t
            self._check_unchanged_since(entry, t, version)
            if batch == 0:  # no example: nothing to take back (vmap takes no empty batch)
                grads: tuple = tuple(b.held.new_zeros(0, *b.held.shape) for b in entry.bases)
            else:
                grads = self._back_to_bases(entry, t, per)
            self._add_per_base(entry, grads)

        used.register_hook(on_grad)
        self._uses[key] = (weakref.ref(t), used, version)
        return used

    def _first_row_used(self, entry: _Pending, t: Tensor, dims: int, key: tuple) -> Tensor:
        """Pending ``t`` of B rows, computed from tables without the batch and constants alone,
        met row by row: its rows must be alike (checked at the step), so every example gets a
        copy of its row 0 instead, whose gradient goes back as for any broadcast. What example
        b computes is then the same function for every b by construction, also where rows equal
        in value would differ in their gradient (e + (e - e.detach()) * place). The forward
        computes with t's own rows (their values are the model's; only the gradient is row 0's),
        so a forward that no step follows (an evaluation) is the model's whatever t holds."""
        first = t[:1]  # computed here, where the forward guard sees no call: derived by hand
        self.derive(first, [entry], [])
        copies = self.broadcast_use(first, dims)
        check = _rows_alike(entry, t)
        copies.register_hook(lambda grad: self.row_checks.append(check))
        used = _Carry.apply(t.detach(), copies)
        self._uses[key] = (weakref.ref(t), used, t._version)
        return used

    def _rows_used(self, entry: _Pending, t: Tensor, key: tuple) -> Tensor:
        """Pending ``t`` of B rows used row by row against the batch, other than as a row-wise
        layer's own output (a tensor computed from one, a whole call's output): example b's
        gradient of t is its row b alone, the other rows zero (its rows need not be examples:
        positions, T = B), taken back to t's layers as for any broadcast. That holds B times
        t for the pass back (in chunks of examples, at most :data:`_ROWS_BYTES` at a time)."""
        batch, version = t.shape[0], t._version
        used = _Attach.apply(self._anchor, t.detach())
        check = _rows_alike(entry, t)

        def on_grad(grad: Tensor) -> None:
            self._check_unchanged_since(entry, t, version)
            grads: list[Tensor | None] = [None] * len(entry.bases)
            chunk = max(1, _ROWS_BYTES // max(1, t.numel() * t.element_size()))
            for start in range(0, batch, chunk):
                rows = torch.arange(start, min(batch, start + chunk), device=grad.device)
                per = grad.new_zeros(len(rows), *t.shape)  # example b's gradient of t
                per[torch.arange(len(rows), device=grad.device), rows] = grad[rows]
                for k, g in enumerate(self._back_to_bases(entry, t, per)):
                    if g is not None:
                        if grads[k] is None:
                            grads[k] = g.new_zeros(batch, *g.shape[1:])
                        grads[k][rows] = g
            self._add_per_base(entry, tuple(grads))
            self.row_checks.append(check)

        used.register_hook(on_grad)
        self._uses[key] = (weakref.ref(t), used, version)
        return used

    def _check_unchanged_since(self, entry: _Pending, t: Tensor, version: int) -> None:
        """Refuse the running backward if ``t`` or a layer output it was computed from changed
        in place since its use (its gradient would be the new values')."""
        if self.changed_base(entry) is not None or t._version != version:
            raise self._abandoned(
                f"{entry.what}, and it (or a tensor computed from it) was changed in place "
                "after the layer returned it or after a use broadcast over the batch: the "
                "per-example gradients would be those of the new values. Make that "
                "operation out of place"
            )

    def _back_to_bases(self, entry: _Pending, t: Tensor, per: Tensor) -> tuple:
        """Per-example gradients ``per`` (examples, *t.shape) of pending ``t`` taken back to
        the layer outputs it was computed from, by one batched vjp (None for one it does not
        reach); ``per`` itself where t is its one layer's output."""
        if len(entry.bases) == 1 and entry.bases[0].held is t:
            return (per,)
        self._vjp += 1  # the outputs' refusal hooks let these gradients through
        try:
            return torch.autograd.grad(
                t, [b.held for b in entry.bases], per,
                retain_graph=True, allow_unused=True, is_grads_batched=True,
            )  # fmt: skip
        finally:
            self._vjp -= 1

    def _add_per_base(self, entry: _Pending, grads: tuple) -> None:
        """Each base's per-example gradients (rows of a batch-1 output: its row) to its sum."""
        for base, g in zip(entry.bases, grads, strict=True):
            if g is not None:
                self._add_to(base, g if base.batchless else g[:, 0])

    # ----------------------------------------------------------------------------- backward
    def _clipped_pass(self, record: Record) -> bool:
        """Whether this backward pass is one dpclip clips (see :meth:`accumulates`); refuses a
        second one through ``record``'s graph."""
        if not self.every_pass and not self.accumulates():
            self.side_pass = True  # the engine's message, if no backward is clipped before a step
            return False  # a pass that writes no .grad: nothing to clip, the record stays unused
        if record.done:
            raise DoubleBackwardError(
                f"a second backward pass reached {type(record.module).__name__} through the same "
                "graph; dpclip needs exactly one backward per forward (do not use retain_graph "
                "to backpropagate twice)"
            )
        if not self._in_backward:
            self._drop_sums()
            self.row_checks = []
            self._in_backward = True
            Variable._execution_engine.queue_callback(self._flush)
        return True

    def _drop_sums(self) -> None:
        for base in self._summed:
            base.sum = None
        self._summed.clear()

    def _add_to(self, base: _Base, grad: Tensor) -> None:
        """One broadcast's per-example gradient of a pending output, summed over its
        broadcasts: handed on as one call when the backward pass ends (a call per broadcast
        would pay the cross terms between them, T² × T² per example for T5's bias)."""
        if base.record is None:
            inputs = base.per_example_inputs(grad.shape[0])  # views: the versions are shared
            base.record = Record(
                base.module, inputs, grad.shape[0], base.forward, versions=base.versions
            )
        if not self._clipped_pass(base.record):
            return
        if base.sum is None:
            base.sum = grad
            self._summed.append(base)
        else:
            base.sum = base.sum + grad

    def _on_grad(self, record: Record, grad: Tensor) -> None:
        if not self._clipped_pass(record):
            return
        self._deliver(record, grad)

    def _deliver(self, record: Record, grad: Tensor | tuple[Tensor, ...]) -> None:
        record.grad_output, record.done = grad, True
        if record.versions:
            self._check_unchanged(record)
        try:
            with full_precision():
                self.on_grad(record)
        except BaseException:
            self._in_backward = False  # this backward is abandoned; the next one starts afresh
            raise

    def _check_unchanged(self, record: Record) -> None:
        """Refuse a layer input changed in place after the call: its per-example gradients would
        come from the new values. (Autograd does not keep a managed layer's input for it, so
        it cannot notice as it would without dpclip.)"""
        for k, (x, version) in enumerate(zip(record.inputs, record.versions, strict=True)):
            if version is not None and x._version != version:
                raise self._abandoned(
                    f"input {k} of {self.name(record.module)} was modified by an in-place "
                    "operation after the layer used it (h.mul_(), h += ..., relu_ on it): its "
                    "per-example gradients would be computed from the new values. Make that "
                    "operation out of place (h = h * 3), or apply it before the layer"
                )

    def _abandoned(self, message: str) -> IntegrityError:
        """The error refusing the running backward pass, which is abandoned: the next one
        starts afresh."""
        self._in_backward = False
        return IntegrityError(message)

    def _flush(self) -> None:
        summed, self._summed = self._summed, []
        try:
            for base in summed:
                assert base.record is not None and base.sum is not None
                grad, base.sum = base.sum, None
                self._deliver(base.record, (grad,) if base.module in self._whole else grad)
        except BaseException:
            self._in_backward = False
            for base in summed:
                base.sum = None
            raise
        self._in_backward = False
        with full_precision():
            self.on_backward_end()


def _rows_alike(entry: _Pending, t: Tensor) -> tuple[Tensor, str]:
    """Whether the rows of ``t``, B rows made without the batch and met row by row, are all
    alike (as a device tensor, read at the step, and how to name t): rows that differ by place
    (``pos(torch.arange(B))``, ``p * torch.arange(B)[:, None]``) would make each example depend
    on the others. Where rows may differ by chance (dropout) or by example (the batch's mask),
    they are compared up to their zeros; a layer's output computed from such a tensor is not
    compared, that tensor is; its constants of B rows always are."""
    with torch.no_grad():
        alike = []
        # the constants always: rows alike in value may still differ in their gradient
        # (torch.where(arange(B)[:, None] < 1, e, e.detach()))
        checked = [*entry.inherited, *((x, False) for x in entry.sources)]
        if not entry.opaque:
            checked.append((t, entry.mixed))
        for rows, up_to_zeros in checked:
            rows = rows.detach()
            if not rows.dim() or rows.shape[0] < 2:
                continue
            alike.append(_alike(rows, up_to_zeros))
        if not alike:
            return torch.ones((), dtype=torch.bool, device=t.device), entry.what
        return (alike[0] if len(alike) == 1 else torch.stack(alike).all()), entry.what


def _alike(rows: Tensor, up_to_zeros: bool) -> Tensor:
    """Whether all rows along dim 0 are equal (NaN where all are NaN), or, ``up_to_zeros``,
    equal where they are not zero (dropout zeroes entries and scales the rest alike). Finite
    floating rows may differ in their last bits (a vectorised kernel and its scalar tail round
    alike values apart: gelu, sigmoid): see :func:`_close`."""
    if not up_to_zeros:
        return _close(rows, rows[:1]).all()
    kept = rows != 0
    high = torch.where(kept, rows, float("-inf")).amax(0, keepdim=True)
    return (~kept | _close(rows, high)).all()


def _close(a: Tensor, b: Tensor) -> Tensor:
    """Equal (NaN to NaN, inf to the same inf), or both finite and apart by rounding alone,
    relative to them: 64 units of float32's or float64's precision (gelu's vectorised and
    scalar paths differ by up to about 30 near -2.4, by cancellation), one of a 16-bit type's
    (its kernels compute in float32 and round once). No floor from other entries: a mask of
    -1e9 beside them must not widen it."""
    same = (a == b) | (a.isnan() & b.isnan())
    if not a.is_floating_point():
        return same
    ulps = torch.finfo(a.dtype).eps * (64 if a.dtype in (torch.float32, torch.float64) else 1)
    finite = a.isfinite() & b.isfinite()
    near = (a - b).abs() <= ulps * torch.maximum(a.abs(), b.abs())
    return same | (finite & near)


def _autocast_types() -> tuple[str, ...]:
    """The device types this torch build can autocast (asking about another one raises)."""
    kinds = []
    for kind in ("cpu", "cuda", "xpu", "mps", "hpu"):
        try:
            torch.is_autocast_enabled(kind)
        except RuntimeError:
            continue
        kinds.append(kind)
    return tuple(kinds)


_AUTOCAST_TYPES = _autocast_types()
_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def full_precision() -> contextlib.AbstractContextManager:
    """Autocast off for dpclip's book-keeping, where a backward runs inside the user's autocast
    region (``loss.backward()`` under ``torch.autocast``): autograd's own backward ops keep the
    forward's dtypes there, but the norms' and the clipped sums' matmuls would run in bf16 or
    fp16, and a norm computed short makes an example's clipped gradient longer than the clipping
    bound the ledger accounts for. Rules pick their dtype themselves (float32 at least)."""
    if _ANY_AUTOCAST is not None and not _ANY_AUTOCAST():  # one C call on every record
        return contextlib.nullcontext()
    on = [kind for kind in _AUTOCAST_TYPES if torch.is_autocast_enabled(kind)]
    if not on:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    for kind in on:
        stack.enter_context(torch.autocast(kind, enabled=False))
    return stack
