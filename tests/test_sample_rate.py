"""The ledger charges Poisson sampling at q = batch_size / sample_size: a loop of its own that
feeds more examples per step than that is refused before its step, since its ε would be false."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import dpclip
from dpclip.accounting import sampling

N = 200


def _run(batch_size: int):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=N, batch_size=batch_size, steps=1000, noise_multiplier=1.0, seed=0
    )
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(
        torch.randn(N, 4, generator=g), torch.randint(0, 3, (N,), generator=g)
    )
    return model, opt, engine, data


def _step(model, opt, x, y):
    F.cross_entropy(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_a_loader_batch_larger_than_batch_size_is_refused_at_the_first_step_unchanged():
    model, opt, engine, data = _run(batch_size=10)
    x, y = data[:80]
    F.cross_entropy(model(x), y).backward()
    before = _params(model)
    with pytest.raises(dpclip.SampleRateError, match=r"80 examples.*batch_size=10.*not taken"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model), strict=True))
    assert engine.steps_taken == 0 and engine.epsilon() == 0


def test_a_loader_batch_a_quarter_larger_is_refused_once_the_steps_make_it_certain():
    """40 per step where 32 is declared: each step alone is plausible, their sum is not."""
    model, opt, engine, data = _run(batch_size=32)
    loader = torch.utils.data.DataLoader(data, batch_size=40, drop_last=True)
    taken = 0
    with pytest.raises(dpclip.SampleRateError, match="40.0 per step"):
        for _ in range(20):
            for x, y in loader:
                _step(model, opt, x, y)
                taken += 1
    assert 5 < taken < 100 and engine.steps_taken == taken


def test_poisson_batches_and_exact_batch_size_batches_are_never_refused():
    model, opt, engine, data = _run(batch_size=10)
    loader = engine.data_loader(data, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning of too few either
        for _ in range(5):  # 100 steps
            for logical in loader:
                for x, y in logical:
                    F.cross_entropy(model(x), y).backward()
                opt.step()
                opt.zero_grad()
        for x, y in torch.utils.data.DataLoader(data, batch_size=10, shuffle=True):
            _step(model, opt, x, y)
    assert engine.steps_taken == 120


def test_a_dropped_batch_is_not_counted_in_the_step():
    """zero_grad() after backward drops those sums: only the last batch is the step's."""
    model, opt, engine, data = _run(batch_size=20)
    for k in range(4):
        x, y = data[20 * k : 20 * (k + 1)]
        F.cross_entropy(model(x), y).backward()
        if k < 3:
            opt.zero_grad()
    opt.step()
    assert engine.steps_taken == 1


def test_far_fewer_examples_than_batch_size_warn_once():
    """The ledger then charges more than the loop spends: no privacy risk, but the update is
    divided by batch_size."""
    model, opt, engine, data = _run(batch_size=100)
    with pytest.warns(UserWarning, match="far fewer than batch_size=100") as caught:
        for k in range(5):
            x, y = data[10 * k : 10 * (k + 1)]
            _step(model, opt, x, y)
    assert sum("far fewer" in str(w.message) for w in caught) == 1
    assert engine.steps_taken == 5


@pytest.mark.parametrize(
    "count, trials, rate",
    [(256, 1000, 0.032), (40, 1000, 0.032), (3, 10**6, 1e-6), (90, 100, 0.5), (1, 50, 0.2)],
)
def test_the_tail_bound_bounds_the_exact_binomial_tail(count, trials, rate):
    exact = (
        stats.binom.sf(count - 1, trials, rate)
        if count > trials * rate
        else stats.binom.cdf(count, trials, rate)
    )
    assert math.log(exact) <= sampling.log_tail_bound(count, trials, rate) + 1e-9


def test_the_tail_bound_says_nothing_at_the_mean_or_for_degenerate_rates():
    assert sampling.log_tail_bound(32, 1000, 0.032) == 0.0
    assert sampling.log_tail_bound(5, 0, 0.5) == 0.0
    assert sampling.log_tail_bound(5, 10, 1.0) == 0.0
    assert not sampling.too_many(10, 10, 1.0)  # q = 1: every example, every step


def test_a_loop_without_engine_data_loader_is_warned_once_that_the_epsilon_assumes_poisson():
    model, opt, engine, data = _run(batch_size=10)
    with pytest.warns(UserWarning, match="assumes each step's examples are a Poisson sample") as w:
        for x, y in torch.utils.data.DataLoader(data, batch_size=10, shuffle=True):
            _step(model, opt, x, y)
    assert sum("Poisson sample at" in str(m.message) for m in w) == 1
