"""nn.Conv1d/2d/3d: after unfolding, each group's weight gradient is g_i = s_iᵀ a_i.

The input is padded exactly as the module pads it (zeros, reflect, replicate, circular, 'same'),
then unfolded into a: (b·groups, in/groups·prod(kernel), T) with T the number of output positions;
the output gradient is viewed as s: (b·groups, out/groups, T). Both keep the batch major, so for
groups > 1 the per-sample gradient is block-diagonal over groups and its squared norm is the sum
of the per-group blocks' norms. The clipped sum Σ_i C_i g_i needs no unfolding: it is the
convolution's own weight gradient of the scaled output gradient C ⊙ s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dpclip.layers import _conv_shifts as conv_shifts
from dpclip.layers._common import (
    cast,
    outer_norm_sq,
    outer_per_sample,
    scratch,
    sq_norms,
    use_ghost,
)
from dpclip.layers._registry import LayerRegistry, LayerRule, compute_dtype

_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _check_shapes(module: _Conv, inputs: tuple, grad_output: Tensor) -> int:
    """Number of spatial dims; a clear error for unbatched or mismatched tensors."""
    n = len(module.kernel_size)
    x = inputs[0]
    if x.dim() != n + 2 or grad_output.dim() != n + 2:
        raise ValueError(
            f"{type(module).__name__} rule needs batched input of shape (batch, channels, "
            f"{n} spatial dims); got input {tuple(x.shape)} and output gradient "
            f"{tuple(grad_output.shape)}. Unbatched input is not supported: add a batch dim."
        )
    if x.shape[0] != grad_output.shape[0]:
        raise ValueError(
            f"input batch {x.shape[0]} != output gradient batch {grad_output.shape[0]}"
        )
    if x.shape[1] != module.in_channels or grad_output.shape[1] != module.out_channels:
        raise ValueError(
            f"{type(module).__name__}({module.in_channels}, {module.out_channels}) rule got "
            f"input {tuple(x.shape)} and output gradient {tuple(grad_output.shape)}: channel "
            "counts (dim 1) do not match the layer's"
        )
    return n


def _pad_amounts(module: _Conv) -> list[tuple[int, int]]:
    """(before, after) padding per spatial dim, as the module applies it ('same' pads after)."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        totals = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        return [(t // 2, t - t // 2) for t in totals]
    return [(p, p) for p in module.padding]


def _padded(module: _Conv, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """The input and the symmetric zero padding left for the convolution to apply.

    Symmetric zero padding is left to the caller (no copy); any other padding is applied here
    with ``F.pad``, in the module's mode, so the returned padding is all zeros.
    """
    amounts = _pad_amounts(module)
    if module.padding_mode == "zeros" and all(lo == hi for lo, hi in amounts):
        return x, tuple(lo for lo, _ in amounts)
    pads = [p for pair in reversed(amounts) for p in pair]  # F.pad wants the last dim first
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, pads, mode=mode), (0,) * len(amounts)


def _padded_fully(module: _Conv, x: Tensor) -> Tensor:
    """The input with the module's padding applied (zeros, into a scratch buffer)."""
    x, padding = _padded(module, x)
    if not any(padding):
        return x
    spatial = x.shape[2:]
    shape = torch.Size((*x.shape[:2], *(n + 2 * p for n, p in zip(spatial, padding, strict=True))))
    out = scratch("conv.padded", shape, x.dtype, x.device).zero_()
    out[(..., *(slice(p, p + n) for n, p in zip(spatial, padding, strict=True)))].copy_(x)
    return out


def _unfold(module: _Conv, x: Tensor, dtype: torch.dtype) -> Tensor:
    """a: (b·groups, in/groups·prod(kernel), T), the only copy of the unfolded input.

    One path for every number of spatial dims (F.unfold is 2-D only and was no faster in CPU
    timings): a strided view of the padded input, then one copy that also casts to ``dtype``.
    """
    n = len(module.kernel_size)
    x = _padded_fully(module, x)
    # Sliding windows as a view: (b, C, *out_positions, *kernel); dilation is a strided slice.
    for dim, (k, d, st) in enumerate(
        zip(module.kernel_size, module.dilation, module.stride, strict=True)
    ):
        x = x.unfold(2 + dim, d * (k - 1) + 1, st)
        if d > 1:
            x = x[..., ::d]
    x = x.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n))  # (b, C, *kernel, *out)
    cols = scratch("conv.unfolded", x.shape, dtype, x.device).copy_(x)  # one copy, cast
    b, groups, positions = x.shape[0], module.groups, math.prod(x.shape[2 + n :])
    return cols.view(b * groups, math.prod(x.shape[1 : 2 + n]) // groups, positions)


def _check_positions(module: _Conv, x: Tensor, grad_output: Tensor) -> None:
    """The output gradient has the output's positions for this input (for the paths that
    unfold nothing to compare against)."""
    geometry = zip(
        x.shape[2:], _pad_amounts(module), module.dilation, module.kernel_size, module.stride,
        strict=True,
    )  # fmt: skip
    want = tuple((n + lo + hi - d * (k - 1) - 1) // st + 1 for n, (lo, hi), d, k, st in geometry)
    if tuple(grad_output.shape[2:]) != want:
        raise ValueError(
            f"input {tuple(x.shape)} gives {math.prod(want)} output positions {want} but the "
            f"output gradient {tuple(grad_output.shape)} has {math.prod(grad_output.shape[2:])}"
        )


def _flat(module: _Conv, inputs: tuple, grad_output: Tensor) -> tuple[Tensor, Tensor]:
    """a: (b·G, D, T) and s: (b·G, out/G, T) in the compute dtype; checks they line up."""
    dtype = compute_dtype(module.weight, grad_output)
    a = _unfold(module, inputs[0], dtype)
    b, groups = grad_output.shape[0], module.groups
    s = cast(grad_output, dtype).reshape(b * groups, module.out_channels // groups, -1)
    if a.shape[2] != s.shape[2]:
        raise ValueError(
            f"input {tuple(inputs[0].shape)} gives {a.shape[2]} output positions but the output "
            f"gradient {tuple(grad_output.shape)} has {s.shape[2]}"
        )
    return a, s


# Unfolded elements per batch chunk: bounds the transient copy. 16 MB on a CPU, where bigger
# chunks gain nothing; 256 MB on a GPU, where many small chunks leave it idle between launches.
_CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 26}


def _by_batch_chunks(
    module: _Conv, inputs: tuple, grad_output: Tensor, fn: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """fn(a, s) over batch chunks, concatenated: the unfolded input never exists whole."""
    b = grad_output.shape[0]
    per_sample = module.in_channels * math.prod(module.kernel_size)
    per_sample *= math.prod(grad_output.shape[2:])  # output positions
    budget = _CHUNK_ELEMENTS.get(grad_output.device.type, _CHUNK_ELEMENTS["cpu"])
    step = max(1, budget // max(1, per_sample))
    if step >= b:  # one chunk: no slices
        return fn(*_flat(module, inputs, grad_output))
    parts = [
        fn(*_flat(module, (inputs[0][i : i + step],), grad_output[i : i + step]))
        for i in range(0, b, step)
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _bias_per_sample(grad_output: Tensor, dtype: torch.dtype) -> Tensor:
    return grad_output.sum(dim=tuple(range(2, grad_output.dim())), dtype=dtype)


def norm_sq(
    module: _Conv, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
) -> dict[str, Tensor]:
    """Squared per-sample gradient norms, {name: (b,)}; ghost/instantiate chosen per group size."""
    _check_shapes(module, inputs, grad_output)
    dtype = compute_dtype(module.weight, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in names and conv_shifts.applies(module, grad_output):
        _check_positions(module, inputs[0], grad_output)
        out["weight"] = _shifted_norm_sq(module, inputs[0], grad_output, strategy, dtype)
    elif "weight" in names:
        positions = math.prod(grad_output.shape[2:])
        patch = module.in_channels // module.groups * math.prod(module.kernel_size)
        ghost = use_ghost(strategy, positions, patch, module.out_channels // module.groups)

        def weight_norm_sq(a: Tensor, s: Tensor) -> Tensor:
            return outer_norm_sq(a, s, ghost, positions_last=True)

        per_group = _by_batch_chunks(module, inputs, grad_output, weight_norm_sq)
        if module.groups > 1:
            per_group = per_group.view(grad_output.shape[0], module.groups).sum(dim=1)
        out["weight"] = per_group
    if "bias" in names:
        out["bias"] = sq_norms(_bias_per_sample(grad_output, dtype))
    return out


def _padded_pixels(module: _Conv, x: Tensor) -> int:
    """Pixels per channel of the input once padded as the module pads it."""
    sizes = zip(x.shape[2:], _pad_amounts(module), strict=True)
    return math.prod(n + lo + hi for n, (lo, hi) in sizes)


def _shifted_chunks(
    module: _Conv, x: Tensor, grad_output: Tensor, per_sample: int
) -> tuple[Tensor, tuple[int, ...], int]:
    """The padded input, its padding left to apply, and the batch chunk for the shifted paths:
    ``per_sample`` elements of results per sample, plus the zero-padded copies of the input and
    of s (at most the padded size per channel) that :mod:`dpclip.layers._conv_shifts` makes."""
    per_sample += (module.in_channels + module.out_channels) * _padded_pixels(module, x)
    x, padding = _padded(module, x)
    budget = _CHUNK_ELEMENTS.get(grad_output.device.type, _CHUNK_ELEMENTS["cpu"])
    return x, padding, max(1, budget // per_sample)


def _shifted_per_sample(
    module: _Conv, x: Tensor, grad_output: Tensor, dtype: torch.dtype
) -> Tensor:
    """(b, *weight.shape) per-sample weight gradients by :mod:`dpclip.layers._conv_shifts`
    (stride 1, one group), over batch chunks within the chunk budget."""
    b = grad_output.shape[0]
    x, padding, step = _shifted_chunks(module, x, grad_output, 2 * module.weight.numel())
    out = torch.empty(b, *module.weight.shape, dtype=dtype, device=grad_output.device)
    for i in range(0, b, step):
        g = conv_shifts.per_sample(module, x[i : i + step], padding, grad_output[i : i + step],
                                   dtype)  # fmt: skip
        out[i : i + step].view(g.shape[1], *g.shape[2:], -1).copy_(g.permute(1, 2, 3, 0))
    return out


def _shifted_norm_sq(
    module: _Conv, x: Tensor, grad_output: Tensor, strategy: str, dtype: torch.dtype
) -> Tensor:
    """Squared per-sample weight-gradient norms by :mod:`dpclip.layers._conv_shifts` (stride
    1, one group), over batch chunks within the chunk budget. Under "mixed": the ghost norm
    (the pixel Gram, P²·C multiply-adds for P padded pixels, then the output Gram, T²·out) when
    it costs less than instantiating (T·C·prod(kernel)·out), else per-sample gradients, not
    kept."""
    b, channels = x.shape[:2]
    positions = math.prod(grad_output.shape[2:])
    pixels = _padded_pixels(module, x)
    offsets = math.prod(module.kernel_size)
    ghost = strategy == "ghost" or (
        strategy == "mixed"
        and pixels * pixels * channels + positions * positions * (offsets + module.out_channels)
        < positions * offsets * channels * module.out_channels
    )
    # results per sample: the pixel Gram and three (T, T) tensors, or the gradients
    results = pixels * pixels + 3 * positions * positions if ghost else module.weight.numel()
    x, padding, step = _shifted_chunks(module, x, grad_output, results)

    def norms(x: Tensor, s: Tensor) -> Tensor:
        if ghost:
            return conv_shifts.ghost_norm_sq(module, x, padding, s, dtype)
        grads = conv_shifts.per_sample(module, x, padding, s, dtype)  # (K, b, out, in)
        return torch.linalg.vector_norm(grads, dim=(0, 2, 3)).square()

    parts = [norms(x[i : i + step], grad_output[i : i + step]) for i in range(0, b, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


_SHAPE_ONLY: dict[tuple, Tensor] = {}


def _shape_only(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A tensor of this shape over one element (stride 0), where a kernel reads only the
    weight's shape: made once, not each step (torch.nn.grad makes the same, every call).
    Under a fake-tensor mode (tracing) one is made for the call and never kept."""
    tracing = torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
    key = (tuple(shape), dtype, device)
    made = None if tracing else _SHAPE_ONLY.get(key)
    if made is None:
        made = torch.empty(1, dtype=dtype, device=device).expand(shape)
        if not tracing:
            if len(_SHAPE_ONLY) >= 64:  # per-sample kernel shapes follow the batch size
                _SHAPE_ONLY.clear()
            _SHAPE_ONLY[key] = made
    return made


def _weight_grad(module: _Conv, x: Tensor, grad_output: Tensor, padding: Sequence[int]) -> Tensor:
    """The convolution's weight gradient for input x and output gradient ``grad_output``: the
    backend's kernel, given a weight tensor for its shape only (its values are never read).

    That is the layer's own weight where it has the compute dtype and is contiguous: oneDNN
    copies a stride-0 stand-in into a dense tensor first (9.4 MB, 3.6 ms per call for a
    512×512 3×3 layer on a 2-core CPU)."""
    weight = module.weight
    if not (weight.dtype == x.dtype and weight.device == x.device and weight.is_contiguous()):
        weight = _shape_only(weight.shape, x.dtype, x.device)
    return torch.ops.aten.convolution_backward(
        grad_output, x, weight, None, module.stride, padding, module.dilation,
        False, (0,) * len(padding), module.groups, (False, True, False),
    )[1]  # fmt: skip


def clipped_grad(
    module: _Conv, inputs: tuple, grad_output: Tensor, factors: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """Σ_i C_i g_i per parameter: the convolution's weight gradient for C ⊙ s, no unfolding."""
    n = _check_shapes(module, inputs, grad_output)
    dtype = compute_dtype(module.weight, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in factors:
        scale = cast(factors["weight"], dtype).view(-1, *([1] * (n + 1)))
        x, padding = _padded(module, inputs[0])
        out["weight"] = _weight_grad(
            module, cast(x, dtype), cast(grad_output, dtype) * scale, padding
        )
    if "bias" in factors:
        out["bias"] = cast(factors["bias"], dtype) @ _bias_per_sample(grad_output, dtype)
    return out


def per_sample_grad(
    module: _Conv, inputs: tuple, grad_output: Tensor, names: Sequence[str]
) -> dict[str, Tensor]:
    """Per-sample gradients {name: (b, *param.shape)} (for tied parameters)."""
    _check_shapes(module, inputs, grad_output)
    dtype = compute_dtype(module.weight, grad_output)
    out: dict[str, Tensor] = {}
    if "weight" in names and _kernel_is_faster(module, grad_output, dtype):
        _check_positions(module, inputs[0], grad_output)
        out["weight"] = _per_sample_by_kernel(module, inputs[0], grad_output)
    elif "weight" in names and conv_shifts.applies(module, grad_output):
        _check_positions(module, inputs[0], grad_output)
        out["weight"] = _shifted_per_sample(module, inputs[0], grad_output, dtype)
    elif "weight" in names:
        g = _by_batch_chunks(  # (b·G, out/G, D)
            module,
            inputs,
            grad_output,
            lambda a, s: outer_per_sample(a.transpose(1, 2), s.transpose(1, 2)),
        )
        out["weight"] = g.view(grad_output.shape[0], *module.weight.shape)
    if "bias" in names:
        out["bias"] = _bias_per_sample(grad_output, dtype)
    return out


def _kernel_is_faster(module: _Conv, grad_output: Tensor, dtype: torch.dtype) -> bool:
    """One input channel per group, float32, on a CPU: there the grouped kernel wins. On an H100
    the backend's depthwise weight-gradient kernel took 2.6 of the CNN's 4.7 GPU-ms per step."""
    one_channel = module.in_channels == module.groups
    return one_channel and dtype == torch.float32 and grad_output.device.type == "cpu"


def _per_sample_by_kernel(module: _Conv, x: Tensor, grad_output: Tensor) -> Tensor:
    """Per-sample weight gradients as one grouped convolution call, batch as groups.

    Used when each group sees one input channel (first layers on grayscale input, depthwise
    convs): there the backend's grouped kernels beat unfold + bmm by 2× in CPU timings, and they
    never materialise the unfolded input. float32 only (the fast kernels' dtype).
    """
    b = grad_output.shape[0]
    x, padding = _padded(module, x)
    if module.in_channels == 1:
        return _per_sample_by_forward_conv(module, x, grad_output, padding)
    weight_shape = (b * module.out_channels, *module.weight.shape[1:])
    grad = torch.ops.aten.convolution_backward(
        grad_output.float().reshape(1, b * module.out_channels, *grad_output.shape[2:]),
        x.float().reshape(1, b * module.in_channels, *x.shape[2:]),
        _shape_only(torch.Size(weight_shape), torch.float32, x.device),
        None,
        module.stride,
        padding,
        module.dilation,
        False,
        (0,) * len(padding),
        b * module.groups,
        (False, True, False),
    )[1]
    return grad.view(b, *module.weight.shape)


def _per_sample_by_forward_conv(
    module: _Conv, x: Tensor, grad_output: Tensor, padding: Sequence[int]
) -> Tensor:
    """Per-sample weight gradients of a one-input-channel convolution as one grouped forward
    convolution: sample i's gradient at kernel offset k is the correlation of its input with its
    output gradient, taken as the kernel, dilated by the stride, at positions k·dilation.

    Sample i is group i: input (1, b, *spatial), kernel (b·out, 1, *output positions). The
    result can reach past the kernel's extent (when the stride leaves input unused at the end):
    that tail is cut. On the CPU it beat the grouped weight-gradient kernel by 15-20% on 8×8
    kernels at stride 2 (the Tramer-Boneh CNN's first layer), more at stride 1 or with dilation.
    """
    b, spatial = grad_output.shape[0], x.shape[2:]
    grad = torch.ops.aten.convolution(
        x.float().reshape(1, b, *spatial),
        grad_output.float().reshape(b * module.out_channels, 1, *grad_output.shape[2:]),
        None, module.dilation, padding, module.stride, False, (0,) * len(padding), b,
    )  # fmt: skip
    grad = grad[(0, slice(None), *(slice(0, k) for k in module.kernel_size))]
    return grad.reshape(b, *module.weight.shape)


def instantiates(
    module: _Conv, inputs: tuple, grad_output: Tensor, names: Sequence[str], strategy: str
) -> list[str]:
    """The bias always ((b, out) is smaller than s); the weight when asked, or under "mixed"
    when its per-sample gradients are no larger than the recorded input and output gradient
    they replace (so memory does not grow)."""
    if strategy == "mixed":
        recorded = (inputs[0].numel() + grad_output.numel()) // grad_output.shape[0]
        weight = module.weight.numel() <= recorded
    else:
        weight = strategy == "instantiate"
    return [n for n in names if n == "bias" or weight]


def register(registry: LayerRegistry) -> None:
    rule = LayerRule(norm_sq, clipped_grad, per_sample_grad, instantiates=instantiates)
    for conv_type in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        registry.register(conv_type, rule)
