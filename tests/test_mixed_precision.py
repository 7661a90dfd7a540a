"""Mixed precision: fp16 with a GradScaler and bf16 autocast give the fp32 run's steps.

A loss scale S multiplies every per-example gradient; dpclip must clip the unscaled ones
(automatic clipping's γ and Abadi's R are not scale-invariant), and a step the scaler skips for
overflow must cost nothing. Runs on the CPU (autocast and GradScaler both exist there).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpclip

B, STEPS = 16, 3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 32), nn.LayerNorm(32), nn.Tanh(), nn.Linear(32, 5))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(B, 12, generator=g), torch.randint(0, 5, (B,), generator=g))
            for _ in range(STEPS)]  # fmt: skip


def _scaled_loss(model: nn.Module, scaler, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss-scaled cross entropy of an fp16 autocast forward, for its backward."""
    with torch.autocast("cpu", dtype=torch.float16):
        loss = F.cross_entropy(model(x), y)
    return scaler.scale(loss)


def _step_through(scaler, opt) -> bool:
    """``scaler.step``, ``update`` and ``zero_grad``; whether the scaler skipped the step."""
    scale = scaler.get_scale()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    return scaler.get_scale() < scale


def _train(
    precision: str,
    clipping: str,
    *,
    tell_engine: bool = True,
    init_scale=2.0**14,
    fused=False,
    noise=0.0,
):
    """STEPS steps of Adam on the same batches; returns (parameters, engine, scaler).

    ``fused``: Adam's fused kernel, which GradScaler steps with ``grad_scale`` set instead of
    unscaling the gradients first (the Trainer's default optimizer is fused AdamW)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None)
    scaler = None
    if precision == "fp16":
        scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=100 * B, batch_size=B, steps=10, noise_multiplier=noise, seed=0,
        clipping=clipping, clip_norm=0.05, grad_scaler=scaler if tell_engine else None,
    )  # fmt: skip
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    for x, y in _batches():
        for xs, ys in zip(x.split(B // 2), y.split(B // 2), strict=True):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = F.cross_entropy(model(xs), ys)
            (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()], engine, scaler


@pytest.mark.parametrize("clipping", ["automatic", "abadi"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_steps_equal_the_fp32_steps(precision, clipping):
    expected, _, _ = _train("fp32", clipping)
    got, engine, _ = _train(precision, clipping)
    assert engine.steps_taken == STEPS
    tol = 2e-3 if precision == "fp16" else 2e-2
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e, rtol=tol, atol=tol)


@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_a_fused_optimizer_under_the_scaler_gets_the_noise_at_the_unscaled_size(noise):
    expected, _, _ = _train("fp32", "automatic", fused=True, noise=noise)
    got, engine, _ = _train("fp16", "automatic", fused=True, noise=noise)
    assert engine.steps_taken == STEPS
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=2e-3, atol=2e-3)


def test_a_fused_optimizer_skips_an_overflowing_step_without_a_ledger_entry():
    _, engine, scaler = _train("fp16", "automatic", fused=True, noise=1.0, init_scale=2.0**40)
    assert scaler.get_scale() < 2.0**40  # some steps overflowed and were skipped
    skipped = round(math.log2(2.0**40 / scaler.get_scale()))
    assert engine.steps_taken == STEPS - skipped


def test_a_scaler_the_engine_is_not_told_of_clips_at_the_wrong_scale():
    """The control: the comparison above can fail (Abadi's R acting on S times the gradient)."""
    expected, _, _ = _train("fp32", "abadi")
    got, _, _ = _train("fp16", "abadi", tell_engine=False)
    worst = max((g - e).abs().max().item() for g, e in zip(got, expected, strict=True))
    assert worst > 1e-2


def test_an_overflowing_step_is_skipped_without_noise_ledger_entry_or_error():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # overflows fp16 at first
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=100 * B, batch_size=B, steps=40, noise_multiplier=1.0, seed=0,
        grad_scaler=scaler,
    )  # fmt: skip
    noise_state = engine.state_dict()["noise"]
    before = [p.detach().clone() for p in model.parameters()]
    skipped = 0
    for x, y in _batches() * 10:
        _scaled_loss(model, scaler, x, y).backward()
        if _step_through(scaler, opt):  # this step was skipped
            skipped += 1
            if engine.steps_taken == 0:
                assert all(
                    torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True)
                )
                assert engine.state_dict()["noise"] == noise_state  # no noise drawn
    assert skipped >= 1 and engine.steps_taken == 30 - skipped > 0
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_stepping_past_the_scaler_after_an_overflow_is_refused():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=100 * B, batch_size=B, steps=4, noise_multiplier=1.0,
        grad_scaler=scaler,
    )  # fmt: skip
    x, y = _batches()[0]
    _scaled_loss(model, scaler, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(dpclip.NonFiniteNormError, match="scaler.step"):
        opt.step()
    assert (
        all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        and not engine.steps_taken
    )


def test_a_grad_scaler_argument_that_is_not_one_is_refused():
    model = _model()
    with pytest.raises(ValueError, match="expected grad_scaler to be a torch.amp.GradScaler"):
        dpclip.PrivacyEngine(
            model, torch.optim.SGD(model.parameters(), lr=0.1), sample_size=100, batch_size=4,
            steps=1, noise_multiplier=1.0, grad_scaler=2.0**16,
        )  # fmt: skip
    assert all(p.requires_grad for p in model.parameters())


class _Scale(nn.Module):
    """No built-in rule: the generic fallback, whose norms come in the parameter's dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


@pytest.mark.parametrize("clipping", ["automatic", "automatic-v", "abadi", "global", "psac"])
def test_a_half_precision_norm_times_the_batch_size_is_clipped_not_lost(clipping):
    """Under a mean loss the engine scales the per-example norms by b: in float16, 512 times a
    finite norm overflows. The factors must still be those of the true norm (example 0's
    gradient of norm 60000·√3 clipped to R = 1, the rest zero), never 0 or an error."""
    torch.manual_seed(0)
    model = nn.Sequential(_Scale()).half()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    dpclip.PrivacyEngine(model, opt, sample_size=10_000, batch_size=512, steps=2,
                         noise_multiplier=0.0, clipping=clipping, clip_norm=1.0,
                         verify=False)  # fmt: skip
    x = torch.zeros(512, 3, dtype=torch.float16)
    x[0] = 60_000.0
    model(x).float().sum(1).mean().backward()
    opt.step()
    clipped = 0.0 if clipping == "global" else 1 / math.sqrt(3)  # global drops it: norm > R
    torch.testing.assert_close(model[0].w.grad.float(), torch.full((3,), clipped / 512),
                               rtol=2e-3, atol=1e-7)  # fmt: skip


def test_an_empty_physical_batch_under_a_mean_loss_adds_nothing():
    """A 0-row forward and backward (the mean's scale b is 0 there) clips nothing and fails on
    nothing; the step then adds only the noise."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dpclip.PrivacyEngine(model, opt, sample_size=1000, batch_size=B, steps=2,
                         noise_multiplier=0.0, verify=False)  # fmt: skip
    x, y = _batches()[0]
    F.cross_entropy(model(x[:0]), y[:0]).backward()  # the mean of nothing: NaN, over 0 rows
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    opt.step()


class _SeqConv(nn.Module):
    """A Conv1d over the sequence, then Linear layers over (batch, positions, width): the
    convolution's, the Grams' and the clipped sums' matmuls all run in dpclip's book-keeping."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(6, 24, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(24, 48), nn.Linear(48, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x)).transpose(1, 2)  # (b, T, 24)
        return self.fc2(torch.tanh(self.fc1(h))).mean(dim=1)


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_a_backward_inside_the_autocast_region_clips_as_one_outside_it(strategy):
    """Autograd's own backward keeps the forward's dtypes under autocast; dpclip's norms and
    clipped sums must too, not run their matmuls in bf16 (a norm computed short lets an example
    past the clipping bound). Same gradients, bit for bit, with autocast on again afterwards."""
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(B, 6, 10, generator=g), torch.randint(0, 5, (B,), generator=g)

    def grads(inside: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = _SeqConv()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        dpclip.PrivacyEngine(model, opt, sample_size=100 * B, batch_size=B, steps=2,
                             noise_multiplier=0.0, norm_strategy=strategy)  # fmt: skip
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
            if inside:
                loss.backward()
                assert torch.is_autocast_enabled("cpu")
        if not inside:
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for got, want in zip(grads(inside=True), grads(inside=False), strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("unscale_first", [False, True])
def test_stepping_the_optimizer_past_the_scaler_is_refused_unless_it_unscaled(unscale_first):
    """``optimizer.step()`` on loss-scaled sums would add noise S times too small for the ledger
    (Adam hides the scale): refused, nothing changed, until the scaler has unscaled them."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu")
    engine = dpclip.PrivacyEngine(model, opt, sample_size=100 * B, batch_size=B, steps=10,
                                  noise_multiplier=1.0, seed=0, grad_scaler=scaler)  # fmt: skip
    x, y = _batches()[0]
    _scaled_loss(model, scaler, x, y).backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.clone() for p in model.parameters()]
    if unscale_first:
        scaler.unscale_(opt)
        opt.step()  # the user's own step on unscaled sums: fine
        assert engine.steps_taken == 1
        return
    with pytest.raises(dpclip.LoopOrderError, match=r"scaler.step\(optimizer\)"):
        opt.step()
    assert engine.steps_taken == 0
    for p, b, g in zip(model.parameters(), before, grads, strict=True):
        assert torch.equal(p.detach(), b) and torch.equal(p.grad, g)
    scaler.step(opt)  # the right way still works after the refusal
    scaler.update()
    assert engine.steps_taken == 1


def test_a_skipped_step_whose_optimizer_raised_leaves_no_skip_behind():
    """A fused step told to skip (overflow) that then raised inside the optimizer must not make
    the next, noisy step go unrecorded."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(model, opt, sample_size=100 * B, batch_size=B, steps=10,
                                  noise_multiplier=1.0, seed=0,
                                  grad_scaler=torch.amp.GradScaler("cpu"))  # fmt: skip
    failures = [RuntimeError("transient")]

    def flaky(optimizer, args, kwargs):  # runs after dpclip's pre-step hook
        if failures:
            raise failures.pop()

    opt.register_step_pre_hook(flaky)
    x, y = _batches()[0]
    F.cross_entropy(model(x), y).backward()
    opt.found_inf = torch.tensor(1.0)  # as GradScaler.step sets it for a fused optimizer
    with pytest.raises(RuntimeError, match="transient"):
        opt.step()
    del opt.found_inf
    opt.zero_grad()
    before = model[0].weight.detach().clone()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model[0].weight, before) and engine.steps_taken == 1


@pytest.mark.parametrize("fused", [False, True])
def test_an_empty_logical_batch_under_the_scaler_is_a_noise_only_step(fused):
    """Poisson sampling gives empty logical batches: their step is the noise alone, under a
    scaler too (GradScaler's own check fails with no gradient to check), also right after a
    step the scaler skipped for overflow (its backward's NaN sums were zeroed since)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # the first steps overflow
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(40, 12, generator=g),
                                          torch.randint(0, 5, (40,), generator=g))  # fmt: skip
    engine = dpclip.PrivacyEngine(model, opt, sample_size=40, batch_size=1, steps=40,
                                  noise_multiplier=1.0, seed=0, grad_scaler=scaler)  # fmt: skip
    empty_after_skip = taken = 0
    skipped = False
    for logical in engine.data_loader(data, generator=torch.Generator().manual_seed(1)):
        before = [p.detach().clone() for p in model.parameters()]
        for x, y in logical:
            _scaled_loss(model, scaler, x, y).backward()
        scale = scaler.get_scale()
        skipped_now = _step_through(scaler, opt)
        moved = any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
        if len(logical) == 0:
            assert moved and scaler.get_scale() == scale  # the noise, and no overflow
            empty_after_skip += skipped
        skipped = skipped_now
        taken += not skipped
    assert empty_after_skip >= 1
    assert engine.steps_taken == taken


def test_the_scaler_pickles_and_copies_while_attached():
    """The engine wraps the scaler's inf check while attached; a saved or copied scaler gets
    the scaler's own check back (the engine stays with the one it was given)."""
    import copy
    import io

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    engine = dpclip.PrivacyEngine(model, opt, sample_size=100 * B, batch_size=B, steps=10,
                                  noise_multiplier=1.0, grad_scaler=scaler)  # fmt: skip
    buffer = io.BytesIO()
    torch.save(scaler, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(scaler), torch.load(buffer, weights_only=False)):
        assert other._unscale_grads_.__func__ is torch.amp.GradScaler._unscale_grads_
        assert other._unscale_grads_.__self__ is other
    assert scaler._unscale_grads_.__class__.__name__ == "_SharedCheck"
    engine.detach()
    assert "_unscale_grads_" not in scaler.__dict__


def test_a_refused_fused_step_leaves_the_sums_and_the_optimizer_as_they_were():
    """A step refused under the scaler (here: physical batches of the logical batch still to
    come) must change nothing: a fused optimizer's sums were unscaled before the checks, and
    its grad_scale cleared, which broke every later scaler.step."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    engine = dpclip.PrivacyEngine(model, opt, sample_size=64, batch_size=8, steps=10,
                                  noise_multiplier=1.0, seed=0, grad_scaler=scaler)  # fmt: skip
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 12, generator=g),
                                          torch.randint(0, 5, (64,), generator=g))  # fmt: skip
    loader = engine.data_loader(data, physical_batch_size=2, generator=g)
    logical = next(iter(loader))
    assert len(logical) > 2
    for x, y in logical:
        _scaled_loss(model, scaler, x, y).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        with pytest.raises(dpclip.LoopOrderError, match="physical batch"):
            scaler.step(opt)  # inside the loop over the physical batches
        break
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    assert isinstance(opt.grad_scale, torch.Tensor) and engine.steps_taken == 0
    opt.zero_grad()
    scaler.update()
    for logical in loader:  # the loop done right from the next logical batch
        for x, y in logical:
            _scaled_loss(model, scaler, x, y).backward()
        _step_through(scaler, opt)
        break
    assert engine.steps_taken == 1


@pytest.mark.parametrize("fused", [False, True])
def test_a_backward_after_a_skipped_step_without_zero_grad_is_refused(fused):
    """The skipped step's sums (NaN where it overflowed) stay in .grad until zero_grad: a loop
    that forgets it would have every later step skipped, silently (the scaler's own check)."""
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused or None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**30)  # the first step overflows
    engine = dpclip.PrivacyEngine(model, opt, sample_size=100 * B, batch_size=B, steps=10,
                                  noise_multiplier=1.0, seed=0, grad_scaler=scaler)  # fmt: skip
    (x, y), (x2, y2) = _batches()[:2]
    _scaled_loss(model, scaler, x, y).backward()
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 2.0**30 and engine.steps_taken == 0  # skipped
    loss = _scaled_loss(model, scaler, x2, y2)
    with pytest.raises(dpclip.LoopOrderError, match="zero_grad"):
        loss.backward()
