"""Consecutive runs of tensors of one device and dtype, bounded in size: one flat operation per
run instead of one per tensor (the noise draw, the all-reduce of several processes)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor


def buckets(tensors: Sequence[Tensor], limit: Callable[[Tensor], int]) -> list[list[Tensor]]:
    """Runs of one device and dtype of at most ``limit(t)`` elements each; a larger contiguous
    tensor is cut into flat pieces (views) first."""
    runs: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        most = limit(t)
        pieces = t.view(-1).split(most) if t.numel() > most and t.is_contiguous() else [t]
        for piece in pieces:
            last = runs[-1][-1] if runs else None
            same = last is not None and (last.device, last.dtype) == (t.device, t.dtype)
            if same and size + piece.numel() <= most:
                runs[-1].append(piece)
                size += piece.numel()
            else:
                runs.append([piece])
                size = piece.numel()
    return runs
