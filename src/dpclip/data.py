"""Poisson sampling into logical batches, each split into bounded physical batches.

The privacy accounting assumes every logical batch is drawn by Poisson sampling: each example is
included independently with probability q, so the batch size is Binomial(N, q) and may be zero.
A logical batch is what the optimizer steps on (one noisy update); its physical batches are what
fits in memory. Examples are loaded lazily, one physical batch at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from dpclip.accounting import steps_per_epoch

__all__ = ["LogicalBatch", "PoissonLoader", "poisson_sample"]


def poisson_sample(
    size: int, sample_rate: float, generator: torch.Generator | None,
    shard: tuple[int, int] | None = None,
) -> torch.Tensor:  # fmt: skip
    """One Poisson sample of ``range(size)``: each index independently with probability q, in
    increasing order. ``shard=(rank, world_size)`` keeps every world_size-th sampled index from
    ``rank``: ranks that draw with the same generator state take disjoint shares whose union is
    the sample. The uniforms are float64: float32 ones are multiples of 2⁻²⁴, which puts each
    index in with probability ⌈q·2²⁴⌉/2²⁴ > q (6× q at q = 1e-8), an ε the ledger would not
    count."""
    uniform = torch.rand(size, generator=generator, dtype=torch.float64)
    indices = (uniform < sample_rate).nonzero().flatten()
    if shard is not None:
        rank, world = shard
        indices = indices[rank::world]
    return indices


class LogicalBatch:
    """One Poisson-sampled logical batch: iterate over its collated physical batches.

    ``len(batch)`` is the number of examples (0 is possible); ``batch.indices`` are their dataset
    indices in increasing order. Iterating an empty batch yields nothing. ``iterations`` counts
    the passes over its physical batches begun; ``state`` is a digest of the random state it
    was drawn from.
    """

    def __init__(
        self,
        dataset: Dataset,
        indices: torch.Tensor,
        physical_batch_size: int | None,
        collate_fn: Callable[[list], Any] | None,
        num_workers: int,
        on_physical_batch: Callable[[LogicalBatch, int | None, int], None] | None = None,
        state: bytes = b"",
    ) -> None:
        self.dataset = dataset
        self._on_physical_batch = on_physical_batch
        self.state = state
        self.iterations = 0
        self.draw: int | None = None  # set by whoever counts the draws (the engine)
        self.indices = indices
        self.physical_batch_size = physical_batch_size
        self._collate_fn = collate_fn
        self._num_workers = num_workers

    def __len__(self) -> int:
        return int(self.indices.numel())

    def __repr__(self) -> str:
        return f"LogicalBatch(size={len(self)}, physical_batch_size={self.physical_batch_size})"

    def chunks(self) -> list[torch.Tensor]:
        """The index tensors of the physical batches, in order."""
        if len(self) == 0:
            return []
        size = self.physical_batch_size or len(self)
        return list(torch.split(self.indices, size))

    def __iter__(self) -> Iterator[Any]:
        chunks = self.chunks()
        if not chunks:
            return iter(())
        self.iterations += 1
        batches = self._batches(chunks)
        if self._on_physical_batch is None:
            return batches
        return self._announced(batches, [len(c) for c in chunks], self._on_physical_batch)

    def _announced(
        self, batches: Iterator[Any], sizes: list[int],
        announce: Callable[[LogicalBatch, int | None, int], None],
    ) -> Iterator[Any]:  # fmt: skip
        """Tell ``announce`` each physical batch's size before it is used, with how many of
        this logical batch's physical batches come after it; and, when the loop over them ends,
        ``(None, k)`` with k the physical batches it never took (a ``break``: 0 when done)."""
        taken = 0
        try:
            for k, (size, batch) in enumerate(zip(sizes, batches, strict=False)):
                announce(self, size, len(sizes) - 1 - k)
                taken += 1
                yield batch
        finally:
            announce(self, None, len(sizes) - taken)

    def _batches(self, chunks: list[torch.Tensor]) -> Iterator[Any]:
        if self._fast_path():
            tensors = self.dataset.tensors  # type: ignore[attr-defined]
            # Same structure default_collate gives for a TensorDataset: a list of stacked tensors.
            return ([t[idx] for t in tensors] for idx in chunks)
        sampler: Sequence[list[int]] = [c.tolist() for c in chunks]
        loader = DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=self._collate_fn,
            num_workers=self._num_workers,
        )
        return iter(loader)

    def _fast_path(self) -> bool:
        return (
            type(self.dataset) is TensorDataset
            and self._collate_fn is None
            and self._num_workers == 0
        )


class PoissonLoader:
    """Iterate over Poisson-sampled logical batches of ``dataset``.

    Args:
        dataset: a map-style dataset with ``__len__``.
        sample_rate: q, the probability that each example is in a logical batch.
        physical_batch_size: the most examples per physical batch; None means one physical
            batch per logical batch.
        generator: the source of sampling randomness (seed it for reproducible runs); None
            uses torch's global generator.
        collate_fn: as for :class:`torch.utils.data.DataLoader` (None: default collation).
        num_workers: DataLoader worker processes used to load each logical batch.
        steps: logical batches per pass; default
            :func:`dpclip.accounting.steps_per_epoch` (round(1/q): one epoch in expectation).
        on_logical_batch: called with each logical batch before it is yielded.
        on_physical_batch: called with the logical batch, each physical batch's size before it
            is yielded and how many of its logical batch's physical batches come after it, and
            with ``(logical, None, k)`` when the loop over them ends, k of them never taken.
        shard: ``(rank, world_size)``: yield only this rank's share of each logical batch
            (every world_size-th sampled example, from ``rank``). Every rank must draw the
            same sample, so ``shared_seed`` is then required.
        shared_seed: ``shared_seed(generator)`` returns the seed of each pass's sampling
            generator, the same on every rank (:meth:`dpclip.distributed.World.shared_seed`).

    >>> from torch.utils.data import TensorDataset
    >>> data = TensorDataset(torch.arange(10.0), torch.arange(10))
    >>> loader = PoissonLoader(data, sample_rate=0.5, physical_batch_size=2,
    ...                        generator=torch.Generator().manual_seed(0))
    >>> len(loader)
    2
    >>> for logical in loader:
    ...     assert all(len(x) <= 2 for x, y in logical)
    """

    def __init__(
        self,
        dataset: Dataset,
        *,
        sample_rate: float,
        physical_batch_size: int | None = None,
        generator: torch.Generator | None = None,
        collate_fn: Callable[[list], Any] | None = None,
        num_workers: int = 0,
        steps: int | None = None,
        on_logical_batch: Callable[[LogicalBatch], None] | None = None,
        on_physical_batch: Callable[[LogicalBatch, int | None, int], None] | None = None,
        shard: tuple[int, int] | None = None,
        shared_seed: Callable[[torch.Generator | None], int] | None = None,
    ) -> None:
        try:
            size = len(dataset)  # type: ignore[arg-type]
        except TypeError as err:
            raise ValueError("expected a map-style dataset with __len__") from err
        if size < 1:
            raise ValueError(f"expected a non-empty dataset, got {size} examples")
        if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float)):
            raise ValueError(f"expected sample_rate to be a number, got {sample_rate!r}")
        if not 0.0 < sample_rate <= 1.0:  # also rejects NaN
            raise ValueError(f"expected 0 < sample_rate <= 1, got {sample_rate}")
        _check_positive_int("physical_batch_size", physical_batch_size, allow_none=True)
        _check_positive_int("steps", steps, allow_none=True)
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
            raise ValueError(f"expected num_workers >= 0, got {num_workers!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"expected generator to be a torch.Generator, got {generator!r}")
        self.dataset = dataset
        self.sample_rate = float(sample_rate)
        self.physical_batch_size = physical_batch_size
        self.generator = generator
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.steps = steps if steps is not None else steps_per_epoch(self.sample_rate)
        self.on_logical_batch = on_logical_batch
        self.on_physical_batch = on_physical_batch
        self._size = size
        if shard is not None:
            rank, world = shard
            if not 0 <= rank < world or shared_seed is None:
                raise ValueError(
                    f"expected shard=(rank, world_size) with 0 <= rank < world_size and a "
                    f"shared_seed, got shard={shard!r}"
                )
        self.shard, self._shared_seed = shard, shared_seed

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[LogicalBatch]:
        generator = self.generator
        if self._shared_seed is not None:
            generator = torch.Generator().manual_seed(self._shared_seed(self.generator))
        for _ in range(self.steps):
            batch = self._sample(generator)
            if self.on_logical_batch is not None:
                self.on_logical_batch(batch)
            yield batch

    def _sample(self, generator: torch.Generator | None) -> LogicalBatch:
        """Draw one logical batch: each example independently with probability q (this
        rank's share of it, when sharded)."""
        state = (generator if generator is not None else torch.default_generator).get_state()
        digest = hashlib.blake2b(state.numpy().tobytes(), digest_size=16).digest()
        indices = poisson_sample(self._size, self.sample_rate, generator, self.shard)
        return LogicalBatch(
            self.dataset, indices, self.physical_batch_size, self.collate_fn, self.num_workers,
            on_physical_batch=self.on_physical_batch, state=digest,
        )  # fmt: skip


def _check_positive_int(name: str, value: object, *, allow_none: bool) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"expected {name} to be a positive integer, got {value!r}")
