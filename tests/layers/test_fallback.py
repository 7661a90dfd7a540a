"""The generic fallback's per-example gradients against ordinary autograd, one example at a time."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpclip
from dpclip.layers import fallback
from dpclip.layers._attention_dropout import AttentionByParts
from dpclip.layers._fingerprint import Fingerprint
from dpclip.layers.fallback import Call, RngState
from dpclip.validate import assign_rules


class Tokens(nn.Module):
    """Bare parameters in forward, a keyword argument, a tuple output and dropout inside."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 3, dtype=torch.float64))
        self.scale = nn.Parameter(torch.randn(3, dtype=torch.float64))
        self.p = p

    def forward(self, x, *, shift):
        h = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) * self.scale + shift
        h = F.dropout(h, self.p, self.training)
        return h, {"pooled": h.tanh().mean(dim=1)}


def _oracle(module, x, shift, grads, names):
    """Each example's gradient of ⟨outputs, grads⟩ from one batched forward (the same dropout
    masks for every example), by autograd on that example's rows alone."""
    params = [module.get_parameter(n) for n in names]
    out, extra = module(x, shift=shift)
    rows = []
    for i in range(x.shape[0]):
        dot = (out[i] * grads[0][i]).sum() + (extra["pooled"][i] * grads[1][i]).sum()
        rows.append(torch.autograd.grad(dot, params, retain_graph=True))
    return {n: torch.stack([r[k] for r in rows]) for k, n in enumerate(names)}


@pytest.mark.parametrize("looped", [False, True], ids=["vmapped", "looped"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_fallback_equals_autograd_per_example_with_the_same_dropout_masks(p, looped):
    """Looped (a module vmap cannot batch), each example gets its rows of the masks the
    batched forward drew, not masks drawn for it alone."""
    torch.manual_seed(0)

    class Looped(Tokens):  # two dropout calls: drawn per example they would not line up
        def forward(self, x, *, shift):
            return super().forward(F.dropout(x, self.p, self.training), shift=shift)

    module = (Looped if looped else Tokens)(p).train()
    if looped:
        fallback._LOOPED.add(Looped)
    x, shift = torch.randn(4, 2, 3, dtype=torch.float64), torch.randn(4, 1, 3, dtype=torch.float64)
    if looped:  # a zero CLS token and no shift: kept zeros must still pass their gradient on
        with torch.no_grad():
            module.cls.zero_()
        shift = torch.zeros_like(shift)
    grads = (torch.randn(4, 3, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))
    rng = RngState.capture(x.device)
    want = _oracle(module, x, shift, grads, ["cls", "scale"])
    call = Call((x,), {"shift": shift}, rng, outputs=(0, 1))
    got = fallback.per_sample_grad(module, (call,), grads, ["cls", "scale"])
    for n in ("cls", "scale"):
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


class _FlatTokens(nn.Module):
    """Dropout on the batch flattened into tokens (B·T, d), then dropout in place with its
    result ignored (``inplace=True``): the loop over examples must apply each example's rows."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, x):
        h = F.dropout((x * self.w).reshape(-1, x.shape[-1]), 0.5, self.training)
        F.dropout(h, 0.5, self.training, True)
        return h.view(x.shape).tanh()


def test_the_loop_over_examples_applies_flattened_and_in_place_dropout_exactly():
    torch.manual_seed(0)
    module = _FlatTokens().train()
    fallback._LOOPED.add(_FlatTokens)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    grads = torch.randn(4, 5, 3, dtype=torch.float64)
    rng = RngState.capture(x.device)
    out = module(x)
    want = torch.stack([torch.autograd.grad((out[i] * grads[i]).sum(), module.w,
                                            retain_graph=True)[0] for i in range(4)])  # fmt: skip
    call = Call((x,), {}, rng, outputs=(0,), expected=(Fingerprint.of(out),))
    got = fallback.per_sample_grad(module, (call,), (grads,), ["w"])
    torch.testing.assert_close(got["w"], want, rtol=1e-10, atol=1e-12)


class _Branches(nn.Module):
    """Control flow on its mask, as transformers' mask code has: skip an all-ones mask
    (``.all()``, or a sum against numel), add a bias if any position is masked."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))
        self.how = how

    def forward(self, x, mask):
        h = x * self.w
        if self.how == "all" and not mask.all():
            h = h * mask[..., None]
        if self.how == "sum" and not mask.sum() == mask.numel():
            h = h * mask[..., None]
        if self.how == "any" and (mask == 0).any():
            h = h + 1.0
        if self.how == "per-batch" and x.sum() > 0:  # depends on the other examples
            h = h * 2
        return h.tanh()


@pytest.mark.parametrize("how", ["all", "sum", "any"])
def test_branches_on_a_mask_are_vmapped_as_the_forward_took_them(how):
    torch.manual_seed(0)
    module = _Branches(how)
    x, grads = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 5, 3, dtype=torch.float64)
    mask = torch.ones(4, 5, dtype=torch.float64)
    mask[1, 3:] = 0  # one example padded, the others not: per example the answers differ
    out = module(x, mask)
    want = torch.stack([torch.autograd.grad((out[i] * grads[i]).sum(), module.w,
                                            retain_graph=True)[0] for i in range(4)])  # fmt: skip
    answers = {
        "all": (bool(mask.all()),),
        "sum": (bool(mask.sum() == mask.numel()),),
        "any": (bool((mask == 0).any()),),
    }[how]  # fmt: skip  (what the guard notes)
    call = Call((x, mask), {}, None, outputs=(0,), expected=(Fingerprint.of(out),),
                answers=answers)  # fmt: skip
    fallback._LOOPED.discard(_Branches)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*could not vmap")
        got = fallback.per_sample_grad(module, (call,), (grads,), ["w"])
    torch.testing.assert_close(got["w"], want, rtol=1e-10, atol=1e-12)


def test_a_branch_on_the_whole_batch_is_replayed_and_the_self_check_refuses_it():
    """The forward branched on a sum over every example: the vmapped rerun takes the forward's
    branch (as it must, to give the forward's rows), so the forward mixes examples, which the
    self-check of the first batch refuses; a loop over the examples inside the module (more
    branches in the forward than in one example's rerun) is not vmapped."""

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner, self.head = _Branches("per-batch"), nn.Linear(3, 2).double()

        def forward(self, x):
            return self.head(self.inner(x, torch.ones(x.shape[:2], dtype=x.dtype)).mean(1))

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=0)
    x = torch.tensor([[[2.0, 2.0, 2.0]], [[-1.0, -1.0, -1.0]]], dtype=torch.float64)
    F.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    with pytest.raises(dpclip.SelfCheckError):
        opt.step()


class _PerExample(nn.Module):
    """A loop over the examples inside the module, each with its own branch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, x):
        rows = [x[i] * self.w if x[i].sum() > 0 else x[i] for i in range(x.shape[0])]
        return torch.stack(rows).tanh()


def test_a_loop_over_examples_with_its_own_branches_is_computed_exactly():
    torch.manual_seed(0)
    module = _PerExample()
    x, grads = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    x[1] = -x[1].abs()
    x[2] = x[2].abs()
    out = module(x)
    want = torch.stack([torch.autograd.grad((out[i] * grads[i]).sum(), module.w,
                                            retain_graph=True)[0] for i in range(4)])  # fmt: skip
    answers = tuple(bool(x[i].sum() > 0) for i in range(4))  # what the guard notes
    call = Call((x,), {}, None, outputs=(0,), expected=(Fingerprint.of(out),), answers=answers)
    fallback._LOOPED.discard(_PerExample)
    with pytest.warns(UserWarning, match="less often than its forward"):
        got = fallback.per_sample_grad(module, (call,), (grads,), ["w"])
    torch.testing.assert_close(got["w"], want, rtol=1e-10, atol=1e-12)
    fallback._LOOPED.discard(_PerExample)


class NotVmappable(nn.Module):
    """Reads a Python number from its input (``.item()``): vmap cannot batch it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return x * self.w * (2.0 if x.sum().item() > 0 else 1.0)


def test_a_module_vmap_cannot_batch_is_computed_in_a_loop_with_a_warning_and_is_exact():
    torch.manual_seed(0)
    module = NotVmappable()
    x, g = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    want = torch.stack(
        [torch.autograd.grad((module(x[i : i + 1]) * g[i]).sum(), module.w)[0] for i in range(5)]
    )
    fallback._LOOPED.discard(NotVmappable)
    with pytest.warns(UserWarning, match="could not vmap NotVmappable.*loop over examples"):
        got = fallback.per_sample_grad(module, (Call((x,), {}, None, (0,)),), (g,), ["w"])
    torch.testing.assert_close(got["w"], want, rtol=1e-12, atol=1e-14)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per type, then looped silently
        fallback.per_sample_grad(module, (Call((x,), {}, None, (0,)),), (g,), ["w"])


class _Table(nn.Module):
    def __init__(self, both: bool) -> None:
        super().__init__()
        self.t = nn.Parameter(torch.randn(5, 3))
        self.both = both

    def forward(self, x):
        if not self.both:
            return self.t * 2  # no batch dim
        return x + self.t[:1], self.t * 2  # the second has no batch dim


def test_a_whole_call_output_without_the_batch_is_refused_once_a_gradient_reaches_it():
    """Unused (Swin's attention weights, windows on dim 0) it is fine; used, refused."""
    model = nn.Sequential(nn.Linear(3, 3), _Table(both=True))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1)
    out, table = model(torch.randn(2, 3))
    out.sum().backward()  # the batch-less output unused
    opt.zero_grad()
    out, table = model(torch.randn(2, 3))
    with pytest.raises(
        dpclip.IntegrityError, match=r"1 \(_Table\) returned a tensor of shape \(5, 3\)"
    ):
        (out.sum() + table.sum()).backward()


def test_a_whole_call_with_no_output_with_the_batch_is_refused_at_forward():
    model = nn.Sequential(nn.Linear(3, 3), _Table(both=False))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1)
    with pytest.raises(
        dpclip.IntegrityError, match=r"1 \(_Table\) returned a tensor of shape \(5, 3\)"
    ):
        model(torch.randn(2, 3))


def test_a_parameter_held_by_a_module_and_its_child_goes_to_the_outer_fallback_only():
    class Inner(nn.Module):
        def __init__(self, p):
            super().__init__()
            self.p = p

        def forward(self, x):
            return x * self.p

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.p = nn.Parameter(torch.ones(3))
            self.inner = Inner(self.p)

        def forward(self, x):
            return self.inner(x) + self.p

    model = Outer()
    assigned = assign_rules(model, dpclip.layers.default_registry())
    assert assigned.fallback == ("<model>",) and assigned.names[model] == ("p",)


def test_a_scope_lifts_the_submodules_its_patterns_match_and_they_are_not_recorded():
    registry = dpclip.layers.default_registry()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))] * 1)
            self.keep = nn.Linear(2, 2)

        def forward(self, x):
            return self.keep(self.layers[0](x))

    registry.register_scope(f"{Block.__module__}.{Block.__qualname__}", ("layers.*.0",))
    with pytest.raises(ValueError, match="already registered"):
        registry.register_scope(f"{Block.__module__}.{Block.__qualname__}", ("*",))
    model = nn.Sequential(Block())
    assigned = assign_rules(model, registry)
    block = model[0]
    assert assigned.names[block] == ("layers.0.0.weight", "layers.0.0.bias")
    assert block.layers[0][0] not in assigned.rules  # lifted: not recorded on its own
    assert block.layers[0][1] in assigned.rules and block.keep in assigned.rules


@pytest.mark.parametrize(
    "module, fix",
    [
        (nn.BatchNorm1d(3), "GroupNorm"),
        (nn.LSTM(3, 3), "same weights"),
        (nn.GRU(3, 3), "dpclip.fix"),
    ],
)
def test_layers_the_fallback_must_not_take_are_refused_with_the_fix(module, fix):
    model = nn.Sequential(nn.Linear(3, 3), module)
    problems = dpclip.find_unsupported(model)
    assert [p.path for p in problems] == ["1"] and fix in problems[0].advice


class _Stateful(nn.Module):
    """Its output depends on how often it was called: a rerun cannot reproduce it."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * self.w * self.calls


class _SharedTable(nn.Module):
    """Takes a table with as many rows as the batch that is not per example (summed); made
    from the batch (x · 0 + ...), so dpclip cannot know it is not (one made from constants only
    is not split: see test_a_table_of_constants_with_the_batchs_rows_is_not_split)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3, dtype=torch.float64))

    def forward(self, x, table):
        return x * self.w + table.sum(dim=0)


class _Uses(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.head = inner, nn.Linear(3, 3).double()

    def forward(self, x):
        extra = (x.detach() * 0 + torch.arange(x.shape[0] * 3, dtype=x.dtype).view(-1, 3),)
        args = (x, *extra) if isinstance(self.inner, _SharedTable) else (x,)
        return self.head(torch.tanh(self.inner(*args)))


class _InPlaceAfter(_Uses):
    """Changes the fallback module's output in place after the call (a residual ``h += x``):
    the rerun must still be checked against what the call returned."""

    def forward(self, x):
        extra = (x.detach() * 0 + torch.arange(x.shape[0] * 3, dtype=x.dtype).view(-1, 3),)
        args = (x, *extra) if isinstance(self.inner, _SharedTable) else (x,)
        h = self.inner(*args)
        h += x
        return self.head(torch.tanh(h))


@pytest.mark.parametrize("in_place", [False, True], ids=["as-is", "changed-in-place-after"])
@pytest.mark.parametrize("inner", [_Stateful, _SharedTable])
def test_a_rerun_that_does_not_reproduce_the_forward_is_refused(inner, in_place):
    model = (_InPlaceAfter if in_place else _Uses)(inner())
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=4, steps=1, noise_multiplier=0)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(dpclip.IntegrityError, match="ran each example of .* alone and got output"):
        F.cross_entropy(model(x), y).backward()


def test_a_table_of_constants_with_the_batchs_rows_is_not_split():
    """A (4, 3) table made in the forward from torch.arange, in a batch of 4: every example's
    rerun gets all of it, as the forward did (it was split per row, and the rerun check refused
    the step)."""
    from tests.oracle import clipped_sum, per_sample_grads

    class Constants(_Uses):
        def forward(self, x):
            table = torch.arange(12, dtype=x.dtype).view(4, 3)
            return self.head(torch.tanh(self.inner(x, table)))

    torch.manual_seed(0)
    model = Constants(_SharedTable())
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    want = clipped_sum(per_sample_grads(model, x, y), [[0, 1, 2]], clipping="automatic",
                       clip_norm=1.0, gamma=0.01)  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=4, steps=1, noise_multiplier=0)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for p, old, w in zip(model.parameters(), before, want, strict=True):
        torch.testing.assert_close(old - p.detach(), w / 4, rtol=1e-6, atol=1e-12)


def test_the_rerun_check_sees_small_and_moved_differences_and_not_rounding():
    """The fingerprint (per token: its norm and two projections, long tokens' chunks weighted)
    catches one element changed, two tokens swapped, two elements a chunk apart swapped, a
    wrong row beside a huge one and a NaN; float32 rounding and NaN kept in place pass."""
    torch.manual_seed(0)
    x = torch.randn(3, 6, 5000)
    want = Fingerprint.of(x)
    assert want.difference(x.clone()) == 0.0
    assert want.difference(x * (1 + 1e-7 * torch.randn_like(x))) < 1e-5
    changed = x.clone()
    changed[1, 2, 4500] += 0.05 * float(x[1, 2].norm())
    assert want.difference(changed) > 1e-2
    swapped = x.clone()
    swapped[2, [1, 4]] = x[2, [4, 1]]
    assert want.difference(swapped) > 1e-2
    moved = x.clone()
    moved[0, 0, [10, 10 + 4096]] = x[0, 0, [10 + 4096, 10]]
    assert want.difference(moved) > 1e-4
    huge = x.clone()
    huge[0] *= 1e4
    wrong = huge.clone()
    wrong[2] = torch.randn(6, 5000)
    assert Fingerprint.of(huge).difference(wrong) > 1e-2
    nan = x.clone()
    nan[1, 3, 7] = float("nan")
    assert want.difference(nan) == float("inf")
    assert Fingerprint.of(nan).difference(nan.clone()) == 0.0
    assert want.difference(x[:, :, :4999]) == float("inf")


def test_the_fingerprint_is_taken_in_float32_outside_half_precision_autocast():
    x = torch.full((2, 512, 768), 200.0)  # projections past fp16's range
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = Fingerprint.of(x)
    assert want.tokens.dtype == torch.float32 and torch.isfinite(want.tokens).all()
    wrong = x.clone()
    wrong[1, 3] = 0.0
    assert want.difference(wrong) > 0.5


class _DropoutTokens(nn.Module):
    """A fallback module with dropout inside, in training mode."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3, dtype=torch.float64))

    def forward(self, x):
        return F.dropout(x * self.scale, 0.5, self.training)


def test_dropout_inside_a_fallback_module_passes_the_self_check_and_in_place_use_is_allowed():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop, self.head = _DropoutTokens(), nn.Linear(3, 3).double()

        def forward(self, x):
            h = self.drop(x)
            h += 1.0  # in place on the fallback module's output
            return self.head(torch.tanh(h))

    torch.manual_seed(0)
    model = Model().train()
    opt = torch.optim.SGD(model.parameters(), lr=1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=10, batch_size=4, steps=2, noise_multiplier=0
    )  # the self-check runs at the first step, with dropout off on both sides
    for _ in range(2):
        x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
    assert engine.steps_taken == 2


def test_a_fallback_module_under_bf16_autocast_is_rerun_under_autocast_too():
    """Backward runs outside the forward's autocast region: the rerun enters it again, or its
    rows would differ at bf16 precision and the step be refused."""
    from tests import engine_models

    torch.manual_seed(0)
    model = engine_models.CASES["vit_tiny"].build()  # float32; its embeddings take the fallback
    x, y = engine_models.batch("vit_tiny", 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=100, batch_size=4, steps=1, noise_multiplier=0.5
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x.float()), y)
    loss.backward()
    opt.step()
    assert engine.steps_taken == 1 and all(torch.isfinite(p).all() for p in model.parameters())


def test_a_module_that_cannot_run_one_example_at_a_time_is_refused_in_dpclip_words():
    class Masked(nn.Module):
        """Takes a (T, T) mask; with T equal to the batch it looks per-example, and is not."""

        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(4, dtype=torch.float64))

        def forward(self, x, mask):
            return (mask @ x) * self.w

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.head = Masked(), nn.Linear(4, 3).double()

        def forward(self, x):
            mask = torch.ones(x.shape[1], x.shape[1], dtype=x.dtype).tril()
            return self.head(self.inner(x, mask).mean(dim=1))

    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=4, steps=1, noise_multiplier=0)
    x, y = torch.randn(4, 4, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0])  # T == B
    fallback._LOOPED.discard(Masked)
    with pytest.warns(UserWarning, match="could not vmap"):
        with pytest.raises(dpclip.IntegrityError, match="could not run Masked on one example"):
            F.cross_entropy(model(x), y).backward()


class _DropConnect(nn.Module):
    """Dropout on its weight (a tensor without the batch): one mask for all examples."""

    def __init__(self, by: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 3, dtype=torch.float64))
        self.by = by

    def forward(self, x):
        if self.by == "dropout":
            return x @ F.dropout(self.w, 0.5, self.training)
        if self.by == "bernoulli":
            return x @ (self.w * torch.bernoulli(torch.full_like(self.w, 0.5)))
        table = self.w[None, None]  # attention over a batch-less table
        return x @ F.scaled_dot_product_attention(table, table, table, dropout_p=0.5)[0, 0]


@pytest.mark.parametrize("by", ["dropout", "attention"])
def test_dropout_on_a_tensor_without_the_batch_gives_each_example_the_forwards_one_mask(by):
    """vmap would draw a mask per example: the loop over examples takes over, with a warning,
    and applies the one mask the forward drew to each."""
    torch.manual_seed(0)
    module = _DropConnect(by).train()
    fallback._LOOPED.discard(_DropConnect)
    x, grads = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    rng = RngState.capture(x.device)
    with AttentionByParts():
        out = module(x)
    want = torch.stack(
        [torch.autograd.grad((out[i] * grads[i]).sum(), module.w, retain_graph=True)[0]
         for i in range(4)]
    )  # fmt: skip
    call = Call((x,), {}, rng, outputs=(0,), expected=(Fingerprint.of(out),),
                by_parts=by == "attention")  # fmt: skip
    with pytest.warns(UserWarning, match="draws one mask for all examples"):
        got = fallback.per_sample_grad(module, (call,), (grads,), ["w"])
    torch.testing.assert_close(got["w"], want, rtol=1e-10, atol=1e-12)
    fallback._LOOPED.discard(_DropConnect)


def test_other_random_calls_on_a_tensor_without_the_batch_are_refused():
    model = _Uses(_DropConnect("bernoulli")).train()
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.PrivacyEngine(
        model, opt, sample_size=10, batch_size=4, steps=1, noise_multiplier=0, verify=False
    )
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    with pytest.raises(dpclip.IntegrityError, match="applies bernoulli to a tensor without"):
        F.cross_entropy(model(x), y).backward()
