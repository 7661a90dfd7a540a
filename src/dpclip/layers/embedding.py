"""nn.Embedding: per-sample norms from token-id collisions, never a vocab × dim tensor per sample.

Sample i looks up ids ``id_it`` and receives output gradients ``s_it``, so its weight gradient is
``g_i = Σ_t e_{id_it} s_itᵀ`` and

    ‖g_i‖² = Σ_{t,t'} [id_it = id_it'] ⟨s_it, s_it'⟩ = Σ_v ‖Σ_{t: id_it = v} s_it‖².

Two ways to evaluate it (``strategy``):

- ``"ghost"`` — the collision form: a (T × T) id-equality mask times the Gram matrix of s.
  Cost O(b T² dim) time, O(b T²) memory; no sort, so it suits short sequences.
- ``"instantiate"`` — the grouped form: sort each sample's ids, sum the s rows of equal ids into
  (b, T, dim) buckets (the nonzero rows of g_i, instantiated sparsely) and square.
  Cost O(b T log T + b T dim) time, O(b T dim) memory.
- ``"mixed"`` picks the collision form only for ``T <= PAIRWISE_MAX_T``, where its small batched
  matmul beats the sort and scatter (measured on CPU, b = 32, dim 64–768: the two cross near
  T = 16–32; at T = 512 the grouped form is 2–15× faster); it also keeps memory O(b T dim).

Positions holding ``padding_idx`` contribute nothing (the module never updates that row).
``scale_grad_by_freq`` divides each s_it by the count of id_it within sample i, which is what
the sample's own gradient is when it is processed alone. ``max_norm`` (the forward rewrites
weight rows in place) and ``sparse=True`` (sparse gradients) are rejected with a ValueError.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from dpclip.layers._common import OuterFactors
from dpclip.layers._derive import from_outer_factors
from dpclip.layers._registry import LayerRegistry, compute_dtype

PAIRWISE_MAX_T = 16


def _check(module: nn.Embedding) -> None:
    if module.max_norm is not None:
        raise ValueError(
            f"dpclip cannot clip nn.Embedding with max_norm={module.max_norm}: its forward "
            "renormalises weight rows in place, so per-sample gradients are not well defined; "
            "construct the embedding with max_norm=None"
        )
    if module.sparse:
        raise ValueError(
            "dpclip cannot clip nn.Embedding with sparse=True: the clipped gradient is dense; "
            "construct the embedding with sparse=False"
        )


def _group_index(ids: Tensor) -> Tensor:
    """For ids (b, T): each position's group in [0, T), equal ids of a sample sharing a group."""
    sorted_ids, order = ids.sort(dim=1)
    starts = torch.ones_like(sorted_ids, dtype=torch.long)
    starts[:, 1:] = (sorted_ids[:, 1:] != sorted_ids[:, :-1]).long()
    return torch.empty_like(order).scatter_(1, order, starts.cumsum(dim=1) - 1)


def _group_sums(group: Tensor, s: Tensor) -> Tensor:
    """Σ of the s rows in each group, flattened to (b·T, dim); unused groups are zero."""
    b, T, dim = s.shape
    flat = (group + torch.arange(b, device=group.device).unsqueeze(1) * T).reshape(-1)
    return s.new_zeros(b * T, dim).index_add_(0, flat, s.reshape(-1, dim))


def _flat(module: nn.Embedding, inputs: tuple, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """ids (b, T) int64 and s (b, T, dim) with padding zeroed and frequency scaling applied."""
    _check(module)
    ids = inputs[0]
    b = ids.shape[0]
    ids = ids.reshape(b, -1).long()
    s = grad_output.reshape(b, -1, module.embedding_dim).to(
        compute_dtype(module.weight, grad_output)
    )
    if module.padding_idx is not None:
        s = s.masked_fill((ids == module.padding_idx).unsqueeze(-1), 0)
    if module.scale_grad_by_freq:
        group = _group_index(ids)
        counts = torch.zeros_like(ids).scatter_add_(1, group, torch.ones_like(ids))
        s = s / counts.gather(1, group).unsqueeze(-1).to(s.dtype)
    return ids, s


def _use_pairwise(strategy: str, T: int) -> bool:
    if strategy == "ghost":
        return True
    if strategy == "instantiate":
        return False
    return T <= PAIRWISE_MAX_T


def norm_sq(
    module: nn.Embedding, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
) -> dict[str, Tensor]:
    ids, s = _flat(module, inputs, grad_output)
    if "weight" not in names:
        return {}
    if _use_pairwise(strategy, ids.shape[1]):
        same = ids.unsqueeze(2) == ids.unsqueeze(1)
        gram = torch.bmm(s, s.transpose(1, 2))
        return {"weight": gram.masked_fill(~same, 0).sum(dim=(1, 2))}
    sums = _group_sums(_group_index(ids), s)
    return {"weight": sums.square().sum(dim=1).view(s.shape[:2]).sum(dim=1)}


def outer_factors(
    module: nn.Embedding, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, OuterFactors]:
    """g_i = Σ_t e_{id_it} ⊗ s_it: the vocabulary side as ids, never one-hot."""
    ids, s = _flat(module, inputs, grad_output)
    return {"weight": OuterFactors(ids, s)} if "weight" in names else {}


def check(module: nn.Embedding) -> str | None:
    """Why the engine must refuse this embedding at construction, or None."""
    try:
        _check(module)
    except ValueError as err:
        return str(err)
    return None


# the clipped sum (an index-add of C_i s_it into rows id_it), the in-place add and the
# per-sample gradients (only for weights tied to another layer) are derived from the factors
RULE = from_outer_factors(outer_factors, norm_sq=norm_sq, check=check)


def register(registry: LayerRegistry) -> None:
    registry.register(nn.Embedding, RULE)
