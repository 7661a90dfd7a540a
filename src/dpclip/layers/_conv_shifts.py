"""Per-sample gradients and norms of a stride-1 convolution without unfolding its input.

At stride 1 the input patch under kernel offset k is the padded input shifted by k. Number the
output positions over the padded input's full trailing extent (the positions past the output's
edge in the trailing dims are junk) and, for each offset, the shifted input of a sample is a
strided view of the padded input: a (positions × channels) matrix with unit stride along the
positions, which a batched matmul reads in place. Sample i's gradient at offset k is then
s_i X_{i,k}, with s zero over the junk positions so that they add nothing: one ``bmm`` per offset
and no unfolded copy of the input. The unfolded copy writes prod(kernel) copies of the input (9
for 3×3); here the input and s are each copied once, zero-padded. On a 2-core CPU, ResNet-18's
stride-1 3×3 layers (batch 32) took 16-20 ms this way against 33-50 ms for unfold + bmm.

The ghost norm needs the Gram of the unfolded input, a_t·a_t' = Σ_k p_{t+k}·p_{t'+k} over kernel
offsets k, with p the padded input's pixels (channel vectors). So it is the sum over offsets of
shifted views of the pixel Gram p_u·p_v: one ``bmm`` over the pixels (P²·C multiply-adds per
sample for P padded pixels, against T²·C·prod(kernel) for the unfolded Gram) and prod(kernel)
additions of (T × T) views. On the same CPU: 2.8 against 9.3 ms (256 channels, 8×8), 13 against
48 ms (128 channels, 16×16).
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor, nn

from dpclip.layers._common import cast, scratch

_Conv = nn.Conv1d | nn.Conv2d | nn.Conv3d


def applies(module: _Conv, grad_output: Tensor) -> bool:
    """Stride 1 and one group, on a CPU (measured there; on a GPU the unfolded path, one launch
    per batch chunk instead of one per kernel offset, is kept)."""
    return (
        module.groups == 1
        and all(s == 1 for s in module.stride)
        and grad_output.device.type == "cpu"
    )


class _Layout:
    """The padded input's geometry: sizes, flat strides, output positions, kernel offsets."""

    def __init__(self, module: _Conv, x: Tensor, padding: tuple[int, ...], grad_output: Tensor):
        self.sizes = tuple(n + 2 * p for n, p in zip(x.shape[2:], padding, strict=True))
        self.outputs = tuple(grad_output.shape[2:])
        self.strides = [math.prod(self.sizes[j + 1 :]) for j in range(len(self.sizes))]
        self.plane = math.prod(self.sizes)
        self.offsets = [  # flat offset of each kernel offset, row-major over the kernel
            sum(o * d * st for o, d, st in zip(ks, module.dilation, self.strides, strict=True))
            for ks in itertools.product(*(range(k) for k in module.kernel_size))
        ]


def _padded_flat(x: Tensor, padding: tuple[int, ...], layout: _Layout, tail: int,
                 dtype: torch.dtype) -> Tensor:  # fmt: skip
    """x zero-padded into a flat scratch buffer (b·C·plane + tail elements, the tail zero)."""
    b, channels = x.shape[:2]
    flat = scratch("conv.shifted_input", (b * channels * layout.plane + tail,), dtype,
                   x.device).zero_()  # fmt: skip
    padded = flat[: b * channels * layout.plane].view(b, channels, *layout.sizes)
    padded[(..., *(slice(p, p + n) for p, n in zip(padding, x.shape[2:], strict=True)))].copy_(x)
    return flat


def per_sample(
    module: _Conv, x: Tensor, padding: tuple[int, ...], grad_output: Tensor, dtype: torch.dtype
) -> Tensor:
    """(prod(kernel), b, out, in) in ``dtype``: sample i's weight gradient at each kernel
    offset (offsets in row-major order), for x already padded but for the symmetric zero
    ``padding`` left to apply (as :func:`dpclip.layers.conv._padded` returns it)."""
    b, channels = x.shape[:2]
    layout = _Layout(module, x, padding, grad_output)
    sizes, plane = layout.sizes, layout.plane
    # Junk positions read up to this far past a sample's last plane (into the next one, or past
    # the end for the last sample): the buffer gets that tail, zeroed, so all reads are finite.
    spans = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    tail = sum(span * st for span, st in zip(spans[1:], layout.strides[1:], strict=True))
    flat = _padded_flat(x, padding, layout, tail, dtype)
    rows = layout.outputs[0]
    positions = rows * math.prod(sizes[1:])  # the output's rows at the full padded width
    s = scratch("conv.shifted_grad", (b, module.out_channels, rows, *sizes[1:]), dtype,
                x.device).zero_()  # fmt: skip
    s[(..., *(slice(0, o) for o in layout.outputs[1:]))].copy_(grad_output)
    s = s.view(b, module.out_channels, positions)
    out = torch.empty(len(layout.offsets), b, module.out_channels, channels, dtype=dtype,
                      device=x.device)  # fmt: skip
    for i, offset in enumerate(layout.offsets):
        start = flat.storage_offset() + offset
        shifted = flat.as_strided((b, positions, channels), (channels * plane, 1, plane), start)
        torch.bmm(s, shifted, out=out[i])
    return out


def ghost_norm_sq(
    module: _Conv, x: Tensor, padding: tuple[int, ...], grad_output: Tensor, dtype: torch.dtype
) -> Tensor:
    """(b,) squared per-sample weight-gradient norms Σ_{t,t'} (a_t·a_t')(s_t·s_t'), the input
    Gram from shifted views of the pixel Gram; x and ``padding`` as for :func:`per_sample`."""
    b, channels = x.shape[:2]
    layout = _Layout(module, x, padding, grad_output)
    plane, outputs = layout.plane, layout.outputs
    pixels = _padded_flat(x, padding, layout, 0, dtype).view(b, channels, plane)
    gram = torch.bmm(pixels.transpose(1, 2), pixels)  # (b, plane, plane)
    # position t's pixel under offset k, in the flat padded layout: Σ_j t_j·stride_j + k
    view_strides = (plane * plane, *(plane * st for st in layout.strides), *layout.strides)
    shape = (b, *outputs, *outputs)
    acc = torch.empty(shape, dtype=dtype, device=x.device)
    for i, offset in enumerate(layout.offsets):
        shifted = gram.as_strided(shape, view_strides, gram.storage_offset() + offset * (plane + 1))
        acc.copy_(shifted) if i == 0 else acc.add_(shifted)
    t = math.prod(outputs)
    s = cast(grad_output.reshape(b, module.out_channels, t), dtype)
    gram_s = torch.bmm(s.transpose(1, 2), s)
    return (acc.view(b, t, t) * gram_s).sum(dim=(1, 2))
