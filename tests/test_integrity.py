"""dpclip clips true examples or refuses: every pattern that used to give a silently wrong
clipped sum either equals the naive per-example loop or is refused, naming the module and the fix,
with the model, its gradients and the ledger unchanged."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpclip
from dpclip._loss_tape import remove_orphans
from tests import engine_models
from tests.oracle import clipped_sum, per_sample_grads

B, T, D = 4, 3, 5


def _engine(model, **kw):
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    args = dict(sample_size=100, batch_size=B, steps=3, noise_multiplier=0.0)
    return dpclip.PrivacyEngine(model, opt, **{**args, **kw}), opt


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_unchanged(model, engine, before):
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert engine.ledger.steps == 0


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _y(n=B, classes=3):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(2))


def _assert_refused_at_forward(model, x, match, error=dpclip.IntegrityError):
    engine, opt = _engine(model)
    before = _snapshot(model)
    with pytest.raises(error, match=match):
        model(x)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    _assert_unchanged(model, engine, before)


def _assert_refused_at_step(model, x, y, match, loss=F.cross_entropy):
    """The forward and backward run; the self-check refuses the first step."""
    engine, opt = _engine(model)
    before = _snapshot(model)
    loss(model(x), y).backward()
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(dpclip.IntegrityError, match=match):
        opt.step()
    _assert_unchanged(model, engine, before)
    for p, g in zip(model.parameters(), grads, strict=True):  # the check wrote no gradient
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


def _assert_refused_at_backward(model, match, verify=True, extra=lambda model: 0):
    """The forward runs; its backward (of the loss plus ``extra(model)``) is refused, writes no
    gradient, and no step follows."""
    engine, opt = _engine(model, verify=verify)
    before = _snapshot(model)
    loss = F.cross_entropy(model(_x(B, T, D)), _y()) + extra(model)
    with pytest.raises(dpclip.IntegrityError, match=match):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    _assert_unchanged(model, engine, before)
    engine.detach()


def _assert_equals_naive_loop(model, x, y):
    trained = [p for p in model.parameters() if p.requires_grad]
    expected = clipped_sum(
        per_sample_grads(copy.deepcopy(model), x, y), [list(range(len(trained)))],
        clipping="automatic", clip_norm=1.0, gamma=0.01,
    )  # fmt: skip
    engine, opt = _engine(model)
    before = [p.detach().clone() for p in trained]
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p, old, want in zip(trained, before, expected, strict=True):
        torch.testing.assert_close(old - p.detach(), want / B, rtol=1e-6, atol=1e-12)


# ------------------------------------------------------------------ 1. batch flattened into tokens
class _FcHead(nn.Module):
    """Two trainable layers, fc (D -> width) then head (width -> 3), that the patterns below
    call in their own ways; ``how`` picks a pattern's variant."""

    def __init__(self, how: str = "", width: int = D) -> None:
        super().__init__()
        self.how = how
        self.fc = nn.Linear(D, width)
        self.head = nn.Linear(width, 3)


class _FlatTokens(nn.Module):
    """Its layers run on the batch flattened into tokens, (B·T, d); ``how``: how it flattens."""

    def __init__(self, how: str = "reshape", frozen_backbone: bool = False) -> None:
        super().__init__()
        self.how = how
        self.body = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        if frozen_backbone:
            self.body.requires_grad_(False)

    def forward(self, x):
        b, t, d = x.shape
        how = self.how
        if how == "reshape":
            flat = x.reshape(b * t, d)
        elif how == "flatten-inplace-relu":
            flat = F.relu(x.flatten(0, 1) * 1.0, inplace=True)
        elif how == "time-major":
            flat = x.transpose(0, 1).reshape(-1, d)
        elif how in ("flip", "roll"):
            flat = x.reshape(-1, d).flip(0) if how == "flip" else x.reshape(-1, d).roll(1, 0)
        elif how in ("flip-after-a-layer", "roll-after-a-layer"):
            flat = x.reshape(-1, d)
        elif how == "mixed-with-time-major":
            flat = x.reshape(-1, d) + x.transpose(0, 1).reshape(-1, d)
        elif how == "source-changed-in-place":
            flat = x.reshape(-1, d)
            x.mul_(2.0)
        elif how == "reordered-then-flattened-again":  # rows of unknown order, made (B, -1)
            flat = x.reshape(-1, d).unsqueeze(1).squeeze(1).flip(0).view(b, -1).view(-1, d)
        elif how == "changed-through-data":
            flat = x.reshape(-1, d) * 1.0
            flat.data.copy_(flat.data.flip(0))
        elif how in ("last-token", "tokens-swapped"):  # B rows of the flattened tokens
            rows = torch.arange(b) * t + t - 1
            if how == "tokens-swapped" and b > 1:
                rows = rows.flip(0)
            return self.head(torch.tanh(self.body(x.reshape(-1, d)[rows])))
        elif how == "softmax":
            flat = x.reshape(-1, d)[:, :].softmax(-1)
        elif how == "normalize":
            flat = F.normalize(x.reshape(-1, d), dim=-1)
        h = torch.tanh(self.body(flat))
        if how == "flip-after-a-layer":
            h = h.flip(0)
        elif how == "roll-after-a-layer":
            h = h.roll(t, 0)  # by one example's rows: still a reordering of the examples
        return self.head(h).reshape(b, t, 3).mean(1)


class _FlatIds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        b, t = ids.shape
        return self.head(self.emb(ids.reshape(-1)).reshape(b, t, D).mean(1))


class _FlatFeedForward(nn.Module):
    """transformers' OPT layer's second half: norm, two linear layers and the residual on the
    batch flattened into tokens, viewed back as (B, T, d)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(D), nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        shape = x.shape
        flat = x.reshape(-1, x.size(-1))
        h = self.fc2(F.relu(self.fc1(self.norm(flat))))
        return self.head((flat + h).view(shape)).mean(1)


@pytest.mark.parametrize("batch, length", [(B, T), (B, B), (B, 1), (1, T)])
@pytest.mark.parametrize(
    "model",
    [
        lambda: _FlatTokens(),
        lambda: _FlatTokens("flatten-inplace-relu"),
        lambda: _FlatTokens("softmax"),
        lambda: _FlatTokens("normalize"),
        lambda: _FlatTokens(frozen_backbone=True),
        lambda: _FlatFeedForward(),
        lambda: _FlatIds(),
    ],
    ids=[
        "linear",
        "flatten-inplace-relu",
        "softmax",
        "normalize",
        "frozen-backbone",
        "feed-forward",
        "embedding-ids",
    ],  # fmt: skip
)
def test_layers_on_the_batch_flattened_into_tokens_equal_the_naive_loop(model, batch, length):
    """Row r of (B·T, ...) is example r // T's: each call is clipped as the same on (B, T, ...)."""
    m = model().double()
    x = (
        torch.randint(0, 7, (batch, length), generator=torch.Generator().manual_seed(1))
        if isinstance(m, _FlatIds)
        else _x(batch, length, D)
    )
    _assert_equals_naive_loop(m, x, _y(batch))


def test_each_examples_last_token_picked_from_the_flattened_batch_equals_the_naive_loop():
    _assert_equals_naive_loop(_FlatTokens("last-token").double(), _x(B, T, D), _y())


# a layer on a tensor computed from a sequence-first one in a way dpclip does not follow
_NOT_FOLLOWED = r"body \(Linear\) was given a tensor computed from one whose batch is not on dim 0"


@pytest.mark.parametrize(
    "how, match",
    [
        ("time-major", _NOT_FOLLOWED),
        ("mixed-with-time-major", _NOT_FOLLOWED),
        ("source-changed-in-place", _NOT_FOLLOWED),
        ("reordered-then-flattened-again", r"flip moves or gathers rows of the batch flattened"),
        ("changed-through-data", _NOT_FOLLOWED),
        ("flip", r"flip moves or gathers rows of the batch flattened into tokens"),
        ("roll", r"roll moves or gathers rows of the batch flattened into tokens"),
        ("tokens-swapped", r"__getitem__ moves or gathers rows of the batch flattened"),
        ("flip-after-a-layer", r"flip moves or gathers rows of the batch flattened into tokens"),
        ("roll-after-a-layer", r"roll moves or gathers rows of the batch flattened into tokens"),
    ],
)
def test_a_flattening_whose_rows_dpclip_cannot_follow_is_refused(how, match):
    """Rows not in example order (a time-major flattening, a reordering, a tensor changed in
    place after it was flattened): a layer on them is refused, naming the fix."""
    _assert_refused_at_forward(
        _FlatTokens(how).double(), _x(B, T, D), match + r".*(reshape\(-1, d\)|order|dim 0)"
    )


class _Rejoined(_FcHead):
    """Slices of the batch put back together by ``torch.cat``/``torch.stack`` along dim 0."""

    def forward(self, x):
        b = x.shape[0]
        if self.how == "cat-in-order":
            h = torch.cat([x[:1], x[1:]])
        elif self.how == "cat-swapped":
            h = torch.cat([x[:1], x[2:3], x[1:2], x[3:]]) if b > 2 else x
        else:  # "stack-swapped"
            h = torch.stack([x[k] for k in (1, 0, *range(2, b))]) if b > 1 else x
        return self.head(torch.tanh(self.fc(h)))


def test_slices_of_the_batch_joined_back_in_order_equal_the_naive_loop():
    _assert_equals_naive_loop(_Rejoined("cat-in-order").double(), _x(B, D), _y())


@pytest.mark.parametrize("how", ["cat-swapped", "stack-swapped"])
def test_slices_of_the_batch_joined_back_in_another_order_are_refused(how):
    match = r"along dim 0 of slices of one tensor puts its rows back in another order"
    _assert_refused_at_forward(_Rejoined(how).double(), _x(B, D), match)


def test_a_model_returning_the_batch_flattened_into_tokens_is_told_to_return_it_batch_first():
    """Its self-check cannot run the loss on one example's output (T rows against B·T
    targets); the refusal says how to return the output instead."""

    class FlatLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.head = nn.Linear(D, 3)

        def forward(self, x):
            return self.head(x.reshape(-1, D))  # (B·T, 3)

    model = FlatLogits().double()
    engine, opt = _engine(model)
    before = _snapshot(model)
    targets = torch.randint(0, 3, (B * T,), generator=torch.Generator().manual_seed(3))
    F.cross_entropy(model(_x(B, T, D)), targets).backward()
    with pytest.raises(
        dpclip.SelfCheckError, match=rf"has shape \({B * T}, 3\) for a batch of {B}.*batch-first"
    ):
        opt.step()
    _assert_unchanged(model, engine, before)


def test_a_time_major_flattening_whose_length_is_the_batch_is_refused_too():
    """At T = B its rows look like a batch-first flattening's; the transpose before it did not."""
    _assert_refused_at_forward(_FlatTokens("time-major").double(), _x(B, B, D), _NOT_FOLLOWED)


# ------------------------------------------------------------------ 2. sequence-first layouts
class _SeqFirst(_FcHead):
    """(T, B, d) through the layers; ``how``: how it is made and used."""

    def __init__(self, how: str = "") -> None:
        super().__init__(how)
        self.across = nn.Linear(B, 3)  # used by "across-the-batch" only
        self.positions = nn.Embedding(B + 2, D)  # used by "learned-positions" only

    def forward(self, x):
        how = self.how
        if how in ("stacked", "stacked-then-back"):  # a recurrent loop's steps, (T, B, d)
            h = torch.stack([self.fc(x[:, t]) for t in range(x.shape[1])])
        elif how == "examples-restacked":  # a loop over the examples, each (T, d): batch-first
            h = torch.stack([F.normalize(e, dim=-1) for e in x])
            return self.head(torch.tanh(self.fc(h))).mean(1)
            if how == "stacked-then-back":
                return self.head(torch.tanh(self.fc(h.transpose(0, 1)))).mean(1)
        elif how == "filled":  # steps put into a (T, B, d) buffer: at T = B it looks batch-first
            h = x.new_zeros(x.shape[1], x.shape[0], x.shape[2])
            for t in range(x.shape[1]):
                h[t] = x[:, t]
            return self.head(torch.tanh(self.fc(h.transpose(0, 1)))).mean(1)
        elif how == "permute":
            h = x.permute(1, 0, 2)
        elif how == "movedim":
            h = x.movedim(0, 1)
        else:
            h = x.transpose(0, 1)
        h = torch.tanh(self.fc(h))  # (T, B, d)
        if how == "residual":
            h = h + x.mean(1) * 0.5  # (B, d) broadcast over the steps
        elif how == "flipped":
            h = h.flip(1)
        elif how == "time-flipped":  # along time: fine at any length
            h = h.flip(0)
        elif how == "custom-function":  # an autograd.Function: its inside runs without grad
            h = torch.tanh(self.fc(_Identity.apply(h)))
        elif how == "changed-then-scaled":  # changed in place along time, then an op, a layer
            g = h * 1.0
            g[0] = 0.0
            h = torch.tanh(self.fc(g * 2.0))
        elif how == "learned-positions":  # a position table (T, 1, d) along the batch
            h = torch.tanh(self.fc(h + self.positions(torch.arange(x.shape[1]))[:, None]))
        elif how == "time-slice":  # a decoder's shift: (T - 1, B, d), T - 1 = B at T = B + 1
            h = self.fc(h[:-1])
        elif how == "gather-batch":  # the examples reordered along dim 1 by an index
            index = torch.arange(x.shape[0]).flip(0).view(1, -1, 1).expand_as(h)
            h = torch.gather(h, 1, index)
        elif how == "put-into-buffer":
            buffer = torch.zeros_like(h)
            buffer[:, torch.arange(x.shape[0]).flip(0)] = h
            h = buffer
        elif how == "last-step":  # each example's last step: (B, d), in order
            return self.head(h[x.shape[1] - 1, torch.arange(x.shape[0])])
        elif how == "gathered":  # steps of several examples, by index
            b = x.shape[0]
            return self.head(h[torch.arange(b) % x.shape[1], torch.arange(b).flip(0)])
        elif how == "across-the-batch":  # a layer on (T, d, B): over the examples
            return self.across(h.transpose(1, 2)).mean((0, 1))[None].expand(x.shape[0], -1)
        return self.head(h).mean(0)


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad


class _SeqFirstEncoder(nn.Module):
    """PyTorch's nn.TransformerEncoder as it runs by default (batch_first=False)."""

    def __init__(self, norm_first: bool) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            D, 1, 2 * D, dropout=0.0, norm_first=norm_first, batch_first=False
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.encoder(x.transpose(0, 1)).mean(0))


@pytest.mark.parametrize("batch, length", [(B, T), (B, B), (1, T)])
@pytest.mark.parametrize("how", ["transpose", "permute", "movedim", "residual"])
def test_a_sequence_first_layout_equals_the_naive_loop(how, batch, length):
    """(T, B, d) made by transposing the batch-first tensor: each layer is clipped as the same
    call with the batch moved to dim 0, at any length (T = B too)."""
    _assert_equals_naive_loop(_SeqFirst(how).double(), _x(batch, length, D), _y(batch))


@pytest.mark.parametrize("length", [T, B])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_pytorchs_sequence_first_transformer_encoder_equals_the_naive_loop(norm_first, length):
    model = dpclip.fix(_SeqFirstEncoder(norm_first)).double()
    _assert_equals_naive_loop(model, _x(B, length, D), _y())


@pytest.mark.parametrize(
    "how",
    [
        "stacked", "stacked-then-back", "time-slice", "time-flipped", "examples-restacked",
        "learned-positions", "custom-function",
    ],
)  # fmt: skip
@pytest.mark.parametrize("length", [T, B, B + 1])
def test_steps_stacked_or_sliced_along_time_equal_the_naive_loop(how, length):
    """torch.stack of a layer's batch-first steps (a recurrent loop's) puts the batch on dim 1,
    followed there and back; a slice along time keeps it (also where the new length is the
    batch's); a loop over the examples, stacked again, stays batch-first (at T = B its parts
    look like steps: only a layer's outputs are taken for those)."""
    _assert_equals_naive_loop(_SeqFirst(how).double(), _x(B, length, D), _y())


@pytest.mark.parametrize("length", [T, B])
def test_a_sequence_first_tensor_changed_in_place_then_computed_on_is_refused(length):
    """Its layout no longer vouched for, anything computed from it is suspect (at T = B an
    unmarked result would pass for batch-first)."""
    match = r"fc \(Linear\) was given a tensor computed from one whose batch is not on dim 0"
    _assert_refused_at_forward(_SeqFirst("changed-then-scaled").double(), _x(B, length, D), match)


@pytest.mark.parametrize("length", [T, B])
def test_a_time_major_buffer_moved_back_to_batch_first_equals_the_naive_loop(length):
    """Steps put into a (T, B, d) buffer: at T = B no shape tells its batch from its time, and
    its move is judged by dim 0 after it, as without layouts (here, rightly)."""
    _assert_equals_naive_loop(_SeqFirst("filled").double(), _x(B, length, D), _y())


class _ScaledSeqFirst(nn.Module):
    """A module of the generic fallback (a bare parameter) given a sequence-first tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = _Scale()
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        return self.head(self.scale(x.transpose(0, 1)).mean(0))


class _Scale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(D))

    def forward(self, h):
        return h * self.weight


@pytest.mark.parametrize("length", [T, B])
def test_a_fallback_module_given_a_sequence_first_tensor_is_refused(length):
    """Its per-example rerun takes rows of dim 0: at T = B those would be time steps."""
    match = r"scale \(_Scale\) takes the generic fallback, .* batch is not on dim 0"
    _assert_refused_at_forward(_ScaledSeqFirst().double(), _x(B, length, D), match)


def test_a_layer_whose_rule_needs_the_batch_on_dim_0_given_a_sequence_first_tensor_is_refused():
    """A GroupNorm (its rule, unlike a row-wise layer's, takes dim 0 for the batch) on (T, B, C)
    at T = B would clip time steps as examples."""

    class Grouped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm, self.head = nn.GroupNorm(1, B), nn.Linear(D, 3)

        def forward(self, x):
            return self.head(self.norm(x.transpose(0, 1)).mean(0))

    match = r"norm \(GroupNorm\) has a rule that takes its batch from dim 0"
    _assert_refused_at_forward(Grouped().double(), _x(B, B, D), match)


@pytest.mark.parametrize(
    "how, match",
    [
        ("gather-batch", r"gather moves or gathers dim 1 of a tensor that holds the batch"),
        ("put-into-buffer", r"__setitem__ puts a tensor whose batch is on dim 1"),
    ],
)
def test_examples_reordered_along_a_sequence_first_batch_are_refused(how, match):
    _assert_refused_at_forward(_SeqFirst(how).double(), _x(B, T, D), match)


@pytest.mark.parametrize("length", [T, B])
def test_each_examples_last_step_of_a_sequence_first_layout_equals_the_naive_loop(length):
    _assert_equals_naive_loop(_SeqFirst("last-step").double(), _x(B, length, D), _y())


@pytest.mark.parametrize("how", ["flipped", "gathered"])
@pytest.mark.parametrize("length", [T, B])
def test_moving_entries_along_the_batch_of_a_sequence_first_layout_is_refused(how, length):
    match = r"(flip|__getitem__) moves or gathers dim 1 of a tensor that holds the batch there"
    _assert_refused_at_forward(_SeqFirst(how).double(), _x(B, length, D), match)


@pytest.mark.parametrize("length", [T, B])
def test_a_layer_acting_across_the_dim_that_holds_the_batch_is_refused(length):
    match = r"across \(Linear\) acts on dim 2 of its input, which holds the batch"
    _assert_refused_at_forward(_SeqFirst("across-the-batch").double(), _x(B, length, D), match)


def test_the_batch_comes_from_the_model_input_keyword_not_from_a_keyword_before_it():
    """transformers models called with keywords in any order (position_ids first)."""
    from dpclip.hooks import batch_of

    ids, positions = torch.zeros(4, 6, dtype=torch.long), torch.arange(6)[None]
    assert batch_of((), {"position_ids": positions, "input_ids": ids}) is ids
    assert batch_of((), {"attention_mask": positions, "pixel_values": _x(4, 3)}).shape[0] == 4
    assert batch_of((), {"position_ids": positions, "x": ids}) is positions  # unknown: in order
    assert batch_of((ids,), {"input_ids": positions}) is ids  # positional first


def test_a_sequence_first_model_input_is_refused_against_the_loader_batch():
    model = nn.Sequential(nn.Linear(D, 3)).double()
    data = torch.utils.data.TensorDataset(_x(100, T, D), torch.randint(0, 3, (100,)))
    engine, opt = _engine(model)
    before = _snapshot(model)
    logical = next(iter(engine.data_loader(data, generator=torch.Generator().manual_seed(2))))
    physical = iter(logical)  # as a loop holds it: the loader has announced this batch
    x, y = next(physical)
    assert x.shape[0] != T
    with pytest.raises(
        dpclip.IntegrityError, match=r"shape \(3, \d+, 5\).* the \d+ examples the data loader"
    ):
        model(x.transpose(0, 1))
    _assert_unchanged(model, engine, before)


def _loader_setup():
    """A linear model and 100 examples for engine.data_loader at an expected batch of 20."""
    model = nn.Sequential(nn.Linear(D, 3)).double()
    data = torch.utils.data.TensorDataset(_x(100, D), torch.randint(0, 3, (100,)))
    engine, opt = _engine(model, sample_size=100, batch_size=20)
    return model, data, engine, opt


def test_a_step_before_the_logical_batch_is_done_is_refused_and_one_after_it_is_taken():
    """A step per physical batch of engine.data_loader would take several noisy steps per
    Poisson sample, each counted by the ledger as one independent step: refused, nothing
    changed. With one physical batch per logical batch, stepping inside the loop is the same
    step and is taken."""
    model, data, engine, opt = _loader_setup()
    before = _snapshot(model)
    loader = engine.data_loader(data, physical_batch_size=6,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    logical = next(iter(loader))
    assert len(logical.chunks()) > 1
    physical = iter(logical)
    x, y = next(physical)
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(dpclip.LoopOrderError, match=r"physical batch\(es\) .* still to come"):
        opt.step()
    _assert_unchanged(model, engine, before)
    for x, y in physical:  # the rest of the logical batch, then the step
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.steps_taken == 1
    opt.zero_grad()
    single = engine.data_loader(data, generator=torch.Generator().manual_seed(1))
    for x, y in next(iter(single)):  # one physical batch: the step inside the loop is the same
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert engine.steps_taken == 2


@pytest.mark.parametrize("how", ["break", "skip the last"])
def test_a_step_on_part_of_a_logical_batch_is_refused(how):
    """A break out of the physical batches, or one skipped (a ragged last batch, as drop_last
    would): the examples left out depend on which others were sampled, so the step's sample is
    not the Poisson sample the ledger counts."""
    model, data, engine, opt = _loader_setup()
    before = _snapshot(model)
    loader = engine.data_loader(data, physical_batch_size=6,
                                generator=torch.Generator().manual_seed(0))  # fmt: skip
    logical = next(iter(loader))
    chunks = len(logical.chunks())
    assert chunks > 1
    for k, (x, y) in enumerate(logical):
        if how == "skip the last" and k == chunks - 1:
            continue
        F.cross_entropy(model(x), y).backward()
        if how == "break":
            break
    with pytest.raises(dpclip.LoopOrderError, match="did not all get a backward"):
        opt.step()
    _assert_unchanged(model, engine, before)
    opt.zero_grad()
    for x, y in next(iter(loader)):  # the next logical batch, whole: its step is taken
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.steps_taken == 1


def test_one_step_over_two_logical_batches_is_refused_at_the_second():
    """Accumulating across logical batches (Accelerate's gradient_accumulation_steps=2 around
    the loader) would count examples drawn in both twice and the ledger one step."""
    model, data, engine, opt = _loader_setup()
    before = _snapshot(model)
    loader = iter(engine.data_loader(data, generator=torch.Generator().manual_seed(0)))
    for x, y in next(loader):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(dpclip.LoopOrderError, match="another logical batch"):
        for x, y in next(loader):  # refused before its first forward
            F.cross_entropy(model(x), y).backward()
    with pytest.raises(dpclip.LoopOrderError, match="over two logical batches"):
        opt.step()  # and a step over what the first left is refused too
    _assert_unchanged(model, engine, before)
    opt.zero_grad()  # drop them: the next logical batch is a step of its own
    for x, y in next(loader):
        F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.steps_taken == 1


def _backward_on(model, logical):
    for x, y in logical:
        F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize("how", ["iterated twice", "zip of two loaders", "next twice"])
def test_a_step_over_examples_of_two_passes_or_two_draws_is_refused_as_it_iterates(how):
    """Two passes over one logical batch (two views, or a second step on it) clip each example
    twice or use one Poisson sample for two steps; physical batches of two draws in one step
    sum two samples. Refused at the physical batch, before its forward."""
    model, data, engine, opt = _loader_setup()
    before = _snapshot(model)
    draws = iter(engine.data_loader(data, physical_batch_size=6,
                                    generator=torch.Generator().manual_seed(0)))  # fmt: skip
    first = next(draws)
    if how == "iterated twice":
        second = first
        match = "iterated a second time"
    elif how == "zip of two loaders":
        other = engine.data_loader(data, generator=torch.Generator().manual_seed(1))
        first, second = next(zip(draws, other, strict=True))
        match = "another logical batch"
    else:
        second = next(draws)
        match = "another logical batch"
    _backward_on(model, first)
    with pytest.raises(dpclip.LoopOrderError, match=match):
        _backward_on(model, second)
    opt.zero_grad()
    _assert_unchanged(model, engine, before)


def test_logical_batches_drawn_ahead_each_make_their_own_step():
    """Looking ahead (list(loader), or peeking at the next one) draws before stepping, but each
    step still holds one Poisson sample."""
    model, data, engine, opt = _loader_setup()
    engine_draws = list(engine.data_loader(data, physical_batch_size=6,
                                           generator=torch.Generator().manual_seed(0)))  # fmt: skip
    for logical in engine_draws[:3]:
        _backward_on(model, logical)
        opt.step()
        opt.zero_grad()
    assert engine.steps_taken == 3


def test_a_resumed_engine_refuses_the_draws_of_the_run_it_continues():
    """A script that seeds torch's generator at start and resumes would replay its samples."""
    model, data, engine, opt = _loader_setup()
    torch.manual_seed(0)
    _backward_on(model, next(iter(engine.data_loader(data))))
    opt.step()
    opt.zero_grad()
    state = engine.state_dict()
    engine.detach()
    resumed, opt = _engine(model, sample_size=100, batch_size=20)
    for bad in ([5], "abc", [b"short"]):
        with pytest.raises(ValueError, match="draw_states"):
            resumed.load_state_dict({**state, "draw_states": bad})
    assert resumed.steps_taken == 0
    resumed.load_state_dict(state)
    torch.manual_seed(0)
    with pytest.raises(dpclip.LoopOrderError, match="drawn from before"):
        next(iter(resumed.data_loader(data)))


def test_a_sampling_generator_seeded_again_each_epoch_is_refused_at_its_first_draw():
    model = nn.Sequential(nn.Linear(D, 3)).double()
    data = torch.utils.data.TensorDataset(_x(100, D), torch.randint(0, 3, (100,)))
    engine, opt = _engine(model, sample_size=100, batch_size=20, steps=10)
    for epoch in range(2):
        loader = engine.data_loader(data, generator=torch.Generator().manual_seed(0))
        if epoch == 1:
            with pytest.raises(dpclip.LoopOrderError, match="drawn from before"):
                next(iter(loader))
            break
        for logical in loader:
            _backward_on(model, logical)
            opt.step()
            opt.zero_grad()
    assert engine.steps_taken == len(loader)


def test_zero_grad_between_the_physical_batches_of_a_logical_batch_is_refused():
    """It drops the batches before it: the step would hold a part of the sample that depends on
    how many others were drawn."""
    model, data, engine, opt = _loader_setup()
    before = _snapshot(model)
    logical = next(iter(engine.data_loader(data, physical_batch_size=6,
                                           generator=torch.Generator().manual_seed(0))))  # fmt: skip
    for x, y in logical:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(dpclip.LoopOrderError, match="zero_grad"):
        opt.step()
    _assert_unchanged(model, engine, before)


def test_a_second_backward_over_one_physical_batch_of_the_loader_is_refused():
    """Two augmented views, or two heads, each with its own forward and backward: every example
    of the batch would be clipped twice and both sums added (2R for noise meant for R)."""
    model, data, engine, opt = _loader_setup()
    logical = next(iter(engine.data_loader(data, generator=torch.Generator().manual_seed(0))))
    for x, y in logical:
        F.cross_entropy(model(x), y).backward()
        once = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(dpclip.LoopOrderError, match="second backward pass over the same"):
            F.cross_entropy(model(x + 0.01), y).backward()
        assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), once, strict=True))
    opt.step()
    assert engine.steps_taken == 1


@pytest.mark.parametrize("affine", [False, True], ids=["no-affine", "frozen-affine"])
def test_a_batchnorm_without_trainable_parameters_in_training_mode_is_refused(affine):
    """No rule sees it (nothing of it is trained), but in training mode its batch statistics mix
    the examples and go into its running buffers: refused before it runs; in eval mode (frozen
    statistics) it is a fixed per-example map and the step is the naive loop's."""
    bn = nn.BatchNorm1d(4, affine=affine).double().requires_grad_(False)
    model = nn.Sequential(nn.Linear(D, 4), bn, nn.Tanh(), nn.Linear(4, 3)).double()
    engine, opt = _engine(model, verify=False)
    before, stats = _snapshot(model), bn.running_mean.clone()
    with pytest.raises(dpclip.IntegrityError, match=r"'1'\)\.eval\(\)"):
        model(_x(B, D))
    assert torch.equal(bn.running_mean, stats) and int(bn.num_batches_tracked) == 0
    _assert_unchanged(model, engine, before)
    engine.detach()
    bn.eval()
    if not affine:  # (the helper's oracle groups every parameter, frozen ones too)
        _assert_equals_naive_loop(model, _x(B, D), _y())


def test_an_instance_norm_keeping_running_statistics_in_training_mode_is_refused():
    """Its running buffers would record the batch's statistics without noise."""
    norm = nn.InstanceNorm1d(2, affine=True, track_running_stats=True).double()
    model = nn.Sequential(nn.Linear(D, 4), nn.Unflatten(1, (2, 2)), norm, nn.Flatten(),
                          nn.Linear(4, 3)).double()  # fmt: skip
    engine, opt = _engine(model)
    before, stats = _snapshot(model), norm.running_mean.clone()
    with pytest.raises(dpclip.IntegrityError, match="track_running_stats=False"):
        model(_x(B, D))
    assert torch.equal(norm.running_mean, stats)
    _assert_unchanged(model, engine, before)


# ------------------------------------------------------------------ 3. the batch split in forward
class _Split(_FcHead):
    def forward(self, x):
        if self.how == "chunk":
            h = torch.cat([self.fc(c) for c in x.chunk(2)])
            return self.head(torch.tanh(h))
        if self.how == "loop":
            h = torch.cat([self.fc(x[i : i + 1]) for i in range(x.shape[0])])
            return self.head(torch.tanh(h))
        h = torch.tanh(self.fc(x))  # batched, then a loop over the next layer
        return torch.cat([self.head(h[i : i + 1]) for i in range(h.shape[0])])


@pytest.mark.parametrize(
    "how, match",
    [
        ("chunk", rf"fc \(Linear\) returned {B // 2} rows on dim 0 .*do not split the batch"),
        ("batched-then-loop", rf"head \(Linear\) returned 1 row on dim 0 .* batch is {B}\b"),
    ],
)
def test_a_layer_run_on_chunks_or_one_example_at_a_time_is_refused(how, match):
    _assert_refused_at_forward(_Split(how).double(), _x(B, D), match)


def test_a_layer_run_on_one_example_at_a_time_is_refused_where_its_output_reaches_the_loss():
    """Each call's output has batch 1 (pending, as a position table would be); the layer after
    the loop runs on them, and the loss reaches them other than through a broadcast."""
    model = _Split("loop").double()
    engine, opt = _engine(model)
    before = _snapshot(model)
    loss = F.cross_entropy(model(_x(B, D)), _y())
    with pytest.raises(
        dpclip.IntegrityError, match=r"head \(Linear\) .* other than by broadcasting"
    ):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    _assert_unchanged(model, engine, before)


class _Flipped(_FcHead):
    """One layer called twice, the second time on the batch in reverse order: row i of the
    second call is example B-1-i."""

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + torch.tanh(self.fc(x.flip(0))).flip(0))


def test_a_repeated_call_on_reordered_rows_is_refused():
    _assert_refused_at_forward(_Flipped().double(), _x(B, D), "flip moves rows along dim 0")


_PERM = torch.tensor([2, 0, 3, 1])


class _Reordered(_FcHead):
    """The batch reordered between two layers, and (mostly) put back: row j of head is not
    example j of fc, so all-layer clipping would mix two examples in one norm."""

    def forward(self, x):
        h = torch.tanh(self.fc(x))
        order = _PERM
        if self.how == "getitem":
            return self.head(h[order])[order.argsort()]
        if self.how == "list":
            return self.head(h[order.tolist()])
        if self.how == "setitem":
            out = torch.zeros_like(h)
            out[order] = h  # unsort by assignment
            return self.head(out)
        if self.how == "index_select":
            return self.head(h.index_select(0, order))
        if self.how == "gather":
            return self.head(h.gather(0, order[:, None].expand_as(h)))
        if self.how == "roll":
            return self.head(h.roll(1, 0))
        if self.how == "numpy":
            return self.head(h[order.numpy()])
        if self.how == "2-d index":  # rows of B along its last dim, one new leading dim
            return self.head(h[order[None]][0])
        if self.how == "index_add":
            return self.head(torch.zeros_like(h).index_add(0, order, h))
        if self.how == "transposed layout":  # batch on dim 0, laid out inner (seq-first RNN out)
            return self.head(h.t().contiguous().t()[order])
        n = h.shape[0]  # each row picks from itself, as at its last token
        return self.head(torch.stack([h, -h], 1)[torch.arange(n), torch.ones(n, dtype=int)])


@pytest.mark.parametrize(
    "how",
    ["getitem", "list", "setitem", "index_select", "gather", "roll", "numpy", "2-d index",
     "index_add", "transposed layout"],
)  # fmt: skip
def test_rows_moved_along_the_batch_inside_the_forward_are_refused(how):
    _assert_refused_at_forward(_Reordered(how).double(), _x(B, D), "moves rows along dim 0")


class _InPlace(_FcHead):
    """Indexing that keeps every row in its place (BART's pooling at its eos tokens, padding
    zeroed by a mask as in wav2vec2, a loop over examples by 0-d index, a time-major flip of
    another length than the batch)."""

    def forward(self, x):
        h = torch.tanh(self.fc(x))  # (n, width)
        n = h.shape[0]
        tokens = torch.stack([h, 2 * h, -h], 1)  # (n, 3, width)
        if self.how == "bool pool":
            eos = torch.zeros(n, 3, dtype=torch.bool)
            eos[:, 1] = True
            return self.head(tokens[eos, :].view(n, -1, tokens.shape[-1])[:, -1, :])
        if self.how == "mask setitem":
            pad = torch.zeros(n, 3, dtype=torch.bool)
            pad[:, 2] = True
            tokens[pad] = 0
            return self.head(tokens.sum(1))
        if self.how == "0-d index":
            return self.head(torch.stack([h[b] for b in torch.arange(n)]))
        time_major = torch.cat([tokens, tokens], 1).transpose(0, 1)  # (6, n, width): time first
        return self.head(time_major.flip(0).sum(0))


@pytest.mark.parametrize("how", ["bool pool", "mask setitem", "0-d index", "time-major flip"])
def test_indexing_that_keeps_rows_in_place_equals_the_naive_loop(how):
    _assert_equals_naive_loop(_InPlace(how).double(), _x(3, D), _y(3))


def test_each_row_picking_itself_equals_the_naive_loop():
    """h[torch.arange(B), last] (the pooling of GPT-2's sequence classifier) moves no row."""
    _assert_equals_naive_loop(_Reordered("pick").double(), _x(B, D), _y())


def test_two_forwards_reaching_one_backward_are_refused():
    model = nn.Sequential(nn.Linear(D, 3)).double()
    engine, opt = _engine(model)
    before = _snapshot(model)
    loss = F.cross_entropy(model(_x(B, D)), _y()) + F.cross_entropy(model(_x(B, D) + 1), _y())
    with pytest.raises(dpclip.IntegrityError, match="two forward passes .* wrap both"):
        loss.backward()
    _assert_unchanged(model, engine, before)


class _ChangedAfterUse(nn.Module):
    """``h`` feeds ``fc2`` and is then scaled in place: plain autograd raises (Linear keeps its
    input for the weight gradient); with the weights managed nothing keeps it but dpclip."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.fc1, self.fc2, self.inplace = nn.Linear(D, D), nn.Linear(D, 3), inplace

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        out = self.fc2(h)
        h = h.mul_(3.0) if self.inplace else h * 3.0
        return out + h[:, :3]


def test_a_layer_input_changed_in_place_after_the_call_is_refused_at_backward():
    model = _ChangedAfterUse(inplace=True).double()
    engine, opt = _engine(model, verify=False)  # the self-check would catch the first batch only
    before = _snapshot(model)
    loss = F.cross_entropy(model(_x(B, D)), _y())
    with pytest.raises(dpclip.IntegrityError, match=r"input 0 of fc2 .* in-place .* out of place"):
        loss.backward()
    assert all(p.grad is None for p in model.parameters())
    _assert_unchanged(model, engine, before)
    # the same model written out of place: exact
    _assert_equals_naive_loop(_ChangedAfterUse(inplace=False).double(), _x(B, D), _y())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 3)).double()


@pytest.mark.parametrize("how", ["autograd.grad", "backward(inputs=x)"])
def test_a_pass_for_the_input_gradient_adds_no_clipped_sum(how):
    """Adversarial training (FGSM), saliency, gradient penalties: a backward that writes no
    parameter .grad without dpclip must not add a clipped sum either (the step would count its
    examples twice); the training backward after it is the naive loop's, exactly."""
    model, x, y = _mlp(), _x(B, D), _y()
    plain = copy.deepcopy(model)
    xa = x.clone().requires_grad_(True)
    want = torch.autograd.grad(F.cross_entropy(plain(xa), y), xa)[0]
    x_adv = x + 0.1 * want.sign()
    expected = clipped_sum(per_sample_grads(plain, x_adv, y), [[0, 1, 2, 3]],
                           clipping="automatic", clip_norm=1.0, gamma=0.01)  # fmt: skip
    engine, opt = _engine(model)
    xa = x.clone().requires_grad_(True)
    loss = F.cross_entropy(model(xa), y)
    if how == "autograd.grad":
        got = torch.autograd.grad(loss, xa)[0]
    else:
        loss.backward(inputs=[xa])
        got = xa.grad
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # the input gradient is autograd's
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(x_adv), y).backward()  # the step's one backward
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    opt.step()
    assert engine.steps_taken == 1


def test_a_training_backward_from_an_input_that_requires_grad_is_clipped_once():
    """An input that requires a gradient reaches the layers without dpclip's anchor in their
    ancestry unless the engine routes it: the training backward still clips, once, and the
    input still gets autograd's gradient."""
    model, x, y = _mlp(), _x(B, D), _y()
    expected = clipped_sum(per_sample_grads(copy.deepcopy(model), x, y), [[0, 1, 2, 3]],
                           clipping="automatic", clip_norm=1.0, gamma=0.01)  # fmt: skip
    plain = copy.deepcopy(model)
    xp = x.clone().requires_grad_(True)
    F.cross_entropy(plain(xp), y).backward()
    engine, opt = _engine(model)
    xa = x.clone().requires_grad_(True)
    F.cross_entropy(model(xa), y).backward()
    torch.testing.assert_close(xa.grad, xp.grad, rtol=0, atol=0)
    for p, e in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, e, rtol=1e-10, atol=1e-12)
    opt.step()  # the self-check runs on this batch too
    assert engine.steps_taken == 1


# ------------------------------------------------------------------ 4. batch-1 tensors broadcast
class _RelativeBias(nn.Module):
    """A T5-style bias from (T, T) relative positions with no batch dim, added to (B, T, T)
    scores: with T == B its output's dim 0 looks like the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.rel = nn.Embedding(2 * B, 1)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        t = x.shape[1]
        pos = torch.arange(t)
        bias = self.rel(pos[None, :] - pos[:, None] + t).squeeze(-1)  # (T, T)
        scores = self.q(x) @ x.transpose(1, 2) + bias.unsqueeze(0).contiguous()
        return self.head(scores.softmax(-1) @ x).mean(1)


@pytest.mark.parametrize("length", [B, T], ids=["T=B", "T!=B"])
def test_a_relative_position_bias_without_a_batch_dim_equals_the_naive_loop(length):
    """Its buckets are made in forward from torch.arange: a constant, so the layer's output has
    no batch dim whatever its length, also when it equals the batch's."""
    _assert_equals_naive_loop(_RelativeBias().double(), _x(B, length, D), _y())


class _BiasUses(nn.Module):
    """Relative-position biases (T, T, H) from constant buckets, taken to the batch's scores in
    the ways models do; ``use`` picks one. The bias (and a second one, ``also``) reaches every
    head's scores of two attention layers."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.q, self.k = nn.Linear(D, 2 * D), nn.Linear(D, 2 * D)
        self.rel, self.also = nn.Embedding(2 * T + 1, 2), nn.Embedding(2 * T + 1, 2)
        self.types = nn.Embedding(3, D)
        self.register_buffer("type_ids", torch.zeros(1, 64, dtype=torch.long))
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        b, t, _ = x.shape
        if self.use == "types":  # BERT's token types: a buffer expanded to (B, T), added as is
            x = x + self.types(self.type_ids[:, :t].expand(b, t))
        pos = torch.arange(t)
        buckets = pos[None, :] - pos[:, None] + T
        bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        if self.use == "two-tables":
            bias = bias + 0.5 * self.also(buckets).permute(2, 0, 1)[None]
        mask = (x[..., 0] > -1.0)[:, None, None, :]  # a padding mask from the batch
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        h = x
        for _ in range(2):
            q = self.q(h).view(b, t, 2, D).transpose(1, 2)
            k = self.k(h).view(b, t, 2, D).transpose(1, 2)
            if self.use == "sdpa-mask":  # T5's SDPA path: the bias as the attention mask
                m = torch.where(mask, bias, -1e4).contiguous()
                a = F.scaled_dot_product_attention(q, k, k, attn_mask=m)
            else:
                scores = q @ k.transpose(-1, -2) + torch.where(causal, bias, -1e4)
                a = scores.masked_fill(~mask, -1e4).softmax(-1) @ k
            h = h + a.mean(1)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("use", ["scores", "sdpa-mask", "two-tables", "types"])
@pytest.mark.parametrize("length", [B, T], ids=["T=B", "T!=B"])
def test_a_bias_without_a_batch_dim_taken_to_the_batch_equals_the_naive_loop(use, length):
    """Through a permute, a constant causal mask, a padding mask from the batch, SDPA's mask,
    two layers (its gradients from both summed into one call) and two tables added together."""
    _assert_equals_naive_loop(_BiasUses(use).double(), _x(B, length, D), _y())


class _PositionsMadeSo(nn.Module):
    """Token embeddings plus positions made as ``how`` says, each a way models write them."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.tok, self.pos = nn.Embedding(7, D), nn.Embedding(8, D)
        self.frozen = nn.Parameter(torch.randn(8, D), requires_grad=False)  # a fixed table
        self.fc, self.head, self.cat = nn.Linear(D, D), nn.Linear(D, 3), nn.Linear(2 * D, D)

    def _copied(self, b, t):
        """Positions copied over the batch, then looked up: at T = B a table, else batched."""
        return self.pos(torch.arange(t).expand(b, t))

    def forward(self, ids):
        b, t = ids.shape
        h = self.tok(ids)
        if self.how == "type_as":  # cast like the ids: still made in the forward
            p = self.pos(torch.arange(t).type_as(ids)) * 1.0
        elif self.how == "frozen-table":  # a parameter dpclip does not train is a constant
            p = self.frozen[:t] * 1.0
            return self.head(torch.tanh(self.fc(h + p)).mean(1))
        elif self.how == "repeat":  # a batch dim, then a layer on it (a constant at T = B)
            p = self.fc(self.pos(torch.arange(t).repeat(b, 1)))
        elif self.how == "expand_as-input":  # the refusals' advice: a copy over the batch
            p = self.fc(self.pos(torch.arange(t).expand_as(ids)))
        elif self.how == "layer-on-table":  # a layer with parameters run on the (T, D) table
            p = self.fc(torch.tanh(self.pos(torch.arange(t))))
        elif self.how == "rows-from-table":  # B rows computed from it, met row by row
            p = self.pos(torch.arange(t)).sum(0).expand(b, t, -1).contiguous() * 0.5
        elif self.how == "batch-1-expanded-then-layer":  # GPT-2's wpe, copied to B rows, a layer
            p = self.fc(self.pos(torch.arange(t)[None]).expand(b, t, D))
        elif self.how == "dropout-on-copies":  # rows that differ by chance (p=0: the same op)
            p = F.dropout(self.pos(torch.arange(t).expand(b, t)), 0.0, training=True)
        elif self.how == "joined":  # concatenated beside the batch's features, then a layer
            return self.head(torch.tanh(self.cat(torch.cat([h, self._copied(b, t)], -1))).mean(1))
        elif self.how == "matmul":  # a batched product with the batch's states
            p = torch.softmax(h @ self._copied(b, t).transpose(1, 2), -1) @ h
        elif self.how == "expand-scaled":  # BERT-style ids expanded to (B, T), then scaled
            p = self.pos(torch.arange(t)[None].expand(b, t)) * 0.5
        elif self.how == "as_tensor":  # the ids wrapped again inside the forward
            h = self.tok(torch.as_tensor(ids))
            p = self.pos(torch.arange(t))
        elif self.how == "expand_as":  # XLM's positions, expanded to the states first
            p = self.pos(torch.arange(t)[None]).expand_as(h)
        elif self.how == "zero-state":  # a recurrent cell's first step: a layer on zeros (B, D)
            z, r = (self.fc(torch.zeros(b, D, dtype=h.dtype)) + h[:, 0]).chunk(2, dim=1)
            return self.head(torch.cat([torch.tanh(z), torch.sigmoid(r)], dim=1))
        elif self.how == "two-lookups":  # a 1-D torch.zeros(T) is a constant too, at T = B
            p = self.pos(torch.arange(t)) + self.pos(torch.zeros(t, dtype=torch.long))
        else:  # a position table reversed along its positions
            p = self.pos(torch.arange(t)).flip(0)
        return self.head(torch.tanh(h + p).mean(1))


@pytest.mark.parametrize(
    "how",
    ["type_as", "frozen-table", "repeat", "expand_as-input", "expand-scaled", "as_tensor", "flip",
     "expand_as", "zero-state", "two-lookups", "layer-on-table", "rows-from-table",
     "batch-1-expanded-then-layer", "dropout-on-copies", "joined", "matmul"],
)  # fmt: skip
@pytest.mark.parametrize("length", [B, T], ids=["T=B", "T!=B"])
def test_positions_made_in_the_usual_ways_equal_the_naive_loop(how, length):
    ids = torch.randint(0, 7, (B, length), generator=torch.Generator().manual_seed(0))
    _assert_equals_naive_loop(_PositionsMadeSo(how).double(), ids, _y())


@pytest.mark.parametrize("how", ["repeat", "joined", "matmul", "batch-1-expanded-then-layer"])
def test_positions_copied_over_a_batch_of_one_equal_the_naive_loop(how):
    """At B = 1 a copy over the batch has another dim of its size whenever T = 1 too, yet both
    readings (batched, a table) are one: one example gets all of it."""
    for length in (1, T):
        ids = torch.randint(0, 7, (1, length), generator=torch.Generator().manual_seed(0))
        model = _PositionsMadeSo(how).double()
        trained = [p for p in model.parameters() if p.requires_grad]
        expected = clipped_sum(
            per_sample_grads(copy.deepcopy(model), ids, _y(1)), [list(range(len(trained)))],
            clipping="automatic", clip_norm=1.0, gamma=0.01,
        )  # fmt: skip
        engine, opt = _engine(model)
        before = [p.detach().clone() for p in trained]
        F.cross_entropy(model(ids), _y(1)).backward()
        opt.step()
        for p, old, want in zip(trained, before, expected, strict=True):
            torch.testing.assert_close(old - p.detach(), want / B, rtol=1e-6, atol=1e-12)


class _PairTable(nn.Module):
    """A relative-position bias from a (T, T) table of pairs made by copying positions over a
    new dim (``pos.expand(T, T)``, ``pos.repeat(T, 1)``), as older code writes it: at T = B
    such a copy looks like one over the batch, and was taken for batched (its rows for
    examples), silently."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.q, self.rel, self.head = nn.Linear(D, D), nn.Embedding(4 * T, 1), nn.Linear(D, 3)

    def forward(self, x):
        t = x.shape[1]
        pos = torch.arange(t)
        pairs = pos.expand(t, t) if self.how == "expand" else pos.repeat(t, 1)
        bias = self.rel(pairs - pos[:, None] + t).squeeze(-1)  # (T, T)
        scores = self.q(x) @ x.transpose(1, 2) + bias[None]
        return self.head(scores.softmax(-1) @ x).mean(1)


@pytest.mark.parametrize("how", ["expand", "repeat"])
@pytest.mark.parametrize("length", [B, T], ids=["T=B", "T!=B"])
def test_a_table_of_pairs_made_by_copying_positions_equals_the_naive_loop(how, length):
    _assert_equals_naive_loop(_PairTable(how).double(), _x(B, length, D), _y())


class _ShapeTable(nn.Embedding):
    """A position table that takes the input's shape (transformers' Blenderbot): an embedding
    subclass with its own forward, so the generic fallback reruns it, with no tensor argument."""

    def forward(self, shape, offset=0, positions=None):
        if positions is None:
            positions = torch.arange(offset, offset + shape[1])
        return super().forward(positions)


class _FirstState(nn.Module):
    """A learned first state for each of ``n`` examples, made from their count alone."""

    def __init__(self) -> None:
        super().__init__()
        self.h0 = nn.Parameter(torch.randn(D))

    def forward(self, n: int):
        return torch.tanh(self.h0).expand(n, D) * torch.arange(1.0, D + 1, dtype=self.h0.dtype)


class _FromShapes(nn.Module):
    """Fallback modules whose arguments carry no example: ``how`` says which."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.tok, self.pos, self.first = nn.Embedding(7, D), _ShapeTable(8, D), _FirstState()
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        b, t = ids.shape
        if self.how == "constant-argument":  # Blenderbot's decoder passes arange(T) + offset
            h = self.tok(ids) + self.pos(ids.shape, positions=torch.arange(t) + 0)
        else:
            h = self.tok(ids) + self.pos(ids.shape)
        if self.how == "first-state":  # (B, D) from the count alone, met row by row
            return self.head(torch.tanh(h.mean(1) + self.first(b)))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("how", ["shape", "constant-argument", "first-state"])
@pytest.mark.parametrize("length", [B, T], ids=["T=B", "T!=B"])
def test_fallback_modules_on_shapes_or_constants_equal_the_naive_loop(how, length):
    """Their outputs have no batch dim whatever their rows (they were refused as unbatched, or,
    with T = B, taken for batched): each example's rerun gets all of the output."""
    ids = torch.randint(0, 7, (B, length), generator=torch.Generator().manual_seed(0))
    _assert_equals_naive_loop(_FromShapes(how).double(), ids, _y())


class _RowsByPlace(nn.Module):
    """B rows made without the batch that differ, each example taking its own: what example b
    computes depends on its place in the batch and on the batch's size."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.first, self.pos = _FirstState(), nn.Embedding(8, D)
        self.tok, self.head = nn.Embedding(7, D), nn.Linear(D, 3)

    def forward(self, ids):
        b = ids.shape[0]
        h = self.tok(ids).mean(1)
        place = torch.arange(b)[:, None].to(h.dtype)  # a constant of B rows that differ
        same = self.pos(torch.zeros(b, dtype=torch.long))  # B rows alike
        if self.how == "first-state-cumsum":  # a whole call's output, its rows summed up
            rows = self.first(b).cumsum(0)
        elif self.how == "dropout-then-place":  # rows that differ by chance, then by place
            rows = F.dropout(same, 0.5, training=True) * place
        elif self.how == "alike-values-not-gradients":  # rows equal, gradients by place
            rows = same + (same - same.detach()) * place
        elif self.how == "where-by-place":  # example 0 alone gets a gradient
            rows = torch.where(place < 1, same, same.detach())
        elif self.how == "nan-by-place":  # one row NaN where the others are not
            rows = torch.nan_to_num(same.masked_fill(place == 1, float("nan")))
        elif self.how == "dropout-then-slices":  # rows changed by place after dropout
            d = F.dropout(same, 0.5, training=True)
            rows = torch.cat([d[:1], 3 * d[1:]])
        elif self.how == "time-major":  # a (T, B, D) view at T = B, dim 0 taken for the batch
            hs = self.tok(ids).transpose(0, 1)
            rows = self.pos(torch.zeros(b, dtype=torch.long))[:, None].expand(b, b, D)
            return self.head(torch.tanh((hs + rows).transpose(0, 1)).mean(1))
        else:  # positions of the batch's length: example b gets position b
            rows = self.pos(torch.arange(b))
        return self.head(torch.tanh(h + rows))


@pytest.mark.parametrize("between", ["nothing", "a forward without grad", "a dropped forward"])
@pytest.mark.parametrize(
    "how",
    ["first-state-cumsum", "positions-by-place", "dropout-then-place", "alike-values-not-gradients",
     "where-by-place", "nan-by-place"],
)  # fmt: skip
def test_rows_made_without_the_batch_that_differ_met_row_by_row_are_refused_at_the_step(
    how, between
):
    """Clipped exactly as computed, but one example added or removed would change the others'
    gradients: refused before anything changes (with verify=False too: the self-check would
    see it only on the first step), also when other forwards ran before the backward."""
    model = _RowsByPlace(how).double()
    engine, opt = _engine(model, verify=False)
    before = _snapshot(model)
    ids = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(ids), _y())
    if between == "a forward without grad":
        with torch.no_grad():
            model(ids[:2])
    elif between == "a dropped forward":
        model(ids[:1])
    loss.backward()
    with pytest.raises(dpclip.IntegrityError, match=r"B rows of it, which differ, met the batch"):
        opt.step()
    _assert_unchanged(model, engine, before)


class _AlikeRows(nn.Module):
    """B rows alike of a table made without the batch, through ``how``, met row by row."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.tok, self.pos = nn.Embedding(7, 6), nn.Embedding(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        b = ids.shape[0]
        same = self.pos(torch.zeros(b, dtype=torch.long))
        if self.how == "gelu":  # alike values a vectorised kernel may round apart in last bits
            rows = F.gelu(same * 3.7)
        else:  # rows equal in value, their gradients not: each example gets row 0's
            rows = torch.cat([same[:1], 2 * same[1:] - same[1:].detach()])
        return self.head(torch.tanh(self.tok(ids).mean(1) * rows))


@pytest.mark.parametrize("how", ["gelu", "gradient-by-slices"])
def test_alike_rows_met_row_by_row_equal_the_naive_loop(how):
    """Met row by row, such rows are taken as copies of row 0 (last-bit differences allowed):
    every example computes the same function, as each run alone does."""
    for batch in (5, 8):
        ids = torch.randint(0, 7, (batch, T), generator=torch.Generator().manual_seed(batch))
        y = torch.randint(0, 3, (batch,), generator=torch.Generator().manual_seed(1))
        model = _AlikeRows(how).double()
        trained = list(model.parameters())
        expected = clipped_sum(
            per_sample_grads(copy.deepcopy(model), ids, y), [list(range(len(trained)))],
            clipping="automatic", clip_norm=1.0, gamma=0.01,
        )  # fmt: skip
        engine, opt = _engine(model, verify=False)
        before = _snapshot(model)
        F.cross_entropy(model(ids), y).backward()
        opt.step()
        for p, old, want in zip(trained, before, expected, strict=True):
            torch.testing.assert_close(old - p.detach(), want / B, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("how", ["positions-by-place", "alike-values-not-gradients"])
def test_a_forward_computes_what_the_model_computes_also_where_its_step_is_refused(how):
    """Rows met row by row are taken as copies of row 0 for the gradient only: a forward (an
    evaluation with gradients on, no step after it) gives the model's own output."""
    model = _RowsByPlace(how).double()
    plain = copy.deepcopy(model)
    _engine(model, verify=False)
    ids = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(ids), plain(ids))


@pytest.mark.parametrize(
    "how, match",
    [
        # (T, B, D) at T = B, a copy over dim 1 (its batch, followed from the transpose)
        ("time-major", r"has no batch dim .* add uses it .*carries the batch"),
        # rows that dropout made differ, then changed by place: no row check can tell
        ("dropout-then-slices", r"picked, moved or summed its rows"),
    ],
)
def test_rows_met_row_by_row_that_no_check_can_vouch_for_are_refused_at_forward(how, match):
    model = _RowsByPlace(how).double()
    ids = torch.randint(0, 7, (B, B), generator=torch.Generator().manual_seed(0))
    _assert_refused_at_forward(model, ids, match)


def test_rows_dropped_out_or_sent_through_a_layer_after_dropout_are_not_refused():
    """Rows of a table copied over the batch (T = B) that differ by dropout's masks alone: the
    step is taken (they are compared up to their zeros; a layer's output on them is not)."""

    class _Dropped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok, self.pos, self.fc = nn.Embedding(7, D), nn.Embedding(8, D), nn.Linear(D, D)
            self.head = nn.Linear(D, 3)

        def forward(self, ids):
            b, t = ids.shape
            p = F.dropout(self.pos(torch.arange(t).expand(b, t)), 0.5, training=True)
            return self.head(torch.tanh(self.tok(ids) + p + self.fc(p)).mean(1))

    model = _Dropped().double()
    engine, opt = _engine(model, verify=False)
    ids = torch.randint(0, 7, (B, B), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(ids), _y()).backward()
    opt.step()
    assert engine.steps_taken == 1


def test_a_refused_row_check_goes_with_the_sums_zero_grad_drops():
    model = _RowsByPlace("positions-by-place").double()
    engine, opt = _engine(model, verify=False)
    ids = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(0))
    F.cross_entropy(model(ids), _y()).backward()
    opt.zero_grad()
    F.cross_entropy(model(ids[:1]), _y(1)).backward()  # one example: rows alike
    opt.step()
    assert engine.steps_taken == 1


class _BiasMisuse(nn.Module):
    """A (T, d) position table from constants, misused as ``how`` says."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.pos = nn.Embedding(T, D)
        self.fc = nn.Linear(D, D)
        self.head = nn.Linear(D, 3)
        self.kept = None

    def forward(self, x):
        p = self.pos(torch.arange(x.shape[1]))
        if self.how == "cat":  # rows beside the batch's, not broadcast over it
            return self.head(torch.cat([self.fc(x).mean(1), p]))[: x.shape[0]]
        elif self.how == "in-place":
            p.mul_(2)
            h = x + p
        elif self.how == "time-major":  # (T, 1, d) on (T, B, d) states: its dim 0 is time
            h = (self.fc(x).transpose(0, 1) + p[:, None]).transpose(0, 1)
        elif self.how == "vector-time-major":  # (1, d) on (T, B, d): broadcast over time too
            v = self.pos(torch.zeros(1, dtype=torch.long))
            h = (self.fc(x).transpose(0, 1) + v).transpose(0, 1)
        else:  # kept and added to the loss: its gradient sums over the batch
            self.kept = p
            h = x + p
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize(
    "how, match",
    [
        ("cat", r"pos \(Embedding\) \(shape \(3, 5\)\) has no batch dim .* cat uses it .*carries "
                r"the batch"),
        ("in-place", r"has no batch dim .* mul_ changed it in place"),
        ("vector-time-major", r"pos \(Embedding\) has batch 1 .* add uses it .*carries the batch"),
    ],
)  # fmt: skip
def test_a_tensor_without_a_batch_dim_used_otherwise_is_refused_at_forward(how, match):
    _assert_refused_at_forward(_BiasMisuse(how).double(), _x(B, T, D), match)


def test_a_table_without_a_batch_dim_along_a_sequence_first_batch_equals_the_naive_loop():
    """(T, 1, d) positions on (T, B, d) states: split per example along the dim that holds the
    batch, as on a batch-first tensor."""
    _assert_equals_naive_loop(_BiasMisuse("time-major").double(), _x(B, T, D), _y())


def test_a_convolution_on_constants_needs_the_batch_on_dim_0_as_before():
    """Only layers whose rules take any leading dims (embeddings, linear, norms) get each
    example's copy of constant inputs; a convolution's rule needs its batch on dim 0."""

    class ConvOnConstants(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = nn.Conv1d(2, D, 3, padding=1), nn.Linear(D, 3)

        def forward(self, x):
            c = self.conv(torch.ones(B + 1, 2, x.shape[1], dtype=x.dtype)).mean((0, 2))
            return self.head(x.mean(1) + c)

    match = rf"conv \(Conv1d\) returned {B + 1} rows on dim 0"
    _assert_refused_at_forward(ConvOnConstants().double(), _x(B, T, D), match)


def test_a_constant_input_changed_in_place_after_its_layer_is_refused():
    """As for any layer input: its per-example gradients would come from the new values."""

    class Shifted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos, self.fc, self.head = nn.Embedding(T + 2, D), nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):
            ids = torch.arange(x.shape[1])
            p = self.pos(ids)
            ids.add_(2)
            return self.head(torch.tanh(self.fc(x) + p).mean(1))

    match = r"input 0 of pos \(Embedding\) was modified"
    _assert_refused_at_backward(Shifted().double(), match, verify=False)


def test_features_made_with_torch_tensor_from_the_batch_are_batched():
    """torch.tensor(...) of Python values may hold the batch's own values: not a constant."""

    class Refeatured(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(D, D), nn.Linear(D, 3)
            self.register_buffer("unused", torch.ones(1))  # constants exist in this forward

        def forward(self, x):
            f = torch.tensor((x**2).tolist(), dtype=x.dtype)
            return self.head(torch.tanh(self.fc(f)))

    _assert_equals_naive_loop(Refeatured().double(), _x(B, D), _y())


@pytest.mark.parametrize("scale", [1.0, 0.5], ids=["direct", "computed"])
def test_an_empty_batch_with_positions_takes_its_step(scale):
    model = _BiasMisuse("kept").double() if scale == 1.0 else _PositionsMadeSo("type_as").double()
    engine, opt = _engine(model, verify=False)
    x = _x(0, T, D) if scale == 1.0 else torch.zeros(0, T, dtype=torch.long)
    F.cross_entropy(model(x), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    opt.step()
    assert engine.ledger.steps == 1


@pytest.mark.parametrize("how", ["mul_", "setitem"])
def test_a_tensor_without_a_batch_dim_changed_in_place_after_a_broadcast_is_refused(how):
    """Each broadcast's gradient goes back through the tensor as it was at that broadcast."""

    class Changed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pos, self.fc, self.head = nn.Embedding(T, D), nn.Linear(D, D), nn.Linear(D, 3)

        def forward(self, x):
            p = self.pos(torch.arange(x.shape[1])) * 1.0
            h = self.fc(x) + p
            if how == "mul_":
                p.mul_(3)
            else:
                p[0] = 0
            return self.head(torch.tanh(h + p).mean(1))

    match = r"changed in place after .* broadcast"
    _assert_refused_at_backward(Changed().double(), match, verify=False)


def test_a_backward_that_raised_outside_dpclip_adds_nothing_and_training_goes_on():
    """A hook of the user's (or torch, out of memory) raises in the middle of a backward pass:
    what that pass reached is dropped at the next forward, whose step is the naive loop's."""
    model = _BiasMisuse("kept").double()
    x, y = _x(B, T, D), _y()
    expected = clipped_sum(per_sample_grads(copy.deepcopy(model), x, y),
                           [list(range(len(list(model.parameters()))))],
                           clipping="automatic", clip_norm=1.0, gamma=0.01)  # fmt: skip
    engine, opt = _engine(model, verify=False)
    before = _snapshot(model)
    out = model(x)
    out.register_hook(lambda grad: (_ for _ in ()).throw(ValueError("a user's hook")))
    with pytest.raises(ValueError, match="a user's hook"):
        F.cross_entropy(out, y).backward()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p, old, want in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(old - p.detach(), want / B, rtol=1e-6, atol=1e-12)
    engine.detach()


def test_a_gradient_reaching_a_tensor_without_a_batch_dim_otherwise_is_refused():
    model = _BiasMisuse("kept").double()
    match = r"has no batch dim .* used other than by"
    _assert_refused_at_backward(model, match, extra=lambda model: model.kept.square().sum())
    model.kept = None


class _Positions(nn.Module):
    """Position embeddings of shape (1, T, d), as GPT-2 and BERT compute them."""

    def __init__(self, use: str) -> None:
        super().__init__()
        self.use = use
        self.tok = nn.Embedding(7, D)
        self.pos = nn.Embedding(T, D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        p = self.pos(torch.arange(ids.shape[1])[None])  # (1, T, d)
        if self.use == "add":
            h = self.tok(ids) + p
        elif self.use == "add-in-place":
            h = self.tok(ids)
            h += p
        else:  # concatenated as one more row of the batch: it is not an example
            return self.head(torch.cat([self.tok(ids), p]).mean(1))
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("use", ["add", "add-in-place"])
def test_a_batch_1_output_broadcast_over_the_batch_equals_the_naive_loop(use):
    ids = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(0))
    _assert_equals_naive_loop(_Positions(use).double(), ids, _y())


def test_a_batch_1_output_used_other_than_by_a_broadcast_is_refused_not_expanded():
    ids = torch.randint(0, 7, (B, T))
    model = _Positions("cat").double()
    assert model(ids).shape == (B + 1, 3)
    match = r"output of pos \(Embedding\) has batch 1 .* cat uses it .*batched input"
    _assert_refused_at_forward(model, ids, match)


def test_attaching_never_changes_what_the_model_computes_over_the_zoo():
    for name in sorted(engine_models.CASES):
        model = engine_models.build(name)
        x, _ = engine_models.batch(name, B)
        trainable = [p for p in model.parameters() if p.requires_grad]
        training = model(x)
        for p in trainable:  # as attached: torch may pick another kernel (BEiT's attention)
            p.requires_grad_(False)
        frozen = model(x)
        for p in trainable:
            p.requires_grad_(True)
        engine, _ = _engine(model)
        attached = model(x)
        # either: T5's relative-position bias needs a gradient as in training, so its attention
        # mask does, which sends SDPA to its other kernel there (1e-16 apart)
        assert attached.shape == frozen.shape, name
        assert torch.equal(attached, frozen) or torch.equal(attached, training), name
        engine.detach()


class _Doubling(torch.Tensor):
    """A tensor subclass that changes what an op means (tanh doubled), as subclasses may."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        return out * 2 if func is torch.tanh else out


class _Callable:
    """An op object torch routes through torch function handling: no __name__, unhashable."""

    __hash__ = None  # type: ignore[assignment]

    def __call__(self, x):
        if torch.overrides.has_torch_function((x,)):
            return torch.overrides.handle_torch_function(self, (x,), x)
        return 3 * x


class _SubclassNet(nn.Module):
    def __init__(self, op=torch.tanh):
        super().__init__()
        self.fc1, self.fc2, self.op = nn.Linear(D, 4), nn.Linear(4, 3), op
        self.pos = nn.Embedding(T, 4)

    def forward(self, x):
        h = self.fc1(x) + self.pos(torch.arange(x.shape[1])[None])  # a pending batch-1 output
        return self.fc2(self.op(h)).mean(1)


@pytest.mark.parametrize("verify", [True, False])
def test_a_tensor_subclass_input_computes_what_it_computes_without_dpclip(verify):
    """dpclip's hooks keep torch function handling for a subclass (a fast path without it would
    turn the layer outputs into plain tensors: another function, or a false self-check error)."""
    torch.manual_seed(0)
    model = _SubclassNet().double()
    x = torch.randn(B, T, D, dtype=torch.float64).as_subclass(_Doubling)
    y = torch.arange(B) % 3
    expected = model(x).detach()
    reference = [p.detach().clone() for p in model.parameters()]
    engine, opt = _engine(model, verify=verify)
    out = model(x)
    assert torch.equal(out.detach(), expected)
    F.cross_entropy(out, y).backward()
    opt.step()
    assert engine.ledger.steps == 1
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), reference, strict=True))


def test_an_op_object_without_a_name_and_no_hash_passes_the_guard():
    model = _SubclassNet(op=_Callable()).double()
    engine, opt = _engine(model)
    F.cross_entropy(model(_x(B, T, D)), _y()).backward()
    opt.step()
    assert engine.ledger.steps == 1


# ------------------------------------------------------------------ 5. forwards and losses mixing
class _BatchStatistic(_FcHead):
    def forward(self, x):
        h = self.fc(x)
        if self.how == "standardise":
            h = (h - h.mean(0)) / h.std(0)
        else:  # a hand-written batch norm: biased variance, eps
            h = (h - h.mean(0, keepdim=True)) / (
                h.var(0, unbiased=False, keepdim=True) + 1e-5
            ).sqrt()
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("how", ["standardise", "hand-written-batch-norm"])
def test_a_forward_mixing_examples_is_refused_by_the_self_check(how):
    _assert_refused_at_step(_BatchStatistic(how).double(), _x(B, D), _y(), "forward mixes examples")


def _contrastive(z, y):
    z = F.normalize(z, dim=1)
    return F.cross_entropy(z @ z.T / 0.1, torch.arange(z.shape[0]))


def test_an_in_batch_contrastive_loss_is_refused_by_the_self_check():
    model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    _assert_refused_at_step(model, _x(B, D), _y(), "the loss mixes examples", loss=_contrastive)


def _standardised_targets(out, y):
    z = y.to(out.dtype)
    return F.mse_loss(out[:, 0], (z - z.mean()) / z.std())


def _hardest(out, y):
    return F.cross_entropy(out, y, reduction="none").max()


def _hardest_three(out, y):  # online hard-example mining
    return F.cross_entropy(out, y, reduction="none").topk(3).values.mean()


@pytest.mark.parametrize(
    "loss, seed",
    [(_standardised_targets, 0), (_hardest, 1), (_hardest_three, 0), (_hardest_three, 2)],
    ids=["standardised-targets", "hardest", "top-3-seed-0", "top-3-seed-2"],
)
def test_a_loss_selecting_or_standardising_over_the_batch_is_refused(loss, seed):
    """Each of these was accepted before the check made every other example a copy of the
    checked one (a per-example loss cannot notice), and counted a NaN gradient as a change:
    with standardised targets the probe divides by a zero std."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    b = 16 if loss is _hardest_three else 8
    x, y = _x(b, D), torch.randint(0, 3, (b,))
    engine, opt = _engine(model, batch_size=b)
    before = _snapshot(model)
    loss(model(x), y).backward()
    with pytest.raises(dpclip.SelfCheckError, match="the loss mixes examples"):
        opt.step()
    _assert_unchanged(model, engine, before)


# ------------------------------------------------------------------ 6. keyword calls
class _Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, D)
        self.fc = nn.Linear(D, D)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, 3)

    def forward(self, ids):
        h = self.norm(input=torch.tanh(self.fc(input=self.emb(input=ids))))
        return self.head(input=h.mean(1))


def test_layers_called_with_keywords_equal_the_naive_loop():
    ids = torch.randint(0, 7, (B, T), generator=torch.Generator().manual_seed(0))
    _assert_equals_naive_loop(_Keywords().double(), ids, _y())


# ------------------------------------------------------------------ 7. parameters used elsewhere
class _TiedBy(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.emb = nn.Embedding(7, D)
        self.fc = nn.Linear(D, D)

    def forward(self, ids):
        h = torch.tanh(self.fc(self.emb(ids))).mean(1)
        w = self.emb.weight
        if self.how == ".T":
            return h @ w.T
        if self.how == ".mT":
            return h @ w.mT
        if self.how == "t()":
            return h @ w.t()
        if self.how == "transpose":
            return torch.matmul(h, w.transpose(0, 1))
        if self.how == "in a list":
            return h @ torch.cat([w, w]).T[:, :7]
        if self.how == "keyword":
            return F.linear(input=h, weight=w)
        return F.embedding(torch.zeros_like(ids), w).mean(1) + h  # a functional lookup


@pytest.mark.parametrize(
    "how", [".T", ".mT", "t()", "transpose", "in a list", "keyword", "F.embedding"]
)
def test_a_parameter_used_outside_its_layer_through_any_view_is_refused(how):
    ids = torch.randint(0, 7, (B, T))
    match = r"parameter 'emb.weight' was used by .* outside the forward of the layer that owns it"
    _assert_refused_at_forward(_TiedBy(how).double(), ids, match, error=dpclip.ParameterUseError)


# ------------------------------------------------------------------ found by trying to break it
def _mlp():
    return nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def _class_weighted(out, y):
    return F.cross_entropy(out, y, weight=torch.tensor([1.0, 5.0, 0.2], dtype=out.dtype))


def _padded_token_mean(out, labels):
    """A mean over all tokens of a padded batch (-100: padding), as for a language model."""
    logits = out[:, None, :].expand(-1, labels.shape[1], -1)
    return F.cross_entropy(logits.reshape(-1, 3), labels.reshape(-1), ignore_index=-100)


@pytest.mark.parametrize("loss", [_class_weighted, _padded_token_mean], ids=lambda f: f.__name__)
def test_a_loss_weighting_examples_by_the_others_labels_is_refused(loss):
    labels = _y() if loss is _class_weighted else _y(B * T).view(B, T)
    if loss is _padded_token_mean:
        labels[0, 1:] = -100  # example 0 has one token, the others three
    match = "class weights and" if loss is _class_weighted else "only the other examples' labels"
    _assert_refused_at_step(_mlp(), _x(B, D), labels, match, loss=loss)


def test_a_token_mean_is_refused_even_when_the_first_middle_and_last_examples_have_no_label():
    """The check looks at examples the loss uses: rows without a labelled token show nothing."""
    labels = _y(B * T).view(B, T)
    labels[0] = labels[B // 2] = labels[B - 1] = -100
    labels[1, 1:] = -100
    _assert_refused_at_step(_mlp(), _x(B, D), labels, "only the other examples' labels",
                            loss=_padded_token_mean)  # fmt: skip


def test_a_token_mean_over_unpadded_examples_equals_their_mean_and_passes():
    model = _mlp()
    engine, opt = _engine(model)
    _padded_token_mean(model(_x(B, D)), _y(B * T).view(B, T)).backward()
    opt.step()
    assert engine.ledger.steps == 1


def test_a_parameter_used_in_the_loss_is_refused_by_the_self_check():
    model = _mlp()

    def penalised(out, y):
        return F.cross_entropy(out, y) + 0.1 * sum(p.square().sum() for p in model.parameters())

    _assert_refused_at_step(model, _x(B, D), _y(), "per-example gradient norm", loss=penalised)


class _TrainOnly(_FcHead):
    """Mixing only in training mode: a hand-written batch norm with running statistics, mixup."""

    def __init__(self, how: str) -> None:
        super().__init__(how, width=4)
        self.register_buffer("mean", torch.zeros(4, dtype=torch.float64))

    def forward(self, x):
        if self.how == "mixup" and self.training:
            x = 0.5 * x + 0.5 * x.roll(1, 0)
        h = self.fc(x)
        if self.how == "running-batch-norm":
            h = h - (h.mean(0) if self.training else self.mean)
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("how", ["running-batch-norm", "mixup"])
def test_mixing_only_in_training_mode_is_refused_by_the_self_check(how):
    _assert_refused_at_step(_TrainOnly(how).double(), _x(B, D), _y(), "forward mixes examples")


class _Stash(_FcHead):
    def __init__(self) -> None:
        super().__init__(width=4)

    def forward(self, x):
        self.feats = torch.tanh(self.fc(x))
        return self.head(self.feats)


def test_a_loss_through_an_activation_kept_on_the_model_is_refused():
    model = _Stash().double()

    def loss(out, y):
        return F.cross_entropy(out, y) + model.feats.mean(0).square().sum()

    _assert_refused_at_step(model, _x(B, D), _y(), "besides its output.*engine.verify", loss=loss)


def test_the_check_writes_no_gradient_anywhere_and_keeps_no_tape():
    model = _mlp()
    temperature = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))  # trained elsewhere
    engine, opt = _engine(model)
    F.cross_entropy(model(_x(B, D)) / temperature, _y()).backward()
    grad = temperature.grad.clone()
    opt.step()
    assert engine.ledger.steps == 1 and torch.equal(temperature.grad, grad)
    assert engine._first.tape is None
    gc.collect()  # earlier tests' engines: their inert tapes leave at an engine call
    remove_orphans()
    assert torch._C._len_torch_function_stack() == 0


def test_a_loss_working_in_place_on_the_output_is_checked():
    def in_place(out, y):
        return F.cross_entropy(out.mul_(2), y)

    _engine_model = _mlp()
    engine, opt = _engine(_engine_model)
    in_place(_engine_model(_x(B, D)), _y()).backward()
    opt.step()
    assert engine.ledger.steps == 1


def test_a_class_weighted_mean_is_refused_even_when_the_batch_hides_it():
    """The labels' weights are all equal here (classes 0 and 2), so no perturbation moves the
    gradient; the weighted mean divides by the batch's weights all the same."""
    labels = torch.tensor([2, 2, 2, 0])
    _assert_refused_at_step(
        _mlp(), _x(B, D), labels, "class weights and reduction='mean'", loss=_class_weighted_130
    )


def test_a_class_weighted_loss_averaged_per_example_equals_the_naive_loop():
    model = _mlp()
    engine, opt = _engine(model)
    w = torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)
    F.cross_entropy(model(_x(B, D)), _y(), weight=w, reduction="none").mean().backward()
    opt.step()
    assert engine.ledger.steps == 1


def _class_weighted_130(out, y):
    return F.cross_entropy(out, y, weight=torch.tensor([1.0, 5.0, 1.0], dtype=out.dtype))


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(D, 6).requires_grad_(False)  # frozen backbone
        self.a, self.b = nn.Linear(6, 3), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.a(h), self.b(h)


def test_a_second_backward_over_one_forward_is_refused_even_on_other_parameters():
    """Multi-task heads, each loss with its own backward: each pass clips every example on its
    own (√2·R per example), whether or not the passes share parameters."""
    model = _TwoHeads().double()
    engine, opt = _engine(model)
    before = _snapshot(model)
    out_a, out_b = model(_x(B, D))
    F.cross_entropy(out_a, _y()).backward(retain_graph=True)
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    with pytest.raises(dpclip.LoopOrderError, match=r"second backward pass over the same forward"):
        F.cross_entropy(out_b, _y()).backward()
    assert all(
        (p.grad is None and g is None) or torch.equal(p.grad, g)
        for p, g in zip(model.parameters(), grads, strict=True)
    )  # the second pass added nothing
    out_a, out_b = model(_x(B, D))
    (F.cross_entropy(out_a, _y()) + F.cross_entropy(out_b, _y())).backward()  # the fix
    opt.zero_grad()
    _assert_unchanged(model, engine, before)


def _weighted_mean(out, y):  # a hand-written class-weighted mean: mixes when classes differ
    w = torch.tensor([1.0, 20.0, 1.0], dtype=out.dtype)[y]
    return (w * F.cross_entropy(out, y, reduction="none")).sum() / w.sum()


@pytest.mark.parametrize("verify", [True, 1])
def test_a_loss_mixing_only_on_a_later_batch_is_refused_by_a_periodic_check(verify):
    """The first batch (one class) cannot show the weighting; verify=k checks every k-th step."""
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    engine, opt = _engine(model, verify=verify)
    x = _x(2 * B, D)
    _weighted_mean(model(x[:B]), torch.zeros(B, dtype=torch.long)).backward()
    opt.step()
    opt.zero_grad()
    _weighted_mean(model(x[B:]), torch.tensor([0, 1, 0, 0])).backward()
    if verify is True:  # the default checks the first batch only
        opt.step()
        assert engine.steps_taken == 2
        return
    before = _snapshot(model)
    with pytest.raises(dpclip.SelfCheckError):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert engine.steps_taken == 1


class _BatchMean(_FcHead):
    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.head(h + h.mean(0))  # mixes the examples


def test_a_first_batch_of_one_example_leaves_the_check_to_the_next_batch():
    model = _BatchMean().double()
    engine, opt = _engine(model)
    x = _x(1 + B, D)
    F.cross_entropy(model(x[:1]), _y(1)).backward()  # alone, it cannot show any mixing
    opt.step()
    opt.zero_grad()
    F.cross_entropy(model(x[1:]), _y()).backward()
    with pytest.raises(dpclip.SelfCheckError):
        opt.step()
    assert engine.steps_taken == 1


def test_another_optimizer_stepping_a_managed_parameter_before_the_noise_is_refused():
    """Its .grad holds the clipped sum without noise until the engine's optimizer steps."""
    model = nn.Sequential(nn.Linear(D, 3)).double()
    engine, opt = _engine(model)
    other = torch.optim.SGD(model[0].parameters(), lr=1.0)  # made after attach
    before = _snapshot(model)
    F.cross_entropy(model(_x(B, D)), _y()).backward()
    with pytest.raises(dpclip.LoopOrderError, match="not the engine's"):
        other.step()
    _assert_unchanged(model, engine, before)
    opt.step()  # the engine's own step adds the noise; after it, any optimizer may step
    other.step()
    assert engine.steps_taken == 1


def test_a_backward_from_a_tensor_made_to_require_grad_inside_the_forward_names_the_cause():
    """PEFT's enable_input_require_grads makes the frozen embedding's output a leaf that
    requires grad: the backward starts there, not from the model's inputs, and clips nothing."""
    model = nn.Sequential(nn.Linear(D, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].requires_grad_(False)
    model[0].register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    engine, opt = _engine(model)
    F.cross_entropy(model(_x(B, D)), _y()).backward()
    with pytest.raises(dpclip.LoopOrderError, match="disable_input_require_grads"):
        opt.step()
    assert engine.steps_taken == 0


def test_with_physical_batches_of_one_example_the_self_check_runs_three_times_not_every_step(
    monkeypatch,
):
    from dpclip import _selfcheck

    calls = []
    check = _selfcheck.check
    monkeypatch.setattr(_selfcheck, "check", lambda *a: calls.append(1) or check(*a))
    model = nn.Sequential(nn.Linear(D, 3)).double()
    engine, opt = _engine(model, steps=10)
    x, y = _x(8, D), _y(8)
    for i in range(8):
        F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]).backward()
        opt.step()
        opt.zero_grad()
    assert len(calls) == 3 and engine.steps_taken == 8


@pytest.mark.parametrize("layer", [0, 2])
def test_zero_grad_of_one_layer_between_physical_batches_is_refused(layer):
    model = nn.Sequential(nn.Linear(D, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    data = torch.utils.data.TensorDataset(_x(100, D), torch.randint(0, 3, (100,)))
    engine, opt = _engine(model, sample_size=100, batch_size=20)
    logical = next(iter(engine.data_loader(data, physical_batch_size=6,
                                           generator=torch.Generator().manual_seed(0))))  # fmt: skip
    for x, y in logical:
        model[layer].zero_grad()
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(dpclip.LoopOrderError, match="zero_grad"):
        opt.step()
    assert engine.steps_taken == 0
