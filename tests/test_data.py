"""PoissonLoader: Poisson-sampled logical batches split into bounded, lazily loaded physical ones."""

import math

import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from dpclip.data import PoissonLoader


def _tensor_set(n: int) -> TensorDataset:
    return TensorDataset(torch.arange(n, dtype=torch.float64)[:, None], torch.arange(n))


class _CountingDataset(Dataset):
    """A plain map-style dataset that counts how many examples have been read."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.reads = 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        self.reads += 1
        return torch.tensor([float(i)]), i


def _seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_logical_batch_sizes_are_binomial_n_q():
    n, q, steps = 1000, 0.05, 4000
    loader = PoissonLoader(_tensor_set(n), sample_rate=q, steps=steps, generator=_seeded())
    sizes = torch.tensor([len(b) for b in loader], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    # Standard errors: of the mean sqrt(var / steps) ~ 0.11; of the variance var*sqrt(2/steps) ~ 1.1.
    assert abs(sizes.mean().item() - mean) < 5 * math.sqrt(var / steps)
    assert abs(sizes.var().item() - var) < 5 * var * math.sqrt(2 / steps)


def test_each_example_is_included_independently_with_probability_q():
    n, q, steps = 200, 0.1, 3000
    loader = PoissonLoader(_tensor_set(n), sample_rate=q, steps=steps, generator=_seeded(1))
    counts = torch.zeros(n)
    pair = 0  # how often examples 0 and 1 are drawn together: q^2 under independence
    for batch in loader:
        counts[batch.indices] += 1
        pair += int(bool({0, 1} <= set(batch.indices.tolist())))
    assert (counts > 0).all(), "every example can appear"
    freq = counts / steps
    assert abs(freq.mean().item() - q) < 0.005
    assert (freq - q).abs().max().item() < 6 * math.sqrt(q * (1 - q) / steps)
    assert abs(pair / steps - q * q) < 6 * math.sqrt(q * q / steps)


def test_physical_batches_are_bounded_and_partition_the_logical_batch():
    data = _tensor_set(100)
    loader = PoissonLoader(
        data, sample_rate=0.5, physical_batch_size=7, steps=20, generator=_seeded(2)
    )
    for logical in loader:
        xs, ys = [], []
        for x, y in logical:
            assert 1 <= len(x) <= 7
            xs.append(x)
            ys.append(y)
        if len(logical) == 0:
            assert xs == []
            continue
        assert torch.equal(torch.cat(ys), logical.indices)
        assert torch.equal(torch.cat(xs), data.tensors[0][logical.indices])
        assert len(xs) == math.ceil(len(logical) / 7)


def test_no_physical_batch_size_gives_one_physical_batch():
    loader = PoissonLoader(_tensor_set(50), sample_rate=0.5, steps=5, generator=_seeded(3))
    for logical in loader:
        physical = list(logical)
        assert len(physical) == (1 if len(logical) else 0)
        if physical:
            assert len(physical[0][0]) == len(logical)


def test_empty_logical_batches_occur_and_yield_no_physical_batches():
    seen = []
    loader = PoissonLoader(
        _tensor_set(10),
        sample_rate=0.01,
        steps=100,
        physical_batch_size=4,
        generator=_seeded(4),
        on_logical_batch=lambda batch: seen.append(len(batch)),
    )
    empties = 0
    for logical in loader:
        if len(logical) == 0:
            empties += 1
            assert list(logical) == []
            assert logical.indices.numel() == 0
    assert empties > 50  # P(empty) = 0.99^10 ~ 0.90
    assert seen.count(0) == empties


def test_on_logical_batch_is_called_with_each_batch_before_it_is_consumed():
    seen = []
    loader = PoissonLoader(
        _tensor_set(30),
        sample_rate=0.3,
        steps=8,
        generator=_seeded(5),
        on_logical_batch=seen.append,
    )
    for k, logical in enumerate(loader):
        assert len(seen) == k + 1 and seen[-1] is logical


def test_seeded_generator_makes_sampling_deterministic():
    def draw(seed):
        loader = PoissonLoader(_tensor_set(100), sample_rate=0.2, steps=10, generator=_seeded(seed))
        return [b.indices.tolist() for b in loader]

    assert draw(7) == draw(7)
    assert draw(7) != draw(8)


def test_default_number_of_logical_batches_is_one_over_q():
    data = _tensor_set(100)
    assert len(PoissonLoader(data, sample_rate=0.1)) == 10
    assert len(PoissonLoader(data, sample_rate=0.3)) == 3
    assert len(PoissonLoader(data, sample_rate=1.0)) == 1
    assert len(list(PoissonLoader(data, sample_rate=0.25))) == 4
    assert len(PoissonLoader(data, sample_rate=0.1, steps=3)) == 3


def test_generic_dataset_is_loaded_lazily_one_physical_batch_at_a_time():
    data = _CountingDataset(1000)
    loader = PoissonLoader(
        data, sample_rate=1.0, physical_batch_size=16, steps=1, generator=_seeded(6)
    )
    logical = next(iter(loader))
    assert len(logical) == 1000 and data.reads == 0
    physical = iter(logical)
    x, y = next(physical)
    assert data.reads == 16  # memory is bounded by the physical batch, not the logical one
    assert torch.equal(y, torch.arange(16))
    assert torch.equal(x, torch.arange(16, dtype=torch.float32)[:, None])


def test_generic_dataset_and_tensor_fast_path_collate_the_same_way():
    tensors = TensorDataset(torch.arange(40, dtype=torch.float32)[:, None], torch.arange(40))
    generic = _CountingDataset(40)
    a = PoissonLoader(
        tensors, sample_rate=0.5, physical_batch_size=6, steps=3, generator=_seeded(9)
    )
    b = PoissonLoader(
        generic, sample_rate=0.5, physical_batch_size=6, steps=3, generator=_seeded(9)
    )
    for la, lb in zip(a, b, strict=True):
        for (xa, ya), (xb, yb) in zip(la, lb, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_custom_collate_fn_is_used():
    loader = PoissonLoader(
        _tensor_set(20),
        sample_rate=1.0,
        physical_batch_size=8,
        steps=1,
        collate_fn=lambda items: len(items),
    )
    assert list(next(iter(loader))) == [8, 8, 4]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"sample_rate": 0.0}, "0 < sample_rate <= 1"),
        ({"sample_rate": 1.5}, "0 < sample_rate <= 1"),
        ({"sample_rate": float("nan")}, "0 < sample_rate <= 1"),
        ({"sample_rate": "0.1"}, "sample_rate to be a number"),
        ({"sample_rate": 0.1, "physical_batch_size": 0}, "physical_batch_size to be a positive"),
        ({"sample_rate": 0.1, "physical_batch_size": 2.5}, "physical_batch_size to be a positive"),
        ({"sample_rate": 0.1, "steps": 0}, "steps to be a positive integer"),
        ({"sample_rate": 0.1, "num_workers": -1}, "num_workers >= 0"),
        ({"sample_rate": 0.1, "generator": 3}, "torch.Generator"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PoissonLoader(_tensor_set(10), **kwargs)


def test_empty_or_unsized_dataset_is_rejected():
    with pytest.raises(ValueError, match="non-empty dataset"):
        PoissonLoader(_tensor_set(0), sample_rate=0.5)
    with pytest.raises(ValueError, match="map-style dataset"):
        PoissonLoader(iter(range(3)), sample_rate=0.5)
