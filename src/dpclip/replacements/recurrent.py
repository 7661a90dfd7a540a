"""nn.LSTM, nn.GRU and nn.RNN rebuilt from plain ops: same weights, same outputs, clipped per
example.

torch's recurrent modules run one fused kernel with no per-example form. Here each layer and
direction is a module of its own that owns that layer's four parameters and steps through time
with ``F.linear``, batch first; having no rule, it takes the generic fallback, which recomputes
it per example (memory: b × that layer's parameters). The outer module keeps torch's interface:
``batch_first``, stacked and bidirectional layers, dropout between layers, ``(h0, c0)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


class _Layer(nn.Module):
    """One layer in one direction: (x (b, T, in), h0 (b, H)[, c0]) -> (out (b, T, H), h_n[, c_n])."""

    def __init__(self, mode: str, weights: list[Tensor], reverse: bool) -> None:
        super().__init__()
        self.mode, self.reverse = mode, reverse
        self.weight_ih = nn.Parameter(weights[0].detach().clone())
        self.weight_hh = nn.Parameter(weights[1].detach().clone())
        has_bias = len(weights) == 4
        self.bias_ih = nn.Parameter(weights[2].detach().clone()) if has_bias else None
        self.bias_hh = nn.Parameter(weights[3].detach().clone()) if has_bias else None
        for mine, theirs in zip(self.parameters(), weights, strict=True):
            mine.requires_grad_(theirs.requires_grad)

    def forward(self, x: Tensor, h: Tensor, c: Tensor | None = None) -> tuple[Tensor, ...]:
        gates_x = F.linear(x, self.weight_ih, self.bias_ih)  # all steps at once
        steps = range(x.shape[1] - 1, -1, -1) if self.reverse else range(x.shape[1])
        outs: list[Tensor] = []
        for t in steps:
            gates_h = F.linear(h, self.weight_hh, self.bias_hh)
            if self.mode == "LSTM":
                i, f, g, o = (gates_x[:, t] + gates_h).chunk(4, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
            elif self.mode == "GRU":
                xr, xz, xn = gates_x[:, t].chunk(3, dim=-1)
                hr, hz, hn = gates_h.chunk(3, dim=-1)
                r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
                n = torch.tanh(xn + r * hn)
                h = (1 - z) * n + z * h
            else:
                pre = gates_x[:, t] + gates_h
                h = torch.tanh(pre) if self.mode == "RNN_TANH" else torch.relu(pre)
            outs.append(h)
        if self.reverse:
            outs.reverse()
        out = torch.stack(outs, dim=1)
        return (out, h, c) if self.mode == "LSTM" else (out, h)


class DPRecurrent(nn.Module):
    """Drop-in for :class:`torch.nn.LSTM`, :class:`~torch.nn.GRU` and :class:`~torch.nn.RNN`
    (same forward signature and outputs; batched inputs, no PackedSequence)."""

    def __init__(self, source: nn.RNNBase) -> None:
        super().__init__()
        if getattr(source, "proj_size", 0):
            raise ValueError("dpclip.fix does not replace an LSTM with proj_size > 0")
        self.mode, self.hidden_size = source.mode, source.hidden_size
        self.num_layers, self.batch_first = source.num_layers, source.batch_first
        self.directions = 2 if source.bidirectional else 1
        self.dropout = source.dropout
        layers = []
        for layer in range(self.num_layers):
            for direction in range(self.directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
                if source.bias:
                    names += [f"bias_ih{suffix}", f"bias_hh{suffix}"]
                weights = [getattr(source, n) for n in names]
                layers.append(_Layer(self.mode, weights, reverse=bool(direction)))
        self.layers = nn.ModuleList(layers)
        self.train(source.training)

    def forward(self, x: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None):
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(
                "dpclip's recurrent replacement takes a batched 3-d tensor (no PackedSequence, "
                f"no unbatched input), got {type(x).__name__}"
                + (f" of shape {tuple(x.shape)}" if isinstance(x, Tensor) else "")
            )
        if not self.batch_first:
            x = x.transpose(0, 1)
        b = x.shape[0]
        lstm = self.mode == "LSTM"
        if hx is None:
            zeros = x.new_zeros(self.num_layers * self.directions, b, self.hidden_size)
            hx = (zeros, zeros) if lstm else zeros
        h0, c0 = hx if lstm else (hx, None)
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            if layer and self.dropout:
                x = F.dropout(x, self.dropout, self.training)
            outs = []
            for direction in range(self.directions):
                k = layer * self.directions + direction
                state = (h0[k], c0[k]) if lstm else (h0[k],)
                out, *last = self.layers[k](x, *state)
                outs.append(out)
                h_n.append(last[0])
                if lstm:
                    c_n.append(last[1])
            x = torch.cat(outs, dim=-1) if len(outs) > 1 else outs[0]
        out = x if self.batch_first else x.transpose(0, 1)
        h = torch.stack(h_n)
        return (out, (h, torch.stack(c_n))) if lstm else (out, h)
