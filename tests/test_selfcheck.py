"""The self-check: on by default, exact on the zoo, releases and changes nothing, refuses loudly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpclip
from tests import engine_models

B = 4


def _engine(model, **kw):
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    args = dict(sample_size=100, batch_size=B, steps=5, noise_multiplier=1.0, seed=0)
    return dpclip.PrivacyEngine(model, opt, **{**args, **kw}), opt


@pytest.mark.parametrize("name", sorted(engine_models.CASES))
def test_the_zoo_passes_the_self_check_with_float64_agreement(name):
    model = engine_models.build(name)
    x, y = engine_models.batch(name, B)
    engine, _ = _engine(model)
    result = engine.verify(x, loss_fn=lambda out: F.cross_entropy(out, y))
    assert result.examples == (0, 2, 3) and result.loss_from_rows
    assert result.max_relative_difference < 1e-6


def _state(model, opt, engine):
    return (
        [p.detach().clone() for p in model.parameters()],
        [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        [p.requires_grad for p in model.parameters()],
        [m.training for m in model.modules()],
        {
            k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
            for k, s in opt.state.items()
        },
        torch.get_rng_state(),
        engine.ledger.steps,
        list(engine._noise.state_dict()["generators"].values()),  # no noise drawn
    )


def _assert_same_state(a, b):
    for x, y in zip(a, b, strict=True):
        if isinstance(x, list):
            assert len(x) == len(y)
            for u, v in zip(x, y, strict=True):
                assert (u is None and v is None) or (
                    torch.equal(u, v) if torch.is_tensor(u) else u == v
                )
        elif isinstance(x, dict):
            assert x.keys() == y.keys()
            for k in x:
                assert all(
                    torch.equal(x[k][n], y[k][n])
                    if torch.is_tensor(x[k][n])
                    else x[k][n] == y[k][n]
                    for n in x[k]
                )
        else:
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y


class _Dropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 8)
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.drop(torch.tanh(self.fc(x))))


def test_verify_releases_nothing_and_leaves_model_grads_optimizer_rng_and_ledger_as_they_were():
    torch.manual_seed(0)
    model = _Dropout().double()
    engine, opt = _engine(model)
    x, y = torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # the first step (self-checked): optimizer state exists
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()  # gradients in flight
    before = _state(model, opt, engine)
    result = engine.verify(x, loss_fn=lambda out: F.cross_entropy(out, y))
    assert result.max_relative_difference < 1e-6  # dropout is off on both sides
    _assert_same_state(before, _state(model, opt, engine))


def _train(verify: bool) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = _Dropout().double()
    engine, opt = _engine(model, verify=verify)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = (
            torch.randn(B, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (B,), generator=g),
        )
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach() for p in model.parameters()]


def test_the_first_batch_check_leaves_dropout_masks_and_training_unchanged():
    """Same parameters after three noisy steps with dropout, with the check on and off."""
    for on, off in zip(_train(True), _train(False), strict=True):
        assert torch.equal(on, off)


def test_the_first_step_runs_the_check_once():
    model = engine_models.build("linear")
    engine, opt = _engine(model)
    passes = []
    model.register_forward_pre_hook(lambda *a: passes.append(1))
    x, y = engine_models.batch("linear", B)
    for _ in range(2):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert len(passes) == 2 + 1 + 3  # two training forwards; the batch and 3 examples, once


def test_an_empty_first_batch_leaves_the_check_to_the_first_batch_with_examples():
    """Poisson sampling can make the first logical batch empty: that step adds noise only, and
    the check waits for the first batch with examples (it found an IndexError there before)."""
    model = engine_models.build("linear")
    engine, opt = _engine(model)
    x, y = engine_models.batch("linear", B)
    F.cross_entropy(model(x[:0]), y[:0], reduction="sum").backward()
    opt.step()
    opt.zero_grad()
    assert engine.ledger.steps == 1 and engine._check_pending
    passes = []
    model.register_forward_pre_hook(lambda *a: passes.append(1))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.ledger.steps == 2 and not engine._check_pending
    assert len(passes) == 1 + 1 + 3  # the training forward; the check's batch and 3 examples


def test_a_mixing_loss_after_an_empty_first_batch_is_still_refused():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    engine, opt = _engine(model)
    x = torch.randn(B, 5, dtype=torch.float64)
    F.cross_entropy(model(x[:0]), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    opt.step()  # no example: nothing to check, a noise-only step
    opt.zero_grad()
    z = F.normalize(model(x), dim=1)
    F.cross_entropy(z @ z.T, torch.arange(B)).backward()  # mixes examples
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dpclip.SelfCheckError, match="mixes examples"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert engine.ledger.steps == 1


def test_verify_false_runs_no_check():
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    engine, opt = _engine(model, verify=False)
    z = F.normalize(model(torch.randn(B, 5, dtype=torch.float64)), dim=1)
    F.cross_entropy(z @ z.T, torch.arange(B)).backward()  # mixes examples: refused with the check
    opt.step()
    assert engine.ledger.steps == 1


@pytest.mark.parametrize("verify", [0, -3, 1.5, "yes", None])
def test_verify_must_be_a_bool_or_a_period(verify):
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="expected verify to be True, False or a period"):
        _engine(model, verify=verify)
    assert model.weight.requires_grad


def test_a_loss_the_tape_cannot_see_refuses_the_step_until_verify_passes():
    model = engine_models.build("linear")
    engine, opt = _engine(model)
    x, y = engine_models.batch("linear", B)
    out = model(x)
    torch.autograd.backward([F.cross_entropy(out[:2], y[:2]), F.cross_entropy(out[2:], y[2:])])
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dpclip.IntegrityError, match=r"several tensors at once.*engine.verify"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert engine.ledger.steps == 0
    engine.verify(x, loss_fn=lambda out: F.cross_entropy(out, y))
    opt.step()
    assert engine.ledger.steps == 1


def test_a_forward_between_the_first_loss_and_its_backward_is_named_in_the_refusal():
    """A validation pass with gradients on, between the first batch's forward and backward:
    the check cannot see that loss, and says why (it gave only the generic cause before)."""
    model = engine_models.build("linear")
    engine, opt = _engine(model)
    x, y = engine_models.batch("linear", B)
    loss = F.cross_entropy(model(x), y)
    model(x[:2])  # grad-enabled, not under torch.no_grad()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dpclip.SelfCheckError, match=r"another forward of the model ran before"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True))
    assert engine.ledger.steps == 0


def test_verify_refuses_a_loss_that_is_not_one_number():
    model = engine_models.build("linear")
    engine, _ = _engine(model)
    x, y = engine_models.batch("linear", B)
    with pytest.raises(dpclip.SelfCheckError, match="the loss must be one number"):
        engine.verify(x, loss_fn=lambda out: F.cross_entropy(out, y, reduction="none"))


def _gpt2_lm():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=11, n_positions=8, n_embd=8, n_layer=1, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double()


def test_a_model_computing_its_own_loss_is_checked_example_by_example():
    """transformers with labels: the loss is the model's output; each example runs alone."""
    model = _gpt2_lm()
    engine, opt = _engine(model)
    ids = torch.randint(0, 11, (B, 6), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert engine.ledger.steps == 1
    result = engine.verify(input_ids=ids, labels=ids, loss_fn=lambda out: out.loss)
    assert not result.loss_from_rows and result.max_relative_difference < 1e-6


def test_a_token_mean_over_padded_examples_is_refused():
    """A mean over all tokens of the batch weighs each example by its token count, which
    depends on the other examples: not the mean of per-example losses dpclip clips."""
    model = _gpt2_lm()
    engine, opt = _engine(model)
    ids = torch.randint(0, 11, (B, 6), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[0, 2:] = -100  # example 0 has fewer tokens
    model(input_ids=ids, labels=labels).loss.backward()
    with pytest.raises(dpclip.SelfCheckError, match="per-example gradient norm of"):
        opt.step()
    assert engine.ledger.steps == 0


def test_verify_leaves_no_mode_behind_and_dropout_still_drops_in_training():
    torch.manual_seed(0)
    model = _Dropout().double()
    engine, _ = _engine(model)
    x, y = torch.randn(B, 5, dtype=torch.float64), torch.randint(0, 3, (B,))
    depth = torch._C._len_torch_function_stack()
    engine.verify(x, loss_fn=lambda out: F.cross_entropy(out, y))
    assert torch._C._len_torch_function_stack() == depth
    assert engine._first.tape is None
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))  # two different dropout masks


class ToyDropPath(nn.Module):
    """Stochastic depth as transformers and timm write it: whole examples dropped at random."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop_prob = p

    def forward(self, x):
        if not self.training:
            return x
        keep = (torch.rand(x.shape[0], 1, dtype=x.dtype) > self.drop_prob).to(x.dtype)
        return x * keep / (1 - self.drop_prob)


def test_stochastic_depth_layers_are_in_eval_mode_during_the_check_and_after_it_train():
    """They draw per example, which the check's runs cannot repeat: it refused at random (6
    of 10 seeds here)."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop, self.head = nn.Linear(4, 4), ToyDropPath(0.5), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(x + self.drop(torch.tanh(self.fc(x))))

    for seed in range(5):
        torch.manual_seed(seed)
        model = Model().double().train()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dpclip.PrivacyEngine(
            model, opt, sample_size=100, batch_size=8, steps=1, noise_multiplier=1.0
        )
        x, y = torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 3, (8,))
        F.cross_entropy(model(x), y).backward()
        opt.step()  # the self-check of this batch passes
        assert model.drop.training
