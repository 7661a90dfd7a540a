"""Shared algebra for layers whose weight gradient is ``g_i = s_iᵀ a_i`` (Linear, Conv, Conv1D)."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def cast(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` in ``dtype``: itself when it has it (``Tensor.to`` costs a few µs even then, and
    the book-keeping calls it per layer)."""
    return x if x.dtype == dtype else x.to(dtype)


# Transient copies up to this many elements reuse a buffer kept per thread on a CPU.
SCRATCH_ELEMENTS = 1 << 22
_scratch = threading.local()


def scratch(key: str, shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor for a transient copy (a padded or unfolded input, a scaled side of
    a clipped sum) that nothing computed from it may alias.

    On a CPU, up to ``SCRATCH_ELEMENTS``, a view of this thread's buffer for ``key``, kept between
    calls: glibc faults a fresh large tensor in page by page at every call (a ResNet-18 chunk's
    unfolding took 4.5 ms so, 0.7 ms into memory already mapped). Elsewhere a new tensor: on a GPU
    (its caching allocator already reuses memory), when tracing, and with gradients enabled (an
    ``out=`` tensor cannot be part of a graph).
    """
    numel = math.prod(shape)
    if (
        device.type != "cpu"
        or numel > SCRATCH_ELEMENTS
        or torch.is_grad_enabled()
        or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    ):
        return torch.empty(shape, dtype=dtype, device=device)
    shape = tuple(shape)
    buffers = _scratch.__dict__
    buf, views = buffers.get((key, dtype), (None, {}))
    view = views.get(shape)
    if view is None:  # made once per shape (a view costs dispatched ops, at every layer call)
        if buf is None or buf.numel() < numel:  # a larger buffer: the old views go with it
            buf, views = torch.empty(numel, dtype=dtype), {}
        if len(views) >= 64:  # shapes follow the batch size, which may vary
            views.clear()
        view = views[shape] = buf[:numel].view(shape)
        buffers[(key, dtype)] = (buf, views)
    return view


def release_scratch() -> None:
    """Drop this thread's scratch buffers (up to a few tens of MB each); the next book-keeping
    that needs one makes it again. The engine calls it when it detaches."""
    _scratch.__dict__.clear()


def as_btd(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Reshape (b, ..., d) to (b, T, d) in ``dtype``; T = product of the middle dims (1 if none)."""
    if x.dim() != 3:  # (b, T, d) already: no view (host time counts per layer)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
    return cast(x, dtype)


def sq_norms(x: Tensor) -> Tensor:
    """Per-sample squared L2 norm over every dim but the first: (b, ...) -> (b,).

    ``vector_norm`` reads x once (no squared temporary); about 3x faster than
    ``x.square().sum()`` on per-sample gradients.
    """
    # over the trailing dims directly: no reshape (one dispatched op fewer per call)
    return x.square() if x.dim() == 1 else _norms(x).square()


def weighted_sum(factors: Tensor, per_sample: Tensor) -> Tensor:
    """Σ_i C_i g_i for per-sample gradients (b, ...) -> (...), as one matrix-vector product."""
    if not per_sample.is_contiguous():  # no flat view of it
        return torch.tensordot(cast(factors, per_sample.dtype), per_sample, dims=1)
    flat = per_sample if per_sample.dim() == 2 else per_sample.view(per_sample.shape[0], -1)
    out = torch.mv(flat.t(), cast(factors, flat.dtype))
    return out if per_sample.dim() == 2 else out.view(per_sample.shape[1:])


def product_norm_sq(a: Tensor, s: Tensor) -> Tensor:
    """‖a_i‖²·‖s_i‖² per sample (the squared norm of a one-position outer product s_i ⊗ a_i),
    squared once: ``(‖a_i‖·‖s_i‖)²``."""
    return (_norms(a) * _norms(s)).square()


def _norms(x: Tensor) -> Tensor:
    return x.abs() if x.dim() == 1 else torch.linalg.vector_norm(x, dim=tuple(range(1, x.dim())))


def sum_over(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``t`` summed over ``dims``, as it is when there are none (``sum(dim=())`` would sum over
    every dim): a per-sample sum over positions without a reshape to (b, -1, ...)."""
    return t.sum(dim=dims) if dims else t


def use_ghost(strategy: str, T: int, d_in: int, d_out: int) -> bool:
    """Ghost norm when asked, or under "mixed" when it is the cheaper way to the norm.

    Per sample, the ghost norm costs T²·(d_in + d_out) and instantiation T·d_in·d_out, so ghost
    wins when T·(d_in + d_out) < d_in·d_out: exactly when the per-sample gradient would be
    larger than the layer's activations a and output gradients s.
    """
    if strategy == "ghost":
        return True
    if strategy == "instantiate":
        return False
    return T * (d_in + d_out) < d_in * d_out


def outer_norm_sq(a: Tensor, s: Tensor, ghost: bool, *, positions_last: bool = False) -> Tensor:
    """‖s_iᵀ a_i‖²_F per sample for a: (b, T, in), s: (b, T, out); with ``positions_last``,
    a: (b, in, T) and s: (b, out, T) (a convolution's unfolded layout, no transposed copy)."""
    if a.shape[-1 if positions_last else 1] == 1:
        return product_norm_sq(a, s)
    if ghost:  # Σ_{t,t'} ⟨a_t, a_t'⟩⟨s_t, s_t'⟩, from the two (b, T, T) Grams
        if positions_last:
            gram_a, gram_s = torch.bmm(a.transpose(1, 2), a), torch.bmm(s.transpose(1, 2), s)
        else:
            gram_a, gram_s = torch.bmm(a, a.transpose(1, 2)), torch.bmm(s, s.transpose(1, 2))
        return (gram_a * gram_s).sum(dim=(1, 2))
    if positions_last:
        return sq_norms(torch.bmm(s, a.transpose(1, 2)))
    return sq_norms(torch.bmm(s.transpose(1, 2), a))


def outer_clipped_sum(a: Tensor, s: Tensor, factors: Tensor, into: Tensor | None = None) -> Tensor:
    """Σ_i C_i s_iᵀ a_i as one matmul: (C ⊙ s)ᵀ a = sᵀ (C ⊙ a), shape (out, in); added in
    place to ``into`` when given (and returned).

    The factors scale whichever of a and s is smaller (same result, less elementwise work).
    """
    c = cast(factors, s.dtype).view(-1, 1, 1)
    if s.shape[-1] <= a.shape[-1]:
        s = torch.mul(s, c, out=scratch("scaled", s.shape, torch.result_type(s, c), s.device))
    else:
        a = torch.mul(a, c, out=scratch("scaled", a.shape, torch.result_type(a, c), a.device))
    s, a = s.reshape(-1, s.shape[-1]).t(), a.reshape(-1, a.shape[-1])
    return s @ a if into is None else into.addmm_(cast(s, into.dtype), cast(a, into.dtype))


def flat_clipped_sum(rows: Tensor, cols: Tensor, factors: Tensor) -> Tensor:
    """Σ_i C_i rows_i ⊗ cols_i for one position per sample, rows: (b, p), cols: (b, q): one
    matmul, the factors scaling the smaller side (no (b, 1, n) views on the way)."""
    c = cast(factors, rows.dtype)
    if rows.shape[1] <= cols.shape[1]:
        return torch.mm(rows.t() * c, cols)
    return torch.mm(rows.t(), cols * c.unsqueeze(1))


def outer_per_sample(a: Tensor, s: Tensor) -> Tensor:
    """Per-sample s_iᵀ a_i, shape (b, out, in)."""
    return torch.bmm(s.transpose(1, 2), a)


def bias_per_sample(s: Tensor) -> Tensor:
    """Per-sample bias gradient Σ_t s_it, shape (b, out), from s: (b, T, out)."""
    return s.sum(dim=1)


@dataclass(frozen=True)
class OuterFactors:
    """A parameter's per-sample gradient, viewed as a matrix (dim 0 × the rest), written as
    g_i = Σ_t rows_it ⊗ cols_it.

    Each side is dense, (b, T, n), or token ids, (b, T) int64, standing for one-hot rows (an
    embedding's vocabulary side); ``cols`` may be None, a side of ones (a bias: g_i = Σ_t rows_it).
    Linear: rows = s, cols = a; its bias: rows = s, cols = None.
    """

    rows: Tensor
    cols: Tensor | None


def _pairwise(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """(b, T1, T2) of ⟨x_t, y_t'⟩, each side dense (b, T, n) or ids (b, T)."""
    x_ids, y_ids = not x.is_floating_point(), not y.is_floating_point()
    if x_ids and y_ids:
        return (x.unsqueeze(2) == y.unsqueeze(1)).to(dtype)
    if x_ids:  # ⟨e_{x_t}, y_t'⟩ = y[t', x_t]
        return y.to(dtype).gather(2, x.unsqueeze(1).expand(-1, y.shape[1], -1)).transpose(1, 2)
    if y_ids:
        return _pairwise(y, x, dtype).transpose(1, 2)
    return torch.bmm(x.to(dtype), y.to(dtype).transpose(1, 2))


def outer_inner(f: OuterFactors, g: OuterFactors) -> Tensor:
    """⟨g_i^f, g_i^g⟩_F per sample: Σ_{t,t'} ⟨f.rows_t, g.rows_t'⟩ ⟨f.cols_t, g.cols_t'⟩."""
    sides = (f.rows, f.cols, g.rows, g.cols)
    dense = [t.dtype for t in sides if t is not None and t.is_floating_point()]
    dtype = dense[0]
    for d in dense[1:]:
        dtype = torch.promote_types(dtype, d)
    f_cols, g_cols = _ones_like(f.cols, f.rows, dtype), _ones_like(g.cols, g.rows, dtype)
    if f.cols is None and g.cols is None:  # two biases: ⟨Σ_t rows_t, Σ_t' rows_t'⟩
        return (f.rows.to(dtype).sum(dim=1) * g.rows.to(dtype).sum(dim=1)).sum(dim=1)
    return (_pairwise(f.rows, g.rows, dtype) * _pairwise(f_cols, g_cols, dtype)).sum(dim=(1, 2))


def _ones_like(side: Tensor | None, rows: Tensor, dtype: torch.dtype) -> Tensor:
    """A side of ones, (b, T, 1), where ``side`` is None; else ``side``."""
    return rows.new_ones(*rows.shape[:2], 1, dtype=dtype) if side is None else side
