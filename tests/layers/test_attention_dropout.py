"""Attention dropout (SDPA's dropout_p) inside a module that takes the generic fallback: the
rerun must draw the forward's masks, or each example's gradient comes from another network."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dpclip
from dpclip.layers import fallback
from dpclip.layers._attention_dropout import AttentionByParts, attention_by_parts
from dpclip.layers._fingerprint import Fingerprint
from dpclip.layers.fallback import Call, RngState

B, T, H, E = 4, 5, 2, 3
P = 0.3


def _qkv(heads_kv: int = H) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, E, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, heads_kv, T, E, dtype=torch.float64, generator=g) for _ in range(2))
    return q, k, v


def _padding() -> torch.Tensor:
    keep = torch.ones(B, 1, 1, T, dtype=torch.bool)
    keep[0, ..., 3:] = False
    keep[2, ..., 1:] = False
    return keep


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"attn_mask": "padding"},
        {"attn_mask": "float"},
        {"attn_mask": "nowhere"},  # a query row that attends to nothing: zeros, as torch's math
        {"is_causal": True, "scale": 0.3},
        {"enable_gqa": True},
    ],
    ids=["plain", "padding", "float-mask", "masked-row", "causal-scale", "gqa"],
)
def test_attention_by_parts_is_sdpa_without_dropout(kwargs):
    q, k, v = _qkv(1 if kwargs.get("enable_gqa") else H)
    mask = kwargs.get("attn_mask")
    if mask == "padding":
        kwargs = {**kwargs, "attn_mask": _padding()}
    elif mask == "float":
        kwargs = {**kwargs, "attn_mask": torch.randn(B, H, T, T, dtype=torch.float64)}
    elif mask == "nowhere":
        keep = torch.ones(B, 1, T, T, dtype=torch.bool)
        keep[1, :, 2] = False
        kwargs = {**kwargs, "attn_mask": keep}
    want = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = attention_by_parts(q, k, v, **kwargs)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_the_mode_computes_dropout_by_parts_and_leaves_other_calls_to_the_kernel():
    q, k, v = _qkv()
    mask = _padding()
    state = torch.get_rng_state()
    with AttentionByParts():
        positional = F.scaled_dot_product_attention(q, k, v, mask, 0.5)
        plain = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.set_rng_state(state)
    want = attention_by_parts(q, k, v, mask, 0.5)
    assert torch.equal(positional, want) and not torch.equal(want, plain)
    torch.testing.assert_close(plain, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    with AttentionByParts(), pytest.raises(RuntimeError):  # the kernel's own refusal
        F.scaled_dot_product_attention(q, k, v, mask, 0.5, is_causal=True)


def test_attention_by_parts_scales_before_the_product_so_half_precision_does_not_overflow():
    q = torch.full((1, 1, 2, 64), 48.0, dtype=torch.float16)  # q·k = 147456 > fp16's max
    got = attention_by_parts(q, q, q, dropout_p=0.1)
    assert torch.isfinite(got).all()
    negative = attention_by_parts(*_qkv(), scale=-0.5)
    torch.testing.assert_close(negative, F.scaled_dot_product_attention(*_qkv(), scale=-0.5))


class Attention(nn.Module):
    """Self-attention with its projections as bare parameters, SDPA's dropout between two
    ordinary ones: the whole module takes the fallback."""

    def __init__(self, p: float, causal: bool = False) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.wq, self.wk, self.wv = (
            nn.Parameter(torch.randn(H * E, H * E, dtype=torch.float64, generator=g) / 3)
            for _ in range(3)
        )
        self.p, self.causal = p, causal

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        x = F.dropout(x, self.p, self.training)  # drawn before SDPA's: the order must hold
        q, k, v = ((x @ w).view(b, t, H, E).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        p = self.p if self.training else 0.0
        h = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=p, is_causal=self.causal
        )
        return F.dropout(x + h.transpose(1, 2).reshape(b, t, H * E), p, self.training)


def _oracle(module: nn.Module, x, mask, grads, names):
    """Each example's gradient from one batched forward (its masks), by autograd on its rows."""
    params = [module.get_parameter(n) for n in names]
    with AttentionByParts():
        out = module(x, mask)
    rows = [torch.autograd.grad((out[i] * grads[i]).sum(), params, retain_graph=True)
            for i in range(x.shape[0])]  # fmt: skip
    return {n: torch.stack([r[j] for r in rows]) for j, n in enumerate(names)}


@pytest.mark.parametrize("looped", [False, True], ids=["vmapped", "looped"])
@pytest.mark.parametrize("causal", [False, True], ids=["padding", "causal"])
def test_the_fallback_replays_attention_dropout_exactly(looped, causal):
    torch.manual_seed(0)

    class Looped(Attention):
        pass

    module = (Looped if looped else Attention)(0.5, causal).train()
    if looped:
        fallback._LOOPED.add(Looped)
    x = torch.randn(B, T, H * E, dtype=torch.float64)
    mask = None if causal else _padding()
    grads = torch.randn(B, T, H * E, dtype=torch.float64)
    names = ["wq", "wk", "wv"]
    rng = RngState.capture(x.device)
    want = _oracle(module, x, mask, grads, names)
    with torch.no_grad(), AttentionByParts():
        torch.set_rng_state(rng.cpu)
        expected = module(x, mask)
    expected = (Fingerprint.of(expected),)
    call = Call((x, mask), {}, rng, outputs=(0,), expected=expected, by_parts=True)
    got = fallback.per_sample_grad(module, (call,), (grads,), names)
    for n in names:
        torch.testing.assert_close(got[n], want[n], rtol=1e-10, atol=1e-12)


class _Model(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.attn = Attention(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep = x.abs().sum(dim=-1) > 0  # all-zero tokens are padding
        return self.attn(x, keep[:, None, None, :]).mean(dim=1)


@pytest.mark.parametrize("looped", [False, True], ids=["vmapped", "looped"])
def test_the_clipped_sum_under_attention_dropout_equals_the_per_example_oracle(looped):
    """End to end, noise off: the engine's .grad after backward is Σ_i C_i g_i with each g_i
    taken under the masks the forward drew (automatic clipping, R = 1)."""

    class Looped(Attention):
        pass

    torch.manual_seed(0)
    model = _Model(P).train()
    if looped:
        model.attn = Looped(P).train()
        fallback._LOOPED.add(Looped)
    names = ["attn.wq", "attn.wk", "attn.wv"]
    x = torch.randn(B, T, H * E, dtype=torch.float64)
    x[1, 3:] = 0
    y = torch.randn(B, H * E, dtype=torch.float64)
    state = torch.get_rng_state()
    with AttentionByParts():
        out = model(x)
    per_example = [
        torch.autograd.grad(((out[i] - y[i]) ** 2).sum(), [model.get_parameter(n) for n in names],
                            retain_graph=True)
        for i in range(B)
    ]  # fmt: skip
    want = []
    for j in range(len(names)):
        total = torch.zeros_like(per_example[0][j])
        for g in per_example:
            norm = torch.sqrt(sum(t.square().sum() for t in g))
            total += g[j] / (norm + 0.01)
        want.append(total)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dpclip.PrivacyEngine(
        model, opt, sample_size=100, batch_size=B, steps=1, noise_multiplier=0,
        loss_reduction="sum",
    )  # fmt: skip
    torch.set_rng_state(state)
    ((model(x) - y) ** 2).sum().backward()
    for n, w in zip(names, want, strict=True):
        torch.testing.assert_close(model.get_parameter(n).grad, w, rtol=1e-9, atol=1e-12)
    opt.step()  # the self-check of this batch (dropout off on both sides) passes


def test_a_fallback_forward_that_raises_is_closed():
    """Attention runs by parts only inside a running fallback call: one that raised is closed
    (its hook runs anyway), so SDPA elsewhere keeps its own kernel."""

    class Raises(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.ones(3))

        def forward(self, x):
            if x.sum() > 1e6:
                raise ValueError("boom")
            return x * self.w

    model = nn.Sequential(Raises(), nn.Linear(3, 3))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=0
    )
    with pytest.raises(ValueError, match="boom"):
        model(torch.full((2, 3), 1e7))
    assert not engine._recorder.in_whole_call
    assert model(torch.randn(2, 3)) is not None and not engine._recorder.in_whole_call


def test_t5_trains_in_training_mode_with_dropout_and_a_padding_mask():
    """transformers' T5 (SDPA attention, dropout 0.1): its stacks take the fallback (relative
    attention bias), so its attention dropout was drawn again differently and refused."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=30, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_decoder_layers=1,
        num_heads=2, relative_attention_num_buckets=8, dropout_rate=0.1,
        decoder_start_token_id=0, eos_token_id=1, pad_token_id=0,
    )  # fmt: skip
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(config).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = dpclip.PrivacyEngine(
        model, opt, sample_size=100, batch_size=4, steps=2, noise_multiplier=1.0
    )
    ids = torch.randint(2, 30, (4, 6))
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 4:] = 0
    with warnings.catch_warnings():  # vmapped: its mask code's branches follow the forward's
        warnings.filterwarnings("error", message=".*could not vmap")
        for _ in range(2):
            model(
                input_ids=ids, attention_mask=mask, labels=torch.randint(2, 30, (4, 3))
            ).loss.backward()
            opt.step()
            opt.zero_grad()
    assert engine.steps_taken == 2
