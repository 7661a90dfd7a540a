"""Gaussian noise for the summed clipped gradient, drawn once per logical step."""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch
from torch import Tensor

# A bucket is one flat draw, added to a run of tensors (or pieces of one) of one device and dtype:
# two kernel launches per bucket instead of two per parameter, which matters on a GPU. On a CPU the
# draw goes through one scratch buffer of a bucket's size, kept between steps (a fresh
# model-sized buffer would be faulted in again every step). Each CPU bucket is drawn from a
# generator of its own, seeded in bucket order from the engine's: buckets could be filled in any
# order (and were, from a thread pool, until a per-process benchmark showed that pool making the
# step slower: benchmarks/RESULTS.md); the stream of noise a seed gives is kept.
_BUCKET_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def _buckets(tensors: list[Tensor]) -> list[list[Tensor]]:
    """Consecutive runs of one device and dtype of at most the device's bucket size; a larger
    contiguous tensor is cut into flat pieces first."""
    buckets: list[list[Tensor]] = []
    size = 0
    for t in tensors:
        limit = _BUCKET_ELEMENTS.get(t.device.type, _BUCKET_ELEMENTS["cuda"])
        pieces = t.view(-1).split(limit) if t.numel() > limit and t.is_contiguous() else [t]
        for piece in pieces:
            last = buckets[-1][-1] if buckets else None
            same = last is not None and (last.device, last.dtype) == (t.device, t.dtype)
            if same and size + piece.numel() <= limit:
                buckets[-1].append(piece)
                size += piece.numel()
            else:
                buckets.append([piece])
                size = piece.numel()
    return buckets


def _add_drawn(bucket: list[Tensor], flat: Tensor) -> None:
    noise = flat.split([t.numel() for t in bucket])
    torch._foreach_add_(bucket, [n.view_as(t) for n, t in zip(noise, bucket, strict=True)])


class GaussianNoise:
    """Adds N(0, std²) to tensors, from generators of its own (one per device, drawn in place).

    ``secure=True`` reseeds from the OS's cryptographic randomness before every draw, so no
    seed or saved state predicts the noise; a seeded generator is for reproducible research.
    """

    def __init__(self, std: float, *, seed: int | None = None, secure: bool = False) -> None:
        if std < 0:
            raise ValueError(f"expected noise std >= 0, got {std}")
        if secure and seed is not None:
            raise ValueError("secure noise cannot be seeded; pass seed=None with secure_rng=True")
        self.std = float(std)
        self.secure = secure
        self.seed = seed if seed is not None else secrets.randbits(62)
        self._generators: dict[str, torch.Generator] = {}
        self._scratch: dict[torch.dtype, Tensor] = {}
        self.draws = 0

    def _generator(self, device: torch.device) -> torch.Generator:
        key = str(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + len(self._generators))
            self._generators[key] = gen
        if self.secure:
            gen.manual_seed(secrets.randbits(62))
        return gen

    def add_(self, tensors: Iterable[Tensor]) -> None:
        """Add fresh noise to each tensor in place (one draw for the whole step)."""
        self.draws += 1
        if self.std == 0:
            return
        for bucket in _buckets(list(tensors)):
            first = bucket[0]
            gen = self._generator(first.device)
            if first.device.type == "cpu":  # a generator per bucket, seeded from the engine's
                seed = int(torch.randint(0, 2**62, (1,), generator=gen))
                gen = torch.Generator().manual_seed(seed)
            flat = self._buffer(sum(t.numel() for t in bucket), first)
            _add_drawn(bucket, flat.normal_(0.0, self.std, generator=gen))

    def _buffer(self, numel: int, like: Tensor) -> Tensor:
        """Where a bucket is drawn: on a CPU a scratch kept by this object, elsewhere a fresh
        block from the device's caching allocator."""
        if like.device.type != "cpu":
            return torch.empty(numel, dtype=like.dtype, device=like.device)
        buf = self._scratch.get(like.dtype)
        if buf is None or buf.numel() < numel:
            buf = self._scratch[like.dtype] = torch.empty(numel, dtype=like.dtype)
        return buf[:numel]

    def state_dict(self) -> dict:
        return {
            "draws": self.draws,
            "seed": self.seed,
            "secure": self.secure,
            "generators": {k: g.get_state() for k, g in self._generators.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("secure") != self.secure:
            raise ValueError("noise state was saved with a different secure_rng setting")
        self.seed = int(state["seed"])
        self.draws = int(state["draws"])
        self._generators = {}
        for key, gen_state in state["generators"].items():
            gen = torch.Generator(device=key)
            gen.set_state(gen_state)
            self._generators[key] = gen
