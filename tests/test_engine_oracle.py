"""One step of the engine (noise 0, SGD lr=1) equals -(1/B) Σ C_i g_i from the naive loop."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import dpclip
from dpclip.layers._common import OuterFactors
from tests import engine_models
from tests.oracle import CLIPPING, clipped_sum, per_sample_grads

STYLES = ["all-layer", "layer-wise", "param-wise", "custom"]
B = 8  # expected logical batch size; the update is divided by it


def _groups(model: torch.nn.Module, style: str) -> tuple[object, list[list[int]]]:
    """The engine's clipping_style argument and the same groups as parameter positions."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if style == "all-layer":
        return style, [list(range(len(named)))]
    if style == "param-wise":
        return style, [[k] for k in range(len(named))]
    if style == "layer-wise":
        owner = {n: n.rsplit(".", 1)[0] if "." in n else "" for n, _ in named}
        by_owner: dict[str, list[int]] = {}
        for k, (n, _) in enumerate(named):
            by_owner.setdefault(owner[n], []).append(k)
        return style, list(by_owner.values())
    half = max(1, len(named) // 2)
    positions = [list(range(half)), list(range(half, len(named)))]
    positions = [g for g in positions if g]
    return [[named[k][0] for k in g] for g in positions], positions


def run_one_step(
    name: str, clipping: str, style: str, reduction: str, batch: int = 4, device: str = "cpu", **kw
):
    """The engine's update on ``device`` against the naive loop's, computed on the CPU."""
    model = engine_models.build(name)
    x, y = engine_models.batch(name, batch)
    grads = per_sample_grads(copy.deepcopy(model), x, y)
    model, x, y = model.to(device), x.to(device), y.to(device)
    style_arg, positions = _groups(model, style)
    expected = clipped_sum(grads, positions, clipping=clipping, clip_norm=1.0, gamma=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(
        model, optimizer, sample_size=100, batch_size=B, steps=1, noise_multiplier=0.0,
        clipping=clipping, clipping_style=style_arg, loss_reduction=reduction, **kw,
    )  # fmt: skip
    F.cross_entropy(model(x), y, reduction=reduction).backward()
    optimizer.step()
    for p, old, want in zip(trainable, before, expected, strict=True):
        torch.testing.assert_close((old - p.detach()).cpu(), want / B, rtol=1e-6, atol=1e-12)


# A covering design, not the full product (22 models x 5 clippings x 4 styles x 2 reductions):
# every model once with the defaults, and every clipping x style x reduction on one model of each
# kind of bookkeeping (dense layers over positions; a tied weight's cross terms; convolution and a
# norm layer's per-sample gradients).
COVERING_MODELS = ["linear_3d_input", "tied_embedding_head", "groupnorm"]


@pytest.mark.parametrize("name", sorted(engine_models.CASES))
def test_update_equals_naive_loop_with_the_defaults(name):
    run_one_step(name, "automatic", "all-layer", "mean")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("clipping", sorted(CLIPPING))
@pytest.mark.parametrize("name", COVERING_MODELS)
def test_update_equals_naive_loop_for_every_clipping_style_and_reduction(
    name, clipping, style, reduction
):
    run_one_step(name, clipping, style, reduction)


@pytest.mark.parametrize("clipping", sorted(CLIPPING))
@pytest.mark.parametrize(
    "name", ["gpt2_tiny", "llama_tiny", "conv3d", "embedding_twice", "position_table_reused"]
)
def test_update_equals_naive_loop_for_every_clipping_on_more_models(name, clipping):
    run_one_step(name, clipping, "layer-wise", "sum")


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
@pytest.mark.parametrize("name", ["linear_3d_input", "conv2d_dilated_grouped", "gpt2_tiny"])
def test_update_equals_naive_loop_for_each_norm_strategy(name, strategy):
    run_one_step(name, "automatic", "all-layer", "mean", norm_strategy=strategy)


@pytest.mark.parametrize(
    "name", ["t5_tiny", "mt5_tiny", "opt_tiny", "opt_post_ln_tiny", "longformer_mlm_tiny"]
)
def test_models_equal_naive_loop_when_the_length_is_the_batch(name):
    """Where no shape tells the batch from the length (ids cut to B positions): T5 fills its
    (T, T) bucket table with full_like and zeros_like, still constants, so the bias has no
    batch dim; OPT flattens the batch into tokens and Longformer runs its projections
    sequence-first, both followed from the batch-first tensor (with verify=False: no
    self-check to catch a wrong layout)."""
    model, b = engine_models.build(name), 4
    x, y = engine_models.batch(name, b)
    x = x[:, :b]
    expected = clipped_sum(per_sample_grads(copy.deepcopy(model), x, y), _groups(model, "all-layer")[1],
                           clipping="automatic", clip_norm=1.0, gamma=0.01)  # fmt: skip
    trainable = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(model, optimizer, sample_size=100, batch_size=b, steps=1,
                         noise_multiplier=0.0, verify=False)  # fmt: skip
    F.cross_entropy(model(x), y).backward()
    optimizer.step()
    for p, old, want in zip(trainable, before, expected, strict=True):
        torch.testing.assert_close(old - p.detach(), want / b, rtol=1e-6, atol=1e-12)


def test_update_equals_naive_loop_for_batch_of_one():
    run_one_step("linear", "automatic", "all-layer", "mean", batch=1)


SHARED = [
    "tied_embedding_head",
    "tied_head_other_length",
    "reused_layer",
    "embedding_twice",
    "gpt2_tiny",
]


@pytest.mark.parametrize("strategy", ["ghost", "instantiate", "mixed"])
@pytest.mark.parametrize("name", SHARED)
def test_shared_parameters_equal_naive_loop_for_each_norm_strategy(name, strategy):
    run_one_step(name, "automatic", "layer-wise", "mean", norm_strategy=strategy)


def _registry_with(change) -> dpclip.layers.LayerRegistry:
    """The default registry with the Embedding and Linear rules (the shared weights of SHARED)
    replaced by ``dataclasses.replace(rule, **change(rule))``."""
    registry = dpclip.layers.default_registry()
    for module_type in (torch.nn.Embedding, torch.nn.Linear):
        rule = registry.rule_for(module_type(2, 2))
        registry.register(module_type, dataclasses.replace(rule, **change(rule)), replace=True)
    return registry


@pytest.mark.parametrize("name", SHARED)
def test_shared_parameters_under_ghost_never_build_per_sample_gradients(name):
    """Cross terms come from the uses' outer factors: the Embedding and Linear rules (the
    shared weights here) must never build per-sample weight gradients (a bias's, (b, out), may)."""

    def refusing(rule):
        def refuse(module, inputs, grad_output, names):
            assert "weight" not in names, "per-sample weight gradients were instantiated"
            return rule.per_sample_grad(module, inputs, grad_output, names)

        return {"per_sample_grad": refuse}

    registry = _registry_with(refusing)
    run_one_step(name, "abadi", "all-layer", "sum", norm_strategy="ghost", registry=registry)


@pytest.mark.parametrize("name", SHARED)
def test_shared_parameters_without_in_place_rules_equal_naive_loop(name):
    """A rule with outer factors but no add_clipped_grad (a user's) still gets one share per use,
    summed out of place."""
    registry = _registry_with(lambda rule: {"add_clipped_grad": None})
    run_one_step(name, "automatic", "all-layer", "mean", norm_strategy="ghost", registry=registry)


def _forgetting(rule):
    """add_clipped_grad that computes its share but never writes it: a use of a shared weight
    would be dropped from the gradient (the engine checks the tensors' version counters)."""

    def forgets(module, inputs, grad_output, factors, into):
        rule.clipped_grad(module, inputs, grad_output, factors)

    return {"add_clipped_grad": forgets}


def _cols_missing_a_position(rule):
    """outer_factors whose cols lack the first position: with one position left, the pairwise
    products would broadcast into a wrong cross term without an error."""

    def factors(module, inputs, grad_output, names):
        got = rule.outer_factors(module, inputs, grad_output, names)
        return {n: OuterFactors(f.rows, f.cols[:, 1:]) for n, f in got.items()}

    return {"outer_factors": factors}


@pytest.mark.parametrize(
    "change, message",
    [
        (_forgetting, "without adding in place to"),
        (
            _cols_missing_a_position,
            r"returned rows \(4, \d+(, \d+)?\) and cols \(4, \d+, \d+\) from outer_f",
        ),
    ],
)
@pytest.mark.parametrize("name", ["tied_embedding_head", "reused_layer"])
def test_a_shared_parameter_rule_breaking_its_contract_is_refused(name, change, message):
    registry = _registry_with(change)
    model = engine_models.build(name)
    x, y = engine_models.batch(name, 4)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    dpclip.PrivacyEngine(
        model, optimizer, sample_size=100, batch_size=4, steps=1, noise_multiplier=0.0,
        norm_strategy="ghost", registry=registry,
    )  # fmt: skip
    with pytest.raises(ValueError, match=message):
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="without a backward pass"):
        optimizer.step()
    assert all(torch.equal(p, old) for p, old in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize("name", ["opt_tiny", "opt_post_ln_tiny"])
def test_opts_feed_forward_on_the_batch_flattened_into_tokens_takes_no_fallback(name):
    """OPT runs each layer's second half on (B·T, d): its layers keep their own rules (the
    naive loop's update: test_update_equals_naive_loop_with_the_defaults). Only the learned
    positions (an nn.Embedding whose forward takes offsets) take the fallback."""
    model = engine_models.build(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    engine = dpclip.PrivacyEngine(
        model, optimizer, sample_size=100, batch_size=B, steps=1, noise_multiplier=0.0
    )
    assert engine._plan.fallback == ("model.model.decoder.embed_positions",)
    engine.detach()
