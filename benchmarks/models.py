"""The benchmark models, randomly initialised (nothing is downloaded), and their synthetic batches.

``MODELS`` maps a name to a :class:`ModelSpec`: how to build the model, how to make a batch of a
given size (and sequence length, for language models), the mean loss, and the default batch size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """One benchmark model: builder, batch maker, loss, defaults."""

    build: Callable[[], nn.Module]
    make_batch: Callable[[int, int | None, torch.Generator], Batch]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    batch_size: int
    seq_len: int | None  # None: not a sequence model (make_batch ignores seq_len)
    description: str
    cuda_batch_size: int | None = None  # default on a GPU, where small batches leave it idle

    def default_batch_size(self, device: str) -> int:
        """The batch the model is measured at on ``device`` ("cpu" or "cuda")."""
        if device == "cuda" and self.cuda_batch_size:
            return self.cuda_batch_size
        return self.batch_size

    @property
    def is_sequence(self) -> bool:
        return self.seq_len is not None


# --- Tramer & Boneh (2021) CNN for 28x28 grey images (the Opacus MNIST example's model) -------


class TramerBonehCNN(nn.Module):
    """Two tanh conv blocks and a two-layer tanh head; about 26k parameters."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = F.max_pool2d(torch.tanh(self.conv1(x)), 2, 1)  # 16 x 13 x 13
        x = F.max_pool2d(torch.tanh(self.conv2(x)), 2, 1)  # 32 x 4 x 4
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))


def _image_batch(channels: int, size: int, classes: int) -> Callable[..., Batch]:
    def make(batch_size: int, seq_len: int | None, gen: torch.Generator) -> Batch:
        x = torch.randn(batch_size, channels, size, size, generator=gen)
        return x, torch.randint(classes, (batch_size,), generator=gen)

    return make


# --- Transformer blocks written by hand (nn.Linear, LayerNorm, GELU) -----------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention from nn.Linear projections; optionally causal."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        out = scores.softmax(-1) @ v  # b, heads, t, d/heads
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: attention and a 4x GELU MLP, each with a residual."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPTLike(nn.Module):
    """Decoder-only LM: token and learned position embeddings, blocks, final LayerNorm, untied head."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, max_len: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Embedding(max_len, width)
        self.blocks = nn.Sequential(*(Block(width, heads, causal=True) for _ in range(layers)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)

    def forward(self, ids: Tensor) -> Tensor:
        b, t = ids.shape
        # positions carry the batch dimension so per-sample layer rules see (b, t) like the tokens;
        # materialised (repeat, not expand): Opacus 1.6's ghost embedding norm needs contiguous ids
        pos = torch.arange(t, device=ids.device).repeat(b, 1)
        return self.head(self.ln(self.blocks(self.tok(ids) + self.pos(pos))))


class ViT(nn.Module):
    """ViT-style encoder: Conv2d patch embedding, class token, learned positions, linear head.

    The class token and the positions are nn.Embedding lookups (not bare parameters) so that every
    trainable parameter belongs to a standard layer that DP frameworks know.
    """

    def __init__(self, image: int, patch: int, width: int, depth: int, heads: int, classes: int):
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, width, patch, stride=patch)
        self.cls = nn.Embedding(1, width)
        self.pos = nn.Embedding(n + 1, width)
        self.blocks = nn.Sequential(*(Block(width, heads, causal=False) for _ in range(depth)))
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, classes)

    def forward(self, x: Tensor) -> Tensor:
        b = x.shape[0]
        x = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls(torch.zeros(b, 1, dtype=torch.long, device=x.device))
        pos = torch.arange(x.shape[1] + 1, device=x.device).repeat(b, 1)
        x = torch.cat([cls, x], dim=1) + self.pos(pos)
        return self.head(self.ln(self.blocks(x))[:, 0])


# --- ResNet-18 with GroupNorm (CIFAR stem: 3x3 conv, no max-pool) --------------------------------


class BasicBlock(nn.Module):
    """Two 3x3 convs with GroupNorm and a (projected when shapes differ) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, groups: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.gn1 = nn.GroupNorm(groups, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.gn2 = nn.GroupNorm(groups, cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(groups, cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.gn1(self.conv1(x)))
        return F.relu(self.gn2(self.conv2(y)) + self.short(x))


class ResNet18GN(nn.Module):
    """ResNet-18 layout (2-2-2-2 basic blocks, widths 64-512) with GroupNorm instead of BatchNorm."""

    def __init__(self, classes: int = 10, groups: int = 16) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.GroupNorm(groups, 64))
        widths, layers, cin = (64, 128, 256, 512), [], 64
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(cin, w, stride, groups), BasicBlock(w, w, 1, groups)]
            cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(512, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.stem(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# --- GPT-2 small from a transformers config -------------------------------------------------------


class GPT2Logits(nn.Module):
    """GPT2LMHeadModel returning plain logits; dropout off so every framework sees the same graph."""

    def __init__(self, tied: bool, seq_len: int) -> None:
        super().__init__()
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            n_layer=12,
            n_embd=768,
            n_head=12,
            n_positions=max(1024, seq_len),
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=tied,
        )
        self.gpt2 = GPT2LMHeadModel(config)
        if not tied and self.gpt2.lm_head.weight is self.gpt2.transformer.wte.weight:
            raise RuntimeError("transformers tied the LM head although tie_word_embeddings=False")

    def forward(self, ids: Tensor) -> Tensor:
        # explicit (b, t) position ids: with transformers' default (1, t) ids, per-sample methods
        # that read the batch size off each layer's input (Opacus) see a batch of one for wpe
        pos = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        return self.gpt2(input_ids=ids, position_ids=pos, use_cache=False).logits


def _token_batch(vocab: int, default_len: int) -> Callable[..., Batch]:
    def make(batch_size: int, seq_len: int | None, gen: torch.Generator) -> Batch:
        t = seq_len or default_len
        ids = torch.randint(vocab, (batch_size, t + 1), generator=gen)
        return ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    return make


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy over all positions of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


GPT_LIKE_MAX_LEN = 1024
GPT2_VOCAB = 50257

MODELS: dict[str, ModelSpec] = {
    "cnn": ModelSpec(
        build=TramerBonehCNN,
        make_batch=_image_batch(1, 28, 10),
        loss_fn=F.cross_entropy,
        batch_size=1024,
        seq_len=None,
        description="Tramer-Boneh CNN, 1x28x28, 26k params",
        cuda_batch_size=4096,
    ),
    "gpt-like": ModelSpec(
        build=lambda: GPTLike(vocab=5000, width=256, layers=4, heads=4, max_len=GPT_LIKE_MAX_LEN),
        make_batch=_token_batch(5000, 128),
        loss_fn=lm_loss,
        batch_size=16,
        seq_len=128,
        description="decoder 4x256, 4 heads, vocab 5000, untied head",
        cuda_batch_size=64,
    ),
    "gpt2": ModelSpec(
        build=lambda: GPT2Logits(tied=True, seq_len=128),
        make_batch=_token_batch(GPT2_VOCAB, 128),
        loss_fn=lm_loss,
        batch_size=4,
        seq_len=128,
        description="GPT-2 small (transformers), tied wte/lm_head",
        cuda_batch_size=16,
    ),
    "gpt2-untied": ModelSpec(
        build=lambda: GPT2Logits(tied=False, seq_len=128),
        make_batch=_token_batch(GPT2_VOCAB, 128),
        loss_fn=lm_loss,
        batch_size=4,
        seq_len=128,
        description="GPT-2 small (transformers), untied lm_head",
        cuda_batch_size=16,
    ),
    "resnet18-gn": ModelSpec(
        build=ResNet18GN,
        make_batch=_image_batch(3, 32, 10),
        loss_fn=F.cross_entropy,
        batch_size=32,
        seq_len=None,
        description="ResNet-18 with GroupNorm(16), 3x32x32",
        cuda_batch_size=256,
    ),
    "vit-small": ModelSpec(
        build=lambda: ViT(image=32, patch=4, width=384, depth=12, heads=6, classes=10),
        make_batch=_image_batch(3, 32, 10),
        loss_fn=F.cross_entropy,
        batch_size=32,
        seq_len=None,
        description="ViT-S/4 encoder (12x384, 6 heads), 3x32x32",
        cuda_batch_size=256,
    ),
}
