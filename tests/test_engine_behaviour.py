"""The engine's contract beyond one clean step: accumulation, noise, detach, and every bad input."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations, prune

import dpclip
from dpclip.errors import DoubleBackwardError
from dpclip.layers import default_registry
from tests import engine_models
from tests.counting import count_draws


def _setup(name="linear", optimizer=torch.optim.SGD, **kw):
    model = engine_models.build(name)
    opt = optimizer(model.parameters(), lr=1.0)
    args = dict(sample_size=100, batch_size=8, steps=10, noise_multiplier=0.0)
    args.update(kw)
    return model, opt, dpclip.PrivacyEngine(model, opt, **args)


def _snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def _assert_unchanged(model, snapshot):
    for p, old in zip(model.parameters(), snapshot, strict=True):
        assert torch.equal(p.detach(), old)


def _loss(model, x, y, reduction="mean"):
    return F.cross_entropy(model(x), y, reduction=reduction)


def _assert_one_step_equals_naive_loop(model, x, y, registry=None):
    """One engine step (noise 0, SGD lr=1, all-layer automatic clipping) moves the parameters
    by -(1/B) Σ C_i g_i of the naive per-sample loop."""
    from tests.oracle import clipped_sum, per_sample_grads

    batch = len(x)
    group = list(range(len(list(model.parameters()))))
    expected = clipped_sum(
        per_sample_grads(model, x, y), [group], clipping="automatic", clip_norm=1.0, gamma=0.01
    )
    before = _snapshot(model)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(
        model, opt, sample_size=10 * batch, batch_size=batch, steps=1, noise_multiplier=0.0,
        registry=registry,
    )  # fmt: skip
    _loss(model, x, y).backward()
    opt.step()
    for p, old, want in zip(model.parameters(), before, expected, strict=True):
        torch.testing.assert_close(old - p.detach(), want / batch, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_accumulating_three_micro_batches_equals_one_batch_of_their_union(reduction):
    x, y = engine_models.batch("conv2d_dilated_grouped", 9)
    updates = []
    for chunks in (1, 3):
        model, opt, _ = _setup("conv2d_dilated_grouped", loss_reduction=reduction)
        before = _snapshot(model)
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=True):
            _loss(model, xc, yc, reduction).backward()
        opt.step()
        updates.append([b - p.detach() for b, p in zip(before, model.parameters(), strict=True)])
    for one, three in zip(*updates, strict=True):
        torch.testing.assert_close(one, three, rtol=1e-9, atol=1e-12)


def test_noise_has_std_sigma_r_over_batch_size_mean_zero_and_is_fresh_every_step():
    torch.manual_seed(0)
    model = nn.Linear(200, 100, bias=False).double()
    nn.init.zeros_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sigma, clip_norm, batch = 2.0, 3.0, 16
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=1000, batch_size=batch, steps=5, noise_multiplier=sigma,
        clip_norm=clip_norm, seed=0,
    )  # fmt: skip
    draws = count_draws(engine._noise)
    x = torch.zeros(4, 200, dtype=torch.float64)  # zero input: every per-sample gradient is 0
    updates = []
    for _ in range(2):
        before = model.weight.detach().clone()
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        updates.append(before - model.weight.detach())
    expected_std = sigma * clip_norm / batch
    for u in updates:
        assert abs(u.std().item() / expected_std - 1) < 0.02
        assert abs(u.mean().item()) < 4 * expected_std / u.numel() ** 0.5
    assert (
        torch.corrcoef(torch.stack([updates[0].flatten(), updates[1].flatten()]))[0, 1].abs() < 0.02
    )
    assert len(draws) == 2 and engine.steps_taken == 2


def test_noise_is_drawn_once_per_step_however_many_micro_batches():
    model, opt, engine = _setup(noise_multiplier=1.0)
    draws = count_draws(engine._noise)
    x, y = engine_models.batch("linear", 6)
    for xc, yc in zip(x.chunk(3), y.chunk(3), strict=True):
        _loss(model, xc, yc).backward()
    opt.step()
    assert len(draws) == 1 and engine.steps_taken == 1


@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop])
def test_any_optimizer_receives_the_clipped_gradient(optimizer):
    model, opt, _ = _setup(optimizer=optimizer)
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    grads_before_step = [p.grad.clone() for p in model.parameters()]
    opt.step()
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads_before_step)
    assert all(opt.state[p]["step"] == 1 for p in model.parameters())


def test_detach_restores_ordinary_non_private_training():
    model, opt, engine = _setup()
    flags = [p.requires_grad for p in model.parameters()]
    with engine:
        assert not any(p.requires_grad for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == [True] * len(flags)
    x, y = engine_models.batch("linear", 4)
    reference = [
        g.clone() for g in torch.autograd.grad(_loss(model, x, y), list(model.parameters()))
    ]
    _loss(model, x, y).backward()
    for p, g in zip(model.parameters(), reference, strict=True):
        torch.testing.assert_close(p.grad, g)
    opt.step()  # no hook left: no error without dpclip's bookkeeping


def test_detach_drops_the_buffers_kept_between_steps_and_a_new_engine_makes_them_again():
    """The conv rule's padded and unfolded copies, the clipped sums' scaled side and the noise
    scratch are kept per thread between steps on a CPU: tens of MB a user who detached would
    otherwise hold for good. A later engine makes them again and trains the same."""
    from dpclip import noise
    from dpclip.layers import _common

    def step() -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.Tanh(), nn.Flatten(),
                              nn.Linear(8 * 7 * 7, 4))  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = dpclip.PrivacyEngine(model, opt, sample_size=100, batch_size=8, steps=2,
                                      noise_multiplier=1.0, seed=0)  # fmt: skip
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        assert _common._scratch.__dict__ and noise._scratch.__dict__  # kept while attached
        engine.detach()
        assert not _common._scratch.__dict__ and not noise._scratch.__dict__
        return [p.detach().clone() for p in model.parameters()]

    first, again = step(), step()
    for a, b in zip(first, again, strict=True):
        assert torch.equal(a, b)


def test_a_backward_inside_optimizer_step_is_refused():
    """A closure (LBFGS and the like) runs its backward inside step, after the noise: its clipped
    sums would replace the noisy gradients. Refused, with no ledger entry and the parameters
    unchanged."""
    model, opt, engine = _setup()
    x, y = engine_models.batch("linear", 4)
    before = _snapshot(model)

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    closure()
    with pytest.raises(dpclip.LoopOrderError, match="inside optimizer.step"):
        opt.step(closure)
    assert engine.steps_taken == 0
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True))
    opt.zero_grad()
    closure()
    opt.step()  # the usual loop goes on
    assert engine.steps_taken == 1


def test_detach_before_the_step_drops_the_clipped_gradients_that_have_no_noise():
    """A plain step after it would apply the clipped sum without noise, ledger or /B."""
    model, opt, engine = _setup()
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    with pytest.warns(UserWarning, match="dropped the clipped gradients"):
        engine.detach()
    assert all(p.grad is None for p in model.parameters())
    assert engine.steps_taken == 0


def test_bf16_autocast_trains_with_norms_in_float32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dpclip.PrivacyEngine(model, opt, sample_size=100, batch_size=8, steps=2, noise_multiplier=0.0)
    x, y = torch.randn(8, 8), torch.randint(0, 4, (8,))
    before = _snapshot(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(
        not torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before, strict=True)
    )


def test_target_epsilon_calibrates_sigma_and_ledger_records_every_step():
    model, opt, engine = _setup(
        noise_multiplier=None, target_epsilon=2.0, target_delta=1e-5, steps=3
    )
    assert engine.noise_multiplier > 0
    x, y = engine_models.batch("linear", 4)
    for _ in range(3):
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps_taken == 3
    eps, delta = engine.privacy_spent()
    assert 0.99 * 2.0 <= eps <= 2.0 and delta == 1e-5


# ----------------------------------------------------------------------------- bad input


def test_step_beyond_the_budget_raises_and_leaves_parameters_unchanged():
    model, opt, engine = _setup(steps=1, noise_multiplier=1.0)
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    opt.step()
    opt.zero_grad()
    _loss(model, x, y).backward()
    before = _snapshot(model)
    with pytest.raises(dpclip.PrivacyBudgetExceeded, match="would exceed the privacy budget"):
        opt.step()
    _assert_unchanged(model, before)
    assert engine.steps_taken == 1


@pytest.mark.parametrize(
    "module, fragment",
    [
        (nn.MultiheadAttention(4, 2), "MultiheadAttention"),
        (nn.LSTM(4, 4), "LSTM"),
        (nn.BatchNorm1d(4), "dpclip.fix"),
        (parametrizations.spectral_norm(nn.Linear(4, 4)), "remove_parametrizations"),
        (parametrizations.weight_norm(nn.Linear(4, 4)), "remove_parametrizations"),
        (prune.random_unstructured(nn.Linear(4, 4), "weight", 0.5), "prune.remove"),
    ],
    ids=["mha", "lstm", "batchnorm", "spectral-norm", "weight-norm", "pruned"],
)
def test_unsupported_trainable_module_is_an_error_naming_path_type_and_fix(module, fragment):
    model = nn.Sequential(nn.Linear(4, 4), module)
    before = _snapshot(model)
    with pytest.raises(dpclip.UnsupportedModuleError, match=fragment) as info:
        dpclip.PrivacyEngine(
            model, torch.optim.SGD(model.parameters(), lr=1), sample_size=10, batch_size=2,
            steps=1, noise_multiplier=1.0,
        )  # fmt: skip
    assert "1 (" in str(info.value)  # the module's path in the Sequential
    _assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())


def test_the_old_weight_norm_is_refused_and_a_frozen_reparametrized_layer_is_not():
    with pytest.warns(FutureWarning):
        old = torch.nn.utils.weight_norm(nn.Linear(4, 4))
    model = nn.Sequential(nn.Linear(4, 4), old)
    opt = torch.optim.SGD(model.parameters(), lr=1)
    with pytest.raises(dpclip.UnsupportedModuleError, match=r"1 \(Linear\).*remove_weight_norm"):
        dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1,
                             noise_multiplier=1.0)  # fmt: skip
    frozen = parametrizations.spectral_norm(nn.Linear(4, 4)).requires_grad_(False)
    model = nn.Sequential(nn.Linear(4, 4), frozen)
    opt = torch.optim.SGD(model[0].parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0)


def test_a_bare_parameter_used_in_forward_takes_the_fallback_named_at_attach(capsys):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3).double()
            self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

        def forward(self, x):
            return self.lin(x) * self.scale

    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(Scaled(), x, y)
    line = capsys.readouterr().err
    assert "1 module(s) without a layer rule take the generic per-example fallback" in line
    assert "24 B per example" in line and line.strip().endswith("<model>")


class _StandardizedConv(nn.Conv2d):
    """Weight standardization in ``_conv_forward`` (forward itself inherited): the conv rule's
    gradient would be the standardized weight's, applied to the raw one."""

    def _conv_forward(self, x, weight, bias):
        dims = (1, 2, 3)
        standardized = (weight - weight.mean(dims, keepdim=True)) / weight.std(dims, keepdim=True)
        return super()._conv_forward(x, standardized, bias)


def test_a_conv_subclass_computing_in_conv_forward_takes_the_fallback_and_is_exact(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(_StandardizedConv(2, 3, 3).double(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 3).double())  # fmt: skip
    assert default_registry().rule_for(model[0]) is None
    x, y = torch.randn(5, 2, 6, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)
    assert "take the generic per-example fallback" in capsys.readouterr().err


class _ScaledLinear(nn.Linear):
    """A Linear subclass with a parameter of its own: the Linear rule would give ``gain`` the
    bias's gradient."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        gain = torch.linspace(0.5, 2.0, self.out_features, dtype=torch.float64)
        self.gain = nn.Parameter(gain)  # not ones: the gain must really act in the rerun

    def forward(self, x):
        return super().forward(x) * self.gain


class _HookedGain(_ScaledLinear):
    """The same gain applied by a forward hook of its own: outside its forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_forward_hook(lambda m, a, out: out * m.gain)

    def forward(self, x):
        return nn.Linear.forward(self, x)


def test_a_layer_subclass_with_a_parameter_of_its_own_takes_the_fallback_and_is_exact():
    torch.manual_seed(0)
    model = nn.Sequential(_ScaledLinear(4, 3).double(), nn.Tanh(), nn.Linear(3, 3).double())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)


def test_a_parameter_used_by_a_hook_of_its_own_layer_is_refused_with_the_fix():
    model = nn.Sequential(_HookedGain(4, 3).double(), nn.Tanh(), nn.Linear(3, 3).double())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(model, opt, sample_size=50, batch_size=5, steps=1, noise_multiplier=0)
    with pytest.raises(dpclip.ParameterUseError, match="'0.gain' .* in a hook of that layer"):
        model(torch.randn(5, 4, dtype=torch.float64))


class _Stage(nn.Module):
    """A block that takes the fallback (a bare parameter), whose output a hook registered
    before attach also keeps for the head (timm's feature hooks, feature distillation)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x * self.w)


class _Features(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stage, self.head = _Stage(), nn.Linear(8, 3).double()
        self.kept: list = []
        self.stage.register_forward_hook(lambda m, a, out: self.kept.append(out))

    def forward(self, x):
        self.kept.clear()
        h = self.stage(x) * 2
        return self.head(torch.cat([h, self.kept[0]], dim=1))


def test_a_hook_that_keeps_a_fallback_modules_output_for_later_equals_the_naive_loop():
    torch.manual_seed(0)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(_Features(), x, y)


class _Shifted(nn.Module):
    """A module without a rule (a bare parameter) with a forward pre-hook that changes its
    input, and a forward hook with dropout: recorded after the one and before the other, so its
    rerun runs neither again."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))
        self.register_forward_pre_hook(lambda m, args: (args[0] * 2 + 1,))
        self.register_forward_hook(lambda m, a, out: F.dropout(out, 0.5, m.training))

    def forward(self, x):
        return torch.tanh(x * self.w)


def test_a_fallback_modules_own_hooks_act_once_and_it_equals_the_naive_loop():
    torch.manual_seed(0)
    model = nn.Sequential(_Shifted(), nn.Linear(4, 3).double()).eval()  # hooks' dropout off
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)
    torch.manual_seed(0)
    model = nn.Sequential(_Shifted(), nn.Linear(4, 3).double()).train()  # the hook draws
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=50, batch_size=5, steps=2, noise_multiplier=1.0
    )
    for _ in range(2):  # the rerun's outputs are checked against the forward's on every step
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps_taken == 2


def test_a_users_forward_hook_on_a_layer_equals_the_naive_loop():
    """A pruning mask applied by a hook registered before attach: dpclip records the layer's
    own output, and the mask acts downstream of it (pruned rows get no gradient)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    mask = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    model[0].register_forward_hook(lambda m, a, out: out * mask)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)


def test_complex_parameters_of_a_ruled_layer_are_refused_at_attach():
    model = nn.Sequential(nn.Linear(3, 2, dtype=torch.complex64))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(dpclip.UnsupportedModuleError, match="complex parameters"):
        dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1,
                             noise_multiplier=1.0)  # fmt: skip
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("container", ["list", "dict"])
def test_parameters_in_a_parameter_list_or_dict_take_the_parents_fallback(container):
    """The container has no call of its own: its parameters are read by the parent's forward,
    whose fallback takes them (a ParameterUseError before, whose advice did not apply)."""

    class Mixer(nn.Module):
        def __init__(self):
            super().__init__()
            scales = [torch.linspace(0.5, 1.5, 3, dtype=torch.float64), torch.ones(3).double()]
            self.scales = (
                nn.ParameterList(scales)
                if container == "list"
                else nn.ParameterDict({"a": scales[0], "b": scales[1]})
            )
            self.lin = nn.Linear(3, 3).double()

        def forward(self, x):
            a, b = self.scales if container == "list" else (self.scales["a"], self.scales["b"])
            return self.lin(x * a) + b

    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(Mixer(), x, y)


class _AliasingHead(nn.Module):
    """Holds its decoder's bias a second time, as RoBERTa's LM head does; ``direct`` also uses
    it outside the decoder, and ``extra`` adds a parameter of its own."""

    def __init__(self, direct=False, extra=False):
        super().__init__()
        self.decoder = nn.Linear(4, 3).double()
        self.bias = self.decoder.bias
        self.extra = nn.Parameter(torch.ones(3, dtype=torch.float64)) if extra else None
        self.direct = direct

    def forward(self, x):
        out = self.decoder(x)
        return out + self.bias if self.direct else out


def test_a_module_holding_only_parameters_of_clipped_layers_is_accepted_and_exact():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4).double(), nn.Tanh(), _AliasingHead())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)


def test_a_module_holding_aliases_and_a_parameter_of_its_own_takes_the_fallback_for_its_own():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4).double(), nn.Tanh(), _AliasingHead(extra=True))
    engine = dpclip.PrivacyEngine(
        model, torch.optim.SGD(model.parameters(), lr=1), sample_size=10, batch_size=2,
        steps=1, noise_multiplier=1.0,
    )  # fmt: skip
    assert engine._plan.names[model[2]] == ("extra",)  # not the decoder's bias it also holds


def test_an_aliased_parameter_used_outside_its_layer_is_refused():
    model = nn.Sequential(_AliasingHead(direct=True))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0)
    with pytest.raises(
        dpclip.ParameterUseError,
        match=r"'0.bias' was used by add outside .* \(Linear\)"
        r".*also held by 0 \(_AliasingHead\), which has no per-sample rule",
    ):
        model(torch.randn(2, 4, dtype=torch.float64))


def test_fix_replaces_batchnorm_with_groupnorm_and_the_model_then_attaches():
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4, 2)
    )
    dpclip.fix(model)
    assert isinstance(model[1], nn.GroupNorm) and model[1].num_groups == 6
    dpclip.PrivacyEngine(
        model, torch.optim.SGD(model.parameters(), lr=1), sample_size=10, batch_size=2,
        steps=1, noise_multiplier=1.0,
    )  # fmt: skip


def test_fix_after_the_optimizer_exists_says_to_call_it_before():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(24, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.fix(model)
    with pytest.raises(ValueError, match="call dpclip.fix before creating the optimizer"):
        dpclip.PrivacyEngine(
            model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0
        )


def test_step_without_backward_raises_and_leaves_parameters_unchanged():
    model, opt, _ = _setup()
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    _assert_unchanged(model, before)


def test_backward_twice_on_the_same_graph_raises():
    model, opt, _ = _setup()
    x, y = engine_models.batch("linear", 4)
    loss = _loss(model, x, y)
    loss.backward(retain_graph=True)
    before = _snapshot(model)
    with pytest.raises(DoubleBackwardError, match="second backward pass"):
        loss.backward()
    _assert_unchanged(model, before)


def test_physical_batch_above_the_maximum_raises():
    model, opt, _ = _setup(max_physical_batch_size=3)
    x, y = engine_models.batch("linear", 4)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="exceeds max_physical_batch_size=3"):
        _loss(model, x, y).backward()
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    _assert_unchanged(model, before)


def test_non_finite_loss_raises_and_the_step_is_refused():
    model, opt, _ = _setup()
    x, y = engine_models.batch("linear", 4)
    x[1, 0] = float("nan")
    before = _snapshot(model)
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        _loss(model, x, y).backward()
    with pytest.raises(FloatingPointError, match="refusing to step"):
        opt.step()
    _assert_unchanged(model, before)


def test_a_refused_non_finite_step_ends_the_step_and_training_goes_on_after_zero_grad():
    model, opt, engine = _setup()
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()  # a clean first micro-batch, then a NaN one
    bad = x.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN or infinite"):
        _loss(model, bad, y).backward()
    with pytest.raises(FloatingPointError, match="refusing to step"):
        opt.step()
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()  # a new step: the refused one is not carried over
    assert engine.steps_taken == 1


@pytest.fixture
def checks_at_step(monkeypatch):
    """The accelerator's path on this CPU: the norms' finiteness is read at the step."""
    from dpclip import _bookkeeping

    monkeypatch.setattr(_bookkeeping, "checks_at_step", lambda device: True)


def test_on_an_accelerator_a_non_finite_norm_refuses_the_step_instead_of_the_backward(
    checks_at_step,
):
    model, opt, engine = _setup()
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    bad = x.clone()
    bad[1, 0] = float("nan")
    _loss(model, bad, y).backward()  # no device sync in the backward, so no error yet
    _loss(model, x, y).backward()
    before = _snapshot(model)
    with pytest.raises(FloatingPointError, match="refusing to step: a per-sample gradient norm"):
        opt.step()
    _assert_unchanged(model, before)
    assert engine.steps_taken == 0
    with pytest.raises(RuntimeError, match="call optimizer.zero_grad"):
        _loss(model, x, y).backward()  # the NaN gradients of the refused step are still there
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()
    assert engine.steps_taken == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_on_an_accelerator_finite_steps_equal_the_cpu_path(monkeypatch):
    from dpclip import _bookkeeping

    x, y = engine_models.batch("linear", 8)
    runs = []
    for defer in (True, False):
        monkeypatch.setattr(_bookkeeping, "checks_at_step", lambda device, defer=defer: defer)
        model, opt, _ = _setup(noise_multiplier=1.0, seed=3)
        for _ in range(2):
            _loss(model, x[:4], y[:4]).backward()
            _loss(model, x[4:], y[4:]).backward()
            opt.step()
            opt.zero_grad()
        runs.append(_snapshot(model))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_gradient_the_engine_did_not_clip_is_refused_at_step():
    model, opt, _ = _setup()
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    model[0].weight.requires_grad_(True)  # a user re-enables autograd on a managed parameter
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="would not be clipped"):
        opt.step()
    _assert_unchanged(model, before)


def test_optimizer_parameter_outside_the_model_is_an_error():
    model = engine_models.build("linear")
    stray = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not in the model"):
        dpclip.PrivacyEngine(
            model, torch.optim.SGD([*model.parameters(), stray], lr=1), sample_size=10,
            batch_size=2, steps=1, noise_multiplier=1.0,
        )  # fmt: skip


def test_a_trainable_parameter_outside_the_optimizer_is_refused_at_attach():
    """A second optimizer over it would take its clipped sum before the noise; refused with the
    parameters named, and the model left as it was (trainable, no hook)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    opt = torch.optim.SGD(model[0].parameters(), lr=1)
    with pytest.raises(ValueError, match=r"2 trainable parameter\(s\) .* \(2\.weight, 2\.bias\)"):
        dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1,
                             noise_multiplier=1.0)  # fmt: skip
    assert all(p.requires_grad for p in model.parameters())
    x, y = torch.randn(2, 4), torch.tensor([0, 1])
    F.cross_entropy(model(x), y).backward()  # plain autograd: no dpclip hook left behind
    assert all(p.grad is not None for p in model.parameters())
    model[2].requires_grad_(False)  # the fix the message names
    model.zero_grad()
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0)


def test_stale_gradients_without_zero_grad_are_an_error():
    model, opt, _ = _setup()
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    opt.step()
    with pytest.raises(RuntimeError, match="zero_grad"):
        _loss(model, x, y).backward()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(batch_size=200), r"expected 1 <= batch_size <= sample_size \(100\), got 200"),
        (dict(noise_multiplier=-1.0), "expected noise_multiplier >= 0, got -1.0"),
        (dict(noise_multiplier=1e-200), "expected noise_multiplier = 0 or >= 1e-100"),
        (dict(clipping="nope"), "unknown clipping 'nope'"),
        (dict(clipping_style="rows"), "unknown clipping_style 'rows'"),
        (dict(loss_reduction="avg"), "unknown loss_reduction 'avg'"),
        (dict(norm_strategy="fast"), "unknown norm_strategy 'fast'"),
        (dict(steps=None), "exactly one of epochs= and steps="),
        (dict(target_epsilon=1.0), "exactly one of noise_multiplier= and target_epsilon="),
        (dict(clip_norm=0.0), "expected clip_norm > 0"),
        (dict(gamma=-0.1), "expected gamma > 0"),
        (dict(target_delta=1.5), "expected 0 < target_delta < 1"),
        (dict(target_delta=0.01), r"target_delta=0.01 is not below 1/sample_size = 0.01: .*no "),
        (dict(target_delta=0.5), "promises no privacy"),
        (dict(clipping_style=[["0.weight"]]), "leave out trainable parameters"),
        (dict(clipping_style=[["0.weight"], ["0.weight"]]), "is in clipping_style groups 0 and 1"),
        (
            dict(clipping_style=[[nn.Parameter(torch.zeros(1))]]),
            "not a trainable parameter of the model",
        ),
        (dict(clipping_style=[["no.such"]]), "names no.such that is not a trainable parameter"),
        (dict(clipping_style=[[]]), "group 0 must be a non-empty list of parameters"),
    ],
)
def test_bad_arguments_raise_value_error_and_change_nothing(kwargs, message):
    model = engine_models.build("linear")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    args = dict(sample_size=100, batch_size=8, steps=10, noise_multiplier=0.0)
    args.update(kwargs)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        dpclip.PrivacyEngine(model, opt, **args)
    _assert_unchanged(model, before)
    assert all(p.requires_grad for p in model.parameters())
    assert not opt._optimizer_step_pre_hooks


def test_embedding_with_max_norm_is_refused_at_construction():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0))
    with pytest.raises(dpclip.UnsupportedModuleError, match=r"0 \(Embedding\).*max_norm=1.0"):
        dpclip.PrivacyEngine(
            model, torch.optim.SGD(model.parameters(), lr=1), sample_size=10, batch_size=2,
            steps=1, noise_multiplier=1.0,
        )  # fmt: skip


class _Scale(nn.Module):
    """y = x * w, elementwise: per-sample grad Σ_t x_t s_t (a user layer for rule tests)."""

    def __init__(self, d):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return x * self.w


def _scale_per_sample(module, inputs, s, names):
    return {"w": (inputs[0] * s).reshape(s.shape[0], -1, s.shape[-1]).sum(1)}


def _scale_clipped(module, inputs, s, factors):
    return {"w": factors["w"].to(s.dtype) @ _scale_per_sample(module, inputs, s, ["w"])["w"]}


def _scale_rule(norm_sq=None, per_sample=_scale_per_sample, instantiates=None, clipped=None):
    def good_norm_sq(module, inputs, s, names, strategy):
        return {"w": _scale_per_sample(module, inputs, s, names)["w"].square().sum(1)}

    return dpclip.layers.LayerRule(
        norm_sq or good_norm_sq, clipped or _scale_clipped, per_sample, instantiates=instantiates
    )


def _summed_norm(module, inputs, s, names, strategy):  # the batch's norm, not each sample's
    return {"w": _scale_per_sample(module, inputs, s, names)["w"].square().sum()}


def _always(module, inputs, s, names, strategy):
    return names


def test_a_registered_user_layer_is_clipped_like_the_naive_loop():
    registry = dpclip.layers.default_registry()
    registry.register(_Scale, _scale_rule())
    torch.manual_seed(0)
    model = nn.Sequential(_Scale(4), nn.Linear(4, 3).double())
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y, registry)


class _FunctionallyTied(nn.Module):
    """An LM whose output layer reuses the embedding's weight through F.linear, not a layer."""

    def __init__(self):
        super().__init__()
        self.emb, self.ln = nn.Embedding(7, 4).double(), nn.LayerNorm(4).double()

    def forward(self, ids):
        return F.linear(self.ln(self.emb(ids)), self.emb.weight)


def _assert_no_mode_left() -> None:
    """Nothing left intercepting torch calls (engines of earlier tests that died mid-batch leave
    inert loss tapes, which the next engine call takes off the stack)."""
    from dpclip._loss_tape import remove_orphans

    gc.collect()
    remove_orphans()
    assert torch._C._len_torch_function_stack() == 0


def test_a_parameter_used_outside_its_layers_in_forward_is_refused_and_changes_nothing():
    """That use would get no gradient (managed parameters do not require grad while attached):
    a tied head's share of the embedding's gradient would be dropped silently."""
    model = _FunctionallyTied()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=50, batch_size=2, steps=1, noise_multiplier=1.0
    )
    ids = torch.tensor([[1, 2, 3], [4, 5, 1]])
    before = _snapshot(model)
    message = (
        r"parameter 'emb.weight' was used by linear outside the forward of the layer that owns "
        r"it \(Embedding\).*head.weight = embedding.weight"
    )
    with pytest.raises(dpclip.ParameterUseError, match=message):
        model(ids)
    _assert_no_mode_left()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    _assert_unchanged(model, before)
    engine.detach()
    model(ids).sum().backward()  # detached: ordinary training, the functional use is fine
    assert model.emb.weight.grad is not None


class _TiedToUnruled(nn.Module):
    """An autoencoder tying a Conv2d's weight to a ConvTranspose2d (no rule: the fallback)."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = nn.Conv2d(1, 4, 3), nn.ConvTranspose2d(4, 1, 3)
        self.dec.weight = self.enc.weight
        self.head = nn.Linear(1, 3)

    def forward(self, x):
        return self.head(self.dec(torch.tanh(self.enc(x))).mean((2, 3)))


def test_a_parameter_tied_to_a_layer_without_a_rule_is_refused_naming_both():
    """Tied by assignment, as the usual advice says, but one side has no rule for it: the
    message says so (it told the user to tie by assignment before)."""
    model = _TiedToUnruled()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(model, opt, sample_size=40, batch_size=4, steps=1, noise_multiplier=1.0)
    before = _snapshot(model)
    message = (
        r"'enc.weight' of Conv2d is shared with a ConvTranspose2d, whose forward used it "
        r"\(conv_transpose2d\), but the ConvTranspose2d has no per-sample rule for it"
    )
    with pytest.raises(dpclip.ParameterUseError, match=message):
        model(torch.randn(4, 1, 6, 6))
    _assert_no_mode_left()
    _assert_unchanged(model, before)


class _Positions(nn.Module):
    """Token plus position embeddings; ``batched`` feeds the positions as (B, T), else as (T,)
    broadcast over the batch; ``held`` takes them from a plain tensor attribute (not a buffer)
    made outside the forward, which dpclip cannot tell from data."""

    def __init__(self, batched, unsqueeze=False, held=False):
        super().__init__()
        self.tok, self.pos = nn.Embedding(10, 4).double(), nn.Embedding(4, 4).double()
        self.head, self.batched, self.unsqueeze = nn.Linear(4, 3).double(), batched, unsqueeze
        self.held = torch.arange(4) if held else None

    def forward(self, ids):
        pos = self.held[: ids.shape[1]] if self.held is not None else torch.arange(ids.shape[1])
        pos = self.pos(pos.repeat(ids.shape[0], 1) if self.batched else pos)
        return self.head((self.tok(ids) + (pos[None] if self.unsqueeze else pos)).mean(1))


@pytest.mark.parametrize("unsqueeze", [False, True])
@pytest.mark.parametrize("batch", [4, 3], ids=["T=B", "T!=B"])
def test_positions_without_a_batch_dim_are_clipped_like_the_naive_loop(batch, unsqueeze):
    """nanoGPT's pos(torch.arange(T)), (T, d) broadcast over the batch: made from a constant in
    forward, so its rows are positions even when T equals the batch."""
    torch.manual_seed(0)
    model = _Positions(batched=False, unsqueeze=unsqueeze)
    x, y = torch.randint(10, (batch, 4)), torch.tensor([0, 1, 2, 0])[:batch]
    _assert_one_step_equals_naive_loop(model, x, y)


@pytest.mark.parametrize(
    "unsqueeze, how", [(False, "is broadcast by add"), (True, "gets new leading dims from")]
)
def test_positions_held_outside_the_forward_are_refused_when_their_length_is_the_batch(
    unsqueeze, how
):
    """(T, d) positions from a tensor made outside the forward, of B = T rows: no shape check
    can tell them from samples, and clipping 'per position' would bound nothing."""
    model = _Positions(batched=False, unsqueeze=unsqueeze, held=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(model, opt, sample_size=40, batch_size=4, steps=1, noise_multiplier=1.0)
    before = _snapshot(model)
    message = rf"output of Embedding \(shape \(4, 4\)\) {how} .*torch.arange\(T\).expand_as"
    with pytest.raises(ValueError, match=message):
        model(torch.randint(10, (4, 4)))
    _assert_no_mode_left()
    assert all(p.grad is None for p in model.parameters())
    _assert_unchanged(model, before)


def test_positions_held_outside_the_forward_of_another_length_are_refused_with_the_fix():
    model = _Positions(batched=False, held=True)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(model, opt, sample_size=40, batch_size=3, steps=1, noise_multiplier=1.0)
    before = _snapshot(model)
    message = r"pos \(Embedding\) returned 4 rows .*torch.arange\(T\)\[None\] \(broadcast"
    with pytest.raises(dpclip.IntegrityError, match=message):
        model(torch.randint(10, (3, 4)))
    _assert_no_mode_left()
    _assert_unchanged(model, before)


def test_batched_positions_are_clipped_like_the_naive_loop():
    torch.manual_seed(0)
    model = _Positions(batched=True)
    x, y = torch.randint(10, (4, 4)), torch.tensor([0, 1, 2, 0])
    _assert_one_step_equals_naive_loop(model, x, y)


class _ReadsItsWeight(nn.Module):
    """Reads a managed weight in forward without putting it on a gradient path."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3).double()

    def forward(self, x):
        w = self.lin.weight
        assert w.shape == (3, 4) and w.dtype == torch.float64 and w.dim() == 2
        with torch.no_grad():
            scale = 1 + 0 * w.norm()
        return self.lin(x) * scale * (1 + 0 * w.detach().mean())


def test_reading_a_parameter_without_a_gradient_path_is_allowed_and_clipped_like_the_loop():
    torch.manual_seed(0)
    model = _ReadsItsWeight()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)


def _train(model, opt, steps, x, y):
    for _ in range(steps):
        _loss(model, x, y).backward()
        opt.step()
        opt.zero_grad()


def test_resume_from_state_dict_reports_the_epsilon_and_noise_of_an_uninterrupted_run():
    x, y = engine_models.batch("linear", 4)
    kw = dict(noise_multiplier=1.0, steps=6, seed=3)
    model, opt, engine = _setup(**kw)
    _train(model, opt, 6, x, y)
    uninterrupted = (engine.epsilon(), [p.detach().clone() for p in model.parameters()])

    model, opt, engine = _setup(**kw)
    _train(model, opt, 3, x, y)
    saved = (engine.state_dict(), model.state_dict(), opt.state_dict())
    model, opt, engine = _setup(**{**kw, "seed": 99})
    engine.load_state_dict(saved[0])
    model.load_state_dict(saved[1])
    opt.load_state_dict(saved[2])
    assert engine.steps_taken == 3
    _train(model, opt, 3, x, y)
    assert engine.epsilon() == uninterrupted[0]
    for p, want in zip(model.parameters(), uninterrupted[1], strict=True):
        torch.testing.assert_close(p.detach(), want, rtol=0, atol=0)
    with pytest.raises(dpclip.PrivacyBudgetExceeded):
        _train(model, opt, 1, x, y)


def test_load_state_dict_refuses_a_different_noise_multiplier():
    _, _, engine = _setup(noise_multiplier=1.0)
    _, _, other = _setup(noise_multiplier=2.0)
    with pytest.raises(ValueError, match="saved noise_multiplier=1.0 differs"):
        other.load_state_dict(engine.state_dict())
    with pytest.raises(ValueError, match="not a dpclip PrivacyEngine state_dict"):
        other.load_state_dict({"ledger": {}})


def test_load_state_dict_refuses_another_accountant_and_an_engine_that_has_stepped():
    """Either would change the ε reported for the steps the model has taken, silently."""
    _, _, saved_by = _setup(noise_multiplier=1.0, accountant="gdp")
    _, _, other = _setup(noise_multiplier=1.0)
    with pytest.raises(ValueError, match="accountant='gdp'; this one uses 'pld'"):
        other.load_state_dict(saved_by.state_dict())
    assert other.ledger.accountant == "pld"
    model, opt, stepped = _setup(noise_multiplier=1.0)
    state = stepped.state_dict()  # before any step
    x, y = engine_models.batch("linear", 4)
    _loss(model, x, y).backward()
    opt.step()
    with pytest.raises(ValueError, match="has taken 1 step"):
        stepped.load_state_dict(state)
    assert stepped.steps_taken == 1


def test_the_gdp_accountant_warns_that_its_epsilon_is_no_upper_bound():
    with pytest.warns(UserWarning, match="not an upper bound"):
        _setup(noise_multiplier=1.0, accountant="gdp")


def test_epochs_plan_as_many_steps_as_the_data_loader_yields():
    model, opt, engine = _setup(sample_size=1437, batch_size=256, steps=None, epochs=30)
    dataset = torch.utils.data.TensorDataset(torch.zeros(1437, 5, dtype=torch.float64))
    assert engine.planned_steps == 30 * len(engine.data_loader(dataset)) == 180


def test_target_epsilon_budget_is_never_exceeded_and_the_refused_step_changes_nothing():
    model, opt, engine = _setup(
        noise_multiplier=None, target_epsilon=1.0, target_delta=1e-5, steps=3
    )
    x, y = engine_models.batch("linear", 4)
    with pytest.raises(dpclip.PrivacyBudgetExceeded, match="ε=1"):
        for _ in range(100):
            _loss(model, x, y).backward()
            before = _snapshot(model)
            opt.step()
            opt.zero_grad()
    _assert_unchanged(model, before)
    assert 3 <= engine.steps_taken < 100
    assert engine.epsilon() <= 1.0


def test_secure_noise_cannot_be_seeded_and_is_not_reproducible():
    with pytest.raises(ValueError, match="secure noise cannot be seeded"):
        _setup(noise_multiplier=1.0, seed=0, secure_rng=True)
    updates = []
    for _ in range(2):
        model, opt, _ = _setup(noise_multiplier=1.0, secure_rng=True)
        before = _snapshot(model)
        x, y = engine_models.batch("linear", 4)
        _loss(model, x, y).backward()
        opt.step()
        updates.append(before[0] - model[0].weight.detach())
    assert not torch.equal(updates[0], updates[1])


def test_data_loader_epoch_takes_one_noisy_step_per_logical_batch_including_empty_ones():
    model, opt, engine = _setup(
        sample_size=50,
        batch_size=2,
        steps=None,
        epochs=1,
        noise_multiplier=1.0,
        max_physical_batch_size=1,
    )
    draws = count_draws(engine._noise)
    x, y = engine_models.batch("linear", 50)
    loader = engine.data_loader(
        torch.utils.data.TensorDataset(x, y),
        physical_batch_size=1,
        generator=torch.Generator().manual_seed(0),
    )
    sizes = []
    for logical in loader:
        sizes.append(len(logical))
        for xb, yb in logical:
            _loss(model, xb, yb).backward()
        opt.step()  # an empty logical batch makes a noise-only step
        opt.zero_grad()
    assert 0 in sizes and engine.steps_taken == len(loader) == engine.planned_steps == 25
    assert len(draws) == 25


def test_an_empty_logical_batch_after_a_missing_zero_grad_is_refused():
    """Without zero_grad the last step's noisy gradient is still in .grad: an empty logical
    batch's step would apply it again instead of fresh noise."""
    model, opt, engine = _setup(sample_size=50, batch_size=2, noise_multiplier=1.0)
    x, y = engine_models.batch("linear", 2)
    _loss(model, x, y).backward()
    opt.step()  # no zero_grad after it
    before = _snapshot(model)
    engine._begin_logical_batch(0)  # what engine.data_loader announces for an empty sample
    with pytest.raises(dpclip.LoopOrderError, match="zero_grad"):
        opt.step()
    _assert_unchanged(model, before)
    assert engine.steps_taken == 1
    opt.zero_grad()
    opt.step()  # the noise-only step
    assert engine.steps_taken == 2


def test_data_loader_refuses_a_dataset_of_another_size():
    _, _, engine = _setup()
    with pytest.raises(ValueError, match="built for sample_size=100"):
        engine.data_loader(torch.utils.data.TensorDataset(torch.zeros(7, 5)))


def test_a_recorded_module_returning_a_tuple_is_a_clear_error():
    class Pair(nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    registry = dpclip.layers.default_registry()
    registry.register(Pair, registry.rule_for(nn.Linear(1, 1)))
    model = nn.Sequential(Pair(3, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(
        model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0, registry=registry
    )
    with pytest.raises(TypeError, match="modules that return one tensor; Pair returned tuple"):
        model(torch.randn(2, 3))


@pytest.mark.parametrize(
    "rule, message",
    [
        (_scale_rule(norm_sq=_summed_norm), r"returned shape \(\) from norm_sq for 'w'"),
        (
            _scale_rule(norm_sq=lambda m, i, s, n, st: {"w": torch.ones(s.shape[0], 1)}),
            r"returned shape \(5, 1\) from norm_sq for 'w'; expected .* \(5,\)",
        ),
        (_scale_rule(norm_sq=lambda m, i, s, n, st: {}), "returned NoneType from norm_sq"),
        (
            _scale_rule(
                per_sample=lambda m, i, s, n: {"w": torch.ones(s.shape[0], 2)},
                instantiates=_always,
            ),
            r"returned shape \(5, 2\) from per_sample_grad for 'w'; expected .* \(5, 4\)",
        ),
        (  # the right size in the wrong shape: would be reshaped into a wrong gradient
            _scale_rule(
                per_sample=lambda m, i, s, n: {
                    "w": _scale_per_sample(m, i, s, n)["w"].view(-1, 2, 2)
                },
                instantiates=_always,
            ),
            r"returned shape \(5, 2, 2\) from per_sample_grad for 'w'; expected .* \(5, 4\)",
        ),
        (
            _scale_rule(
                clipped=lambda m, i, s, f: {"w": _scale_clipped(m, i, s, f)["w"].view(2, 2)}
            ),
            r"returned shape \(2, 2\) from clipped_grad for 'w'; expected .* shape \(4,\)",
        ),
        (
            _scale_rule(instantiates=lambda m, i, s, n, st: ["weight"]),
            r"chose \['weight'\] in instantiates, which were not among the names",
        ),
    ],
)
def test_a_user_rule_returning_the_wrong_shape_or_names_is_refused_and_changes_nothing(
    rule, message
):
    registry = dpclip.layers.default_registry()
    registry.register(_Scale, rule)
    model = nn.Sequential(_Scale(4), nn.Linear(4, 3).double())
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(
        model, opt, sample_size=50, batch_size=5, steps=2, noise_multiplier=1.0, registry=registry
    )
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    before = _snapshot(model)
    with pytest.raises(ValueError, match=message):
        _loss(model, x, y).backward()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="without a backward pass"):
        opt.step()
    _assert_unchanged(model, before)


def test_config_objects_configure_the_engine_like_their_keywords():
    privacy = dpclip.PrivacyConfig(sample_size=100, batch_size=8, steps=10, noise_multiplier=1.5,
                                   clip_norm=2.0)  # fmt: skip
    performance = dpclip.PerformanceConfig(norm_strategy="ghost", max_physical_batch_size=4)
    model = engine_models.build("linear")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(model, opt, privacy=privacy, performance=performance)
    assert engine.privacy is privacy and engine.performance is performance
    assert engine.noise_multiplier == 1.5 and engine._noise.std == 3.0
    x, y = engine_models.batch("linear", 8)
    with pytest.raises(dpclip.PhysicalBatchTooLarge):
        F.cross_entropy(model(x), y).backward()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(privacy="eps=3"), "expected privacy= to be a PrivacyConfig, got str"),
        (dict(clip_norm=3.0), r"either privacy=PrivacyConfig\(...\) or its keywords.*clip_norm"),
        (dict(performance=dpclip.PerformanceConfig(), norm_strategy="ghost"), "norm_strategy"),
    ],
)
def test_a_config_object_and_its_keywords_together_are_refused(kwargs, message):
    privacy = dpclip.PrivacyConfig(sample_size=100, batch_size=8, steps=10, noise_multiplier=1.0)
    model = engine_models.build("linear")
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match=message):
        dpclip.PrivacyEngine(model, opt, **{"privacy": privacy, **kwargs})
    assert all(p.requires_grad for p in model.parameters())


def test_a_no_grad_pass_between_the_first_forward_and_its_backward_keeps_the_self_check():
    """A metric on the batch under torch.no_grad() (or inference_mode) adds nothing to the
    gradients: the first step's self-check still sees the loss, and passes."""
    model, opt, engine = _setup()
    x, y = engine_models.batch("linear", 4)
    loss = _loss(model, x, y)
    with torch.no_grad():
        accuracy = (model(x).argmax(dim=1) == y).float().mean()
    with torch.inference_mode():
        model(x)
    loss.backward()
    opt.step()
    assert engine.steps_taken == 1 and 0 <= float(accuracy) <= 1


def test_after_a_nan_first_batch_the_next_batch_is_the_one_checked():
    """The README's recovery (zero_grad, the next batch) works on the very first batch too."""
    model, opt, engine = _setup()
    x, y = engine_models.batch("linear", 4)
    with pytest.raises(dpclip.NonFiniteNormError):
        _loss(model, x * float("nan"), y).backward()
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.step()  # the self-check runs on this batch, not on the NaN one
    assert engine.steps_taken == 1


def test_a_compiled_model_trains_exactly_like_the_eager_one():
    """torch.compile(model) after attaching (dynamo traces the forward; the engine's hooks and
    guards still see every layer call): the same clipped update, bit for bit in float64."""

    def run(compiled: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dpclip.PrivacyEngine(model, opt, sample_size=320, batch_size=32, steps=3,
                             noise_multiplier=1.0, seed=0)  # fmt: skip
        forward = torch.compile(model, backend="aot_eager") if compiled else model
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):  # two physical batches per step: the self-check's first-batch hooks
            x = torch.randn(32, 8, generator=gen, dtype=torch.float64)  # run in the compiled
            y = torch.arange(32) % 3  # forward of a later batch too
            for xs, ys in zip(x.split(20), y.split(20), strict=True):
                nn.functional.cross_entropy(forward(xs), ys).backward()
            opt.step()
            opt.zero_grad()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(compiled=True), run(compiled=False))


def test_a_new_engine_on_a_model_an_earlier_one_trained_warns_unless_it_continues_its_ledger():
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    def engine_step(state=None):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        engine = dpclip.PrivacyEngine(
            model, opt, sample_size=100, batch_size=4, steps=5, noise_multiplier=1.0
        )
        if state is not None:
            engine.load_state_dict(state)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        engine.detach()
        return engine

    first = engine_step()
    with pytest.warns(
        UserWarning, match=r"already trained by 1 earlier PrivacyEngine\(s\) \(1 steps"
    ):
        engine_step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        continued = engine_step(first.state_dict())
    assert not any("already trained" in str(w.message) for w in caught)
    assert continued.steps_taken == 2


def test_deep_copying_an_attached_model_is_refused_with_the_fix():
    import copy

    model = nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1.0
    )
    with pytest.raises(TypeError, match="before creating the engine .* or after engine.detach"):
        copy.deepcopy(model)
    engine.detach()
    assert isinstance(copy.deepcopy(model), nn.Linear)


class _TakesScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.5, 1.5, 4, dtype=torch.float64))

    def forward(self, x, scale):
        return torch.tanh(x * scale)


def test_a_fallback_module_given_its_own_parameter_as_an_argument_is_refused():
    """Its rerun would hold that argument fixed: the parameter's use there gets no gradient."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = _TakesScale(), nn.Linear(4, 3).double()

        def forward(self, x):
            return self.head(self.inner(x, scale=self.inner.a))

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=20, batch_size=2, steps=1, noise_multiplier=0)
    with pytest.raises(dpclip.IntegrityError, match=r"inner \(_TakesScale\) was given one of its"):
        model(torch.randn(2, 4, dtype=torch.float64))


def test_a_forward_pre_hook_that_raised_leaves_its_layer_outside_its_forward():
    """A pre-hook that raises runs before dpclip's own, whose pair runs anyway: the layer must
    not count as inside its forward afterwards (a later use outside it would pass)."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    failing = model[0].register_forward_pre_hook(lambda m, a: 1 / 0)
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=20, batch_size=2, steps=1, noise_multiplier=0)
    x = torch.randn(2, 4, dtype=torch.float64)
    with pytest.raises(ZeroDivisionError):
        model(x)
    failing.remove()
    model(x).sum().backward()  # no refusal inside the layer's own forward
    opt.step()


class _InPlaceOnOutput(nn.Module):
    """A Linear's output on 3-D input changed in place: that output is a view when its input
    needs a gradient, and autograd drops a view's hooks when it is changed in place."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.inp, self.fc, self.head = nn.Linear(3, 3), nn.Linear(3, 4), nn.Linear(4, 3)
        self.how = how

    def forward(self, x):
        h = self.fc(torch.tanh(self.inp(x)))
        if self.how == "add":
            h += 1.0
        elif self.how == "relu_":
            torch.relu_(h)
        elif self.how == "mask":
            h[x[..., 0] > 0] = 0.0  # wav2vec2 zeroes its padding this way
        else:
            h[:, 0] = 0.0
        return self.head(h.mean(dim=1))


@pytest.mark.parametrize("how", ["add", "relu_", "mask", "slice"])
def test_a_layer_output_changed_in_place_keeps_its_gradient_and_equals_the_naive_loop(how):
    torch.manual_seed(0)
    model = _InPlaceOnOutput(how).double()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    _assert_one_step_equals_naive_loop(model, x, y)
