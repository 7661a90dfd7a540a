import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dpclip.layers import default_registry
from tests.layers.oracle import assert_rule_matches_oracle, naive_per_sample_grads

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SIZE = {1: (11,), 2: (7, 6), 3: (5, 4, 6)}


def _case(dim: int, batch: int = 3, in_ch: int = 4, out_ch: int = 6, size=None, seed=0, **kw):
    """A float64 conv, a random input and a random output gradient of the right shape."""
    torch.manual_seed(seed)
    layer = CONV[dim](in_ch, out_ch, **kw).double()
    x = torch.randn(batch, in_ch, *(size or SIZE[dim]), dtype=torch.float64)
    with torch.no_grad():
        s = torch.randn_like(layer(x))
    return layer, (x,), s


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "kw",
    [
        {"kernel_size": 3},
        {"kernel_size": 1, "bias": False},
        {"kernel_size": 2, "stride": 2, "padding": 1},
        {"kernel_size": 3, "dilation": 2, "padding": "same"},
        {"kernel_size": 2, "padding": "same"},  # even kernel: 'same' pads one more at the end
        {"kernel_size": 3, "padding": "valid", "stride": 2, "bias": False},
        {"kernel_size": 3, "groups": 2, "padding": 1},
        {"kernel_size": 3, "padding": 1, "padding_mode": "reflect"},
        {"kernel_size": 2, "padding": "same", "padding_mode": "replicate", "dilation": 2},
        {"kernel_size": 3, "padding": 2, "padding_mode": "circular", "stride": 2},
    ],
)
def test_conv_rule_equals_naive_loop(dim, kw):
    assert_rule_matches_oracle(*_case(dim, **kw))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_rule_equals_naive_loop_depthwise(dim):
    assert_rule_matches_oracle(*_case(dim, in_ch=4, out_ch=8, kernel_size=3, groups=4, padding=1))


def test_conv2d_rule_equals_naive_loop_per_dim_tuples():
    kw = {"kernel_size": (3, 2), "stride": (2, 1), "padding": (1, 0), "dilation": (1, 2)}
    assert_rule_matches_oracle(*_case(2, size=(9, 8), groups=2, **kw))


def test_conv2d_rule_equals_naive_loop_channels_last_input():
    layer, (x,), s = _case(2, kernel_size=3, padding=1)
    assert_rule_matches_oracle(layer, (x.to(memory_format=torch.channels_last),), s)


def test_conv_rule_frozen_weight_trains_bias_only():
    layer, inputs, s = _case(2, kernel_size=3, groups=2)
    layer.weight.requires_grad_(False)
    assert_rule_matches_oracle(layer, inputs, s)


@settings(max_examples=25, deadline=None)
@given(
    dim=st.sampled_from([1, 2, 3]),
    kernel=st.integers(1, 4),
    stride=st.integers(1, 3),
    dilation=st.integers(1, 3),
    padding=st.integers(0, 2),
    extra=st.integers(0, 3),
    groups=st.sampled_from([1, 3]),
    bias=st.booleans(),
)
def test_conv_rule_equals_naive_loop_odd_shapes(
    dim, kernel, stride, dilation, padding, extra, groups, bias
):
    # extra = 0 makes the output length 1 along every dim; batch 1 is the edge case.
    span = dilation * (kernel - 1) + 1
    length = max(span - 2 * padding, 1) + extra
    assert_rule_matches_oracle(
        *_case(
            dim,
            batch=1,
            in_ch=3,
            out_ch=3,
            size=(length,) * dim,
            kernel_size=kernel,
            stride=stride,
            dilation=dilation,
            padding=padding,
            groups=groups,
            bias=bias,
        )
    )


def _rule():
    return default_registry().rule_for(nn.Conv2d(1, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_rule_low_precision_inputs_computed_in_float32(dtype):
    reference, (x,), s = _case(2, kernel_size=3, groups=2, padding=1)
    layer = copy.deepcopy(reference).to(dtype)
    x_low, s_low = x.to(dtype), s.to(dtype)
    reference.weight.data = layer.weight.data.double()
    # float64 on the same rounded values, so only float32 accumulation error remains.
    want = _rule().norm_sq(reference, (x_low.double(),), s_low.double(), ["weight"], "ghost")
    for strategy in ("ghost", "instantiate"):
        got = _rule().norm_sq(layer, (x_low,), s_low, ["weight", "bias"], strategy)
        assert got["weight"].dtype == torch.float32 and got["bias"].dtype == torch.float32
        torch.testing.assert_close(got["weight"].double(), want["weight"], rtol=1e-4, atol=0)
    factors = {"weight": torch.rand(3), "bias": torch.rand(3)}
    got = _rule().clipped_grad(layer, (x_low,), s_low, factors)["weight"]
    per_sample = _rule().per_sample_grad(layer, (x_low,), s_low, ["weight"])["weight"]
    assert got.dtype == per_sample.dtype == torch.float32
    want = torch.einsum("b,b...->...", factors["weight"], per_sample)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_conv_rule_rejects_channel_counts_other_than_the_layers():
    """Copied into padded buffers, a wrong channel count would broadcast: refused first, on
    every path (stride 1 and one group: shifted; stride 2: unfolded; one input channel)."""
    for layer in (nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3, stride=2), nn.Conv2d(1, 4, 3)):
        c = layer.in_channels
        x, s = torch.randn(2, c, 7, 7), torch.zeros_like(layer(torch.randn(2, c, 7, 7)))
        bad = [(x, s[:, :1]), (torch.randn(2, c + 1, 7, 7), s)]
        for bad_x, bad_s in bad:
            for strategy in ("mixed", "instantiate"):
                with pytest.raises(ValueError, match="channel counts"):
                    _rule().norm_sq(layer, (bad_x,), bad_s, ["weight"], strategy)
            with pytest.raises(ValueError, match="channel counts"):
                _rule().per_sample_grad(layer, (bad_x,), bad_s, ["weight"])


def test_conv_rule_rejects_unbatched_input():
    layer = nn.Conv2d(2, 3, 3)
    x = torch.randn(2, 5, 5)
    s = torch.randn(3, 3, 3)
    with pytest.raises(ValueError, match="Unbatched input is not supported"):
        _rule().norm_sq(layer, (x,), s, ["weight"], "mixed")
    with pytest.raises(ValueError, match="Unbatched input is not supported"):
        _rule().clipped_grad(layer, (x,), s, {"bias": torch.ones(1)})


@pytest.mark.parametrize("kw", [{"kernel_size": 3}, {"kernel_size": 3, "stride": 2}])
def test_conv_rule_rejects_output_gradient_of_wrong_size(kw):
    """Both the shifted path (stride 1) and the unfolded one refuse, before computing."""
    layer, (x,), s = _case(2, **kw)
    for strategy in ("ghost", "instantiate", "mixed"):
        with pytest.raises(ValueError, match="output positions"):
            _rule().norm_sq(layer, (x,), s[..., :-1], ["weight"], strategy)
    with pytest.raises(ValueError, match="output positions"):
        _rule().per_sample_grad(layer, (x,), s[..., :-1], ["weight"])
    one_channel = nn.Conv2d(1, 2, **kw)  # float32: the grouped convolution's path
    x, s = torch.randn(2, 1, 7, 6), torch.randn(2, 2, 5, 4)
    if kw.get("stride") == 2:
        s = s[..., :3, :2]
    _rule().per_sample_grad(one_channel, (x,), s, ["weight"])  # the right size passes
    with pytest.raises(ValueError, match="output positions"):
        _rule().per_sample_grad(one_channel, (x,), s[..., :-1], ["weight"])


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_conv_rule_equals_naive_loop_when_the_batch_is_unfolded_in_chunks(dim, monkeypatch):
    from dpclip.layers import conv

    monkeypatch.setattr(conv, "_CHUNK_ELEMENTS", {"cpu": 50})  # a chunk of one or two samples
    assert_rule_matches_oracle(*_case(dim, batch=5, kernel_size=3, groups=2, stride=2, padding=1))
    # stride 1, one group: the shifted paths, chunked by the same budget (copies counted)
    monkeypatch.setattr(conv, "_CHUNK_ELEMENTS", {"cpu": 600})
    assert_rule_matches_oracle(*_case(dim, batch=5, kernel_size=3, dilation=2, padding=2))


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize(
    "dim, kw",
    [
        (2, {"in_ch": 1, "kernel_size": 8, "stride": 2, "padding": 3, "size": (28, 28)}),
        (
            2,
            {
                "in_ch": 4,
                "out_ch": 8,
                "kernel_size": 3,
                "groups": 4,
                "dilation": 2,
                "padding": "same",
                "padding_mode": "reflect",
            },
        ),
        (1, {"in_ch": 3, "out_ch": 6, "kernel_size": 2, "groups": 3, "stride": 2}),
        (3, {"in_ch": 2, "out_ch": 2, "kernel_size": 2, "groups": 2, "padding": 1}),
    ],
)
def test_float32_one_channel_per_group_kernel_path_equals_float64_oracle(dim, kw):
    """in_channels == groups in float32 takes the grouped weight-gradient kernel, not unfold."""
    kw = dict(kw)
    layer, (x,), s = _case(
        dim, batch=4, **{k: kw.pop(k) for k in ("in_ch", "out_ch", "size") if k in kw}, **kw
    )
    want = _rule().per_sample_grad(layer, (x,), s, ["weight", "bias"])
    low = copy.deepcopy(layer).float()
    got = _rule().per_sample_grad(low, (x.float(),), s.float(), ["weight", "bias"])
    for n in want:
        assert got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), want[n], rtol=1e-4, atol=1e-4)


def test_shape_only_weights_are_kept_outside_tracing_and_never_from_it():
    """The kernel's shape-only weight is made once per shape; one made under a fake-tensor
    mode (tracing) is neither kept nor handed out afterwards."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from dpclip.layers import conv

    shape = torch.Size((3, 2, 5, 5))
    conv._SHAPE_ONLY.pop((tuple(shape), torch.float32, torch.device("cpu")), None)
    with FakeTensorMode():
        traced = conv._shape_only(shape, torch.float32, torch.device("cpu"))
    assert isinstance(traced, FakeTensor)
    real = conv._shape_only(shape, torch.float32, torch.device("cpu"))
    assert not isinstance(real, FakeTensor) and real.shape == shape and real.stride() == (0,) * 4
    assert conv._shape_only(shape, torch.float32, torch.device("cpu")) is real  # kept


def test_scratch_buffers_are_reused_and_nothing_returned_aliases_them(monkeypatch):
    """Without gradients, on a CPU, the padded and the unfolded input are copied into scratch
    buffers kept per thread, key and dtype: what a layer returns stays right after another layer
    reuses them. A copy over the size limit, with gradients on, or while tracing, is a fresh
    tensor and is not kept."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from dpclip.layers import _common

    kept = type(_common._scratch)()  # this test's own buffers
    monkeypatch.setattr(_common, "_scratch", kept)
    unfolded = ("conv.unfolded", torch.float64)
    # groups and stride 2: the unfolded path (stride 1, one group: conv_shifts, tested below)
    first, (x1,), s1 = _case(2, batch=4, kernel_size=3, padding=1, groups=2, seed=1)
    second, (x2,), s2 = _case(2, batch=6, in_ch=5, kernel_size=2, stride=2, seed=2)
    want = naive_per_sample_grads(first, (x1,), s1)["weight"]
    with torch.no_grad():  # as in the backward
        got = _rule().per_sample_grad(first, (x1,), s1, ["weight"])["weight"]
        norms = _rule().norm_sq(first, (x1,), s1, ["weight"], "ghost")["weight"]
        buffer = kept.__dict__[unfolded][0]
        assert ("conv.padded", torch.float64) in kept.__dict__  # padding=1: kept too
        _rule().per_sample_grad(second, (x2,), s2, ["weight"])  # overwrites the buffers
        _rule().norm_sq(second, (x2,), s2, ["weight"], "ghost")
    assert kept.__dict__[unfolded][0] is buffer  # reused
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(norms, want.flatten(1).pow(2).sum(1))

    key, device = "conv.unfolded", x1.device
    assert _common.scratch(key, (4, 4), torch.float64, device).data_ptr() != buffer.data_ptr()
    with torch.no_grad():
        monkeypatch.setattr(_common, "SCRATCH_ELEMENTS", 8)  # over the limit
        assert _common.scratch(key, (2, 9), torch.float64, device).data_ptr() != buffer.data_ptr()
        monkeypatch.setattr(_common, "SCRATCH_ELEMENTS", 1 << 22)
        with FakeTensorMode():
            _common.scratch(key, (4, 4), torch.float32, device)
    assert kept.__dict__[unfolded][0] is buffer and (key, torch.float32) not in kept.__dict__


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(
    "in_ch, out_ch, kw",
    [
        (1, 4, {"kernel_size": 4, "stride": 2, "padding": 1}),  # a first layer on grayscale
        (1, 3, {"kernel_size": 3}),
        (1, 3, {"kernel_size": 2, "stride": 3, "dilation": 2, "padding": 1}),  # tail cut off
        (1, 2, {"kernel_size": 2, "padding": "same", "dilation": 2, "bias": False}),
        (1, 2, {"kernel_size": 3, "padding": 1, "padding_mode": "reflect", "stride": 2}),
        (3, 6, {"kernel_size": 3, "groups": 3, "padding": 1}),  # depthwise: the other kernel
        (2, 2, {"kernel_size": 2, "groups": 2, "stride": 2}),
    ],
)
@pytest.mark.parametrize("batch", [1, 4])
def test_float32_one_channel_per_group_kernels_equal_naive_loop(dim, in_ch, out_ch, kw, batch):
    """float32 on a CPU, one input channel per group: the rule's per-sample gradients come from
    one grouped convolution call (batch as groups), not from the unfolded input; float64 loop
    on the same values as the reference."""
    reference, (x,), s = _case(dim, batch=batch, in_ch=in_ch, out_ch=out_ch, **kw)
    layer = copy.deepcopy(reference).float()
    reference.weight.data = layer.weight.data.double()
    x32, s32 = x.float(), s.float()
    want = naive_per_sample_grads(reference, (x32.double(),), s32.double())
    got = _rule().per_sample_grad(layer, (x32,), s32, list(want))
    assert set(got) == set(want)
    for name, grad in got.items():
        assert grad.dtype == torch.float32 and grad.shape == want[name].shape
        torch.testing.assert_close(grad.double(), want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_stride_one_per_sample_gradients_by_shifts_equal_naive_loop_after_a_larger_layer():
    """Stride 1, one group: per-sample gradients are one matmul per kernel offset over the padded
    input (conv_shifts), with junk positions past the output's edge zeroed in s. Run without
    gradients, as the engine runs its hooks, so the kept scratch buffers are reused: the first
    layer fills the whole buffer with s, the second leaves junk positions that must not carry
    the first layer's values."""
    from dpclip.layers import _conv_shifts as conv_shifts

    first, (x1,), s1 = _case(2, batch=3, in_ch=4, out_ch=6, kernel_size=1, seed=1)
    second, (x2,), s2 = _case(2, batch=3, in_ch=4, out_ch=6, kernel_size=3, dilation=(1, 2))
    assert conv_shifts.applies(second, s2) and s2.shape[-1] < x2.shape[-1]  # junk columns
    with torch.no_grad():
        _rule().per_sample_grad(first, (x1,), s1, ["weight"])
        norms = _rule().norm_sq(second, (x2,), s2, ["weight"], "instantiate")["weight"]
        got = _rule().per_sample_grad(second, (x2,), s2, ["weight"])["weight"]
    want = naive_per_sample_grads(second, (x2,), s2)["weight"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
    torch.testing.assert_close(norms, want.flatten(1).square().sum(1), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("strategy", ["ghost", "instantiate"])
def test_shifted_paths_never_read_what_a_kept_buffer_held_before(strategy, monkeypatch):
    """Every kept scratch buffer is filled with NaN before each call: a position the shifted
    paths failed to zero or overwrite would make the result NaN."""
    from dpclip.layers import _common

    kept = type(_common._scratch)()
    monkeypatch.setattr(_common, "_scratch", kept)
    layer, (x,), s = _case(2, batch=3, kernel_size=3, dilation=(1, 2), padding=1)
    want = naive_per_sample_grads(layer, (x,), s)["weight"]
    for _ in range(2):  # the second round reuses the buffers of the first
        with torch.no_grad():
            for buffer, _views in kept.__dict__.values():
                buffer.fill_(float("nan"))
            norms = _rule().norm_sq(layer, (x,), s, ["weight"], strategy)["weight"]
            for buffer, _views in kept.__dict__.values():
                buffer.fill_(float("nan"))
            got = _rule().per_sample_grad(layer, (x,), s, ["weight"])["weight"]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-10)
        torch.testing.assert_close(norms, want.flatten(1).square().sum(1), rtol=1e-6, atol=1e-10)
    assert ("conv.shifted_input", torch.float64) in kept.__dict__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shifted_paths_with_low_precision_layers_compute_in_float32(dtype):
    reference, (x,), s = _case(2, kernel_size=3, padding=1)  # stride 1, one group
    layer = copy.deepcopy(reference).to(dtype)
    x_low, s_low = x.to(dtype), s.to(dtype)
    reference.weight.data = layer.weight.data.double()
    want = naive_per_sample_grads(reference, (x_low.double(),), s_low.double())["weight"]
    for strategy in ("ghost", "instantiate"):
        got = _rule().norm_sq(layer, (x_low,), s_low, ["weight"], strategy)["weight"]
        assert got.dtype == torch.float32
        torch.testing.assert_close(got.double(), want.flatten(1).square().sum(1), rtol=1e-4,
                                   atol=0)  # fmt: skip
    got = _rule().per_sample_grad(layer, (x_low,), s_low, ["weight"])["weight"]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)


def test_shifts_apply_to_stride_one_single_group_convs_on_a_cpu_only():
    from dpclip.layers import _conv_shifts as conv_shifts

    s = torch.zeros(1, 4, 3, 3)
    assert conv_shifts.applies(nn.Conv2d(2, 4, 3, dilation=2), s)
    assert not conv_shifts.applies(nn.Conv2d(2, 4, 3, stride=(1, 2)), s)
    assert not conv_shifts.applies(nn.Conv2d(2, 4, 3, groups=2), s)
    assert not conv_shifts.applies(nn.Conv2d(2, 4, 3), s.to("meta"))
