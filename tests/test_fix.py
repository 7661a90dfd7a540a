"""dpclip.fix: the replacements compute what the layers they replace compute, from the same weights."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import dpclip
from dpclip.replacements import DPMultiheadAttention, DPRecurrent


def _inputs(batch_first, *shape):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    return x if batch_first else x.transpose(0, 1)


# a covering set of the options, not their product
MHA = [
    dict(batch_first=True),
    dict(batch_first=False, bias=False),
    dict(batch_first=True, add_bias_kv=True, add_zero_attn=True),
    dict(batch_first=False, kdim=3, vdim=5),
]


@pytest.mark.parametrize("options", MHA)
@pytest.mark.parametrize(
    "call",
    [
        dict(),
        dict(need_weights=False),
        dict(average_attn_weights=False, mask="bool"),
        dict(mask="float", padding=True),
        dict(causal=True),
    ],
)
def test_multihead_attention_replacement_gives_the_same_outputs(options, call):
    torch.manual_seed(0)
    torch_mha = nn.MultiheadAttention(4, 2, **options).double().eval()
    mine = DPMultiheadAttention(torch_mha).eval()
    bf = options["batch_first"]
    q = _inputs(bf, 3, 5, 4)
    k = _inputs(bf, 3, 6, options.get("kdim", 4))
    v = _inputs(bf, 3, 6, options.get("vdim", 4))
    kw = {k2: call[k2] for k2 in ("need_weights", "average_attn_weights") if k2 in call}
    if call.get("mask") == "bool":
        kw["attn_mask"] = torch.rand(5, 6, generator=torch.Generator().manual_seed(1)) > 0.7
        kw["attn_mask"][:, 0] = False  # every query sees a key
    if call.get("mask") == "float":
        kw["attn_mask"] = torch.randn(3 * 2, 5, 6, dtype=torch.float64)
    if call.get("padding"):
        kw["key_padding_mask"] = torch.zeros(3, 6, dtype=torch.float64)  # as the attn_mask
        kw["key_padding_mask"][:, -2:] = float("-inf")
    if call.get("causal"):
        k, v = (t[:, :5] if bf else t[:5] for t in (k, v))  # as many keys as queries
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(5, dtype=torch.float64)
        kw["is_causal"] = True
    want, want_w = torch_mha(q, k, v, **kw)
    got, got_w = mine(q, k, v, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if want_w is None:
        assert got_w is None
    else:
        torch.testing.assert_close(got_w, want_w, rtol=1e-10, atol=1e-12)


RECURRENT = [
    (nn.LSTM, dict(num_layers=2, bidirectional=True, batch_first=True)),
    (nn.LSTM, dict(bias=False, batch_first=False)),
    (nn.GRU, dict(num_layers=2, batch_first=False, bidirectional=True)),
    (nn.GRU, dict(batch_first=True)),
    (nn.RNN, dict(nonlinearity="relu", num_layers=2, batch_first=True)),
    (nn.RNN, dict(bidirectional=True, bias=False)),
]


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("kind, options", RECURRENT)
def test_recurrent_replacement_gives_the_same_outputs_and_final_state(kind, options, with_state):
    torch.manual_seed(0)
    theirs = kind(3, 4, **options).double().eval()
    mine = DPRecurrent(theirs).eval()
    x = _inputs(options.get("batch_first", False), 2, 5, 3)
    args = (x,)
    if with_state:
        layers = options.get("num_layers", 1) * (2 if options.get("bidirectional") else 1)
        h0 = torch.randn(layers, 2, 4, dtype=torch.float64)
        args = (x, (h0, torch.randn_like(h0))) if kind is nn.LSTM else (x, h0)
    want, got = theirs(*args), mine(*args)
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    for g, w in zip(
        got[1] if kind is nn.LSTM else (got[1],),
        want[1] if kind is nn.LSTM else (want[1],),
        strict=True,
    ):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_recurrent_dropout_between_layers_is_applied_in_training_only():
    torch.manual_seed(0)
    mine = DPRecurrent(nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True).double())
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    assert not torch.equal(mine.train()(x)[0], mine(x)[0])
    assert torch.equal(mine.eval()(x)[0], mine(x)[0])


@pytest.mark.parametrize("batch_first", [True, False])
def test_a_fixed_transformer_encoder_layer_gives_the_same_outputs_in_eval_mode(batch_first):
    """torch's eval fast path reads the attention's packed projection, which the replacement
    does not have: it must take the layer's ordinary path, with the same outputs."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=batch_first).eval()
    fixed = dpclip.fix(copy.deepcopy(layer)).eval()
    assert isinstance(fixed.self_attn, DPMultiheadAttention)
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x), layer(x), rtol=1e-5, atol=1e-6)


def test_fix_replaces_in_place_keeps_frozen_weights_frozen_and_the_model_trains():
    model = nn.Sequential(nn.Linear(3, 3), nn.LSTM(3, 4, batch_first=True))
    model[1].weight_hh_l0.requires_grad_(False)
    reference = copy.deepcopy(model)
    dpclip.fix(model)
    assert isinstance(model[1], DPRecurrent)
    assert [p.requires_grad for p in model[1].parameters()] == [True, False, True, True]
    x = torch.randn(2, 5, 3)
    torch.testing.assert_close(model[1](model[0](x))[0], reference[1](reference[0](x))[0])


def test_fix_refuses_what_it_cannot_replace_and_the_replacement_refuses_bad_inputs():
    with pytest.raises(ValueError, match="proj_size"):
        dpclip.fix(nn.Sequential(nn.LSTM(3, 4, proj_size=2)))
    mine = DPRecurrent(nn.GRU(3, 4))
    with pytest.raises(ValueError, match="batched 3-d tensor"):
        mine(torch.randn(5, 3))
    packed = nn.utils.rnn.pack_padded_sequence(torch.randn(5, 2, 3), [5, 3])
    with pytest.raises(ValueError, match="no PackedSequence"):
        mine(packed)
    with pytest.raises(ValueError, match="batched 3-d inputs"):
        DPMultiheadAttention(nn.MultiheadAttention(4, 2))(*[torch.randn(5, 4)] * 3)


def test_fix_after_the_optimizer_exists_says_to_call_it_first():
    model = nn.Sequential(nn.Linear(4, 4), nn.GRU(4, 4, batch_first=True))
    opt = torch.optim.SGD(model.parameters(), lr=1)
    dpclip.fix(model)
    with pytest.raises(ValueError, match="call dpclip.fix before creating the optimizer"):
        dpclip.PrivacyEngine(model, opt, sample_size=10, batch_size=2, steps=1, noise_multiplier=1)
