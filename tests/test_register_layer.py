"""dpclip.register_layer: a user's rule in one form gets what the built-ins get (derived norms,
clipped sums, cross terms of tied weights) and equals the naive per-example loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import dpclip
from dpclip.layers import OuterFactors
from tests.test_engine_behaviour import _assert_one_step_equals_naive_loop


class Gate(nn.Module):
    """y = x ⊙ w: per-example gradients Σ_t x_t ⊙ s_t, small; registered by that form."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def _gate_grads(module, inputs, grad_output, names):
    x, s = inputs[0], grad_output
    return {"w": (x * s).reshape(x.shape[0], -1, x.shape[-1]).sum(dim=1)}


class Logits(nn.Module):
    """h @ Wᵀ with W (vocab, d), its own forward: registered by outer factors (s, h)."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(vocab, d, dtype=torch.float64))

    def forward(self, h):
        return h @ self.weight.T


def _logit_factors(module, inputs, grad_output, names):
    return {"weight": OuterFactors(grad_output, inputs[0])}


class ColumnEmbedding(nn.Module):
    """An embedding stored (d, vocab), looked up by columns: factors (s, ids), ids as cols."""

    def __init__(self, vocab: int, d: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(d, vocab, dtype=torch.float64))

    def forward(self, ids):
        return self.table.T[ids]


def _column_factors(module, inputs, grad_output, names):
    return {"table": OuterFactors(grad_output, inputs[0])}


dpclip.register_layer(Gate, per_sample_grad=_gate_grads)
dpclip.register_layer(Logits, outer_factors=_logit_factors)
dpclip.register_layer(ColumnEmbedding, outer_factors=_column_factors)


class TiedLM(nn.Module):
    def __init__(self, tied: bool) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4).double()
        self.gate, self.head = Gate(4), Logits(7, 4)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.gate(self.emb(ids)))).mean(dim=1)


class ColumnLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = ColumnEmbedding(7, 4), nn.Linear(4, 7).double()

    def forward(self, ids):
        return self.head(torch.tanh(self.emb(ids))).mean(dim=1)


@pytest.mark.parametrize("tied", [False, True])
def test_registered_rules_of_both_forms_equal_the_naive_loop_tied_or_not(tied):
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (5, 6))
    _assert_one_step_equals_naive_loop(TiedLM(tied), ids, torch.tensor([0, 1, 2, 3, 4]))


def test_a_registered_rule_with_token_ids_as_columns_equals_the_naive_loop():
    torch.manual_seed(0)
    ids = torch.randint(0, 7, (5, 6))
    _assert_one_step_equals_naive_loop(ColumnLM(), ids, torch.tensor([0, 1, 2, 3, 4]))


def test_register_layer_takes_exactly_one_form_and_refuses_a_duplicate():
    class Mine(nn.Module):
        pass

    with pytest.raises(ValueError, match="exactly one of outer_factors= or per_sample_grad="):
        dpclip.register_layer(Mine)
    with pytest.raises(ValueError, match="exactly one"):
        dpclip.register_layer(Mine, outer_factors=_logit_factors, per_sample_grad=_gate_grads)
    with pytest.raises(ValueError, match="already registered"):
        dpclip.register_layer(Gate, per_sample_grad=_gate_grads)
    dpclip.register_layer(Gate, per_sample_grad=_gate_grads, replace=True)


def test_a_rule_returning_the_wrong_shape_is_refused_naming_the_layer():
    class Bad(Gate):
        pass

    dpclip.register_layer(Bad, per_sample_grad=lambda m, i, g, n: {"w": g.sum(0)})
    model = nn.Sequential(nn.Linear(4, 4).double(), Bad(4))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=0)
    with pytest.raises(
        ValueError, match=r"rule for Bad returned shape \(4,\).*expected .*\(2, 4\)"
    ):
        model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()


def test_outer_factors_without_a_positions_dim_are_refused_with_the_fix():
    """A classifier head's (b, d) input given as a side as it is: the engine says to add the
    positions dim, instead of an IndexError deep in the norm."""

    class FlatLogits(Logits):
        pass

    dpclip.register_layer(
        FlatLogits, outer_factors=lambda m, inputs, s, names: {"weight": OuterFactors(s, inputs[0])}
    )
    model = nn.Sequential(nn.Linear(4, 3).double(), FlatLogits(5, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=0)
    with pytest.raises(ValueError, match=r"rule for FlatLogits returned rows \(2, 5\).*unsqueeze"):
        model(torch.randn(2, 4, dtype=torch.float64)).sum().backward()
    assert all(p.grad is None for p in model.parameters())
